//! Charging data records: one CSV row for every final outcome of a
//! recipient, every deferral, duplicate and deletion, and every
//! MM4_forward.RES matched to the forward.REQ it answers (or missing).
//!
//! # Exactly once
//! Rows are not written by the threads that decide outcomes. The spool
//! numbers every record it makes durable and hands it to the ledger
//! ([`crate::spool::Journal`]); the ledger derives rows from those entries
//! in order, each row named by its record's number and its place among
//! that record's rows (`cdr_id`). Every second the ledger writes its file;
//! every second too (less often while many transactions wait) it flushes
//! it and saves its checkpoint (the last record it accounted for, and the
//! transactions waiting for a RES) in the spool directory; the spool keeps
//! every segment holding records past the checkpoint. After a crash the
//! spool hands back the records past the checkpoint, and the ledger
//! derives their rows again, writing only those past the last row found in
//! the file left open: no row is lost, and none is written twice. A
//! second `sent` row appears only for a second delivery (a crash between
//! a peer's 250 and the spool's done record).
//!
//! Decisions that hang on time (a RES that did not come) are journaled as
//! events first, so a replay makes the same rows.
//!
//! # Files of this part
//! `row.rs` the columns and CSV, `files.rs` the files and rotation,
//! `account.rs` what is journaled for the ledger, `track.rs` the waiting
//! transactions, `trace.rs` the search behind `mm4relay trace`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, Sender};
use log::{error, info, warn};
use parking_lot::Mutex;

use crate::message::Location;
use crate::mm4::Pdu;
use crate::mm4::summary;
use crate::peer::DelayHistogram;
use crate::spool::{Appender, Entry, Journal, NewMessage, Outcome, OutcomeKind, Reader};
use crate::sys::clock::SharedClock;
use crate::sys::owned::Owned;

pub mod account;
mod files;
pub mod row;
pub mod trace;
mod track;

use account::{Event, Facts};
use files::Files;

use row::Row;
use track::{Answer, Early, Tracker, Waiting};

/// The checkpoint file, in the spool directory.
pub const STATE_FILE: &str = "cdr-state";
/// How often the ledger flushes its file and saves its checkpoint (when
/// anything changed), and looks at rotation and missing RESs.
const TICK: Duration = Duration::from_secs(1);
/// Most entry batches queued from the spool's writer: past it the writer
/// waits (a stalled CDR disk slows the relay rather than lose rows).
const QUEUE: usize = 16_384;
/// Checkpoint octets saved per tick: a larger checkpoint is saved less
/// often.
const STATE_BYTES_PER_TICK: usize = 2 << 20;
/// Rows kept in memory while they cannot be written (the CDR directory
/// gone or full). Past it they are dropped, and no row is written nor the
/// checkpoint saved again until a restart, which derives them all again
/// from the spool (it keeps every record past the checkpoint).
const MAX_PENDING: usize = 64 << 20;
/// The longest between two checkpoints while records come.
const MAX_CHECKPOINT_EVERY: Duration = Duration::from_secs(30);
/// How long the ledger lets batches gather once one has come.
const GATHER: Duration = Duration::from_millis(20);

/// The `[cdr]` settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CdrConfig {
    /// Where the files go.
    pub dir: PathBuf,
    /// A new file every this long (aligned on the epoch: `1h` on the hour).
    pub rotate: Duration,
    /// How long a forward.REQ that asked for a RES waits for it.
    pub ack_timeout: Duration,
    /// Most transactions waiting for a RES.
    pub max_pending: usize,
    /// Fill the `subject` and `parts` columns (mail-parser reads every
    /// message once, on the ledger's thread).
    pub summary: bool,
}

/// The `event` values.
pub const EVENTS: [&str; 8] = [
    "sent",
    "failed",
    "deleted",
    "deferred",
    "duplicate",
    "res",
    "res_missing",
    "report",
];

/// The `X-Mms-Request-Status-Code` values counted by name; any other is
/// counted as `other` (a partner cannot grow the figures without bound).
pub const RES_STATUSES: [&str; 9] = [
    "Ok",
    "Error-unspecified",
    "Error-service-denied",
    "Error-message-format-corrupt",
    "Error-sending-address-unresolved",
    "Error-message-not-found",
    "Error-network-problem",
    "Error-content-not-accepted",
    "Error-unsupported-message",
];

/// `status` as the figures count it: one of [`RES_STATUSES`] or `other`.
fn status_class(status: &str) -> &'static str {
    RES_STATUSES
        .iter()
        .find(|s| s.eq_ignore_ascii_case(status))
        .copied()
        .unwrap_or("other")
}

