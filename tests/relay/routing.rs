//! Routing: a message split by peer with its body byte-identical, ported
//! numbers, relay control and address checks at RCPT, and a partner's
//! report to the local MMSC.

use crate::support::*;

/// Ported: B's prefix and domain, but routed to C.
const TO_PORTED: &str = "+12025550177/TYPE=PLMN@mms.mnc020.mcc001.gprs";

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

/// `ini` with a UK numbering plan, and A asking for recipients in
/// international form.
fn uk_numbering(ini: &str) -> String {
    let ini = ini.replacen("[peer.A]\n", "[peer.A]\nrcpt_format = international\n", 1);
    format!("{ini}\n[routes]\ncountry_code = 44\nnational_prefix = 0\ninternational_prefix = 00\n")
}

#[test]
fn national_forms_route_by_the_numbering_plan_and_go_out_as_each_peer_asks() {
    let mut h = Harness::start();
    let national = "07700900123/TYPE=PLMN@mms.mnc010.mcc001.gprs";
    // Without a country code a national number cannot be routed.
    let mut c = h.client(LOCAL);
    assert_eq!(c.cmd("EHLO t").code, 250);
    assert_eq!(c.cmd(&format!("MAIL FROM:<{FROM}>")).code, 250);
    assert_eq!(c.cmd(&format!("RCPT TO:<{national}>")).code, 553);
    drop(c);
    h.reload(&uk_numbering(&h.ini())).unwrap();
    let to_b = "0012025550142/TYPE=PLMN@mms.mnc020.mcc001.gprs";
    let mut c = h.client(LOCAL);
    send_forward(&mut c, 1, national, 500);
    send_forward(&mut c, 2, to_b, 500);
    assert!(h.sims[0].wait_for_recipients(1, DEADLINE));
    assert!(h.sims[1].wait_for_recipients(1, DEADLINE));
    // A asked for the international form; B gets what the sender wrote.
    assert_eq!(
        h.sims[0].received()[0].rcpts,
        ["+447700900123/TYPE=PLMN@mms.mnc010.mcc001.gprs"]
    );
    assert_eq!(h.sims[1].received()[0].rcpts, [to_b]);
    assert_eq!(
        h.control(&format!("route {national}")),
        format!("{national} -> A by prefix +447700900\n")
    );
    assert_eq!(h.stop_relay().undelivered, 0);
}
