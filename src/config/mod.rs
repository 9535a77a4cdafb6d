//! The INI configuration: raw text (rust-ini) to a typed, validated
//! [`Config`], in two steps. [`parse`] (`parse.rs`, `section.rs`) turns the
//! text into a [`Draft`] with no I/O at all; [`Draft::load`] (`load.rs`)
//! reads the certificates, CA bundles and users file it names and
//! resolves its host names. [`Config::load`] does both for a file and
//! checks the system's users and groups.
//!
//! Every key with its default stands in one table per section (`keys.rs`);
//! `conf/mm4relay.ini` documents them for operators. Unknown sections and
//! keys are errors, since a typo must not silently leave a default in
//! force. Every error names the file, the section, the key and the bad
//! value.
//!
//! This module may not start anything: it describes what `relay` builds.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use log::LevelFilter;

use crate::route::access::{AccessControl, Cidr};

mod keys;
mod load;
mod parse;
mod section;

use crate::route::np::NpTable;
use crate::route::{Numbering, Router};
use crate::tls::Identity;
pub use keys::{AUTH_KEYS, DNS_KEYS, ENUM_KEYS, LISTENER_KEYS, PEER_KEYS, RELAY_KEYS, ROUTES_KEYS};
pub use parse::{Draft, parse};
pub use section::parse_duration;

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

/// CA certificates to trust, read by the load step.
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
    pub log_target: crate::sys::logging::Target,
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
    /// `host:port` to connect to, tried in order (empty with `mx`).
    pub hosts: Vec<String>,
    /// `hosts = mx:DOMAIN`: the hosts are DOMAIN's MX exchanges, found
    /// through `[dns]` when a connection opens.
    pub mx: Option<String>,
    /// Made at run time for a domain no peer claims (`[routes] dynamic`).
    pub dynamic: bool,
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
    /// Send with BDAT (RFC 3030), several messages per write, when the
    /// peer offers CHUNKING and PIPELINING.
    pub chunking: bool,
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
    /// `rcpt_format = international`: recipients' numbers go out as `+`
    /// and digits, whatever form they came in.
    pub rcpt_international: bool,
    /// AUTH to this peer: user and password.
    pub auth: Option<(String, Secret)>,
    /// Allow AUTH without TLS.
    pub auth_plaintext: bool,
}

/// `[routes] dynamic = yes`: how peers made at run time are set up.
#[derive(Clone, Debug)]
pub struct DynamicPeers {
    /// `[routes] max_dynamic_peers`: most dynamic peers at once.
    pub max_peers: usize,
    /// `[peer_defaults]`: the settings of every dynamic peer (its name,
    /// hosts and domain are its own).
    pub defaults: PeerConfig,
}

/// How the number-portability table in force was loaded.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PortedLoad {
    /// `[routes] ported_file`, if one was read.
    pub file: Option<PathBuf>,
    /// Entries of the table, `[ported]` included.
    pub entries: usize,
    /// Seconds the file took to read and build.
    pub seconds: f64,
    /// When the load step built it (`None`: a `Draft`, not loaded).
    pub at: Option<std::time::SystemTime>,
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
    /// `[routes] ported_file`: number-portability entries, one a line.
    pub ported_file: Option<PathBuf>,
    /// `[routes] country_code`, `national_prefix`, `international_prefix`:
    /// how recipients' numbers read.
    pub numbering: Numbering,
    /// The number-portability table: `[ported]` and the ported file.
    /// Only the load step reads the file: a `Draft` holds `[ported]` alone.
    pub np: Arc<NpTable>,
    /// How the load step built `np`, for status and metrics.
    pub ported_load: PortedLoad,
    /// `[auth]`: partner accounts for inbound AUTH.
    pub auth_users: Vec<AuthUser>,
    /// `[dns]`: how the relay's resolver asks.
    pub dns: crate::dns::Settings,
    /// `[dns] smtp_port`: the port of hosts found through DNS.
    pub smtp_port: u16,
    /// `[enum] domain`: the ENUM suffix, when ENUM routes numbers.
    pub enum_domain: Option<String>,
    /// `[routes] dynamic = yes`: a peer for every domain no peer claims.
    pub dynamic: Option<DynamicPeers>,
    /// `[cdr]`: CDR files, when `dir` is set.
    pub cdr: Option<crate::cdr::CdrConfig>,
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

