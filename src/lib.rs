//! mm4relay: the MM4 interface of an MMS centre.
//!
//! Messages arrive over SMTP (`inbound`), are checked as MM4 PDUs (`mm4`),
//! routed per recipient (`route`), made durable (`spool`), split into one
//! job per destination peer and put into that peer's message pool
//! (`queue`). Each peer's own workers deliver them over long-lived SMTP
//! connections (`peer`). `relay` builds and owns all of it from a `config`;
//! `ops` is what operators see; `smtp` is the protocol with no I/O; `sys`
//! the small helpers everything shares. ARCHITECTURE.md draws the map.

pub mod cdr;
pub mod config;
pub mod dns;
pub mod inbound;
pub mod message;
pub mod mm4;
pub mod ops;
pub mod peer;
pub mod queue;
pub mod relay;
pub mod route;
pub mod sim;
pub mod smtp;
pub mod spool;
pub mod sys;
pub mod tls;
