//! Compiles `proto/*.proto` with protox, a pure-Rust protobuf compiler, so a fresh machine needs no `protoc`.

use std::{env, fs, path::PathBuf};

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut files: Vec<PathBuf> = fs::read_dir("proto")?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "proto"))
        .collect();
    files.sort();
    // The directory too, so that adding a .proto file reruns this script.
    println!("cargo:rerun-if-changed=proto");
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let fds = protox::compile(&files, ["proto"])?;
    // Kept for gRPC server reflection.
    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out.join("quicmesh_descriptor.bin"), fds.encode_to_vec())?;
    // Header names and values of tunneled HTTP heads decode as slices of the frame (no copy each).
    tonic_prost_build::configure()
        .bytes(".quicmesh.tunnel.v1.HttpHeader")
        .compile_fds(fds)?;
    Ok(())
}
