//! What the in-process benches with three simulated MMSCs share.

/// A, B and C as the benches route them: name, domain, number prefix.
pub const PEERS: [(&str, &str, &str); 3] = [
    ("A", "mms.mnc010.mcc001.gprs", "+447700900"),
    ("B", "mms.mnc020.mcc001.gprs", "+1202555"),
    ("C", "mms.mnc456.mcc999.gprs", "+61491570"),
];

/// The number in environment variable `name`, else `default`.
pub fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
