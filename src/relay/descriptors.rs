//! Open-file descriptors: what the configuration may need at once, against
//! the soft RLIMIT_NOFILE. Out of descriptors, the relay can accept no
//! session and open no spool segment, so at start it raises the soft limit
//! up to the hard one when it is short, and warns when even that is not
//! enough (the common default is 1024).

use log::{info, warn};

use crate::config::Config;
use crate::ops::metrics;

/// Descriptors besides sessions, peer connections and metrics: spool
/// segments and side files, the log, the control socket and its clients,
/// the listening sockets, the standard streams.
pub const MARGIN: u64 = 64;

/// What `config` may need at once, part by part, each with what it is.
pub fn needs(config: &Config) -> Vec<(u64, &'static str)> {
    let metrics = match config.relay.metrics_listen {
        Some(_) => metrics::MAX_CONNECTIONS as u64,
        None => 0,
    };
    vec![
        // A session holds its socket and the clone the listener keeps to
        // stop it.
        (
            2 * config.listener.max_sessions as u64,
            "2 per session (max_sessions)",
        ),
        (
            2 * config.listener.max_local_sessions as u64,
            "2 per local MMSC session (max_local_sessions)",
        ),
        (
            config.peers.iter().map(|p| p.max_connections as u64).sum(),
            "1 per peer connection (max_connections)",
        ),
        (metrics, "metrics connections"),
        (MARGIN, "spool, log and sockets"),
    ]
}

/// The soft limit to ask for when `soft` is below `need`: the `hard`
/// limit, or just `need` when the hard limit is infinite (the kernel
/// refuses an infinite soft limit on open files). `None` when `soft` will
/// do, or is at the hard limit already.
fn raised(need: u64, soft: u64, hard: u64) -> Option<u64> {
    let target = if hard == libc::RLIM_INFINITY {
        need
    } else {
        hard
    };
    (soft < need && soft < target).then_some(target)
}

/// Makes the soft limit on open files cover what `config` needs, as far
/// as the hard limit allows; logs a warning naming the limit, the need
/// and how to raise it when it still falls short.
pub fn raise_limit(config: &Config) {
    let parts = needs(config);
    let need: u64 = parts.iter().map(|(n, _)| n).sum();
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: limit is a valid rlimit for the call to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        warn!(
            "cannot read the open files limit: {}",
            std::io::Error::last_os_error()
        );
        return;
    }
    let mut soft = limit.rlim_cur;
    if let Some(target) = raised(need, soft, limit.rlim_max) {
        limit.rlim_cur = target;
        // SAFETY: limit is a valid rlimit; a soft limit up to the hard one
        // needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } == 0 {
            info!("open files limit raised from {soft} to {target}");
            soft = target;
        }
    }
    if soft < need {
        let detail: Vec<String> = parts
            .iter()
            .filter(|(n, _)| *n > 0)
            .map(|(n, what)| format!("{n} for {what}"))
            .collect();
        warn!(
            "open files limit (RLIMIT_NOFILE) is {soft}, but this configuration may need {need} \
             ({}): sessions and deliveries will fail when it runs out; raise it (LimitNOFILE= \
             in the systemd unit, ulimit -n in the init script)",
            detail.join(", ")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config(extra_relay: &str) -> Config {
        let ini = format!(
            "[relay]\n{extra_relay}\n[listener]\nlisten = 127.0.0.1:0\nmax_sessions = 200\n\
             [peer.A]\nhosts = 127.0.0.1:1\ndomains = a.test\nmax_connections = 4\n\
             [peer.B]\nhosts = 127.0.0.1:2\ndomains = b.test\nmax_connections = 10\n"
        );
        Config::parse(&ini, Path::new("test.ini")).unwrap()
    }

    fn total(config: &Config) -> u64 {
        needs(config).iter().map(|(n, _)| n).sum()
    }

    #[test]
    fn sessions_twice_peers_once_metrics_by_its_cap_and_a_margin() {
        assert_eq!(total(&config("")), 2 * (200 + 100) + (4 + 10) + MARGIN);
        assert_eq!(
            total(&config("metrics_listen = 127.0.0.1:0")),
            2 * (200 + 100) + (4 + 10) + metrics::MAX_CONNECTIONS as u64 + MARGIN
        );
    }

    #[test]
    fn the_soft_limit_goes_up_to_the_hard_one_only_when_short() {
        assert_eq!(raised(500, 1024, 4096), None);
        assert_eq!(raised(500, 500, 4096), None);
        assert_eq!(raised(2000, 1024, 4096), Some(4096));
        // Short even at the hard limit: as far as it goes (then a warning).
        assert_eq!(raised(8000, 1024, 4096), Some(4096));
        assert_eq!(raised(8000, 4096, 4096), None);
        assert_eq!(raised(2000, 1024, libc::RLIM_INFINITY), Some(2000));
    }
}
