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
use std::sync::atomic::Ordering;

use log::info;

use crate::control::Sources;
use crate::peer::{DELAY_BUCKETS, PeerSnapshot};

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

/// A per-peer gauge: name, help text, and how to read it off a snapshot.
type Gauge = (&'static str, &'static str, fn(&PeerSnapshot) -> usize);

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// The exposition text.
pub fn render(sources: &Sources) -> String {
    let inbound = &sources.inbound;
    let mut out = String::with_capacity(4096);
    let views = sources.peers.list();
    let peers: Vec<_> = views
        .iter()
        .map(|p| (p, p.snapshot(&sources.queue)))
        .collect();
    family(
        &mut out,
        "mm4relay_recipients_total",
        "counter",
        "Recipients by outcome at each peer.",
    );
    for (_, s) in &peers {
        for (outcome, n) in [
            ("sent", s.sent),
            ("deferred", s.deferred),
            ("failed", s.failed),
        ] {
            let _ = writeln!(
                out,
                "mm4relay_recipients_total{{peer=\"{}\",outcome=\"{outcome}\"}} {n}",
                s.name
            );
        }
    }
    family(
        &mut out,
        "mm4relay_connections_opened_total",
        "counter",
        "SMTP connections opened to each peer.",
    );
    for (_, s) in &peers {
        let _ = writeln!(
            out,
            "mm4relay_connections_opened_total{{peer=\"{}\"}} {}",
            s.name, s.connections_opened
        );
    }
    family(
        &mut out,
        "mm4relay_connections_failed_total",
        "counter",
        "Connection attempts to each peer's hosts that failed (connect, greeting, TLS, AUTH).",
    );
    for (_, s) in &peers {
        let _ = writeln!(
            out,
            "mm4relay_connections_failed_total{{peer=\"{}\"}} {}",
            s.name, s.connections_failed
        );
    }
    let gauges: [Gauge; 8] = [
        ("mm4relay_pool_depth", "Jobs in the peer's pool.", |s| {
            s.pool_depth
        }),
        (
            "mm4relay_overflow",
            "Jobs waiting for room in the pool.",
            |s| s.overflow,
        ),
        (
            "mm4relay_waiting_retry",
            "Jobs waiting for their retry time.",
            |s| s.waiting_retry,
        ),
        (
            "mm4relay_allowance",
            "Workers that may hold a connection.",
            |s| s.allowance,
        ),
        ("mm4relay_connections_open", "Connections open now.", |s| {
            s.connections_open
        }),
        (
            "mm4relay_connections_busy",
            "Connections delivering now.",
            |s| s.busy,
        ),
        (
            "mm4relay_peer_healthy",
            "1 when healthy, 0 while isolated and probed.",
            |s| usize::from(s.healthy),
        ),
        (
            "mm4relay_peer_misconfigured",
            "1 while our TLS or AUTH settings and the peer's do not agree.",
            |s| usize::from(s.misconfigured),
        ),
    ];
    for (name, help, get) in gauges {
        family(&mut out, name, "gauge", help);
        for (_, s) in &peers {
            let _ = writeln!(out, "{name}{{peer=\"{}\"}} {}", s.name, get(s));
        }
    }
    family(
        &mut out,
        "mm4relay_delivery_delay_seconds",
        "histogram",
        "Acceptance to the peer's 250, per delivered recipient.",
    );
    for (p, s) in &peers {
        let (counts, sum) = p.stats().delay.read();
        for (bound, n) in DELAY_BUCKETS.iter().zip(counts) {
            let _ = writeln!(
                out,
                "mm4relay_delivery_delay_seconds_bucket{{peer=\"{}\",le=\"{bound}\"}} {n}",
                s.name
            );
        }
        let _ = writeln!(
            out,
            "mm4relay_delivery_delay_seconds_bucket{{peer=\"{}\",le=\"+Inf\"}} {}",
            s.name, counts[8]
        );
        let _ = writeln!(
            out,
            "mm4relay_delivery_delay_seconds_sum{{peer=\"{}\"}} {sum}",
            s.name
        );
        let _ = writeln!(
            out,
            "mm4relay_delivery_delay_seconds_count{{peer=\"{}\"}} {}",
            s.name, counts[8]
        );
    }
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    family(
        &mut out,
        "mm4relay_sessions_open",
        "gauge",
        "Inbound SMTP sessions open now.",
    );
    let _ = writeln!(
        out,
        "mm4relay_sessions_open {}",
        inbound.sessions_open.load(Ordering::Relaxed)
    );
    family(
        &mut out,
        "mm4relay_sessions_total",
        "counter",
        "Inbound SMTP sessions since start.",
    );
    let _ = writeln!(
        out,
        "mm4relay_sessions_total {}",
        load(&inbound.sessions_total)
    );
    family(
        &mut out,
        "mm4relay_messages_accepted_total",
        "counter",
        "Messages answered 250 and queued.",
    );
    let _ = writeln!(
        out,
        "mm4relay_messages_accepted_total {}",
        load(&inbound.accepted)
    );
    family(
        &mut out,
        "mm4relay_messages_duplicate_total",
        "counter",
        "Messages answered 250 as duplicates.",
    );
    let _ = writeln!(
        out,
        "mm4relay_messages_duplicate_total {}",
        load(&inbound.duplicates)
    );
    family(
        &mut out,
        "mm4relay_messages_rejected_total",
        "counter",
        "Messages refused at the end of DATA, by reason.",
    );
    let _ = writeln!(
        out,
        "mm4relay_messages_rejected_total{{reason=\"content\"}} {}",
        load(&inbound.rejected_content)
    );
    let _ = writeln!(
        out,
        "mm4relay_messages_rejected_total{{reason=\"spool\"}} {}",
        load(&inbound.rejected_spool)
    );
    family(
        &mut out,
        "mm4relay_recipients_rejected_total",
        "counter",
        "Recipients refused at RCPT, by reason.",
    );
    for (reason, a) in [
        ("bad_address", &inbound.rcpt_bad_address),
        ("unroutable", &inbound.rcpt_unroutable),
        ("relay_denied", &inbound.rcpt_relay_denied),
    ] {
        let _ = writeln!(
            out,
            "mm4relay_recipients_rejected_total{{reason=\"{reason}\"}} {}",
            load(a)
        );
    }
    for (name, help, a) in [
        (
            "mm4relay_tls_sessions_total",
            "Inbound sessions that started TLS.",
            &inbound.tls_sessions,
        ),
        (
            "mm4relay_auth_failures_total",
            "Inbound AUTH attempts that failed.",
            &inbound.auth_failures,
        ),
        (
            "mm4relay_auth_delayed_total",
            "Inbound AUTH attempts answered after a delay for recent failures.",
            &inbound.auth_delayed,
        ),
        (
            "mm4relay_connections_refused_total",
            "Inbound connections refused by the per-address limits.",
            &inbound.refused_per_ip,
        ),
    ] {
        family(&mut out, name, "counter", help);
        let _ = writeln!(out, "{name} {}", load(a));
    }
    let spool = sources.spool.stats();
    for (name, kind, help, v) in [
        (
            "mm4relay_spool_bytes",
            "gauge",
            "Bytes the spool occupies on disk.",
            spool.bytes,
        ),
        (
            "mm4relay_spool_live_bytes",
            "gauge",
            "Bytes of spooled messages with recipients left.",
            spool.live_bytes,
        ),
        (
            "mm4relay_spool_segments",
            "gauge",
            "Segment files of the spool.",
            spool.segments,
        ),
        (
            "mm4relay_spool_compactions_total",
            "counter",
            "Compactions (live messages copied forward) since start.",
            spool.compactions,
        ),
    ] {
        family(&mut out, name, kind, help);
        let _ = writeln!(out, "{name} {v}");
    }
    family(
        &mut out,
        "mm4relay_queued_messages",
        "gauge",
        "Messages queued at each peer.",
    );
    for (i, (_, s)) in peers.iter().enumerate() {
        let _ = writeln!(
            out,
            "mm4relay_queued_messages{{peer=\"{}\"}} {}",
            s.name,
            sources.queue.queued_len(i)
        );
    }
    out
}
