//! The control socket: a Unix socket (`[relay] control_socket`, mode 0600)
//! on which the running relay answers one command per connection, and the
//! client side used by `mm4relay status`.
//!
//! Protocol: the client sends one line and the relay answers with text
//! and closes; an answer that starts with `error:` is a refusal. Commands:
//! `status`, `status json`, `route ADDRESS` (the peer and the rule, by
//! the tables in force), `reload` (answered once the main loop has
//! reloaded or refused), `queue age`, `queue list [PEER]`, `queue show ID`,
//! `queue retry ID|PEER|all`, `queue hold PEER|ID`, `queue release
//! PEER|ID`, `queue delete ID [REASON]`.

use std::fmt::Write as _;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use std::time::Duration;

use crossbeam_channel::Sender;
use log::{info, warn};

use crate::inbound::{Inbound, InboundStats};
use crate::ops::status;
use crate::peer::{PeerSnapshot, PeerViews};
use crate::queue::Queue;
use crate::spool::{Holds, Outcome, OutcomeKind, Spool};
use crate::sys::owned::Owned;
use crate::sys::printable::Printable;

/// Longest command line accepted on the socket.
const MAX_COMMAND: u64 = 256;

/// What the control thread (and the metrics) read their answers from.
#[derive(Clone)]
pub struct Sources {
    /// Every peer.
    pub peers: PeerViews,
    /// The listener's counters.
    pub inbound: Arc<InboundStats>,
    /// The routing tables in force, for `route`.
    pub intake: Arc<Inbound>,
    /// For pool, overflow and retry counts.
    pub queue: Arc<Queue>,
    /// For the spool's size.
    pub spool: Arc<Spool>,
    /// Where `reload` asks the relay's main loop, with where to answer.
    pub reload: Sender<Sender<String>>,
    /// The CDR ledger's figures, when CDRs are on.
    pub cdr: Option<Arc<crate::cdr::LedgerStats>>,
}

/// How long `reload` waits for the main loop's answer.
const RELOAD_ANSWER: Duration = Duration::from_secs(30);

/// The running control socket.
pub struct ControlSocket {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    handle: Option<Owned<()>>,
}

impl ControlSocket {
    /// Binds `path` (replacing a stale socket) with mode 0600 and serves it.
    pub fn start(path: &Path, sources: Sources) -> io::Result<ControlSocket> {
        if UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{}: another mm4relay is running", path.display()),
            ));
        }
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).map_err(|e| {
            io::Error::new(e.kind(), format!("control socket {}: {e}", path.display()))
        })?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        info!("control socket at {}", path.display());
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = Owned::spawn("control", move || serve(&listener, &sources, &flag))?;
        Ok(ControlSocket {
            path: path.to_path_buf(),
            stop,
            handle: Some(handle),
        })
    }

    /// Stops serving and removes the socket.
    pub fn stop(mut self) {
        self.shut();
    }

    fn shut(&mut self) {
        let Some(h) = self.handle.take() else { return };
        self.stop.store(true, Ordering::Release);
        // Wake the blocked accept().
        let _ = UnixStream::connect(&self.path);
        h.join();
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        self.shut();
    }
}

fn serve(listener: &UnixListener, sources: &Sources, stop: &AtomicBool) {
    for conn in listener.incoming() {
        if stop.load(Ordering::Acquire) {
            return;
        }
        let Ok(stream) = conn else { continue };
        if let Err(e) = answer(stream, sources) {
            warn!("control socket: {e}");
        }
    }
}

fn answer(stream: UnixStream, sources: &Sources) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut line = String::new();
    BufReader::new((&stream).take(MAX_COMMAND)).read_line(&mut line)?;
    let snapshots: Vec<PeerSnapshot> = sources
        .peers
        .list()
        .iter()
        .map(|p| p.snapshot(&sources.queue))
        .collect();
    let words: Vec<&str> = line.split_whitespace().collect();
    let reply = match words.as_slice() {
        ["status"] => status::text(&snapshots, &status::Totals::of(sources)),
        ["status", "json"] => status::json(&snapshots, &status::Totals::of(sources)),
        ["route", rcpt @ ..] if !rcpt.is_empty() => sources.intake.explain_route(&rcpt.join(" ")),
        ["reload"] => {
            // The main loop reloads and says how it went.
            let (tx, rx) = crossbeam_channel::bounded(1);
            match sources
                .reload
                .send(tx)
                .map(|()| rx.recv_timeout(RELOAD_ANSWER))
            {
                Ok(Ok(answer)) => answer,
                _ => "error: the relay did not answer the reload\n".into(),
            }
        }
        ["queue", "age"] => queue_age(sources),
        ["queue", "list"] => queue_list(sources, None),
        ["queue", "list", peer] => queue_list(sources, Some(peer)),
        ["queue", "retry", what] => queue_retry(sources, what),
        ["queue", "hold", peer] => hold(sources, peer, true),
        ["queue", "show", id] => queue_show(sources, id),
        ["queue", "delete", id, reason @ ..] => queue_delete(sources, id, &reason.join(" ")),
        ["queue", "release", peer] => hold(sources, peer, false),
        _ => format!(
            "error: unknown command {:?}; try status, status json, route ADDRESS, reload, queue age, \
             queue list [PEER], \
             queue show ID, queue retry ID|PEER|all, queue hold PEER|ID, queue release PEER|ID, \
             queue delete ID [REASON]\n",
            line.trim()
        ),
    };
    (&stream).write_all(reply.as_bytes())
}

