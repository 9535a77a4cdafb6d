//! The durable spool: nothing that got a 250 is ever lost.
//!
//! # Files
//! The spool is a series of numbered segments, `NNNNNNNNNNNNNNNN.log`,
//! each a journal of records `length:u32 crc32:u32 payload` (little-endian,
//! the CRC over the payload):
//! - `M` a message: where its data is (segment, offset, length, CRC of the
//!   data alone), queue ID, envelope, IDs, times, its jobs (peer,
//!   recipients), then the data itself;
//! - `D` recipients of a message done at a peer (sent, failed or expired);
//! - `R` recipients deferred: attempts so far and the next attempt time;
//! - `E` an event about no queued message (a duplicate, a missing
//!   MM4_forward.RES), for the CDR.
//!
//! `D` and `R` records carry the outcome (code, reply, attempts, time).
//! Every new `M`, `D`, `R` and `E` record has a sequence number, rising
//! (with a [`Journal`], also across restarts): the CDR ledger derives its
//! rows from the records in that order.
//!
//! # Group commit
//! One writer thread owns the files. Sessions hand it messages and wait;
//! it takes everything that has piled up, appends it in one write, issues
//! one `fdatasync`, and only then wakes every waiting session, which
//! answers 250. One flush covers the whole batch. `D` and `R` records need
//! no wait: losing one in a crash only means a retry (at least once), so
//! they ride along with the next flush.
//!
//! # Recovery
//! At start every segment is read, replaying `M`, `D` and `R` in order
//! (message data is checked by the record CRC but not copied); a record
//! that is short or fails its CRC ends the journal there (a torn tail from
//! a crash) and the file is truncated to the last good record. Messages
//! with recipients left are queued again with their attempts and
//! next-attempt time. New records always go to a new segment.
//!
//! # Clean-up
//! A segment is deleted once every message in it is done and no record in
//! it speaks of a message in a segment that still exists (else a crash
//! could bring that message back). The active segment rolls over at the
//! segment size (and after a failed write); when nothing is live any more
//! it is emptied in place, so an idle spool is near zero bytes, even on a
//! disk that is full.
//!
//! # Compaction
//! A peer that is down keeps a few messages in every segment, which would
//! pin them all. When the sealed segments hold more dead octets than live
//! ones, the writer copies their live messages forward, between batches:
//! a new `M` record with only the recipients left, then an `R` record per
//! deferral, flushed before anything relies on it. Recovery lets a later
//! `M` record of an ID supersede the earlier one, so a crash between copy
//! and delete brings each message back once; the copy's segment refers to
//! the old one, so it never goes first. Readers find moved data by ID.
//!
//! # The journal feed
//! With a [`Journal`], every record is handed to it once it is durable
//! (done and retry records then get a flush of their own when no commit
//! takes them along), and no segment is deleted, nor the spool emptied,
//! before the journal has checkpointed past its records: what the ledger
//! has not made durable can always be derived again at the next start.
//!
//! # Side files
//! `recent` holds the duplicate-suppression keys a clean stop saved;
//! `holds` what an operator holds. Both are replaced whole (written aside,
//! flushed, renamed).
//!
//! # Files of this part
//! `record.rs` the record codec, `replay.rs` recovery, `state.rs` the
//! segments and live messages, `writer.rs` the writer thread, `side.rs`
//! the side files. The spool knows messages and their jobs by peer name;
//! it knows nothing of SMTP sessions, pools or peers' connections, and no
//! file outside its directory.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crossbeam_channel::Sender;
use log::warn;

use crate::message::Location;
use crate::smtp::command::BodyType;
use crate::sys::owned::Owned;

mod record;
mod replay;
mod side;
mod state;
mod writer;

use replay::recover;
pub use side::Holds;
use side::{HOLDS_FILE, RECENT_FILE, decode_recent, encode_recent, read_holds};
use writer::{Moved, Writer};

/// The default size past which the active segment rolls over.
pub const SEGMENT_SIZE: u64 = 16 << 20;
/// Most octets one compaction step copies (one write, one flush).
const COMPACT_CHUNK: usize = 512 << 10;
/// How long done and retry records may wait for a commit to take them
/// along before they get a write of their own.
const MARK_INTERVAL: Duration = Duration::from_millis(10);
/// Most messages in one group commit.
const MAX_BATCH: usize = 512;
/// Longest record we accept when reading a journal back.
const MAX_RECORD: usize = 16 << 20;

/// Spool settings.
#[derive(Clone, Debug)]
pub struct SpoolOptions {
    /// The directory (created 0700 if missing).
    pub dir: PathBuf,
    /// Flush to disk before acknowledging. Only tests and benches turn it off.
    pub sync: bool,
    /// Refuse new messages beyond this many bytes on disk (0: no limit).
    pub max_bytes: u64,
    /// The active segment rolls over past this size.
    pub segment_size: u64,
    /// Messages accepted this recently are reported by
    /// [`Spool::take_recent`] at open, for duplicate suppression.
    pub dedup_window: Duration,
}