/// RES accounting of one peer.
#[derive(Debug, Default)]
pub struct PeerAcks {
    /// forward.REQs taken by the peer that asked for a RES (per recipient).
    pub asked: u64,
    /// RESs by X-Mms-Request-Status-Code (per recipient; see
    /// [`RES_STATUSES`]).
    pub answered: BTreeMap<&'static str, u64>,
    /// Given up: no RES within `ack_timeout`, or pushed out by the cap.
    pub missing: u64,
    /// Of those, pushed out by `max_pending`.
    pub evicted: u64,
    /// From the peer's 250 to the RES.
    pub latency: DelayHistogram,
}

impl PeerAcks {
    /// RESs with status `Ok`.
    pub fn ok(&self) -> u64 {
        self.answered
            .iter()
            .filter(|(s, _)| **s == "Ok")
            .map(|(_, n)| n)
            .sum()
    }
}

/// What the ledger did, for `status` and the metrics.
#[derive(Debug, Default)]
pub struct LedgerStats {
    /// Per peer name.
    pub peers: Mutex<BTreeMap<String, PeerAcks>>,
    /// Rows written, per [`EVENTS`] entry.
    pub rows: [AtomicU64; EVENTS.len()],
    /// Transactions waiting for a RES now.
    pub waiting: AtomicU64,
    /// Files closed since start.
    pub files_closed: AtomicU64,
    /// Failed writes or flushes of the CDR files or the checkpoint.
    pub write_errors: AtomicU64,
    /// The last record accounted for and made durable.
    pub checkpoint: AtomicU64,
}

/// The ledger before the spool has opened: its checkpoint read, the files
/// a crash left open closed.
pub struct Opened {
    books: Books,
    tx: Sender<Vec<Entry>>,
    rx: Receiver<Vec<Entry>>,
}

impl Opened {
    /// What the spool feeds.
    pub fn journal(&self) -> Journal {
        Journal {
            tx: self.tx.clone(),
            checkpoint: self.books.checkpoint.clone(),
            from: self.books.processed,
            floor: self.books.processed.max(self.books.written.0),
        }
    }
}

/// Reads the checkpoint in `spool_dir` and closes leftover files.
pub fn open(cfg: &CdrConfig, spool_dir: &Path, clock: SharedClock) -> io::Result<Opened> {
    let (files, leftovers, leftover) = Files::open(&cfg.dir, cfg.rotate)?;
    let state_path = spool_dir.join(STATE_FILE);
    let saved = read_state(&state_path)?;
    let mut tracker = Tracker::new(cfg.max_pending);
    for (tid, peer, w) in saved.waiting {
        tracker.restore(&tid, &peer, w);
    }
    for (tid, e) in saved.early {
        tracker.restore_early(&tid, e);
    }
    let written = saved.last_row.max(leftover.unwrap_or((0, 0)));
    if written > saved.last_row {
        // Recorded before the leftovers are closed: once closed they may
        // be collected, and their rows must still never come twice.
        write_state(&state_path, saved.processed, written, &tracker)?;
    }
    files::close_leftovers(&leftovers)?;
    info!(
        "cdr: writing to {}; accounted up to record {}, last row {}.{}, {} waiting for a RES, {} RES before their REQ",
        cfg.dir.display(),
        saved.processed,
        written.0,
        written.1,
        tracker.len(),
        tracker.early_len()
    );
    let stats = Arc::new(LedgerStats::default());
    stats.checkpoint.store(saved.processed, Ordering::Release);
    stats.waiting.store(tracker.len() as u64, Ordering::Relaxed);
    let (tx, rx) = crossbeam_channel::bounded(QUEUE);
    let books = Books {
        cfg: cfg.clone(),
        clock,
        files,
        tracker,
        metas: HashMap::new(),
        asked: HashSet::new(),
        processed: saved.processed,
        written,
        dirty: false,
        checkpoint: Arc::new(AtomicU64::new(saved.processed)),
        state_path,
        stats,
        appender: None,
        reader: None,
        failing: false,
        state_bytes: 0,
        dropped: false,
    };
    Ok(Opened { books, tx, rx })
}

/// The running ledger.
pub struct Ledger {
    stop: Option<Sender<()>>,
    handle: Option<Owned<()>>,
    stats: Arc<LedgerStats>,
}

impl Ledger {
    /// Starts the ledger on what the spool recovered (`entries`, from
    /// [`crate::spool::Spool::open_with`]); `appender` journals its
    /// events, `reader` reads messages back for their summaries.
    pub fn start(
        opened: Opened,
        entries: Vec<Entry>,
        appender: Appender,
        reader: Reader,
    ) -> io::Result<Ledger> {
        let Opened { mut books, tx, rx } = opened;
        drop(tx);
        books.appender = Some(appender);
        books.reader = Some(reader);
        let stats = books.stats.clone();
        let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
        let handle = Owned::spawn("cdr-ledger", move || {
            let n = entries.len();
            books.take_all(entries);
            if n > 0 {
                info!("cdr: {n} records of the journal accounted again");
            }
            books.run(&rx, &stop_rx);
        })?;
        Ok(Ledger {
            stop: Some(stop_tx),
            handle: Some(handle),
            stats,
        })
    }

