//! The relay's own stub resolver: MX and address look-ups for peers whose
//! hosts come from DNS (`hosts = mx:DOMAIN`), NAPTR for ENUM, each answer
//! cached for its TTL. Queries go to `[dns] servers` (resolv.conf's by
//! default) over UDP, and over TCP when the answer is truncated; a
//! look-up ends within `timeout` × `attempts` × servers, and so does a
//! domain's MX look-up with its exchanges' addresses (the first ten).
//!
//! `transport.rs` is the socket I/O, `cache.rs` the TTL cache, `naptr.rs`
//! ENUM's rules with no I/O, `server.rs` a small authoritative server for
//! the tests and the demo. The wire format is hickory-proto's, built with
//! no async runtime. This part uses `route` (for domain syntax) and `sys`.

mod cache;
pub mod naptr;
pub mod server;
mod transport;

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use log::{info, warn};
use parking_lot::Mutex;

use cache::{Cache, NEGATIVE_TTL};

/// Most MX exchanges of a domain that are looked up and tried.
pub const MAX_EXCHANGES: usize = 10;

/// Most addresses kept per host.
pub const MAX_ADDRESSES: usize = 8;

/// Most records of one answer kept (a TCP answer may hold thousands).
pub const MAX_RECORDS: usize = 32;

/// Most CNAME links followed within one answer.
const MAX_CNAMES: usize = 8;

/// After an ENUM failure, how long numbers go straight to the static
/// rules before ENUM is asked again: an outage costs one timeout per
/// hold-down, not one per recipient.
pub const ENUM_HOLD_DOWN: Duration = Duration::from_secs(30);

/// How the resolver asks (`[dns]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// The servers, asked in turn.
    pub servers: Vec<SocketAddr>,
    /// Wait for one answer from one server.
    pub timeout: Duration,
    /// Rounds over all the servers before a look-up fails.
    pub attempts: u32,
}

/// Why a look-up got no answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DnsError {
    /// No server answered in time.
    Timeout,
    /// A server answered with an error code (SERVFAIL, REFUSED, ...).
    Server(String),
    /// A socket error.
    Io(String),
    /// An answer that could not be read, or a name that cannot be asked.
    Malformed(String),
}

impl fmt::Display for DnsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DnsError::Timeout => f.write_str("DNS timeout"),
            DnsError::Server(code) => write!(f, "DNS server said {code}"),
            DnsError::Io(e) => write!(f, "DNS: {e}"),
            DnsError::Malformed(e) => write!(f, "DNS: {e}"),
        }
    }
}

impl std::error::Error for DnsError {}

/// An answer, as cached.
#[derive(Debug, PartialEq)]
pub enum Answer {
    /// The records of the asked type.
    Records(Vec<RData>),
    /// The name does not exist.
    NxDomain,
    /// The name exists, without records of that type.
    NoData,
}

/// One host found through DNS: its name (for TLS and the log) and its
/// addresses, with the port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// The exchange's name, without the final dot.
    pub name: String,
    /// Its addresses, IPv4 first.
    pub addrs: Vec<SocketAddr>,
}

/// Why a domain has no hosts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MxError {
    /// It does not exist, says it takes no mail (a null MX), or none of its
    /// exchanges has an address.
    NotFound,
    /// DNS failed: try again later.
    Failed(DnsError),
}

impl fmt::Display for MxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MxError::NotFound => f.write_str("no such mail domain"),
            MxError::Failed(e) => e.fmt(f),
        }
    }
}

/// Counters, for status and metrics.
#[derive(Debug, Default)]
pub struct Stats {
    /// Queries sent to a server (a TCP retry counts again).
    pub queries: AtomicU64,
    /// Look-ups answered from the cache.
    pub cache_hits: AtomicU64,
    /// Look-ups that failed: no server answered in time, or each said an
    /// error (SERVFAIL, REFUSED), or the name could not be asked.
    pub failures: AtomicU64,
    /// Queries no server answered in time.
    pub timeouts: AtomicU64,
    /// Answers that came truncated and were asked again over TCP.
    pub tcp_retries: AtomicU64,
    /// ENUM look-ups (cache hits included).
    pub enum_lookups: AtomicU64,
    /// ENUM look-ups that gave a domain.
    pub enum_answers: AtomicU64,
    /// ENUM look-ups that failed (timeout, SERVFAIL): the static rules route.
    pub enum_failures: AtomicU64,
}

