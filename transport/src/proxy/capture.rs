//! Transparent capture: the app keeps dialing a service's real address; nftables redirects that
//! connection to this listener, which recovers the address the app asked for (`SO_ORIGINAL_DST`) and
//! tunnels the connection exactly as the outbound listener of that service would.
//!
//! Which addresses are services is static configuration: an `[[outbound]]` table's `capture` address
//! (the service's cluster address and port). The rules `quicmesh capture install` writes
//! ([`nft_install_script`]) redirect only those addresses, so other traffic never comes here. A
//! connection that arrives anyway for an address no service claims (rules from another configuration,
//! or someone dialing the listener directly) is refused with a reset and counted
//! (`capture_unknown_destination`): passing it through would let an app reach, in plain text, an
//! address the operator declared part of the mesh.

use std::{collections::HashMap, net::SocketAddr, time::Duration};

use tokio::net::{TcpListener, TcpStream};

use super::{Drain, outbound::Tunnels};
use crate::metrics::{Direction, Metrics, ReasonLabels};

/// The name of the nftables table `quicmesh capture` owns; nothing else is ever touched.
pub const NFT_TABLE: &str = "quicmesh";

/// The capture listener.
pub struct Capture {
    listener: TcpListener,
    routes: HashMap<SocketAddr, Tunnels>,
    metrics: Metrics,
}

/// The service claiming `original`, the address the app dialed.
pub(crate) fn route<T>(routes: &HashMap<SocketAddr, T>, original: SocketAddr) -> Option<&T> {
    routes.get(&original)
}

/// The address a redirected connection was meant for.
fn original_destination(tcp: &TcpStream) -> std::io::Result<SocketAddr> {
    match tcp.local_addr()? {
        SocketAddr::V4(_) => Ok(SocketAddr::V4(rustix::net::sockopt::ip_original_dst(tcp)?)),
        SocketAddr::V6(_) => Ok(SocketAddr::V6(rustix::net::sockopt::ipv6_original_dst(
            tcp,
        )?)),
    }
}

