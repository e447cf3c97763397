//! `quicmesh-bench`: the harness on its own, the same commands as `quicmesh bench`.

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "quicmesh-bench",
    about = "Load generator and benchmarks for quicmesh"
)]
struct Cli {
    #[command(flatten)]
    args: quicmesh_bench::BenchArgs,
}

fn main() -> anyhow::Result<()> {
    // `quicmesh-bench bench load ...` is accepted too, so both binaries take the same command lines.
    let args = std::env::args_os()
        .enumerate()
        .filter(|(i, a)| !(*i == 1 && a == "bench"))
        .map(|(_, a)| a);
    let cli = Cli::parse_from(args);
    quicmesh_transport::cli::init_logging();
    quicmesh_transport::quic::install_provider();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(quicmesh_bench::run(cli.args))
}