    /// Its figures.
    pub fn stats(&self) -> Arc<LedgerStats> {
        self.stats.clone()
    }

    /// Accounts for what the spool has handed over, flushes, saves the
    /// checkpoint and closes the file. Call after the spool has closed.
    pub fn close(mut self) {
        self.shut();
    }

    fn shut(&mut self) {
        self.stop.take();
        if let Some(h) = self.handle.take() {
            h.join();
        }
    }
}

impl Drop for Ledger {
    fn drop(&mut self) {
        self.shut();
    }
}

/// What the ledger knows of a message the spool holds.
struct Meta {
    from: String,
    message_id: String,
    transaction_id: String,
    accepted: SystemTime,
    size: u64,
    facts: Facts,
    location: Location,
    /// Subject and parts, once read.
    summary: Option<(String, String)>,
}

/// The ledger's state, owned by its thread.
struct Books {
    cfg: CdrConfig,
    clock: SharedClock,
    files: Files,
    tracker: Tracker,
    metas: HashMap<String, Meta>,
    /// Waits given up and journaled, not yet back as events: transaction
    /// ID, peer, queue ID.
    asked: HashSet<(String, String, String)>,
    /// The last record accounted for.
    processed: u64,
    /// The last row in the files: rows up to it are not written again.
    written: (u64, u32),
    dirty: bool,
    checkpoint: Arc<AtomicU64>,
    state_path: PathBuf,
    stats: Arc<LedgerStats>,
    appender: Option<Appender>,
    reader: Option<Reader>,
    /// The last write failed (logged once until one succeeds).
    failing: bool,
    /// Size of the last checkpoint saved.
    state_bytes: usize,
    /// Rows were dropped ([`MAX_PENDING`]): none is written, and the
    /// checkpoint stays, until a restart.
    dropped: bool,
}

/// The rows of one record, numbered as they come.
struct Rows {
    seq: u64,
    k: u32,
}

fn ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `type:size` of each part, space-separated.
fn parts_of(s: &summary::Summary) -> String {
    let mut out: Vec<String> = s
        .parts
        .iter()
        .map(|p| format!("{}:{}", p.content_type, p.size))
        .collect();
    if s.more > 0 {
        out.push(format!("+{}", s.more));
    }
    out.join(" ")
}

/// TS 32.298's record type for a row about `pdu` that came from `origin`.
fn record_type(event: &str, pdu: &str, origin: &str) -> &'static str {
    let out = origin == "local";
    match (event, pdu, out) {
        ("res" | "res_missing", _, _) => "MMO4FRs",
        ("report", _, _) => "MMO4D",
        (_, "MM4_forward.REQ", true) => "MMO4FRq",
        (_, "MM4_forward.REQ", false) => "MMR4F",
        (_, "MM4_forward.RES", _) => "MMR4F",
        (_, "MM4_delivery_report.REQ", true) => "MMR4DRq",
        (_, "MM4_delivery_report.REQ", false) => "MMO4D",
        (_, "MM4_delivery_report.RES", _) => "MMR4DRs",
        (_, "MM4_read_reply_report.REQ", true) => "MMR4RRq",
        (_, "MM4_read_reply_report.REQ", false) => "MMO4R",
        (_, "MM4_read_reply_report.RES", _) => "MMR4RRs",
        _ => "",
    }
}

/// What one row says beyond its message.
struct Line<'a> {
    event: &'static str,
    at: SystemTime,
    queue_id: &'a str,
    to: &'a str,
    peer: &'a str,
    status: String,
    reply: &'a str,
    attempts: String,
    latency: String,
}

impl Books {
    fn take_all(&mut self, batch: Vec<Entry>) {
        for e in batch {
            self.take(e);
        }
        if !self.dropped && self.files.pending_len() > MAX_PENDING {
            self.files.drop_pending();
            self.dropped = true;
            self.stats.write_errors.fetch_add(1, Ordering::Relaxed);
            error!(
                "cdr: {} MiB of rows could not be written to {}: CDRs stop until a restart, \
                 which writes every row from record {} on (the spool keeps them until then)",
                MAX_PENDING >> 20,
                self.cfg.dir.display(),
                self.checkpoint.load(Ordering::Acquire) + 1
            );
        }
    }

    fn take(&mut self, e: Entry) {
        match e {
            Entry::Accepted {
                seq,
                message,
                location,
            } => self.accepted(seq, message, location),
            Entry::Outcome {
                seq,
                id,
                peer,
                rcpts,
                outcome,
            } if seq > self.processed => {
                self.advance(seq);
                self.outcome(seq, &id, &peer, &rcpts, &outcome);
            }
            Entry::Event { seq, payload } if seq > self.processed => {
                self.advance(seq);
                match Event::decode(&payload) {
                    Some(ev) => self.event(seq, ev),
                    None => warn!("cdr: record {seq}: an event this version does not know"),
                }
            }
            Entry::Outcome { .. } | Entry::Event { .. } => {}
            Entry::Finished { id } => {
                self.metas.remove(&id);
            }
        }
    }