impl ConfigError {
    /// An error at `key = value` of `[section]` in `file` (empty key,
    /// value or section: a problem of the section or the file).
    pub fn at(
        file: impl fmt::Display,
        section: &str,
        key: &str,
        value: &str,
        problem: impl Into<String>,
    ) -> ConfigError {
        ConfigError {
            file: file.to_string(),
            section: section.to_string(),
            key: key.to_string(),
            value: value.to_string(),
            problem: problem.into(),
        }
    }
}

impl Config {
    /// Reads and validates a file; its `[relay] user` and `group` must
    /// exist on this system.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = load::read_text(path)
            .map_err(|e| ConfigError::at(&file, "", "", "", format!("cannot read: {e}")))?;
        let config = Config::parse(&text, path)?;
        // The system's users and groups: a configuration error found at
        // load, not when the relay tries to become them.
        let missing = |key: &str, value: &str| {
            ConfigError::at(
                &file,
                "relay",
                key,
                value,
                format!("no such {key} on this system"),
            )
        };
        if let Some(u) = &config.relay.user {
            crate::sys::privilege::uid_of(u).map_err(|_| missing("user", u))?;
        }
        if let Some(g) = &config.relay.group {
            crate::sys::privilege::gid_of(g).map_err(|_| missing("group", g))?;
        }
        Ok(config)
    }

    /// Parses INI text and loads what it names; `path` names it in
    /// errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        parse(text, path)?.load()
    }

    /// The routing table this configuration describes.
    pub fn router(&self) -> Router {
        let mut r = Router::new();
        for (id, p) in self.peers.iter().enumerate() {
            p.domains.iter().for_each(|d| r.add_domain(d, id));
            p.prefixes.iter().for_each(|x| r.add_prefix(x, id));
        }
        r.set_ported(self.np.clone());
        r.set_numbering(self.numbering.clone());
        if self.dynamic.is_some() {
            r.set_dynamic((0..self.peers.len()).filter(|&i| self.peers[i].dynamic));
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
                p.mx.as_ref()
                    .map_or_else(|| p.hosts.join(","), |d| format!("mx:{d}")),
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
        if let Some(path) = &self.ported_file {
            out.push_str(&format!(
                "ported_file {}: {} entries with [ported]\n",
                path.display(),
                self.np.len()
            ));
        }
        out.push_str(&format!(
            "default -> {}\n",
            self.default_peer
                .map_or("(none: unroutable recipients get 550 5.1.2)", |d| &self
                    .peers[d]
                    .name)
        ));
        if let Some(d) = &self.dynamic {
            out.push_str(&format!(
                "dynamic peers: on, at most {}, each {} to {} connections, pool {}\n",
                d.max_peers,
                d.defaults.min_connections,
                d.defaults.max_connections,
                d.defaults.pool_size
            ));
        }
        if let Some(e) = &self.enum_domain {
            out.push_str(&format!("enum: NAPTR under {e}\n"));
        }
        if let Some(c) = &self.cdr {
            out.push_str(&format!(
                "cdr: {}, a new file every {:?}, RES awaited {:?} (at most {} waiting)\n",
                c.dir.display(),
                c.rotate,
                c.ack_timeout,
                c.max_pending
            ));
        }
        let servers: Vec<String> = self.dns.servers.iter().map(|s| s.to_string()).collect();
        out.push_str(&format!(
            "dns: {}, timeout {:?} x {} attempts, smtp_port {}\n",
            if servers.is_empty() {
                "no servers".to_string()
            } else {
                servers.join(",")
            },
            self.dns.timeout,
            self.dns.attempts,
            self.smtp_port
        ));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::Address;

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
            .chain(ROUTES_KEYS)
            .chain(DNS_KEYS)
            .chain(ENUM_KEYS)
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
        assert!(crate::tls::Acceptor::new(c.listener.tls_identity.as_ref().unwrap()).is_ok());
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
                "[listener]\ntls_cert = /nonexistent/cert.pem\ntls_key = /nonexistent/key.pem\n",
                "listener",
                "tls_cert",
                "cannot read",
            ),
            (
                "[listener]\ntls_cert = /nonexistent/cert.pem\n",
                "listener",
                "tls_key",
                "tls_cert needs tls_key",
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
            (
                "[routes]\ncountry_code = 4x\n",
                "routes",
                "country_code",
                "digits",
            ),
            (
                "[routes]\ninternational_prefix =\n",
                "routes",
                "international_prefix",
                "empty",
            ),
            (
                "[peer.A]\nrcpt_format = e164\n",
                "peer.A",
                "rcpt_format",
                "expected as_received or international",
            ),
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
    fn dns_enum_and_dynamic_peer_keys() {
        let text = format!(
            "{}\n[dns]\nservers = 127.0.0.1:5353, ::1\ntimeout = 300ms\nsmtp_port = 2525\n\
             [enum]\ndomain = E164.Arpa.\n[peer_defaults]\nmax_connections = 2\n",
            GOOD.replace("hosts = 127.0.0.1:2600", "hosts = mx:MMS.example.")
                .replace(
                    "[routes]\n",
                    "[routes]\ndynamic = yes\nmax_dynamic_peers = 3\n"
                )
        );
        let c = parse(&text).unwrap();
        assert_eq!(c.peers[0].mx.as_deref(), Some("mms.example"));
        assert!(c.peers[0].hosts.is_empty());
        assert_eq!(
            c.dns.servers,
            [
                "127.0.0.1:5353".parse().unwrap(),
                "[::1]:53".parse().unwrap()
            ]
        );
        assert_eq!(c.smtp_port, 2525);
        assert_eq!(c.enum_domain.as_deref(), Some("e164.arpa"));
        let d = c.dynamic.as_ref().unwrap();
        assert_eq!((d.max_peers, d.defaults.max_connections), (3, 2));
        assert_eq!(
            d.defaults.min_connections, 0,
            "no connection held while idle"
        );
        for (bad, section, key) in [
            ("hosts = mx:bad_domain", "peer.A", "hosts"),
            ("[dns]\nservers = resolver.example", "dns", "servers"),
            ("[dns]\nsmtp_port = 0", "dns", "smtp_port"),
            ("[dns]\ntimeout = 0s", "dns", "timeout"),
            ("[enum]\ndomain = not a domain", "enum", "domain"),
            ("[cdr]\ndir = /tmp/x\nrotate = 0s", "cdr", "rotate"),
            (
                "[cdr]\ndir = /tmp/x\nack_timeout = 8d",
                "cdr",
                "ack_timeout",
            ),
            ("[cdr]\ndir = /tmp/x\nmax_pending = 0", "cdr", "max_pending"),
            ("[cdr]\ndir = /tmp/x\nsummary = maybe", "cdr", "summary"),
            (
                "[peer_defaults]\nhosts = 127.0.0.1:25",
                "peer_defaults",
                "hosts",
            ),
            ("[peer_defaults]\nlocal = yes", "peer_defaults", "local"),
        ] {
            let text = if bad.starts_with("hosts") {
                GOOD.replace("hosts = 127.0.0.1:2600", bad)
            } else {
                format!("{GOOD}\n{bad}\n")
            };
            let e = parse(&text).unwrap_err();
            assert_eq!((e.section.as_str(), e.key.as_str()), (section, key), "{e}");
        }
    }

    #[test]
    fn parsing_reads_no_file_and_resolves_no_name() {
        // Files that do not exist and a name that cannot resolve: the
        // parse step takes them as written, the load step finds them.
        let text = GOOD.replacen(
            "[listener]\n",
            "[listener]\ntls_cert = /nonexistent/c.pem\ntls_key = /nonexistent/k.pem\n\
             listen_tls = no-such-host.invalid:465\n",
            1,
        ) + "\n[auth]\nusers_file = /nonexistent/users\n";
        let draft = super::parse(&text, Path::new("test.ini")).unwrap();
        assert!(draft.config().listener.tls_identity.is_none());
        assert!(draft.config().listener.listen_tls.is_empty());
        let e = draft.load().unwrap_err();
        assert_eq!(
            (e.section.as_str(), e.key.as_str()),
            ("listener", "listen_tls"),
            "{e}"
        );
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