/// What the spool holds, for `status` and the metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpoolStats {
    /// Bytes of the segment files.
    pub bytes: u64,
    /// Bytes of the records of messages with recipients left.
    pub live_bytes: u64,
    /// Segment files.
    pub segments: u64,
    /// Compactions started since the spool was opened.
    pub compactions: u64,
    /// `[relay] spool_max_bytes`: past it messages are refused (0: no
    /// limit but the disk's).
    pub max_bytes: u64,
}

/// The writer's figures, read by any thread.
#[derive(Default)]
struct Gauges {
    bytes: AtomicU64,
    live_bytes: AtomicU64,
    segments: AtomicU64,
    compactions: AtomicU64,
}

/// A message to make durable.
#[derive(Clone, Debug)]
pub struct NewMessage {
    /// Queue ID.
    pub id: String,
    /// Envelope sender.
    pub from: String,
    /// BODY= of the inbound transaction.
    pub body_type: BodyType,
    /// X-Mms-Message-ID, if any.
    pub message_id: Option<String>,
    /// X-Mms-Transaction-ID, if any.
    pub transaction_id: Option<String>,
    /// When it was accepted.
    pub accepted: SystemTime,
    /// When it expires.
    pub expires: SystemTime,
    /// The data.
    pub data: Arc<[u8]>,
    /// Per destination peer (by name), its recipients.
    pub jobs: Vec<(String, Vec<String>)>,
    /// What names this PDU for duplicate suppression, if anything does.
    pub dedup_key: Option<String>,
    /// What the CDR ledger keeps about it (its own encoding; kept as is).
    pub account: String,
}

/// What became of some recipients at a peer, as the CDR records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// Sent, failed, deleted or deferred.
    pub kind: OutcomeKind,
    /// The SMTP code (0: none, as for a deletion).
    pub code: u16,
    /// The reply text (or an operator's reason).
    pub reply: String,
    /// Attempts made, this one included.
    pub attempts: u32,
    /// When.
    pub at: SystemTime,
}

/// The kinds of [`Outcome`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutcomeKind {
    /// Delivered.
    Sent = 1,
    /// Failed for good (expiry included).
    Failed = 2,
    /// Removed by an operator.
    Deleted = 3,
    /// To be tried again.
    Deferred = 4,
}

impl OutcomeKind {
    fn from_u8(v: u8) -> Option<OutcomeKind> {
        [
            OutcomeKind::Sent,
            OutcomeKind::Failed,
            OutcomeKind::Deleted,
            OutcomeKind::Deferred,
        ]
        .into_iter()
        .find(|k| *k as u8 == v)
    }
}

/// A durable record, as handed to a [`Journal`], in sequence order.
#[derive(Debug)]
pub enum Entry {
    /// A message accepted (at recovery also a copy, with its first
    /// sequence number). The data is there when it was just accepted and
    /// is at most 64 KiB; otherwise it is read back from `location`.
    Accepted {
        /// Sequence number.
        seq: u64,
        /// The message.
        message: Box<NewMessage>,
        /// Where its data is.
        location: Location,
    },
    /// Recipients sent, failed, deleted or deferred.
    Outcome {
        /// Sequence number.
        seq: u64,
        /// Queue ID.
        id: String,
        /// Peer name.
        peer: String,
        /// The recipients.
        rcpts: Vec<String>,
        /// What became of them.
        outcome: Outcome,
    },
    /// An event the ledger journaled with [`Appender::event`].
    Event {
        /// Sequence number.
        seq: u64,
        /// What the ledger wrote.
        payload: Vec<u8>,
    },
    /// Every recipient of the message is done: nothing more will name it.
    Finished {
        /// Queue ID.
        id: String,
    },
}

/// Where the writer hands durable records (the CDR ledger), and how far
/// the ledger has made its own output durable.
pub struct Journal {
    /// Batches of entries, in sequence order.
    pub tx: Sender<Vec<Entry>>,
    /// The ledger's checkpoint: records up to this sequence number are
    /// accounted for and their segments may go.
    pub checkpoint: Arc<AtomicU64>,
    /// Recovery hands back the records after this sequence number as
    /// entries.
    pub from: u64,
    /// New sequence numbers go on above this one (and above the journal's).
    pub floor: u64,
}

/// A (PDU, recipient) pair accepted within the dedup window before the
/// last stop: its digest (see `dedup`) and when it was accepted.
pub type RecentKey = (crate::mm4::dedup::Digest, SystemTime);

/// A job found in the spool at start.
#[derive(Clone, Debug)]
pub struct RecoveredJob {
    /// Peer name.
    pub peer: String,
    /// Recipients still to do.
    pub rcpts: Vec<String>,
    /// Attempts made.
    pub attempts: u32,
    /// Next attempt.
    pub next: SystemTime,
}