    fn advance(&mut self, seq: u64) {
        self.processed = seq;
        self.dirty = true;
    }

    fn accepted(&mut self, seq: u64, m: Box<NewMessage>, location: Location) {
        let facts = Facts::decode(&m.account);
        let summary = if !self.cfg.summary {
            Some((String::new(), String::new()))
        } else {
            (!m.data.is_empty()).then(|| summarize(&m.data))
        };
        let meta = Meta {
            from: m.from,
            message_id: row::clean(&m.message_id.unwrap_or_default()),
            // Cut as the checkpoint writes it, so a wait keeps its key
            // across a restart.
            transaction_id: row::clean(&m.transaction_id.unwrap_or_default()),
            accepted: m.accepted,
            size: m.data.len() as u64,
            facts,
            location,
            summary,
        };
        let new = seq > self.processed;
        if new {
            self.advance(seq);
            if meta.facts.is(Pdu::ForwardRes) && !meta.transaction_id.is_empty() {
                // From partner P: about a REQ that went to P. From the
                // local MMSC to P: about one that came from P. From anyone
                // else: about nothing.
                let answers = match meta.facts.origin.strip_prefix("partner ") {
                    Some(p) => Some(Answer::SentTo(p.to_string())),
                    None if meta.facts.origin == "local" => m
                        .jobs
                        .first()
                        .map(|(peer, _)| Answer::CameFrom(peer.clone())),
                    None => None,
                };
                if let Some(answers) = answers {
                    self.res(seq, &meta, answers);
                }
            }
        }
        // A message's data length is its location's (replayed records
        // carry no data).
        let meta = Meta {
            size: u64::from(location.len).max(meta.size),
            ..meta
        };
        self.metas.insert(m.id, meta);
    }

    /// A RES accepted: the rows of the REQ it answers, or kept a while if
    /// its REQ is not recorded sent yet.
    fn res(&mut self, seq: u64, res: &Meta, answers: Answer) {
        let tid = res.transaction_id.clone();
        let Some((peer, w)) = self.tracker.answer(&tid, &answers) else {
            self.tracker.early(
                &tid,
                Early {
                    status: res.facts.status.clone(),
                    text: res.facts.status_text.clone(),
                    at_ms: ms(res.accepted),
                    answers,
                },
            );
            return;
        };
        self.asked
            .remove(&(tid.clone(), peer.clone(), w.queue_id.clone()));
        let status = res.facts.status.clone();
        self.answered(
            seq,
            &tid,
            &peer,
            &w,
            &status,
            &res.facts.status_text,
            res.accepted,
        );
    }

    #[allow(clippy::too_many_arguments)]
    fn answered(
        &mut self,
        seq: u64,
        tid: &str,
        peer: &str,
        w: &Waiting,
        status: &str,
        text: &str,
        at: SystemTime,
    ) {
        let mut rows = Rows { seq, k: 0 };
        self.answered_now(&mut rows, tid, peer, w, status, text, at);
        self.update_waiting();
    }

    fn outcome(&mut self, seq: u64, id: &str, peer: &str, rcpts: &[String], o: &Outcome) {
        let event = match o.kind {
            OutcomeKind::Sent => "sent",
            OutcomeKind::Failed => "failed",
            OutcomeKind::Deleted => "deleted",
            OutcomeKind::Deferred => "deferred",
        };
        let mut rows = Rows { seq, k: 0 };
        for to in rcpts {
            let line = Line {
                event,
                at: o.at,
                queue_id: id,
                to,
                peer,
                status: if o.code == 0 {
                    String::new()
                } else {
                    o.code.to_string()
                },
                reply: &o.reply,
                attempts: o.attempts.to_string(),
                latency: String::new(),
            };
            self.emit(&mut rows, line);
        }
        if o.kind != OutcomeKind::Sent {
            return;
        }
        let Some(meta) = self.metas.get(id) else {
            return;
        };
        if !(meta.facts.is(Pdu::ForwardReq) && meta.facts.ack) || meta.transaction_id.is_empty() {
            return;
        }
        let tid = meta.transaction_id.clone();
        let w = Waiting {
            queue_id: id.to_string(),
            message_id: meta.message_id.clone(),
            from: meta.from.clone(),
            origin: meta.facts.origin.clone(),
            rcpts: rcpts.to_vec(),
            size: meta.size,
            sent_ms: ms(o.at),
            deadline_ms: ms(o.at).saturating_add(self.cfg.ack_timeout.as_millis() as u64),
            seq,
        };
        self.count(peer, |a| a.asked += rcpts.len() as u64);
        if let Some(e) = self.tracker.take_early(&tid, peer, &w) {
            let at = UNIX_EPOCH + Duration::from_millis(e.at_ms.max(w.sent_ms));
            self.answered_now(&mut rows, &tid, peer, &w, &e.status, &e.text, at);
            return;
        }
        for (t, p, gone) in self.tracker.wait(&tid, peer, w) {
            self.asked
                .remove(&(t.clone(), p.clone(), gone.queue_id.clone()));
            self.count(&p, |a| a.evicted += gone.rcpts.len() as u64);
            let reply = format!(
                "no longer waited for: [cdr] max_pending ({}) or {} for one transaction ID reached",
                self.cfg.max_pending,
                track::PER_TRANSACTION
            );
            self.emit_missing(&mut rows, &t, &p, &gone, o.at, &reply);
        }
        self.update_waiting();
    }

