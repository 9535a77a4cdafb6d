//! What the listener takes in: commands smuggled into DATA are refused
//! once, sessions over the limit get 421 while the local MMSC keeps room
//! of its own, and a stop lets a message under way finish.

use crate::support::*;

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
    send_forward(&mut a1, 1, TO_B, 300);
}

/// A stop lets a message under way finish within shutdown_timeout: in
/// BDAT chunks as in DATA. Between two chunks the session is not idle.
#[test]
fn a_stop_between_bdat_chunks_lets_the_message_finish() {
    let mut h = Harness::start();
    let data = mm4relay::sim::forward_req(1, TO_B, 400);
    let half = data.len() / 2;
    let mut c = h.client(LOCAL);
    assert_eq!(c.cmd("EHLO t").code, 250);
    assert_eq!(c.cmd(&format!("MAIL FROM:<{FROM}>")).code, 250);
    assert_eq!(c.cmd(&format!("RCPT TO:<{TO_B}>")).code, 250);
    c.send(format!("BDAT {half}\r\n").as_bytes());
    c.send(&data[..half]);
    assert_eq!(c.reply().code, 250);
    let stopped = h.stop_past_an_idle_session();
    // The stop has passed the idle sessions: the rest of the message.
    c.send(format!("BDAT {} LAST\r\n", data.len() - half).as_bytes());
    c.send(&data[half..]);
    let r = c.reply();
    assert_eq!(r.code, 250, "{r}");
    assert_eq!(c.reply().code, 421, "then the stop's word");
    assert_eq!(stopped.join().unwrap().undelivered, 0);
}
