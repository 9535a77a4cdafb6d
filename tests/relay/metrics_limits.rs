//! The metrics endpoint is no lever against the relay (issue 11, item 7):
//! idle connections to it cost at most its cap in descriptors and are cut
//! at its deadline, and running out of descriptors does not end it.

use std::collections::HashSet;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use mm4relay::ops::metrics::MAX_CONNECTIONS;

use crate::binary::setup;
use crate::support::*;

/// Idle connections opened against the metrics port.
const IDLE: usize = 200;

/// Held by each test here: the one that exhausts a child's descriptors
/// opens dozens of sockets in this process, which the other counts.
static ALONE: Mutex<()> = Mutex::new(());

fn alone() -> MutexGuard<'static, ()> {
    ALONE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Descriptors this process has open.
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Descriptors of this process that are the accepted end of a TCP
/// connection to `port`: what the in-process metrics server holds.
fn accepted_on(port: u16) -> usize {
    let mut inodes = HashSet::new();
    for table in ["/proc/self/net/tcp", "/proc/self/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local_address is HEXADDR:HEXPORT; state 0A is LISTEN.
            let local = f[1].rsplit(':').next().unwrap();
            if u16::from_str_radix(local, 16) == Ok(port) && f[3] != "0A" {
                inodes.insert(format!("socket:[{}]", f[9]));
            }
        }
    }
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|link| inodes.contains(link.to_string_lossy().as_ref()))
        .count()
}

/// One scrape: the status line and body, or what went wrong.
fn scrape(addr: SocketAddr) -> Result<String, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: relay\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(|e| e.to_string())?;
    Ok(text)
}

