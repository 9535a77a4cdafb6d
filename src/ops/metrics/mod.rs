//! Prometheus metrics over HTTP (`[relay] metrics_listen`, off when
//! empty): `GET /metrics` answers the text exposition format.
//!
//! Per peer: recipients by outcome, connections opened, a histogram of
//! delivery delay, and gauges for pool depth, overflow, jobs waiting for a
//! retry, allowance, open and busy connections, health. Inbound: sessions,
//! messages accepted, duplicates, refusals by reason. Spool: bytes and
//! queued messages. [`render`] writes the text; `http` serves it, with a
//! fixed cap on the connections it holds ([`MAX_CONNECTIONS`]) so that
//! idle clients cannot take the descriptors the SMTP side needs.

mod http;

use std::fmt::Write as _;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use log::info;

use crate::cdr::{EVENTS, LedgerStats};
use crate::config::PortedLoad;
use crate::inbound::InboundStats;
use crate::ops::control::Sources;
use crate::peer::{DELAY_BUCKETS, PeerSnapshot, PeerView};
use crate::spool::SpoolStats;

/// Connections the metrics server holds at most, served or waiting: what
/// it may cost in descriptors, besides its listening socket.
pub const MAX_CONNECTIONS: usize = http::MAX_CONNECTIONS;

/// The metrics HTTP server and its threads.
pub struct MetricsServer(http::Server);

impl MetricsServer {
    /// Listens on `addr` and serves `/metrics`.
    pub fn start(addr: SocketAddr, sources: Sources) -> io::Result<MetricsServer> {
        let server =
            http::Server::start(addr, http::Limits::default(), move || render(&sources))
                .map_err(|e| io::Error::new(e.kind(), format!("metrics_listen {addr}: {e}")))?;
        info!("metrics at http://{}/metrics", server.local_addr());
        Ok(MetricsServer(server))
    }

    /// Where it listens (with the real port when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.0.local_addr()
    }

    /// Stops serving and joins its threads (dropping it does the same).
    pub fn stop(self) {
        self.0.stop();
    }
}

/// One metric family: name, type, help, and its samples as (labels, value).
struct Family {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    samples: Vec<(String, u64)>,
}

impl Family {
    fn new(name: &'static str, kind: &'static str, help: &'static str) -> Family {
        Family {
            name,
            kind,
            help,
            samples: Vec::new(),
        }
    }

    /// The family with one unlabelled sample.
    fn single(name: &'static str, kind: &'static str, help: &'static str, v: u64) -> Family {
        let mut f = Family::new(name, kind, help);
        f.samples.push((String::new(), v));
        f
    }

    /// The family with one sample per peer, read off its snapshot.
    fn per_peer(
        name: &'static str,
        kind: &'static str,
        help: &'static str,
        peers: &[PeerSnapshot],
        get: impl Fn(&PeerSnapshot) -> u64,
    ) -> Family {
        let mut f = Family::new(name, kind, help);
        for s in peers {
            f.samples.push((format!("{{peer=\"{}\"}}", s.name), get(s)));
        }
        f
    }

    fn write(&self, out: &mut String) {
        let name = self.name;
        let _ = writeln!(
            out,
            "# HELP {name} {}\n# TYPE {name} {}",
            self.help, self.kind
        );
        for (labels, v) in &self.samples {
            let _ = writeln!(out, "{name}{labels} {v}");
        }
    }
}

