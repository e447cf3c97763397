//! The quicmesh control plane.
//!
//! `quicmesh controller` keeps the mesh's identities, services, endpoints and policies in sled, runs the
//! certificate authority that signs proxies' CSRs, and serves two gRPC APIs on one TLS listener: `ProxyApi`
//! (Certify, Watch, RegisterEndpoint) for proxies and `Admin` for operators. `quicmesh ctl` is the
//! operator's client of the admin API.
//!
//! Layout, one job per module: [`model`] (resources and their rules, pure), [`naming`] (which endpoints
//! may exist and be served, pure), [`store`] (durable storage trait + sled), [`resources`] (stored
//! resources), [`issuer`] (roots and CSR signing), [`ca`] (tokens, issuance, audit, serving certificate,
//! pruning; its rules in [`ca::rules`]), [`keystore`] (root keys sealed at rest), [`snapshot`] (what
//! proxies see), [`interest`] (what one proxy needs of it, pure), [`registry`] (connected proxies and
//! connections per identity), [`stats`] (traffic reports summed over sliding windows, pure), [`tap`] (live
//! request samples), [`top`] (busiest paths from a tap, pure), [`metrics`] (the controller's own
//! `/metrics`), [`dashboard`] (the web dashboard), [`state`] (the parts
//! wired together, independent of gRPC), [`api`] (the gRPC services; the only place protobuf types
//! appear), [`auth`] (tokens and peer identity), [`k8s`] (Kubernetes service-account tokens), [`tls`] and [`client`] (rustls with `ring`), [`server`]
//! (start-up and readiness), [`config`] (flags), [`ctl`] (the CLI).

#![forbid(unsafe_code)]

pub mod api;
pub mod auth;
pub mod ca;
pub mod client;
pub mod config;
pub mod ctl;
pub mod dashboard;
pub mod error;
pub mod interest;
pub mod issuer;
pub mod k8s;
pub mod keystore;
pub mod links;
pub mod metrics;
pub mod model;
pub mod naming;
pub mod oidc;
pub mod registry;
pub mod resources;
pub mod server;
pub mod snapshot;
pub mod state;
pub mod stats;
pub mod store;
pub mod tap;
pub mod tls;
pub mod top;

pub use config::ControllerArgs;
pub use ctl::{CtlArgs, run_ctl};
pub use server::{Controller, ServeError};

/// Runs `quicmesh controller` until SIGINT or SIGTERM: opens the data directory, binds, prints the ready
/// line on stdout, serves.
pub async fn run_controller(args: ControllerArgs) -> Result<(), ServeError> {
    // Everything this process creates (sled's files, the bundle, the KEK) is owner-only, whatever the
    // umask it was started with; `State::open` also fixes the modes of what already exists.
    #[cfg(unix)]
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    // One descriptor per proxy's Watch connection: the soft default of 1,024 would cap the mesh.
    quicmesh_transport::cli::raise_open_file_limit();
    let opts = args.state_options()?;
    tracing::info!(?args, "starting controller");
    let controller = Controller::bind(opts, args.listen)
        .await?
        .bind_http(args.metrics_addr, args.dashboard_addr)
        .await?;
    if let Some(token) = controller.admin_token() {
        tracing::warn!(
            "new mesh: the admin token is printed once in the ready line; store it now (token prefix {})",
            token.get(..8).unwrap_or("")
        );
    }
    println!("{}", controller.ready_line());
    controller
        .serve(quicmesh_transport::cli::shutdown_signal())
        .await
}