impl Stats {
    /// The counters by name, as status and metrics show them.
    pub fn counts(&self) -> [(&'static str, u64); 8] {
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            ("queries", n(&self.queries)),
            ("cache_hits", n(&self.cache_hits)),
            ("failures", n(&self.failures)),
            ("timeouts", n(&self.timeouts)),
            ("tcp_retries", n(&self.tcp_retries)),
            ("enum_lookups", n(&self.enum_lookups)),
            ("enum_answers", n(&self.enum_answers)),
            ("enum_failures", n(&self.enum_failures)),
        ]
    }
}

/// The resolver: its settings, cache and counters; shared by every thread.
#[derive(Debug)]
pub struct Resolver {
    settings: Mutex<Arc<Settings>>,
    cache: Mutex<Cache>,
    /// What ENUM made of each cached NAPTR answer (the domain, or none),
    /// kept as long as the answer: a hit compiles no regexp.
    enum_results: Mutex<Cache<Option<String>>>,
    stats: Stats,
    /// ENUM is failing now: said once when it starts, once when it ends.
    enum_failing: AtomicBool,
    /// Until when ENUM is not asked after a failure.
    enum_held_until: Mutex<Option<Instant>>,
}

/// What a server's answer to a query for `name` and `rtype` says, and for
/// how long (no I/O): the records of that type owned by `name` or the
/// CNAME chain from it (at most [`MAX_RECORDS`]) with their smallest TTL,
/// NXDOMAIN or no such record for the SOA minimum, or the server's error.
pub fn read_answer(
    m: &Message,
    name: &Name,
    rtype: RecordType,
) -> Result<(Answer, Duration), DnsError> {
    match m.metadata.response_code {
        ResponseCode::NoError => {}
        ResponseCode::NXDomain => return Ok((Answer::NxDomain, negative_ttl(m))),
        code => return Err(DnsError::Server(code.to_string())),
    }
    let mut owners = vec![name.to_lowercase()];
    for _ in 0..MAX_CNAMES {
        let next = m.answers.iter().find_map(|r| match &r.data {
            RData::CNAME(c) if owners.contains(&r.name.to_lowercase()) => {
                Some(c.0.to_lowercase()).filter(|t| !owners.contains(t))
            }
            _ => None,
        });
        match next {
            Some(t) => owners.push(t),
            None => break,
        }
    }
    let records: Vec<&Record> = m
        .answers
        .iter()
        .filter(|r| r.record_type() == rtype && owners.contains(&r.name.to_lowercase()))
        .take(MAX_RECORDS)
        .collect();
    if records.is_empty() {
        return Ok((Answer::NoData, negative_ttl(m)));
    }
    let ttl = records.iter().map(|r| r.ttl).min().unwrap_or(0);
    let data = records.into_iter().map(|r| r.data.clone()).collect();
    Ok((Answer::Records(data), Duration::from_secs(u64::from(ttl))))
}

/// The TTL to keep a negative answer for: the SOA's minimum (no more
/// than the SOA record's own TTL), RFC 2308 §5.
fn negative_ttl(m: &Message) -> Duration {
    m.authorities
        .iter()
        .find_map(|r| match &r.data {
            RData::SOA(soa) => Some(Duration::from_secs(u64::from(soa.minimum.min(r.ttl)))),
            _ => None,
        })
        .unwrap_or(NEGATIVE_TTL)
}

impl Resolver {
    /// A resolver asking as `settings` say.
    pub fn new(settings: Settings) -> Resolver {
        Resolver {
            settings: Mutex::new(Arc::new(settings)),
            cache: Mutex::default(),
            enum_results: Mutex::default(),
            stats: Stats::default(),
            enum_failing: AtomicBool::new(false),
            enum_held_until: Mutex::new(None),
        }
    }

    /// Asks as `settings` say from now on (a reload); what is cached stays.
    pub fn set_settings(&self, settings: Settings) {
        *self.settings.lock() = Arc::new(settings);
    }

    /// Its counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Names held in the cache.
    pub fn cached(&self) -> usize {
        self.cache.lock().len()
    }

    /// The answer for `name` and `rtype`, from the cache while it is fresh.
    pub fn lookup(&self, name: &str, rtype: RecordType) -> Result<Arc<Answer>, DnsError> {
        let key = name.trim_end_matches('.').to_ascii_lowercase();
        Ok(self.lookup_until(&key, rtype, None)?.0)
    }

