//! Istio's ztunnel as an optional peer path, so quicmesh's opaque tunnel can be measured against the
//! other Rust mesh data plane (HTTP/2 CONNECT over mTLS, "HBONE", one TCP connection pool between the
//! two ends) in the same run as the HAProxy pair.
//!
//! There is no Istio control plane here, so each ztunnel runs in "dedicated" mode (it proxies for one
//! workload named in `PROXY_WORKLOAD_INFO`) with its workloads and service read from a local XDS file
//! the harness writes, and with the fake CA of ztunnel's `testing` feature (a fixed test root, so two
//! processes trust each other's leaves). ztunnel only captures traffic through original-destination
//! redirection, so the harness adds an nftables `redirect` of one service address (`127.0.0.3`, the
//! service's VIP) to ztunnel's outbound port 15001 in the client side's namespace; the load generator
//! dials that VIP, ztunnel resolves it to the server workload and opens HBONE to its port 15008.
//!
//! ztunnel's listener ports are fixed (15001, 15006, 15008, 15000, 15020, 15021), so two of them
//! cannot share one namespace: on loopback (`compare`) one process carries both ends of the tunnel
//! (its outbound HBONE connection lands on its own inbound port, full mTLS either way), with two worker
//! threads, as many as the two single-threaded quicmesh sidecars have together; across the loss
//! scenario's namespaces there is one ztunnel per side, one worker thread each.
//!
//! The binary is not part of this repository: it is built by hand from ztunnel's public source (see
//! `bench/README.md`) and given with `--ztunnel PATH` or `QUICMESH_BENCH_ZTUNNEL`; without it, or
//! without root and `nft`, the path is skipped with the reason printed.

use std::{
    ffi::OsString,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path as FsPath, PathBuf},
    process::Stdio,
    time::Duration,
};

use tokio::io::AsyncWriteExt;

use crate::{
    client::{Conn, Protocol},
    topology::{self, Path, Placement, Proc, Target},
};

/// Environment variable naming the ztunnel binary (the `--ztunnel` flag wins).
pub const ENV: &str = "QUICMESH_BENCH_ZTUNNEL";

/// The service address the load generator dials; redirected to ztunnel's outbound port.
pub const VIP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);

/// ztunnel's fixed ports.
const OUTBOUND_PORT: u16 = 15001;
const READINESS_PORT: u16 = 15021;

/// Kubernetes-style namespace of the bench workloads in the XDS file.
const NS: &str = "bench";
/// Hostname of the bench service in the XDS file.
const HOSTNAME: &str = "bench.bench.svc.cluster.local";

/// The binary to run, or why the ztunnel path is skipped: no path given (flag or environment), not a
/// file, not root (the redirect is an nftables rule), or no `nft`.
pub fn resolve(
    flag: Option<&FsPath>,
    env: Option<OsString>,
    root: bool,
    nft_found: bool,
) -> Result<PathBuf, String> {
    let given = flag
        .map(FsPath::to_path_buf)
        .or_else(|| env.filter(|v| !v.is_empty()).map(PathBuf::from));
    let Some(bin) = given else {
        return Err(format!(
            "no ztunnel binary given (--ztunnel PATH or {ENV}; build it by hand, see bench/README.md)"
        ));
    };
    if !bin.is_file() {
        return Err(format!("ztunnel binary {} is not a file", bin.display()));
    }
    if !root {
        return Err("ztunnel needs root (its traffic is captured by an nftables redirect)".into());
    }
    if !nft_found {
        return Err("`nft` not found (Debian: apt-get install -y nftables)".into());
    }
    Ok(bin)
}

/// [`resolve`] with this process's environment, uid and PATH.
pub fn resolve_here(flag: Option<&FsPath>) -> Result<PathBuf, String> {
    resolve(
        flag,
        std::env::var_os(ENV),
        crate::machine::is_root(),
        topology::which("nft").is_some(),
    )
}

/// One workload of the XDS file.
#[derive(Debug, Clone, PartialEq)]
pub struct Workload {
    /// Name, also its service account.
    pub name: &'static str,
    /// Its address.
    pub ip: IpAddr,
    /// Whether it is an endpoint of the bench service.
    pub serves: bool,
}

