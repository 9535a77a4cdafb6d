//! Delivery behaviour over loopback: routing and splitting, persistent
//! connections, relay control, and how faults at one peer are handled.

use std::sync::Arc;
use std::time::Duration;

use mm4relay::sim::{Fault, Outgoing, forward_req, send_load};

use crate::support::*;

/// Ported: B's prefix and domain, but routed to C.
const TO_PORTED: &str = "+12025550177/TYPE=PLMN@mms.mnc020.mcc001.gprs";

/// The reply code to `RCPT TO:<rcpt>` in a new session from the local MMSC.
fn rcpt_code(h: &Harness, rcpt: &str) -> u16 {
    let mut c = h.client(LOCAL);
    assert_eq!(c.cmd("EHLO t").code, 250);
    assert_eq!(c.cmd(&format!("MAIL FROM:<{FROM}>")).code, 250);
    c.cmd(&format!("RCPT TO:<{rcpt}>")).code
}

fn load(rcpts: &[&str], n: usize) -> Arc<Vec<Outgoing>> {
    Arc::new(
        (0..n)
            .map(|i| {
                let rcpt = rcpts[i % rcpts.len()].to_string();
                Outgoing {
                    from: FROM.into(),
                    data: forward_req(i, &rcpt, 2048),
                    rcpts: vec![rcpt],
                }
            })
            .collect(),
    )
}

#[test]
fn splits_by_peer_and_keeps_the_body_byte_identical() {
    let mut h = Harness::start();
    let body = fixture("forward_split.eml");
    let mut c = h.client(LOCAL);
    let reply = send_message(&mut c, FROM, &[TO_A, TO_B, TO_PORTED, TO_C], &body);
    assert_eq!(reply.code, 250, "{reply}");
    assert!(reply.text().contains("queued as"));
    for (i, want) in [1, 1, 2].into_iter().enumerate() {
        assert!(h.sims[i].wait_for_recipients(want, DEADLINE), "peer {i}");
    }
    let expected: [&[&str]; 3] = [&[TO_A], &[TO_B], &[TO_PORTED, TO_C]];
    for (i, sim) in h.sims.iter().enumerate() {
        let got = sim.received();
        assert_eq!(got.len(), 1, "peer {i}: one transaction per peer");
        assert_eq!(
            got[0].rcpts, expected[i],
            "peer {i} got another peer's recipients"
        );
        assert_eq!(got[0].from, FROM);
        assert_eq!(
            strip_trace(&got[0].data),
            body.as_slice(),
            "peer {i}: body changed"
        );
    }
    assert_eq!(h.stop_relay().undelivered, 0);
}

#[test]
fn many_messages_use_few_persistent_connections() {
    let mut h = Harness::with(Profile {
        max_connections: [2, 3, 2],
        ..Profile::default()
    });
    let n = 600;
    let report = send_load(h.addr, 6, load(&[TO_B], n));
    assert_eq!(report.accepted, n);
    assert!(h.sims[1].wait_for_recipients(n as u64, DEADLINE));
    // The sink counts before it answers: wait for the relay to hear the 250s.
    wait_until("B's sent counter", || h.peer(1).sent == n as u64);
    h.stop_relay();
    let b = &h.sims[1];
    assert!(
        b.connections() <= 3,
        "{} connections to B for {n} messages",
        b.connections()
    );
    assert!(b.max_open() <= 3);
    // The idle peers hold exactly their pre-established min_connections.
    assert_eq!(h.sims[0].connections(), 1);
    assert_eq!(h.sims[2].connections(), 1);
}

