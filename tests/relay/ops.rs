//! What an operator does and sees: queue hold, release, retry, show and
//! delete over the control socket, holds across a restart, and the
//! metrics scraped over HTTP.

use mm4relay::sim::{Fault, forward_req, send_load};

use crate::support::*;

#[test]
fn an_operator_can_hold_release_and_retry() {
    let mut h = Harness::with(Profile {
        retry_min_ms: 3_600_000,
        ..Profile::default()
    });
    // Hold B: its messages stay queued and no connection is used.
    assert!(h.control("queue hold B").contains("held"));
    wait_until("B's connection to close", || {
        h.peer(1).connections_open == 0
    });
    assert_eq!(send_load(h.addr, 2, load(&[TO_B], 5)).accepted, 5);
    wait_until("B's messages to wait", || {
        h.peer(1).pool_depth + h.peer(1).overflow == 5
    });
    assert_eq!(h.peer(1).connections_open, 0);
    assert_eq!(h.sims[1].recipients(), 0);
    // Look at one of them, then delete it.
    let list = h.control("queue list B");
    assert_eq!(list.lines().count(), 5, "{list}");
    let id = list.split_whitespace().next().unwrap().to_string();
    let show = h.control(&format!("queue show {id}"));
    assert!(
        show.contains(&format!("id={id}")) && show.contains("peer=B"),
        "{show}"
    );
    assert!(
        show.contains("X-Mms-Message-Type: MM4_forward.REQ"),
        "{show}"
    );
    // The content as mail-parser reads it: no Subject, one text part.
    assert!(
        show.contains("\ncontent: subject=\"\"\n  part 1: text/plain "),
        "{show}"
    );
    assert!(
        h.control(&format!("queue delete {id} sent in error"))
            .contains("deleted")
    );
    assert!(h.control(&format!("queue show {id}")).starts_with("error:"));
    assert!(h.control("queue release B").contains("released"));
    assert!(h.sims[1].wait_for_recipients(4, DEADLINE));

    // A deferral an hour away, retried now by the operator.
    h.sims[2].set_fault(Fault::TempFail);
    let mut c = h.client(LOCAL);
    send_forward(&mut c, 1, TO_C, 500);
    wait_until("C's deferral", || h.peer(2).waiting_retry == 1);
    h.sims[2].set_fault(Fault::None);
    assert!(h.control("queue retry C").contains("retrying"));
    assert!(h.sims[2].wait_for_recipients(1, DEADLINE));
    assert!(h.control("queue retry nobody").starts_with("error:"));
    assert_eq!(h.stop_relay().undelivered, 0);
    assert_eq!(h.sims[1].recipients(), 4, "the deleted message was sent");
}

#[test]
fn a_held_message_waits_and_goes_when_released() {
    let (mut h, mut c, id) = held_at_b();
    assert!(h.control("queue hold NOSUCH").starts_with("error"));
    h.sims[1].set_fault(Fault::None);
    // Another message to B goes; the held one stays.
    send_forward(&mut c, 2, TO_B, 500);
    assert!(h.sims[1].wait_for_recipients(1, DEADLINE));
    h.control("queue retry all");
    // The retry makes it due; being held, it is parked, not sent.
    wait_until("the held job parked", || {
        h.peer(1).waiting_retry == 1 && h.peer(1).overflow == 0
    });
    assert_eq!(h.sims[1].recipients(), 1);
    assert!(
        h.control(&format!("queue release {id}"))
            .contains("released")
    );
    assert!(h.sims[1].wait_for_recipients(2, DEADLINE));
    assert_eq!(h.stop_relay().undelivered, 0);
}