/// True once the relay has closed `c` (after a 503 or at its deadline);
/// `c` is non-blocking, so this does not wait.
fn closed_now(c: &mut TcpStream) -> bool {
    let mut buf = [0u8; 512];
    loop {
        match c.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
}

#[test]
fn idle_connections_to_metrics_cost_at_most_its_cap_and_are_cut() {
    let _alone = alone();
    let mut h = Harness::with(Profile {
        extra_relay: "metrics_listen = 127.0.0.1:0".into(),
        ..Profile::default()
    });
    let addr = h.relay.as_ref().unwrap().metrics_addr().unwrap();
    assert!(scrape(addr).unwrap().starts_with("HTTP/1.1 200 OK\r\n"));
    let before = open_fds();
    let end = Instant::now() + DEADLINE;
    let mut idle: Vec<TcpStream> = (0..IDLE)
        .map(|_| {
            let c = TcpStream::connect(addr).unwrap();
            c.set_nonblocking(true).unwrap();
            c
        })
        .collect();
    // What the relay holds: its accepted metrics sockets, exactly, and the
    // growth of all descriptors, the idle connections' client ends apart
    // (other tests of this binary run alongside, hence a margin there;
    // without the cap, it would be two per idle connection).
    let (mut most_accepted, mut most_grown) = (0, 0);
    let mut sample = || {
        most_accepted = most_accepted.max(accepted_on(addr.port()));
        most_grown = most_grown.max(open_fds().saturating_sub(before + IDLE));
    };
    let mut closed = vec![false; IDLE];
    // Every connection past the cap is answered 503 and closed at once.
    wait_until("the relay to turn away what is over its cap", || {
        sample();
        for (c, done) in idle.iter_mut().zip(&mut closed) {
            *done = *done || closed_now(c);
        }
        closed.iter().filter(|&&d| d).count() >= IDLE - MAX_CONNECTIONS
    });
    // SMTP is served meanwhile.
    let mut smtp = h.client(LOCAL);
    assert_eq!(smtp.cmd("QUIT").code, 221);
    // A real scrape gets through once the cap has room again.
    let mut body = String::new();
    wait_until("a scrape to get 200", || {
        sample();
        match scrape(addr) {
            Ok(text) if text.starts_with("HTTP/1.1 200 OK\r\n") => {
                body = text;
                true
            }
            _ => false,
        }
    });
    assert!(body.contains("\nmm4relay_sessions_total "), "{body}");
    // The ones held are cut at the head deadline, well within ours.
    wait_until("every idle connection to be closed", || {
        for (c, done) in idle.iter_mut().zip(&mut closed) {
            *done = *done || closed_now(c);
        }
        closed.iter().all(|&d| d)
    });
    assert!(
        Instant::now() < end,
        "idle connections outlived the deadline"
    );
    assert!(
        most_accepted <= MAX_CONNECTIONS + 1,
        "the relay held {most_accepted} metrics connections at once (cap {MAX_CONNECTIONS})"
    );
    assert!(
        most_grown <= MAX_CONNECTIONS + 64,
        "the relay's descriptors grew by {most_grown} with {IDLE} idle connections"
    );
    eprintln!(
        "with {IDLE} idle connections: at most {most_accepted} accepted metrics sockets, \
         descriptors grew by at most {most_grown} (idle client ends apart)"
    );
    drop(idle);
    h.stop_relay();
}

/// Lines the relay writes on stderr, as they come.
fn stderr_lines(child: &mut std::process::Child) -> crossbeam_channel::Receiver<String> {
    let (tx, rx) = crossbeam_channel::unbounded();
    let err = BufReader::new(child.stderr.take().unwrap());
    std::thread::spawn(move || {
        for line in err.lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// Reads `lines` into `seen` until one satisfies `found`, within the
/// test deadline.
fn wait_for_line(
    lines: &crossbeam_channel::Receiver<String>,
    seen: &mut Vec<String>,
    what: &str,
    found: impl Fn(&str) -> bool,
) -> String {
    let end = Instant::now() + DEADLINE;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => {
                seen.push(line.clone());
                if found(&line) {
                    return line;
                }
            }
            Err(_) => panic!("no {what} in the log: {seen:#?}"),
        }
    }
}

#[test]
fn metrics_serves_again_after_the_relay_ran_out_of_descriptors() {
    let _alone = alone();
    let s = setup(false, "metrics_listen = 127.0.0.1:0\n");
    let mut child = Running(
        Command::new("sh")
            .arg("-c")
            .arg("ulimit -n 96 && exec \"$0\" run -c \"$1\"")
            .arg(BIN)
            .arg(&s.path)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let lines = stderr_lines(&mut child.0);
    let mut seen = Vec::new();
    wait_for_line(&lines, &mut seen, "the limit warning", |l| {
        l.contains("open files limit (RLIMIT_NOFILE) is 96, but this configuration may need")
            && l.contains("LimitNOFILE=")
    });
    let metrics: SocketAddr = wait_for_line(&lines, &mut seen, "the metrics address", |l| {
        l.contains("metrics at http://")
    })
    .split("http://")
    .nth(1)
    .and_then(|r| r.split('/').next())
    .unwrap()
    .parse()
    .unwrap();
    let smtp: SocketAddr = wait_for_line(&lines, &mut seen, "listening", |l| {
        l.contains("listening on ")
    })
    .split("listening on ")
    .nth(1)
    .unwrap()
    .trim()
    .parse()
    .unwrap();

    // SMTP sessions until the relay has no descriptor left to accept one.
    let mut sessions = Vec::new();
    let listener_failed = |l: &str| l.contains("accept failed: ") && !l.contains("metrics");
    loop {
        assert!(sessions.len() < 200, "the relay never ran out: {seen:#?}");
        sessions.push(TcpStream::connect(smtp).unwrap());
        if let Ok(line) = lines.recv_timeout(Duration::from_millis(20)) {
            seen.push(line.clone());
            if listener_failed(&line) {
                break;
            }
        }
    }
    // When the listener's accept took the last descriptor and only its
    // duplicate failed, that one is free again between attempts: a silent
    // metrics connection takes it (or fails, which is as good), so the
    // scrape after it must wait in the backlog while accept fails.
    let _silent = TcpStream::connect(metrics).unwrap();
    let mut pending = TcpStream::connect(metrics).unwrap();
    pending.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    // And one more session waits in the listener's backlog, so that its
    // accept goes on failing too.
    sessions.push(TcpStream::connect(smtp).unwrap());
    wait_for_line(&lines, &mut seen, "the metrics accept failure", |l| {
        l.contains("metrics: accept failed: ") && l.contains("going on")
    });
    // Let both accept loops fail a while longer: the listener says so at
    // most once a second, metrics retries every 100 ms and keeps quiet
    // for 10 s.
    wait_for_line(&lines, &mut seen, "more listener failures", listener_failed);
    drop(sessions);
    pending.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut text = String::new();
    pending.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(text.contains("\nmm4relay_sessions_total "), "{text}");
    let mut c = Client::connect(LOCAL, smtp);
    assert_eq!(c.cmd("QUIT").code, 221);
    assert!(child.terminate().success());
    seen.extend(lines.iter());
    let warnings = seen
        .iter()
        .filter(|l| l.contains("metrics: accept failed: "))
        .count();
    assert_eq!(warnings, 1, "one warning per 10 s at most: {seen:#?}");
}