    /// The `res_missing` rows of a wait ended without its RES.
    fn emit_missing(
        &mut self,
        rows: &mut Rows,
        tid: &str,
        peer: &str,
        w: &Waiting,
        at: SystemTime,
        reply: &str,
    ) {
        self.count(peer, |a| a.missing += w.rcpts.len() as u64);
        for to in &w.rcpts {
            let line = Line {
                event: "res_missing",
                at,
                queue_id: &w.queue_id,
                to,
                peer,
                status: String::new(),
                reply,
                attempts: String::new(),
                latency: String::new(),
            };
            self.emit_waiting(rows, tid, w, line);
        }
    }

    /// As [`Books::answered`], continuing the rows of the record at hand.
    #[allow(clippy::too_many_arguments)]
    fn answered_now(
        &mut self,
        rows: &mut Rows,
        tid: &str,
        peer: &str,
        w: &Waiting,
        status: &str,
        text: &str,
        at: SystemTime,
    ) {
        let latency = Duration::from_millis(ms(at).saturating_sub(w.sent_ms));
        self.count(peer, |a| {
            *a.answered.entry(status_class(status)).or_default() += w.rcpts.len() as u64;
            a.latency.observe(latency, w.rcpts.len() as u64);
        });
        for to in &w.rcpts {
            let line = Line {
                event: "res",
                at,
                queue_id: &w.queue_id,
                to,
                peer,
                status: status.to_string(),
                reply: text,
                attempts: String::new(),
                latency: format!("{:.3}", latency.as_secs_f64()),
            };
            self.emit_waiting(rows, tid, w, line);
        }
    }

    fn event(&mut self, seq: u64, ev: Event) {
        let mut rows = Rows { seq, k: 0 };
        match ev {
            Event::Duplicate {
                at,
                from,
                to,
                peer,
                transaction_id,
                message_id,
                size,
                facts,
            } => {
                let mut row = Row::default();
                let f = &mut row.0;
                f[0] = "duplicate".into();
                f[1] = row::time(at);
                f[3] = facts.pdu.clone();
                f[4] = transaction_id;
                f[5] = message_id;
                f[6] = from;
                f[7] = to;
                f[8] = peer;
                f[9] = size.to_string();
                f[10] = "250".into();
                f[11] = "2.0.0 duplicate of a message already queued".into();
                f[14] = record_type("duplicate", &facts.pdu, &facts.origin).into();
                f[16] = facts.origin;
                f[17] = facts.client;
                self.write(&mut rows, row, "duplicate");
            }
            Event::ResMissing {
                at,
                transaction_id,
                peer,
                queue_id,
            } => {
                let key = (transaction_id, peer, queue_id);
                self.asked.remove(&key);
                let w = if key.2.is_empty() {
                    // Journaled by a version that did not name the REQ.
                    self.tracker.answer_at(&key.0, &key.1)
                } else {
                    self.tracker.give_up(&key.0, &key.1, &key.2)
                };
                let Some(w) = w else {
                    return;
                };
                let reply = format!(
                    "no MM4_forward.RES within {}s",
                    self.cfg.ack_timeout.as_secs()
                );
                self.emit_missing(&mut rows, &key.0, &key.1, &w, at, &reply);
                self.update_waiting();
            }
        }
    }

    /// Changes `peer`'s RES figures.
    fn count(&self, peer: &str, change: impl FnOnce(&mut PeerAcks)) {
        change(self.stats.peers.lock().entry(peer.to_string()).or_default());
    }

    fn update_waiting(&self) {
        self.stats
            .waiting
            .store(self.tracker.len() as u64, Ordering::Relaxed);
    }

    /// A row about a queued message (its facts from what the ledger knows).
    fn emit(&mut self, rows: &mut Rows, l: Line<'_>) {
        let mut row = Row::default();
        self.fill_message(&mut row, l.queue_id);
        self.fill_line(&mut row, &l);
        self.write(rows, row, l.event);
    }

