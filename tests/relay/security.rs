//! TLS both ways, mutual TLS, AUTH both ways, the relay-control matrix
//! over plain text and TLS, and the limits against abusive clients.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use base64::Engine as _;
use mm4relay::sim::{SimSecurity, forward_req};
use mm4relay::smtp::Reply;
use mm4relay::smtp::session::{Envelope, Handler, Session, SessionConfig};
use openssl::ssl::{SslAcceptor, SslFiletype, SslMethod, SslVerifyMode};
use parking_lot::Mutex;

use crate::pki::Pki;
use crate::support::*;

const TO_NOWHERE: &str = "+999555000111/TYPE=PLMN@mms.unknown.example";

fn plain_b64(user: &str, password: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"))
}

/// One whole transaction from `c` to `rcpt`; the final reply, or the
/// first refusal.
fn try_send(c: &mut Client, rcpt: &str, seq: usize) -> Reply {
    let r = c.cmd(&format!("MAIL FROM:<{FROM}>"));
    if r.code != 250 {
        return r;
    }
    let r = c.cmd(&format!("RCPT TO:<{rcpt}>"));
    if r.code != 250 {
        assert_eq!(c.cmd("RSET").code, 250);
        return r;
    }
    assert_eq!(c.cmd("DATA").code, 354);
    c.data(&forward_req(seq, rcpt, 1024))
}

/// Transaction IDs (`T%08d`) a simulated peer received.
fn seqs(h: &Harness, peer: usize) -> Vec<usize> {
    let mut v: Vec<usize> = h.sims[peer]
        .received()
        .iter()
        .filter_map(|m| {
            let text = String::from_utf8_lossy(&m.data).into_owned();
            let at = text.find("X-Mms-Transaction-ID: T")? + "X-Mms-Transaction-ID: T".len();
            text[at..at + 8].parse().ok()
        })
        .collect();
    v.sort();
    v
}

/// The `with` value of the `Received:` line the relay put on a message.
fn received_with(data: &[u8]) -> String {
    let text = String::from_utf8_lossy(data);
    let trace = text.split("\r\n\t").nth(1).unwrap_or_default();
    let at = trace.find(" with ").expect("a with clause") + " with ".len();
    trace[at..]
        .split(' ')
        .next()
        .unwrap_or_default()
        .to_string()
}

fn tls_harness(pki: &Pki, listener: &str, extra_relay: &str) -> Harness {
    Harness::with(Profile {
        extra_listener: format!("{}{listener}", pki.listener_lines()),
        extra_relay: extra_relay.into(),
        ..Profile::default()
    })
}

#[test]
fn starttls_inbound_and_tls_required_before_mail() {
    let pki = Pki::new();
    let mut h = tls_harness(&pki, &format!("tls_required_from = {PARTNER_B}\n"), "");
    let mut c = h.client(PARTNER_B);
    let ehlo = c.cmd("EHLO b.test");
    assert!(ehlo.lines.iter().any(|l| l == "STARTTLS"), "{ehlo}");
    let r = c.cmd(&format!("MAIL FROM:<{FROM}>"));
    assert_eq!((r.code, &r.lines[0][..5]), (530, "5.7.0"), "{r}");
    c.starttls(&pki.connector());
    let ehlo = c.cmd("EHLO b.test");
    assert!(!ehlo.lines.iter().any(|l| l == "STARTTLS"), "{ehlo}");
    assert_eq!(try_send(&mut c, TO_A, 1).code, 250);
    // The local MMSC is not in tls_required_from: plain text is fine.
    let mut local = h.client(LOCAL);
    assert_eq!(local.cmd("EHLO a.test").code, 250);
    assert_eq!(try_send(&mut local, TO_A, 2).code, 250);
    assert!(h.sims[0].wait_for_recipients(2, DEADLINE));
    assert_eq!(seqs(&h, 0), [1, 2]);
    // RFC 3848: STARTTLS without AUTH, then plain text.
    let mut with: Vec<String> = h.sims[0]
        .received()
        .iter()
        .map(|m| received_with(&m.data))
        .collect();
    with.sort();
    assert_eq!(with, ["ESMTP", "ESMTPS"]);
    assert_eq!(h.stop_relay().undelivered, 0);
}

