//! The relay against SMTP servers we did not write (issue 12): peer B is a
//! private Postfix, Exim, OpenSMTPD or Postfix's smtp-sink with fault
//! flags (tests/relay/mta.rs); A (the local MMSC, where DSNs go) and C are
//! simulated. Each test skips loudly when its server is not installed.
//!
//! They show the delivery policy where carriers feel it: a fresh
//! connection before a deferral (a restart, an idle timeout), per-session
//! limits learnt (OpenSMTPD, Exim), 5xx greetings, each smtp-sink fault
//! classified, STARTTLS and `tls = implicit` out, TLS 1.3 in from a
//! Postfix client.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use mm4relay::config::Config;
use mm4relay::peer::PeerSnapshot;
use mm4relay::relay::Relay;
use mm4relay::sim::{SimPeer, forward_req};

use crate::mta::*;
use crate::pki::Pki;
use crate::support::*;

/// How long a test waits for everything to arrive before it looks at
/// what did: long past any retry these tests set, short of the deadline.
const SETTLE: Duration = Duration::from_secs(10);

/// The relay with B at a real server; A and C simulated.
struct Rig {
    relay: Option<Relay>,
    /// A (the local MMSC: DSNs arrive here) and C.
    sims: [SimPeer; 2],
    spool: tempfile::TempDir,
    addr: SocketAddr,
}

impl Rig {
    /// The corpus profile with B at `b` and `b_lines` added to B.
    fn start(b: SocketAddr, profile: Profile, b_lines: String) -> Result<Rig, String> {
        Rig::start_edited(b, profile, b_lines, |ini| ini)
    }

    /// As [`Rig::start`], the INI text passed through `edit` first.
    fn start_edited(
        b: SocketAddr,
        mut profile: Profile,
        b_lines: String,
        edit: impl FnOnce(String) -> String,
    ) -> Result<Rig, String> {
        let sims = [SimPeer::start(true).unwrap(), SimPeer::start(true).unwrap()];
        let spool = tempfile::tempdir().unwrap();
        profile.extra_peer[1] = Box::leak(b_lines.into_boxed_str());
        let ini = edit(profile.ini([sims[0].addr(), b, sims[1].addr()], spool.path()));
        let config = Config::parse(&ini, Path::new("test.ini")).map_err(|e| e.to_string())?;
        let relay = Relay::start(&config).map_err(|e| e.to_string())?;
        let addr = relay.local_addrs()[0];
        Ok(Rig {
            relay: Some(relay),
            sims,
            spool,
            addr,
        })
    }

    fn b(&self) -> PeerSnapshot {
        self.relay.as_ref().unwrap().peer_snapshots()[1].clone()
    }

    /// Stops the relay (QUIT to every peer); B's last snapshot and what
    /// was left undelivered.
    fn stop(&mut self) -> Seen {
        let snap = self.b();
        let left = self.relay.take().map_or(0, |r| r.shutdown().undelivered);
        Seen { snap, left }
    }

    /// Sends messages `seqs` to B over one session from the local MMSC.
    fn send(&self, seqs: std::ops::Range<usize>) -> Vec<Sent> {
        let mut c = self.client();
        seqs.map(|seq| {
            let body = mm4(seq);
            let reply = send_message(&mut c, FROM, &[TO_B], &body);
            assert_eq!(reply.code, 250, "{reply}");
            Sent {
                tid: format!("T{seq:08}"),
                at: Instant::now(),
                body,
            }
        })
        .collect()
    }

    fn client(&self) -> Client {
        Client::connect(LOCAL, self.addr)
    }
}

/// B as the relay saw it at the stop.
#[derive(Debug)]
struct Seen {
    snap: PeerSnapshot,
    /// Messages left undelivered in the spool at the stop.
    left: usize,
}

impl std::ops::Deref for Seen {
    type Target = PeerSnapshot;
    fn deref(&self) -> &PeerSnapshot {
        &self.snap
    }
}