/// A message found in the spool at start, with what is left to do.
#[derive(Clone, Debug)]
pub struct Recovered {
    /// The message as it was accepted (its data stays on disk).
    pub message: NewMessage,
    /// Where its data is.
    pub location: Location,
    /// What is left.
    pub jobs: Vec<RecoveredJob>,
}

/// Why a message could not be made durable.
#[derive(Debug)]
pub enum SpoolError {
    /// `max_bytes` reached or the disk is full (452 4.3.1).
    Full,
    /// Any other write or flush failure (451 4.3.0).
    Io(io::Error),
    /// The spool is stopping.
    Closed,
}

impl fmt::Display for SpoolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SpoolError::Full => f.write_str("spool full"),
            SpoolError::Io(e) => write!(f, "spool write failed: {e}"),
            SpoolError::Closed => f.write_str("spool closed"),
        }
    }
}

impl std::error::Error for SpoolError {}

/// Where the writer leaves a commit's outcome, and the session to wake. A
/// parked thread costs no CPU while it waits, where a channel would spin.
struct Ack {
    slot: Arc<parking_lot::Mutex<Option<Result<Location, SpoolError>>>>,
    waiter: thread::Thread,
    sent: bool,
}

impl Ack {
    fn send(mut self, r: Result<Location, SpoolError>) {
        *self.slot.lock() = Some(r);
        self.sent = true;
        self.waiter.unpark();
    }
}

impl Drop for Ack {
    fn drop(&mut self) {
        if !self.sent {
            *self.slot.lock() = Some(Err(SpoolError::Closed));
            self.waiter.unpark();
        }
    }
}

enum Request {
    Commit(Box<NewMessage>, Ack),
    Mark(Mark),
    /// An event payload for the journal.
    Event(Vec<u8>),
    /// The journal's checkpoint moved: segments may go.
    Nudge,
}

/// What happened to some recipients of a message at a peer.
struct Mark {
    id: String,
    note: Note,
}

/// What happened to some recipients at a peer.
#[derive(Clone, Debug)]
struct Note {
    peer: String,
    rcpts: Vec<String>,
    /// `None`: done (sent, failed or expired); else deferred with its
    /// attempts so far and the next attempt.
    retry: Option<(u32, SystemTime)>,
    /// What happened, for the CDR (`None` in records copied forward).
    outcome: Option<Outcome>,
}

/// Journals events beside the spool's own records (see [`Spool::appender`]).
#[derive(Clone)]
pub struct Appender(Option<Sender<Request>>);

impl Appender {
    /// Journals `payload` as an `E` record; it comes back as an
    /// [`Entry::Event`] once durable. Lost if the spool is stopping.
    pub fn event(&self, payload: Vec<u8>) {
        if let Some(tx) = &self.0 {
            let _ = tx.send(Request::Event(payload));
        }
    }

    /// The journal's checkpoint moved: the writer looks again at what it
    /// may delete.
    pub fn nudge(&self) {
        if let Some(tx) = &self.0 {
            let _ = tx.send(Request::Nudge);
        }
    }
}

/// Reads messages back from the spool (see [`Spool::reader`]).
#[derive(Clone)]
pub struct Reader {
    dir: PathBuf,
    moved: Moved,
}

impl Reader {
    /// Reads message `id`'s data back and checks its CRC. `loc` is where
    /// it was accepted; compaction may have copied it forward since.
    pub fn read(&self, id: &str, loc: &Location) -> io::Result<Vec<u8>> {
        let now = || self.moved.lock().get(id).copied().unwrap_or(*loc);
        let mut at = now();
        let f = match File::open(self.dir.join(segment_name(at.segment))) {
            // Copied forward and its old segment deleted since we looked.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                at = now();
                File::open(self.dir.join(segment_name(at.segment)))?
            }
            r => r?,
        };
        let mut buf = vec![0u8; at.len as usize];
        f.read_exact_at(&mut buf, at.offset)?;
        if crc32fast::hash(&buf) != at.crc {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "spooled data fails its CRC",
            ));
        }
        Ok(buf)
    }
}

/// The spool: a handle on the writer thread.
pub struct Spool {
    dir: PathBuf,
    tx: Option<Sender<Request>>,
    marks: Option<Sender<Request>>,
    handle: Option<Owned<()>>,
    gauges: Arc<Gauges>,
    max_bytes: u64,
    moved: Moved,
    highest_id: Option<String>,
    recent: parking_lot::Mutex<Vec<RecentKey>>,
    /// The operator's holds as last saved (the lock orders the saves).
    holds: parking_lot::Mutex<Holds>,
}

impl Spool {
    /// Opens (or creates) the spool, recovers what it holds, and starts the
    /// writer thread.
    pub fn open(opts: &SpoolOptions) -> io::Result<(Spool, Vec<Recovered>)> {
        Spool::open_with(opts, None).map(|(s, r, _)| (s, r))
    }