#[test]
fn implicit_tls_listener() {
    let pki = Pki::new();
    let mut h = tls_harness(&pki, "listen_tls = 127.0.0.1:0\n", "");
    let addrs = h.relay.as_ref().unwrap().local_addrs();
    assert_eq!(addrs.len(), 2, "plain and TLS listeners");
    let mut c = Client::connect_tls(LOCAL, addrs[1], &pki.connector());
    let ehlo = c.cmd("EHLO a.test");
    assert!(!ehlo.lines.iter().any(|l| l == "STARTTLS"), "{ehlo}");
    assert_eq!(try_send(&mut c, TO_B, 7).code, 250);
    assert!(h.sims[1].wait_for_recipients(1, DEADLINE));
    // Plain text on the TLS port is a failed handshake, not a session.
    let mut raw = tcp_from(LOCAL, addrs[1]);
    raw.write_all(b"EHLO plain.test\r\n").unwrap();
    let mut buf = [0u8; 256];
    let n = raw.read(&mut buf).unwrap_or(0);
    assert!(
        !buf[..n].starts_with(b"220"),
        "a plain greeting on the TLS port"
    );
    assert_eq!(h.stop_relay().undelivered, 0);
}

fn sim_tls(pki: &Pki, auth: Option<(&str, &str)>) -> SimSecurity {
    SimSecurity {
        tls: Some(pki.server.acceptor()),
        auth: auth.map(|(u, p)| (u.to_string(), p.to_string())),
    }
}

/// A peer whose certificate is self-signed: it does not verify.
fn sim_rogue(pki: &Pki) -> SimSecurity {
    SimSecurity {
        tls: Some(pki.rogue.acceptor()),
        auth: None,
    }
}

fn peer_lines(pki: &Pki, mode: &str) -> String {
    format!(
        "tls = {mode}\ntls_ca_file = {}\ntls_server_name = localhost\n",
        pki.ca.display()
    )
}

/// Sends one message from the local MMSC to `rcpt`.
fn submit(h: &Harness, rcpt: &str, seq: usize) {
    let mut c = h.client(LOCAL);
    assert_eq!(c.cmd("EHLO a.test").code, 250);
    let r = try_send(&mut c, rcpt, seq);
    assert_eq!(r.code, 250, "{r}");
}

#[test]
fn outbound_tls_required_verified_and_opportunistic_fallback() {
    let pki = Pki::new();
    let a = Box::leak(peer_lines(&pki, "required").into_boxed_str());
    let b = Box::leak(peer_lines(&pki, "opportunistic").into_boxed_str());
    let mut h = Harness::with(Profile {
        // A: required, verified. B: opportunistic to a peer whose
        // certificate does not verify (self-signed): falls back to plain.
        sim_security: [sim_tls(&pki, None), sim_rogue(&pki), SimSecurity::default()],
        extra_peer: [a, b, ""],
        ..Profile::default()
    });
    submit(&h, TO_A, 1);
    submit(&h, TO_B, 2);
    assert!(h.sims[0].wait_for_recipients(1, DEADLINE));
    assert!(h.sims[1].wait_for_recipients(1, DEADLINE));
    assert!(
        h.sims[0].received()[0].tls,
        "A must get the message over TLS"
    );
    assert!(!h.sims[1].received()[0].tls, "B fell back to plain text");
    assert_eq!(h.stop_relay().undelivered, 0);
}

#[test]
fn required_tls_never_falls_back() {
    let pki = Pki::new();
    let a = Box::leak(peer_lines(&pki, "required").into_boxed_str());
    let b = Box::leak(peer_lines(&pki, "required").into_boxed_str());
    let mut h = Harness::with(Profile {
        // A offers no STARTTLS; B's certificate does not verify.
        sim_security: [
            SimSecurity::default(),
            sim_rogue(&pki),
            SimSecurity::default(),
        ],
        extra_peer: [a, b, ""],
        ..Profile::default()
    });
    submit(&h, TO_A, 1);
    submit(&h, TO_B, 2);
    wait_until("A and B unhealthy", || {
        !h.peer(0).healthy && !h.peer(1).healthy
    });
    let (ea, eb) = (h.peer(0).last_error, h.peer(1).last_error);
    assert!(ea.contains("does not offer STARTTLS"), "{ea}");
    assert!(eb.contains("TLS") && eb.contains("certificate"), "{eb}");
    assert_eq!(h.sims[0].messages() + h.sims[1].messages(), 0);
    assert_eq!(h.stop_relay().undelivered, 2, "both stay queued");
}