    /// A row about a forward.REQ waiting for its RES.
    fn emit_waiting(&mut self, rows: &mut Rows, tid: &str, w: &Waiting, l: Line<'_>) {
        let mut row = Row::default();
        if self.metas.contains_key(l.queue_id) {
            self.fill_message(&mut row, l.queue_id);
        } else {
            let f = &mut row.0;
            f[3] = Pdu::ForwardReq.name().into();
            f[5] = w.message_id.clone();
            f[6] = w.from.clone();
            f[9] = w.size.to_string();
        }
        row.0[4] = tid.to_string();
        self.fill_line(&mut row, &l);
        row.0[3] = Pdu::ForwardRes.name().into();
        row.0[14] = record_type(l.event, "", "").into();
        self.write(rows, row, l.event);
    }

    fn fill_message(&mut self, row: &mut Row, id: &str) {
        let reader = self.reader.as_ref();
        let Some(m) = self.metas.get_mut(id) else {
            return;
        };
        if m.summary.is_none() {
            // Recovered records (and large ones) carry no data: read it
            // back once; a read that fails is tried again for the next row.
            m.summary = reader
                .and_then(|r| r.read(id, &m.location).ok())
                .map(|d| summarize(&d));
        }
        let f = &mut row.0;
        f[3] = m.facts.pdu.clone();
        f[4] = m.transaction_id.clone();
        f[5] = m.message_id.clone();
        f[6] = m.from.clone();
        f[9] = m.size.to_string();
        f[15] = row::time(m.accepted);
        f[16] = m.facts.origin.clone();
        f[17] = m.facts.client.clone();
        if let Some((subject, parts)) = &m.summary {
            f[19] = subject.clone();
            f[20] = parts.clone();
        }
    }

    fn fill_line(&self, row: &mut Row, l: &Line<'_>) {
        let f = &mut row.0;
        f[0] = l.event.into();
        f[1] = row::time(l.at);
        f[2] = l.queue_id.into();
        f[7] = l.to.into();
        f[8] = l.peer.into();
        f[10] = l.status.clone();
        f[11] = l.reply.into();
        f[12] = l.attempts.clone();
        f[14] = record_type(l.event, &f[3], &f[16]).into();
        f[18] = l.latency.clone();
    }