    /// As [`Spool::open`], feeding `journal`: also returns, in order, the
    /// entries of the records after its `from` (and every message record
    /// they need, whatever its number).
    pub fn open_with(
        opts: &SpoolOptions,
        journal: Option<Journal>,
    ) -> io::Result<(Spool, Vec<Recovered>, Vec<Entry>)> {
        fs::create_dir_all(&opts.dir)?;
        fs::set_permissions(&opts.dir, fs::Permissions::from_mode(0o700))?;
        let from = journal.as_ref().map(|j| j.from);
        let (mut state, recovered, entries) = recover(&opts.dir, opts.dedup_window, from)?;
        let highest_id = state.highest_id.take();
        let mut recent = std::mem::take(&mut state.recent);
        if let Some(since) = SystemTime::now().checked_sub(opts.dedup_window) {
            match fs::read(opts.dir.join(RECENT_FILE)) {
                Ok(data) => {
                    let keys = decode_recent(&data, since);
                    if keys.is_empty() || opts.dedup_window.is_zero() {
                        // Nothing in it counts any more.
                        let _ = fs::remove_file(opts.dir.join(RECENT_FILE));
                    } else {
                        recent.extend(keys);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => warn!("spool: cannot read the saved duplicate keys: {e}"),
            }
        }
        let gauges = Arc::new(Gauges::default());
        let moved = Moved::default();
        let mut writer =
            Writer::start(opts.clone(), state, gauges.clone(), moved.clone(), journal)?;
        let (tx, rx) = crossbeam_channel::unbounded();
        let (marks_tx, marks_rx) = crossbeam_channel::unbounded();
        let handle = Owned::spawn("spool-writer", move || writer.run(&rx, &marks_rx))?;
        Ok((
            Spool {
                dir: opts.dir.clone(),
                tx: Some(tx),
                marks: Some(marks_tx),
                handle: Some(handle),
                gauges,
                max_bytes: opts.max_bytes,
                moved,
                highest_id,
                recent: parking_lot::Mutex::new(recent),
                holds: parking_lot::Mutex::new(read_holds(&opts.dir)),
            },
            recovered,
            entries,
        ))
    }

    /// Makes a message durable; returns when it is on disk (or failed).
    pub fn commit(&self, msg: NewMessage) -> Result<Location, SpoolError> {
        let slot = Arc::new(parking_lot::Mutex::new(None));
        let ack = Ack {
            slot: slot.clone(),
            waiter: thread::current(),
            sent: false,
        };
        let tx = self.tx.as_ref().ok_or(SpoolError::Closed)?;
        tx.send(Request::Commit(Box::new(msg), ack))
            .map_err(|_| SpoolError::Closed)?;
        loop {
            if let Some(r) = slot.lock().take() {
                return r;
            }
            thread::park();
        }
    }

    /// Records that these recipients are done (sent, failed, expired or
    /// deleted), and how.
    pub fn done(&self, id: &str, peer: &str, rcpts: &[String], outcome: Outcome) {
        self.mark(id, peer, rcpts, None, outcome);
    }

    /// Records a deferral: attempts so far, when to try next, and why.
    pub fn retry(
        &self,
        id: &str,
        peer: &str,
        rcpts: &[String],
        next: SystemTime,
        outcome: Outcome,
    ) {
        let attempts = outcome.attempts;
        self.mark(id, peer, rcpts, Some((attempts, next)), outcome);
    }

    fn mark(
        &self,
        id: &str,
        peer: &str,
        rcpts: &[String],
        retry: Option<(u32, SystemTime)>,
        outcome: Outcome,
    ) {
        if let Some(tx) = &self.marks {
            let _ = tx.send(Request::Mark(Mark {
                id: id.to_string(),
                note: Note {
                    peer: peer.to_string(),
                    rcpts: rcpts.to_vec(),
                    retry,
                    outcome: Some(outcome),
                },
            }));
        }
    }

    /// A handle that journals events and tells the writer the journal's
    /// checkpoint moved (for the CDR ledger).
    pub fn appender(&self) -> Appender {
        Appender(self.marks.clone())
    }

    /// Reads message `id`'s data back and checks its CRC. `loc` is where
    /// it was accepted; compaction may have copied it forward since.
    pub fn read(&self, id: &str, loc: &Location) -> io::Result<Vec<u8>> {
        self.reader().read(id, loc)
    }

    /// A handle that reads messages back, for another thread.
    pub fn reader(&self) -> Reader {
        Reader {
            dir: self.dir.clone(),
            moved: self.moved.clone(),
        }
    }

    /// The highest queue ID in the spool when it was opened: new IDs must
    /// sort above it (see `message::IdSource`).
    pub fn highest_id(&self) -> Option<&str> {
        self.highest_id.as_deref()
    }

    /// The keyed messages accepted within `dedup_window` before the spool
    /// was opened, done or not (once: the list is handed over): those the
    /// journal holds, and those the last clean stop saved.
    pub fn take_recent(&self) -> Vec<RecentKey> {
        std::mem::take(&mut *self.recent.lock())
    }

    /// Saves duplicate-suppression keys for the next start, which reads
    /// back those still within its window: written aside, flushed, then
    /// renamed over the last ones.
    pub fn save_recent(&self, keys: &[RecentKey]) -> io::Result<()> {
        self.replace_file(RECENT_FILE, &encode_recent(keys))
    }

    /// What an operator held at the last save (see [`Spool::save_holds`]).
    pub fn holds(&self) -> Holds {
        self.holds.lock().clone()
    }

    /// Keeps what an operator holds beside the journal, so that a restart
    /// holds it again.
    pub fn save_holds(&self, holds: &Holds) -> io::Result<()> {
        let mut text = String::new();
        for p in &holds.peers {
            text.push_str(&format!("peer {p}\n"));
        }
        for m in &holds.messages {
            text.push_str(&format!("message {m}\n"));
        }
        let mut saved = self.holds.lock();
        self.replace_file(HOLDS_FILE, text.as_bytes())?;
        *saved = holds.clone();
        Ok(())
    }

    /// Writes `name` in the spool directory whole or not at all: written
    /// aside, flushed, renamed over the old one.
    fn replace_file(&self, name: &str, data: &[u8]) -> io::Result<()> {
        let tmp = self.dir.join(format!("{name}.tmp"));
        let mut f = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_data()?;
        fs::rename(&tmp, self.dir.join(name))?;
        File::open(&self.dir)?.sync_all()
    }

    /// Bytes the spool occupies on disk now.
    pub fn bytes(&self) -> u64 {
        self.gauges.bytes.load(Ordering::Acquire)
    }

    /// Its size, what of it is live, its segments and compactions.
    pub fn stats(&self) -> SpoolStats {
        let g = &self.gauges;
        SpoolStats {
            bytes: g.bytes.load(Ordering::Acquire),
            live_bytes: g.live_bytes.load(Ordering::Acquire),
            segments: g.segments.load(Ordering::Acquire),
            compactions: g.compactions.load(Ordering::Acquire),
            max_bytes: self.max_bytes,
        }
    }

    /// Flushes what is pending and stops the writer.
    pub fn close(mut self) {
        self.shut();
    }

    fn shut(&mut self) {
        self.tx.take();
        self.marks.take();
        if let Some(h) = self.handle.take() {
            h.join();
        }
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        self.shut();
    }
}

fn segment_name(n: u64) -> String {
    format!("{n:016}.log")
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn from_unix_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    use super::record::{Enc, frame_parts};

    fn opts(dir: &Path) -> SpoolOptions {
        SpoolOptions {
            dir: dir.to_path_buf(),
            sync: true,
            max_bytes: 0,
            segment_size: SEGMENT_SIZE,
            dedup_window: Duration::ZERO,
        }
    }

    fn msg(id: &str, rcpts: &[(&str, &[&str])]) -> NewMessage {
        NewMessage {
            id: id.into(),
            from: "a@b".into(),
            body_type: BodyType::SevenBit,
            message_id: Some(format!("mid-{id}")),
            transaction_id: None,
            accepted: UNIX_EPOCH + Duration::from_secs(1000),
            expires: UNIX_EPOCH + Duration::from_secs(9000),
            data: Arc::from(format!("data of {id}\r\n").into_bytes()),
            jobs: rcpts
                .iter()
                .map(|(p, r)| (p.to_string(), r.iter().map(|s| s.to_string()).collect()))
                .collect(),
            dedup_key: None,
            account: String::new(),
        }
    }

    fn sent() -> Outcome {
        Outcome {
            kind: OutcomeKind::Sent,
            code: 250,
            reply: "2.0.0 ok".into(),
            attempts: 1,
            at: UNIX_EPOCH + Duration::from_secs(2000),
        }
    }

    #[test]
    fn dedup_keys_of_recent_messages_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = Spool::open(&opts(dir.path())).unwrap();
        let mut fresh = msg("fresh", &[("A", &["x", "y"])]);
        fresh.accepted = SystemTime::now();
        fresh.dedup_key = Some("MM4_forward.REQ M1 T1".into());
        let mut old = msg("old", &[("A", &["z"])]);
        old.dedup_key = Some("MM4_forward.REQ M0 T0".into());
        spool.commit(fresh).unwrap();
        spool.commit(old).unwrap();
        spool.commit(msg("unkeyed", &[("B", &["w"])])).unwrap();
        spool.close();
        let window = SpoolOptions {
            dedup_window: Duration::from_secs(600),
            ..opts(dir.path())
        };
        let (spool, recovered) = Spool::open(&window).unwrap();
        assert_eq!(recovered.len(), 3, "keys change nothing else");
        let mut recent: Vec<_> = spool.take_recent().into_iter().map(|k| k.0).collect();
        recent.sort();
        let mut want = [
            crate::mm4::dedup::digest("MM4_forward.REQ M1 T1", "x"),
            crate::mm4::dedup::digest("MM4_forward.REQ M1 T1", "y"),
        ];
        want.sort();
        assert_eq!(recent, want, "only the one inside the window");
        assert!(spool.take_recent().is_empty(), "handed over once");
        spool.close();
    }

    #[test]
    fn saved_dedup_keys_come_back_within_the_window() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = Spool::open(&opts(dir.path())).unwrap();
        let now = SystemTime::now();
        let keys = vec![([1; 16], now), ([2; 16], now), ([3; 16], UNIX_EPOCH)];
        spool.save_recent(&keys).unwrap();
        spool.close();
        let window = SpoolOptions {
            dedup_window: Duration::from_secs(600),
            ..opts(dir.path())
        };
        let (spool, _) = Spool::open(&window).unwrap();
        let mut got: Vec<_> = spool.take_recent().into_iter().map(|k| k.0).collect();
        got.sort();
        assert_eq!(
            got,
            [[1; 16], [2; 16]],
            "both inside the window, the old one not"
        );
        spool.close();
        // A torn file gives what is whole and nothing else.
        let path = dir.path().join(RECENT_FILE);
        let len = fs::metadata(&path).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len - 1)
            .unwrap();
        let (spool, _) = Spool::open(&window).unwrap();
        assert_eq!(spool.take_recent().len(), 2);
        spool.close();
        // Once nothing in it is inside the window, it goes.
        let (spool, _) = Spool::open(&opts(dir.path())).unwrap();
        assert!(spool.take_recent().is_empty());
        spool.close();
        assert!(!path.exists());
    }

    #[test]
    fn a_recent_file_of_text_keys_counts_for_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut e = Enc(Vec::new());
        e.u8(b'K');
        e.u64(unix_ms(SystemTime::now()));
        e.str("MM4_forward.REQ M1 T1");
        e.strs(&["x".into(), "y".into()]);
        let mut file = Vec::new();
        frame_parts(&mut file, &e.0, &[]);
        fs::write(dir.path().join(RECENT_FILE), file).unwrap();
        let window = SpoolOptions {
            dedup_window: Duration::from_secs(600),
            ..opts(dir.path())
        };
        let (spool, _) = Spool::open(&window).unwrap();
        assert!(spool.take_recent().is_empty());
        spool.close();
    }

    #[test]
    fn recovers_what_is_not_done_with_its_retry_state() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, rec) = Spool::open(&opts(dir.path())).unwrap();
        assert!(rec.is_empty());
        let l1 = spool
            .commit(msg("m1", &[("A", &["x", "y"]), ("B", &["z"])]))
            .unwrap();
        spool.commit(msg("m2", &[("A", &["w"])])).unwrap();
        assert_eq!(spool.read("m1", &l1).unwrap(), b"data of m1\r\n");
        spool.done("m1", "A", &["x".into()], sent());
        let deferred = Outcome {
            kind: OutcomeKind::Deferred,
            attempts: 3,
            ..sent()
        };
        spool.retry(
            "m1",
            "B",
            &["z".into()],
            UNIX_EPOCH + Duration::from_secs(5000),
            deferred,
        );
        spool.done("m2", "A", &["w".into()], sent());
        spool.close();

        let (spool, rec) = Spool::open(&opts(dir.path())).unwrap();
        assert_eq!(rec.len(), 1);
        let r = &rec[0];
        assert_eq!(r.message.id, "m1");
        assert_eq!(r.message.message_id.as_deref(), Some("mid-m1"));
        let mut jobs: Vec<_> = r
            .jobs
            .iter()
            .map(|j| (j.peer.as_str(), j.rcpts.clone(), j.attempts))
            .collect();
        jobs.sort();
        assert_eq!(
            jobs,
            vec![
                ("A", vec!["y".to_string()], 0),
                ("B", vec!["z".to_string()], 3)
            ]
        );
        assert_eq!(spool.read("m1", &r.location).unwrap(), b"data of m1\r\n");
        spool.close();
    }

    #[test]
    fn a_torn_tail_is_dropped_and_the_rest_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = Spool::open(&opts(dir.path())).unwrap();
        spool.commit(msg("m1", &[("A", &["x"])])).unwrap();
        spool.commit(msg("m2", &[("A", &["y"])])).unwrap();
        spool.close();
        let idx = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| {
                p.extension().is_some_and(|e| e == "log") && fs::metadata(p).unwrap().len() > 0
            })
            .unwrap();
        let len = fs::metadata(&idx).unwrap().len();
        // Tear the last record, then corrupt: both end the journal there.
        OpenOptions::new()
            .write(true)
            .open(&idx)
            .unwrap()
            .set_len(len - 3)
            .unwrap();
        let (spool, rec) = Spool::open(&opts(dir.path())).unwrap();
        assert_eq!(
            rec.iter()
                .map(|r| r.message.id.as_str())
                .collect::<Vec<_>>(),
            ["m1"]
        );
        spool.close();
        let mut bytes = fs::read(&idx).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        fs::write(&idx, bytes).unwrap();
        let (spool, rec) = Spool::open(&opts(dir.path())).unwrap();
        assert!(
            rec.is_empty(),
            "a record failing its CRC must not be delivered"
        );
        spool.close();
    }

    #[test]
    fn a_drained_spool_shrinks_to_near_zero() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = Spool::open(&opts(dir.path())).unwrap();
        for i in 0..50 {
            let mut m = msg(&format!("m{i}"), &[("A", &["x"])]);
            m.data = Arc::from(vec![b'x'; 10_000]);
            spool.commit(m).unwrap();
        }
        assert!(spool.bytes() > 500_000);
        for i in 0..50 {
            spool.done(&format!("m{i}"), "A", &["x".into()], sent());
        }
        // A commit is a barrier: every mark sent before it is applied.
        spool.commit(msg("last", &[("A", &["x"])])).unwrap();
        spool.done("last", "A", &["x".into()], sent());
        spool.commit(msg("probe", &[])).unwrap();
        assert!(spool.bytes() < 200, "{} bytes left", spool.bytes());
        spool.close();
        let (_, rec) = Spool::open(&opts(dir.path())).unwrap();
        assert!(rec.is_empty());
    }

    #[test]
    fn a_drained_spool_whose_last_segment_holds_no_data_is_emptied() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = Spool::open(&small(dir.path())).unwrap();
        let mut m = msg("m", &[("A", &["x"])]);
        m.data = Arc::from(vec![b'x'; 5000]);
        // Past the segment size: what follows goes to a fresh segment.
        spool.commit(m).unwrap();
        spool.done("m", "A", &["x".into()], sent());
        let mut probe = msg("probe", &[]);
        probe.data = Arc::from(&[][..]);
        spool.commit(probe).unwrap();
        assert_eq!(spool.bytes(), 0, "only records about done work are left");
        spool.close();
    }

    #[test]
    fn refuses_past_max_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let o = SpoolOptions {
            max_bytes: 100,
            ..opts(dir.path())
        };
        let (spool, _) = Spool::open(&o).unwrap();
        let mut big = msg("big", &[("A", &["x"])]);
        big.data = Arc::from(vec![b'x'; 200]);
        assert!(matches!(spool.commit(big), Err(SpoolError::Full)));
        assert!(spool.commit(msg("small", &[("A", &["x"])])).is_ok());
    }

    /// A spool where peer C is down: every 20th message also waits for C
    /// (one of those in two has had one recipient delivered), everything
    /// else is delivered. Returns the kept IDs with their data and where
    /// each was first written.
    fn down_peer_load(spool: &Spool) -> Vec<(String, Vec<u8>, Location)> {
        let next = UNIX_EPOCH + Duration::from_secs(7777);
        let mut kept = Vec::new();
        for i in 0..400 {
            let id = format!("m{i:04}");
            let keep = i % 20 == 0;
            let jobs: &[(&str, &[&str])] = if keep {
                &[("A", &["a"]), ("C", &["x", "y"])]
            } else {
                &[("A", &["a"])]
            };
            let mut m = msg(&id, jobs);
            let data = format!("data of {id} {}\r\n", "z".repeat(300)).into_bytes();
            m.data = Arc::from(data.clone());
            let loc = spool.commit(m).unwrap();
            spool.done(&id, "A", &["a".into()], sent());
            if keep {
                let deferred = Outcome {
                    kind: OutcomeKind::Deferred,
                    attempts: 2,
                    ..sent()
                };
                spool.retry(&id, "C", &["x".into(), "y".into()], next, deferred);
                if i % 40 == 0 {
                    spool.done(&id, "C", &["y".into()], sent());
                }
                kept.push((id, data, loc));
            }
        }
        kept
    }

    fn check_recovered(rec: &[Recovered], kept: &[(String, Vec<u8>, Location)]) {
        let mut ids: Vec<_> = rec.iter().map(|r| r.message.id.clone()).collect();
        ids.sort();
        let want: Vec<_> = kept.iter().map(|k| k.0.clone()).collect();
        assert_eq!(ids, want, "the kept messages and only they come back");
        for r in rec {
            let n: usize = r.message.id[1..].parse().unwrap();
            let rcpts: &[&str] = if n % 40 == 0 { &["x"] } else { &["x", "y"] };
            assert_eq!(r.jobs.len(), 1, "{}: {:?}", r.message.id, r.jobs);
            assert_eq!(r.jobs[0].peer, "C");
            assert_eq!(r.jobs[0].rcpts, rcpts, "{}", r.message.id);
            assert_eq!(r.jobs[0].attempts, 2, "retry state survives the copy");
            assert_eq!(r.jobs[0].next, UNIX_EPOCH + Duration::from_secs(7777));
            assert_eq!(r.message.message_id, Some(format!("mid-{}", r.message.id)));
        }
    }

    fn small(dir: &Path) -> SpoolOptions {
        SpoolOptions {
            segment_size: 4096,
            ..opts(dir)
        }
    }

    #[test]
    fn compaction_frees_segments_a_down_peer_pins() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = Spool::open(&small(dir.path())).unwrap();
        let kept = down_peer_load(&spool);
        // A commit is a barrier for marks; the next one also for the
        // compaction step the first may have started.
        spool.commit(msg("probe1", &[])).unwrap();
        spool.commit(msg("probe2", &[])).unwrap();
        let written = 400 * 350;
        // 20 live messages of ~420 octets: the spool stays within a few
        // times that (dead space up to the slack, the active segment).
        assert!(
            spool.bytes() < 40_000,
            "{} of {written} octets still on disk",
            spool.bytes()
        );
        for (id, data, loc) in &kept {
            assert_eq!(&spool.read(id, loc).unwrap(), data, "{id} reads back");
        }
        spool.close();
        let (spool, rec) = Spool::open(&small(dir.path())).unwrap();
        check_recovered(&rec, &kept);
        for r in &rec {
            let (_, data, _) = kept.iter().find(|k| k.0 == r.message.id).unwrap();
            assert_eq!(&spool.read(&r.message.id, &r.location).unwrap(), data);
        }
        spool.close();
    }

    #[test]
    fn a_crash_between_copy_and_delete_recovers_each_message_once() {
        let dir = tempfile::tempdir().unwrap();
        let o = SpoolOptions {
            // No compaction yet: the snapshot below holds the old copies.
            segment_size: 1 << 20,
            ..opts(dir.path())
        };
        let (spool, _) = Spool::open(&o).unwrap();
        let kept = down_peer_load(&spool);
        spool.close();
        let crashed = tempfile::tempdir().unwrap();
        for e in fs::read_dir(dir.path()).unwrap() {
            let p = e.unwrap().path();
            fs::copy(&p, crashed.path().join(p.file_name().unwrap())).unwrap();
        }
        // Reopened with small segments, the spool compacts at once.
        let (spool, rec) = Spool::open(&small(dir.path())).unwrap();
        check_recovered(&rec, &kept);
        spool.commit(msg("probe", &[])).unwrap();
        spool.close();
        let names = |d: &Path| {
            let mut v: Vec<_> = fs::read_dir(d)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            v.sort();
            v
        };
        let (old, new) = (names(crashed.path()), names(dir.path()));
        assert!(
            !new.contains(&old[0]),
            "the old segment went: {old:?} {new:?}"
        );
        // The crash: the copies are on disk, the old segment not yet gone.
        for n in new {
            fs::copy(dir.path().join(&n), crashed.path().join(&n)).unwrap();
        }
        let (spool, rec) = Spool::open(&small(crashed.path())).unwrap();
        check_recovered(&rec, &kept);
        spool.close();
    }

    #[test]
    fn a_message_segment_stays_until_the_journal_has_its_outcome() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, rx) = crossbeam_channel::unbounded();
        let checkpoint = Arc::new(AtomicU64::new(0));
        let journal = Journal {
            tx,
            checkpoint: checkpoint.clone(),
            from: 0,
            floor: 0,
        };
        let o = SpoolOptions {
            segment_size: 1,
            ..opts(dir.path())
        };
        let (spool, _, _) = Spool::open_with(&o, Some(journal)).unwrap();
        let home = spool.commit(msg("m1", &[("A", &["x"])])).unwrap().segment;
        spool.commit(msg("m2", &[("A", &["y"])])).unwrap();
        spool.done("m1", "A", &["x".to_string()], sent());
        // Records 1 and 2 are the messages, 3 the done record; the journal
        // gets it once durable.
        let seq = loop {
            let batch = rx.recv_timeout(Duration::from_secs(10)).unwrap();
            if let Some(s) = batch.iter().find_map(|e| match e {
                Entry::Outcome { seq, .. } => Some(*seq),
                _ => None,
            }) {
                break s;
            }
        };
        let path = dir.path().join(segment_name(home));
        checkpoint.store(seq - 1, Ordering::Release);
        // A commit runs the writer's clean-up before it answers.
        spool.commit(msg("probe1", &[])).unwrap();
        assert!(
            path.exists(),
            "m1's segment went before its outcome was accounted"
        );
        checkpoint.store(seq, Ordering::Release);
        spool.commit(msg("probe2", &[])).unwrap();
        assert!(!path.exists(), "m1's segment is free once it is");
        spool.close();
    }
}