    /// Longest one look-up may take: `timeout` x `attempts` x servers.
    pub fn budget(&self) -> Duration {
        let s = self.settings.lock().clone();
        s.timeout * s.attempts.max(1) * u32::try_from(s.servers.len().max(1)).unwrap_or(u32::MAX)
    }

    /// As [`Resolver::lookup`] for a lower-case name without the final
    /// dot, asking no server after `until`; also when the answer expires
    /// from the cache (`None`: it was not kept).
    fn lookup_until(
        &self,
        key: &str,
        rtype: RecordType,
        until: Option<Instant>,
    ) -> Result<(Arc<Answer>, Option<Instant>), DnsError> {
        let now = Instant::now();
        if let Some((a, expires)) = self.cache.lock().get(key, rtype, now) {
            self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
            return Ok((a, Some(expires)));
        }
        let fqdn = Name::from_ascii(format!("{key}."))
            .map_err(|e| DnsError::Malformed(format!("{key}: {e}")))?;
        let result = self.ask(&fqdn, rtype, until);
        let (answer, ttl) = match result {
            Ok(v) => v,
            Err(e) => {
                self.stats.failures.fetch_add(1, Ordering::Relaxed);
                return Err(e);
            }
        };
        let answer = Arc::new(answer);
        let now = Instant::now();
        self.cache.lock().put(key, rtype, answer.clone(), ttl, now);
        Ok((
            answer,
            (!ttl.is_zero()).then(|| now + ttl.min(cache::MAX_TTL)),
        ))
    }

    /// Asks the servers in turn, `attempts` rounds, none after `until`:
    /// the answer and its TTL.
    fn ask(
        &self,
        name: &Name,
        rtype: RecordType,
        until: Option<Instant>,
    ) -> Result<(Answer, Duration), DnsError> {
        let settings = self.settings.lock().clone();
        let mut last = DnsError::Io("no DNS servers".into());
        for _ in 0..settings.attempts.max(1) {
            for &server in &settings.servers {
                let mut query = Message::query();
                query.metadata.recursion_desired = true;
                query.add_query(Query::query(name.clone(), rtype));
                self.stats.queries.fetch_add(1, Ordering::Relaxed);
                let now = Instant::now();
                let deadline = now + settings.timeout;
                let deadline = until.map_or(deadline, |u| deadline.min(u));
                if deadline <= now {
                    self.stats.timeouts.fetch_add(1, Ordering::Relaxed);
                    return Err(DnsError::Timeout);
                }
                let m = match transport::exchange(server, &query, deadline) {
                    Ok((m, via_tcp)) => {
                        if via_tcp {
                            self.stats.tcp_retries.fetch_add(1, Ordering::Relaxed);
                            self.stats.queries.fetch_add(1, Ordering::Relaxed);
                        }
                        m
                    }
                    Err(e) => {
                        if e == DnsError::Timeout {
                            self.stats.timeouts.fetch_add(1, Ordering::Relaxed);
                        }
                        last = e;
                        continue;
                    }
                };
                match read_answer(&m, name, rtype) {
                    Ok(answer) => return Ok(answer),
                    Err(e) => last = e,
                }
            }
        }
        Err(last)
    }

    /// The addresses of `host`, IPv4 first, each with `port`; `Ok(None)`
    /// if it has none.
    fn addresses(
        &self,
        host: &str,
        port: u16,
        until: Instant,
    ) -> Result<Option<Vec<SocketAddr>>, DnsError> {
        let mut addrs = Vec::new();
        let mut exists = false;
        for rtype in [RecordType::A, RecordType::AAAA] {
            match &*self.lookup_until(host, rtype, Some(until))?.0 {
                Answer::Records(rs) => {
                    exists = true;
                    addrs.extend(rs.iter().filter_map(|r| match r {
                        RData::A(a) => Some(SocketAddr::new(IpAddr::V4(a.0), port)),
                        RData::AAAA(a) => Some(SocketAddr::new(IpAddr::V6(a.0), port)),
                        _ => None,
                    }));
                }
                Answer::NoData => exists = true,
                // No AAAA is asked for a name that has no A: it does not exist.
                Answer::NxDomain => return Ok(None),
            }
        }
        addrs.truncate(MAX_ADDRESSES);
        Ok((exists && !addrs.is_empty()).then_some(addrs))
    }

