//! The hosts of a peer: configured `host:port`s, or a domain's MX
//! exchanges found through the relay's resolver (`hosts = mx:DOMAIN`).
//! Each host is marked down on its own when it fails, so the next
//! connection tries the working ones first (in configured or MX order)
//! and the failed ones last, soonest retry first.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use log::warn;
use parking_lot::Mutex;

use crate::dns::{MxError, Resolver};

/// The relay's resolver and the port of hosts it finds.
#[derive(Clone, Debug)]
pub struct Dns {
    /// The resolver every peer shares.
    pub resolver: Arc<Resolver>,
    /// `[dns] smtp_port` (a reload may change it).
    pub smtp_port: Arc<AtomicU16>,
}

/// One host to try.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Host {
    /// `name:port`, as the log and TLS know it.
    pub name: String,
    /// Its addresses when DNS found them; `None`: the system resolves
    /// `name` at connect time.
    pub addrs: Option<Vec<SocketAddr>>,
}

#[derive(Debug)]
enum Source {
    Static(Vec<String>),
    Mx { domain: String, dns: Dns },
}

#[derive(Debug, Default)]
struct State {
    /// The hosts the last MX look-up gave (kept if DNS then fails).
    found: Vec<Host>,
    /// Per host name: down until, and the current backoff.
    down: HashMap<String, (Instant, Duration)>,
}

/// A peer's hosts and their failure marks.
#[derive(Debug)]
pub struct Hosts {
    source: Source,
    state: Mutex<State>,
    min: Duration,
    max: Duration,
}

impl Hosts {
    /// Configured `names`, all up; a failed host waits `min`, doubling to
    /// `max`.
    pub fn new(names: Vec<String>, min: Duration, max: Duration) -> Hosts {
        Hosts {
            source: Source::Static(names),
            state: Mutex::default(),
            min,
            max,
        }
    }

    /// `domain`'s MX exchanges, looked up through `dns` (the cache keeps
    /// them for their TTL).
    pub fn mx(domain: String, dns: Dns, min: Duration, max: Duration) -> Hosts {
        Hosts {
            source: Source::Mx { domain, dns },
            state: Mutex::default(),
            min,
            max,
        }
    }

    /// What the configuration says: `host:port, ...` or `mx:DOMAIN`.
    pub fn describe(&self) -> String {
        match &self.source {
            Source::Static(names) => names.join(","),
            Source::Mx { domain, .. } => format!("mx:{domain}"),
        }
    }

    /// The hosts to try now, in order; for an MX peer, why there are none.
    /// When DNS fails, the hosts it gave last are tried again.
    pub fn order(&self) -> Result<Vec<Host>, String> {
        let mut hosts = match &self.source {
            Source::Static(names) => names
                .iter()
                .map(|n| Host {
                    name: n.clone(),
                    addrs: None,
                })
                .collect(),
            Source::Mx { domain, dns } => {
                let port = dns.smtp_port.load(Ordering::Relaxed);
                match dns.resolver.mx_targets(domain, port) {
                    Ok(targets) => {
                        let hosts: Vec<Host> = targets
                            .into_iter()
                            .map(|t| Host {
                                name: format!("{}:{port}", t.name),
                                addrs: Some(t.addrs),
                            })
                            .collect();
                        let mut state = self.state.lock();
                        state.down.retain(|n, _| hosts.iter().any(|h| &h.name == n));
                        state.found = hosts.clone();
                        hosts
                    }
                    Err(MxError::NotFound) => {
                        return Err(format!("mx:{domain}: no such mail domain"));
                    }
                    Err(MxError::Failed(e)) => {
                        let found = self.state.lock().found.clone();
                        if found.is_empty() {
                            return Err(format!("mx:{domain}: {e}"));
                        }
                        warn!("mx:{domain}: {e}; trying the hosts it gave last");
                        found
                    }
                }
            }
        };
        let state = self.state.lock();
        let now = Instant::now();
        hosts.sort_by_key(|h| match state.down.get(&h.name) {
            Some(&(until, _)) if until > now => (1, until),
            _ => (0, now),
        });
        Ok(hosts)
    }

    /// Host `name` answered.
    pub fn up(&self, name: &str) {
        self.state.lock().down.remove(name);
    }

    /// Host `name` failed.
    pub fn failed(&self, name: &str) {
        let mut state = self.state.lock();
        let backoff = state
            .down
            .get(name)
            .map_or(self.min, |(_, b)| (*b * 2).min(self.max));
        state
            .down
            .insert(name.to_string(), (Instant::now() + backoff, backoff));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(h: &Hosts) -> Vec<String> {
        h.order().unwrap().into_iter().map(|h| h.name).collect()
    }

    #[test]
    fn failed_hosts_go_last_until_they_answer() {
        let h = Hosts::new(
            vec!["a:25".into(), "b:25".into(), "c:25".into()],
            Duration::from_secs(1),
            Duration::from_secs(4),
        );
        assert_eq!(names(&h), ["a:25", "b:25", "c:25"]);
        h.failed("a:25");
        assert_eq!(names(&h), ["b:25", "c:25", "a:25"]);
        h.failed("b:25");
        assert_eq!(names(&h), ["c:25", "a:25", "b:25"]);
        h.up("a:25");
        assert_eq!(names(&h), ["a:25", "c:25", "b:25"]);
        assert_eq!(h.describe(), "a:25,b:25,c:25");
    }
}
