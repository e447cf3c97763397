//! `quicmesh`: one binary, one subcommand per component.
//!
//! Each subcommand lives in the crate that owns it; this file only parses arguments, sets up logging and
//! the rustls crypto provider, and waits for the component to finish.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "quicmesh", version, about = "A service mesh whose data plane is QUIC")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {}

fn init_tracing() {
    use tracing_subscriber::{EnvFilter, fmt};
    let filter = EnvFilter::try_from_env("QUICMESH_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_tracing();
    match cli.command {}
}
