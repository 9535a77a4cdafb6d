//! Lifetimes end on time (issue 18): the queue fails a message when its
//! deadline passes, whatever its peer's state and whatever is queued ahead
//! of it, and a dead peer costs one connection attempt per probe, not one
//! per queued message.

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use mm4relay::sim::{Fault, Outgoing, SimPeer, forward_req, send_load};
use mm4relay::sys::clock::ManualClock;

use crate::support::*;

/// A loopback address nothing listens on: connections are refused.
fn refusing() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// `n` MM4_forward.REQ to B from the local MMSC, over 8 sessions.
fn send_to_b(h: &Harness, n: usize) {
    let msgs: Vec<Outgoing> = (0..n)
        .map(|i| Outgoing {
            from: FROM.into(),
            rcpts: vec![TO_B.into()],
            data: forward_req(i, TO_B, 400),
        })
        .collect();
    let report = send_load(h.addr, 8, Arc::new(msgs));
    assert_eq!(report.accepted, n, "{report:?}");
}

/// 10,000 messages at a peer that refuses connections. When the (injected)
/// clock passes their lifetime, one pass of the queue manager takes every
/// one of them, wherever it waits (the pool, the overflow, a retry), and
/// each fails with 5.4.7 and a DSN to its local sender. Meanwhile the
/// peer, probed, cost one connection attempt per probe interval.
#[test]
fn ten_thousand_at_a_refusing_peer_fail_when_their_lifetime_ends() {
    const N: usize = 10_000;
    let clock = Arc::new(ManualClock::new(SystemTime::now()));
    let h = Harness::with_clock(
        Profile {
            peer_addr: [None, Some(refusing()), None],
            extra_relay: "queue_lifetime = 1h\n".into(),
            ..Profile::default()
        },
        clock.clone(),
    );
    let started = Instant::now();
    send_to_b(&h, N);
    let queue = h.relay.as_ref().unwrap().queue().clone();
    assert!(queue.sync(DEADLINE));
    let b = h.peer(1);
    assert_eq!((b.failed, b.sent), (0, 0), "{b:?}");
    assert_eq!(queue.queued_len(1), N);

    // Past the lifetime (the manager's timers are whole seconds).
    clock.advance(Duration::from_secs(3601));
    // One pass: nothing of B's is left waiting anywhere.
    assert!(queue.sync(DEADLINE));
    let b = h.peer(1);
    assert_eq!(
        (b.pool_depth, b.overflow, b.waiting_retry),
        (0, 0, 0),
        "{b:?}"
    );
    wait_until("every recipient failed", || h.peer(1).failed == N as u64);
    assert!(
        h.sims[0].wait_for_recipients(N as u64, DEADLINE),
        "DSNs at A: {}",
        h.sims[0].recipients()
    );
    // Counted and bounced before it leaves the queue (see below).
    wait_until("nothing queued for B", || queue.queued_len(1) == 0);
    let dsns = h.sims[0].received();
    assert!(
        dsns.iter()
            .all(|m| m.from.is_empty() && m.rcpts == [FROM.to_string()]),
        "every DSN to the sender, from the null sender"
    );
    assert!(
        dsns.iter()
            .all(|m| String::from_utf8_lossy(&m.data).contains("5.4.7")),
        "expiry named in the DSN"
    );
    // Connection attempts: three before the peer is isolated, then one per
    // probe (probe_min 100 ms, doubling to 400 ms) or per worker backoff.
    let elapsed = started.elapsed();
    let attempts = h.peer(1).connections_failed;
    let bound = 3 + (elapsed.as_millis() / 100) as u64;
    assert!(
        attempts <= bound,
        "{attempts} connection attempts in {elapsed:?} (at most {bound})"
    );
    assert!(attempts >= 1);
}

/// What keeps B from delivering.
#[derive(Clone, Copy, Debug)]
enum Dead {
    /// Accepts and never greets (B's helo_timeout is 2 s).
    Blackhole,
    /// 451 to every transaction.
    Transient,
    /// Held by an operator.
    Held,
}

