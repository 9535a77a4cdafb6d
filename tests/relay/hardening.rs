//! Regression tests for the findings of the attack on the listener (issue
//! 11), each over real sockets on loopback, asserting what a user sees.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use base64::Engine as _;
use mm4relay::sim::forward_req;

use crate::pki::Pki;
use crate::support::*;

const FROM_B: &str = "+12025550100/TYPE=PLMN@mms.mnc020.mcc001.gprs";

/// A forward.REQ with `header` added before `From:`.
fn with_header(seq: usize, rcpt: &str, header: &str) -> Vec<u8> {
    let m = String::from_utf8(forward_req(seq, rcpt, 400)).unwrap();
    m.replacen("From:", &format!("{header}\r\nFrom:"), 1)
        .into_bytes()
}

/// The real binary on the corpus profile (`relay_extra` in `[relay]`),
/// its log on a pipe: the setup to keep, the child, where it listens, and
/// the lines it logs after that until it exits.
fn binary(
    relay_extra: &str,
) -> (
    crate::binary::Setup,
    Running,
    std::net::SocketAddr,
    thread::JoinHandle<Vec<String>>,
) {
    let s = crate::binary::setup(false, relay_extra);
    let mut relay = Running::start(&s.path, &[], true);
    let (addr, _early, rest) = relay.listening();
    (s, relay, addr, rest)
}

/// Octets of the log lines a relay wrote until it exited.
fn log_bytes(rest: thread::JoinHandle<Vec<String>>) -> usize {
    rest.join().unwrap().iter().map(|l| l.len() + 1).sum()
}

/// True if the relay has closed `s` (without waiting).
fn closed_now(s: &mut TcpStream) -> bool {
    let mut probe = [0u8; 1];
    s.set_nonblocking(true).unwrap();
    let closed = match s.read(&mut probe) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    };
    s.set_nonblocking(false).unwrap();
    closed
}

/// Finding 1: `X-Mms-Expiry: 9999999999999999999` panicked the session
/// thread before its reply, and leaked its slot: a few dozen of them and
/// every client got 421 for good.
#[test]
fn an_expiry_beyond_the_clock_neither_panics_nor_leaks_a_slot() {
    let mut h = Harness::with_listener(
        "max_sessions = 4\nmax_sessions_per_ip = 2\nconnection_rate_per_ip = 0\n",
    );
    let bomb = "X-Mms-Expiry: 9999999999999999999";
    // Ten times the partner's own limit, one session after the other.
    for seq in 0..20 {
        let mut c = h.client(PARTNER_B);
        let r = send_message(&mut c, FROM_B, &[TO_A], &with_header(seq, TO_A, bomb));
        assert_eq!(r.code, 250, "message {seq}: {r}");
        assert_eq!(c.cmd("QUIT").code, 221);
    }
    // An absolute date past what the clock holds is no panic either.
    let mut c = h.client(PARTNER_B);
    let far = "X-Mms-Expiry: Tue, 18 Mar 99999999999 10:00:00 +0000";
    assert_eq!(
        send_message(&mut c, FROM_B, &[TO_A], &with_header(20, TO_A, far)).code,
        250
    );
    drop(c);
    // The local MMSC, and the partner, still get in.
    let mut a = h.client(LOCAL);
    send_forward(&mut a, 30, TO_B, 400);
    let _b = h.client(PARTNER_B);
    assert!(h.sims[0].wait_for_recipients(21, DEADLINE));
    assert!(h.sims[1].wait_for_recipients(1, DEADLINE));
    assert_eq!(h.stop_relay().undelivered, 0);
}

