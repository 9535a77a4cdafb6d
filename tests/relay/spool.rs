//! The spool: queued messages survive restarts, a quick restart reuses no
//! queue ID, a full spool or disk refuses with 452 and recovers, and a
//! down peer does not pin the space of what was delivered.

use std::sync::Arc;

use mm4relay::sim::{Fault, forward_req, send_load};

use crate::support::*;

#[test]
fn queued_messages_survive_a_restart_and_the_spool_drains() {
    let mut h = Harness::with(Profile {
        min_connections: [1, 1, 0],
        ..Profile::default()
    });
    h.sims[2].set_fault(Fault::TempFail);
    let n = 30;
    assert_eq!(send_load(h.addr, 3, load(&[TO_C], n)).accepted, n);
    wait_until("every message to C deferred once", || {
        h.peer(2).deferred >= n as u64
    });
    let stop = h.restart();
    assert_eq!(
        stop.undelivered, n,
        "all of C's messages must wait in the spool"
    );
    assert!(h.spool_bytes() > (n * 2048) as u64);
    h.sims[2].set_fault(Fault::None);
    assert!(h.sims[2].wait_for_recipients(n as u64, DEADLINE));
    wait_until("the spool to drain", || h.spool_bytes() < 4096);
    assert_eq!(h.stop_relay().undelivered, 0);
    assert_eq!(h.sims[2].recipients(), n as u64, "delivered twice");
    // Each message arrived once and whole.
    let mut tids: Vec<String> = h.sims[2]
        .received()
        .iter()
        .map(|r| tid_of(strip_trace(&r.data)))
        .collect();
    tids.sort();
    tids.dedup();
    assert_eq!(tids.len(), n);
}

/// The spool keys every record by queue ID. A restart within the same
/// second (here: on a clock that stands still) must not hand out an ID a
/// queued message still has, or the two messages' records mix at the next
/// recovery: one is delivered twice, and the other could be marked done
/// without being delivered.
#[test]
fn a_quick_restart_never_reuses_a_queued_id() {
    use mm4relay::sys::clock::ManualClock;
    let clock = Arc::new(ManualClock::new(std::time::SystemTime::now()));
    let mut h = Harness::with_clock(Profile::default(), clock);
    h.sims[2].set_fault(Fault::TempFail);
    let mut c = h.client(LOCAL);
    let first = queued_as(&send_message(
        &mut c,
        FROM,
        &[TO_C],
        &forward_req(1, TO_C, 500),
    ));
    wait_until("C's deferral", || h.peer(2).deferred > 0);
    drop(c);
    h.restart();
    let mut c = h.client(LOCAL);
    let second = queued_as(&send_message(
        &mut c,
        FROM,
        &[TO_C],
        &forward_req(2, TO_C, 500),
    ));
    assert!(second > first, "{second} reuses or precedes {first}");
    // Both are still distinct messages after yet another restart.
    drop(c);
    h.restart();
    h.sims[2].set_fault(Fault::None);
    h.control("queue retry C");
    assert!(h.sims[2].wait_for_recipients(2, DEADLINE));
    let mut tids: Vec<String> = h.sims[2]
        .received()
        .iter()
        .map(|m| {
            let text = String::from_utf8_lossy(&m.data).into_owned();
            let at = text.find("X-Mms-Transaction-ID: ").unwrap() + 22;
            text[at..at + 9].to_string()
        })
        .collect();
    tids.sort();
    assert_eq!(tids, ["T00000001", "T00000002"], "each exactly once");
    assert_eq!(h.stop_relay().undelivered, 0);
}

/// With C deferring everything, fills the spool until the relay says 452
/// 4.3.1; then lets C recover and checks that everything accepted is
/// delivered, the space comes back and accepting resumes with no restart.
fn fill_until_full_then_recover(profile: Profile, at_least: usize) {
    let mut h = Harness::with(profile);
    h.sims[2].set_fault(Fault::TempFail);
    let mut c = h.client(LOCAL);
    let mut accepted = 0;
    let reply = loop {
        let r = send_message(&mut c, FROM, &[TO_C], &forward_req(accepted, TO_C, 2048));
        if r.code != 250 {
            break r;
        }
        accepted += 1;
        assert!(accepted < 500, "the spool never filled");
    };
    assert_eq!((reply.code, &reply.text()[..5]), (452, "4.3.1"), "{reply}");
    assert!(accepted >= at_least, "only {accepted} accepted");
    h.sims[2].set_fault(Fault::None);
    assert!(
        h.sims[2].wait_for_recipients(accepted as u64, DEADLINE),
        "accepted messages are still delivered"
    );
    wait_until("space to return", || h.spool_bytes() < 4096);
    send_forward(&mut c, 999, TO_C, 2048);
    assert!(h.sims[2].wait_for_recipients(accepted as u64 + 1, DEADLINE));
    assert_eq!(h.stop_relay().undelivered, 0);
}

#[test]
fn a_full_spool_refuses_with_452_and_still_delivers() {
    fill_until_full_then_recover(
        Profile {
            min_connections: [1, 1, 0],
            extra_relay: "spool_max_bytes = 20000".into(),
            ..Profile::default()
        },
        5,
    );
}

#[test]
fn a_down_peer_does_not_pin_the_space_of_what_was_delivered() {
    // Small segments, so that nearly every one holds a message for C; a
    // limit well under what passes through.
    let mut h = Harness::with(Profile {
        min_connections: [1, 1, 0],
        extra_relay: "spool_max_bytes = 1000000\nspool_segment_size = 32768".into(),
        ..Profile::default()
    });
    h.sims[2].set_fault(Fault::TempFail);
    let (n, to_c) = (1000, 50);
    let mut rcpts = vec![TO_A; 19];
    rcpts.push(TO_C);
    // About 2.4 MB in all, 120 kB of it for C.
    let report = send_load(h.addr, 4, load(&rcpts, n));
    assert_eq!(
        report.accepted, n,
        "the spool must not fill with what A already has"
    );
    assert!(h.sims[0].wait_for_recipients((n - to_c) as u64, DEADLINE));
    wait_until("C's messages to be deferred", || {
        h.peer(2).deferred >= to_c as u64
    });
    // Live: C's 120 kB. Dead space is bounded by the live octets or a
    // segment, whichever is more, plus the active segment.
    wait_until("the space of what A has to come back", || {
        h.spool_bytes() < 400_000
    });
    // status says so: C's octets are live, and compaction ran.
    let status = h.control("status");
    let line = status.lines().find(|l| l.starts_with("spool: ")).unwrap();
    let figures: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    let (bytes, live, compactions) = (figures[0], figures[1], figures[3]);
    assert!(live >= (to_c * 2000) as u64 && live <= bytes, "{line}");
    assert!(compactions > 0, "{line}");
    h.sims[2].set_fault(Fault::None);
    assert!(h.sims[2].wait_for_recipients(to_c as u64, DEADLINE));
    wait_until("the spool to drain", || h.spool_bytes() < 4096);
    assert_eq!(h.stop_relay().undelivered, 0);
    assert_eq!(h.sims[2].recipients(), to_c as u64, "delivered twice");
    assert_eq!(h.sims[0].recipients(), (n - to_c) as u64, "delivered twice");
}

#[test]
#[ignore = "needs root"]
fn a_full_disk_refuses_with_452_and_accepts_again_when_space_returns() {
    assert!(Tmpfs::available(), "needs root to mount a small tmpfs");
    fill_until_full_then_recover(
        Profile {
            min_connections: [1, 1, 0],
            spool_tmpfs_kib: Some(96),
            ..Profile::default()
        },
        10,
    );
}
