//! Every key of every section with its default: the one list the parser
//! checks names against and `conf/mm4relay.ini` documents.

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

/// `[routes]` keys and their defaults.
pub const ROUTES_KEYS: &[(&str, &str)] = &[
    ("default", ""),
    ("ported_file", ""),
    ("country_code", ""),
    ("national_prefix", "0"),
    ("international_prefix", "00"),
    ("dynamic", "no"),
    ("max_dynamic_peers", "100"),
];

/// `[dns]` keys and their defaults (servers: resolv.conf's).
pub const DNS_KEYS: &[(&str, &str)] = &[
    ("servers", ""),
    ("timeout", "2s"),
    ("attempts", "2"),
    ("smtp_port", "25"),
];

/// `[cdr]` keys and their defaults (no `dir`: no CDRs).
pub const CDR_KEYS: &[(&str, &str)] = &[
    ("dir", ""),
    ("rotate", "1h"),
    ("ack_timeout", "15m"),
    ("max_pending", "100000"),
    ("summary", "yes"),
];

/// `[enum]` keys and their defaults.
pub const ENUM_KEYS: &[(&str, &str)] = &[("domain", "")];

/// Peer keys `[peer_defaults]` may not set: what a dynamic peer takes
/// from DNS and its domain, or what only a configured peer can be.
pub const NOT_PEER_DEFAULTS: &[&str] = &["hosts", "domains", "prefixes", "local", "accept_from"];

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
    ("chunking", "yes"),
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
    ("rcpt_format", "as_received"),
    ("auth_user", ""),
    ("auth_password", ""),
    ("auth_plaintext", "no"),
];
