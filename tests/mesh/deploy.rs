//! `deploy/`: the container images, the Compose mesh under faults, the Kubernetes manifests and the
//! systemd units, each checked by the tool that runs them. The Docker part runs the repository's own
//! scripts (`deploy/images/test.sh`, `deploy/compose/test.sh`) with the binaries cargo just built, so the
//! README's test command covers them; every part skips with a printed reason where its tool is missing.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

const BIN: &str = env!("CARGO_BIN_EXE_quicmesh");
const SLIM: &str = env!("CARGO_BIN_EXE_quicmesh-proxy");

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `cmd` under coreutils `timeout` (SIGTERM after `secs`, so a script's exit trap still cleans up;
/// SIGKILL 20 s later).
fn bounded(secs: u64, cmd: &mut Command) -> Output {
    let program = cmd.get_program().to_owned();
    let args: Vec<_> = cmd.get_args().map(|a| a.to_owned()).collect();
    let mut t = Command::new("timeout");
    t.args(["-k", "20", &secs.to_string()])
        .arg(&program)
        .args(&args);
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => t.env(k, v),
            None => t.env_remove(k),
        };
    }
    if let Some(d) = cmd.get_current_dir() {
        t.current_dir(d);
    }
    t.output()
        .unwrap_or_else(|e| panic!("running {program:?} under timeout: {e}"))
}

fn docker_works() -> Result<(), String> {
    let out = Command::new("timeout")
        .args(["20", "docker", "info"])
        .output()
        .map_err(|e| format!("cannot run docker: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "docker info failed: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        ))
    }
}

/// Runs a deploy script with the cargo-built binaries; asserts exit 0 and its PASS (or skip) line.
fn run_script(script: &str, secs: u64, env: &[(&str, &str)]) {
    let bin_dir = Path::new(BIN).parent().expect("the binary has a directory");
    assert_eq!(
        Path::new(SLIM).parent(),
        Some(bin_dir),
        "quicmesh and quicmesh-proxy are built into one directory"
    );
    let out = bounded(
        secs,
        Command::new("sh")
            .arg(repo().join(script))
            .env("QUICMESH_BIN_DIR", bin_dir)
            .envs(env.iter().copied())
            .current_dir(repo()),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("--- {script} stdout\n{stdout}");
    assert!(
        out.status.success(),
        "{script} failed ({:?}; 124 = over its {secs} s bound):\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );
    assert!(
        stdout.contains("PASS") || stdout.starts_with("skipped:"),
        "{script} printed neither PASS nor a skip reason:\n{stdout}"
    );
}

#[test]
fn images_start_and_the_compose_mesh_recovers_from_faults_with_every_request_accounted_for() {
    if let Err(why) = docker_works() {
        eprintln!("skipped: the deploy Docker tests need a working Docker daemon ({why})");
        return;
    }
    // About 20 s and 70 s alone; the bounds leave room for a suite running beside them on two cores.
    // Both scripts use the tag `QUICMESH_IMAGE_TAG` (default dev), so runs of two checkouts on one
    // Docker host can keep their images apart.
    run_script("deploy/images/test.sh", 90, &[]);
    let tag = std::env::var("QUICMESH_IMAGE_TAG").unwrap_or_else(|_| "dev".to_owned());
    // The images were just built from the same binaries.
    run_script(
        "deploy/compose/test.sh",
        180,
        &[("QM_SKIP_BUILD", "1"), ("QM_TAG", &tag)],
    );
}

#[test]
fn kubernetes_manifests_validate_against_the_schemas() {
    let dir = repo().join("deploy/kubernetes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("deploy/kubernetes")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 5, "manifests in {}", dir.display());
    assert!(
        files.iter().any(|f| f.ends_with("node-gateway.yaml")),
        "the node gateway DaemonSet is validated with the rest"
    );

    // The proxy configurations the manifests show (the sidecar's ConfigMap, the node gateway's
    // example of a node's file) are ones the proxy accepts.
    for name in ["sidecar-example.yaml", "node-gateway.yaml"] {
        let text = std::fs::read_to_string(dir.join(name)).expect("manifest");
        let toml: String = text
            .split("proxy.toml: |\n")
            .nth(1)
            .unwrap_or_else(|| panic!("{name} has a proxy.toml"))
            .lines()
            .take_while(|l| l.is_empty() || l.starts_with("    "))
            .map(|l| format!("{}\n", l.get(4..).unwrap_or("")))
            .collect();
        quicmesh_transport::ProxyConfig::parse(Path::new("/etc/quicmesh/proxy.toml"), &toml)
            .unwrap_or_else(|e| panic!("{name}'s proxy.toml: {e}\n{toml}"));
    }

    let probe = Command::new("kubernetes-validate")
        .arg("--version")
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        eprintln!(
            "skipped: schema validation needs kubernetes-validate (pip install kubernetes-validate)"
        );
        return;
    }
    let out = bounded(
        120,
        Command::new("kubernetes-validate")
            .args(["--strict", "--quiet"])
            .args(&files),
    );
    assert!(
        out.status.success(),
        "kubernetes-validate --strict refused a manifest:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn systemd_units_verify() {
    if !Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        eprintln!("skipped: the unit check needs systemd-analyze");
        return;
    }
    // `verify` checks that ExecStart names an executable: point the units at the binaries cargo built
    // instead of /usr/local/bin.
    let bin_dir = Path::new(BIN).parent().expect("the binary has a directory");
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut units = Vec::new();
    for name in ["quicmesh-controller.service", "quicmesh-proxy.service"] {
        let text = std::fs::read_to_string(repo().join("deploy/systemd").join(name))
            .unwrap_or_else(|e| panic!("deploy/systemd/{name}: {e}"));
        assert!(
            text.contains("ExecStart=/usr/local/bin/"),
            "{name} starts a binary in /usr/local/bin"
        );
        let path = tmp.path().join(name);
        std::fs::write(
            &path,
            text.replace("/usr/local/bin/", &format!("{}/", bin_dir.display())),
        )
        .expect("write unit");
        units.push(path);
    }
    let out = bounded(
        60,
        Command::new("systemd-analyze").arg("verify").args(&units),
    );
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Warnings (an unknown key, a bad value) do not change the exit code: none may name our units.
    let ours: Vec<&str> = all.lines().filter(|l| l.contains("quicmesh-")).collect();
    assert!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify: {:?}\n{all}",
        out.status
    );
}