#[test]
fn outbound_auth_over_tls_and_its_failures() {
    let pki = Pki::new();
    let tls = peer_lines(&pki, "required");
    let a = Box::leak(format!("{tls}auth_user = relay\nauth_password = s3cret\n").into_boxed_str());
    let b = Box::leak(format!("{tls}auth_user = relay\nauth_password = wrong\n").into_boxed_str());
    // C: AUTH configured, no TLS and no auth_plaintext: never sent.
    let c = "tls = off\nauth_user = relay\nauth_password = s3cret\n";
    let mut h = Harness::with(Profile {
        sim_security: [
            sim_tls(&pki, Some(("relay", "s3cret"))),
            sim_tls(&pki, Some(("relay", "s3cret"))),
            SimSecurity::default(),
        ],
        extra_peer: [a, b, c],
        ..Profile::default()
    });
    submit(&h, TO_A, 1);
    submit(&h, TO_B, 2);
    submit(&h, TO_C, 3);
    assert!(h.sims[0].wait_for_recipients(1, DEADLINE));
    assert_eq!(h.sims[0].received()[0].user.as_deref(), Some("relay"));
    wait_until("B and C unhealthy", || {
        !h.peer(1).healthy && !h.peer(2).healthy
    });
    let (eb, ec) = (h.peer(1).last_error, h.peer(2).last_error);
    assert!(eb.contains("AUTH: refused: 535"), "{eb}");
    assert!(ec.contains("no TLS") && !ec.contains("s3cret"), "{ec}");
    assert_eq!(h.stop_relay().undelivered, 2);
}

/// (client certificate CN, recipients) of each message a sink took.
type Got = Arc<Mutex<Vec<(String, Vec<String>)>>>;
/// A sink's connections, so its stop can cut them.
type Conns = Arc<Mutex<Vec<(TcpStream, JoinHandle<()>)>>>;

/// A partner MMSC that insists on a client certificate from our CA
/// (native-tls cannot ask for one, so this side is openssl itself).
struct MutualTlsSink {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    got: Got,
    accept: Option<JoinHandle<()>>,
    conns: Conns,
}

struct Collect<'a> {
    cn: String,
    got: &'a Mutex<Vec<(String, Vec<String>)>>,
}

impl Handler for Collect<'_> {
    type Route = ();
    fn rcpt(&mut self, _: &str, _: &str) -> Result<(), Reply> {
        Ok(())
    }
    fn message(&mut self, env: Envelope<()>, _: &mut Vec<u8>) -> Reply {
        let rcpts = env.rcpts.into_iter().map(|(r, _)| r).collect();
        self.got.lock().push((self.cn.clone(), rcpts));
        Reply::new(250, "2.0.0 ok")
    }
    fn auth(&mut self, _: &str, _: &str) -> bool {
        false
    }
}

fn session_cfg(starttls: bool) -> SessionConfig {
    SessionConfig {
        hostname: "mtls.test".into(),
        max_message_size: 1 << 20,
        max_recipients: 10,
        starttls,
        auth: false,
        auth_plaintext: false,
        max_bad_commands: 0,
        max_refused_recipients: 0,
    }
}

/// Runs `session` over `stream` until it asks to close or for STARTTLS.
fn drive<S: Read + Write>(
    stream: &mut S,
    session: &mut Session<()>,
    handler: &mut Collect<'_>,
) -> Option<bool> {
    let (mut buf, mut out, mut chunk) = (Vec::new(), Vec::new(), [0u8; 8192]);
    loop {
        let n = stream.read(&mut chunk).ok().filter(|&n| n > 0)?;
        buf.extend_from_slice(&chunk[..n]);
        out.clear();
        let p = session.feed(&buf, handler, &mut out);
        buf.drain(..p.consumed);
        stream.write_all(&out).ok()?;
        if p.close || p.starttls {
            return Some(p.starttls);
        }
    }
}

