//! Small system helpers the other parts share: the clock, owned threads,
//! logging, dropping root, and text made safe to show. None of them knows
//! about SMTP, MM4, peers or the configuration, and none uses another part.

pub mod clock;
pub mod logging;
pub mod owned;
pub mod printable;
pub mod privilege;