/// Finding 2: a stranger pipelining refused RCPTs wrote a log line for
/// each and was never closed (3 GB of log in 15 s).
#[test]
fn refused_recipients_close_the_session_and_barely_grow_the_log() {
    let (_s, mut relay, addr, rest) = binary("log_level = info\n");
    let mut total_refused = 0;
    for who in [UNKNOWN, PARTNER_B] {
        let mut c = tcp_from(who, addr);
        // Each client pipelines many times the limit (100 by default).
        let mut burst = b"EHLO attacker.test\r\nMAIL FROM:<x@y.example>\r\n".to_vec();
        let rcpt = if who == UNKNOWN { TO_A } else { TO_B };
        for _ in 0..150 {
            burst.extend_from_slice(format!("RCPT TO:<{rcpt}>\r\n").as_bytes());
        }
        c.write_all(&burst).unwrap();
        let replies = read_to_close(&mut c);
        let refused = replies.matches("550 5.7.1").count();
        assert_eq!(refused, 100, "{who}: cut at max_refused_recipients");
        assert!(
            replies.contains("421 4.7.0 too many refused recipients"),
            "{who}"
        );
        total_refused += refused;
    }
    assert!(relay.terminate().success());
    let log = log_bytes(rest);
    println!(
        "log: {log} bytes for {total_refused} refused recipients in 2 sessions ({:.1} per recipient)",
        log as f64 / total_refused as f64
    );
    // Start-up and stop lines included: a few lines per session, not one
    // per recipient (that was ~120 bytes each).
    assert!(log < 6 * 1024, "{log} bytes of log");
}

/// Finding 3: a client that pipelines NOOPs and never reads its replies
/// kept its session for ever, thirty of them kept the local MMSC out, and
/// a stop waited for them.
#[test]
fn a_client_that_never_reads_is_cut_and_cannot_keep_the_local_mmsc_out() {
    let mut h =
        Harness::with_listener("command_timeout = 1s\ndata_timeout = 600s\nmax_sessions = 3\n");
    let flood = |from: &'static str| {
        let target = h.addr;
        thread::spawn(move || {
            let socket =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            // A small window: our unread replies fill it soon.
            socket.set_recv_buffer_size(4096).unwrap();
            socket
                .bind(
                    &format!("{from}:0")
                        .parse::<std::net::SocketAddr>()
                        .unwrap()
                        .into(),
                )
                .unwrap();
            socket.connect(&target.into()).unwrap();
            let mut s: TcpStream = socket.into();
            s.set_write_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            let noops = b"NOOP\r\n".repeat(10_000);
            let end = Instant::now() + DEADLINE;
            // Write and never read, until the relay hangs up.
            while Instant::now() < end {
                match s.write(&noops) {
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                    Err(_) => return true,
                }
            }
            false
        })
    };
    let floods: Vec<_> = [UNKNOWN, PARTNER_B, PARTNER_C]
        .into_iter()
        .map(flood)
        .collect();
    // While they hold every slot max_sessions gives: the local MMSC.
    wait_until("the floods to hold every session", || {
        h.control("status").contains("sessions_open=3 ")
    });
    let mut a = h.client(LOCAL);
    send_forward(&mut a, 1, TO_B, 400);
    // Each is cut at its write deadline, not at the end of the test.
    for (i, f) in floods.into_iter().enumerate() {
        assert!(f.join().unwrap(), "flood {i} was never cut");
    }
    // A client that stops in the middle of its DATA does not hold up a
    // stop beyond shutdown_timeout (5 s here; data_timeout is 600 s).
    let mut a = h.client(LOCAL);
    assert_eq!(a.cmd("EHLO a.test").code, 250);
    assert_eq!(a.cmd(&format!("MAIL FROM:<{FROM}>")).code, 250);
    assert_eq!(a.cmd(&format!("RCPT TO:<{TO_B}>")).code, 250);
    assert_eq!(a.cmd("DATA").code, 354);
    a.send(b"X-Mms-Message-Type: MM4_for");
    let stopped = {
        let relay = h.relay.take().unwrap();
        thread::spawn(move || relay.shutdown())
    };
    let end = Instant::now() + DEADLINE;
    while !stopped.is_finished() {
        assert!(Instant::now() < end, "the stop waits for the client");
        thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(stopped.join().unwrap().undelivered, 0);
    // Closed, with at most the stop's 421 before the end.
    let mut tcp = a.into_tcp();
    tcp.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut rest = Vec::new();
    let ended = match tcp.read_to_end(&mut rest) {
        Ok(_) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    };
    let rest = String::from_utf8_lossy(&rest);
    assert!(
        ended && (rest.is_empty() || rest.starts_with("421 ")),
        "{rest:?}"
    );
}

