//! Integration tests over loopback: the relay in-process with simulated
//! peers, and the real binary for the command line and signals.

mod binary;
mod clients;
mod corpus;
mod crash;
mod delivery;
mod expiry;
mod hardening;
mod metrics_limits;
mod mta;
mod pki;
mod real_peers;
mod root_files;
mod security;
mod support;
