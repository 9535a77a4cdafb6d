//! Reloading the configuration: new routes apply at once and what needs a
//! restart is refused, reloads under load lose and duplicate nothing, and
//! peers added or removed keep their queues.

use std::time::Duration;

use mm4relay::sim::{Fault, send_load};

use crate::support::*;

/// The reply code to `RCPT TO:<rcpt>` in a new session from the local MMSC.
fn rcpt_code(h: &Harness, rcpt: &str) -> u16 {
    let mut c = h.client(LOCAL);
    assert_eq!(c.cmd("EHLO t").code, 250);
    assert_eq!(c.cmd(&format!("MAIL FROM:<{FROM}>")).code, 250);
    c.cmd(&format!("RCPT TO:<{rcpt}>")).code
}

#[test]
fn a_reload_applies_new_routes_and_refuses_what_needs_a_restart() {
    let mut h = Harness::start();
    let rcpt = "ops@example.org";
    assert_eq!(rcpt_code(&h, rcpt), 550);
    let ini = h.ini();
    // A new listen address needs a restart: refused, nothing changes.
    let moved = ini.replace("listen = 127.0.0.1:0", "listen = 127.0.0.1:0, 127.0.0.2:0");
    let err = h.reload(&moved).unwrap_err();
    assert!(err.contains("restart"), "{err}");
    // A new domain for B applies at once, to sessions already open too.
    let mut open = h.client(LOCAL);
    assert_eq!(open.cmd("EHLO t").code, 250);
    assert_eq!(open.cmd(&format!("MAIL FROM:<{FROM}>")).code, 250);
    let wider = ini.replace(
        "domains = mms.mnc020.mcc001.gprs",
        "domains = mms.mnc020.mcc001.gprs, example.org",
    );
    h.reload(&wider).unwrap();
    assert_eq!(open.cmd(&format!("RCPT TO:<{rcpt}>")).code, 250);
    assert_eq!(rcpt_code(&h, rcpt), 250);
    let mut c = h.client(LOCAL);
    send_forward(&mut c, 9, rcpt, 500);
    assert!(h.sims[1].wait_for_recipients(1, DEADLINE));

    // Per-peer settings: B down to one connection applies; more workers
    // than were started would need a restart.
    let (head, b) = wider.split_once("[peer.B]").unwrap();
    let with_b = |max: &str| {
        format!(
            "{head}[peer.B]{}",
            b.replacen("max_connections = 4", max, 1)
        )
    };
    let err = h.reload(&with_b("max_connections = 9")).unwrap_err();
    assert!(err.contains("restart"), "{err}");
    h.reload(&with_b("max_connections = 1")).unwrap();
    h.sims[1].set_fault(Fault::Delay(Duration::from_millis(10)));
    assert_eq!(send_load(h.addr, 4, load(&[TO_B], 40)).accepted, 40);
    assert!(h.sims[1].wait_for_recipients(41, DEADLINE));
    assert_eq!(h.peer(1).allowance, 1, "B stays at its new max of one");
    assert_eq!(h.stop_relay().undelivered, 0);
}

#[test]
fn reloads_under_load_lose_and_duplicate_nothing() {
    let mut h = Harness::start();
    let n = 600;
    let addr = h.addr;
    let load = std::thread::spawn(move || send_load(addr, 6, load(&[TO_A, TO_B, TO_C], n)));
    let ini = h.ini();
    let mut reloads = 0;
    while !load.is_finished() && reloads < 50 {
        // Alternate two valid files (A's keepalive differs).
        let next = if reloads % 2 == 0 {
            ini.replacen("keepalive = 5s", "keepalive = 6s", 1)
        } else {
            ini.clone()
        };
        h.reload(&next).unwrap();
        reloads += 1;
    }
    let report = load.join().unwrap();
    assert_eq!(report.accepted, n);
    let each = (n / 3) as u64;
    for sim in &h.sims {
        assert!(sim.wait_for_recipients(each, DEADLINE));
    }
    assert_eq!(h.stop_relay().undelivered, 0);
    let got: Vec<u64> = h.sims.iter().map(|s| s.recipients()).collect();
    eprintln!("{reloads} reloads under load: sent {n}, received {got:?}");
    assert_eq!(got, [each; 3], "lost or duplicated across reloads");
    assert!(reloads > 0);
}