/// Finding 4: a ClientHello sent an octet at a time outlived every
/// timeout, on an implicit-TLS listener and after STARTTLS.
#[test]
fn a_trickled_tls_handshake_is_cut_at_the_command_deadline() {
    let pki = Pki::new();
    let h = Harness::with_listener(format!(
        "{}listen_tls = 127.0.0.1:0\ncommand_timeout = 1s\n",
        pki.listener_lines()
    ));
    let tls_addr = h.relay.as_ref().unwrap().local_addrs()[1];
    // The start of a TLS 1.2 ClientHello record, then filler.
    let mut hello = vec![
        0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
    ];
    hello.resize(200, 0x42);
    let trickle = |mut s: TcpStream| {
        let mut sent = 0;
        for b in &hello {
            if s.write_all(&[*b]).is_err() {
                break;
            }
            sent += 1;
            // Within the per-read timeout, every time.
            thread::sleep(Duration::from_millis(100));
            if closed_now(&mut s) {
                break;
            }
        }
        sent
    };
    // Cut about a second in: a tenth of what a per-read timeout allows.
    let sent = trickle(tcp_from(UNKNOWN, tls_addr));
    assert!(sent < 40, "implicit TLS: {sent} octets went before the cut");
    let mut c = h.client(UNKNOWN);
    assert_eq!(c.cmd("EHLO slow.test").code, 250);
    assert_eq!(c.cmd("STARTTLS").code, 220);
    let sent = trickle(c.into_tcp());
    assert!(sent < 40, "STARTTLS: {sent} octets went before the cut");
}

