//! Temporary failures and deferral: 4xx answers and lost connections are
//! retried until the peer recovers, a dead peer or a silent host holds up
//! nothing else, and retries back off on the relay's clock.

use std::sync::Arc;
use std::time::Duration;

use mm4relay::sim::{Fault, forward_req, send_load};

use crate::support::*;

#[test]
fn temporary_failures_are_retried_until_the_peer_recovers() {
    let mut h = Harness::start();
    h.sims[1].set_fault(Fault::TempFail);
    let n = 20;
    assert_eq!(send_load(h.addr, 2, load(&[TO_B], n)).accepted, n);
    // Ten transactions with only 4xx isolate the peer: one probe at a time.
    wait_until("B to be isolated", || !h.peer(1).healthy);
    assert_eq!(h.peer(1).allowance, 1);
    assert!(h.peer(1).deferred >= 10);
    assert_eq!(h.sims[1].recipients(), 0);
    h.sims[1].set_fault(Fault::None);
    assert!(h.sims[1].wait_for_recipients(n as u64, DEADLINE));
    assert_eq!(h.stop_relay().undelivered, 0);
    assert_eq!(h.sims[1].recipients(), n as u64, "delivered twice");
}

#[test]
fn a_connection_lost_after_data_defers_and_retries() {
    let mut h = Harness::start();
    h.sims[1].set_fault(Fault::DropAfterData);
    let mut c = h.client(LOCAL);
    send_forward(&mut c, 1, TO_B, 500);
    wait_until("a deferral at B", || h.peer(1).deferred >= 1);
    let error = h.peer(1).last_error;
    assert!(error.contains("possible duplicate"), "{error}");
    h.sims[1].set_fault(Fault::None);
    assert!(h.sims[1].wait_for_recipients(1, DEADLINE));
    assert_eq!(h.stop_relay().undelivered, 0);
}

#[test]
fn a_peer_answering_421_is_retried_on_a_new_connection() {
    let mut h = Harness::with(Profile {
        min_connections: [1, 1, 0],
        ..Profile::default()
    });
    h.sims[2].set_fault(Fault::Busy);
    let mut c = h.client(LOCAL);
    send_forward(&mut c, 1, TO_C, 500);
    wait_until("a deferral at C", || h.peer(2).deferred >= 1);
    assert!(
        h.peer(2).last_error.contains("421"),
        "{}",
        h.peer(2).last_error
    );
    h.sims[2].set_fault(Fault::None);
    assert!(h.sims[2].wait_for_recipients(1, DEADLINE));
    assert_eq!(h.stop_relay().undelivered, 0);
}

#[test]
fn a_dead_peer_does_not_hold_up_the_others() {
    let mut h = Harness::with(Profile {
        min_connections: [1, 1, 0],
        ..Profile::default()
    });
    h.sims[2].set_fault(Fault::NoGreeting);
    let per_peer = 100;
    let report = send_load(h.addr, 6, load(&[TO_A, TO_B, TO_C], 3 * per_peer));
    assert_eq!(
        report.accepted,
        3 * per_peer,
        "accepting must not wait for C"
    );
    assert!(h.sims[0].wait_for_recipients(per_peer as u64, DEADLINE));
    assert!(h.sims[1].wait_for_recipients(per_peer as u64, DEADLINE));
    wait_until("C's greeting to time out", || {
        h.peer(2).last_error.contains("timed out")
    });
    assert_eq!(h.sims[2].recipients(), 0);
    assert_eq!(h.peer(2).sent, 0);
    // Everything for C is still held by the relay, nothing was dropped.
    let stop = h.stop_relay();
    assert_eq!(
        stop.undelivered, per_peer,
        "C's messages must all still be queued"
    );
}