    /// The hosts mail for `domain` goes to, in MX preference order, each
    /// with its addresses and `port` (RFC 5321 §5.1): with no MX record,
    /// the domain itself; a null MX (RFC 7505) means none. The first
    /// [`MAX_EXCHANGES`] exchanges are looked up, all within one
    /// [`Resolver::budget`].
    pub fn mx_targets(&self, domain: &str, port: u16) -> Result<Vec<Target>, MxError> {
        let until = Instant::now() + self.budget();
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        let mut exchanges: Vec<(u16, String)> = match &*self
            .lookup_until(&domain, RecordType::MX, Some(until))
            .map_err(MxError::Failed)?
            .0
        {
            Answer::NxDomain => return Err(MxError::NotFound),
            Answer::NoData => vec![(0, domain.to_string())],
            Answer::Records(rs) => rs
                .iter()
                .filter_map(|r| match r {
                    RData::MX(mx) => Some((
                        mx.preference,
                        mx.exchange
                            .to_ascii()
                            .trim_end_matches('.')
                            .to_ascii_lowercase(),
                    )),
                    _ => None,
                })
                .collect(),
        };
        if exchanges.iter().any(|(_, e)| e.is_empty()) {
            return Err(MxError::NotFound);
        }
        exchanges.sort();
        let mut seen = std::collections::HashSet::new();
        exchanges.retain(|(_, name)| seen.insert(name.clone()));
        exchanges.truncate(MAX_EXCHANGES);
        let mut targets = Vec::new();
        let mut failure = None;
        for (_, name) in exchanges {
            match self.addresses(&name, port, until) {
                Ok(Some(addrs)) => targets.push(Target { name, addrs }),
                Ok(None) => {}
                Err(e) => failure = Some(e),
            }
        }
        match (targets.is_empty(), failure) {
            (true, Some(e)) => Err(MxError::Failed(e)),
            (true, None) => Err(MxError::NotFound),
            _ => Ok(targets),
        }
    }

    /// The domain ENUM gives `number` (`+` and digits) under `suffix`:
    /// `Ok(None)` for no such number or no usable record, `Err` when DNS
    /// failed (counted, and logged once per change of state).
    pub fn enum_domain(&self, number: &str, suffix: &str) -> Result<Option<String>, DnsError> {
        self.stats.enum_lookups.fetch_add(1, Ordering::Relaxed);
        let name = naptr::enum_name(number, suffix);
        let key = name.trim_end_matches('.').to_ascii_lowercase();
        let now = Instant::now();
        if let Some((domain, _)) = self.enum_results.lock().get(&key, RecordType::NAPTR, now) {
            self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
            if domain.is_some() {
                self.stats.enum_answers.fetch_add(1, Ordering::Relaxed);
            }
            return Ok((*domain).clone());
        }
        if self.enum_held_until.lock().is_some_and(|u| now < u) {
            self.stats.enum_failures.fetch_add(1, Ordering::Relaxed);
            return Err(DnsError::Server("ENUM held down after a failure".into()));
        }
        match self.lookup_until(&key, RecordType::NAPTR, None) {
            Ok((answer, expires)) => {
                *self.enum_held_until.lock() = None;
                if self.enum_failing.swap(false, Ordering::Relaxed) {
                    info!("ENUM answers again");
                }
                let Answer::Records(rs) = &*answer else {
                    return Ok(None);
                };
                let domain = naptr::best_domain(&naptr::naptrs(rs), number);
                if domain.is_some() {
                    self.stats.enum_answers.fetch_add(1, Ordering::Relaxed);
                }
                if let Some(expires) = expires {
                    let ttl = expires.saturating_duration_since(now);
                    let kept = Arc::new(domain.clone());
                    self.enum_results
                        .lock()
                        .put(&key, RecordType::NAPTR, kept, ttl, now);
                }
                Ok(domain)
            }
            Err(e) => {
                self.stats.enum_failures.fetch_add(1, Ordering::Relaxed);
                *self.enum_held_until.lock() = Some(Instant::now() + ENUM_HOLD_DOWN);
                if !self.enum_failing.swap(true, Ordering::Relaxed) {
                    warn!(
                        "ENUM fails ({e}): numbers are routed by the static rules; ENUM is asked \
                         again every {}s until it answers",
                        ENUM_HOLD_DOWN.as_secs()
                    );
                }
                Err(e)
            }
        }
    }
}
