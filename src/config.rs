//! The INI configuration: raw text (rust-ini) to a typed, validated [`Config`].
//!
//! Every key with its default stands in one table per section below
//! (`RELAY_KEYS`, `LISTENER_KEYS`, `PEER_KEYS`); `conf/mm4relay.ini`
//! documents them for operators. Unknown sections and keys are errors, since
//! a typo must not silently leave a default in force. Every error names the
//! file, the section, the key and the bad value.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use log::LevelFilter;

use crate::access::{AccessControl, Cidr};
use crate::route::{Address, AddressKind, Router};
use crate::tls::Identity;

/// `[relay]` keys and their defaults (`""`: no default, key optional).
pub const RELAY_KEYS: &[(&str, &str)] = &[
    ("hostname", ""),
    ("user", ""),
    ("group", ""),
    ("spool_dir", "/var/spool/mm4relay"),
    ("max_connections", "64"),
    ("log_file", ""),
    ("log_target", ""),
    ("syslog_facility", "mail"),
    ("syslog_socket", "/dev/log"),
    ("log_level", "info"),
    ("retry_min", "60s"),
    ("retry_max", "1h"),
    ("queue_lifetime", "72h"),
    ("dedup_window", "10m"),
    ("spool_max_bytes", "0"),
    ("spool_segment_size", "16777216"),
    ("spool_sync", "yes"),
    ("notify_failures", "yes"),
    ("failed_retention", "7d"),
    ("shutdown_timeout", "30s"),
    ("control_socket", "/run/mm4relay.sock"),
    ("metrics_listen", ""),
    ("balance_interval", "500ms"),
    ("stats_interval", "60s"),
];

/// `[listener]` keys and their defaults.
pub const LISTENER_KEYS: &[(&str, &str)] = &[
    ("listen", "127.0.0.1:2525"),
    ("max_sessions", "200"),
    ("max_local_sessions", "100"),
    ("max_stranger_sessions", "50"),
    ("max_message_size", "2097152"),
    ("max_recipients", "100"),
    ("relay_from", "127.0.0.1/32"),
    ("mm4_check", "strict"),
    ("command_timeout", "300s"),
    ("data_timeout", "600s"),
    ("session_timeout", "1h"),
    ("listen_tls", ""),
    ("tls_cert", ""),
    ("tls_key", ""),
    ("tls_pkcs12", ""),
    ("tls_pkcs12_password", ""),
    ("tls_required_from", ""),
    ("auth_plaintext", "no"),
    ("max_bad_commands", "10"),
    ("max_refused_recipients", "100"),
    ("max_sessions_per_ip", "20"),
    ("connection_rate_per_ip", "10"),
    ("max_header_fields", "1000"),
    ("max_header_size", "65536"),
    ("max_mime_depth", "10"),
];

/// `[auth]` keys besides the user entries (`NAME = PEER:PASSWORD`).
pub const AUTH_KEYS: &[(&str, &str)] = &[("users_file", "")];

/// `[peer.NAME]` keys and their defaults.
pub const PEER_KEYS: &[(&str, &str)] = &[
    ("hosts", ""),
    ("domains", ""),
    ("prefixes", ""),
    ("min_connections", "1"),
    ("max_connections", "4"),
    ("pool_size", "1000"),
    ("local", "no"),
    ("accept_from", ""),
    ("connect_timeout", "30s"),
    ("helo_timeout", "300s"),
    ("mail_timeout", "300s"),
    ("rcpt_timeout", "300s"),
    ("data_timeout", "180s"),
    ("data_done_timeout", "600s"),
    ("keepalive", "60s"),
    ("max_rate", "0"),
    ("max_messages_per_connection", "0"),
    ("max_connection_age", "1h"),
    ("idle_timeout", "60s"),
    ("probe_min", "1s"),
    ("probe_max", "60s"),
    ("tls", "opportunistic"),
    ("tls_verify", "yes"),
    ("tls_ca_file", ""),
    ("tls_server_name", ""),
    ("tls_client_cert", ""),
    ("tls_client_key", ""),
    ("tls_client_pkcs12", ""),
    ("tls_client_pkcs12_password", ""),
    ("auth_user", ""),
    ("auth_password", ""),
    ("auth_plaintext", "no"),
];

/// A password or other secret: never shown by `Debug` or `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The secret itself, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// True if `other` is this secret, compared in constant time.
    pub fn matches(&self, other: &str) -> bool {
        let (a, b) = (self.0.as_bytes(), other.as_bytes());
        let mut diff = a.len() ^ b.len();
        for (i, x) in a.iter().enumerate() {
            diff |= (*x ^ b.get(i).copied().unwrap_or(!*x)) as usize;
        }
        diff == 0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// CA certificates to trust, loaded at parse time.
#[derive(Clone)]
pub struct TlsRoots(pub Vec<native_tls::Certificate>);

impl fmt::Debug for TlsRoots {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TlsRoots({})", self.0.len())
    }
}

/// Outbound TLS to one peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsMode {
    /// Never STARTTLS.
    Off,
    /// STARTTLS when offered; plain text (logged) when not or when it fails.
    Opportunistic,
    /// STARTTLS or no delivery: never plain text.
    Required,
    /// TLS from the first octet, before the greeting (port 465, "smtps"):
    /// no STARTTLS, and never plain text.
    Implicit,
}

/// A partner account for inbound AUTH.
#[derive(Clone, Debug)]
pub struct AuthUser {
    /// The user name.
    pub name: String,
    /// The partner peer it stands for (index into `Config::peers`).
    pub peer: usize,
    /// Its password.
    pub password: Secret,
}

/// How strictly the MM4 content is checked at the end of DATA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mm4Check {
    /// Everything in MM4.md and the corpus README.
    Strict,
    /// A known PDU type and sound MIME structure only.
    Lenient,
    /// No MM4 check; SMTP rules still apply.
    Off,
}

