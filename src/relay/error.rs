//! The relay layer's error: why it could not start or a reload was
//! refused, classified by what the caller does about it.

use std::fmt;
use std::io;

use crate::config::ConfigError;

/// Why the relay could not start, or why a reload was refused.
#[derive(Debug)]
pub enum RelayError {
    /// The configuration cannot be used as it stands (a file that does
    /// not validate, a certificate the TLS library refuses): fix it. At
    /// start `main` exits 2; a reload is refused.
    Config(String),
    /// A change that only a restart can make (other listen addresses, more
    /// workers or another pool size for a running peer): the reload is
    /// refused and nothing changes.
    NeedsRestart(String),
    /// The system refused what the relay needs (a port, the spool, a
    /// thread, the signal handlers): `context` says what it was doing.
    /// `main` exits 1.
    System {
        /// What the relay was doing.
        context: String,
        /// What the system said.
        source: io::Error,
    },
}

impl RelayError {
    /// A system error with what the relay was doing.
    pub fn system(context: impl Into<String>, source: io::Error) -> RelayError {
        RelayError::System {
            context: context.into(),
            source,
        }
    }

    /// Whether the configuration is at fault (and not the system).
    pub fn is_config(&self) -> bool {
        matches!(self, RelayError::Config(_))
    }
}

impl fmt::Display for RelayError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RelayError::Config(e) | RelayError::NeedsRestart(e) => f.write_str(e),
            RelayError::System { context, source } if context.is_empty() => write!(f, "{source}"),
            RelayError::System { context, source } => write!(f, "{context}: {source}"),
        }
    }
}

impl std::error::Error for RelayError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            RelayError::System { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl From<ConfigError> for RelayError {
    fn from(e: ConfigError) -> RelayError {
        RelayError::Config(e.to_string())
    }
}

/// Errors of the system where no more context is at hand.
impl From<io::Error> for RelayError {
    fn from(source: io::Error) -> RelayError {
        RelayError::system("", source)
    }
}