/// The exposition text.
pub fn render(sources: &Sources) -> String {
    let mut out = String::with_capacity(4096);
    let views = sources.peers.list();
    let peers: Vec<PeerSnapshot> = views.iter().map(|p| p.snapshot(&sources.queue)).collect();
    for f in peer_families(&peers) {
        f.write(&mut out);
    }
    delay_histograms(&mut out, &views, &peers);
    for f in inbound_families(&sources.inbound) {
        f.write(&mut out);
    }
    for f in spool_families(&sources.spool.stats()) {
        f.write(&mut out);
    }
    let mut queued = Family::new(
        "mm4relay_queued_messages",
        "gauge",
        "Messages queued at each peer.",
    );
    for (i, s) in peers.iter().enumerate() {
        let labels = format!("{{peer=\"{}\"}}", s.name);
        queued
            .samples
            .push((labels, sources.queue.queued_len(i) as u64));
    }
    queued.write(&mut out);
    ported_families(&mut out, &sources.intake.ported_load());
    let resolver = sources.intake.resolver();
    let mut dns = Family::new(
        "mm4relay_dns_total",
        "counter",
        "The resolver's queries, cache hits, failures and timeouts, and ENUM look-ups.",
    );
    for (kind, n) in resolver.stats().counts() {
        dns.samples.push((format!("{{kind=\"{kind}\"}}"), n));
    }
    dns.write(&mut out);
    let _ = writeln!(
        out,
        "# HELP mm4relay_dns_cached_names Names held in the resolver's cache.\n\
         # TYPE mm4relay_dns_cached_names gauge\nmm4relay_dns_cached_names {}",
        resolver.cached()
    );
    if let Some(c) = &sources.cdr {
        cdr_families(&mut out, c);
    }
    out
}

/// CDR rows by event, and per peer the RESs by status, the missing ones
/// and their latency.
fn cdr_families(out: &mut String, c: &LedgerStats) {
    let mut rows = Family::new(
        "mm4relay_cdr_rows_total",
        "counter",
        "CDR rows written, by event.",
    );
    for (e, n) in EVENTS.iter().zip(&c.rows) {
        rows.samples
            .push((format!("{{event=\"{e}\"}}"), n.load(Ordering::Relaxed)));
    }
    rows.write(out);
    for f in singles([
        (
            "mm4relay_cdr_waiting",
            "gauge",
            "forward.REQs waiting for their MM4_forward.RES.",
            c.waiting.load(Ordering::Relaxed),
        ),
        (
            "mm4relay_cdr_files_closed_total",
            "counter",
            "CDR files closed since start.",
            c.files_closed.load(Ordering::Relaxed),
        ),
        (
            "mm4relay_cdr_write_errors_total",
            "counter",
            "Failed writes or flushes of the CDR files or checkpoint.",
            c.write_errors.load(Ordering::Relaxed),
        ),
    ]) {
        f.write(out);
    }
    let peers = c.peers.lock();
    let mut asked = Family::new(
        "mm4relay_res_asked_total",
        "counter",
        "Recipients of forward.REQs taken by the peer that asked for a RES.",
    );
    let mut res = Family::new(
        "mm4relay_res_total",
        "counter",
        "MM4_forward.RES matched to a forward.REQ, per recipient, by status.",
    );
    let mut missing = Family::new(
        "mm4relay_res_missing_total",
        "counter",
        "forward.REQ recipients whose RES did not come within ack_timeout (or the cap pushed out).",
    );
    for (peer, a) in peers.iter() {
        let peer = label(peer);
        asked
            .samples
            .push((format!("{{peer=\"{peer}\"}}"), a.asked));
        missing
            .samples
            .push((format!("{{peer=\"{peer}\"}}"), a.missing));
        for (status, n) in &a.answered {
            res.samples
                .push((format!("{{peer=\"{peer}\",status=\"{status}\"}}"), *n));
        }
    }
    for f in [asked, res, missing] {
        f.write(out);
    }
    histograms(
        out,
        "mm4relay_res_latency_seconds",
        "The peer's 250 for a forward.REQ to its MM4_forward.RES.",
        peers
            .iter()
            .map(|(peer, a)| (peer.as_str(), a.latency.read())),
    );
}