impl MutualTlsSink {
    fn start(pki: &Pki) -> MutualTlsSink {
        let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls()).unwrap();
        b.set_certificate_chain_file(&pki.server.cert).unwrap();
        b.set_private_key_file(&pki.server.key, SslFiletype::PEM)
            .unwrap();
        b.set_ca_file(&pki.ca).unwrap();
        b.set_verify(SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT);
        let acceptor = Arc::new(b.build());
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let got: Got = Arc::default();
        let conns: Conns = Arc::default();
        let (stop2, got2, conns2) = (stop.clone(), got.clone(), conns.clone());
        let accept = thread::spawn(move || {
            for s in l.incoming() {
                if stop2.load(Ordering::Acquire) {
                    return;
                }
                let Ok(mut s) = s else { continue };
                let clone = s.try_clone().unwrap();
                let (acceptor, got) = (acceptor.clone(), got2.clone());
                let h = thread::spawn(move || {
                    let mut session = Session::new(session_cfg(true));
                    let mut handler = Collect {
                        cn: String::new(),
                        got: &got,
                    };
                    let mut out = Vec::new();
                    session.greeting().write_to(&mut out);
                    if s.write_all(&out).is_err()
                        || drive(&mut s, &mut session, &mut handler) != Some(true)
                    {
                        return;
                    }
                    let Ok(mut tls) = acceptor.accept(s) else {
                        return;
                    };
                    handler.cn = tls
                        .ssl()
                        .peer_certificate()
                        .and_then(|c| {
                            let e = c.subject_name().entries().next()?;
                            Some(e.data().to_string().ok()?.to_string())
                        })
                        .unwrap_or_default();
                    session.tls_started();
                    drive(&mut tls, &mut session, &mut handler);
                });
                conns2.lock().push((clone, h));
            }
        });
        MutualTlsSink {
            addr,
            stop,
            got,
            accept: Some(accept),
            conns,
        }
    }

    fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = TcpStream::connect(self.addr);
        let _ = self.accept.take().unwrap().join();
        for (s, h) in std::mem::take(&mut *self.conns.lock()) {
            let _ = s.shutdown(std::net::Shutdown::Both);
            let _ = h.join();
        }
    }
}

#[test]
fn mutual_tls_to_a_partner() {
    let pki = Pki::new();
    let sink = MutualTlsSink::start(&pki);
    let with_cert = format!(
        "{}tls_client_cert = {}\ntls_client_key = {}\n",
        peer_lines(&pki, "required"),
        pki.client.cert.display(),
        pki.client.key.display()
    );
    let mut h = Harness::with(Profile::default());
    // Point B at the sink, first without a client certificate.
    let ini = h.ini();
    let b_host = h.sims[1].addr().to_string();
    let without = ini.replacen(
        &format!("hosts = {b_host}\n"),
        &format!("hosts = {}\n{}", sink.addr, peer_lines(&pki, "required")),
        1,
    );
    h.reload(&without).unwrap();
    submit(&h, TO_B, 1);
    wait_until("B refused without a client certificate", || {
        !h.peer(1).healthy
    });
    assert!(sink.got.lock().is_empty());
    let with = ini.replacen(
        &format!("hosts = {b_host}\n"),
        &format!("hosts = {}\n{with_cert}", sink.addr),
        1,
    );
    h.reload(&with).unwrap();
    h.control("queue retry B");
    wait_until("B got it over mutual TLS", || !sink.got.lock().is_empty());
    let got = sink.got.lock().clone();
    assert_eq!(
        got[0],
        ("relay-client.test".to_string(), vec![TO_B.to_string()])
    );
    assert_eq!(h.stop_relay().undelivered, 0);
    sink.stop();
}

#[test]
fn inbound_auth_makes_a_partner() {
    let pki = Pki::new();
    let mut h = tls_harness(&pki, "", "");
    let ini = h.ini() + "\n[auth]\npartner-b = B:pa55word\n";
    h.reload(&ini).unwrap();
    // An unknown address, before AUTH: nothing; AUTH before TLS: 538.
    let mut c = h.client(UNKNOWN);
    let ehlo = c.cmd("EHLO b.test");
    assert!(!ehlo.lines.iter().any(|l| l.starts_with("AUTH")), "{ehlo}");
    assert_eq!(try_send(&mut c, TO_A, 1).code, 550);
    assert_eq!(
        c.cmd(&format!(
            "AUTH PLAIN {}",
            plain_b64("partner-b", "pa55word")
        ))
        .code,
        538
    );
    c.starttls(&pki.connector());
    let ehlo = c.cmd("EHLO b.test");
    assert!(ehlo.lines.iter().any(|l| l == "AUTH PLAIN LOGIN"), "{ehlo}");
    assert_eq!(
        c.cmd(&format!("AUTH PLAIN {}", plain_b64("partner-b", "nope")))
            .code,
        535
    );
    assert_eq!(
        c.cmd(&format!(
            "AUTH PLAIN {}",
            plain_b64("partner-b", "pa55word")
        ))
        .code,
        235
    );
    assert_eq!(
        try_send(&mut c, TO_A, 2).code,
        250,
        "a partner may send to local"
    );
    assert_eq!(
        try_send(&mut c, TO_C, 3).code,
        550,
        "but not through us to C"
    );
    let status = h.control("status");
    assert!(
        status.contains("tls_sessions=1 ") && status.contains("auth_failures=1"),
        "{status}"
    );
    assert!(h.sims[0].wait_for_recipients(1, DEADLINE));
    assert_eq!(seqs(&h, 0), [2]);
    // STARTTLS and AUTH: RFC 3848's ESMTPSA.
    assert_eq!(received_with(&h.sims[0].received()[0].data), "ESMTPSA");
    assert_eq!(h.stop_relay().undelivered, 0);
}

