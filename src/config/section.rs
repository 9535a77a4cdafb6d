//! One INI section read as typed values: defaults from the key tables,
//! every error naming file, section, key and value. Nothing here touches
//! a file, the network or the clock.

use std::collections::HashMap;
use std::time::Duration;

use log::LevelFilter;

use crate::route::access::Cidr;

use super::{AuthUser, ConfigError, Secret};

/// Reads one section, applying defaults and remembering the location for
/// error messages.
pub(super) struct Section<'a> {
    pub(super) file: &'a str,
    pub(super) name: String,
    pub(super) values: HashMap<String, String>,
    pub(super) keys: &'static [(&'static str, &'static str)],
}

impl Section<'_> {
    /// An error at `key` of this section.
    pub(super) fn err(&self, key: &str, value: &str, problem: impl Into<String>) -> ConfigError {
        ConfigError::at(self.file, &self.name, key, value, problem)
    }

    /// The value as written, or the key's default.
    pub(super) fn raw(&self, key: &str) -> &str {
        let default = self.keys.iter().find(|(k, _)| *k == key).map(|(_, d)| *d);
        debug_assert!(default.is_some(), "key {key} missing from the key table");
        self.values
            .get(key)
            .map(String::as_str)
            .unwrap_or(default.unwrap_or(""))
    }

    /// The value through `f`, its error placed at `key`.
    pub(super) fn parse<T>(
        &self,
        key: &str,
        f: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<T, ConfigError> {
        let v = self.raw(key);
        f(v).map_err(|p| self.err(key, v, p))
    }

    /// The trimmed value, `None` when empty.
    pub(super) fn string(&self, key: &str) -> Option<String> {
        Some(self.raw(key).trim().to_string()).filter(|s| !s.is_empty())
    }

    /// A whole number of at least `min`.
    pub(super) fn count(&self, key: &str, min: usize) -> Result<usize, ConfigError> {
        self.parse(key, |v| {
            let n: usize = v
                .trim()
                .parse()
                .map_err(|_| "expected a whole number".to_string())?;
            if n < min {
                return Err(format!("must be at least {min}"));
            }
            Ok(n)
        })
    }

    /// A duration (see [`parse_duration`]).
    pub(super) fn duration(&self, key: &str) -> Result<Duration, ConfigError> {
        self.parse(key, parse_duration)
    }

    /// yes/no, true/false, on/off, 1/0.
    pub(super) fn boolean(&self, key: &str) -> Result<bool, ConfigError> {
        self.parse(key, |v| match v.trim().to_ascii_lowercase().as_str() {
            "yes" | "true" | "on" | "1" => Ok(true),
            "no" | "false" | "off" | "0" => Ok(false),
            _ => Err("expected yes or no".into()),
        })
    }

    /// A list split at commas and white space.
    pub(super) fn list(&self, key: &str) -> Vec<String> {
        split_list(self.raw(key))
    }

    /// A secret, `None` when empty.
    pub(super) fn secret(&self, key: &str) -> Option<Secret> {
        let v = self.raw(key).trim();
        (!v.is_empty()).then(|| Secret(v.to_string()))
    }

    /// A list of address blocks.
    pub(super) fn cidrs(&self, key: &str) -> Result<Vec<Cidr>, ConfigError> {
        self.parse(key, |v| {
            split_list(v).iter().map(|c| Cidr::parse(c)).collect()
        })
    }

    /// A list of `host:port`, checked for form only: the load step
    /// resolves the names.
    pub(super) fn host_ports(&self, key: &str) -> Result<Vec<String>, ConfigError> {
        self.parse(key, |v| {
            let list = split_list(v);
            for a in &list {
                host_port(a)?;
            }
            Ok(list)
        })
    }
}

/// Checks that `v` is `host:port` (or `[v6]:port`) with a port number.
pub(super) fn host_port(v: &str) -> Result<(), String> {
    let bad = || format!("{v:?} is not host:port");
    let (host, port) = v.rsplit_once(':').ok_or_else(bad)?;
    port.parse::<u16>().map_err(|_| bad())?;
    if host.is_empty() {
        return Err(bad());
    }
    Ok(())
}

/// `[auth]` entries: `NAME = PEER:PASSWORD`, from the section or from the
/// users file (one `NAME:PEER:PASSWORD` a line; `#` comments).
pub(super) fn parse_auth_user(
    name: &str,
    value: &str,
    peer_index: impl Fn(&str) -> Option<usize>,
) -> Result<AuthUser, String> {
    let (peer, password) = value
        .split_once(':')
        .ok_or_else(|| "expected PEER:PASSWORD".to_string())?;
    let peer = peer_index(peer.trim()).ok_or_else(|| format!("no peer named {:?}", peer.trim()))?;
    if name.is_empty() || name.contains(char::is_whitespace) {
        return Err("a user name is one word".into());
    }
    if password.is_empty() {
        return Err("empty password".into());
    }
    Ok(AuthUser {
        name: name.to_string(),
        peer,
        password: Secret(password.to_string()),
    })
}

/// Splits at commas and white space, dropping empty items.
fn split_list(v: &str) -> Vec<String> {
    v.split([',', ' ', '\t'])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// The longest duration any key takes: ten years.
const MAX_DURATION_MS: u64 = 3650 * 86_400_000;

/// Parses `500ms`, `30s`, `5m`, `1h`, `7d`, or a plain number of seconds,
/// at most ten years.
pub fn parse_duration(v: &str) -> Result<Duration, String> {
    let v = v.trim();
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| "expected a duration such as 500ms, 30s, 5m, 1h or 7d".to_string())?;
    let scale: u64 = match unit {
        "ms" => 1,
        "" | "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(format!("unknown unit {unit:?}; use ms, s, m, h or d")),
    };
    // Every duration is added to a clock reading somewhere: keep it far
    // from what the clock can hold.
    match n.checked_mul(scale) {
        Some(ms) if ms <= MAX_DURATION_MS => Ok(Duration::from_millis(ms)),
        _ => Err("a duration may be at most 3650d (ten years)".into()),
    }
}

/// A log level name.
pub(super) fn parse_level(v: &str) -> Result<LevelFilter, String> {
    v.trim()
        .parse()
        .map_err(|_| "expected off, error, warn, info, debug or trace".to_string())
}