#[test]
fn relay_control_and_address_checks_at_rcpt() {
    let h = Harness::start();
    let expect = |client: &str, rcpt: &str, code: u16, status: &str| {
        let mut c = h.client(client);
        assert_eq!(c.cmd("EHLO t").code, 250);
        assert_eq!(c.cmd(&format!("MAIL FROM:<{FROM}>")).code, 250);
        let r = c.cmd(&format!("RCPT TO:<{rcpt}>"));
        assert_eq!(
            (r.code, &r.text()[..5]),
            (code, status),
            "{client} -> {rcpt}: {r}"
        );
    };
    expect(LOCAL, TO_C, 250, "2.1.5");
    expect(
        LOCAL,
        "+99955501234/TYPE=PLMN@mms.mnc099.mcc998.gprs",
        550,
        "5.1.2",
    );
    expect(LOCAL, "user@example.org", 550, "5.1.2");
    expect(
        LOCAL,
        "+4477OO900123/TYPE=PLMN@mms.mnc010.mcc001.gprs",
        553,
        "5.1.3",
    );
    expect(PARTNER_B, TO_A, 250, "2.1.5");
    expect(PARTNER_B, TO_C, 550, "5.7.1");
    expect(PARTNER_B, TO_B, 550, "5.7.1");
    expect(PARTNER_C, "mm4gw@mms.mnc010.mcc001.gprs", 250, "2.1.5");
    expect(UNKNOWN, TO_A, 550, "5.7.1");
}

#[test]
fn a_report_from_a_partner_reaches_the_local_mmsc() {
    let h = Harness::start();
    let mut c = h.client(PARTNER_B);
    let reply = send_message(
        &mut c,
        "mm4@mms.mnc020.mcc001.gprs",
        &[FROM],
        &fixture("delivery_report.eml"),
    );
    assert_eq!(reply.code, 250, "{reply}");
    assert!(h.sims[0].wait_for_recipients(1, DEADLINE));
    // The same report to another recipient than its To header is refused.
    let reply = send_message(
        &mut c,
        "mm4@mms.mnc020.mcc001.gprs",
        &[TO_A],
        &fixture("delivery_report.eml"),
    );
    assert_eq!(reply.code, 554, "{reply}");
}

#[test]
fn smuggled_commands_in_data_are_refused_once() {
    let mut h = Harness::start();
    let mut c = h.client(LOCAL);
    assert_eq!(c.cmd("EHLO t").code, 250);
    assert_eq!(c.cmd(&format!("MAIL FROM:<{FROM}>")).code, 250);
    assert_eq!(c.cmd(&format!("RCPT TO:<{TO_B}>")).code, 250);
    assert_eq!(c.cmd("DATA").code, 354);
    c.send(&fixture("smuggling_raw.eml"));
    c.send(b"\r\n.\r\n");
    let r = c.reply();
    assert_eq!(r.code, 554, "{r}");
    assert!(r.text().contains("bare LF"), "{r}");
    assert_eq!(c.cmd("NOOP").code, 250, "a smuggled command was answered");
    assert_eq!(h.stop_relay().undelivered, 0);
    assert_eq!(h.sims[1].messages() + h.sims[0].messages(), 0);
}

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
    assert_eq!(
        send_message(&mut c, FROM, &[TO_B], &forward_req(1, TO_B, 500)).code,
        250
    );
    wait_until("a deferral at B", || h.peer(1).deferred >= 1);
    let error = h.peer(1).last_error;
    assert!(error.contains("possible duplicate"), "{error}");
    h.sims[1].set_fault(Fault::None);
    assert!(h.sims[1].wait_for_recipients(1, DEADLINE));
    assert_eq!(h.stop_relay().undelivered, 0);
}

