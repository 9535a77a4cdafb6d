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
//! - `R` recipients deferred: attempts so far and the next attempt time.
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
//! # Side files
//! `recent` holds the duplicate-suppression keys a clean stop saved;
//! `holds` what an operator holds. Both are replaced whole (written aside,
//! flushed, renamed).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use log::{error, info, warn};

use crate::message::Location;
use crate::owned::Owned;
use crate::smtp::command::BodyType;

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
}

/// A (PDU, recipient) pair accepted within the dedup window before the
/// last stop: its digest (see `dedup`) and when it was accepted.
pub type RecentKey = (crate::dedup::Digest, SystemTime);

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
}

/// The spool: a handle on the writer thread.
pub struct Spool {
    dir: PathBuf,
    tx: Option<Sender<Request>>,
    marks: Option<Sender<Request>>,
    handle: Option<Owned<()>>,
    gauges: Arc<Gauges>,
    moved: Moved,
    highest_id: Option<String>,
    recent: parking_lot::Mutex<Vec<RecentKey>>,
    /// The operator's holds as last saved (the lock orders the saves).
    holds: parking_lot::Mutex<Holds>,
}

/// What an operator holds: peers by name, messages by queue ID.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Holds {
    /// Held peers.
    pub peers: Vec<String>,
    /// Held messages.
    pub messages: Vec<String>,
}

/// Where [`Holds`] are kept: lines `peer NAME` and `message ID`.
const HOLDS_FILE: &str = "holds";

fn read_holds(dir: &Path) -> Holds {
    let text = match fs::read_to_string(dir.join(HOLDS_FILE)) {
        Ok(t) => t,
        Err(e) => {
            if e.kind() != io::ErrorKind::NotFound {
                warn!("spool: cannot read the operator's holds: {e}");
            }
            return Holds::default();
        }
    };
    let mut holds = Holds::default();
    for line in text.lines() {
        match line.split_once(' ') {
            Some(("peer", name)) => holds.peers.push(name.to_string()),
            Some(("message", id)) => holds.messages.push(id.to_string()),
            _ => warn!("spool: {HOLDS_FILE}: ignoring {line:?}"),
        }
    }
    holds
}

impl Spool {
    /// Opens (or creates) the spool, recovers what it holds, and starts the
    /// writer thread.
    pub fn open(opts: &SpoolOptions) -> io::Result<(Spool, Vec<Recovered>)> {
        fs::create_dir_all(&opts.dir)?;
        fs::set_permissions(&opts.dir, fs::Permissions::from_mode(0o700))?;
        let (mut state, recovered) = recover(&opts.dir, opts.dedup_window)?;
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
        let mut writer = Writer::start(opts.clone(), state, gauges.clone(), moved.clone())?;
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
                moved,
                highest_id,
                recent: parking_lot::Mutex::new(recent),
                holds: parking_lot::Mutex::new(read_holds(&opts.dir)),
            },
            recovered,
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

    /// Records that these recipients are done (sent, failed or expired).
    pub fn done(&self, id: &str, peer: &str, rcpts: &[String]) {
        self.mark(id, peer, rcpts, None);
    }

    /// Records a deferral: attempts so far and when to try next.
    pub fn retry(&self, id: &str, peer: &str, rcpts: &[String], attempts: u32, next: SystemTime) {
        self.mark(id, peer, rcpts, Some((attempts, next)));
    }

    fn mark(&self, id: &str, peer: &str, rcpts: &[String], retry: Option<(u32, SystemTime)>) {
        if let Some(tx) = &self.marks {
            let _ = tx.send(Request::Mark(Mark {
                id: id.to_string(),
                note: Note {
                    peer: peer.to_string(),
                    rcpts: rcpts.to_vec(),
                    retry,
                },
            }));
        }
    }

    /// Reads message `id`'s data back and checks its CRC. `loc` is where
    /// it was accepted; compaction may have copied it forward since.
    pub fn read(&self, id: &str, loc: &Location) -> io::Result<Vec<u8>> {
        let now = || self.moved.lock().get(id).copied().unwrap_or(*loc);
        let mut at = now();
        let f = match File::open(self.dir.join(segment_name(at.segment))) {
            Ok(f) => f,
            // Copied forward and its old segment deleted since we looked.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                at = now();
                File::open(self.dir.join(segment_name(at.segment)))?
            }
            Err(e) => return Err(e),
        };
        let loc = &at;
        let mut buf = vec![0u8; loc.len as usize];
        f.read_exact_at(&mut buf, loc.offset)?;
        if crc32fast::hash(&buf) != loc.crc {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "spooled data fails its CRC",
            ));
        }
        Ok(buf)
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

// ---- record encoding -------------------------------------------------------

struct Enc(Vec<u8>);

