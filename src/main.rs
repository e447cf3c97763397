//! `quicmesh`: one binary, one subcommand per component.
//!
//! Each subcommand lives in the crate that owns it; this file only parses arguments, sets up logging and
//! the rustls crypto provider, and waits for the component to finish.

mod ca;
mod up;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "quicmesh",
    version,
    about = "A service mesh whose data plane is QUIC"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start and matched once: the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run a sidecar proxy: static certificate files, or bootstrapped and configured by the controller.
    Proxy(quicmesh_transport::cli::ProxyArgs),
    /// Run an app behind its sidecar: start the proxy, wait until ready, run `-- CMD ARGS`, pass signals
    /// on, drain when the app exits and exit with its code.
    Run(quicmesh_transport::run::RunArgs),
    /// Transparent capture: install or remove the nftables rules that redirect an app's connections to
    /// the services' real addresses to the proxy.
    #[command(subcommand)]
    Capture(quicmesh_transport::cli::CaptureCommand),
    /// A development certificate authority: create a root, issue workload certificates.
    #[command(subcommand)]
    Ca(ca::CaCommand),
    /// Run a whole mesh on loopback (controller, two sidecars, an echo service, a client) and report what flowed.
    Up(up::UpArgs),
    /// Run the control plane: identities, policies and certificates in sled, served over gRPC.
    Controller(quicmesh_controller::ControllerArgs),
    /// Operate the mesh through the controller's admin API.
    Ctl(quicmesh_controller::CtlArgs),
    /// Load generator and benchmarks: direct vs quicmesh vs an mTLS TCP proxy pair, side by side.
    Bench(quicmesh_bench::BenchArgs),
}

/// mimalloc instead of the C library's allocator: the request path allocates per request (hyper,
/// h2, quinn), and glibc's malloc was ~15% of a proxy's instructions per HTTP/2 request.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    quicmesh_transport::cli::init_logging();
    // One crypto provider for the whole process, ring: with two compiled in (tonic's dependencies can
    // pull aws-lc-rs), rustls cannot pick a default and panics on the first TLS config built without one.
    quicmesh_transport::quic::install_provider();
    // One thread per core, except for the proxy: a sidecar runs on one thread unless told otherwise
    // (see `cli::ProxyArgs::workers`). QUICMESH_WORKERS=N sets it for every subcommand.
    let workers = match &cli.command {
        Command::Proxy(a) => Some(a.workers),
        Command::Run(a) => Some(a.workers),
        _ => std::env::var("QUICMESH_WORKERS")
            .ok()
            .and_then(|w| w.parse::<usize>().ok())
            .filter(|w| *w > 0),
    };
    let rt = match workers {
        Some(n) => quicmesh_transport::cli::runtime(n)?,
        None => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?,
    };
    rt.block_on(async {
        match cli.command {
            Command::Proxy(a) => quicmesh_transport::cli::run(&a).await?,
            // The app's own exit code, whatever it is.
            Command::Run(a) => return Ok(ExitCode::from(quicmesh_transport::run::run(&a).await?)),
            Command::Ca(c) => ca::run(c)?,
            Command::Capture(c) => quicmesh_transport::cli::capture(&c)?,
            Command::Up(a) => up::run(a).await?,
            Command::Controller(a) => quicmesh_controller::run_controller(a).await?,
            Command::Ctl(a) => quicmesh_controller::run_ctl(a).await?,
            Command::Bench(a) => quicmesh_bench::run(a).await?,
        }
        Ok(ExitCode::SUCCESS)
    })
}