/// Every client class against every recipient class, over plain text and
/// TLS: only the allowed cells deliver. The open-relay regression test.
#[test]
fn relay_control_matrix() {
    let pki = Pki::new();
    let mut h = tls_harness(&pki, "", "");
    let ini = h.ini() + "\n[auth]\npartner-b = B:pa55word\n";
    h.reload(&ini).unwrap();
    let clients = ["local", "partner B", "auth partner B", "unknown"];
    let rcpts = [
        ("A local", TO_A),
        ("B", TO_B),
        ("C", TO_C),
        ("unroutable", TO_NOWHERE),
    ];
    let allowed = |client: &str, tls: bool, rcpt: usize| match client {
        "local" => rcpt < 3,
        "partner B" => rcpt == 0,
        // AUTH is offered only over TLS: in plain text it stays unknown.
        "auth partner B" => tls && rcpt == 0,
        _ => false,
    };
    let mut expected: [Vec<usize>; 3] = Default::default();
    let mut table = String::from("client          transport  A(local)  B     C     unroutable\n");
    let mut seq = 0;
    for tls in [false, true] {
        for client in clients {
            let ip = match client {
                "local" => LOCAL,
                "partner B" => PARTNER_B,
                _ => UNKNOWN,
            };
            let mut c = h.client(ip);
            assert_eq!(c.cmd("EHLO m.test").code, 250);
            if tls {
                c.starttls(&pki.connector());
                assert_eq!(c.cmd("EHLO m.test").code, 250);
            }
            if client == "auth partner B" {
                let r = c.cmd(&format!(
                    "AUTH PLAIN {}",
                    plain_b64("partner-b", "pa55word")
                ));
                assert_eq!(r.code, if tls { 235 } else { 538 }, "{r}");
            }
            let mut row = format!("{client:<15} {:<10}", if tls { "TLS" } else { "plain" });
            for (i, (_, rcpt)) in rcpts.iter().enumerate() {
                seq += 1;
                let reply = try_send(&mut c, rcpt, seq);
                let want = allowed(client, tls, i);
                assert_eq!(
                    reply.code == 250,
                    want,
                    "{client} tls={tls} -> {rcpt}: {reply}"
                );
                if want {
                    expected[i].push(seq);
                }
                row.push_str(&format!(
                    " {:<5}",
                    if reply.code == 250 {
                        "yes"
                    } else {
                        &reply.lines[0][..5]
                    }
                ));
            }
            table.push_str(&row);
            table.push('\n');
        }
    }
    println!("{table}");
    for (i, want) in expected.iter().enumerate() {
        assert!(h.sims[i].wait_for_recipients(want.len() as u64, DEADLINE));
    }
    assert_eq!(h.stop_relay().undelivered, 0);
    for (i, want) in expected.iter().enumerate() {
        assert_eq!(&seqs(&h, i), want, "peer {i} got exactly the allowed cells");
    }
}

