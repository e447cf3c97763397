//! `quicmesh-proxy`: the sidecar alone, for images and hosts that run only the data plane. Same
//! arguments and behaviour as `quicmesh proxy`.

use clap::Parser;
use quicmesh_transport::cli::{self, ProxyArgs};

#[derive(Parser)]
#[command(name = "quicmesh-proxy", version, about = "The quicmesh sidecar proxy")]
struct Args {
    #[command(flatten)]
    proxy: ProxyArgs,
}

/// mimalloc instead of the C library's allocator: the request path allocates per request (hyper,
/// h2, quinn), and glibc's malloc was ~15% of a proxy's instructions per HTTP/2 request.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    cli::init_logging();
    quicmesh_transport::quic::install_provider();
    let result = cli::runtime(args.proxy.workers)
        .map_err(cli::RunError::from)
        .and_then(|rt| rt.block_on(cli::run(&args.proxy)));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