/// `[relay]`.
#[derive(Clone, Debug)]
pub struct RelayConfig {
    /// Our name in greetings, EHLO and Received headers.
    pub hostname: String,
    /// Run as this user once the ports are bound (`None`: stay as started).
    pub user: Option<String>,
    /// With `user`: this group instead of the user's own.
    pub group: Option<String>,
    /// Where the spool lives.
    pub spool_dir: PathBuf,
    /// The global budget of outbound connections.
    pub max_connections: usize,
    /// Where the log goes.
    pub log_target: crate::logging::Target,
    /// Log level.
    pub log_level: LevelFilter,
    /// First retry delay of a deferred recipient.
    pub retry_min: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
    /// How long a message may wait in the queue before it fails.
    pub queue_lifetime: Duration,
    /// A message ID and recipient seen again within this window is a duplicate.
    pub dedup_window: Duration,
    /// Refuse new messages (452 4.3.1) when the spool holds this many bytes (0: no limit).
    pub spool_max_bytes: u64,
    /// The spool's journal rolls over to a new segment file past this size.
    pub spool_segment_size: u64,
    /// Flush the spool before answering 250. Only for tests and benches.
    pub spool_sync: bool,
    /// Send a delivery status notification to the sender of a failed message.
    pub notify_failures: bool,
    /// How long failed messages stay in the failed area.
    pub failed_retention: Duration,
    /// How long a stop waits for workers to finish the message in flight.
    pub shutdown_timeout: Duration,
    /// The Unix socket `mm4relay status` talks to (`None`: off).
    pub control_socket: Option<PathBuf>,
    /// Where Prometheus metrics are served (`None`: off).
    pub metrics_listen: Option<SocketAddr>,
    /// How often the balancer moves connection allowance between peers.
    pub balance_interval: Duration,
    /// How often a per-peer statistics line is logged.
    pub stats_interval: Duration,
}

/// `[listener]`.
#[derive(Clone, Debug)]
pub struct ListenerConfig {
    /// Addresses to accept SMTP on.
    pub listen: Vec<SocketAddr>,
    /// Most inbound sessions at once from partners and strangers (over
    /// it: 421); the local MMSC's hosts are counted apart.
    pub max_sessions: usize,
    /// Most inbound sessions at once from `relay_from` hosts (over it:
    /// 421), so that no one else can take their room.
    pub max_local_sessions: usize,
    /// Of `max_sessions`, most at once from hosts that are in no partner's
    /// `accept_from` (over it: 421), so strangers cannot fill the
    /// partners' room (0: no limit but `max_sessions`).
    pub max_stranger_sessions: usize,
    /// Largest message in octets, advertised with SIZE.
    pub max_message_size: usize,
    /// Most recipients per transaction.
    pub max_recipients: usize,
    /// The local MMSC's hosts: they may send to any routable recipient.
    pub relay_from: Vec<Cidr>,
    /// MM4 check at the end of DATA.
    pub mm4_check: Mm4Check,
    /// Longest wait for a command line.
    pub command_timeout: Duration,
    /// Longest time for the whole DATA phase.
    pub data_timeout: Duration,
    /// Longest time for a whole session (ends after the transaction in progress).
    pub session_timeout: Duration,
    /// Addresses to accept SMTP on with TLS from the first octet.
    pub listen_tls: Vec<SocketAddr>,
    /// Our certificate: STARTTLS is offered when set.
    pub tls_identity: Option<Identity>,
    /// Clients that must STARTTLS before MAIL.
    pub tls_required_from: Vec<Cidr>,
    /// Offer AUTH before TLS too.
    pub auth_plaintext: bool,
    /// Bad commands before 421 (0: no limit).
    pub max_bad_commands: usize,
    /// Recipients refused with 5xx since the last accepted message before
    /// 421 (0: no limit).
    pub max_refused_recipients: usize,
    /// Sessions at once from one address, local MMSC hosts excepted (0: no limit).
    pub max_sessions_per_ip: usize,
    /// New connections per second from one address, local MMSC hosts excepted (0: no limit).
    pub connection_rate_per_ip: u32,
    /// Most header fields in a message.
    pub max_header_fields: usize,
    /// Largest header section in octets.
    pub max_header_size: usize,
    /// Deepest MIME nesting.
    pub max_mime_depth: usize,
}

/// `[peer.NAME]`: one destination MMSC.
#[derive(Clone, Debug)]
pub struct PeerConfig {
    /// The NAME of the section.
    pub name: String,
    /// `host:port` to connect to, tried in order.
    pub hosts: Vec<String>,
    /// Domains that route here (exact, or `*.suffix`).
    pub domains: Vec<String>,
    /// Number prefixes that route here (`+` and digits).
    pub prefixes: Vec<String>,
    /// Connections opened at start and kept.
    pub min_connections: usize,
    /// Most connections (worker threads) to this peer.
    pub max_connections: usize,
    /// Capacity of the message pool.
    pub pool_size: usize,
    /// This peer is our own MMSC.
    pub local: bool,
    /// This partner's hosts: they may send to local peers only.
    pub accept_from: Vec<Cidr>,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// Wait for the greeting and the EHLO/HELO reply.
    pub helo_timeout: Duration,
    /// Wait for the MAIL reply.
    pub mail_timeout: Duration,
    /// Wait for each RCPT reply.
    pub rcpt_timeout: Duration,
    /// Wait for the DATA reply, and for each write of the message.
    pub data_timeout: Duration,
    /// Wait for the reply to the final dot.
    pub data_done_timeout: Duration,
    /// NOOP interval on an idle connection.
    pub keepalive: Duration,
    /// Messages per second to this peer, all workers together (0: no limit).
    pub max_rate: u32,
    /// A connection is closed and reopened after this many messages (0: never).
    pub max_messages_per_connection: u32,
    /// A connection is closed and reopened once this old (0: never).
    pub max_connection_age: Duration,
    /// A peer with nothing to do this long falls back to min_connections.
    pub idle_timeout: Duration,
    /// First wait between probes of an unhealthy peer; doubles up to probe_max.
    pub probe_min: Duration,
    /// Longest wait between probes.
    pub probe_max: Duration,
    /// STARTTLS to this peer.
    pub tls: TlsMode,
    /// Check the peer's certificate and name.
    pub tls_verify: bool,
    /// Extra CA certificates to trust for this peer.
    pub tls_ca: Option<TlsRoots>,
    /// The name to check the certificate against (default: the host's name).
    pub tls_server_name: Option<String>,
    /// Our client certificate, for mutual TLS.
    pub tls_client_identity: Option<Identity>,
    /// AUTH to this peer: user and password.
    pub auth: Option<(String, Secret)>,
    /// Allow AUTH without TLS.
    pub auth_plaintext: bool,
}

/// The whole configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// The file it came from (for messages and reload).
    pub path: PathBuf,
    /// `[relay]`.
    pub relay: RelayConfig,
    /// `[listener]`.
    pub listener: ListenerConfig,
    /// Every `[peer.NAME]`, in file order; a peer's id is its index here.
    pub peers: Vec<PeerConfig>,
    /// `[routes] default`, as a peer index.
    pub default_peer: Option<usize>,
    /// `[ported]`: number and peer index.
    pub ported: Vec<(String, usize)>,
    /// `[auth]`: partner accounts for inbound AUTH.
    pub auth_users: Vec<AuthUser>,
    /// Problems worth a warning that do not stop the relay (secrets
    /// readable by others).
    pub warnings: Vec<String>,
}

