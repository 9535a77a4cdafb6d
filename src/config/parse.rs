//! Raw INI text to a typed, validated [`Draft`], one function a section,
//! with no I/O: files the configuration names (certificates, CA bundles,
//! the users file) and host names are only recorded here, and read or
//! resolved by the load step (`load.rs`).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::route::np::{NpBuilder, NpError, NpTable};
use crate::route::{Address, AddressKind, Numbering};
use crate::sys::logging::Target;

use super::keys::{
    AUTH_KEYS, CDR_KEYS, DNS_KEYS, ENUM_KEYS, LISTENER_KEYS, NOT_PEER_DEFAULTS, PEER_KEYS,
    RELAY_KEYS, ROUTES_KEYS,
};
use super::section::{Section, host_port, parse_auth_user, parse_level};
use super::{
    AuthUser, Config, ConfigError, DynamicPeers, ListenerConfig, Mm4Check, PeerConfig, PortedLoad,
    RelayConfig, TlsMode,
};

/// A certificate and key as a section names them: PEM files or a PKCS#12
/// file, not yet read.
#[derive(Clone, Debug)]
pub(super) struct IdentityFiles {
    /// The section, for errors.
    pub(super) section: String,
    /// The keys: cert, key, pkcs12, pkcs12 password.
    pub(super) keys: [&'static str; 4],
    /// Their values (the password's, empty when none).
    pub(super) values: [String; 4],
}

/// What a peer section names that the load step reads.
#[derive(Clone, Debug, Default)]
pub(super) struct PeerFiles {
    /// The client certificate and key files.
    pub(super) identity: Option<IdentityFiles>,
    /// `tls_ca_file`.
    pub(super) ca_file: Option<String>,
}

/// A parsed configuration before its files are read and its names
/// resolved: [`Draft::load`] makes it a [`Config`].
#[derive(Debug)]
pub struct Draft {
    /// Everything but what the load step fills in: the listen addresses,
    /// the metrics address, identities, CA roots and the users file's
    /// accounts are empty, and the hostname is empty when not given.
    pub(super) config: Config,
    /// `[listener] listen`, as written: resolved by the load step.
    pub(super) listen: Vec<String>,
    /// `[listener] listen_tls`, as written.
    pub(super) listen_tls: Vec<String>,
    /// `[relay] metrics_listen`, as written.
    pub(super) metrics_listen: Option<String>,
    /// The listener's certificate and key files.
    pub(super) listener_identity: Option<IdentityFiles>,
    /// What each peer names, in the order of `config.peers`.
    pub(super) peer_files: Vec<PeerFiles>,
    /// `[auth] users_file`, as (key, value).
    pub(super) users_file: Option<(String, String)>,
    /// `[dns] servers` as written (`None`: resolv.conf's, read by the
    /// load step), and whether anything needs DNS.
    pub(super) dns_servers: (Option<String>, bool),
    /// What `[peer_defaults]` names.
    pub(super) defaults_files: PeerFiles,
    /// The file itself holds passwords.
    pub(super) secrets: bool,
}

impl Draft {
    /// The configuration as parsed, without what the load step reads.
    pub fn config(&self) -> &Config {
        &self.config
    }
}

/// One section's name and its keys with their values.
type RawSection = (String, HashMap<String, String>);

/// The sections of a file by name, in file order.
struct Sections<'a> {
    file: &'a str,
    list: Vec<RawSection>,
}

impl Sections<'_> {
    fn values(&self, name: &str) -> HashMap<String, String> {
        self.list
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    }

    /// The section `name` read against `keys`: an unknown key is an error.
    fn section(
        &self,
        name: &str,
        keys: &'static [(&'static str, &'static str)],
    ) -> Result<Section<'_>, ConfigError> {
        let s = Section {
            file: self.file,
            name: name.to_string(),
            values: self.values(name),
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
    }

    /// An error at `key` of a section without a key table.
    fn err(&self, section: &str, key: &str, value: &str, problem: String) -> ConfigError {
        ConfigError::at(self.file, section, key, value, problem)
    }

    /// A free-form section's entries, sorted by key.
    fn sorted(&self, name: &str) -> Vec<(String, String)> {
        let mut entries: Vec<_> = self.values(name).into_iter().collect();
        entries.sort();
        entries
    }
}