#[test]
fn slow_loris_is_cut_while_others_go_on() {
    let mut h = Harness::with(Profile {
        extra_listener: "command_timeout = 1s\ndata_timeout = 1s\n".into(),
        ..Profile::default()
    });
    let started = Instant::now();
    // One client trickles a command line, one octet at a time; another
    // trickles its DATA. Each octet arrives well within the timeout.
    let trickle = |prefix: &'static [u8], line: &'static [u8]| {
        let target = h.addr;
        thread::spawn(move || {
            let mut s = tcp_from(UNKNOWN, target);
            s.write_all(prefix).unwrap();
            for b in line.iter().cycle().take(200) {
                if s.write_all(&[*b]).is_err() {
                    break;
                }
                thread::sleep(Duration::from_millis(100));
            }
            read_to_close(&mut s)
        })
    };
    let slow_command = trickle(b"", b"EHLO slowly.test");
    let slow_data = trickle(
        b"EHLO d.test\r\nMAIL FROM:<x@y>\r\nRCPT TO:<z@w>\r\n",
        b"data ",
    );
    // Meanwhile the local MMSC's sessions go on normally.
    for seq in 0..5 {
        submit(&h, TO_A, seq);
    }
    let (cmd, data) = (slow_command.join().unwrap(), slow_data.join().unwrap());
    assert!(
        cmd.contains("421 4.4.2 timeout waiting for a command"),
        "{cmd}"
    );
    // The stranger's RCPT is refused, so its DATA is never entered: it is
    // cut as a command line too.
    assert!(data.contains("421 4.4.2"), "{data}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "cut at the deadline"
    );
    assert!(h.sims[0].wait_for_recipients(5, DEADLINE));
    // DATA itself: a trickling local client is cut at data_timeout.
    let mut c = h.client(LOCAL);
    assert_eq!(c.cmd("EHLO a.test").code, 250);
    assert_eq!(c.cmd(&format!("MAIL FROM:<{FROM}>")).code, 250);
    assert_eq!(c.cmd(&format!("RCPT TO:<{TO_A}>")).code, 250);
    assert_eq!(c.cmd("DATA").code, 354);
    let mut closed = false;
    for _ in 0..100 {
        c.send(b"x");
        thread::sleep(Duration::from_millis(100));
        if let Some(r) = c.try_reply() {
            assert!(
                r.to_string()
                    .starts_with("421 4.4.2 timeout receiving DATA"),
                "{r}"
            );
            closed = true;
            break;
        }
    }
    assert!(closed, "DATA trickle not cut");
    assert_eq!(h.stop_relay().undelivered, 0);
}

#[test]
fn per_address_limits_and_bad_commands() {
    let mut h = Harness::with(Profile {
        extra_listener:
            "max_sessions_per_ip = 2\nconnection_rate_per_ip = 4\nmax_bad_commands = 3\n\
                         max_header_fields = 20\n"
                .into(),
        ..Profile::default()
    });
    // Two sessions from B at once; the third is refused.
    let b1 = h.client(PARTNER_B);
    let b2 = h.client(PARTNER_B);
    let mut third = tcp_from(PARTNER_B, h.addr);
    let refused = read_to_close(&mut third);
    assert!(
        refused.starts_with("421 4.7.0 too many sessions"),
        "{refused}"
    );
    // The local MMSC is exempt, and other addresses are not starved.
    let locals: Vec<Client> = (0..4).map(|_| h.client(LOCAL)).collect();
    let mut c3 = h.client(PARTNER_C);
    assert_eq!(c3.cmd("EHLO c.test").code, 250);
    drop((b1, b2, locals));
    // Connection rate: 4 per second from C; one is open, so a burst of
    // new ones hits the rate before the session limit is reached again.
    let mut rate_refused = false;
    for _ in 0..6 {
        let mut s = tcp_from(PARTNER_C, h.addr);
        let mut first = [0u8; 64];
        let n = s.read(&mut first).unwrap();
        let line = String::from_utf8_lossy(&first[..n]).into_owned();
        if line.contains("per second") {
            rate_refused = true;
            break;
        }
    }
    assert!(rate_refused, "no connection refused by the rate limit");
    let status = h.control("status");
    assert!(!status.contains("refused_per_ip=0 "), "{status}");
    // Bad commands: the third one gets 421 and the socket closes.
    assert_eq!(c3.cmd("FOO").code, 500);
    assert_eq!(c3.cmd("RCPT TO:<x@y>").code, 503);
    let r = c3.cmd("BAR");
    assert_eq!(r.code, 500);
    assert_eq!(c3.reply().code, 421);
    assert!(c3.closed());
    // Too many header fields: 554 5.3.4 in any mm4_check mode.
    let mut c = h.client(LOCAL);
    assert_eq!(c.cmd("EHLO a.test").code, 250);
    assert_eq!(c.cmd(&format!("MAIL FROM:<{FROM}>")).code, 250);
    assert_eq!(c.cmd(&format!("RCPT TO:<{TO_A}>")).code, 250);
    assert_eq!(c.cmd("DATA").code, 354);
    let mut msg = String::new();
    for i in 0..25 {
        msg.push_str(&format!("X-Filler-{i}: x\r\n"));
    }
    let msg = msg + &String::from_utf8(forward_req(1, TO_A, 512)).unwrap();
    let r = c.data(msg.as_bytes());
    assert_eq!(r.code, 554, "{r}");
    assert!(
        r.to_string().contains("5.3.4 more than 20 header fields"),
        "{r}"
    );
    assert_eq!(h.stop_relay().undelivered, 0);
}