    /// Numbers the row and queues it, unless the files have it already.
    fn write(&mut self, rows: &mut Rows, mut row: Row, event: &str) {
        let id = (rows.seq, rows.k);
        rows.k += 1;
        if id <= self.written || self.dropped {
            return;
        }
        row.0[13] = row::format_id(id.0, id.1);
        // Queued even when no file can be made: the checkpoint stays
        // behind it until it is written and flushed.
        self.files.push(&row, self.clock.now(), id.0);
        self.written = id;
        if let Some(i) = EVENTS.iter().position(|e| *e == event) {
            self.stats.rows[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    fn failed(&mut self, what: &str, e: &io::Error) {
        self.stats.write_errors.fetch_add(1, Ordering::Relaxed);
        if !self.failing {
            error!(
                "cdr: cannot {what} in {}: {e}; the checkpoint waits (the spool keeps what is not accounted for)",
                self.cfg.dir.display()
            );
            self.failing = true;
        }
    }

    fn run(&mut self, rx: &Receiver<Vec<Entry>>, stop: &Receiver<()>) {
        let tick = crossbeam_channel::tick(TICK);
        let mut last_checkpoint = Instant::now();
        loop {
            let (open, busy) = crossbeam_channel::select! {
                recv(rx) -> b => match b {
                    Ok(b) => {
                        self.take_all(b);
                        (true, true)
                    }
                    Err(_) => (false, false),
                },
                recv(stop) -> _ => (false, false),
                recv(tick) -> _ => (true, false),
            };
            if busy {
                // Not synchronisation: a busy spool's batches pile up a
                // moment, so they cost one wake-up and one write together.
                std::thread::sleep(GATHER);
            }
            let gone = loop {
                match rx.try_recv() {
                    Ok(b) => self.take_all(b),
                    Err(crossbeam_channel::TryRecvError::Empty) => break false,
                    Err(crossbeam_channel::TryRecvError::Disconnected) => break true,
                }
            };
            if !open || gone {
                break;
            }
            if let Err(e) = self.files.write() {
                self.failed("write a CDR file", &e);
            }
            let now = self.clock.now();
            if self.files.due(now) {
                // Closed only once the checkpoint covers its rows: a
                // closed file may be collected, and its rows must never
                // be written again.
                if self.save(true) {
                    self.close_file();
                }
                last_checkpoint = Instant::now();
            }
            if self.dirty && last_checkpoint.elapsed() >= self.checkpoint_every() {
                self.save(false);
                last_checkpoint = Instant::now();
            }
            self.give_up(now);
        }
        if self.save(true) {
            self.close_file();
        }
        // Otherwise the file stays open: the next start reads its last
        // row, then closes it.
    }

    fn close_file(&mut self) {
        if let Err(e) = self.files.close() {
            self.failed("close a CDR file", &e);
        }
        self.stats
            .files_closed
            .store(self.files.closed, Ordering::Relaxed);
    }

    /// How often the checkpoint is saved: every tick, but less often as
    /// it grows (each save writes every wait), and at least every
    /// [`MAX_CHECKPOINT_EVERY`].
    fn checkpoint_every(&self) -> Duration {
        let n = (self.state_bytes / STATE_BYTES_PER_TICK).max(1) as u32;
        (TICK * n).min(MAX_CHECKPOINT_EVERY)
    }

    /// Journals the waits that are due (once each): their rows come when
    /// the events come back.
    fn give_up(&mut self, now: SystemTime) {
        let Some(appender) = &self.appender else {
            return;
        };
        for key in self.tracker.due(ms(now)) {
            if self.asked.insert(key.clone()) {
                let (transaction_id, peer, queue_id) = key;
                appender.event(
                    Event::ResMissing {
                        at: now,
                        transaction_id,
                        peer,
                        queue_id,
                    }
                    .encode(),
                );
            }
        }
    }

    /// Flushes the file, then saves the checkpoint; only then may the
    /// spool let go of what it accounts for. True when the checkpoint
    /// covers every row (nothing was left to save, or this saved it).
    fn save(&mut self, force: bool) -> bool {
        if self.dropped {
            return false;
        }
        if !self.dirty && !force {
            return true;
        }
        if let Err(e) = self.files.sync() {
            self.failed("flush a CDR file", &e);
            return false;
        }
        if !self.dirty {
            return true;
        }
        match write_state(
            &self.state_path,
            self.processed,
            self.written,
            &self.tracker,
        ) {
            Ok(n) => self.state_bytes = n,
            Err(e) => {
                self.failed("save the CDR checkpoint", &e);
                return false;
            }
        }
        self.failing = false;
        self.dirty = false;
        self.checkpoint.store(self.processed, Ordering::Release);
        self.stats
            .checkpoint
            .store(self.processed, Ordering::Release);
        if let Some(a) = &self.appender {
            a.nudge();
        }
        true
    }
}

/// The `subject` and `parts` columns of a message. A panic in the parser
/// (a message no test foresaw) leaves them empty rather than stop the
/// ledger.
fn summarize(data: &[u8]) -> (String, String) {
    let parsed = std::panic::catch_unwind(|| summary::summarize(data));
    match parsed {
        Ok(Some(s)) => (row::clean(s.subject.as_deref().unwrap_or("")), parts_of(&s)),
        Ok(None) => (String::new(), String::new()),
        Err(_) => {
            warn!("cdr: the MIME parser failed on a message; its subject and parts are left empty");
            (String::new(), String::new())
        }
    }
}

/// The checkpoint: the last record accounted for, the last row written,
/// the transactions waiting for a RES and the RESs that came before their
/// REQ's delivery was recorded.
struct State {
    processed: u64,
    last_row: (u64, u32),
    waiting: Vec<(String, String, Waiting)>,
    early: Vec<(String, Early)>,
}

/// The checkpoint's first line, before its version.
const STATE_HEAD: &str = "mm4relay-cdr-state";
/// The version written: lines typed `w` (a wait) and `e` (an early RES).
/// Version 1 held waits only, untyped and without their origin.
const STATE_VERSION: u32 = 2;

/// Writes the checkpoint; returns its size.
fn write_state(
    path: &Path,
    processed: u64,
    last_row: (u64, u32),
    tracker: &Tracker,
) -> io::Result<usize> {
    let mut out = format!(
        "{STATE_HEAD} {STATE_VERSION} {processed} {} {}\n",
        last_row.0, last_row.1
    )
    .into_bytes();
    for (tid, peer, w) in tracker.entries() {
        let nums = [
            w.size.to_string(),
            w.sent_ms.to_string(),
            w.deadline_ms.to_string(),
            w.seq.to_string(),
        ];
        let fields = [
            "w",
            tid,
            peer,
            &w.queue_id,
            &w.message_id,
            &w.from,
            &w.origin,
        ]
        .into_iter()
        .chain(nums.iter().map(String::as_str))
        .chain(w.rcpts.iter().map(String::as_str));
        row::line(fields, &mut out);
    }
    for (tid, e) in tracker.early_entries() {
        let at = e.at_ms.to_string();
        let answers = e.answers.encode();
        row::line(
            ["e", tid, &e.status, &e.text, &at, &answers].into_iter(),
            &mut out,
        );
    }
    let tmp = path.with_extension("tmp");
    let mut f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)?;
    f.write_all(&out)?;
    f.sync_data()?;
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(out.len())
}

fn read_state(path: &Path) -> io::Result<State> {
    let mut s = State {
        processed: 0,
        last_row: (0, 0),
        waiting: Vec::new(),
        early: Vec::new(),
    };
    let data = match fs::read(path) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(s),
        Err(e) => return Err(e),
    };
    let mut lines = data.split(|&b| b == b'\n');
    let head = String::from_utf8_lossy(lines.next().unwrap_or_default()).into_owned();
    let nums: Vec<u64> = head
        .strip_prefix(STATE_HEAD)
        .unwrap_or("")
        .split_whitespace()
        .map(|n| n.parse().ok())
        .collect::<Option<_>>()
        .unwrap_or_default();
    let (version, processed, seq, k) = match nums[..] {
        [1, processed, seq, k] | [2, processed, seq, k] if k <= u64::from(u32::MAX) => {
            (nums[0], processed, seq, k as u32)
        }
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}: not a CDR checkpoint this version reads (a later version's?)",
                    path.display()
                ),
            ));
        }
    };
    s.processed = processed;
    s.last_row = (seq, k);
    for line in lines.filter(|l| !l.is_empty()) {
        let read = row::split(line).and_then(|f| match version {
            1 => wait_line(&f, false).map(|w| s.waiting.push(w)),
            _ => match f[0].as_str() {
                "w" => wait_line(&f[1..], true).map(|w| s.waiting.push(w)),
                "e" => early_line(&f[1..]).map(|e| s.early.push(e)),
                _ => None,
            },
        });
        if read.is_none() {
            warn!("{}: a line that does not read, skipped", path.display());
        }
    }
    Ok(s)
}