/// Parses and validates INI text; `path` names it in errors. Reads no
/// file and resolves no name.
pub fn parse(text: &str, path: &Path) -> Result<Draft, ConfigError> {
    let file = path.display().to_string();
    let sections = Sections {
        file: &file,
        list: split_sections(text, &file)?,
    };
    let relay = relay(&sections.section("relay", RELAY_KEYS)?)?;
    let mut secrets = false;
    let s = sections.section("listener", LISTENER_KEYS)?;
    secrets |= s.secret("tls_pkcs12_password").is_some();
    let (listener, listen, listen_tls, listener_identity) = listener(&s)?;
    let metrics_listen = {
        let s = sections.section("relay", RELAY_KEYS)?;
        match s.string("metrics_listen") {
            Some(v) => {
                s.parse("metrics_listen", host_port)?;
                Some(v)
            }
            None => None,
        }
    };
    let mut peers = Vec::new();
    let mut peer_files = Vec::new();
    let mut warnings = Vec::new();
    for (name, _) in sections.list.iter().filter(|(n, _)| n.starts_with("peer.")) {
        let s = sections.section(name, PEER_KEYS)?;
        secrets |=
            s.secret("tls_client_pkcs12_password").is_some() || s.secret("auth_password").is_some();
        let (p, files) = peer(&s, &s.name["peer.".len()..], &mut warnings)?;
        peers.push(p);
        peer_files.push(files);
    }
    check_peers(&sections, &relay, &peers)?;
    let peer_index = |n: &str| peers.iter().position(|p| p.name == n);
    let (default_peer, ported_file, numbering) = routes(&sections, &peer_index)?;
    let (dns, smtp_port, dns_servers) = dns(&sections)?;
    let enum_domain = enum_domain(&sections)?;
    let cdr = cdr(&sections)?;
    let (dynamic, defaults_files) = dynamic(&sections, &mut warnings)?;
    let needs_dns =
        enum_domain.is_some() || dynamic.is_some() || peers.iter().any(|p| p.mx.is_some());
    let ported = ported(&sections, &peer_index)?;
    let np =
        Arc::new(np_table(&ported, None).map_err(|e| sections.err("ported", "", "", e.problem))?);
    let (auth_users, users_file) = auth(&sections, &peer_index)?;
    secrets |= !auth_users.is_empty();
    Ok(Draft {
        config: Config {
            path: path.to_path_buf(),
            relay,
            listener,
            peers,
            default_peer,
            ported,
            ported_file,
            numbering,
            ported_load: PortedLoad {
                entries: np.len(),
                ..PortedLoad::default()
            },
            np,
            auth_users,
            dns,
            smtp_port,
            enum_domain,
            dynamic,
            cdr,
            warnings,
        },
        listen,
        listen_tls,
        metrics_listen,
        listener_identity,
        peer_files,
        users_file,
        dns_servers: (dns_servers, needs_dns),
        defaults_files,
        secrets,
    })
}

/// The INI text as sections: a key outside any section, a section given
/// twice, a key given twice and an unknown section are errors.
fn split_sections(text: &str, file: &str) -> Result<Vec<RawSection>, ConfigError> {
    let err = |section: &str, key: &str, value: &str, problem: &str| {
        ConfigError::at(file, section, key, value, problem)
    };
    let opts = ini::ParseOption {
        enabled_escape: false,
        ..Default::default()
    };
    let ini = ini::Ini::load_from_str_opt(text, opts)
        .map_err(|e| err("", "", "", &format!("line {}: {}", e.line, e.msg)))?;
    let mut sections = Vec::new();
    let mut seen = HashSet::new();
    for (name, props) in &ini {
        let name = name.unwrap_or("").to_string();
        if name.is_empty() {
            if let Some((k, v)) = props.iter().next() {
                return Err(err("", k, v, "key outside any [section]"));
            }
            continue;
        }
        if !seen.insert(name.clone()) {
            return Err(err(&name, "", "", "section appears twice"));
        }
        let known = matches!(
            name.as_str(),
            "relay"
                | "listener"
                | "routes"
                | "ported"
                | "auth"
                | "dns"
                | "enum"
                | "cdr"
                | "peer_defaults"
        ) || name.starts_with("peer.");
        if !known {
            return Err(err(
                &name,
                "",
                "",
                "unknown section; expected relay, listener, peer.NAME, routes, ported, auth, \
                 dns, enum, cdr or peer_defaults",
            ));
        }
        let mut values = HashMap::new();
        for (k, v) in props.iter() {
            if values.insert(k.to_string(), v.to_string()).is_some() {
                return Err(err(&name, k, v, "key given twice"));
            }
        }
        sections.push((name, values));
    }
    Ok(sections)
}