/// Finding 5: folded 30 KB message and transaction IDs, times 100
/// recipients, cost 12 MiB for the whole dedup window per message.
#[test]
fn long_ids_cost_the_dedup_window_little_memory() {
    let (s, mut relay, addr, rest) = binary("dedup_window = 1h\n");
    let rss = || {
        let status = std::fs::read_to_string(format!("/proc/{}/status", relay.0.id())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace()
            .nth(1)
            .unwrap()
            .parse::<u64>()
            .unwrap()
            * 1024
    };
    let folded = |c: char| {
        let chunk: String = std::iter::repeat_n(c, 900).collect();
        vec![chunk; 33].join("\r\n ")
    };
    let rcpts: Vec<String> = (0..100)
        .map(|i| format!("+4477009{i:05}/TYPE=PLMN@mms.mnc010.mcc001.gprs"))
        .collect();
    let rcpts: Vec<&str> = rcpts.iter().map(String::as_str).collect();
    let mut c = Client::connect(PARTNER_B, addr);
    // One to warm the relay up, then the measured ones.
    let mut send = |seq: usize| {
        let msg = String::from_utf8(forward_req(seq, TO_A, 400)).unwrap();
        let msg = msg
            .replacen(
                &format!("X-Mms-Transaction-ID: T{seq:08}"),
                &format!("X-Mms-Transaction-ID: T{seq:08}{}", folded('t')),
                1,
            )
            .replacen(
                &format!("X-Mms-Message-ID: M{seq:08}"),
                &format!("X-Mms-Message-ID: M{seq:08}{}", folded('m')),
                1,
            );
        let r = send_message(&mut c, FROM_B, &rcpts, msg.as_bytes());
        assert_eq!(r.code, 250, "{r}");
    };
    send(0);
    assert!(s.sims[0].wait_for_recipients(100, DEADLINE));
    let before = rss();
    let n = 40;
    for seq in 1..=n {
        send(seq);
    }
    assert!(s.sims[0].wait_for_recipients(100 * (n as u64 + 1), DEADLINE));
    let grown = rss().saturating_sub(before);
    println!(
        "RSS grew {} KiB for {n} messages of 100 recipients with 30 KB IDs ({} B per recipient)",
        grown / 1024,
        grown / (n as u64 * 100)
    );
    // It was ~500 MiB.
    assert!(grown < 48 << 20, "RSS grew {grown} bytes");
    drop(c);
    assert!(relay.terminate().success());
    rest.join().unwrap();
}

/// Finding 8: CR, NUL and ESC in HELO, MAIL and RCPT were accepted and
/// copied into Received:, the log, DSNs and the operator's terminal.
#[test]
fn control_characters_in_commands_get_501_and_reach_no_one() {
    let mut h = Harness::start();
    let mut c = h.client(LOCAL);
    for bad in ["EHLO a\rb.test", "EHLO a\x1b[2Jb.test", "HELO a\0b.test"] {
        let r = c.cmd(bad);
        assert_eq!(
            r.to_string(),
            "501 5.5.2 control characters are not allowed in commands"
        );
    }
    let long = format!("EHLO {}", "h".repeat(1010));
    assert_eq!(c.cmd(&long).code, 501, "an over-long HELO name");
    assert_eq!(c.cmd("EHLO ok.test").code, 250);
    assert_eq!(c.cmd("MAIL FROM:<a\rb@x.test>").code, 501);
    assert_eq!(c.cmd(&format!("MAIL FROM:<{FROM}>")).code, 250);
    assert_eq!(c.cmd(&format!("RCPT TO:<{TO_B}\x1b>")).code, 501);
    assert_eq!(c.cmd(&format!("RCPT TO:<{TO_B}\x7f>")).code, 501);
    assert_eq!(c.cmd(&format!("RCPT TO:<{TO_B}>")).code, 250);
    assert_eq!(c.cmd("DATA").code, 354);
    // An ESC in an ID reaches the peer as sent (the relay never rewrites
    // a message) but not the operator's terminal.
    let msg = String::from_utf8(forward_req(1, TO_B, 400))
        .unwrap()
        .replace("M00000001@", "M00000001\x1b[31m@");
    assert!(h.control("queue hold B").contains("held"));
    assert_eq!(c.data(msg.as_bytes()).code, 250);
    wait_until("the message queued", || {
        h.control("queue list B").contains("peer=B")
    });
    let list = h.control("queue list B");
    let id = list.split_whitespace().next().unwrap().to_string();
    let show = h.control(&format!("queue show {id}"));
    for out in [&list, &show] {
        assert!(!out.bytes().any(|b| b == 0x1b || b == b'\r'), "{out:?}");
    }
    assert!(show.contains("M00000001\\x1b[31m@"), "{show}");
    assert!(h.control("queue release B").contains("released"));
    assert!(h.sims[1].wait_for_recipients(1, DEADLINE));
    let got = &h.sims[1].received()[0].data;
    let trace = String::from_utf8_lossy(&got[..got.iter().position(|&b| b == b';').unwrap()]);
    assert!(
        trace.starts_with("Received: from ok.test ([127.0.0.1])"),
        "{trace}"
    );
    assert_eq!(h.stop_relay().undelivered, 0);
}

/// Finding 9: after an over-long command line, every trickled octet
/// restarted the command deadline.
#[test]
fn an_over_long_line_trickled_is_cut_at_the_command_deadline() {
    let h = Harness::with_listener("command_timeout = 1s\n");
    let mut c = h.client(UNKNOWN);
    c.send(&[b'x'; 2000]);
    assert_eq!(c.reply().to_string(), "500 5.5.2 line too long");
    let mut sent = 0;
    let mut cut = None;
    while sent < 60 {
        c.send(b"x");
        sent += 1;
        thread::sleep(Duration::from_millis(100));
        if let Some(r) = c.try_reply() {
            cut = Some(r);
            break;
        }
    }
    let r = cut.expect("never cut");
    assert!(
        r.to_string()
            .starts_with("421 4.4.2 timeout waiting for a command"),
        "{r}"
    );
    assert!(sent < 40, "{sent} octets went before the cut");
    assert!(c.closed());
}

/// Finding 10: header fields inside MIME parts were not counted.
#[test]
fn header_limits_hold_inside_mime_parts() {
    let h = Harness::with_listener("max_header_fields = 50\n");
    let with_part_fields = |n: usize| {
        let fields: String = (0..n).map(|i| format!("X-Part-{i}: v\r\n")).collect();
        String::from_utf8(forward_req(1, TO_B, 400))
            .unwrap()
            .replace(
                "Content-Type: text/plain; charset=us-ascii\r\n\r\n",
                &format!(
                    "Content-Type: multipart/mixed; boundary=\"b\"\r\n\r\n--b\r\n{fields}\
                 Content-Type: text/plain\r\n\r\nhello\r\n--b--\r\n"
                ),
            )
    };
    let mut c = h.client(LOCAL);
    let r = send_message(&mut c, FROM, &[TO_B], with_part_fields(60).as_bytes());
    assert_eq!(r.code, 554, "{r}");
    assert!(
        r.to_string().contains("5.3.4 more than 50 header fields"),
        "{r}"
    );
    // The same part with its fields within the limit passes.
    let r = send_message(&mut c, FROM, &[TO_B], with_part_fields(40).as_bytes());
    assert_eq!(r.code, 250, "{r}");
}

fn plain(user: &str, password: &str) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"));
    format!("AUTH PLAIN {b64}")
}