/// A message the relay answered 250 to, and when.
struct Sent {
    tid: String,
    at: Instant,
    body: Vec<u8>,
}

/// An MM4_forward.REQ to B with a Message-ID, so that no server adds one.
fn mm4(seq: usize) -> Vec<u8> {
    let mut m = format!("Message-ID: <M{seq:08}@mms.mnc010.mcc001.gprs>\r\n").into_bytes();
    m.extend(forward_req(seq, TO_B, 2048));
    m
}

/// The X-Mms-Transaction-ID of a stored message, if it is there yet (a
/// file smtp-sink is still writing may stop short of it).
fn tid(stored: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(stored);
    let line = text
        .lines()
        .find(|l| l.starts_with("X-Mms-Transaction-ID:"))?;
    Some(line["X-Mms-Transaction-ID:".len()..].trim().to_string())
}

/// Copies per transaction ID of what `mta` stored.
fn stored_tids(mta: &dyn Mta) -> HashMap<String, usize> {
    let mut n = HashMap::new();
    for m in mta.messages() {
        if let Some(t) = tid(&m) {
            *n.entry(t).or_insert(0) += 1;
        }
    }
    n
}

/// Polls `mta` until every message of `sent` is there or [`SETTLE`]
/// passes; for each one that arrived, its delay from the relay's 250 to
/// its first sight at the server.
fn arrivals(mta: &dyn Mta, sent: &[Sent]) -> HashMap<String, Duration> {
    let end = Instant::now() + SETTLE;
    let mut seen = HashMap::new();
    loop {
        let now = Instant::now();
        for tid in stored_tids(mta).into_keys() {
            if let Some(s) = sent.iter().find(|s| s.tid == tid) {
                seen.entry(tid).or_insert(now - s.at);
            }
        }
        if seen.len() == sent.len() || now > end {
            return seen;
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// What a test saw: for the assertion messages.
fn summary(mta: &dyn Mta, sent: usize, got: &HashMap<String, Duration>, b: &Seen) -> String {
    let max = got.values().max().copied().unwrap_or_default();
    format!(
        "{}: sent {sent}, delivered {}, connections at the server {}, relay: deferred {} failed {} \
         connections opened {}, left undelivered at the stop {}, longest delay {max:?}, \
         last error {:?}",
        mta.name(),
        got.len(),
        mta.connections(),
        b.deferred,
        b.failed,
        b.connections_opened,
        b.left,
        b.last_error
    )
}

/// Every stored copy of `sent` is, below our `Received:`, what the relay
/// was given (as the server stores lines), and each arrived once.
fn assert_identical(mta: &dyn Mta, sent: &[Sent]) {
    let stored = mta.messages();
    for s in sent {
        let copies: Vec<&Vec<u8>> = stored
            .iter()
            .filter(|m| tid(m).as_deref() == Some(&s.tid))
            .collect();
        assert_eq!(
            copies.len(),
            1,
            "{}: {} copies of {}",
            mta.name(),
            copies.len(),
            s.tid
        );
        let below = below_our_received(copies[0])
            .unwrap_or_else(|| panic!("{}: no Received by relay.test in {}", mta.name(), s.tid));
        assert!(
            below == mta.stored_form(&s.body).as_slice(),
            "{}: {} changed below our Received:\n{}",
            mta.name(),
            s.tid,
            String::from_utf8_lossy(below)
        );
    }
}

/// How each server stores the lines it was sent.
trait StoredForm {
    fn stored_form(&self, wire: &[u8]) -> Vec<u8>;
}

impl<T: Mta + ?Sized> StoredForm for T {
    fn stored_form(&self, wire: &[u8]) -> Vec<u8> {
        match self.name() {
            // appendfile with use_crlf: the octets as sent.
            "exim" => wire.to_vec(),
            // The dump ends each transaction with an empty line.
            "smtp-sink" => {
                let mut v = lf(wire);
                v.push(b'\n');
                v
            }
            _ => lf(wire),
        }
    }
}

/// 50 messages to `mta` at B over at most 2 connections: all delivered
/// once, byte-identical below our `Received:`, none deferred.
fn fifty_over_two_connections(mta: &dyn Mta) {
    let mut rig = Rig::start(
        mta.addr(),
        Profile {
            max_connections: [4, 2, 4],
            ..Profile::default()
        },
        String::new(),
    )
    .unwrap();
    let sent = rig.send(0..50);
    let got = arrivals(mta, &sent);
    let b = rig.stop();
    let what = summary(mta, sent.len(), &got, &b);
    assert_eq!(got.len(), 50, "{what}");
    assert_eq!(b.left, 0, "{what}");
    assert_identical(mta, &sent);
    assert_eq!(b.deferred, 0, "{what}");
    let conns = mta.connections();
    assert!((1..=2).contains(&conns), "{what}");
    eprintln!("{what}");
}

#[test]
fn postfix_gets_fifty_byte_identical_over_two_connections() {
    let Some(pf) = Postfix::start(PostfixOptions::default()) else {
        return;
    };
    fifty_over_two_connections(&pf);
}

#[test]
fn exim_gets_fifty_byte_identical_over_two_connections() {
    let Some(exim) = Exim::start(0) else {
        return;
    };
    fifty_over_two_connections(&exim);
}

#[test]
fn opensmtpd_gets_fifty_byte_identical_over_two_connections() {
    // Its default per-session limit (100) is not reached here.
    let Some(os) = OpenSmtpd::start(100) else {
        return;
    };
    fifty_over_two_connections(&os);
}

#[test]
fn smtp_sink_gets_fifty_byte_identical_over_two_connections() {
    let Some(sink) = SmtpSink::start(&[]) else {
        return;
    };
    fifty_over_two_connections(&sink);
}

/// B's hosts found through DNS (`hosts = mx:`, its MX served on loopback)
/// and B a real Postfix: every message arrives whole, nothing deferred.
/// Postfix offers CHUNKING: fifty messages held at B, then released, go
/// out as BDAT (no DATA on the wire), several per write, and arrive byte
/// for byte, with no deferral.
#[test]
fn postfix_gets_bdat_batches_byte_identical() {
    let Some(pf) = Postfix::start(PostfixOptions::default()) else {
        return;
    };
    let tap = Tap::start(pf.addr());
    let mut rig = Rig::start(tap.addr(), Profile::default(), String::new()).unwrap();
    let control = |cmd: &str| {
        mm4relay::ops::control::request(&rig.spool.path().join("control.sock"), cmd).unwrap()
    };
    assert!(control("queue hold B").contains("held"));
    let sent = rig.send(0..50);
    assert!(control("queue release B").contains("released"));
    let got = arrivals(&pf, &sent);
    let b = rig.stop();
    let what = summary(&pf, sent.len(), &got, &b);
    assert_eq!(got.len(), 50, "{what}");
    assert_identical(&pf, &sent);
    assert_eq!(b.deferred, 0, "{what}");
    let reads = tap.reads();
    let count = |r: &[u8], what: &[u8]| r.windows(what.len()).filter(|w| *w == what).count();
    let wire: Vec<u8> = reads.concat();
    assert_eq!(count(&wire, b"BDAT "), 50, "{what}");
    assert_eq!(count(&wire, b"\r\nDATA\r\n"), 0, "{what}");
    let most = reads.iter().map(|r| count(r, b"BDAT ")).max().unwrap_or(0);
    assert!(most > 1, "one message per write at most: {what}");
    eprintln!("{what}; most BDATs in one read at Postfix: {most}");
}

/// `chunking = no`: the same Postfix gets DATA, never BDAT.
#[test]
fn chunking_off_sends_data_to_postfix() {
    let Some(pf) = Postfix::start(PostfixOptions::default()) else {
        return;
    };
    let tap = Tap::start(pf.addr());
    let mut rig = Rig::start(tap.addr(), Profile::default(), "chunking = no\n".into()).unwrap();
    let sent = rig.send(0..3);
    let got = arrivals(&pf, &sent);
    let b = rig.stop();
    assert_eq!(got.len(), 3, "{}", summary(&pf, 3, &got, &b));
    assert_identical(&pf, &sent);
    let wire = tap.reads().concat();
    let count = |what: &[u8]| wire.windows(what.len()).filter(|w| *w == what).count();
    assert_eq!((count(b"BDAT "), count(b"\r\nDATA\r\n")), (0, 3));
}

#[test]
fn a_postfix_found_through_its_mx_gets_everything() {
    use hickory_proto::rr::RecordType;
    use mm4relay::dns::server::{DnsServer, Reply, a, mx};
    let Some(pf) = Postfix::start(PostfixOptions::default()) else {
        return;
    };
    let dns = DnsServer::start().unwrap();
    let domain = "mms.mnc020.mcc001.gprs";
    dns.set(
        domain,
        RecordType::MX,
        Reply::Records(vec![mx(10, "mx1.b.test")], 300),
    );
    let ip = match pf.addr().ip() {
        std::net::IpAddr::V4(ip) => ip,
        other => panic!("Postfix on {other}"),
    };
    dns.set(
        "mx1.b.test",
        RecordType::A,
        Reply::Records(vec![a(ip)], 300),
    );
    dns.set("mx1.b.test", RecordType::AAAA, Reply::Records(vec![], 300));
    let b = pf.addr();
    let mut rig = Rig::start_edited(b, Profile::default(), String::new(), |ini| {
        let ini = ini.replace(&format!("hosts = {b}\n"), &format!("hosts = mx:{domain}\n"));
        assert!(ini.contains("mx:"), "B's hosts line not found");
        format!(
            "{ini}\n[dns]\nservers = {}\nsmtp_port = {}\n",
            dns.addr(),
            b.port()
        )
    })
    .unwrap();
    let sent = rig.send(0..10);
    let got = arrivals(&pf, &sent);
    let seen = rig.stop();
    let what = summary(&pf, sent.len(), &got, &seen);
    assert_eq!(got.len(), 10, "{what}");
    assert_identical(&pf, &sent);
    assert_eq!(seen.deferred, 0, "{what}");
    assert!(dns.queries() > 0, "the MX was asked");
}

/// Messages after a restart of the peer, whose pooled connections are then
/// all dead, go at once: nothing deferred, nothing delayed past a second.
#[test]
fn a_postfix_restarted_mid_run_gets_everything_without_a_deferral() {
    let Some(mut pf) = Postfix::start(PostfixOptions::default()) else {
        return;
    };
    let mut rig = Rig::start(
        pf.addr(),
        Profile {
            // A deferral would show as a delay of 2 s at least.
            retry_min_ms: 2000,
            min_connections: [1, 2, 1],
            max_connections: [4, 2, 4],
            ..Profile::default()
        },
        String::new(),
    )
    .unwrap();
    let first = rig.send(0..10);
    assert_eq!(arrivals(&pf, &first).len(), 10);
    wait_until("B's two connections", || rig.b().connections_open == 2);
    pf.restart();
    let second = rig.send(10..30);
    let got = arrivals(&pf, &second);
    let b = rig.stop();
    let what = summary(&pf, second.len(), &got, &b);
    assert_eq!(b.deferred, 0, "{what}");
    assert_eq!(got.len(), 20, "{what}");
    assert_eq!(b.left, 0, "{what}");
    let max = got.values().max().copied().unwrap();
    assert!(max < Duration::from_secs(1), "{what}");
    eprintln!("{what}");
}

/// A Postfix whose `smtpd_timeout` (1 s) is shorter than B's keepalive
/// (3 s) closes the idle connection first; the next messages still go at
/// once.
#[test]
fn a_postfix_idle_timeout_shorter_than_keepalive_defers_nothing() {
    let Some(pf) = Postfix::start(PostfixOptions {
        smtpd_timeout: Some("1s".into()),
        ..PostfixOptions::default()
    }) else {
        return;
    };
    let mut rig = Rig::start(
        pf.addr(),
        Profile {
            retry_min_ms: 2000,
            min_connections: [1, 1, 1],
            max_connections: [4, 1, 4],
            ..Profile::default()
        },
        "keepalive = 3s\n".into(),
    )
    .unwrap();
    let first = rig.send(0..1);
    assert_eq!(arrivals(&pf, &first).len(), 1);
    // Postfix drops the idle session and says so.
    wait_until("Postfix's idle timeout", || {
        pf.log().contains("timeout after")
    });
    let second = rig.send(1..6);
    let got = arrivals(&pf, &second);
    let b = rig.stop();
    let what = summary(&pf, second.len(), &got, &b);
    assert_eq!(b.deferred, 0, "{what}");
    assert_eq!(got.len(), 5, "{what}");
    assert_eq!(b.left, 0, "{what}");
    let max = got.values().max().copied().unwrap();
    assert!(max < Duration::from_secs(1), "{what}");
    eprintln!("{what}");
}

/// OpenSMTPD answers `452 4.5.3 Too many messages sent` to MAIL after
/// `max-mails` (10 here) in a session and keeps it open: the relay must
/// start a new session, not defer.
#[test]
fn opensmtpd_per_session_limit_defers_nothing() {
    let Some(os) = OpenSmtpd::start(10) else {
        return;
    };
    session_limit(&os, 30, 3);
}

/// Exim's `smtp_accept_max_per_connection` (5) answers 421 to the sixth
/// MAIL: the relay must reconnect, not defer.
#[test]
fn exim_per_connection_limit_defers_nothing() {
    let Some(exim) = Exim::start(5) else {
        return;
    };
    session_limit(&exim, 20, 4);
}

/// `n` messages over one connection at a time to a server that ends
/// sessions: all delivered, none deferred, over `min_conns` sessions or more.
fn session_limit(mta: &dyn Mta, n: usize, min_conns: usize) {
    let mut rig = Rig::start(
        mta.addr(),
        Profile {
            retry_min_ms: 2000,
            max_connections: [4, 1, 4],
            ..Profile::default()
        },
        String::new(),
    )
    .unwrap();
    let sent = rig.send(0..n);
    let got = arrivals(mta, &sent);
    let b = rig.stop();
    let what = summary(mta, n, &got, &b);
    assert_eq!(b.deferred, 0, "{what}");
    assert_eq!(got.len(), n, "{what}");
    assert_eq!(b.left, 0, "{what}");
    assert_identical(mta, &sent);
    assert!(mta.connections() >= min_conns, "{what}");
    eprintln!("{what}");
}

/// A relay with B at an smtp-sink started with `flags`, one message sent;
/// waits until B has disposed of it once (sent, deferred or failed).
fn one_to_sink(flags: &[&str]) -> Option<(SmtpSink, Rig, Vec<Sent>)> {
    let sink = SmtpSink::start(flags)?;
    let rig = Rig::start(
        sink.addr(),
        Profile {
            // One retry at most within a test.
            retry_min_ms: 30_000,
            ..Profile::default()
        },
        String::new(),
    )
    .unwrap();
    let sent = rig.send(0..1);
    wait_until("B's first outcome", || {
        let b = rig.b();
        b.sent + b.deferred + b.failed > 0
    });
    Some((sink, rig, sent))
}

/// smtp-sink `-f STAGE`: a 5xx to MAIL, RCPT, DATA or the final dot fails
/// the recipient, once, with a DSN to the sender at A.
#[test]
fn smtp_sink_5xx_at_each_stage_fails_the_recipient_with_a_dsn() {
    for stage in ["MAIL", "RCPT", "DATA", "."] {
        let Some((_sink, mut rig, _)) = one_to_sink(&["-f", stage]) else {
            return;
        };
        assert!(
            rig.sims[0].wait_for_recipients(1, DEADLINE),
            "-f {stage}: no DSN at A"
        );
        let b = rig.stop();
        assert_eq!(
            (b.failed, b.deferred, b.sent, b.left),
            (1, 0, 0, 0),
            "-f {stage}: {b:?}"
        );
        assert!(b.last_error.is_empty() || !b.last_error.contains("possible duplicate"));
    }
}

/// A transaction that did not complete (every RCPT refused) is followed
/// by RSET; a peer that then hangs up (`-q RSET`) or refuses it
/// (`-r RSET`) costs the connection, not the worker: it is closed, its
/// slot given back, and the next message goes over a new one.
#[test]
fn smtp_sink_refusing_or_dropping_rset_costs_only_the_connection() {
    for flag in ["-q", "-r"] {
        let Some((_sink, mut rig, _)) = one_to_sink(&["-f", "RCPT", flag, "RSET"]) else {
            return;
        };
        assert!(
            rig.sims[0].wait_for_recipients(1, DEADLINE),
            "{flag} RSET: no DSN"
        );
        wait_until("B's connection closed", || rig.b().connections_open == 0);
        rig.send(1..2);
        assert!(
            rig.sims[0].wait_for_recipients(2, DEADLINE),
            "{flag} RSET: no second DSN"
        );
        let b = rig.stop();
        assert_eq!(
            (b.failed, b.deferred, b.left),
            (2, 0, 0),
            "{flag} RSET: {b:?}"
        );
        assert!(b.connections_opened >= 2, "{flag} RSET: {b:?}");
    }
}

/// smtp-sink `-r STAGE`: a 4xx to MAIL, RCPT, DATA or the final dot
/// defers the recipient; nothing fails, nothing is stored.
#[test]
fn smtp_sink_4xx_at_each_stage_defers() {
    for stage in ["MAIL", "RCPT", "DATA", "."] {
        let Some((sink, mut rig, _)) = one_to_sink(&["-r", stage]) else {
            return;
        };
        let b = rig.stop();
        assert_eq!(
            (b.deferred, b.failed, b.sent),
            (1, 0, 0),
            "-r {stage}: {b:?}"
        );
        if stage != "." {
            assert!(sink.messages().is_empty(), "-r {stage}: stored");
        }
        assert_eq!(rig.sims[0].recipients(), 0, "-r {stage}: a DSN for a 4xx");
    }
}

/// smtp-sink `-q STAGE` before the final dot (MAIL, RCPT, DATA): the peer
/// took no message, so it is retried (not a possible duplicate) and
/// arrives once when the peer is healthy again.
#[test]
fn smtp_sink_disconnect_before_the_final_dot_is_retried() {
    for stage in ["MAIL", "RCPT", "DATA"] {
        let Some((mut sink, mut rig, sent)) = one_to_sink(&["-q", stage]) else {
            return;
        };
        let b = rig.b();
        assert_eq!((b.failed, b.sent), (0, 0), "-q {stage}: {b:?}");
        assert!(
            !b.last_error.contains("possible duplicate"),
            "-q {stage}: {}",
            b.last_error
        );
        // The same port, healthy: the retry (queue retry now) gets through.
        sink.restart(&[]);
        assert!(rig.control_retry());
        let got = arrivals(&sink, &sent);
        let b = rig.stop();
        assert_eq!(got.len(), 1, "-q {stage}: {}", summary(&sink, 1, &got, &b));
        assert_identical(&sink, &sent);
    }
}

/// smtp-sink `-q .`: the connection drops after the final dot, before the
/// reply: the message is deferred and logged as a possible duplicate.
#[test]
fn smtp_sink_disconnect_after_the_final_dot_defers_as_a_possible_duplicate() {
    let Some((mut sink, mut rig, sent)) = one_to_sink(&["-q", "."]) else {
        return;
    };
    let b = rig.b();
    assert_eq!((b.deferred, b.failed, b.sent), (1, 0, 0), "{b:?}");
    assert!(
        b.last_error.contains("possible duplicate"),
        "{}",
        b.last_error
    );
    sink.restart(&[]);
    assert!(rig.control_retry());
    wait_until("the retry", || rig.b().sent == 1);
    rig.stop();
    // The sink had stored the first copy before it hung up: at least once.
    assert!(stored_tids(&sink)[&sent[0].tid] >= 1);
}

/// smtp-sink `-f CONNECT`: the only host greets with 5xx: the recipient
/// fails with a DSN (as Postfix does), after a QUIT.
#[test]
fn smtp_sink_5xx_greeting_fails_the_recipient() {
    let Some((_sink, mut rig, _)) = one_to_sink(&["-f", "CONNECT"]) else {
        return;
    };
    let b = rig.stop();
    assert_eq!((b.failed, b.deferred), (1, 0), "{b:?}");
}

impl Rig {
    /// `queue retry all` through the relay's own queue: a deferred job is
    /// tried now instead of after retry_min.
    fn control_retry(&self) -> bool {
        let queue = self.relay.as_ref().unwrap().queue();
        wait_until("B's retry to be queued", || queue.deferred_len(1) > 0);
        queue.retry_now(None, None);
        true
    }
}

/// STARTTLS to a real Postfix with `tls = required`, verified against the
/// test CA.
#[test]
fn starttls_to_postfix_with_tls_required() {
    let pki = Pki::new();
    let Some(pf) = Postfix::start(PostfixOptions {
        tls: Some((pki.server.cert.clone(), pki.server.key.clone())),
        ..PostfixOptions::default()
    }) else {
        return;
    };
    let mut rig = Rig::start(
        pf.addr(),
        Profile::default(),
        format!(
            "tls = required\ntls_ca_file = {}\ntls_server_name = localhost\n",
            pki.ca.display()
        ),
    )
    .unwrap();
    let sent = rig.send(0..5);
    let got = arrivals(&pf, &sent);
    let b = rig.stop();
    assert_eq!(got.len(), 5, "{}", summary(&pf, 5, &got, &b));
    assert_identical(&pf, &sent);
    assert!(
        pf.log().contains("TLS connection established from"),
        "{}",
        pf.log()
    );
    // Postfix records the session as ESMTPS.
    assert!(
        pf.messages()
            .iter()
            .all(|m| { String::from_utf8_lossy(m).contains("(Postfix) with ESMTPS") })
    );
}

/// `tls = implicit` (TLS from the first byte) to Postfix's wrappermode
/// smtpd.
#[test]
fn implicit_tls_to_postfix_wrappermode() {
    let pki = Pki::new();
    let Some(pf) = Postfix::start(PostfixOptions {
        tls: Some((pki.server.cert.clone(), pki.server.key.clone())),
        wrappermode: true,
        ..PostfixOptions::default()
    }) else {
        return;
    };
    // The server side works: TLS from the first byte, then the greeting.
    drop(Client::connect_tls(LOCAL, pf.tls_addr(), &pki.connector()));
    let rig = Rig::start(
        pf.tls_addr(),
        Profile::default(),
        format!(
            "tls = implicit\ntls_ca_file = {}\ntls_server_name = localhost\n",
            pki.ca.display()
        ),
    );
    let mut rig = rig.unwrap_or_else(|e| panic!("tls = implicit not accepted yet: {e}"));
    let sent = rig.send(0..3);
    let got = arrivals(&pf, &sent);
    let b = rig.stop();
    assert_eq!(got.len(), 3, "{}", summary(&pf, 3, &got, &b));
    assert_identical(&pf, &sent);
    assert_eq!(b.deferred, 0);
}

/// A Postfix client relays into the relay's STARTTLS listener and
/// negotiates TLS 1.3 (the relay's server side offers it), verified
/// against the test CA; the relay stamps the session ESMTPS.
#[test]
fn a_postfix_client_sends_in_over_tls_1_3() {
    let pki = Pki::new();
    let h = Harness::with_listener(pki.listener_lines());
    let Some(pf) = Postfix::start(PostfixOptions {
        relayhost: Some((h.addr, pki.ca.clone())),
        ..PostfixOptions::default()
    }) else {
        return;
    };
    let mut c = Client::connect(LOCAL, pf.addr());
    send_forward(&mut c, 1, TO_A, 600);
    // Postfix defers a first try that failed for 5 minutes: a busy
    // machine must not fail the test for that, so its queue is flushed.
    let end = Instant::now() + DEADLINE;
    while !h.sims[0].wait_for_recipients(1, Duration::from_secs(1)) {
        assert!(Instant::now() < end, "{}", pf.log());
        pf.flush();
    }
    let log = pf.log();
    let line = log
        .lines()
        .find(|l| l.contains("TLS connection established to"))
        .unwrap_or_else(|| panic!("no TLS in Postfix's log: {log}"));
    assert!(
        line.contains("Trusted TLS") && line.contains(": TLSv1.3 with cipher"),
        "{line}"
    );
    let got = h.sims[0].received();
    let text = String::from_utf8_lossy(&got[0].data);
    assert!(
        text.contains("by relay.test (mm4relay) with ESMTPS"),
        "{text}"
    );
}

/// CDR rows built from what real servers answered: Postfix's 250 (its
/// queue ID in `reply`, the same ID its Received: line names) for each
/// message, and smtp-sink's 5xx at the final dot as `failed`.
#[test]
fn cdr_rows_carry_what_postfix_and_smtp_sink_answered() {
    let cdr = || Profile {
        extra_sections: "[cdr]\ndir = {spool}/cdr\n".into(),
        ..Profile::default()
    };
    let Some(pf) = Postfix::start(PostfixOptions::default()) else {
        return;
    };
    let mut rig = Rig::start(pf.addr(), cdr(), String::new()).unwrap();
    let sent = rig.send(0..5);
    let got = arrivals(&pf, &sent);
    assert_eq!(got.len(), 5, "{}", pf.log());
    rig.stop();
    let rows = crate::cdr::rows_in(&rig.spool.path().join("cdr"), ".csv");
    let sent_rows: Vec<_> = rows.iter().filter(|r| r["event"] == "sent").collect();
    assert_eq!(sent_rows.len(), 5, "{rows:?}");
    let stored = pf.messages();
    for r in &sent_rows {
        assert_eq!(
            (r["peer"].as_str(), r["status"].as_str(), r["to"].as_str()),
            ("B", "250", TO_B),
            "{r:?}"
        );
        let id = r["reply"]
            .split("queued as ")
            .nth(1)
            .unwrap_or_else(|| panic!("no Postfix queue ID in {r:?}"))
            .trim();
        let m = stored
            .iter()
            .find(|m| tid(m).as_deref() == Some(r["transaction_id"].as_str()))
            .unwrap_or_else(|| panic!("{} not stored", r["transaction_id"]));
        let text = String::from_utf8_lossy(m);
        assert!(text.contains(&format!("id {id}")), "{id} not in\n{text}");
    }

    let Some(sink) = SmtpSink::start(&["-f", "."]) else {
        return;
    };
    let mut rig = Rig::start(sink.addr(), cdr(), String::new()).unwrap();
    rig.send(0..1);
    assert!(rig.sims[0].wait_for_recipients(1, DEADLINE), "no DSN at A");
    rig.stop();
    let rows = crate::cdr::rows_in(&rig.spool.path().join("cdr"), ".csv");
    let failed: Vec<_> = rows.iter().filter(|r| r["event"] == "failed").collect();
    assert_eq!(failed.len(), 1, "{rows:?}");
    assert!(failed[0]["status"].starts_with('5'), "{:?}", failed[0]);
    assert_eq!(failed[0]["attempts"], "1");
}