/// `[relay]`. The hostname is empty when not given (the load step asks
/// the system), the metrics address is filled in by the load step.
fn relay(s: &Section) -> Result<RelayConfig, ConfigError> {
    let relay = RelayConfig {
        hostname: s.string("hostname").unwrap_or_default(),
        user: s.string("user"),
        group: s.string("group"),
        spool_dir: PathBuf::from(s.raw("spool_dir").trim()),
        max_connections: s.count("max_connections", 1)?,
        log_target: log_target(s)?,
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
        metrics_listen: None,
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
    Ok(relay)
}

fn log_target(s: &Section) -> Result<Target, ConfigError> {
    let file = s.string("log_file").map(PathBuf::from);
    match (s.raw("log_target").trim(), file) {
        ("syslog", _) => {
            let facility = s.raw("syslog_facility").trim();
            if !crate::sys::logging::is_facility(facility) {
                return Err(s.err(
                    "syslog_facility",
                    facility,
                    "not a syslog facility (mail, daemon, local0 … local7)",
                ));
            }
            Ok(Target::Syslog {
                facility: facility.to_string(),
                socket: PathBuf::from(s.raw("syslog_socket").trim()),
            })
        }
        ("stderr", _) | ("", None) => Ok(Target::Stderr),
        ("file" | "", Some(f)) => Ok(Target::File(f)),
        ("file", None) => Err(s.err("log_target", "file", "needs log_file")),
        (other, _) => Err(s.err("log_target", other, "expected file, stderr or syslog")),
    }
}

/// What `[listener]` names and the load step reads or resolves.
type ListenerParts = (
    ListenerConfig,
    Vec<String>,
    Vec<String>,
    Option<IdentityFiles>,
);

/// `[listener]`, with its addresses and identity files apart.
fn listener(s: &Section) -> Result<ListenerParts, ConfigError> {
    let listen = s.host_ports("listen")?;
    if listen.is_empty() {
        return Err(s.err("listen", s.raw("listen"), "needs at least one host:port"));
    }
    let listen_tls = s.host_ports("listen_tls")?;
    let identity = identity_files(
        s,
        ["tls_cert", "tls_key", "tls_pkcs12", "tls_pkcs12_password"],
    )?;
    let listener = ListenerConfig {
        listen: Vec::new(),
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
        listen_tls: Vec::new(),
        tls_identity: None,
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
    if identity.is_none() {
        for key in ["listen_tls", "tls_required_from"] {
            if !s.raw(key).trim().is_empty() {
                return Err(s.err(key, s.raw(key), "needs tls_cert and tls_key, or tls_pkcs12"));
            }
        }
    }
    Ok((listener, listen, listen_tls, identity))
}

/// The identity keys of a section: PEM files (`cert`, `key`) or a PKCS#12
/// file (`p12`, with `p12_password`), not both, and not half of a pair.
fn identity_files(
    s: &Section,
    keys: [&'static str; 4],
) -> Result<Option<IdentityFiles>, ConfigError> {
    let [cert, key, p12, _] = keys;
    let given = |k: &str| s.string(k).is_some();
    match ((given(cert), given(key)), given(p12)) {
        ((false, false), false) => return Ok(None),
        ((true, true), true) => {
            return Err(s.err(
                p12,
                s.raw(p12),
                format!("give {cert}/{key} or {p12}, not both"),
            ));
        }
        ((true, false), _) => return Err(s.err(key, "", format!("{cert} needs {key}"))),
        ((false, true), _) => return Err(s.err(cert, "", format!("{key} needs {cert}"))),
        _ => {}
    }
    Ok(Some(IdentityFiles {
        section: s.name.clone(),
        keys,
        values: keys.map(|k| s.raw(k).trim().to_string()),
    }))
}

/// One `[peer.NAME]` (or `[peer_defaults]`, with an empty `name`), with
/// the files it names apart.
fn peer(
    s: &Section,
    name: &str,
    warnings: &mut Vec<String>,
) -> Result<(PeerConfig, PeerFiles), ConfigError> {
    let peer_name = name.to_string();
    let template = s.name == "peer_defaults";
    if !template
        && (peer_name.is_empty()
            || !peer_name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
    {
        return Err(s.err("", "", "peer name must be letters, digits, - or _"));
    }
    let mut hosts = s.list("hosts");
    let mut mx = None;
    if let [one] = hosts.as_slice()
        && let Some(domain) = one.strip_prefix("mx:")
    {
        let domain = domain.trim().trim_end_matches('.').to_ascii_lowercase();
        if !crate::route::valid_domain(&domain) || domain.starts_with('[') {
            return Err(s.err("hosts", s.raw("hosts"), "mx: needs a domain name"));
        }
        mx = Some(domain);
        hosts.clear();
    }
    if hosts.is_empty() && mx.is_none() && !template {
        return Err(s.err(
            "hosts",
            "",
            "a peer needs at least one host:port, or mx:DOMAIN",
        ));
    }
    for h in &hosts {
        host_port(h).map_err(|p| s.err("hosts", s.raw("hosts"), p))?;
    }
    let prefixes = s.list("prefixes");
    for p in &prefixes {
        let ok = p.len() > 1 && p.starts_with('+') && p[1..].bytes().all(|b| b.is_ascii_digit());
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
    let files = PeerFiles {
        identity: identity_files(
            s,
            [
                "tls_client_cert",
                "tls_client_key",
                "tls_client_pkcs12",
                "tls_client_pkcs12_password",
            ],
        )?,
        ca_file: s.string("tls_ca_file"),
    };
    let peer = PeerConfig {
        name: peer_name,
        hosts,
        mx,
        dynamic: false,
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
        chunking: s.boolean("chunking")?,
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
        tls_ca: None,
        tls_server_name: s.string("tls_server_name"),
        tls_client_identity: None,
        rcpt_international: s.parse("rcpt_format", |v| match v.trim() {
            "as_received" => Ok(false),
            "international" => Ok(true),
            _ => Err("expected as_received or international".into()),
        })?,
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
        // 25 and 587 are where STARTTLS is spoken: TLS from the first
        // octet there meets a plain greeting.
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
    Ok((peer, files))
}

/// At least one peer, their minimums within the budget, and no domain or
/// prefix claimed by two of them.
fn check_peers(
    sections: &Sections,
    relay: &RelayConfig,
    peers: &[PeerConfig],
) -> Result<(), ConfigError> {
    if peers.is_empty() {
        return Err(sections.err(
            "",
            "",
            "",
            "no [peer.NAME] section: nothing to deliver to".into(),
        ));
    }
    let min_sum: usize = peers.iter().map(|p| p.min_connections).sum();
    if min_sum > relay.max_connections {
        let s = sections.section("relay", RELAY_KEYS)?;
        return Err(s.err(
            "max_connections",
            s.raw("max_connections"),
            format!("the peers' min_connections add up to {min_sum}, over this budget"),
        ));
    }
    let mut claimed: HashMap<String, &str> = HashMap::new();
    for p in peers {
        for key in p
            .domains
            .iter()
            .map(|d| d.to_ascii_lowercase())
            .chain(p.prefixes.iter().cloned())
        {
            if let Some(other) = claimed.insert(key.clone(), &p.name) {
                let s = sections.section(&format!("peer.{}", p.name), PEER_KEYS)?;
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
    Ok(())
}

/// `[dns]`: the resolver's settings (servers empty until the load step
/// reads them), the SMTP port of hosts found through DNS, and the
/// servers as written.
fn dns(sections: &Sections) -> Result<(crate::dns::Settings, u16, Option<String>), ConfigError> {
    let s = sections.section("dns", DNS_KEYS)?;
    let servers = s
        .list("servers")
        .iter()
        .map(|v| dns_server(v).map_err(|p| s.err("servers", s.raw("servers"), p)))
        .collect::<Result<Vec<_>, _>>()?;
    let timeout = s.duration("timeout")?;
    if timeout.is_zero() {
        return Err(s.err("timeout", s.raw("timeout"), "must be more than 0"));
    }
    let attempts = s.count("attempts", 1)?;
    if attempts > 10 {
        return Err(s.err("attempts", s.raw("attempts"), "at most 10"));
    }
    let smtp_port = s.parse("smtp_port", |v| {
        v.trim()
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| "expected a port, 1 to 65535".to_string())
    })?;
    let settings = crate::dns::Settings {
        servers,
        timeout,
        attempts: attempts as u32,
    };
    Ok((settings, smtp_port, s.string("servers")))
}

/// A DNS server: an IP address, with `:PORT` (default 53).
pub(super) fn dns_server(v: &str) -> Result<std::net::SocketAddr, String> {
    let v = v.trim();
    if let Ok(ip) = v.parse::<std::net::IpAddr>() {
        return Ok(std::net::SocketAddr::new(ip, 53));
    }
    v.parse()
        .map_err(|_| format!("{v:?} is not an IP address or IP:PORT"))
}

/// `[cdr]`: where CDRs go, if anywhere, and how.
fn cdr(sections: &Sections) -> Result<Option<crate::cdr::CdrConfig>, ConfigError> {
    let s = sections.section("cdr", CDR_KEYS)?;
    let Some(dir) = s.string("dir") else {
        return Ok(None);
    };
    let rotate = s.duration("rotate")?;
    if rotate < std::time::Duration::from_secs(1) || rotate > std::time::Duration::from_secs(86_400)
    {
        return Err(s.err("rotate", s.raw("rotate"), "expected 1s to 24h"));
    }
    let ack_timeout = s.duration("ack_timeout")?;
    if ack_timeout.is_zero() || ack_timeout > std::time::Duration::from_secs(7 * 86_400) {
        return Err(s.err("ack_timeout", s.raw("ack_timeout"), "expected 1s to 7d"));
    }
    let max_pending = s.count("max_pending", 1)?;
    if max_pending > 10_000_000 {
        return Err(s.err("max_pending", s.raw("max_pending"), "at most 10000000"));
    }
    Ok(Some(crate::cdr::CdrConfig {
        dir: dir.into(),
        rotate,
        ack_timeout,
        max_pending,
        summary: s.boolean("summary")?,
    }))
}

/// `[enum] domain`: the ENUM suffix, if ENUM is on.
fn enum_domain(sections: &Sections) -> Result<Option<String>, ConfigError> {
    let s = sections.section("enum", ENUM_KEYS)?;
    let Some(d) = s.string("domain") else {
        return Ok(None);
    };
    let d = d.trim_end_matches('.').to_ascii_lowercase();
    if !crate::route::valid_domain(&d) || d.starts_with('[') {
        return Err(s.err(
            "domain",
            s.raw("domain"),
            "expected a domain such as e164.arpa",
        ));
    }
    Ok(Some(d))
}

/// `[routes] dynamic` with `max_dynamic_peers` and `[peer_defaults]`.
fn dynamic(
    sections: &Sections,
    warnings: &mut Vec<String>,
) -> Result<(Option<DynamicPeers>, PeerFiles), ConfigError> {
    let r = sections.section("routes", ROUTES_KEYS)?;
    let s = sections.section("peer_defaults", PEER_KEYS)?;
    if let Some(k) = NOT_PEER_DEFAULTS
        .iter()
        .find(|k| s.values.contains_key(**k))
    {
        return Err(s.err(
            k,
            s.raw(k),
            "a dynamic peer's hosts, domain and role are its own, not a default",
        ));
    }
    let (mut defaults, files) = peer(&s, "", warnings)?;
    // A destination found at run time holds no connection while idle,
    // unless the operator says otherwise.
    if !s.values.contains_key("min_connections") {
        defaults.min_connections = 0;
    }
    if !r.boolean("dynamic")? {
        return Ok((None, files));
    }
    let max_peers = r.count("max_dynamic_peers", 1)?;
    Ok((
        Some(DynamicPeers {
            max_peers,
            defaults,
        }),
        files,
    ))
}

/// `[routes]`: `default` as a peer index, `ported_file`, and the
/// numbering plan.
fn routes(
    sections: &Sections,
    peer_index: &impl Fn(&str) -> Option<usize>,
) -> Result<(Option<usize>, Option<PathBuf>, Numbering), ConfigError> {
    let s = sections.section("routes", ROUTES_KEYS)?;
    let digits = |key: &str, most: usize| {
        s.parse(key, |v| {
            let v = v.trim();
            if v.len() > most || !v.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!("expected at most {most} digits"));
            }
            Ok(v.to_string())
        })
    };
    let numbering = Numbering {
        country_code: Some(digits("country_code", 3)?).filter(|c| !c.is_empty()),
        national_prefix: digits("national_prefix", 4)?,
        international_prefix: digits("international_prefix", 4)?,
    };
    if numbering.international_prefix.is_empty() {
        return Err(s.err("international_prefix", "", "must not be empty"));
    }
    if numbering
        .national_prefix
        .starts_with(&numbering.international_prefix)
    {
        return Err(s.err(
            "national_prefix",
            s.raw("national_prefix"),
            "must not start with the international_prefix",
        ));
    }
    let default_peer = match s.string("default") {
        Some(v) => Some(
            peer_index(&v).ok_or_else(|| s.err("default", &v, format!("no peer named {v:?}")))?,
        ),
        None => None,
    };
    Ok((
        default_peer,
        s.string("ported_file").map(PathBuf::from),
        numbering,
    ))
}

/// `[ported]`: number and peer index.
fn ported(
    sections: &Sections,
    peer_index: &impl Fn(&str) -> Option<usize>,
) -> Result<Vec<(String, usize)>, ConfigError> {
    let mut ported = Vec::new();
    for (k, v) in sections.sorted("ported") {
        let number = match Address::parse(&format!("{k}/TYPE=PLMN")).map(|a| a.kind) {
            Ok(AddressKind::Plmn(n)) => n,
            _ => {
                return Err(sections.err(
                    "ported",
                    &k,
                    &v,
                    "key must be a number, + and digits".into(),
                ));
            }
        };
        let peer = peer_index(v.trim())
            .ok_or_else(|| sections.err("ported", &k, &v, format!("no peer named {v:?}")))?;
        ported.push((number, peer));
    }
    Ok(ported)
}

/// `[auth]`'s accounts, and the users file it names as (key, value).
type AuthParts = (Vec<AuthUser>, Option<(String, String)>);

/// `[auth]`: the accounts given in the section, and the users file it
/// names, for the load step.
fn auth(
    sections: &Sections,
    peer_index: &impl Fn(&str) -> Option<usize>,
) -> Result<AuthParts, ConfigError> {
    let mut users = Vec::new();
    let mut users_file = None;
    for (k, v) in sections.sorted("auth") {
        if AUTH_KEYS.iter().any(|(n, _)| *n == k) {
            users_file = Some((k, v));
        } else {
            let user = parse_auth_user(&k, v.trim(), peer_index)
                .map_err(|p| sections.err("auth", &k, "(hidden)", p))?;
            users.push(user);
        }
    }
    Ok((users, users_file))
}

/// The number-portability table: `[ported]` (lines 0) and, when given,
/// the text of the ported file.
pub(super) fn np_table(
    ported: &[(String, usize)],
    file: Option<(&str, &[PeerConfig])>,
) -> Result<NpTable, NpError> {
    let mut b = NpBuilder::new();
    for (number, peer) in ported {
        b.add(number, *peer, 0)?;
    }
    if let Some((text, peers)) = file {
        b.add_file(text, |n| peers.iter().position(|p| p.name == n))?;
    }
    b.build()
}

/// A user name given twice, in the section or the users file.
pub(super) fn duplicate_user(file: &str, users: &[AuthUser]) -> Result<(), ConfigError> {
    let mut names = HashSet::new();
    match users.iter().find(|u| !names.insert(u.name.clone())) {
        Some(dup) => Err(ConfigError::at(
            file,
            "auth",
            &dup.name,
            "(hidden)",
            "user given twice",
        )),
        None => Ok(()),
    }
}
