//! Integration tests over loopback: the relay in-process with simulated
//! peers, and the real binary for the command line and signals.

mod binary;
mod bounces;
mod cdr;
mod clients;
mod corpus;
mod crash;
mod dashboards;
mod dedup;
mod dns;
mod expiry;
mod hardening;
mod intake;
mod metrics_limits;
mod mta;
mod ops;
mod packages;
mod pki;
mod pools;
mod ported;
mod real_peers;
mod reload;
mod retries;
mod root_files;
mod routing;
mod security;
mod spool;
mod support;
