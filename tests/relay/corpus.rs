//! Every file of the shared MM4 corpus, sent over SMTP from the client its
//! README names, gets the replies and deliveries the README states.

use std::path::Path;

use crate::support::*;

/// What the relay must answer and deliver for one corpus file.
struct Case {
    file: &'static str,
    client: &'static str,
    /// MAIL reply: code and enhanced status.
    mail: (u16, &'static str),
    /// RCPT replies, in order; `None`: every RCPT 250.
    rcpts: Option<Vec<(u16, &'static str)>>,
    /// Reply to DATA itself (354 when the data phase opens).
    data: (u16, &'static str),
    /// Reply at the end of data, when it opened.
    end: Option<(u16, &'static str)>,
    /// Recipients that must arrive at A, B and C.
    deliver: [usize; 3],
}

const OK: (u16, &str) = (250, "2.");

fn valid(file: &'static str, client: &'static str, deliver: [usize; 3]) -> Case {
    Case {
        file,
        client,
        mail: OK,
        rcpts: None,
        data: (354, ""),
        end: Some(OK),
        deliver,
    }
}

fn bad_data(file: &'static str, client: &'static str, end: (u16, &'static str)) -> Case {
    Case {
        file,
        client,
        mail: OK,
        rcpts: None,
        data: (354, ""),
        end: Some(end),
        deliver: [0; 3],
    }
}

fn bad_rcpt(file: &'static str, client: &'static str, rcpt: (u16, &'static str)) -> Case {
    Case {
        file,
        client,
        mail: OK,
        rcpts: Some(vec![rcpt]),
        data: (554, "5.5.1"),
        end: None,
        deliver: [0; 3],
    }
}

fn cases() -> Vec<Case> {
    const FMT: (u16, &str) = (554, "5.6.0");
    let mut too_many = vec![OK; 100];
    too_many.extend(vec![(452, "4.5.3"); 20]);
    vec![
        valid("valid/v01_forward_req_related_smil_ack", LOCAL, [0, 1, 0]),
        valid("valid/v02_forward_req_mixed_to_cc", LOCAL, [0, 3, 0]),
        valid("valid/v03_forward_req_split_two_peers", LOCAL, [0, 1, 1]),
        valid(
            "valid/v04_forward_req_rfc2047_subject_folded",
            PARTNER_B,
            [3, 0, 0],
        ),
        valid(
            "valid/v05_forward_req_no_ack_hidden_sender",
            PARTNER_C,
            [1, 0, 0],
        ),
        valid("valid/v06_forward_res_ok", PARTNER_B, [1, 0, 0]),
        valid(
            "valid/v07_delivery_report_req_retrieved",
            PARTNER_B,
            [1, 0, 0],
        ),
        valid("valid/v08_delivery_report_res_ok", LOCAL, [0, 1, 0]),
        valid("valid/v09_read_reply_report_req_read", PARTNER_C, [1, 0, 0]),
        valid("valid/v10_read_reply_report_res_ok", LOCAL, [0, 0, 1]),
        valid("valid/v11_forward_req_email_in_headers", LOCAL, [0, 1, 0]),
        valid("valid/v12_forward_req_bcc_envelope_only", LOCAL, [0, 2, 0]),
        valid("valid/v13_forward_req_ported_number", LOCAL, [0, 0, 1]),
        valid(
            "valid/v14_forward_req_three_digit_mnc_8bitmime",
            LOCAL,
            [0, 0, 2],
        ),
        valid("valid/v15_forward_req_forwarded_mm", PARTNER_B, [1, 0, 0]),
        valid("valid/v16_forward_req_dot_lines", LOCAL, [0, 1, 0]),
        valid(
            "valid/v17_delivery_report_req_expired_noack",
            PARTNER_C,
            [1, 0, 0],
        ),
        valid(
            "valid/v18_read_reply_report_req_deleted",
            PARTNER_B,
            [1, 0, 0],
        ),
        valid("valid/v19_forward_req_ipv4_recipient", LOCAL, [0, 1, 0]),
        valid("valid/v20_forward_req_full_options", LOCAL, [0, 1, 0]),
        valid(
            "valid/v21_forward_req_quoted_ids_relative_expiry",
            PARTNER_C,
            [1, 0, 0],
        ),
        bad_data("invalid/i01_missing_message_type", LOCAL, FMT),
        bad_data("invalid/i02_unknown_message_type", LOCAL, FMT),
        bad_data("invalid/i03_missing_transaction_id", LOCAL, FMT),
        bad_data(
            "invalid/i04_report_to_differs_from_envelope",
            PARTNER_B,
            FMT,
        ),
        bad_data("invalid/i05_bare_lf_line_endings", LOCAL, FMT),
        bad_data("invalid/i06_8bit_raw_utf8_in_header", LOCAL, FMT),
        bad_data("invalid/i07_nul_bytes", LOCAL, FMT),
        bad_data("invalid/i08_header_line_over_998", LOCAL, FMT),
        bad_data("invalid/i09_unterminated_multipart", LOCAL, FMT),
        bad_data("invalid/i10_duplicate_message_type", LOCAL, FMT),
        bad_data("invalid/i11_empty_body", LOCAL, FMT),
        bad_rcpt(
            "invalid/i12_recipient_domain_unroutable",
            LOCAL,
            (550, "5.1.2"),
        ),
        Case {
            file: "invalid/i13_oversize_declared_in_mail_from",
            client: LOCAL,
            mail: (552, "5.3.4"),
            rcpts: Some(vec![(503, "5.5.1")]),
            data: (503, "5.5.1"),
            end: None,
            deliver: [0; 3],
        },
        bad_data("invalid/i14_smtp_smuggling_lf_dot", LOCAL, FMT),
        bad_data(
            "invalid/i15_forward_counter_over_limit",
            PARTNER_B,
            (554, "5.4.6"),
        ),
        bad_data("invalid/i16_missing_3gpp_version", LOCAL, FMT),
        bad_data("invalid/i17_bad_mm_status_code", PARTNER_B, FMT),
        bad_rcpt(
            "invalid/i18_partner_transit_relay_denied",
            PARTNER_B,
            (550, "5.7.1"),
        ),
        bad_rcpt(
            "invalid/i19_bad_msisdn_syntax_in_rcpt",
            PARTNER_B,
            (553, "5.1.3"),
        ),
        bad_data("invalid/i20_mime_nesting_bomb", LOCAL, FMT),
        Case {
            file: "invalid/i21_too_many_recipients",
            client: PARTNER_B,
            mail: OK,
            rcpts: Some(too_many),
            data: (354, ""),
            end: Some(OK),
            deliver: [100, 0, 0],
        },
        bad_rcpt(
            "invalid/i22_open_relay_unknown_client",
            UNKNOWN,
            (550, "5.7.1"),
        ),
    ]
}

/// Files whose octets are sent as they are (README: RAW).
fn is_raw(file: &str) -> bool {
    file.contains("i05_") || file.contains("i14_")
}

fn expect(what: &str, got: &mm4relay::smtp::Reply, want: (u16, &str)) {
    assert_eq!(got.code, want.0, "{what}: got {got}");
    assert!(
        got.text().starts_with(want.1),
        "{what}: got {got}, want {}",
        want.1
    );
}

#[test]
fn corpus_outcomes() {
    let Some(dir) = corpus_dir() else {
        eprintln!("SKIPPED: corpus_outcomes: ../shared/mm4-corpus not found (set MM4_CORPUS)");
        return;
    };
    let all = cases();
    let listed = |sub: &str| {
        let mut n = 0;
        for e in std::fs::read_dir(dir.join(sub)).unwrap() {
            let name = e.unwrap().file_name().into_string().unwrap();
            if let Some(stem) = name.strip_suffix(".eml") {
                let key = format!("{sub}/{stem}");
                assert!(
                    all.iter().any(|c| c.file == key),
                    "corpus file {key} has no expected outcome here"
                );
                n += 1;
            }
        }
        n
    };
    assert_eq!(listed("valid") + listed("invalid"), all.len());

    // One session per case, as fast as they go: not a test of the
    // per-address connection rate.
    let mut h = Harness::with(Profile {
        extra_listener: "connection_rate_per_ip = 0\n".into(),
        ..Profile::default()
    });
    let mut total = [0u64; 3];
    for case in &all {
        run_case(&h, &dir, case, &mut total);
    }
    let stop = h.stop_relay();
    assert_eq!(stop.undelivered, 0);
    for (i, sim) in h.sims.iter().enumerate() {
        assert_eq!(
            sim.recipients(),
            total[i],
            "peer {i} got more than the corpus allows"
        );
    }
}

fn run_case(h: &Harness, dir: &Path, case: &Case, total: &mut [u64; 3]) {
    let name = case.file;
    let eml = std::fs::read(dir.join(format!("{name}.eml"))).unwrap();
    let env = String::from_utf8(std::fs::read(dir.join(format!("{name}.env"))).unwrap()).unwrap();
    let mut lines = env.lines();
    let mail = lines.next().unwrap();
    let rcpts: Vec<&str> = lines.filter(|l| !l.is_empty()).collect();
    let before: Vec<usize> = h.sims.iter().map(|s| s.received().len()).collect();

    let mut c = h.client(case.client);
    assert_eq!(c.cmd("EHLO corpus.test").code, 250, "{name}");
    expect(&format!("{name} MAIL"), &c.cmd(mail), case.mail);
    for (i, rcpt) in rcpts.iter().enumerate() {
        let want = case
            .rcpts
            .as_ref()
            .map_or(OK, |r| r.get(i).copied().unwrap_or(r[0]));
        expect(&format!("{name} RCPT {i}"), &c.cmd(rcpt), want);
    }
    let data = c.cmd("DATA");
    expect(&format!("{name} DATA"), &data, case.data);
    if let Some(end) = case.end {
        let reply = if is_raw(name) {
            c.send(&eml);
            c.send(b"\r\n.\r\n");
            c.reply()
        } else {
            c.data(&eml)
        };
        expect(&format!("{name} end of data"), &reply, end);
    }
    // The session is still in step: no injected command was taken as ours.
    assert_eq!(c.cmd("NOOP").code, 250, "{name}: session out of step");
    assert_eq!(c.cmd("QUIT").code, 221);

    for (i, sim) in h.sims.iter().enumerate() {
        total[i] += case.deliver[i] as u64;
        assert!(
            sim.wait_for_recipients(total[i], DEADLINE),
            "{name}: peer {i} has {} recipients, want {}",
            sim.recipients(),
            total[i]
        );
        for got in &sim.received()[before[i]..] {
            assert_eq!(
                strip_trace(&got.data),
                eml.as_slice(),
                "{name}: body changed on the way"
            );
            assert_eq!(
                got.eight_bit,
                mail.contains("BODY=8BITMIME"),
                "{name}: BODY= not relayed"
            );
            for r in &got.rcpts {
                assert!(
                    rcpts.iter().any(|l| l.contains(r.as_str())),
                    "{name}: {r} was not an envelope recipient"
                );
            }
        }
    }
}