impl Enc {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn str(&mut self, s: &str) {
        let b = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
        self.u16(b.len() as u16);
        self.0.extend_from_slice(b);
    }
    fn strs(&mut self, v: &[String]) {
        self.u16(v.len().min(u16::MAX as usize) as u16);
        v.iter().take(u16::MAX as usize).for_each(|s| self.str(s));
    }
}

/// Frames the payload `head` + `tail` as `len crc payload` onto `out`.
fn frame_parts(out: &mut Vec<u8>, head: &[u8], tail: &[u8]) {
    let mut crc = crc32fast::Hasher::new();
    crc.update(head);
    crc.update(tail);
    out.extend_from_slice(&((head.len() + tail.len()) as u32).to_le_bytes());
    out.extend_from_slice(&crc.finalize().to_le_bytes());
    out.extend_from_slice(head);
    out.extend_from_slice(tail);
}

/// Where the data offset sits in an `M` record's payload (after the type
/// octet and the segment number), so it can be filled in once known.
const M_OFFSET_AT: usize = 9;

/// The `M` record's payload without the data that follows it.
fn encode_message(m: &NewMessage, loc: &Location) -> Vec<u8> {
    let mut e = Enc(Vec::with_capacity(256));
    e.u8(b'M');
    e.u64(loc.segment);
    e.u64(loc.offset);
    e.u32(loc.len);
    e.u32(loc.crc);
    e.str(&m.id);
    e.u64(unix_ms(m.accepted));
    e.u64(unix_ms(m.expires));
    e.u8(u8::from(m.body_type == BodyType::EightBitMime));
    e.str(&m.from);
    e.str(m.message_id.as_deref().unwrap_or(""));
    e.str(m.transaction_id.as_deref().unwrap_or(""));
    e.u16(m.jobs.len() as u16);
    for (peer, rcpts) in &m.jobs {
        e.str(peer);
        e.strs(rcpts);
    }
    // Optional trailing fields: a reader tells them from the data by the
    // data's length, so records without them still read.
    if let Some(k) = &m.dedup_key {
        e.str(k);
    }
    e.0
}

fn encode_mark(id: &str, n: &Note) -> Vec<u8> {
    let mut e = Enc(Vec::with_capacity(128));
    e.u8(if n.retry.is_some() { b'R' } else { b'D' });
    e.str(id);
    e.str(&n.peer);
    e.strs(&n.rcpts);
    if let Some((attempts, next)) = n.retry {
        e.u32(attempts);
        e.u64(unix_ms(next));
    }
    e.0
}

struct Dec<'a>(&'a [u8]);

impl Dec<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }
    fn str(&mut self) -> Option<String> {
        let n = self.u16()? as usize;
        self.take(n)
            .map(|b| String::from_utf8_lossy(b).into_owned())
    }
    fn strs(&mut self) -> Option<Vec<String>> {
        let n = self.u16()? as usize;
        (0..n).map(|_| self.str()).collect()
    }
}

enum Record {
    Message(Box<NewMessage>, Location),
    Mark(Mark),
}

fn decode(payload: &[u8]) -> Option<Record> {
    let mut d = Dec(payload);
    match d.u8()? {
        b'M' => {
            let loc = Location {
                segment: d.u64()?,
                offset: d.u64()?,
                len: d.u32()?,
                crc: d.u32()?,
            };
            let id = d.str()?;
            let accepted = from_unix_ms(d.u64()?);
            let expires = from_unix_ms(d.u64()?);
            let body_type = if d.u8()? == 1 {
                BodyType::EightBitMime
            } else {
                BodyType::SevenBit
            };
            let from = d.str()?;
            let message_id = Some(d.str()?).filter(|s| !s.is_empty());
            let transaction_id = Some(d.str()?).filter(|s| !s.is_empty());
            let njobs = d.u16()? as usize;
            let jobs = (0..njobs)
                .map(|_| Some((d.str()?, d.strs()?)))
                .collect::<Option<Vec<_>>>()?;
            let dedup_key = if d.0.len() > loc.len as usize {
                Some(d.str()?)
            } else {
                None
            };
            // The data is what is left of the payload.
            if d.0.len() != loc.len as usize {
                return None;
            }
            let m = NewMessage {
                id,
                from,
                body_type,
                message_id,
                transaction_id,
                accepted,
                expires,
                data: Arc::from(&[][..]),
                jobs,
                dedup_key,
            };
            Some(Record::Message(Box::new(m), loc))
        }
        kind @ (b'D' | b'R') => {
            let (id, peer, rcpts) = (d.str()?, d.str()?, d.strs()?);
            let retry = match kind {
                b'R' => Some((d.u32()?, from_unix_ms(d.u64()?))),
                _ => None,
            };
            Some(Record::Mark(Mark {
                id,
                note: Note { peer, rcpts, retry },
            }))
        }
        _ => None,
    }
}