#[test]
fn a_permanent_failure_is_not_retried() {
    let mut h = Harness::start();
    h.sims[1].set_fault(Fault::PermFail);
    let mut c = h.client(LOCAL);
    for i in 0..3 {
        assert_eq!(
            send_message(&mut c, FROM, &[TO_B], &forward_req(i, TO_B, 500)).code,
            250
        );
    }
    wait_until("3 failures at B", || h.peer(1).failed == 3);
    // The sender, at the local MMSC, hears of each: three DSNs to A.
    assert!(h.sims[0].wait_for_recipients(3, DEADLINE));
    assert_eq!(h.peer(1).deferred, 0, "a 5xx was retried");
    assert_eq!(h.sims[1].recipients(), 0);
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
    assert_eq!(
        send_message(&mut c, FROM, &[TO_C], &forward_req(1, TO_C, 500)).code,
        250
    );
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
fn sessions_over_the_limit_get_421_and_the_local_mmsc_has_room_of_its_own() {
    let h = Harness::with(Profile {
        extra_listener: "max_sessions = 2\nmax_local_sessions = 2".into(),
        ..Profile::default()
    });
    let first_line = |from: &str| {
        let socket = tcp_from(from, h.addr);
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(socket), &mut line).unwrap();
        line
    };
    // Partners and strangers fill max_sessions...
    let _b = h.client(PARTNER_B);
    let _x = h.client(UNKNOWN);
    assert!(first_line(PARTNER_C).starts_with("421 4.3.2"));
    // ...and the local MMSC still gets in, up to its own limit.
    let mut a1 = h.client(LOCAL);
    let _a2 = h.client(LOCAL);
    assert!(first_line(LOCAL).starts_with("421 4.3.2"));
    assert_eq!(
        send_message(&mut a1, FROM, &[TO_B], &forward_req(1, TO_B, 300)).code,
        250
    );
}

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

#[test]
fn a_resent_message_is_acknowledged_but_not_delivered_twice() {
    let mut h = Harness::start();
    let body = forward_req(42, TO_B, 600);
    let mut c = h.client(LOCAL);
    assert!(
        send_message(&mut c, FROM, &[TO_B], &body)
            .text()
            .contains("queued as")
    );
    let again = send_message(&mut c, FROM, &[TO_B], &body);
    assert_eq!(again.code, 250);
    assert!(again.text().contains("duplicate"), "{again}");
    // A new recipient of the same PDU is not a duplicate.
    let other = "+12025550199/TYPE=PLMN@mms.mnc020.mcc001.gprs";
    assert!(
        send_message(&mut c, FROM, &[TO_B, other], &body)
            .text()
            .contains("queued as")
    );
    assert!(h.sims[1].wait_for_recipients(2, DEADLINE));
    assert_eq!(h.stop_relay().undelivered, 0);
    assert_eq!(h.sims[1].recipients(), 2);
}

/// The likeliest moment to lose our 250 is a crash or restart: the
/// duplicate window survives it. The message was delivered before the
/// restart, yet its records are still in the spool (another message keeps
/// the segment), and the resent copy is answered 250 and not delivered.
#[test]
fn a_message_resent_after_a_restart_is_still_a_duplicate() {
    let mut h = Harness::start();
    // C stays down, so the segment with B's message is not cleaned away.
    h.sims[2].set_fault(Fault::TempFail);
    let body = forward_req(43, TO_B, 600);
    let mut c = h.client(LOCAL);
    assert_eq!(
        send_message(&mut c, FROM, &[TO_C], &forward_req(44, TO_C, 600)).code,
        250
    );
    assert!(
        send_message(&mut c, FROM, &[TO_B], &body)
            .text()
            .contains("queued as")
    );
    assert!(h.sims[1].wait_for_recipients(1, DEADLINE));
    drop(c);
    h.restart();
    let mut c = h.client(LOCAL);
    let again = send_message(&mut c, FROM, &[TO_B], &body);
    assert_eq!(again.code, 250);
    assert!(again.text().contains("duplicate"), "{again}");
    // Not a duplicate: the same PDU for a recipient it never had.
    let other = "+12025550199/TYPE=PLMN@mms.mnc020.mcc001.gprs";
    assert!(
        send_message(&mut c, FROM, &[other], &body)
            .text()
            .contains("queued as")
    );
    assert!(h.sims[1].wait_for_recipients(2, DEADLINE));
    h.sims[2].set_fault(Fault::None);
    h.control("queue retry C");
    assert!(h.sims[2].wait_for_recipients(1, DEADLINE));
    assert_eq!(h.stop_relay().undelivered, 0);
    assert_eq!(
        h.sims[1].recipients(),
        2,
        "B got the PDU once per recipient"
    );
}