/// A histogram family of one series per peer: (peer, (counts, sum)).
fn histograms<'a>(
    out: &mut String,
    name: &str,
    help: &str,
    series: impl Iterator<Item = (&'a str, ([u64; 9], f64))>,
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    for (peer, (counts, sum)) in series {
        let peer = label(peer);
        for (bound, n) in DELAY_BUCKETS.iter().zip(counts) {
            let _ = writeln!(out, "{name}_bucket{{peer=\"{peer}\",le=\"{bound}\"}} {n}");
        }
        let total = counts[DELAY_BUCKETS.len()];
        let _ = writeln!(out, "{name}_bucket{{peer=\"{peer}\",le=\"+Inf\"}} {total}");
        let _ = writeln!(out, "{name}_sum{{peer=\"{peer}\"}} {sum}");
        let _ = writeln!(out, "{name}_count{{peer=\"{peer}\"}} {total}");
    }
}

/// A label value with `\\`, `"` and newlines escaped.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The number-portability table in force: entries, and how its load went.
fn ported_families(out: &mut String, p: &PortedLoad) {
    let at =
        p.at.and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0.0, |d| d.as_secs_f64());
    for (name, help, v) in [
        (
            "mm4relay_ported_entries",
            "Number-portability entries in force.",
            p.entries as f64,
        ),
        (
            "mm4relay_ported_load_seconds",
            "Seconds the ported file in force took to load.",
            p.seconds,
        ),
        (
            "mm4relay_ported_loaded_timestamp_seconds",
            "When the table in force was loaded (Unix time).",
            at,
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
    }
}