/// The local XDS file: the workloads (HBONE-capable, one node, default network) and one service, VIP
/// [`VIP`], port `port` to target port `port` on the workloads that serve it.
pub fn local_xds(workloads: &[Workload], port: u16) -> String {
    let mut y = String::from("workloads:\n");
    for w in workloads {
        y.push_str(&format!(
            "- uid: bench//v1/Pod/{NS}/{name}\n  name: {name}\n  namespace: {NS}\n  serviceAccount: {name}\n  \
workloadIps: [\"{ip}\"]\n  protocol: HBONE\n  trustDomain: cluster.local\n  node: bench-node\n  \
network: \"\"\n",
            name = w.name,
            ip = w.ip,
        ));
        // ztunnel's local XDS format requires the field, empty or not.
        if w.serves {
            y.push_str(&format!(
                "  services:\n    \"{NS}/{HOSTNAME}\":\n      {port}: {port}\n"
            ));
        } else {
            y.push_str("  services: {}\n");
        }
    }
    let sans: Vec<String> = workloads
        .iter()
        .filter(|w| w.serves)
        .map(|w| format!("spiffe://cluster.local/ns/{NS}/sa/{}", w.name))
        .collect();
    y.push_str(&format!(
        "services:\n- name: bench\n  namespace: {NS}\n  hostname: {HOSTNAME}\n  vips: [\"/{VIP}\"]\n  \
ports:\n    {port}: {port}\n  subjectAltNames: [{}]\n",
        sans.iter()
            .map(|s| format!("\"{s}\""))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    y
}

/// The environment of one ztunnel process: dedicated mode for `workload`, the local XDS file, the fake
/// CA, no XDS or CA server, `threads` data-plane workers, IPv4 only, no DNS proxy, no original-source
/// spoofing towards the app, warnings only (no access log line per connection; the quicmesh sidecars
/// write none either).
pub fn process_env(workload: &str, xds: &FsPath, threads: usize) -> Vec<(String, String)> {
    [
        ("PROXY_MODE", "dedicated".to_owned()),
        ("PROXY_WORKLOAD_INFO", format!("{NS}/{workload}/{workload}")),
        ("LOCAL_XDS_PATH", xds.display().to_string()),
        ("XDS_ADDRESS", String::new()),
        ("CA_ADDRESS", String::new()),
        ("FAKE_CA", "true".to_owned()),
        ("ZTUNNEL_WORKER_THREADS", threads.max(1).to_string()),
        ("IPV6_ENABLED", "false".to_owned()),
        // The server side connects to the app from its own address: with the client's address kept
        // (its default where it can), the app's answers would be routed back to the client side.
        ("ENABLE_ORIG_SRC", "false".to_owned()),
        (
            "PROXY_CONFIG",
            "{\"proxyMetadata\": {\"DNS_CAPTURE\": \"false\"}}".to_owned(),
        ),
        ("RUST_LOG", "warn".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// The nftables table that sends connections to `VIP:port` (made in this namespace) to ztunnel's
/// outbound listener, which reads the original destination back from conntrack.
pub fn redirect_table(table: &str, port: u16) -> String {
    format!(
        "table ip {table} {{\n  chain output {{\n    type nat hook output priority -100; policy accept;\n    \
ip daddr {VIP} tcp dport {port} redirect to :{OUTBOUND_PORT}\n  }}\n}}\n"
    )
}

/// An nftables table the harness made; deleted when dropped.
#[derive(Debug)]
pub struct NftTable {
    ns: Option<String>,
    name: String,
}

impl NftTable {
    async fn create(ns: &Option<String>, name: &str, script: &str) -> anyhow::Result<Self> {
        let mut cmd = nft_command(ns);
        let mut child = cmd
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| anyhow::anyhow!("cannot run nft: {e}"))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(script.as_bytes()).await?;
        }
        let out = child.wait_with_output().await?;
        anyhow::ensure!(
            out.status.success(),
            "nft failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(Self {
            ns: ns.clone(),
            name: name.to_owned(),
        })
    }
}

impl Drop for NftTable {
    fn drop(&mut self) {
        let mut cmd = match &self.ns {
            Some(ns) => {
                let mut c = std::process::Command::new("ip");
                c.args(["netns", "exec", ns, "nft"]);
                c
            }
            None => std::process::Command::new("nft"),
        };
        let _ = cmd
            .args(["delete", "table", "ip", &self.name])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn nft_command(ns: &Option<String>) -> tokio::process::Command {
    match ns {
        Some(ns) => {
            let mut c = tokio::process::Command::new("ip");
            c.args(["netns", "exec", ns, "nft"]);
            c
        }
        None => tokio::process::Command::new("nft"),
    }
}

/// Starts one ztunnel for `workload` in `ns` and waits until its readiness endpoint answers 200.
#[allow(clippy::too_many_arguments)]
async fn start_one(
    name: &str,
    bin: &FsPath,
    placement: &Placement,
    ns: &Option<String>,
    workload: &str,
    xds: &FsPath,
    threads: usize,
    dir: &FsPath,
) -> anyhow::Result<Proc> {
    let mut cmd = topology::command(ns, bin);
    cmd.current_dir(dir);
    for (k, v) in process_env(workload, xds, threads) {
        cmd.env(k, v);
    }
    let log = std::fs::File::create(dir.join(format!("{name}.stdout.log")))?;
    let mut p = topology::spawn(name, cmd, dir, Stdio::from(log))?;
    let ready = SocketAddr::from((Ipv4Addr::LOCALHOST, READINESS_PORT));
    topology::wait_http_ok(
        ns,
        ready,
        "/healthz/ready",
        &placement.bench_bin,
        &mut p,
        Duration::from_secs(20),
    )
    .await?;
    Ok(p)
}

/// Starts the ztunnel path for `placement`: one process on loopback, or one per side when the two
/// sides are in namespaces; installs the redirect on the client side (removed with the path).
pub async fn start(placement: &Placement, bin: &FsPath, dir: &FsPath) -> anyhow::Result<Path> {
    let port = placement.app.port();
    let table = format!("qmb_zt_{}", std::process::id());
    let xds = dir.join("ztunnel-xds.yaml");
    let procs = if placement.client_ns.is_none() && placement.server_ns.is_none() {
        // One workload, the app's: ztunnel's outbound resolves the VIP to it and tunnels to its own
        // inbound on the app's address, which then connects to the app.
        std::fs::write(
            &xds,
            local_xds(
                &[Workload {
                    name: "server",
                    ip: placement.app.ip(),
                    serves: true,
                }],
                port,
            ),
        )?;
        let mut p = start_one("ztunnel", bin, placement, &None, "server", &xds, 2, dir).await?;
        p.attach(NftTable::create(&None, &table, &redirect_table(&table, port)).await?);
        vec![p]
    } else {
        let client_ip = match placement.client_ns {
            Some(_) => IpAddr::V4(crate::loss::CLIENT_IP),
            None => IpAddr::V4(Ipv4Addr::LOCALHOST),
        };
        std::fs::write(
            &xds,
            local_xds(
                &[
                    Workload {
                        name: "client",
                        ip: client_ip,
                        serves: false,
                    },
                    Workload {
                        name: "server",
                        ip: placement.server_ip,
                        serves: true,
                    },
                ],
                port,
            ),
        )?;
        let server = start_one(
            "ztunnel-server",
            bin,
            placement,
            &placement.server_ns,
            "server",
            &xds,
            1,
            dir,
        )
        .await?;
        let mut client = start_one(
            "ztunnel-client",
            bin,
            placement,
            &placement.client_ns,
            "client",
            &xds,
            1,
            dir,
        )
        .await?;
        client.attach(
            NftTable::create(&placement.client_ns, &table, &redirect_table(&table, port)).await?,
        );
        vec![client, server]
    };
    let mut path = Path {
        target: Target::Ztunnel,
        entry: SocketAddr::new(IpAddr::V4(VIP), port),
        l7: None,
        procs,
    };
    // ztunnel can report ready and then stop on a configuration it rejects; on loopback one echo
    // through the whole tunnel also proves the redirect, the mTLS hop and the app connection work.
    path.check_alive()?;
    if placement.client_ns.is_none() {
        let timeout = Duration::from_secs(5);
        let echo = async {
            let mut c = Conn::connect(Protocol::Tcp, path.entry, timeout).await?;
            c.request(&bytes::Bytes::from_static(b"ztunnel probe"), timeout)
                .await
        };
        if let Err(e) = echo.await {
            path.check_alive()?;
            anyhow::bail!("no echo through ztunnel at {} ({})", path.entry, e.name());
        }
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skipped_without_a_binary_and_the_flag_wins_over_the_environment() {
        let none = resolve(None, None, true, true);
        assert!(
            none.as_ref().is_err_and(|e| e.contains("--ztunnel")),
            "{none:?}"
        );
        let empty = resolve(None, Some(OsString::new()), true, true);
        assert!(empty.is_err(), "{empty:?}");
        let missing = resolve(Some(FsPath::new("/nonexistent/ztunnel")), None, true, true);
        assert!(
            missing.as_ref().is_err_and(|e| e.contains("not a file")),
            "{missing:?}"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let bin = dir.path().join("ztunnel");
        std::fs::write(&bin, b"").expect("write");
        let from_env = resolve(None, Some(bin.clone().into_os_string()), true, true);
        assert_eq!(from_env, Ok(bin.clone()));
        let flag_wins = resolve(
            Some(&bin),
            Some(OsString::from("/nonexistent/other")),
            true,
            true,
        );
        assert_eq!(flag_wins, Ok(bin.clone()));
        let not_root = resolve(Some(&bin), None, false, true);
        assert!(
            not_root.as_ref().is_err_and(|e| e.contains("root")),
            "{not_root:?}"
        );
        let no_nft = resolve(Some(&bin), None, true, false);
        assert!(
            no_nft.as_ref().is_err_and(|e| e.contains("nft")),
            "{no_nft:?}"
        );
    }

    #[test]
    fn xds_file_has_the_workloads_and_the_service_on_the_vip() {
        let y = local_xds(
            &[
                Workload {
                    name: "client",
                    ip: IpAddr::V4(Ipv4Addr::new(10, 233, 0, 1)),
                    serves: false,
                },
                Workload {
                    name: "server",
                    ip: IpAddr::V4(Ipv4Addr::new(10, 233, 0, 2)),
                    serves: true,
                },
            ],
            7000,
        );
        assert!(y.contains("workloadIps: [\"10.233.0.1\"]"), "{y}");
        assert!(y.contains("workloadIps: [\"10.233.0.2\"]"), "{y}");
        assert_eq!(y.matches("protocol: HBONE").count(), 2, "{y}");
        // Only the server is an endpoint of the service.
        assert_eq!(
            y.matches("\"bench/bench.bench.svc.cluster.local\":")
                .count(),
            1
        );
        let server_at = y.find("name: server").expect("server");
        let membership = y.find("bench/bench.bench.svc").expect("membership");
        assert!(membership > server_at, "{y}");
        assert!(y.contains("vips: [\"/127.0.0.3\"]"), "{y}");
        assert!(y.contains("    7000: 7000\n"), "{y}");
        assert_eq!(y.matches("  services: {}\n").count(), 1, "{y}");
        assert!(
            y.contains("subjectAltNames: [\"spiffe://cluster.local/ns/bench/sa/server\"]"),
            "{y}"
        );
    }

    #[test]
    fn process_environment_is_dedicated_local_and_fake_ca() {
        let env = process_env("client", FsPath::new("/tmp/x/xds.yaml"), 0);
        let get = |k: &str| {
            env.iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.as_str())
                .unwrap_or_default()
                .to_owned()
        };
        assert_eq!(get("PROXY_MODE"), "dedicated");
        assert_eq!(get("PROXY_WORKLOAD_INFO"), "bench/client/client");
        assert_eq!(get("LOCAL_XDS_PATH"), "/tmp/x/xds.yaml");
        assert_eq!(get("FAKE_CA"), "true");
        assert_eq!(get("XDS_ADDRESS"), "");
        assert_eq!(get("ZTUNNEL_WORKER_THREADS"), "1");
        assert_eq!(get("ENABLE_ORIG_SRC"), "false");
        assert!(get("PROXY_CONFIG").contains("DNS_CAPTURE"));
    }

    #[test]
    fn redirect_sends_the_vip_port_to_the_outbound_listener() {
        let t = redirect_table("qmb_zt_1", 7000);
        assert!(t.starts_with("table ip qmb_zt_1 {"), "{t}");
        assert!(t.contains("type nat hook output"), "{t}");
        assert!(
            t.contains("ip daddr 127.0.0.3 tcp dport 7000 redirect to :15001"),
            "{t}"
        );
    }
}
