//! What operators see and steer while the relay runs: the control socket
//! (`mm4relay status`, `queue`, `hold`, `reload` …), the status it shows
//! (`status.rs`, text and JSON from one field list) and the Prometheus
//! metrics endpoint. Both read the relay's parts through [`control::Sources`];
//! neither changes how a message flows except through the commands the
//! control socket documents.

pub mod control;
pub mod metrics;
pub mod status;