/// The per-peer counters and gauges.
fn peer_families(peers: &[PeerSnapshot]) -> Vec<Family> {
    let mut recipients = Family::new(
        "mm4relay_recipients_total",
        "counter",
        "Recipients by outcome at each peer.",
    );
    for s in peers {
        for (outcome, n) in [
            ("sent", s.sent),
            ("deferred", s.deferred),
            ("failed", s.failed),
        ] {
            let labels = format!("{{peer=\"{}\",outcome=\"{outcome}\"}}", s.name);
            recipients.samples.push((labels, n));
        }
    }
    type Get = fn(&PeerSnapshot) -> u64;
    #[rustfmt::skip]
    let series: [(&'static str, &'static str, &'static str, Get); 13] = [
        ("mm4relay_connections_opened_total", "counter", "SMTP connections opened to each peer.", |s| s.connections_opened),
        ("mm4relay_connections_failed_total", "counter", "Connection attempts to each peer's hosts that failed (connect, greeting, TLS, AUTH).", |s| s.connections_failed),
        ("mm4relay_pool_depth", "gauge", "Jobs in the peer's pool.", |s| s.pool_depth as u64),
        ("mm4relay_overflow", "gauge", "Jobs waiting for room in the pool.", |s| s.overflow as u64),
        ("mm4relay_waiting_retry", "gauge", "Jobs waiting for their retry time.", |s| s.waiting_retry as u64),
        ("mm4relay_oldest_queued_seconds", "gauge", "Age of the oldest message queued for the peer (0: none).", |s| s.oldest_secs.unwrap_or(0)),
        ("mm4relay_allowance", "gauge", "Workers that may hold a connection.", |s| s.allowance as u64),
        ("mm4relay_connections_open", "gauge", "Connections open now.", |s| s.connections_open as u64),
        ("mm4relay_connections_busy", "gauge", "Connections delivering now.", |s| s.busy as u64),
        ("mm4relay_peer_healthy", "gauge", "1 when healthy, 0 while isolated and probed.", |s| u64::from(s.healthy)),
        ("mm4relay_peer_misconfigured", "gauge", "1 while our TLS or AUTH settings and the peer's do not agree.", |s| u64::from(s.misconfigured)),
        ("mm4relay_peer_dynamic", "gauge", "1 for a peer made at run time for its domain ([routes] dynamic).", |s| u64::from(s.dynamic)),
        ("mm4relay_peer_retired", "gauge", "1 for a dynamic peer retired while idle (no workers).", |s| u64::from(s.retired)),
    ];
    let mut families = vec![recipients];
    families.extend(
        series
            .into_iter()
            .map(|(name, kind, help, get)| Family::per_peer(name, kind, help, peers, get)),
    );
    families
}

/// Acceptance to the peer's 250, as one histogram per peer.
fn delay_histograms(out: &mut String, views: &[PeerView], peers: &[PeerSnapshot]) {
    histograms(
        out,
        "mm4relay_delivery_delay_seconds",
        "Acceptance to the peer's 250, per delivered recipient.",
        views
            .iter()
            .zip(peers)
            .map(|(p, s)| (s.name.as_str(), p.stats().delay.read())),
    );
}

/// Families of one unlabelled sample each: name, type, help, value.
type Single = (&'static str, &'static str, &'static str, u64);

fn singles(list: impl IntoIterator<Item = Single>) -> impl Iterator<Item = Family> {
    list.into_iter()
        .map(|(name, kind, help, v)| Family::single(name, kind, help, v))
}

/// Sessions, messages and refusals on the way in.
#[rustfmt::skip]
fn inbound_families(inbound: &InboundStats) -> Vec<Family> {
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let labelled = |name, help, samples: &[(&str, &AtomicU64)]| {
        let mut f = Family::new(name, "counter", help);
        for (reason, a) in samples {
            f.samples.push((format!("{{reason=\"{reason}\"}}"), load(a)));
        }
        f
    };
    let sessions_open = inbound.sessions_open.load(Ordering::Relaxed) as u64;
    let mut families: Vec<Family> = singles([
        ("mm4relay_sessions_open", "gauge", "Inbound SMTP sessions open now.", sessions_open),
        ("mm4relay_sessions_total", "counter", "Inbound SMTP sessions since start.", load(&inbound.sessions_total)),
        ("mm4relay_messages_accepted_total", "counter", "Messages answered 250 and queued.", load(&inbound.accepted)),
        ("mm4relay_messages_duplicate_total", "counter", "Messages answered 250 as duplicates.", load(&inbound.duplicates)),
    ])
    .collect();
    families.push(labelled(
        "mm4relay_messages_rejected_total",
        "Messages refused at the end of DATA, by reason.",
        &[("content", &inbound.rejected_content), ("spool", &inbound.rejected_spool)],
    ));
    families.push(labelled(
        "mm4relay_recipients_rejected_total",
        "Recipients refused at RCPT, by reason.",
        &[
            ("bad_address", &inbound.rcpt_bad_address),
            ("unroutable", &inbound.rcpt_unroutable),
            ("relay_denied", &inbound.rcpt_relay_denied),
        ],
    ));
    families.extend(singles([
        ("mm4relay_tls_sessions_total", "counter", "Inbound sessions that started TLS.", load(&inbound.tls_sessions)),
        ("mm4relay_auth_failures_total", "counter", "Inbound AUTH attempts that failed.", load(&inbound.auth_failures)),
        ("mm4relay_auth_delayed_total", "counter", "Inbound AUTH attempts answered after a delay for recent failures.", load(&inbound.auth_delayed)),
        ("mm4relay_connections_refused_total", "counter", "Inbound connections refused by the per-address limits.", load(&inbound.refused_per_ip)),
    ]));
    families
}

/// What the spool holds on disk.
#[rustfmt::skip]
fn spool_families(spool: &SpoolStats) -> impl Iterator<Item = Family> {
    singles([
        ("mm4relay_spool_bytes", "gauge", "Bytes the spool occupies on disk.", spool.bytes),
        ("mm4relay_spool_live_bytes", "gauge", "Bytes of spooled messages with recipients left.", spool.live_bytes),
        ("mm4relay_spool_segments", "gauge", "Segment files of the spool.", spool.segments),
        ("mm4relay_spool_compactions_total", "counter", "Compactions (live messages copied forward) since start.", spool.compactions),
        ("mm4relay_spool_max_bytes", "gauge", "[relay] spool_max_bytes: past it messages are refused (0: no limit).", spool.max_bytes),
    ])
}
