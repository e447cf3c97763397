//! The integration suite, compiled into one binary. Tiers (see tests/README.md): `dataplane` runs proxies
//! in-process on real sockets; `process` runs the built `quicmesh` binary as child processes.

mod support;

mod bench;
mod capture;
mod certificates;
mod controller;
mod controller_hardening;
mod controller_mode;
mod dataplane;
mod deploy;
mod endpoint;
mod failover;
mod gateway;
mod http;
mod ingress;
mod k8s;
mod naming;
mod observe;
mod policy;
mod process;
mod run;
mod state;
mod upgrade;