#[test]
fn a_silent_host_is_marked_down_and_the_next_host_takes_over() {
    use mm4relay::config::Config;
    use mm4relay::relay::Relay;
    use mm4relay::sim::SimPeer;
    let silent = SimPeer::start(false).unwrap();
    silent.set_fault(Fault::NoGreeting);
    let good = SimPeer::start(true).unwrap();
    let spool = tempfile::tempdir().unwrap();
    let ini = format!(
        "[relay]\nhostname = relay.test\nspool_dir = {}\nbalance_interval = 50ms\ncontrol_socket =\n\
         [listener]\nlisten = 127.0.0.1:0\n\
         [peer.B]\nhosts = {}, {}\ndomains = mms.mnc020.mcc001.gprs\nmin_connections = 0\nmax_connections = 1\n\
         helo_timeout = 500ms\nprobe_min = 30s\nprobe_max = 60s\nmax_messages_per_connection = 5\n",
        spool.path().display(),
        silent.addr(),
        good.addr()
    );
    let relay = Relay::start(&Config::parse(&ini, std::path::Path::new("t.ini")).unwrap()).unwrap();
    let n = 20;
    assert_eq!(
        send_load(relay.local_addrs()[0], 2, load(&[TO_B], n)).accepted,
        n
    );
    assert!(good.wait_for_recipients(n as u64, DEADLINE));
    let snap = relay.peer_snapshots()[0].clone();
    assert_eq!(relay.shutdown().undelivered, 0);
    // Four reconnects (five messages a connection), one try of the silent host.
    assert_eq!(silent.connections(), 1, "a host marked down is tried last");
    assert_eq!(good.connections(), 4);
    assert!(
        snap.healthy,
        "one silent host of two does not make the peer unhealthy"
    );
}

/// The retry schedule and expiry, on a clock the test moves: no sleeping.
/// retry_min 60s (so retry_max 240s), queue_lifetime 10m. Message 1 has
/// only the queue lifetime; message 2 says `X-Mms-Expiry: 100` (seconds).
#[test]
fn retries_back_off_and_expire_on_the_relay_clock() {
    use mm4relay::sys::clock::ManualClock;
    let start = std::time::SystemTime::now();
    let clock = Arc::new(ManualClock::new(start));
    let mut h = Harness::with_clock(
        Profile {
            retry_min_ms: 60_000,
            extra_relay: "queue_lifetime = 10m\n".into(),
            ..Profile::default()
        },
        clock.clone(),
    );
    h.sims[1].set_fault(Fault::TempFail);
    let mut c = h.client(LOCAL);
    let first = send_message(&mut c, FROM, &[TO_B], &forward_req(1, TO_B, 500));
    let with_expiry = String::from_utf8(forward_req(2, TO_B, 500))
        .unwrap()
        .replacen("From:", "X-Mms-Expiry: 100\r\nFrom:", 1);
    let second = send_message(&mut c, FROM, &[TO_B], with_expiry.as_bytes());
    assert_eq!((first.code, second.code), (250, 250));
    let queue = h.relay.as_ref().unwrap().queue().clone();
    let attempts = |h: &Harness| h.peer(1).deferred + h.peer(1).failed;
    wait_until("the first attempts", || attempts(&h) == 2);

    // Moves the clock to `at` seconds after the start, lets the manager
    // act on it, and checks the attempts made so far.
    let mut now = 0;
    let mut step = |to: u64, want: u64| {
        clock.advance(Duration::from_secs(to - now));
        now = to;
        assert!(queue.sync(DEADLINE), "queue manager did not answer");
        wait_until(&format!("{want} attempts at +{to}s"), || {
            attempts(&h) == want
        });
        // Nothing more happens at this time: ask the manager once more.
        assert!(queue.sync(DEADLINE));
        assert_eq!(attempts(&h), want, "at +{to}s");
    };
    step(59, 2); // first retry due at +60s
    step(60, 4); // both retried (attempt 2); next in 120s: +180s
    step(99, 4);
    // +100s: message 2's X-Mms-Expiry: the queue fails it then (its
    // timers are whole seconds: by +101s), not at its next retry (+180s).
    step(101, 5);
    assert_eq!(h.peer(1).failed, 1);
    step(179, 5);
    step(180, 6); // message 1's attempt 3 fails again (next +420s)
    step(419, 6);
    step(420, 7); // attempt 4; next after 240s (the cap): +660s
    step(599, 7);
    // +600s: the 10m queue lifetime ends, before that retry: 5.4.7.
    step(601, 8);
    assert_eq!(h.peer(1).failed, 2);
    assert_eq!(h.sims[1].messages(), 0);
    // Both failures were reported to the local sender.
    assert!(h.sims[0].wait_for_recipients(2, DEADLINE));
    let dsns = h.sims[0].received();
    assert!(
        dsns.iter().all(|m| m.from.is_empty()),
        "null sender on DSNs"
    );
    assert!(
        dsns.iter()
            .all(|m| String::from_utf8_lossy(&m.data).contains("5.4.7")),
        "expiry named in the DSN"
    );
    assert_eq!(h.stop_relay().undelivered, 0);
}