/// 100 messages with a 2 s lifetime at a peer that is dead in each way,
/// over real sockets and the real clock: all fail with a DSN within a few
/// seconds of their lifetime, none is delivered.
#[test]
fn a_dead_blackholed_or_held_peer_expires_its_queue_on_time() {
    const N: usize = 100;
    const LIFETIME: Duration = Duration::from_secs(2);
    for dead in [Dead::Blackhole, Dead::Transient, Dead::Held] {
        // A blackhole from the first connection on: B's simulated MMSC
        // would already be greeted.
        let silent = SimPeer::start(false).unwrap();
        silent.set_fault(Fault::NoGreeting);
        let mut h = Harness::with(Profile {
            extra_relay: format!("queue_lifetime = {}s\n", LIFETIME.as_secs()),
            peer_addr: [
                None,
                matches!(dead, Dead::Blackhole).then(|| silent.addr()),
                None,
            ],
            ..Profile::default()
        });
        match dead {
            Dead::Blackhole => {}
            Dead::Transient => h.sims[1].set_fault(Fault::TempFail),
            Dead::Held => assert!(h.control("queue hold B").contains("held")),
        }
        send_to_b(&h, N);
        let sent = Instant::now();
        assert!(
            h.sims[0].wait_for_recipients(N as u64, DEADLINE),
            "{dead:?}: {} DSNs at A; B: {:?}",
            h.sims[0].recipients(),
            h.peer(1)
        );
        let after = sent.elapsed();
        let b = h.peer(1);
        assert_eq!((b.failed, b.sent), (N as u64, 0), "{dead:?}: {b:?}");
        assert_eq!(h.sims[1].messages(), 0, "{dead:?}");
        // The last DSN comes within seconds of the last lifetime's end (a
        // blackhole's job in flight waits out helo_timeout, 2 s).
        assert!(
            after < LIFETIME + Duration::from_secs(8),
            "{dead:?}: last DSN {after:?} after the last message"
        );
        assert_eq!(h.stop_relay().undelivered, 0, "{dead:?}");
        silent.stop();
    }
}

/// Messages whose lifetime ended while the relay was down fail as soon as
/// it starts again, each with its DSN: none is left queued for ever.
#[test]
fn lifetimes_that_ended_while_the_relay_was_down_fail_at_the_start() {
    const N: usize = 20;
    let clock = Arc::new(ManualClock::new(SystemTime::now()));
    let mut h = Harness::with_clock(
        Profile {
            peer_addr: [None, Some(refusing()), None],
            extra_relay: "queue_lifetime = 1h\n".into(),
            ..Profile::default()
        },
        clock.clone(),
    );
    send_to_b(&h, N);
    h.stop_relay();
    clock.advance(Duration::from_secs(2 * 3600));
    h.restart();
    wait_until("every recipient failed", || h.peer(1).failed == N as u64);
    assert!(
        h.sims[0].wait_for_recipients(N as u64, DEADLINE),
        "DSNs at A: {}",
        h.sims[0].recipients()
    );
    // The expirer counts a failure and sends its DSN before it takes the
    // message off the queue: the last one may still be on it for a moment.
    let relay = h.relay.as_ref().unwrap();
    wait_until("nothing queued for B", || relay.queue().queued_len(1) == 0);
    assert_eq!(h.stop_relay().undelivered, 0);
}

/// A message that came already expired (X-Mms-Expiry in the past) still
/// gets its first attempt; at a peer that never takes it, it fails a
/// minute after its acceptance, not never.
#[test]
fn an_already_expired_message_at_a_held_peer_fails_after_its_first_attempt_grace() {
    let clock = Arc::new(ManualClock::new(SystemTime::now()));
    let h = Harness::with_clock(Profile::default(), clock.clone());
    assert!(h.control("queue hold B").contains("held"));
    let old = String::from_utf8(forward_req(1, TO_B, 400))
        .unwrap()
        .replacen(
            "From:",
            "X-Mms-Expiry: Thu, 01 Jan 2026 00:00:00 +0000\r\nFrom:",
            1,
        );
    let mut c = h.client(LOCAL);
    assert_eq!(
        send_message(&mut c, FROM, &[TO_B], old.as_bytes()).code,
        250
    );
    let queue = h.relay.as_ref().unwrap().queue().clone();
    clock.advance(Duration::from_secs(59));
    assert!(queue.sync(DEADLINE));
    assert_eq!(
        h.peer(1).failed,
        0,
        "failed before its first attempt's minute"
    );
    clock.advance(Duration::from_secs(2));
    assert!(queue.sync(DEADLINE));
    wait_until("the expired message failed", || h.peer(1).failed == 1);
    assert!(h.sims[0].wait_for_recipients(1, DEADLINE));
}

#[test]
fn a_message_past_its_lifetime_fails_instead_of_retrying() {
    let mut h = Harness::with(Profile {
        min_connections: [1, 1, 0],
        extra_relay: "queue_lifetime = 300ms".into(),
        ..Profile::default()
    });
    h.sims[2].set_fault(Fault::TempFail);
    let mut c = h.client(LOCAL);
    send_forward(&mut c, 3, TO_C, 600);
    wait_until("the message to expire at C", || h.peer(2).failed == 1);
    assert!(h.peer(2).deferred >= 1, "it was retried before it expired");
    // The sender hears of it.
    assert!(h.sims[0].wait_for_recipients(1, DEADLINE));
    let dsn = String::from_utf8_lossy(&h.sims[0].received()[0].data).into_owned();
    assert!(dsn.contains("Status: 5.4.7"), "{dsn}");
    assert_eq!(h.stop_relay().undelivered, 0);
    assert_eq!(h.sims[2].recipients(), 0);
}