/// Upper bounds of the age buckets of `queue age` (as qshape's).
const AGE_BUCKETS: [(u64, &str); 8] = [
    (300, "5m"),
    (600, "10m"),
    (1200, "20m"),
    (2400, "40m"),
    (4800, "80m"),
    (9600, "160m"),
    (19200, "320m"),
    (38400, "640m"),
];

/// Messages queued per peer by age, like Postfix's qshape.
fn queue_age(sources: &Sources) -> String {
    let limits: Vec<Duration> = AGE_BUCKETS
        .iter()
        .map(|(s, _)| Duration::from_secs(*s))
        .collect();
    let mut out = format!("{:<10} {:>7}", "peer", "total");
    for (_, name) in AGE_BUCKETS {
        let _ = write!(out, " {:>6}", format!("<{name}"));
    }
    out.push_str("   older\n");
    for (i, p) in sources.peers.list().iter().enumerate() {
        let counts = sources.queue.ages(i, &limits);
        let _ = write!(out, "{:<10} {:>7}", p.name(), counts.iter().sum::<usize>());
        for c in &counts {
            let _ = write!(out, " {c:>6}");
        }
        out.push('\n');
    }
    out
}

fn peer_index(sources: &Sources, name: &str) -> Option<usize> {
    sources.peers.list().iter().position(|p| p.name() == name)
}

/// Makes deferred messages due now: one message, one peer's, or all.
fn queue_retry(sources: &Sources, what: &str) -> String {
    if what == "all" {
        sources.queue.retry_now(None, None);
        info!("control: retry of everything deferred requested");
        return "retrying all deferred messages now\n".into();
    }
    if let Some(i) = peer_index(sources, what) {
        sources.queue.retry_now(Some(i), None);
        info!("control: retry of peer {what} requested");
        return format!("retrying the deferred messages of {what} now\n");
    }
    let known = (0..sources.peers.list().len())
        .any(|i| sources.queue.list(i).iter().any(|q| q.message.id == what));
    if !known {
        return format!("error: {what:?} is neither a peer nor a queued message\n");
    }
    sources.queue.retry_now(None, Some(what));
    info!("control: retry of {what} requested");
    format!("retrying {what} now\n")
}

/// Everything known of one queued message: envelope, state per peer, and
/// its header section as spooled.
fn queue_show(sources: &Sources, id: &str) -> String {
    let mut out = String::new();
    let mut message = None;
    for (i, p) in sources.peers.list().iter().enumerate() {
        for q in sources
            .queue
            .list(i)
            .into_iter()
            .filter(|q| q.message.id == id)
        {
            let _ = writeln!(
                out,
                "peer={} to={} attempts={} next=\"{}\" last_reply=\"{}\"",
                p.name(),
                q.rcpts
                    .iter()
                    .map(|r| format!("<{}>", Printable(r)))
                    .collect::<Vec<_>>()
                    .join(","),
                q.attempts,
                q.next_attempt
                    .map_or("now".into(), crate::mm4::date::format),
                Printable(&q.last_reply.replace('"', "'"))
            );
            for (at, reply) in &q.history {
                let _ = writeln!(
                    out,
                    "  attempt failed at \"{}\": {}",
                    crate::mm4::date::format(*at),
                    Printable(&reply.to_string())
                );
            }
            message = Some(q.message);
        }
    }
    let Some(m) = message else {
        return format!("error: no queued message {id:?}\n");
    };
    let mut head = format!(
        "id={} size={} from=<{}> accepted=\"{}\" expires=\"{}\" mid={} tid={}\n",
        m.id,
        m.location.len,
        Printable(&m.from),
        crate::mm4::date::format(m.accepted),
        crate::mm4::date::format(m.expires),
        Printable(m.info.message_id.as_deref().unwrap_or("-")),
        Printable(m.info.transaction_id.as_deref().unwrap_or("-")),
    );
    head.push_str(&out);
    head.push('\n');
    match sources.spool.read(&m.id, &m.location) {
        Ok(data) => {
            let end = data
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
                .map_or(data.len(), |p| p + 2);
            // One line per header line, each of printable ASCII; a folded
            // line's tab is shown as a space.
            for line in String::from_utf8_lossy(&data[..end]).split_terminator("\r\n") {
                let _ = writeln!(head, "{}", Printable(&line.replace('\t', " ")));
            }
            content_summary(&mut head, &data);
        }
        Err(e) => {
            let _ = writeln!(head, "(data unreadable: {e})");
        }
    }
    head
}