/// Finding 11: AUTH guesses went at ~130 a second per address.
#[test]
fn failed_auth_is_slowed_per_address_and_per_account() {
    let mut h = Harness::with_listener("auth_plaintext = yes\nmax_bad_commands = 0\n");
    let ini = h.ini() + "\n[auth]\npartner-b = B:pa55word\n";
    h.reload(&ini).unwrap();
    let mut guesser = h.client(UNKNOWN);
    assert_eq!(guesser.cmd("EHLO guess.test").code, 250);
    // The first guess is answered at once, every later one after a delay
    // that doubles: 250 ms, 500 ms, 1 s.
    for n in 0..4u32 {
        let started = Instant::now();
        assert_eq!(guesser.cmd(&plain("partner-b", "guess")).code, 535);
        if n > 0 {
            let at_least = Duration::from_millis(250) * 2u32.pow(n - 1);
            assert!(
                started.elapsed() >= at_least,
                "guess {n}: {:?}",
                started.elapsed()
            );
        }
    }
    // The account is slowed from anywhere: the real partner, from another
    // address, waits too, and then gets in.
    let mut real = h.client(PARTNER_C);
    assert_eq!(real.cmd("EHLO b.test").code, 250);
    let started = Instant::now();
    assert_eq!(real.cmd(&plain("partner-b", "pa55word")).code, 235);
    assert!(started.elapsed() >= Duration::from_secs(2));
    let status = h.control("status");
    assert!(
        status.contains("auth_failures=4 ") && status.contains("auth_delayed=4"),
        "{status}"
    );
    // A good AUTH cleared the account: the next one is not delayed.
    let mut again = h.client(PARTNER_C);
    assert_eq!(again.cmd("EHLO b.test").code, 250);
    assert_eq!(again.cmd(&plain("partner-b", "pa55word")).code, 235);
    assert!(h.control("status").contains("auth_delayed=4"));
    drop((guesser, real, again));
    assert_eq!(h.stop_relay().undelivered, 0);
}

/// A transport for a TLS client that, once told to, writes one octet at
/// a time, 100 ms apart, and counts them.
#[derive(Debug)]
struct Trickle {
    tcp: TcpStream,
    slow: bool,
    sent: usize,
}

