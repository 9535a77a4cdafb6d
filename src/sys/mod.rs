//! Small system helpers the other parts share: the clock, owned threads,
//! logging, dropping root, the descriptor budget, and text made safe to
//! show. None of them knows about SMTP, MM4 or peers.

pub mod clock;
pub mod logging;
pub mod owned;
pub mod printable;
pub mod privilege;