/// `tls = implicit`: TLS from the first octet, to another relay's
/// implicit-TLS listener (`listen_tls`), verified against the test CA.
/// B's host speaks plain SMTP on its port: a TLS error at once, nothing
/// sent in plain text. C's certificate is the same but not trusted (no
/// `tls_ca_file`): refused.
#[test]
fn implicit_tls_to_peers() {
    let pki = Pki::new();
    let mut back = tls_harness(&pki, "listen_tls = 127.0.0.1:0\n", "");
    let back_tls = back.relay.as_ref().unwrap().local_addrs()[1];
    let mut h = Harness::start();
    let ini = h
        .ini()
        .replacen(
            &format!("hosts = {}\n", h.sims[0].addr()),
            &format!("hosts = {back_tls}\n{}", peer_lines(&pki, "implicit")),
            1,
        )
        .replacen(
            &format!("hosts = {}\n", h.sims[1].addr()),
            &format!(
                "hosts = {}\n{}",
                h.sims[1].addr(),
                peer_lines(&pki, "implicit")
            ),
            1,
        )
        .replacen(
            &format!("hosts = {}\n", h.sims[2].addr()),
            &format!("hosts = {back_tls}\ntls = implicit\n"),
            1,
        );
    h.reload(&ini).unwrap();
    let started = Instant::now();
    submit(&h, TO_A, 1);
    submit(&h, TO_B, 2);
    submit(&h, TO_C, 3);
    // A: through the other relay, to its local MMSC, over TLS.
    assert!(back.sims[0].wait_for_recipients(1, DEADLINE));
    let got = back.sims[0].received().remove(0);
    assert_eq!(received_with(&got.data), "ESMTPS", "the hop came over TLS");
    // B: the plain greeting is no TLS record; well within helo_timeout (2s).
    wait_until("B's TLS error", || !h.peer(1).last_error.is_empty());
    assert!(started.elapsed() < Duration::from_millis(1500));
    let eb = h.peer(1).last_error;
    assert!(eb.contains("TLS") && eb.contains("implicit TLS"), "{eb}");
    // C: the test CA is not trusted without tls_ca_file.
    wait_until("C's certificate error", || !h.peer(2).last_error.is_empty());
    let ec = h.peer(2).last_error;
    assert!(ec.contains("TLS") && ec.contains("certificate"), "{ec}");
    assert_eq!(h.sims[1].messages(), 0, "nothing in plain text to B");
    assert_eq!(back.sims[2].messages(), 0);
    assert_eq!(h.stop_relay().undelivered, 2, "B and C stay queued");
    assert_eq!(back.stop_relay().undelivered, 0);
}

/// A peer that accepts the connection and never answers the TLS hello
/// holds a worker no longer than its helo_timeout (1s for C).
#[test]
fn implicit_tls_handshake_is_bounded_by_helo_timeout() {
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();
    let held = Arc::new(Mutex::new(Vec::new()));
    let keep = held.clone();
    thread::spawn(move || {
        for s in silent.incoming().flatten() {
            keep.lock().push(s);
        }
    });
    let mut h = Harness::start();
    let ini = h.ini().replacen(
        &format!("hosts = {}\n", h.sims[2].addr()),
        &format!("hosts = {addr}\ntls = implicit\n"),
        1,
    );
    h.reload(&ini).unwrap();
    let started = Instant::now();
    submit(&h, TO_C, 1);
    wait_until("C's handshake to time out", || {
        !h.peer(2).last_error.is_empty()
    });
    let waited = started.elapsed();
    let ec = h.peer(2).last_error;
    assert!(ec.contains("timed out"), "{ec}");
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_millis(2500),
        "{waited:?}"
    );
    assert!(!held.lock().is_empty(), "it did connect");
    assert_eq!(h.stop_relay().undelivered, 1);
}