impl Capture {
    /// Binds the listener; `routes` maps each captured address to its outbound service.
    pub(crate) async fn bind(
        listen: SocketAddr,
        routes: HashMap<SocketAddr, Tunnels>,
        metrics: Metrics,
    ) -> std::io::Result<Self> {
        Ok(Self {
            listener: TcpListener::bind(listen).await?,
            routes,
            metrics,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts until the drain begins.
    pub async fn run(self, drain: Drain) {
        loop {
            let accepted = tokio::select! {
                a = self.listener.accept() => a,
                _ = drain.stop_accepting.cancelled() => return,
            };
            let (tcp, client) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "capture accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let original = original_destination(&tcp);
            match original.as_ref().ok().and_then(|o| route(&self.routes, *o)) {
                Some(tunnels) => {
                    // A gateway's tunnel is its workload's, found by the source address.
                    tunnels.handle(tcp, client, &drain, &self.metrics, |svc| {
                        tracing::debug_span!("capture", service = %svc.cfg.service, %client, original = ?original.ok())
                    });
                }
                None => {
                    tracing::warn!(%client, original = ?original, "captured connection to an address no service claims; refused");
                    let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
                    drop(tcp);
                    self.metrics
                        .failures
                        .get_or_create(&ReasonLabels {
                            direction: Direction::Outbound,
                            reason: "capture_unknown_destination",
                        })
                        .inc();
                }
            }
        }
    }
}

/// The nftables script that (re)creates the table [`NFT_TABLE`]: locally originated TCP to each
/// captured address is redirected to `port` on loopback, except from `exempt_uid` (the proxy's own user,
/// so a proxy that dials a captured address is not sent back to itself). With `forwarded` (a node
/// gateway, whose workloads live in network namespaces routed through this one) TCP arriving from
/// other hosts or namespaces to those addresses is redirected too (a `prerouting` chain, to the
/// listener's port on the receiving interface's address): the source address stays the workload's,
/// which is how the gateway attributes it. The script first creates and deletes the table, so a stale
/// one from a crashed run is replaced atomically (`nft -f` applies the script as one transaction).
pub fn nft_install_script(
    captured: &[SocketAddr],
    port: u16,
    exempt_uid: Option<u32>,
    forwarded: bool,
) -> String {
    let mut redirects = String::new();
    for a in captured {
        let (family, ip) = match a {
            SocketAddr::V4(v4) => ("ip", v4.ip().to_string()),
            SocketAddr::V6(v6) => ("ip6", v6.ip().to_string()),
        };
        redirects.push_str(&format!(
            "        {family} daddr {ip} tcp dport {} redirect to :{port}\n",
            a.port()
        ));
    }
    let mut output = String::new();
    if let Some(uid) = exempt_uid {
        output.push_str(&format!("        meta skuid {uid} return\n"));
    }
    output.push_str(&redirects);
    let prerouting = if forwarded {
        format!(
            "    chain prerouting {{\n        type nat hook prerouting priority -100; policy accept;\n{redirects}    }}\n"
        )
    } else {
        String::new()
    };
    format!(
        "table inet {NFT_TABLE} {{}}\ndelete table inet {NFT_TABLE}\ntable inet {NFT_TABLE} {{\n    chain output {{\n        type nat hook output priority -100; policy accept;\n{output}    }}\n{prerouting}}}\n"
    )
}

/// The nftables script that removes [`NFT_TABLE`], present or not (idempotent).
pub fn nft_remove_script() -> String {
    format!("table inet {NFT_TABLE} {{}}\ndelete table inet {NFT_TABLE}\n")
}

/// Why capture rules could not be written or removed.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    /// `nft` could not be run.
    #[error("cannot run nft: {0}")]
    Spawn(#[from] std::io::Error),
    /// `nft` refused the rules.
    #[error("nft failed: {0}")]
    Nft(String),
}

/// Applies an nftables script as one transaction (`nft -f -`).
pub fn apply_nft(script: &str) -> Result<(), RulesError> {
    use std::io::Write;
    let mut child = std::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(script.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        return Err(RulesError::Nft(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ));
    }
    Ok(())
}

/// The capture rules of a proxy that manages its own (`[capture] install = true`): written when the
/// proxy starts, replacing a stale table a crashed run left behind, and removed when this is dropped
/// (the proxy's exit after its drain, or a panic). After a `kill -9` they stay until the next start
/// replaces them or `quicmesh capture remove` deletes them; either way only [`NFT_TABLE`] is touched.
#[derive(Debug)]
pub struct InstalledRules(());

impl InstalledRules {
    /// Writes the table for `captured` addresses redirected to `port` (`forwarded`: a node gateway's).
    pub fn install(
        captured: &[SocketAddr],
        port: u16,
        exempt_uid: Option<u32>,
        forwarded: bool,
    ) -> Result<Self, RulesError> {
        apply_nft(&nft_install_script(captured, port, exempt_uid, forwarded))?;
        tracing::info!(
            table = NFT_TABLE,
            addresses = captured.len(),
            "capture rules installed"
        );
        Ok(Self(()))
    }
}

impl Drop for InstalledRules {
    fn drop(&mut self) {
        match apply_nft(&nft_remove_script()) {
            Ok(()) => tracing::info!(table = NFT_TABLE, "capture rules removed"),
            Err(e) => {
                tracing::warn!(error = %e, table = NFT_TABLE, "cannot remove the capture rules")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_claimed_addresses_are_routed() {
        let routes: HashMap<SocketAddr, &str> = [
            ("10.96.0.10:80".parse().expect("addr"), "web"),
            ("10.96.0.11:5432".parse().expect("addr"), "db"),
        ]
        .into();
        assert_eq!(
            route(&routes, "10.96.0.10:80".parse().expect("addr")),
            Some(&"web")
        );
        assert_eq!(
            route(&routes, "10.96.0.10:81".parse().expect("addr")),
            None,
            "same address, other port"
        );
        assert_eq!(
            route(&routes, "127.0.0.1:15001".parse().expect("addr")),
            None
        );
    }

    #[test]
    fn the_rules_touch_only_our_table_and_exempt_the_proxy() {
        let s = nft_install_script(
            &[
                "10.96.0.10:80".parse().expect("addr"),
                "[fd00::10]:443".parse().expect("addr"),
            ],
            15001,
            Some(1337),
            false,
        );
        assert_eq!(
            s,
            "table inet quicmesh {}\ndelete table inet quicmesh\ntable inet quicmesh {\n    chain output {\n        type nat hook output priority -100; policy accept;\n        meta skuid 1337 return\n        ip daddr 10.96.0.10 tcp dport 80 redirect to :15001\n        ip6 daddr fd00::10 tcp dport 443 redirect to :15001\n    }\n}\n"
        );
        assert_eq!(
            nft_remove_script(),
            "table inet quicmesh {}\ndelete table inet quicmesh\n"
        );
    }

    #[test]
    fn a_gateway_also_redirects_what_its_workloads_namespaces_route_through_it() {
        let s = nft_install_script(&["10.96.0.10:80".parse().expect("addr")], 15001, None, true);
        assert_eq!(
            s,
            "table inet quicmesh {}\ndelete table inet quicmesh\ntable inet quicmesh {\n    chain output {\n        type nat hook output priority -100; policy accept;\n        ip daddr 10.96.0.10 tcp dport 80 redirect to :15001\n    }\n    chain prerouting {\n        type nat hook prerouting priority -100; policy accept;\n        ip daddr 10.96.0.10 tcp dport 80 redirect to :15001\n    }\n}\n"
        );
    }
}