/// The payload of the framed record at `pos` in `data`, if it is whole
/// and passes its CRC.
fn frame_at(data: &[u8], pos: usize) -> Option<&[u8]> {
    let head = data.get(pos..pos + 8)?;
    let len = u32::from_le_bytes(head[..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(head[4..].try_into().expect("4 bytes"));
    if len > MAX_RECORD {
        return None;
    }
    let payload = data.get(pos + 8..pos + 8 + len)?;
    (crc32fast::hash(payload) == crc).then_some(payload)
}

/// Reads framed records from `data`; returns each with where its frame
/// starts and how long it is, and the length of the good prefix (a torn or
/// corrupt record ends it).
fn read_records(data: &[u8]) -> (Vec<(u64, u32, Record)>, usize) {
    let mut out = Vec::new();
    let mut pos = 0;
    while let Some(payload) = frame_at(data, pos) {
        let Some(r) = decode(payload) else { break };
        out.push((pos as u64, (8 + payload.len()) as u32, r));
        pos += 8 + payload.len();
    }
    (out, pos)
}

/// Where a clean stop leaves the duplicate-suppression keys of its window,
/// for the next start (the journal may no longer hold them).
const RECENT_FILE: &str = "recent";

/// One `D` record per pair: when, then the digest.
fn encode_recent(keys: &[RecentKey]) -> Vec<u8> {
    let mut out = Vec::with_capacity(keys.len() * 33);
    for (digest, at) in keys {
        let mut e = Enc(Vec::with_capacity(25));
        e.u8(b'D');
        e.u64(unix_ms(*at));
        e.0.extend_from_slice(digest);
        frame_parts(&mut out, &e.0, &[]);
    }
    out
}

/// The pairs in a recent file accepted at or after `since`. A file of the
/// relays before digests (`K` records of text keys) counts for nothing:
/// those keys no longer match any.
fn decode_recent(data: &[u8], since: SystemTime) -> Vec<RecentKey> {
    let mut out = Vec::new();
    let mut pos = 0;
    while let Some(payload) = frame_at(data, pos) {
        pos += 8 + payload.len();
        let mut d = Dec(payload);
        let ok = (|| {
            let tag = d.u8()?;
            let at = from_unix_ms(d.u64()?);
            match tag {
                b'D' => {
                    let digest = d.take(16)?.try_into().ok()?;
                    if at >= since {
                        out.push((digest, at));
                    }
                }
                _ => return None,
            }
            Some(())
        })();
        if ok.is_none() {
            break;
        }
    }
    out
}

// ---- state shared by recovery and the writer --------------------------------

#[derive(Default)]
struct Segment {
    /// Messages whose current copy is in this segment, with recipients left.
    live: usize,
    /// Bytes of their records.
    live_bytes: u64,
    /// Bytes of the file.
    bytes: u64,
    /// Segments holding records that this segment's records build on: the
    /// messages its done and retry records speak of, the earlier copies of
    /// the messages it holds copies of. It may not go before they do.
    refs: HashSet<u64>,
}

/// A message with recipients left.
struct Live {
    /// The segment of its current copy.
    segment: u64,
    /// Where that copy's frame starts in the segment, and its length.
    record: u64,
    frame: u32,
    /// Recipients left.
    remaining: usize,
    /// What its done and retry records said since that copy was written:
    /// what a new copy must carry.
    notes: Vec<Note>,
    /// Copied forward since the spool was opened (readers look it up).
    moved: bool,
}

#[derive(Default)]
struct State {
    segments: BTreeMap<u64, Segment>,
    messages: HashMap<String, Live>,
    /// The highest queue ID recovery met, done or not.
    highest_id: Option<String>,
    /// Keyed messages recovery met that were accepted within the dedup
    /// window, done or not.
    recent: Vec<RecentKey>,
}

impl State {
    fn total_bytes(&self) -> u64 {
        self.segments.values().map(|s| s.bytes).sum()
    }

    /// Records a message's copy at `segment`; a later copy of a message
    /// supersedes the earlier one.
    fn add_message(&mut self, id: &str, segment: u64, record: u64, frame: u32, rcpts: usize) {
        if rcpts == 0 {
            return;
        }
        let moved = match self.messages.remove(id) {
            Some(old) => {
                self.forget(&old);
                if old.segment != segment {
                    let s = self.segments.entry(segment).or_default();
                    s.refs.insert(old.segment);
                }
                old.moved
            }
            None => false,
        };
        let s = self.segments.entry(segment).or_default();
        s.live += 1;
        s.live_bytes += u64::from(frame);
        self.messages.insert(
            id.to_string(),
            Live {
                segment,
                record,
                frame,
                remaining: rcpts,
                notes: Vec::new(),
                moved,
            },
        );
    }

    /// Takes a message's copy out of its segment's live count.
    fn forget(&mut self, m: &Live) {
        if let Some(s) = self.segments.get_mut(&m.segment) {
            s.live -= 1;
            s.live_bytes -= u64::from(m.frame);
        }
    }

    /// Applies a done or retry record written to `segment`, which took
    /// `done` recipients off. Returns the message's entry when that
    /// finished it.
    fn apply(&mut self, segment: u64, id: &str, note: &Note, done: usize) -> Option<Live> {
        let m = self.messages.get_mut(id)?;
        if m.segment != segment {
            let target = m.segment;
            self.segments
                .entry(segment)
                .or_default()
                .refs
                .insert(target);
        }
        if note.retry.is_some() {
            // The latest retry of the same recipients replaces the last.
            m.notes
                .retain(|n| n.retry.is_none() || n.peer != note.peer || n.rcpts != note.rcpts);
        }
        m.notes.push(note.clone());
        m.remaining = m.remaining.saturating_sub(done);
        if m.remaining > 0 {
            return None;
        }
        let m = self.messages.remove(id)?;
        self.forget(&m);
        Some(m)
    }

    /// Segments that may go now (never `active`), in an order in which
    /// they may go: none before a segment it builds on.
    fn deletable(&self, active: u64) -> Vec<u64> {
        let mut gone: Vec<u64> = Vec::new();
        let mut set: HashSet<u64> = HashSet::new();
        loop {
            let before = gone.len();
            for (&n, s) in &self.segments {
                if n == active || set.contains(&n) || s.live > 0 {
                    continue;
                }
                let pinned = s
                    .refs
                    .iter()
                    .any(|r| *r != n && self.segments.contains_key(r) && !set.contains(r));
                if !pinned {
                    set.insert(n);
                    gone.push(n);
                }
            }
            if gone.len() == before {
                break;
            }
        }
        gone
    }
}

fn recover(dir: &Path, dedup_window: Duration) -> io::Result<(State, Vec<Recovered>)> {
    let dedup_since = SystemTime::now().checked_sub(dedup_window);
    let started = std::time::Instant::now();
    let mut numbers: Vec<u64> = fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            name.strip_suffix(".log")?.parse().ok()
        })
        .collect();
    numbers.sort_unstable();

    /// A recipient still to do: indexes into its message's jobs.
    struct Left {
        job: usize,
        rcpt: usize,
        attempts: u32,
        next: SystemTime,
    }
    struct Pending {
        message: NewMessage,
        location: Location,
        left: Vec<Left>,
    }
    let mut state = State::default();
    let mut pending: Vec<Pending> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut records = 0usize;
    // One buffer for every segment: no fresh pages per segment.
    let mut data = Vec::new();
    for &n in &numbers {
        let path = dir.join(segment_name(n));
        data.clear();
        File::open(&path)?.read_to_end(&mut data)?;
        let (recs, good) = read_records(&data);
        if good < data.len() {
            warn!(
                "spool: {}: dropping {} bytes of torn or corrupt journal after offset {good}",
                path.display(),
                data.len() - good
            );
            OpenOptions::new()
                .write(true)
                .open(&path)?
                .set_len(good as u64)?;
        }
        state.segments.entry(n).or_default().bytes = good as u64;
        records += recs.len();
        for (record, frame, r) in recs {
            match r {
                Record::Message(m, loc) => {
                    // A copy made by compaction supersedes the earlier one.
                    let earlier = index.get(&m.id).copied();
                    if state.highest_id.as_ref().is_none_or(|h| m.id > *h) {
                        state.highest_id = Some(m.id.clone());
                    }
                    if let (None, Some(key), Some(since)) = (earlier, &m.dedup_key, dedup_since) {
                        if !dedup_window.is_zero() && m.accepted >= since {
                            let pairs = m.jobs.iter().flat_map(|(_, r)| r.iter());
                            state
                                .recent
                                .extend(pairs.map(|r| (crate::dedup::digest(key, r), m.accepted)));
                        }
                    }
                    if loc.segment != n || loc.offset + loc.len as u64 > good as u64 {
                        error!(
                            "spool: message {} points outside segment {n}; dropped",
                            m.id
                        );
                        continue;
                    }
                    let total: usize = m.jobs.iter().map(|(_, r)| r.len()).sum();
                    state.add_message(&m.id, n, record, frame, total);
                    let left = m
                        .jobs
                        .iter()
                        .enumerate()
                        .flat_map(|(job, (_, rs))| {
                            (0..rs.len()).map(move |rcpt| Left {
                                job,
                                rcpt,
                                attempts: 0,
                                next: UNIX_EPOCH,
                            })
                        })
                        .collect();
                    let p = Pending {
                        message: *m,
                        location: loc,
                        left,
                    };
                    match earlier {
                        Some(i) => pending[i] = p,
                        None => {
                            index.insert(p.message.id.clone(), pending.len());
                            pending.push(p);
                        }
                    }
                }
                Record::Mark(Mark { id, note }) => {
                    let Some(p) = index.get(&id).map(|&i| &mut pending[i]) else {
                        continue;
                    };
                    let jobs = &p.message.jobs;
                    let hit = |l: &Left| {
                        jobs[l.job].0 == note.peer && note.rcpts.contains(&jobs[l.job].1[l.rcpt])
                    };
                    let before = p.left.len();
                    match note.retry {
                        None => p.left.retain(|l| !hit(l)),
                        Some((attempts, next)) => {
                            for l in p.left.iter_mut().filter(|l| hit(l)) {
                                l.attempts = attempts;
                                l.next = next;
                            }
                        }
                    }
                    state.apply(n, &id, &note, before - p.left.len());
                }
            }
        }
    }
    drop(index);
    let mut recovered = Vec::new();
    for p in pending {
        if p.left.is_empty() {
            continue;
        }
        let mut jobs: Vec<RecoveredJob> = Vec::new();
        for l in &p.left {
            let (peer, rcpts) = &p.message.jobs[l.job];
            let rcpt = rcpts[l.rcpt].clone();
            match jobs
                .iter_mut()
                .find(|j| &j.peer == peer && j.attempts == l.attempts && j.next == l.next)
            {
                Some(j) => j.rcpts.push(rcpt),
                None => jobs.push(RecoveredJob {
                    peer: peer.clone(),
                    rcpts: vec![rcpt],
                    attempts: l.attempts,
                    next: l.next,
                }),
            }
        }
        recovered.push(Recovered {
            message: p.message,
            location: p.location,
            jobs,
        });
    }
    info!(
        "spool: recovered {} messages ({} jobs) from {} segments, {records} records, in {:.3}s",
        recovered.len(),
        recovered.iter().map(|r| r.jobs.len()).sum::<usize>(),
        numbers.len(),
        started.elapsed().as_secs_f64()
    );
    Ok((state, recovered))
}