impl Read for Trickle {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.tcp.read(buf)
    }
}

impl Write for Trickle {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if !self.slow || buf.is_empty() {
            return self.tcp.write(buf);
        }
        thread::sleep(Duration::from_millis(100));
        let n = self.tcp.write(&buf[..1])?;
        self.sent += n;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.tcp.flush()
    }
}

/// Found by the second attack: after the handshake, one TLS record sent
/// an octet at a time was one read for the session, and each octet
/// restarted the per-call timeout: the session outlived every deadline.
#[test]
fn a_tls_record_trickled_after_the_handshake_is_cut_at_the_command_deadline() {
    let pki = Pki::new();
    let h = Harness::with_listener(format!(
        "{}listen_tls = 127.0.0.1:0\ncommand_timeout = 1s\n",
        pki.listener_lines()
    ));
    let tls_addr = h.relay.as_ref().unwrap().local_addrs()[1];
    let transport = Trickle {
        tcp: tcp_from(UNKNOWN, tls_addr),
        slow: false,
        sent: 0,
    };
    let mut tls = pki.connector().connect("localhost", transport).unwrap();
    let mut greeting = [0u8; 64];
    let n = tls.read(&mut greeting).unwrap();
    assert!(greeting[..n].starts_with(b"220 "));
    tls.get_mut().slow = true;
    // One record of some 250 octets: 25 s at this pace.
    let line = format!("NOOP {}\r\n", "x".repeat(200));
    let wrote = tls.write_all(line.as_bytes());
    let sent = tls.get_ref().sent;
    assert!(
        wrote.is_err() && sent < 60,
        "{sent} octets of the record went before the cut ({wrote:?})"
    );
}

/// Found by the second attack: strangers on a few addresses filled
/// max_sessions, and partners got 421.
#[test]
fn strangers_cannot_take_the_partners_room() {
    let h = Harness::with_listener("max_sessions = 4\nmax_stranger_sessions = 2\n");
    let _x1 = h.client(UNKNOWN);
    let _x2 = h.client("127.0.0.10");
    let mut third = tcp_from("127.0.0.11", h.addr);
    assert!(read_to_close(&mut third).starts_with("421 4.3.2"));
    // The partners still have their room.
    let mut b = h.client(PARTNER_B);
    let _c = h.client(PARTNER_C);
    assert_eq!(
        send_message(&mut b, FROM_B, &[TO_A], &forward_req(1, TO_A, 400)).code,
        250
    );
}

/// Found by the second attack: one partner could make another's message a
/// duplicate by sending the same IDs first; and "x y"+"z" was the key of
/// "x"+"y z".
#[test]
fn one_partner_cannot_make_anothers_message_a_duplicate() {
    let mut h = Harness::start();
    let msg = forward_req(42, TO_A, 400);
    let from_c = "+61491570100/TYPE=PLMN@mms.mnc456.mcc999.gprs";
    let mut c = h.client(PARTNER_C);
    let r = send_message(&mut c, from_c, &[TO_A], &msg);
    assert!(r.to_string().starts_with("250 2.0.0 queued"), "{r}");
    let mut b = h.client(PARTNER_B);
    let r = send_message(&mut b, FROM_B, &[TO_A], &msg);
    assert!(r.to_string().starts_with("250 2.0.0 queued"), "{r}");
    // B's own resend is a duplicate.
    let mut b = h.client(PARTNER_B);
    let r = send_message(&mut b, FROM_B, &[TO_A], &msg);
    assert!(r.to_string().contains("duplicate"), "{r}");
    assert!(h.sims[0].wait_for_recipients(2, DEADLINE));
    assert_eq!(h.stop_relay().undelivered, 0);
}