#[test]
fn a_message_resent_after_a_clean_restart_is_a_duplicate_even_once_drained() {
    let mut h = Harness::start();
    let body = forward_req(45, TO_B, 600);
    let mut c = h.client(LOCAL);
    assert!(
        send_message(&mut c, FROM, &[TO_B], &body)
            .text()
            .contains("queued as")
    );
    assert!(h.sims[1].wait_for_recipients(1, DEADLINE));
    // Delivered and cleaned away: the journal no longer knows the message.
    wait_until("the spool to drain", || h.spool_bytes() == 0);
    drop(c);
    h.restart();
    let mut c = h.client(LOCAL);
    let again = send_message(&mut c, FROM, &[TO_B], &body);
    assert!(again.text().contains("duplicate"), "{again}");
    assert_eq!(h.stop_relay().undelivered, 0);
    assert_eq!(h.sims[1].recipients(), 1, "B got the PDU twice");
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
    assert_eq!(
        send_message(&mut c, FROM, &[TO_C], &forward_req(999, TO_C, 2048)).code,
        250
    );
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
fn a_failed_message_is_kept_and_its_sender_notified() {
    use mail_parser::{MessageParser, MimeHeaders};
    let mut h = Harness::start();
    h.sims[1].set_fault(Fault::PermFail);
    let mut c = h.client(LOCAL);
    let body = forward_req(7, TO_B, 600);
    assert_eq!(send_message(&mut c, FROM, &[TO_B], &body).code, 250);
    // The sender is a local subscriber: the notification goes to A.
    assert!(h.sims[0].wait_for_recipients(1, DEADLINE));
    let dsn = h.sims[0].received().remove(0);
    assert_eq!(dsn.from, "", "a notification has the null sender");
    assert_eq!(dsn.rcpts, [FROM]);
    let parsed = MessageParser::default()
        .parse(&dsn.data[..])
        .expect("DSN parses");
    let ct = parsed.content_type().unwrap();
    assert_eq!((ct.ctype(), ct.subtype()), ("multipart", Some("report")));
    assert_eq!(ct.attribute("report-type"), Some("delivery-status"));
    let status = parsed
        .parts
        .iter()
        .find(|p| {
            p.content_type()
                .is_some_and(|c| c.subtype() == Some("delivery-status"))
        })
        .expect("a message/delivery-status part");
    let text =
        String::from_utf8_lossy(&dsn.data[status.offset_body as usize..status.offset_end as usize])
            .into_owned();
    assert!(
        text.contains(&format!("Final-Recipient: rfc822; {TO_B}")),
        "{text}"
    );
    assert!(
        text.contains("Action: failed") && text.contains("Status: 5.0.0"),
        "{text}"
    );
    // The host that gave the 5xx, not the peer's name (B).
    assert!(text.contains("Remote-MTA: dns; 127.0.0.1\r\n"), "{text}");
    assert!(parsed.parts.iter().any(|p| {
        p.content_type()
            .is_some_and(|c| c.subtype() == Some("rfc822-headers"))
    }));

    // No notification about a notification: a null sender's failure is only kept.
    assert_eq!(
        send_message(&mut c, "", &[TO_B], &forward_req(8, TO_B, 600)).code,
        250
    );
    wait_until("both failures at B", || h.peer(1).failed == 2);
    let stop = h.stop_relay();
    assert_eq!(
        h.sims[0].recipients() + stop.undelivered as u64,
        1,
        "one notification in all"
    );
    let failed: Vec<String> = std::fs::read_dir(h.spool.path().join("failed"))
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .collect();
    assert_eq!(failed.len(), 2);
    assert!(
        failed
            .iter()
            .all(|f| f.contains("X-Mm4relay-Peer: B") && f.contains("X-Mms-Message-Type"))
    );
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
    assert_eq!(
        send_message(&mut c, FROM, &[TO_C], &forward_req(3, TO_C, 600)).code,
        250
    );
    wait_until("the message to expire at C", || h.peer(2).failed == 1);
    assert!(h.peer(2).deferred >= 1, "it was retried before it expired");
    // The sender hears of it.
    assert!(h.sims[0].wait_for_recipients(1, DEADLINE));
    let dsn = String::from_utf8_lossy(&h.sims[0].received()[0].data).into_owned();
    assert!(dsn.contains("Status: 5.4.7"), "{dsn}");
    assert_eq!(h.stop_relay().undelivered, 0);
    assert_eq!(h.sims[2].recipients(), 0);
}

#[test]
fn a_connection_is_recycled_after_max_messages() {
    let mut h = Harness::with(Profile {
        min_connections: [1, 1, 1],
        max_connections: [4, 1, 4],
        extra_peer: ["", "max_messages_per_connection = 10", ""],
        ..Profile::default()
    });
    let n = 50;
    assert_eq!(send_load(h.addr, 2, load(&[TO_B], n)).accepted, n);
    assert!(h.sims[1].wait_for_recipients(n as u64, DEADLINE));
    h.stop_relay();
    // One worker, ten messages a connection: five connections, all used up.
    assert_eq!(
        h.sims[1].connections(),
        5,
        "{} connections",
        h.sims[1].connections()
    );
    assert_eq!(h.sims[1].max_open(), 1);
}

#[test]
fn max_rate_caps_the_delivery_rate() {
    let mut h = Harness::with(Profile {
        max_connections: [4, 4, 4],
        extra_peer: ["", "max_rate = 40", ""],
        ..Profile::default()
    });
    let n = 120;
    assert_eq!(send_load(h.addr, 4, load(&[TO_B], n)).accepted, n);
    assert!(h.sims[1].wait_for_recipients(n as u64, DEADLINE));
    h.stop_relay();
    let got = h.sims[1].received();
    let span = got
        .last()
        .unwrap()
        .at
        .duration_since(got[0].at)
        .as_secs_f64();
    // A burst of 40, then 40 a second: the other 80 need two seconds at least.
    let rate = (n - 40) as f64 / span;
    eprintln!("max_rate = 40: {n} messages over {span:.2}s, {rate:.1}/s after the burst");
    assert!(rate <= 40.0 * 1.1, "{rate:.1} msgs/s over max_rate 40");
}

#[test]
fn allowance_grows_with_backlog_and_falls_back_when_idle() {
    let mut h = Harness::with(Profile {
        extra_peer: ["", "idle_timeout = 300ms", ""],
        ..Profile::default()
    });
    h.sims[1].set_fault(Fault::Delay(Duration::from_millis(20)));
    assert_eq!(h.peer(1).allowance, 1, "starts at min_connections");
    let n = 120;
    assert_eq!(send_load(h.addr, 8, load(&[TO_B], n)).accepted, n);
    wait_until("B to reach its max under backlog", || {
        h.peer(1).allowance == 4
    });
    assert!(h.sims[1].wait_for_recipients(n as u64, DEADLINE));
    wait_until("B to fall back to its min when idle", || {
        h.peer(1).allowance == 1
    });
    h.stop_relay();
    assert!(h.sims[1].max_open() <= 4);
    assert!(h.sims[1].max_open() >= 3, "the extra connections were used");
}

#[test]
fn the_budget_caps_connections_across_all_peers() {
    let mut h = Harness::with(Profile {
        budget: 5,
        ..Profile::default()
    });
    for sim in &h.sims {
        sim.set_fault(Fault::Delay(Duration::from_millis(5)));
    }
    let n = 240;
    assert_eq!(
        send_load(h.addr, 8, load(&[TO_A, TO_B, TO_C], n)).accepted,
        n
    );
    for sim in &h.sims {
        assert!(sim.wait_for_recipients(n as u64 / 3, DEADLINE));
    }
    h.stop_relay();
    assert!(
        h.gauge.max() <= 5,
        "{} connections open at once over a budget of 5",
        h.gauge.max()
    );
    assert!(h.gauge.max() >= 4, "the budget above the mins was used");
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
    assert_eq!(
        send_message(&mut c, FROM, &[TO_C], &forward_req(1, TO_C, 500)).code,
        250
    );
    wait_until("C's deferral", || h.peer(2).waiting_retry == 1);
    h.sims[2].set_fault(Fault::None);
    assert!(h.control("queue retry C").contains("retrying"));
    assert!(h.sims[2].wait_for_recipients(1, DEADLINE));
    assert!(h.control("queue retry nobody").starts_with("error:"));
    assert_eq!(h.stop_relay().undelivered, 0);
    assert_eq!(h.sims[1].recipients(), 4, "the deleted message was sent");
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
    assert_eq!(
        send_message(&mut c, FROM, &[rcpt], &forward_req(9, rcpt, 500)).code,
        250
    );
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
    assert_eq!(
        send_message(&mut c, FROM, &[TO_C], &forward_req(1, TO_C, 500)).code,
        250
    );
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
    assert_eq!(
        send_message(&mut c, FROM, &[to_d], &forward_req(1, to_d, 500)).code,
        250
    );
    assert!(
        d.wait_for_recipients(1, DEADLINE),
        "the added peer delivers"
    );
    assert!(h.control("status").lines().any(|l| l.starts_with("D ")));

    // C goes away while it is down: its queued message stays, reported.
    h.sims[2].set_fault(Fault::TempFail);
    let mut c = h.client(LOCAL);
    assert_eq!(
        send_message(&mut c, FROM, &[TO_C], &forward_req(2, TO_C, 500)).code,
        250
    );
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

#[test]
fn a_held_message_waits_and_goes_when_released() {
    let mut h = Harness::start();
    h.sims[1].set_fault(Fault::TempFail);
    let mut c = h.client(LOCAL);
    let reply = send_message(&mut c, FROM, &[TO_B], &forward_req(1, TO_B, 500));
    let id = reply.text().rsplit(' ').next().unwrap().to_string();
    wait_until("B's deferral", || h.peer(1).deferred > 0);
    assert!(h.control(&format!("queue hold {id}")).contains("held"));
    assert!(h.control("queue hold NOSUCH").starts_with("error"));
    h.sims[1].set_fault(Fault::None);
    // Another message to B goes; the held one stays.
    let reply = send_message(&mut c, FROM, &[TO_B], &forward_req(2, TO_B, 500));
    assert_eq!(reply.code, 250);
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
    let mut h = Harness::start();
    h.sims[1].set_fault(Fault::TempFail);
    let mut c = h.client(LOCAL);
    let reply = send_message(&mut c, FROM, &[TO_B], &forward_req(1, TO_B, 500));
    let id = reply.text().rsplit(' ').next().unwrap().to_string();
    wait_until("B's deferral", || h.peer(1).deferred > 0);
    assert!(h.control(&format!("queue hold {id}")).contains("held"));
    assert!(h.control("queue hold C").contains("held"));
    drop(c);
    h.restart();
    assert!(h.peer(2).held, "C is held again");
    assert!(!h.peer(0).held && !h.peer(1).held);
    h.sims[1].set_fault(Fault::None);
    let mut c = h.client(LOCAL);
    for (i, to) in [(2, TO_C), (3, TO_B)] {
        assert_eq!(
            send_message(&mut c, FROM, &[to], &forward_req(i, to, 500)).code,
            250
        );
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

/// The retry schedule and expiry, on a clock the test moves: no sleeping.
/// retry_min 60s (so retry_max 240s), queue_lifetime 10m. Message 1 has
/// only the queue lifetime; message 2 says `X-Mms-Expiry: 100` (seconds).
#[test]
fn retries_back_off_and_expire_on_the_relay_clock() {
    use mm4relay::clock::ManualClock;
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

/// The spool keys every record by queue ID. A restart within the same
/// second (here: on a clock that stands still) must not hand out an ID a
/// queued message still has, or the two messages' records mix at the next
/// recovery: one is delivered twice, and the other could be marked done
/// without being delivered.
#[test]
fn a_quick_restart_never_reuses_a_queued_id() {
    use mm4relay::clock::ManualClock;
    let clock = Arc::new(ManualClock::new(std::time::SystemTime::now()));
    let mut h = Harness::with_clock(Profile::default(), clock);
    h.sims[2].set_fault(Fault::TempFail);
    let queued_as = |r: &mm4relay::smtp::Reply| r.text().rsplit(' ').next().unwrap().to_string();
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