/// The decoded Subject and the MIME parts of a message, after its header.
fn content_summary(out: &mut String, data: &[u8]) {
    let Some(s) = crate::mm4::summary::summarize(data) else {
        let _ = writeln!(out, "\n(content: mail-parser cannot read it)");
        return;
    };
    let _ = writeln!(
        out,
        "\ncontent: subject=\"{}\"",
        Printable(&s.subject.unwrap_or_default().replace('"', "'"))
    );
    for (i, p) in s.parts.iter().enumerate() {
        let _ = writeln!(
            out,
            "  part {}: {} {} octets",
            i + 1,
            Printable(&p.content_type),
            p.size
        );
    }
    if s.more > 0 {
        let _ = writeln!(out, "  and {} more parts", s.more);
    }
}

/// Deletes a queued message for good: it is recorded done in the spool
/// for every peer that still had recipients, and logged with the reason.
fn queue_delete(sources: &Sources, id: &str, reason: &str) -> String {
    let removed = sources.queue.delete(id);
    if removed.is_empty() {
        return format!("error: no queued message {id:?}\n");
    }
    let reason = if reason.is_empty() {
        "no reason given"
    } else {
        reason
    };
    for (peer, rcpts) in &removed {
        let name = sources.peers.list()[*peer].name().to_string();
        let outcome = Outcome {
            kind: OutcomeKind::Deleted,
            code: 0,
            reply: format!("deleted by an operator: {reason}"),
            attempts: 0,
            at: sources.queue.now(),
        };
        sources.spool.done(id, &name, rcpts, outcome);
        info!(
            "{id} peer={name} to={} status=deleted reason=\"{}\"",
            rcpts
                .iter()
                .map(|r| format!("<{r}>"))
                .collect::<Vec<_>>()
                .join(","),
            reason.replace('"', "'")
        );
    }
    format!("{id} deleted\n")
}

/// Holds a peer (keeps its queue, sends nothing) or releases it.
/// Holds or releases a peer, or one queued message.
fn hold(sources: &Sources, name: &str, held: bool) -> String {
    let Some(i) = peer_index(sources, name) else {
        let done = if held {
            sources.queue.hold(name)
        } else {
            sources.queue.release(name)
        };
        if !done {
            let why = if held { "queued" } else { "held" };
            return format!("error: {name:?} is neither a peer nor a {why} message\n");
        }
        let what = if held {
            "held: it stays queued and is not attempted until released"
        } else {
            "released"
        };
        info!("control: message {name} {what}");
        return format!("{name} {what}\n{}", save_holds(sources));
    };
    sources.peers.list()[i].control().set_held(held);
    let what = if held {
        "held: it keeps its queue and sends nothing"
    } else {
        "released"
    };
    info!("control: peer={name} {what}");
    format!("{name} {what}\n{}", save_holds(sources))
}

/// Keeps every hold in the spool, so that a restart keeps them; says so
/// when that failed (the holds apply until the next restart all the same).
fn save_holds(sources: &Sources) -> String {
    let holds = Holds {
        peers: sources
            .peers
            .list()
            .iter()
            .filter(|p| p.control().held())
            .map(|p| p.name().to_string())
            .collect(),
        messages: sources.queue.held_ids(),
    };
    match sources.spool.save_holds(&holds) {
        Ok(()) => String::new(),
        Err(e) => {
            warn!("control: cannot save the holds: {e}");
            format!("warning: not saved ({e}): a restart releases it\n")
        }
    }
}

/// Queued messages, oldest first, for one peer or all.
fn queue_list(sources: &Sources, only: Option<&str>) -> String {
    let mut out = String::new();
    let now = sources.queue.now();
    let mut any = false;
    for (i, p) in sources.peers.list().iter().enumerate() {
        let name = p.name();
        if only.is_some_and(|o| o != name) {
            continue;
        }
        any = true;
        for q in sources.queue.list(i) {
            let age = now
                .duration_since(q.message.accepted)
                .unwrap_or_default()
                .as_secs();
            // Due times passed already are "now": the job is in the pool.
            let next = q
                .next_attempt
                .and_then(|t| t.duration_since(now).ok())
                .map_or("now".to_string(), |d| format!("+{}s", d.as_secs()));
            let _ = writeln!(
                out,
                "{} peer={name} age={age}s size={} attempts={} next={next} from=<{}> to={} last_reply=\"{}\"",
                q.message.id,
                q.message.location.len,
                q.attempts,
                Printable(&q.message.from),
                q.rcpts
                    .iter()
                    .map(|r| format!("<{}>", Printable(r)))
                    .collect::<Vec<_>>()
                    .join(","),
                Printable(&q.last_reply.replace('"', "'"))
            );
        }
    }
    if !any {
        return format!("error: no peer named {:?}\n", only.unwrap_or(""));
    }
    out
}

/// Sends `command` to the relay listening on `path` and returns its answer.
pub fn request(path: &Path, command: &str) -> io::Result<String> {
    let mut stream = UnixStream::connect(path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "mm4relay is not running (no control socket at {}: {e})",
                path.display()
            ),
        )
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(format!("{command}\n").as_bytes())?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    Ok(answer)
}