// ---- the writer thread -------------------------------------------------------

struct Active {
    number: u64,
    file: File,
    len: u64,
}

/// Where each message copied forward since the spool opened now is.
type Moved = Arc<parking_lot::Mutex<HashMap<String, Location>>>;

/// A compaction under way: the live messages of every segment below
/// `below` are copied forward, a few at a time, so that those segments
/// (and the ones pinned by them) can go.
struct Compaction {
    below: u64,
    /// IDs still to copy, the oldest last.
    todo: Vec<String>,
}

struct Writer {
    opts: SpoolOptions,
    state: State,
    active: Active,
    gauges: Arc<Gauges>,
    /// Done/retry records a failed write could not store; written with the
    /// next batch. They are applied in memory at once, so that a full
    /// disk can still free the segments whose messages are all done.
    unwritten: Vec<Mark>,
    moved: Moved,
    compaction: Option<Compaction>,
    /// Octets appended for new work since the last compaction ended.
    written: u64,
    /// A write or flush to the active segment failed (other than for
    /// space): new records go to a new segment, the old one's tail being
    /// in doubt.
    failed: bool,
}

fn open_segment(dir: &Path, number: u64) -> io::Result<Active> {
    let file = OpenOptions::new()
        .create_new(true)
        .read(true)
        .append(true)
        .mode(0o600)
        .open(dir.join(segment_name(number)))?;
    // The new name must survive a crash before anything in it is acknowledged.
    File::open(dir)?.sync_all()?;
    Ok(Active {
        number,
        file,
        len: 0,
    })
}