/// A configuration error: where it is and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// The file.
    pub file: String,
    /// The section, without brackets (empty for file-level problems).
    pub section: String,
    /// The key (empty for section-level problems).
    pub key: String,
    /// The offending value.
    pub value: String,
    /// What is wrong.
    pub problem: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if !self.section.is_empty() {
            write!(f, ": [{}]", self.section)?;
        }
        if !self.key.is_empty() {
            write!(f, " {} = {:?}", self.key, self.value)?;
        }
        write!(f, ": {}", self.problem)
    }
}

impl std::error::Error for ConfigError {}

/// Reads one section, applying defaults and remembering the location for
/// error messages.
struct Section<'a> {
    file: &'a str,
    name: String,
    values: HashMap<String, String>,
    keys: &'static [(&'static str, &'static str)],
}

impl Section<'_> {
    fn err(&self, key: &str, value: &str, problem: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.to_string(),
            section: self.name.clone(),
            key: key.to_string(),
            value: value.to_string(),
            problem: problem.into(),
        }
    }

    fn raw(&self, key: &str) -> &str {
        let default = self.keys.iter().find(|(k, _)| *k == key).map(|(_, d)| *d);
        debug_assert!(default.is_some(), "key {key} missing from the key table");
        self.values
            .get(key)
            .map(String::as_str)
            .unwrap_or(default.unwrap_or(""))
    }

    fn parse<T>(
        &self,
        key: &str,
        f: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<T, ConfigError> {
        let v = self.raw(key);
        f(v).map_err(|p| self.err(key, v, p))
    }

    fn string(&self, key: &str) -> Option<String> {
        Some(self.raw(key).trim().to_string()).filter(|s| !s.is_empty())
    }

    fn count(&self, key: &str, min: usize) -> Result<usize, ConfigError> {
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

    fn duration(&self, key: &str) -> Result<Duration, ConfigError> {
        self.parse(key, parse_duration)
    }

    fn boolean(&self, key: &str) -> Result<bool, ConfigError> {
        self.parse(key, |v| match v.trim().to_ascii_lowercase().as_str() {
            "yes" | "true" | "on" | "1" => Ok(true),
            "no" | "false" | "off" | "0" => Ok(false),
            _ => Err("expected yes or no".into()),
        })
    }

    fn list(&self, key: &str) -> Vec<String> {
        split_list(self.raw(key))
    }

    fn secret(&self, key: &str) -> Option<Secret> {
        let v = self.raw(key).trim();
        (!v.is_empty()).then(|| Secret(v.to_string()))
    }

    fn read_file(&self, key: &str) -> Result<Option<(PathBuf, Vec<u8>)>, ConfigError> {
        let Some(path) = self.string(key) else {
            return Ok(None);
        };
        let bytes =
            std::fs::read(&path).map_err(|e| self.err(key, &path, format!("cannot read: {e}")))?;
        Ok(Some((PathBuf::from(path), bytes)))
    }

    /// A certificate and key from PEM files (`cert`, `key`) or a PKCS#12
    /// file and its password (`p12`, `p12_password`). Key files readable by
    /// others add a warning.
    fn identity(
        &self,
        [cert, key, p12, p12_password]: [&str; 4],
        warnings: &mut Vec<String>,
    ) -> Result<Option<Identity>, ConfigError> {
        let pem = (self.read_file(cert)?, self.read_file(key)?);
        let pkcs12 = self.read_file(p12)?;
        let (path, identity) = match (pem, pkcs12) {
            ((None, None), None) => return Ok(None),
            ((Some(_), Some(_)), Some(_)) => {
                return Err(self.err(
                    p12,
                    self.raw(p12),
                    format!("give {cert}/{key} or {p12}, not both"),
                ));
            }
            ((Some(_), None), _) => return Err(self.err(key, "", format!("{cert} needs {key}"))),
            ((None, Some(_)), _) => return Err(self.err(cert, "", format!("{key} needs {cert}"))),
            ((Some((_, c)), Some((kp, k))), None) => {
                let id = Identity::from_pem(&c, &k).map_err(|e| {
                    self.err(
                        key,
                        self.raw(key),
                        format!("not a usable PEM certificate and key: {e}"),
                    )
                })?;
                // native-tls finds a key of another certificate only at the
                // first handshake: find it now.
                let leaf = openssl::x509::X509::from_pem(&c).map_err(|e| {
                    self.err(cert, self.raw(cert), format!("not a PEM certificate: {e}"))
                })?;
                let pkey = openssl::pkey::PKey::private_key_from_pem(&k).map_err(|e| {
                    self.err(key, self.raw(key), format!("not a PEM private key: {e}"))
                })?;
                if !leaf.public_key().is_ok_and(|p| p.public_eq(&pkey)) {
                    return Err(self.err(
                        key,
                        self.raw(key),
                        format!("this key does not belong to the certificate in {cert}"),
                    ));
                }
                if let Some(w) = expired(&leaf) {
                    warnings.push(format!("{}: [{}] {cert}: {w}", self.file, self.name));
                }
                (kp, id)
            }
            ((None, None), Some((pp, der))) => {
                let password = self.raw(p12_password).trim();
                let id = Identity::from_pkcs12(&der, password).map_err(|e| {
                    self.err(
                        p12,
                        self.raw(p12),
                        format!("not a usable PKCS#12 file with {p12_password}: {e}"),
                    )
                })?;
                (pp, id)
            }
        };
        if let Some(w) = readable_by_others(&path) {
            warnings.push(format!(
                "{}: [{}] {}: {w}",
                self.file,
                self.name,
                path.display()
            ));
        }
        Ok(Some(identity))
    }

    fn cidrs(&self, key: &str) -> Result<Vec<Cidr>, ConfigError> {
        self.parse(key, |v| {
            split_list(v).iter().map(|c| Cidr::parse(c)).collect()
        })
    }
}

/// A warning if `cert` has expired or is not valid yet.
fn expired(cert: &openssl::x509::X509Ref) -> Option<String> {
    let now = openssl::asn1::Asn1Time::days_from_now(0).ok()?;
    if cert.not_after() < now {
        Some(format!("the certificate expired on {}", cert.not_after()))
    } else if cert.not_before() > now {
        Some(format!(
            "the certificate is valid only from {}",
            cert.not_before()
        ))
    } else {
        None
    }
}

/// A warning if `path` holds a secret that users other than its owner
/// and group may read.
fn readable_by_others(path: &Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(path).ok()?.permissions().mode();
    (mode & 0o004 != 0).then(|| {
        format!(
            "holds secrets and is readable by every user (mode {:o}); chmod o-r it",
            mode & 0o777
        )
    })
}

/// `[auth]` entries: `NAME = PEER:PASSWORD`, from the section or from the
/// users file (one `NAME:PEER:PASSWORD` a line; `#` comments).
fn parse_auth_user(
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

fn parse_level(v: &str) -> Result<LevelFilter, String> {
    v.trim()
        .parse()
        .map_err(|_| "expected off, error, warn, info, debug or trace".to_string())
}

fn resolve(v: &str) -> Result<SocketAddr, String> {
    v.to_socket_addrs()
        .map_err(|e| format!("{v:?} is not host:port ({e})"))?
        .next()
        .ok_or_else(|| format!("{v:?} resolves to no address"))
}

fn system_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

impl Config {
    /// Reads and validates a file; its `[relay] user` and `group` must
    /// exist on this system.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.display().to_string(),
            section: String::new(),
            key: String::new(),
            value: String::new(),
            problem: format!("cannot read: {e}"),
        })?;
        let config = Config::parse(&text, path)?;
        // The system's users and groups: a configuration error found at
        // load, not when the relay tries to become them.
        let missing = |key: &str, value: &str| ConfigError {
            file: path.display().to_string(),
            section: "relay".into(),
            key: key.into(),
            value: value.into(),
            problem: format!("no such {key} on this system"),
        };
        if let Some(u) = &config.relay.user {
            crate::privilege::uid_of(u).map_err(|_| missing("user", u))?;
        }
        if let Some(g) = &config.relay.group {
            crate::privilege::gid_of(g).map_err(|_| missing("group", g))?;
        }
        Ok(config)
    }

    /// Parses and validates INI text; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let file_err = |section: &str, problem: String| ConfigError {
            file: file.clone(),
            section: section.to_string(),
            key: String::new(),
            value: String::new(),
            problem,
        };
        let opts = ini::ParseOption {
            enabled_escape: false,
            ..Default::default()
        };
        let ini = ini::Ini::load_from_str_opt(text, opts)
            .map_err(|e| file_err("", format!("line {}: {}", e.line, e.msg)))?;

        let mut sections: Vec<(String, HashMap<String, String>)> = Vec::new();
        let mut seen = HashSet::new();
        for (name, props) in &ini {
            let name = name.unwrap_or("").to_string();
            if name.is_empty() {
                if let Some((k, v)) = props.iter().next() {
                    return Err(ConfigError {
                        file: file.clone(),
                        section: String::new(),
                        key: k.to_string(),
                        value: v.to_string(),
                        problem: "key outside any [section]".into(),
                    });
                }
                continue;
            }
            if !seen.insert(name.clone()) {
                return Err(file_err(&name, "section appears twice".into()));
            }
            let mut values = HashMap::new();
            for (k, v) in props.iter() {
                if values.insert(k.to_string(), v.to_string()).is_some() {
                    return Err(ConfigError {
                        file: file.clone(),
                        section: name.clone(),
                        key: k.to_string(),
                        value: v.to_string(),
                        problem: "key given twice".into(),
                    });
                }
            }
            sections.push((name, values));
        }

        let section = |name: &str,
                       keys: &'static [(&'static str, &'static str)]|
         -> Result<Section<'_>, ConfigError> {
            let values = sections
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
                .unwrap_or_default();
            let s = Section {
                file: &file,
                name: name.to_string(),
                values,
                keys,
            };
            if let Some((k, v)) = s
                .values
                .iter()
                .find(|(k, _)| !keys.iter().any(|(known, _)| known == k))
            {
                return Err(s.err(k, v, "unknown key"));
            }
            Ok(s)
        };

        for (name, _) in &sections {
            let known = matches!(
                name.as_str(),
                "relay" | "listener" | "routes" | "ported" | "auth"
            ) || name.starts_with("peer.");
            if !known {
                return Err(file_err(
                    name,
                    "unknown section; expected relay, listener, peer.NAME, routes, ported or auth"
                        .into(),
                ));
            }
        }

        let s = section("relay", RELAY_KEYS)?;
        let relay = RelayConfig {
            hostname: s.string("hostname").unwrap_or_else(system_hostname),
            user: s.string("user"),
            group: s.string("group"),
            spool_dir: PathBuf::from(s.raw("spool_dir").trim()),
            max_connections: s.count("max_connections", 1)?,
            log_target: {
                let file = s.string("log_file").map(PathBuf::from);
                match (s.raw("log_target").trim(), file) {
                    ("syslog", _) => crate::logging::Target::Syslog {
                        facility: s.raw("syslog_facility").trim().to_string(),
                        socket: PathBuf::from(s.raw("syslog_socket").trim()),
                    },
                    ("stderr", _) | ("", None) => crate::logging::Target::Stderr,
                    ("file" | "", Some(f)) => crate::logging::Target::File(f),
                    ("file", None) => {
                        return Err(s.err("log_target", "file", "needs log_file"));
                    }
                    (other, _) => {
                        return Err(s.err("log_target", other, "expected file, stderr or syslog"));
                    }
                }
            },
            log_level: s.parse("log_level", parse_level)?,
            retry_min: s.duration("retry_min")?,
            retry_max: s.duration("retry_max")?,
            queue_lifetime: s.duration("queue_lifetime")?,
            dedup_window: s.duration("dedup_window")?,
            spool_max_bytes: s.count("spool_max_bytes", 0)? as u64,
            spool_segment_size: s.count("spool_segment_size", 4096)? as u64,
            spool_sync: s.boolean("spool_sync")?,
            notify_failures: s.boolean("notify_failures")?,
            failed_retention: s.duration("failed_retention")?,
            shutdown_timeout: s.duration("shutdown_timeout")?,
            control_socket: s.string("control_socket").map(PathBuf::from),
            metrics_listen: match s.string("metrics_listen") {
                Some(_) => Some(s.parse("metrics_listen", resolve)?),
                None => None,
            },
            balance_interval: s.duration("balance_interval")?,
            stats_interval: s.duration("stats_interval")?,
        };
        if relay.balance_interval.is_zero() {
            return Err(s.err(
                "balance_interval",
                s.raw("balance_interval"),
                "must be more than zero",
            ));
        }
        if relay.retry_max < relay.retry_min {
            return Err(s.err(
                "retry_max",
                s.raw("retry_max"),
                "must not be shorter than retry_min",
            ));
        }

        let mut warnings = Vec::new();
        // Passwords in this file: it must not be readable by everyone.
        let mut secrets = false;
        let s = section("listener", LISTENER_KEYS)?;
        secrets |= s.secret("tls_pkcs12_password").is_some();
        let listen_list = |v: &str| -> Result<Vec<SocketAddr>, String> {
            split_list(v).iter().map(|a| resolve(a)).collect()
        };
        let listener = ListenerConfig {
            listen: s.parse("listen", |v| {
                let list = split_list(v);
                if list.is_empty() {
                    return Err("needs at least one host:port".into());
                }
                list.iter().map(|a| resolve(a)).collect()
            })?,
            max_sessions: s.count("max_sessions", 1)?,
            max_local_sessions: s.count("max_local_sessions", 1)?,
            max_stranger_sessions: s.count("max_stranger_sessions", 0)?,
            max_message_size: s.count("max_message_size", 1024)?,
            max_recipients: s.count("max_recipients", 1)?,
            relay_from: s.cidrs("relay_from")?,
            mm4_check: s.parse("mm4_check", |v| match v.trim() {
                "strict" => Ok(Mm4Check::Strict),
                "lenient" => Ok(Mm4Check::Lenient),
                "off" => Ok(Mm4Check::Off),
                _ => Err("expected strict, lenient or off".into()),
            })?,
            command_timeout: s.duration("command_timeout")?,
            data_timeout: s.duration("data_timeout")?,
            session_timeout: s.duration("session_timeout")?,
            listen_tls: s.parse("listen_tls", listen_list)?,
            tls_identity: s.identity(
                ["tls_cert", "tls_key", "tls_pkcs12", "tls_pkcs12_password"],
                &mut warnings,
            )?,
            tls_required_from: s.cidrs("tls_required_from")?,
            auth_plaintext: s.boolean("auth_plaintext")?,
            max_bad_commands: s.count("max_bad_commands", 0)?,
            max_refused_recipients: s.count("max_refused_recipients", 0)?,
            max_sessions_per_ip: s.count("max_sessions_per_ip", 0)?,
            connection_rate_per_ip: s.count("connection_rate_per_ip", 0)? as u32,
            max_header_fields: s.count("max_header_fields", 16)?,
            max_header_size: s.count("max_header_size", 1024)?,
            max_mime_depth: s.count("max_mime_depth", 1)?,
        };
        if listener.tls_identity.is_none() {
            for key in ["listen_tls", "tls_required_from"] {
                if !s.raw(key).trim().is_empty() {
                    return Err(s.err(
                        key,
                        s.raw(key),
                        "needs tls_cert and tls_key, or tls_pkcs12",
                    ));
                }
            }
        }

        let mut peers = Vec::new();
        for (name, _) in sections.iter().filter(|(n, _)| n.starts_with("peer.")) {
            let s = section(name, PEER_KEYS)?;
            secrets |= s.secret("tls_client_pkcs12_password").is_some()
                || s.secret("auth_password").is_some();
            let peer_name = name["peer.".len()..].to_string();
            if peer_name.is_empty()
                || !peer_name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(file_err(
                    name,
                    "peer name must be letters, digits, - or _".into(),
                ));
            }
            let hosts = s.list("hosts");
            if hosts.is_empty() {
                return Err(s.err("hosts", "", "a peer needs at least one host:port"));
            }
            for h in &hosts {
                if h.rsplit_once(':')
                    .and_then(|(_, p)| p.parse::<u16>().ok())
                    .is_none()
                {
                    return Err(s.err("hosts", s.raw("hosts"), format!("{h:?} is not host:port")));
                }
            }
            let prefixes = s.list("prefixes");
            for p in &prefixes {
                let ok =
                    p.len() > 1 && p.starts_with('+') && p[1..].bytes().all(|b| b.is_ascii_digit());
                if !ok {
                    return Err(s.err(
                        "prefixes",
                        s.raw("prefixes"),
                        format!("{p:?} is not + and digits"),
                    ));
                }
            }
            let domains = s.list("domains");
            for d in &domains {
                let bare = d.strip_prefix("*.").unwrap_or(d);
                if Address::parse_envelope(&format!("x@{bare}")).is_err() {
                    return Err(s.err(
                        "domains",
                        s.raw("domains"),
                        format!("{d:?} is not a domain or *.suffix"),
                    ));
                }
            }
            let peer = PeerConfig {
                name: peer_name,
                hosts,
                domains,
                prefixes,
                min_connections: s.count("min_connections", 0)?,
                max_connections: s.count("max_connections", 1)?,
                pool_size: s.count("pool_size", 1)?,
                local: s.boolean("local")?,
                accept_from: s.cidrs("accept_from")?,
                connect_timeout: s.duration("connect_timeout")?,
                helo_timeout: s.duration("helo_timeout")?,
                mail_timeout: s.duration("mail_timeout")?,
                rcpt_timeout: s.duration("rcpt_timeout")?,
                data_timeout: s.duration("data_timeout")?,
                data_done_timeout: s.duration("data_done_timeout")?,
                keepalive: s.duration("keepalive")?,
                max_rate: s.count("max_rate", 0)? as u32,
                max_messages_per_connection: s.count("max_messages_per_connection", 0)? as u32,
                max_connection_age: s.duration("max_connection_age")?,
                idle_timeout: s.duration("idle_timeout")?,
                probe_min: s.duration("probe_min")?,
                probe_max: s.duration("probe_max")?,
                tls: s.parse("tls", |v| match v.trim() {
                    "off" => Ok(TlsMode::Off),
                    "opportunistic" => Ok(TlsMode::Opportunistic),
                    "required" => Ok(TlsMode::Required),
                    "implicit" => Ok(TlsMode::Implicit),
                    _ => Err("expected off, opportunistic, required or implicit".into()),
                })?,
                tls_verify: s.boolean("tls_verify")?,
                tls_ca: match s.read_file("tls_ca_file")? {
                    None => None,
                    Some((_, pem)) => Some(TlsRoots(
                        native_tls::Certificate::stack_from_pem(&pem)
                            .ok()
                            .filter(|c| !c.is_empty())
                            .ok_or_else(|| {
                                s.err(
                                    "tls_ca_file",
                                    s.raw("tls_ca_file"),
                                    "holds no PEM certificate",
                                )
                            })?,
                    )),
                },
                tls_server_name: s.string("tls_server_name"),
                tls_client_identity: s.identity(
                    [
                        "tls_client_cert",
                        "tls_client_key",
                        "tls_client_pkcs12",
                        "tls_client_pkcs12_password",
                    ],
                    &mut warnings,
                )?,
                auth: match (s.string("auth_user"), s.secret("auth_password")) {
                    (None, None) => None,
                    (Some(u), Some(p)) => Some((u, p)),
                    (Some(_), None) => {
                        return Err(s.err("auth_password", "", "auth_user needs auth_password"));
                    }
                    (None, Some(_)) => {
                        return Err(s.err("auth_user", "", "auth_password needs auth_user"));
                    }
                },
                auth_plaintext: s.boolean("auth_plaintext")?,
            };
            if peer.tls == TlsMode::Implicit {
                // 25 and 587 are where STARTTLS is spoken: TLS from the
                // first octet there meets a plain greeting.
                for h in peer
                    .hosts
                    .iter()
                    .filter(|h| h.ends_with(":25") || h.ends_with(":587"))
                {
                    warnings.push(format!(
                        "{}: [{}] tls = implicit to {h}: that port speaks plain SMTP \
                         (STARTTLS); implicit TLS is usually on 465",
                        s.file, s.name
                    ));
                }
            }
            if peer.min_connections > peer.max_connections {
                return Err(s.err(
                    "min_connections",
                    s.raw("min_connections"),
                    "must not exceed max_connections",
                ));
            }
            peers.push(peer);
        }
        if peers.is_empty() {
            return Err(file_err(
                "",
                "no [peer.NAME] section: nothing to deliver to".into(),
            ));
        }
        let min_sum: usize = peers.iter().map(|p| p.min_connections).sum();
        if min_sum > relay.max_connections {
            let s = section("relay", RELAY_KEYS)?;
            return Err(s.err(
                "max_connections",
                s.raw("max_connections"),
                format!("the peers' min_connections add up to {min_sum}, over this budget"),
            ));
        }
        let peer_index = |n: &str| peers.iter().position(|p| p.name == n);

        // Two peers claiming the same domain or prefix is a routing conflict.
        let mut claimed: HashMap<String, &str> = HashMap::new();
        for p in &peers {
            for key in p
                .domains
                .iter()
                .map(|d| d.to_ascii_lowercase())
                .chain(p.prefixes.iter().cloned())
            {
                if let Some(other) = claimed.insert(key.clone(), &p.name) {
                    let s = section(&format!("peer.{}", p.name), PEER_KEYS)?;
                    let k = if key.starts_with('+') {
                        "prefixes"
                    } else {
                        "domains"
                    };
                    return Err(s.err(
                        k,
                        s.raw(k),
                        format!("{key} is already routed to peer {other}"),
                    ));
                }
            }
        }

        let routes = sections
            .iter()
            .find(|(n, _)| n == "routes")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        let loc = |section: &str, key: &str, value: &str, problem: String| ConfigError {
            file: file.clone(),
            section: section.to_string(),
            key: key.to_string(),
            value: value.to_string(),
            problem,
        };
        let mut default_peer = None;
        for (k, v) in &routes {
            if k != "default" {
                return Err(loc("routes", k, v, "unknown key; only default".into()));
            }
            default_peer = Some(
                peer_index(v.trim())
                    .ok_or_else(|| loc("routes", k, v, format!("no peer named {v:?}")))?,
            );
        }
        let mut ported = Vec::new();
        let ported_section = sections
            .iter()
            .find(|(n, _)| n == "ported")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        let mut ported_keys: Vec<_> = ported_section.into_iter().collect();
        ported_keys.sort();
        for (k, v) in ported_keys {
            let number = match Address::parse(&format!("{k}/TYPE=PLMN")).map(|a| a.kind) {
                Ok(AddressKind::Plmn(n)) => n,
                _ => {
                    return Err(loc(
                        "ported",
                        &k,
                        &v,
                        "key must be a number, + and digits".into(),
                    ));
                }
            };
            let peer = peer_index(v.trim())
                .ok_or_else(|| loc("ported", &k, &v, format!("no peer named {v:?}")))?;
            ported.push((number, peer));
        }

        let mut auth_users = Vec::new();
        let auth = sections
            .iter()
            .find(|(n, _)| n == "auth")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        let mut auth_keys: Vec<_> = auth.into_iter().collect();
        auth_keys.sort();
        for (k, v) in auth_keys {
            if AUTH_KEYS.iter().any(|(n, _)| *n == k) {
                let text = std::fs::read_to_string(v.trim())
                    .map_err(|e| loc("auth", &k, &v, format!("cannot read: {e}")))?;
                if let Some(w) = readable_by_others(Path::new(v.trim())) {
                    warnings.push(format!("{}: {w}", v.trim()));
                }
                for (n, line) in text.lines().enumerate() {
                    let line = line.trim();
                    if line.is_empty() || line.starts_with('#') {
                        continue;
                    }
                    let (name, rest) = line.split_once(':').unwrap_or((line, ""));
                    let user = parse_auth_user(name.trim(), rest, peer_index)
                        .map_err(|p| loc("auth", &k, &v, format!("line {}: {p}", n + 1)))?;
                    auth_users.push(user);
                }
            } else {
                let user = parse_auth_user(&k, v.trim(), peer_index)
                    .map_err(|p| loc("auth", &k, "(hidden)", p))?;
                auth_users.push(user);
                secrets = true;
            }
        }
        if secrets {
            if let Some(w) = readable_by_others(path) {
                warnings.push(format!("{}: {w}", path.display()));
            }
        }
        let mut names = HashSet::new();
        if let Some(dup) = auth_users.iter().find(|u| !names.insert(u.name.clone())) {
            return Err(loc(
                "auth",
                &dup.name,
                "(hidden)",
                "user given twice".into(),
            ));
        }

        Ok(Config {
            path: path.to_path_buf(),
            relay,
            listener,
            peers,
            default_peer,
            ported,
            auth_users,
            warnings,
        })
    }

    /// The routing table this configuration describes.
    pub fn router(&self) -> Router {
        let mut r = Router::new();
        for (id, p) in self.peers.iter().enumerate() {
            p.domains.iter().for_each(|d| r.add_domain(d, id));
            p.prefixes.iter().for_each(|x| r.add_prefix(x, id));
        }
        for (number, peer) in &self.ported {
            r.add_ported(number, *peer);
        }
        if let Some(d) = self.default_peer {
            r.set_default(d);
        }
        r
    }

    /// The relay-control table this configuration describes.
    pub fn access_control(&self) -> AccessControl {
        let accept: Vec<_> = self.peers.iter().map(|p| p.accept_from.clone()).collect();
        AccessControl::new(
            self.listener.relay_from.clone(),
            &accept,
            self.peers.iter().map(|p| p.local).collect(),
        )
    }

    /// A human-readable summary of peers and routes, for `mm4relay check`.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!(
            "relay {}: listen {}, budget {} connections, mm4_check {:?}\n",
            self.relay.hostname,
            self.listener
                .listen
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(","),
            self.relay.max_connections,
            self.listener.mm4_check
        ));
        let l = &self.listener;
        out.push_str(&format!(
            "tls in: {}{}{}; auth: {} users{}\n",
            if l.tls_identity.is_some() {
                "STARTTLS offered"
            } else {
                "off"
            },
            if l.listen_tls.is_empty() {
                String::new()
            } else {
                format!(
                    ", implicit on {}",
                    l.listen_tls
                        .iter()
                        .map(|a| a.to_string())
                        .collect::<Vec<_>>()
                        .join(",")
                )
            },
            if l.tls_required_from.is_empty() {
                String::new()
            } else {
                format!(
                    ", required from {}",
                    l.tls_required_from
                        .iter()
                        .map(|c| c.to_string())
                        .collect::<Vec<_>>()
                        .join(",")
                )
            },
            self.auth_users.len(),
            if l.auth_plaintext {
                ", also without TLS"
            } else {
                ""
            },
        ));
        out.push_str(&format!(
            "{:<12} {:<6} {:>4} {:>4} {:>6} {:<14} {:<5}  hosts / domains / prefixes / accept_from\n",
            "peer", "local", "min", "max", "pool", "tls", "auth"
        ));
        for p in &self.peers {
            out.push_str(&format!(
                "{:<12} {:<6} {:>4} {:>4} {:>6} {:<14} {:<5}  {} / {} / {} / {}\n",
                p.name,
                if p.local { "yes" } else { "no" },
                p.min_connections,
                p.max_connections,
                p.pool_size,
                format!("{:?}", p.tls).to_lowercase(),
                if p.auth.is_some() { "yes" } else { "no" },
                p.hosts.join(","),
                p.domains.join(","),
                p.prefixes.join(","),
                p.accept_from
                    .iter()
                    .map(|c| c.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
            ));
        }
        for (n, peer) in &self.ported {
            out.push_str(&format!("ported {n} -> {}\n", self.peers[*peer].name));
        }
        out.push_str(&format!(
            "default -> {}\n",
            self.default_peer
                .map_or("(none: unroutable recipients get 550 5.1.2)", |d| &self
                    .peers[d]
                    .name)
        ));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "
[relay]
hostname = relay.test
max_connections = 10

[listener]
listen = 127.0.0.1:0
relay_from = 127.0.0.1/32, 10.0.0.0/8

[peer.A]
hosts = 127.0.0.1:2600
domains = mms.mnc010.mcc001.gprs
prefixes = +447700900
local = yes

[peer.B]
hosts = 127.0.0.1:2601, 127.0.0.2:2601
domains = mms.mnc020.mcc001.gprs, *.example.org
prefixes = +1202555
accept_from = 127.0.0.2
max_connections = 8

[routes]
default = B

[ported]
+12025550177 = A
";

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.ini"))
    }

    #[test]
    fn implicit_tls_parses_and_warns_on_a_starttls_port() {
        let text = GOOD.replacen("local = yes\n", "local = yes\ntls = implicit\n", 1);
        let c = parse(&text).unwrap();
        assert_eq!(c.peers[0].tls, TlsMode::Implicit);
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        let c = parse(&text.replacen("127.0.0.1:2600", "127.0.0.1:25", 1)).unwrap();
        assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
        assert!(
            c.warnings[0].contains("[peer.A] tls = implicit to 127.0.0.1:25"),
            "{:?}",
            c.warnings
        );
        let e = parse(&GOOD.replacen("local = yes\n", "local = yes\ntls = smtps\n", 1))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("off, opportunistic, required or implicit"),
            "{e}"
        );
    }

    #[test]
    fn parses_a_good_file() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.peers.len(), 2);
        assert_eq!(c.peers[1].hosts.len(), 2);
        assert_eq!(c.peers[1].max_connections, 8);
        assert_eq!(c.peers[0].pool_size, 1000);
        assert_eq!(c.listener.max_message_size, 2_097_152);
        assert_eq!(c.default_peer, Some(1));
        assert_eq!(c.ported, vec![("+12025550177".to_string(), 0)]);
        let r = c.router();
        let a = Address::parse_envelope("+12025550177/TYPE=PLMN@x.gprs").unwrap();
        assert_eq!(r.route(&a), Some(0));
        assert!(c.describe().contains("ported +12025550177 -> A"));
    }

    #[test]
    fn errors_name_file_section_key_value() {
        let cases = [
            (
                GOOD.replace("max_connections = 8", "max_connections = eight"),
                "[peer.B] max_connections = \"eight\"",
            ),
            (
                GOOD.replace("local = yes", "local = maybe"),
                "[peer.A] local = \"maybe\"",
            ),
            (
                GOOD.replace("default = B", "default = Z"),
                "[routes] default = \"Z\"",
            ),
            (
                GOOD.replace("+12025550177 = A", "+1202OO = A"),
                "[ported] +1202OO = \"A\"",
            ),
            (
                GOOD.replace("relay_from = 127.0.0.1/32", "relay_from = 127.0.0.1/99"),
                "[listener] relay_from",
            ),
            (
                GOOD.replace("hostname", "hostnme"),
                "[relay] hostnme = \"relay.test\": unknown key",
            ),
            (
                GOOD.replace("prefixes = +1202555", "prefixes = +447700900"),
                "+447700900 is already routed",
            ),
            (
                GOOD.replace("hosts = 127.0.0.1:2600", "hosts = nowhere"),
                "[peer.A] hosts",
            ),
            (
                GOOD.replace("[routes]", "[rotes]"),
                "[rotes]: unknown section",
            ),
            (
                GOOD.replace("max_connections = 10", "max_connections = 1"),
                "[relay] max_connections = \"1\"",
            ),
            (
                GOOD.replace("listen = 127.0.0.1:0", "listen = 127.0.0.1:http-nope"),
                "[listener] listen",
            ),
        ];
        for (text, want) in cases {
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.starts_with("test.ini: "), "{err}");
            assert!(err.contains(want), "{err:?} lacks {want:?}");
        }
    }

    #[test]
    fn the_sample_config_parses_and_documents_every_key() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/mm4relay.ini");
        let c = Config::load(&path).unwrap();
        assert_eq!(c.peers.len(), 2);
        let text = std::fs::read_to_string(&path).unwrap();
        for (key, _) in RELAY_KEYS
            .iter()
            .chain(LISTENER_KEYS)
            .chain(PEER_KEYS)
            .chain(AUTH_KEYS)
        {
            let documented = text
                .lines()
                .any(|l| l.trim_start_matches(';').starts_with(&format!("{key} =")));
            assert!(documented, "conf/mm4relay.ini does not document {key}");
        }
    }

    #[test]
    fn secrets_stay_hidden_and_readable_files_warn() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.ini");
        let text = format!(
            "{GOOD}\n[auth]\npartner-b = B:hunter2\n[peer.C]\nhosts = 127.0.0.1:1\nauth_user = u\nauth_password = pw-out\n"
        );
        std::fs::write(&path, text).unwrap();
        let mode = |m| std::fs::set_permissions(&path, std::fs::Permissions::from_mode(m)).unwrap();
        mode(0o644);
        let c = Config::load(&path).unwrap();
        assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
        assert!(c.warnings[0].contains("readable by every user"));
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("pw-out"),
            "{shown}"
        );
        assert!(c.auth_users[0].password.matches("hunter2"));
        assert!(!c.auth_users[0].password.matches("hunter"));
        mode(0o640);
        assert!(Config::load(&path).unwrap().warnings.is_empty());
    }

    /// A self-signed certificate and key for `localhost`, as PEM.
    fn self_signed() -> (
        Vec<u8>,
        Vec<u8>,
        openssl::x509::X509,
        openssl::pkey::PKey<openssl::pkey::Private>,
    ) {
        use openssl::{asn1::Asn1Time, ec, hash::MessageDigest, nid::Nid, pkey::PKey, x509};
        let group = ec::EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
        let key = PKey::from_ec_key(ec::EcKey::generate(&group).unwrap()).unwrap();
        let mut name = x509::X509NameBuilder::new().unwrap();
        name.append_entry_by_nid(Nid::COMMONNAME, "localhost")
            .unwrap();
        let name = name.build();
        let mut b = x509::X509::builder().unwrap();
        b.set_version(2).unwrap();
        b.set_subject_name(&name).unwrap();
        b.set_issuer_name(&name).unwrap();
        b.set_pubkey(&key).unwrap();
        b.set_not_before(&Asn1Time::days_from_now(0).unwrap())
            .unwrap();
        b.set_not_after(&Asn1Time::days_from_now(1).unwrap())
            .unwrap();
        b.sign(&key, MessageDigest::sha256()).unwrap();
        let cert = b.build();
        (
            cert.to_pem().unwrap(),
            key.private_key_to_pem_pkcs8().unwrap(),
            cert,
            key,
        )
    }

    #[test]
    fn tls_identities_from_pem_and_pkcs12_and_a_users_file() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let (cert_pem, key_pem, cert, key) = self_signed();
        let file = |name: &str, bytes: &[u8]| {
            let p = dir.path().join(name);
            std::fs::write(&p, bytes).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
            p.display().to_string()
        };
        let (c, k) = (file("c.pem", &cert_pem), file("k.pem", &key_pem));
        let p12 = openssl::pkcs12::Pkcs12::builder()
            .name("relay")
            .pkey(&key)
            .cert(&cert)
            .build2("p12pass")
            .unwrap();
        let p12 = file("id.p12", &p12.to_der().unwrap());
        let users = file(
            "users",
            b"# partner accounts\npartner-b:B:s3cret\n\nops:A:other:with:colons\n",
        );
        let text = GOOD
            .replacen(
                "relay_from = 127.0.0.1/32, 10.0.0.0/8\n",
                &format!("relay_from = 127.0.0.1/32, 10.0.0.0/8\ntls_cert = {c}\ntls_key = {k}\n"),
                1,
            )
            .replacen(
                "max_connections = 8\n",
                &format!(
                    "max_connections = 8\ntls = required\ntls_client_pkcs12 = {p12}\ntls_client_pkcs12_password = p12pass\n"
                ),
                1,
            )
            + &format!("\n[auth]\nusers_file = {users}\n");
        let c = parse(&text).unwrap();
        assert!(c.listener.tls_identity.is_some());
        assert!(c.peers[1].tls_client_identity.is_some());
        assert_eq!(c.peers[1].tls, TlsMode::Required);
        let names: Vec<_> = c
            .auth_users
            .iter()
            .map(|u| (u.name.as_str(), u.peer))
            .collect();
        assert_eq!(names, [("partner-b", 1), ("ops", 0)]);
        assert!(c.auth_users[1].password.matches("other:with:colons"));
        assert!(crate::tls::acceptor(&c.listener).unwrap().is_some());
        // A wrong PKCS#12 password is an error naming the key.
        let bad = text.replace("p12pass", "nope");
        let e = parse(&bad).unwrap_err();
        assert_eq!(
            (e.section.as_str(), e.key.as_str()),
            ("peer.B", "tls_client_pkcs12"),
            "{e}"
        );
        // A key that does not belong to the certificate.
        let (_, other_key, _, _) = self_signed();
        let k2 = file("k2.pem", &other_key);
        let e = parse(&text.replace(&k, &k2)).unwrap_err();
        assert_eq!(e.key, "tls_key", "{e}");
    }

    #[test]
    fn tls_and_auth_errors_name_the_key() {
        let cases = [
            (
                "[listener]\ntls_cert = /nonexistent/cert.pem\n",
                "listener",
                "tls_cert",
                "cannot read",
            ),
            (
                "[listener]\nlisten_tls = 127.0.0.1:0\n",
                "listener",
                "listen_tls",
                "needs tls_cert",
            ),
            (
                "[peer.A]\ntls = sometimes\n",
                "peer.A",
                "tls",
                "expected off",
            ),
            (
                "[peer.A]\nauth_user = x\n",
                "peer.A",
                "auth_password",
                "needs auth_password",
            ),
            ("[auth]\nbob = Z:pw\n", "auth", "bob", "no peer named"),
            ("[auth]\nbob = B\n", "auth", "bob", "PEER:PASSWORD"),
        ];
        for (extra, section, key, problem) in cases {
            // Merge the extra keys into the section GOOD already has.
            let (head, keys) = extra.split_once('\n').unwrap();
            let text = if GOOD.contains(head) {
                GOOD.replacen(&format!("{head}\n"), &format!("{head}\n{keys}"), 1)
            } else {
                format!("{GOOD}\n{extra}")
            };
            let e = parse(&text).unwrap_err();
            assert_eq!((e.section.as_str(), e.key.as_str()), (section, key), "{e}");
            assert!(e.problem.contains(problem), "{e}");
            assert!(!e.to_string().contains("pw"), "{e}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert!(parse_duration("2 weeks").is_err());
        assert_eq!(
            parse_duration("3650d"),
            Ok(Duration::from_secs(3650 * 86_400))
        );
        assert!(parse_duration("3651d").is_err());
        assert!(parse_duration("99999999999999999d").is_err());
        assert!(parse_duration("").is_err());
    }
}
