//! Certificates our own CA would never issue, made by hand with the `openssl` CLI and presented by an
//! independent QUIC client (Python `aioquic`, `tests/peers/mtls_probe.py`): the inbound proxy must
//! refuse each one at the handshake, and count it under its own reason. Skipped, with the reason
//! printed, when `openssl` or `aioquic` is missing (CI installs both).

use std::{path::Path, process::Command};

use crate::support::*;

/// Why the outsider tools are unusable here, if they are.
fn tools_missing() -> Option<String> {
    let ok = |cmd: &mut Command| cmd.output().is_ok_and(|o| o.status.success());
    if !ok(Command::new("openssl").arg("version")) {
        return Some("openssl CLI not found".into());
    }
    if !ok(Command::new("python3").args(["-c", "import aioquic"])) {
        return Some("python3 with aioquic not found (pip install aioquic)".into());
    }
    None
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Writes `name.pem`/`name.key`: a leaf signed by the PKI's CA with key `keygen` (openssl genpkey
/// arguments) and subjectAltName `san`.
fn hand_made_leaf(pki: &Pki, name: &str, keygen: &[&str], san: &str) {
    let d = pki.path();
    std::fs::write(d.join("ca.key"), pki.ca.key_pem()).expect("ca key");
    let key = format!("{name}.key");
    let mut args = vec!["genpkey", "-out", &key];
    args.extend_from_slice(keygen);
    openssl(d, &args);
    let ext = format!("{name}.ext");
    std::fs::write(
        d.join(&ext),
        format!(
            "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth,serverAuth\nsubjectAltName={san}\n"
        ),
    )
    .expect("ext");
    let csr = format!("{name}.csr");
    openssl(
        d,
        &[
            "req",
            "-new",
            "-key",
            &key,
            "-subj",
            "/O=handmade",
            "-out",
            &csr,
        ],
    );
    openssl(
        d,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-days",
            "1",
            "-extfile",
            &ext,
            "-out",
            &format!("{name}.pem"),
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hand_made_certificates_are_refused_each_with_its_own_reason() {
    if let Some(why) = tools_missing() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let pki = Pki::new();
    let echo = echo_server().await;
    let server = server_proxy(&pki, echo).await;
    let p256 = ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"];
    let good = "URI:spiffe://mesh.local/ns/default/sa/client";
    let cases: [(&str, &[&str], String, Option<&str>); 6] = [
        // The control: a well-formed certificate made by hand is accepted.
        ("good", &p256, good.to_owned(), None),
        (
            "second_uri",
            &p256,
            format!("{good},URI:https://client.example"),
            Some("multiple_uri_sans"),
        ),
        (
            "two_spiffe",
            &p256,
            format!("{good},URI:spiffe://mesh.local/ns/default/sa/other"),
            Some("multiple_uri_sans"),
        ),
        (
            "dot_segment",
            &p256,
            "URI:spiffe://mesh.local/ns/../sa/client".into(),
            Some("invalid_spiffe_id"),
        ),
        (
            "dns_only",
            &p256,
            "DNS:client.example".into(),
            Some("no_spiffe_id"),
        ),
        (
            "rsa1024",
            &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:1024"],
            good.to_owned(),
            Some("weak_key"),
        ),
    ];
    // Made one after the other, presented all at once (each probe waits for its verdict).
    let target = server.inbound();
    let mut probes = Vec::new();
    for (name, keygen, san, refusal) in cases {
        hand_made_leaf(&pki, name, keygen, &san);
        let dir = pki.path().to_owned();
        probes.push((
            name,
            refusal,
            tokio::task::spawn_blocking(move || probe(&dir, target, name)),
        ));
    }
    let mut expected = std::collections::BTreeMap::<&str, f64>::new();
    for (name, refusal, task) in probes {
        let (accepted, error) = task.await.expect("probe task");
        match refusal {
            None => assert!(accepted, "{name} refused: {error}"),
            Some(reason) => {
                assert!(!accepted, "{name} was accepted");
                *expected.entry(reason).or_default() += 1.0;
            }
        }
    }
    let m = server.metrics().await;
    for (reason, n) in expected {
        assert_eq!(
            metric(
                &m,
                "quicmesh_peer_refusals_total",
                &["direction=\"inbound\"", &format!("reason=\"{reason}\"")]
            ),
            n,
            "refusals counted as {reason}:\n{m}"
        );
    }
    // Nothing reached the app (the control's probe sends no valid header).
    assert_eq!(metric(&m, "quicmesh_tunnel_opened_total", &[]), 0.0, "{m}");
    server.shutdown().await;
}

/// Presents `name.pem` from `d` to `target` with the aioquic probe: whether the handshake was accepted.
fn probe(d: &Path, target: std::net::SocketAddr, name: &str) -> (bool, String) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/peers/mtls_probe.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(target.ip().to_string())
        .arg(target.port().to_string())
        .arg(d.join(format!("{name}.pem")))
        .arg(d.join(format!("{name}.key")))
        .output()
        .expect("run the probe");
    let line = String::from_utf8_lossy(&out.stdout).into_owned();
    let v: serde_json::Value = serde_json::from_str(line.trim()).unwrap_or_else(|e| {
        panic!(
            "probe output {line:?} ({e}); stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (
        v["accepted"].as_bool().unwrap_or(false),
        v["error"].as_str().unwrap_or_default().to_owned(),
    )
}