/// What woke the writer.
enum Wake {
    Commit(Option<Request>),
    Mark(Option<Request>),
    /// Nothing waiting, and a compaction has work.
    Idle,
}

impl Writer {
    fn start(
        opts: SpoolOptions,
        mut state: State,
        gauges: Arc<Gauges>,
        moved: Moved,
    ) -> io::Result<Writer> {
        let number = state.segments.keys().next_back().map_or(1, |n| n + 1);
        let active = open_segment(&opts.dir, number)?;
        state.segments.insert(number, Segment::default());
        let mut w = Writer {
            // A spool recovered with much dead space compacts at once.
            written: u64::MAX,
            opts,
            state,
            active,
            gauges,
            unwritten: Vec::new(),
            moved,
            compaction: None,
            failed: false,
        };
        w.collect();
        Ok(w)
    }

    /// Wakes for commits, which sessions wait for; marks, which nobody
    /// waits for, are picked up then or every [`MARK_INTERVAL`], so a
    /// delivery does not cost the writer a wake-up of its own. A
    /// compaction goes on a step after each batch, and when idle.
    fn run(&mut self, commits: &Receiver<Request>, marks: &Receiver<Request>) {
        loop {
            let mut batch = Vec::new();
            // A commit is written at once. A mark first gives a commit
            // MARK_INTERVAL to come and take it along. Idle, nothing wakes.
            let wake = if self.compaction.is_some() {
                crossbeam_channel::select! {
                    recv(commits) -> c => Wake::Commit(c.ok()),
                    recv(marks) -> m => Wake::Mark(m.ok()),
                    default => Wake::Idle,
                }
            } else {
                crossbeam_channel::select! {
                    recv(commits) -> c => Wake::Commit(c.ok()),
                    recv(marks) -> m => Wake::Mark(m.ok()),
                }
            };
            let open = match wake {
                Wake::Idle => {
                    self.compact_step();
                    continue;
                }
                Wake::Commit(Some(c)) => {
                    batch.push(c);
                    true
                }
                Wake::Commit(None) => false,
                Wake::Mark(Some(m)) => {
                    batch.push(m);
                    match commits.recv_timeout(MARK_INTERVAL) {
                        Ok(c) => {
                            batch.push(c);
                            true
                        }
                        Err(RecvTimeoutError::Timeout) => true,
                        Err(RecvTimeoutError::Disconnected) => false,
                    }
                }
                // Stopping: the commits channel, closed first, ends the loop.
                Wake::Mark(None) => true,
            };
            while batch.len() < MAX_BATCH {
                match commits.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
            batch.extend(marks.try_iter());
            if !batch.is_empty() {
                self.write_batch(batch);
            }
            if !open {
                break;
            }
            self.compact_step();
        }
        if !self.unwritten.is_empty() {
            // One last try for records a full disk refused earlier.
            self.write_batch(Vec::new());
        }
        if let Err(e) = self.active.file.sync_data() {
            error!("spool: final flush failed: {e}");
        }
    }

    fn write_batch(&mut self, batch: Vec<Request>) {
        let mut buf = Vec::new();
        let mut commits = Vec::new();
        let mut marks = std::mem::take(&mut self.unwritten);
        for mark in &marks {
            frame_parts(&mut buf, &encode_mark(&mark.id, &mark.note), &[]);
        }
        let limit = self.opts.max_bytes;
        for r in batch {
            match r {
                Request::Commit(m, ack) => {
                    let used = self.gauges.bytes.load(Ordering::Acquire) + buf.len() as u64;
                    if limit > 0 && used + m.data.len() as u64 > limit {
                        ack.send(Err(SpoolError::Full));
                        continue;
                    }
                    let mut loc = Location {
                        segment: self.active.number,
                        offset: 0,
                        len: m.data.len() as u32,
                        crc: crc32fast::hash(&m.data),
                    };
                    let record = self.active.len + buf.len() as u64;
                    let mut head = encode_message(&m, &loc);
                    // The data follows the frame header and this head.
                    loc.offset = record + 8 + head.len() as u64;
                    head[M_OFFSET_AT..M_OFFSET_AT + 8].copy_from_slice(&loc.offset.to_le_bytes());
                    frame_parts(&mut buf, &head, &m.data);
                    let frame = (self.active.len + buf.len() as u64 - record) as u32;
                    commits.push((m, loc, record, frame, ack));
                }
                Request::Mark(mark) => {
                    frame_parts(&mut buf, &encode_mark(&mark.id, &mark.note), &[]);
                    marks.push(mark);
                }
            }
        }
        let result = self.append(&buf, !commits.is_empty());
        let mut acks = Vec::with_capacity(commits.len());
        match result {
            Ok(()) => {
                self.written = self.written.saturating_add(buf.len() as u64);
                for (m, loc, record, frame, ack) in commits {
                    let total = m.jobs.iter().map(|(_, r)| r.len()).sum();
                    self.state
                        .add_message(&m.id, loc.segment, record, frame, total);
                    acks.push((ack, Ok(loc)));
                }
                for mark in marks {
                    self.apply(self.active.number, &mark);
                }
            }
            Err(e) => {
                error!("spool: write to segment {} failed: {e}", self.active.number);
                let full = e.raw_os_error() == Some(libc::ENOSPC);
                for (_, _, _, _, ack) in commits {
                    let err = if full {
                        SpoolError::Full
                    } else {
                        SpoolError::Io(io::Error::new(e.kind(), e.to_string()))
                    };
                    acks.push((ack, Err(err)));
                }
                // Deliveries go on; what they record is kept for the next
                // write and counted now, so done segments can still go.
                for mark in marks {
                    if mark.note.retry.is_none() {
                        self.apply(self.active.number, &mark);
                    }
                    if self.state.messages.contains_key(&mark.id) {
                        self.unwritten.push(mark);
                    }
                }
            }
        }
        // Clean up before answering, so that what a caller sees next
        // (bytes(), the files) already reflects this batch.
        self.collect();
        for (ack, result) in acks {
            ack.send(result);
        }
    }

    /// Applies a done or retry record in memory.
    fn apply(&mut self, segment: u64, mark: &Mark) {
        let done = if mark.note.retry.is_none() {
            mark.note.rcpts.len()
        } else {
            0
        };
        if let Some(finished) = self.state.apply(segment, &mark.id, &mark.note, done) {
            if finished.moved {
                self.moved.lock().remove(&mark.id);
            }
        }
    }

    /// Appends and (when `flush`) makes durable; on failure, cuts the
    /// file back to its last good length.
    fn append(&mut self, buf: &[u8], flush: bool) -> io::Result<()> {
        let a = &mut self.active;
        let mut r = a.file.write_all(buf);
        if r.is_ok() && flush && self.opts.sync {
            r = a.file.sync_data();
        }
        match r {
            Ok(()) => {
                a.len += buf.len() as u64;
                self.state.segments.entry(a.number).or_default().bytes = a.len;
                Ok(())
            }
            Err(e) => {
                let _ = a.file.set_len(a.len);
                // A full disk may free up; anything else (EIO, EFBIG...)
                // is left behind with the segment.
                if e.raw_os_error() != Some(libc::ENOSPC) && a.len > 0 {
                    self.failed = true;
                }
                Err(e)
            }
        }
    }

    /// Deletes segments nothing needs; rolls the active one over when it is
    /// large or a write to it failed, or empties it when the whole spool
    /// has drained; starts a compaction when the sealed segments hold more
    /// dead octets than live ones.
    fn collect(&mut self) {
        let active = self.active.number;
        if self.active.len >= self.opts.segment_size || self.failed {
            match open_segment(&self.opts.dir, active + 1) {
                Ok(next) => {
                    if self.failed {
                        warn!(
                            "spool: after a failed write, new records go to segment {}",
                            active + 1
                        );
                        self.failed = false;
                    }
                    if let Err(e) = self.active.file.sync_data() {
                        error!("spool: flush of segment {active} failed: {e}");
                    }
                    self.active = next;
                    self.state.segments.insert(active + 1, Segment::default());
                }
                Err(e) => error!("spool: cannot open segment {}: {e}", active + 1),
            }
        }
        for n in self.state.deletable(self.active.number) {
            let path = self.opts.dir.join(segment_name(n));
            if let Err(e) = fs::remove_file(&path) {
                if e.kind() != io::ErrorKind::NotFound {
                    warn!("spool: cannot remove {}: {e}", path.display());
                }
            }
            self.state.segments.remove(&n);
        }
        if self.state.messages.is_empty() && self.active.len > 0 {
            // Nothing is live anywhere: empty the active segment in place
            // (no new file needed, so this works on a full disk too).
            self.unwritten.clear();
            self.moved.lock().clear();
            match self.active.file.set_len(0) {
                Ok(()) => {
                    self.active.len = 0;
                    self.state
                        .segments
                        .insert(self.active.number, Segment::default());
                }
                Err(e) => error!("spool: cannot empty segment {}: {e}", self.active.number),
            }
        }
        let g = &self.gauges;
        g.bytes.store(self.state.total_bytes(), Ordering::Release);
        let live = self.state.segments.values().map(|s| s.live_bytes).sum();
        g.live_bytes.store(live, Ordering::Release);
        g.segments
            .store(self.state.segments.len() as u64, Ordering::Release);
        self.maybe_compact();
    }

    /// Dead octets the sealed segments may hold before a compaction.
    fn slack(&self) -> u64 {
        let slack = self.opts.segment_size;
        match self.opts.max_bytes {
            0 => slack,
            max => slack.min(max / 4),
        }
    }

    /// Starts a compaction when the sealed segments hold more dead octets
    /// than live ones (and than the slack): copying the live ones forward
    /// then frees at least as much as it writes.
    fn maybe_compact(&mut self) {
        let slack = self.slack();
        if self.compaction.is_some() || self.written < slack {
            return;
        }
        let below = self.active.number;
        let (mut sealed, mut live) = (0u64, 0u64);
        for s in self.state.segments.range(..below).map(|(_, s)| s) {
            sealed += s.bytes;
            live += s.live_bytes;
        }
        let dead = sealed - live.min(sealed);
        if live == 0 || dead <= live.max(slack) {
            return;
        }
        let mut todo: Vec<(u64, u64, &String)> = self
            .state
            .messages
            .iter()
            .filter(|(_, m)| m.segment < below)
            .map(|(id, m)| (m.segment, m.record, id))
            .collect();
        todo.sort_unstable_by(|a, b| b.cmp(a));
        info!(
            "spool: compacting: {} messages ({live} octets) to copy out of segments below {below}, {dead} octets dead",
            todo.len()
        );
        let todo = todo.into_iter().map(|(_, _, id)| id.clone()).collect();
        self.compaction = Some(Compaction { below, todo });
        self.written = 0;
        self.gauges.compactions.fetch_add(1, Ordering::AcqRel);
    }

    /// Copies the next few live messages of a compaction forward, with
    /// what is left of them, in one write and one flush.
    fn compact_step(&mut self) {
        let Some(mut c) = self.compaction.take() else {
            return;
        };
        let mut buf = Vec::new();
        let mut copies: Vec<(String, Location, u64, u32, usize, Vec<Note>)> = Vec::new();
        let mut files: HashMap<u64, File> = HashMap::new();
        while buf.len() < COMPACT_CHUNK {
            let Some(id) = c.todo.pop() else { break };
            let Some(m) = self.state.messages.get(&id).filter(|m| m.segment < c.below) else {
                continue;
            };
            let start = buf.len();
            let record = self.active.len + start as u64;
            match self.copy(&id, m, record, &mut files, &mut buf) {
                Ok((loc, rcpts, notes)) => {
                    let frame = (loc.offset + u64::from(loc.len) - record) as u32;
                    copies.push((id, loc, record, frame, rcpts, notes));
                }
                Err(e) => {
                    buf.truncate(start);
                    error!("spool: cannot copy {id} forward: {e}; left where it is");
                }
            }
        }
        drop(files);
        if !c.todo.is_empty() {
            self.compaction = Some(c);
        } else {
            info!("spool: compaction done");
        }
        if buf.is_empty() {
            return;
        }
        if let Err(e) = self.append(&buf, true) {
            error!("spool: compaction write failed: {e}; stopped");
            self.compaction = None;
            return;
        }
        let segment = self.active.number;
        let mut moved = self.moved.lock();
        for (id, loc, record, frame, rcpts, notes) in copies {
            self.state.add_message(&id, segment, record, frame, rcpts);
            if let Some(m) = self.state.messages.get_mut(&id) {
                m.notes = notes;
                m.moved = true;
            }
            moved.insert(id, loc);
        }
        drop(moved);
        self.collect();
    }

    /// Frames onto `buf` a new copy of message `id` (currently `m`) as it
    /// stands: its `M` record with only the recipients left, then a retry
    /// record for each deferral. Returns the new data location, the
    /// recipients left and the retry notes.
    fn copy(
        &self,
        id: &str,
        m: &Live,
        record: u64,
        files: &mut HashMap<u64, File>,
        buf: &mut Vec<u8>,
    ) -> io::Result<(Location, usize, Vec<Note>)> {
        let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
        let file = match files.entry(m.segment) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(File::open(self.opts.dir.join(segment_name(m.segment)))?)
            }
        };
        let mut frame = vec![0u8; m.frame as usize];
        file.read_exact_at(&mut frame, m.record)?;
        let (mut recs, _) = read_records(&frame);
        let Some((_, _, Record::Message(mut msg, old))) = recs.pop() else {
            return Err(bad("its record does not read back"));
        };
        if msg.id != id {
            return Err(bad("its record names another message"));
        }
        let data = &frame[frame.len() - old.len as usize..];
        let done = |peer: &str, rcpt: &String| {
            m.notes
                .iter()
                .any(|n| n.retry.is_none() && n.peer == peer && n.rcpts.contains(rcpt))
        };
        for (peer, rcpts) in &mut msg.jobs {
            rcpts.retain(|r| !done(peer, r));
        }
        msg.jobs.retain(|(_, r)| !r.is_empty());
        let left: usize = msg.jobs.iter().map(|(_, r)| r.len()).sum();
        if left == 0 {
            return Err(bad("nothing left to copy"));
        }
        let mut loc = Location {
            segment: self.active.number,
            ..old
        };
        let mut head = encode_message(&msg, &loc);
        loc.offset = record + 8 + head.len() as u64;
        head[M_OFFSET_AT..M_OFFSET_AT + 8].copy_from_slice(&loc.offset.to_le_bytes());
        frame_parts(buf, &head, data);
        let mut notes = Vec::new();
        for n in m.notes.iter().filter(|n| n.retry.is_some()) {
            let mut n = n.clone();
            n.rcpts.retain(|r| !done(&n.peer, r));
            if !n.rcpts.is_empty() {
                frame_parts(buf, &encode_mark(id, &n), &[]);
                notes.push(n);
            }
        }
        Ok((loc, left, notes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            crate::dedup::digest("MM4_forward.REQ M1 T1", "x"),
            crate::dedup::digest("MM4_forward.REQ M1 T1", "y"),
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
        spool.done("m1", "A", &["x".into()]);
        spool.retry(
            "m1",
            "B",
            &["z".into()],
            3,
            UNIX_EPOCH + Duration::from_secs(5000),
        );
        spool.done("m2", "A", &["w".into()]);
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
            spool.done(&format!("m{i}"), "A", &["x".into()]);
        }
        // A commit is a barrier: every mark sent before it is applied.
        spool.commit(msg("last", &[("A", &["x"])])).unwrap();
        spool.done("last", "A", &["x".into()]);
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
        spool.done("m", "A", &["x".into()]);
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
            spool.done(&id, "A", &["a".into()]);
            if keep {
                spool.retry(&id, "C", &["x".into(), "y".into()], 2, next);
                if i % 40 == 0 {
                    spool.done(&id, "C", &["y".into()]);
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
}