/// A wait: transaction ID, peer, queue ID, message ID, sender, origin
/// (unless `with_origin` is false: version 1), size, sent, deadline, the
/// sequence number, then the recipients.
fn wait_line(f: &[String], with_origin: bool) -> Option<(String, String, Waiting)> {
    let o = usize::from(with_origin);
    if f.len() <= 9 + o {
        return None;
    }
    let n = |i: usize| f[i + o].parse::<u64>().ok();
    let w = Waiting {
        queue_id: f[2].clone(),
        message_id: f[3].clone(),
        from: f[4].clone(),
        origin: if with_origin {
            f[5].clone()
        } else {
            String::new()
        },
        size: n(5)?,
        sent_ms: n(6)?,
        deadline_ms: n(7)?,
        seq: n(8)?,
        rcpts: f[9 + o..].to_vec(),
    };
    Some((f[0].clone(), f[1].clone(), w))
}

/// An early RES: transaction ID, status, text, when, and which REQs it
/// can answer.
fn early_line(f: &[String]) -> Option<(String, Early)> {
    let [tid, status, text, at, answers] = f else {
        return None;
    };
    let e = Early {
        status: status.clone(),
        text: text.clone(),
        at_ms: at.parse().ok()?,
        answers: Answer::decode(answers)?,
    };
    Some((tid.clone(), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checkpoint_keeps_waits_and_early_res_and_reads_version_1() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join(STATE_FILE);
        let mut t = Tracker::new(10);
        let w = Waiting {
            queue_id: "Q1".into(),
            message_id: "M,1".into(),
            from: "+1/TYPE=PLMN@a".into(),
            origin: "partner b".into(),
            rcpts: vec!["r1".into(), "r\"2".into()],
            size: 7,
            sent_ms: 1000,
            deadline_ms: 5000,
            seq: 3,
        };
        t.restore("T1", "B", w.clone());
        let early = |answers: Answer| Early {
            status: "Ok".into(),
            text: "fine, thanks".into(),
            at_ms: 900,
            answers,
        };
        let (to_b, from_c) = (Answer::SentTo("B".into()), Answer::CameFrom("C, d".into()));
        t.restore_early("T2", early(to_b.clone()));
        t.restore_early("T3", early(from_c.clone()));
        write_state(&path, 42, (41, 2), &t).unwrap();
        let s = read_state(&path).unwrap();
        assert_eq!((s.processed, s.last_row), (42, (41, 2)));
        assert_eq!(s.waiting, [("T1".into(), "B".into(), w.clone())]);
        assert_eq!(
            s.early,
            [("T2".into(), early(to_b)), ("T3".into(), early(from_c))]
        );
        fs::write(
            &path,
            "mm4relay-cdr-state 1 9 8 0\nT1,B,Q1,\"M,1\",+1/TYPE=PLMN@a,7,1000,5000,3,r1,\"r\"\"2\"\n",
        )
        .unwrap();
        let s = read_state(&path).unwrap();
        assert_eq!((s.processed, s.last_row), (9, (8, 0)));
        let old = Waiting {
            origin: String::new(),
            ..w
        };
        assert_eq!(s.waiting, [("T1".into(), "B".into(), old)]);
        fs::write(&path, "mm4relay-cdr-state 3 9 8 0\n").unwrap();
        assert!(read_state(&path).is_err(), "a later version's");
        fs::write(&path, "mm4relay-cdr-state 2 9x 8 0\n").unwrap();
        assert!(read_state(&path).is_err(), "a number that does not read");
    }
}