/// `ini` without peer C (and the ported number that pointed at it).
fn without_c(ini: &str) -> String {
    let (head, rest) = ini.split_once("[peer.C]").unwrap();
    let (_, tail) = rest.split_once("[ported]").unwrap();
    let tail = tail.replacen("+12025550177 = C\n", "", 1);
    format!("{head}[ported]{tail}")
}

#[test]
fn a_peer_missing_at_start_gets_its_queue_when_a_reload_adds_it() {
    let mut h = Harness::start();
    let ini = h.ini();
    h.sims[2].set_fault(Fault::TempFail);
    let mut c = h.client(LOCAL);
    send_forward(&mut c, 1, TO_C, 500);
    wait_until("C's deferral", || h.peer(2).deferred > 0);
    drop(c);
    // Started without C: its message stays in the spool.
    let stop = h.restart_with(&without_c(&ini));
    assert_eq!(stop.undelivered, 1);
    assert_eq!(rcpt_code(&h, TO_C), 550);
    h.sims[2].set_fault(Fault::None);
    h.reload(&ini).unwrap();
    assert!(
        h.sims[2].wait_for_recipients(1, DEADLINE),
        "the message kept in the spool goes once C is back"
    );
    assert_eq!(h.stop_relay().undelivered, 0);
    assert_eq!(h.sims[2].recipients(), 1);
}

#[test]
fn a_reload_adds_and_removes_peers_without_losing_their_queue() {
    let mut h = Harness::start();
    let ini = h.ini();
    // D: a new partner MMSC, for a new domain.
    let d = mm4relay::sim::SimPeer::start(true).unwrap();
    let to_d = "+33612345678/TYPE=PLMN@mms.mnc001.mcc208.gprs";
    let with_d = format!(
        "{ini}\n[peer.D]\nhosts = {}\ndomains = mms.mnc001.mcc208.gprs\nmin_connections = 1\nmax_connections = 2\n",
        d.addr()
    );
    assert_eq!(rcpt_code(&h, to_d), 550, "no route yet");
    h.reload(&with_d).unwrap();
    let mut c = h.client(LOCAL);
    send_forward(&mut c, 1, to_d, 500);
    assert!(
        d.wait_for_recipients(1, DEADLINE),
        "the added peer delivers"
    );
    assert!(h.control("status").lines().any(|l| l.starts_with("D ")));

    // C goes away while it is down: its queued message stays, reported.
    h.sims[2].set_fault(Fault::TempFail);
    let mut c = h.client(LOCAL);
    send_forward(&mut c, 2, TO_C, 500);
    wait_until("C's deferral", || h.peer(2).deferred > 0);
    h.reload(&without_c(&with_d)).unwrap();
    let status = h.control("status");
    let c_row = status
        .lines()
        .find(|l| l.starts_with("C "))
        .unwrap()
        .to_string();
    assert!(c_row.contains("removed"), "{status}");
    let snap = &h.relay.as_ref().unwrap().peer_snapshots()[2];
    assert_eq!(
        snap.pool_depth + snap.overflow + snap.waiting_retry,
        1,
        "{status}"
    );
    assert_eq!(h.control("queue list C").lines().count(), 1, "still listed");
    assert_eq!(rcpt_code(&h, TO_C), 550, "C takes nothing new");
    // C comes back, healthy: its queued message goes.
    h.sims[2].set_fault(Fault::None);
    h.reload(&with_d).unwrap();
    h.control("queue retry C");
    assert!(
        h.sims[2].wait_for_recipients(1, DEADLINE),
        "the kept message went"
    );
    assert_eq!(h.sims[2].received().len(), 1, "and only once");
    assert_eq!(h.stop_relay().undelivered, 0);
    d.stop();
}