/// Found by the second attack: a folded 63 KB X-Mms-Message-Type of 0xFF
/// octets came back as a 189 KB reply line and a 756 KB log line.
#[test]
fn a_huge_header_value_makes_no_huge_reply_or_log_line() {
    let (_s, mut relay, addr, rest) = binary("");
    // 60 KB of 0xFF octets, folded, within max_header_size.
    let value = vec![vec![0xffu8; 400]; 150].join(&b"\r\n "[..]);
    let text = String::from_utf8(forward_req(1, TO_A, 400)).unwrap();
    let (head, tail) = text.split_once("MM4_forward.REQ").unwrap();
    let msg = [head.as_bytes(), &value, tail.as_bytes()].concat();
    let mut total = 0;
    for _ in 0..5 {
        let mut c = Client::connect(PARTNER_B, addr);
        let r = send_message(&mut c, FROM_B, &[TO_A], &msg);
        assert_eq!(r.code, 554, "{r}");
        assert!(
            r.to_string().len() < 300,
            "a reply of {} octets",
            r.to_string().len()
        );
        total += msg.len();
    }
    assert!(relay.terminate().success());
    let log = log_bytes(rest);
    println!(
        "log: {log} bytes for 5 refused messages of {} octets each",
        total / 5
    );
    assert!(log < 8 * 1024, "{log} bytes of log");
}

/// Found by the second attack: AUTH lines pipelined in one packet ran
/// their delays one after the other in one go, 40 s against a 20 s
/// session_timeout.
#[test]
fn pipelined_auth_delays_end_with_the_session() {
    let mut h = Harness::with_listener(
        "auth_plaintext = yes\nmax_bad_commands = 0\nsession_timeout = 2s\n",
    );
    let ini = h.ini() + "\n[auth]\npartner-b = B:pa55word\n";
    h.reload(&ini).unwrap();
    let mut s = tcp_from(UNKNOWN, h.addr);
    let mut burst = b"EHLO guess.test\r\n".to_vec();
    for _ in 0..12 {
        burst.extend_from_slice(format!("{}\r\n", plain("partner-b", "guess")).as_bytes());
    }
    s.write_all(&burst).unwrap();
    // The delays alone would take some 45 s: the read times out at 20 s.
    let replies = read_to_close(&mut s);
    assert!(
        replies.contains("421 4.4.2 session time limit reached"),
        "{replies}"
    );
    assert_eq!(h.stop_relay().undelivered, 0);
}

/// Found by review: a message started in the same packet as the end of
/// the last one kept what was left of the last one's data_timeout.
#[test]
fn a_message_started_behind_the_last_one_gets_its_own_data_timeout() {
    let h = Harness::with_listener("data_timeout = 3s\n");
    let mut c = h.client(LOCAL);
    assert_eq!(c.cmd("EHLO a.test").code, 250);
    let trickle = |c: &mut Client, body: &[u8]| {
        // Two seconds of it: within one data_timeout, not within what is
        // left of the last one's.
        for chunk in body.chunks(body.len().div_ceil(10)) {
            c.send(chunk);
            thread::sleep(Duration::from_millis(200));
        }
    };
    let first = forward_req(1, TO_B, 600);
    let second = forward_req(2, TO_B, 600);
    assert_eq!(c.cmd(&format!("MAIL FROM:<{FROM}>")).code, 250);
    assert_eq!(c.cmd(&format!("RCPT TO:<{TO_B}>")).code, 250);
    assert_eq!(c.cmd("DATA").code, 354);
    trickle(&mut c, &first);
    // The end of the first and the start of the second in one write.
    c.send(format!(".\r\nMAIL FROM:<{FROM}>\r\nRCPT TO:<{TO_B}>\r\nDATA\r\n").as_bytes());
    for want in [250, 250, 250, 354] {
        assert_eq!(c.reply().code, want);
    }
    trickle(&mut c, &second);
    c.send(b".\r\n");
    let r = c.reply();
    assert_eq!(r.code, 250, "{r}");
    assert!(h.sims[1].wait_for_recipients(2, DEADLINE));
}