#[test]
fn holds_survive_a_restart() {
    let (mut h, c, id) = held_at_b();
    assert!(h.control("queue hold C").contains("held"));
    drop(c);
    h.restart();
    assert!(h.peer(2).held, "C is held again");
    assert!(!h.peer(0).held && !h.peer(1).held);
    h.sims[1].set_fault(Fault::None);
    let mut c = h.client(LOCAL);
    for (i, to) in [(2, TO_C), (3, TO_B)] {
        send_forward(&mut c, i, to, 500);
    }
    // B is up: the new message goes, the held one is parked when due.
    assert!(h.sims[1].wait_for_recipients(1, DEADLINE));
    h.control("queue retry all");
    wait_until("the held job parked", || {
        h.peer(1).waiting_retry == 1 && h.peer(1).overflow == 0
    });
    wait_until("C's message to wait", || {
        h.peer(2).pool_depth + h.peer(2).overflow == 1
    });
    assert_eq!(h.peer(2).connections_open, 0);
    assert_eq!((h.sims[1].recipients(), h.sims[2].recipients()), (1, 0));
    assert!(
        h.control(&format!("queue release {id}"))
            .contains("released")
    );
    assert!(h.control("queue release C").contains("released"));
    assert!(h.sims[1].wait_for_recipients(2, DEADLINE));
    assert!(h.sims[2].wait_for_recipients(1, DEADLINE));
    // Released is released for good.
    h.restart();
    assert!(!h.peer(2).held);
    assert_eq!(h.stop_relay().undelivered, 0);
}

#[test]
fn metrics_are_scraped_over_http() {
    use std::io::{Read, Write};
    let mut h = Harness::with(Profile {
        extra_relay: "metrics_listen = 127.0.0.1:0".into(),
        ..Profile::default()
    });
    let addr = h
        .relay
        .as_ref()
        .unwrap()
        .metrics_addr()
        .expect("metrics on");
    assert_eq!(send_load(h.addr, 2, load(&[TO_B], 3)).accepted, 3);
    assert!(h.sims[1].wait_for_recipients(3, DEADLINE));
    let mut c = h.client(LOCAL);
    assert_eq!(c.cmd("EHLO t").code, 250);
    assert_eq!(c.cmd(&format!("MAIL FROM:<{FROM}>")).code, 250);
    assert_eq!(c.cmd("RCPT TO:<nobody@example.org>").code, 550);
    let scrape = || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        text
    };
    let value = |text: &str, series: &str| -> f64 {
        let line = text
            .lines()
            .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '));
        line.unwrap_or_else(|| panic!("no {series} in\n{text}"))
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    wait_until("the sent counter to reach 3", || {
        value(
            &scrape(),
            "mm4relay_recipients_total{peer=\"B\",outcome=\"sent\"}",
        ) == 3.0
    });
    let text = scrape();
    assert!(
        text.starts_with("HTTP/1.0 200") || text.starts_with("HTTP/1.1 200"),
        "{text}"
    );
    assert_eq!(value(&text, "mm4relay_messages_accepted_total"), 3.0);
    // The profile's one [ported] entry, and when the table was loaded.
    assert_eq!(value(&text, "mm4relay_ported_entries"), 1.0);
    assert!(value(&text, "mm4relay_ported_loaded_timestamp_seconds") > 1.7e9);
    assert_eq!(
        value(
            &text,
            "mm4relay_recipients_rejected_total{reason=\"unroutable\"}"
        ),
        1.0
    );
    assert_eq!(
        value(&text, "mm4relay_delivery_delay_seconds_count{peer=\"B\"}"),
        3.0
    );
    assert_eq!(
        value(
            &text,
            "mm4relay_delivery_delay_seconds_bucket{peer=\"B\",le=\"+Inf\"}"
        ),
        3.0
    );
    assert_eq!(value(&text, "mm4relay_peer_healthy{peer=\"A\"}"), 1.0);
    assert_eq!(value(&text, "mm4relay_tls_sessions_total"), 0.0);
    assert_eq!(value(&text, "mm4relay_connections_refused_total"), 0.0);
    // The load's sessions are closing; the scripted client stays.
    wait_until("one session open", || {
        value(&scrape(), "mm4relay_sessions_open") == 1.0
    });
    assert!(text.contains("# TYPE mm4relay_delivery_delay_seconds histogram"));
    h.stop_relay();
}

/// A relay whose peer B defers, and a message to B held by the operator
/// after its first deferral: the harness, the client, the queue ID.
fn held_at_b() -> (Harness, Client, String) {
    let h = Harness::start();
    h.sims[1].set_fault(Fault::TempFail);
    let mut c = h.client(LOCAL);
    let reply = send_message(&mut c, FROM, &[TO_B], &forward_req(1, TO_B, 500));
    let id = queued_as(&reply);
    wait_until("B's deferral", || h.peer(1).deferred > 0);
    assert!(h.control(&format!("queue hold {id}")).contains("held"));
    (h, c, id)
}
