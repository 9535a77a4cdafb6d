//! mm4relay: the MM4 interface of an MMS centre.
//!
//! Messages arrive over SMTP (`listener`), are checked as MM4 PDUs (`mm4`),
//! routed per recipient (`route`, `access`), split into one job per
//! destination peer and put into that peer's message pool (`queue`). Each
//! peer's own workers deliver them over long-lived SMTP connections
//! (`peer`). `relay` builds and owns all of it; `smtp` is the protocol with
//! no I/O.

pub mod access;
pub mod balancer;
pub mod bounce;
pub mod clock;
pub mod config;
pub mod control;
pub mod date;
pub mod dedup;
pub mod demo;
pub mod descriptors;
pub mod listener;
pub mod logging;
pub mod message;
pub mod metrics;
pub mod mm4;
pub mod owned;
pub mod peer;
pub mod printable;
pub mod privilege;
pub mod queue;
pub mod relay;
pub mod route;
pub mod sim;
pub mod smtp;
pub mod spool;
pub mod tls;
