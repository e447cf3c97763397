//! The proxy's TOML configuration: `ProxyConfig::parse` (what `quicmesh proxy --config` runs on the file),
//! then the QUIC transport settings built from it. Input: the text of a file.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use quicmesh_transport::{ProxyConfig, quic};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match ProxyConfig::parse(Path::new("/etc/quicmesh/proxy.toml"), text) {
        Ok(cfg) => {
            let _ = quic::transport_config(&cfg.quic);
        }
        Err(e) => {
            // Every error names the file and a key (or `-` for the file as a whole).
            assert!(!e.key.is_empty());
            let _ = e.to_string();
        }
    }
});
