//! The writer thread: the one owner of the segment files. It commits
//! batches with one flush, rolls and deletes segments, and compacts.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError};
use log::{error, info, warn};

use crate::message::Location;

use super::record::{
    M_OFFSET_AT, Record, encode_event, encode_mark, encode_message, frame_hashed, frame_parts,
    read_records,
};
use super::state::{Live, Segment, State};
use super::{
    COMPACT_CHUNK, Entry, Gauges, Journal, MARK_INTERVAL, MAX_BATCH, Mark, Note, Request,
    SpoolError, SpoolOptions, segment_name,
};

struct Active {
    number: u64,
    pub(super) file: File,
    len: u64,
}

/// Where each message copied forward since the spool opened now is.
pub(super) type Moved = Arc<parking_lot::Mutex<HashMap<String, Location>>>;

/// A compaction under way: the live messages of every segment below
/// `below` are copied forward, a few at a time, so that those segments
/// (and the ones pinned by them) can go.
struct Compaction {
    below: u64,
    /// IDs still to copy, the oldest last.
    todo: Vec<String>,
}

pub(super) struct Writer {
    opts: SpoolOptions,
    state: State,
    active: Active,
    gauges: Arc<Gauges>,
    /// Done/retry records a failed write could not store; written with the
    /// next batch. Done records are applied in memory at once, so that a
    /// full disk can still free the segments whose messages are all done.
    unwritten: Vec<Unwritten>,
    pub(super) moved: Moved,
    compaction: Option<Compaction>,
    /// Octets appended for new work since the last compaction ended.
    written: u64,
    /// A write or flush to the active segment failed (other than for
    /// space): new records go to a new segment, the old one's tail being
    /// in doubt.
    failed: bool,
    /// Where durable records go, if anywhere.
    journal: Option<Journal>,
    /// Events a failed write could not store; written with the next batch.
    unwritten_events: Vec<Vec<u8>>,
    /// The sequence number of the next record.
    next_seq: u64,
    /// Entries of records written but not yet flushed: the journal gets
    /// them with the next flush, within [`PUBLISH_WAIT`].
    unpublished: Vec<Entry>,
}

/// A done or retry record a failed write could not store.
struct Unwritten {
    mark: Mark,
    /// Applied in memory already (not again when written).
    applied: bool,
    /// That finished its message (the journal learns it once written).
    finished: bool,
    /// The message's home segment, kept until this is written: the journal
    /// must meet this outcome with its message.
    pin: Option<u64>,
}

/// Longest a done or retry record waits, written but not flushed, before
/// it gets a flush of its own for the journal.
const PUBLISH_WAIT: Duration = Duration::from_millis(50);
/// Largest message data handed to the journal with its record; a larger
/// one goes without (the journal reads it back from the spool).
const FED_DATA: usize = 64 * 1024;

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
    /// Nothing came for a while, and the journal waits for a flush.
    Publish,
}

impl Writer {
    pub(super) fn start(
        opts: SpoolOptions,
        mut state: State,
        gauges: Arc<Gauges>,
        moved: Moved,
        journal: Option<Journal>,
    ) -> io::Result<Writer> {
        let number = state.segments.keys().next_back().map_or(1, |n| n + 1);
        let next_seq = state.max_seq.max(journal.as_ref().map_or(0, |j| j.floor)) + 1;
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
            journal,
            unwritten_events: Vec::new(),
            next_seq,
            unpublished: Vec::new(),
        };
        w.collect();
        Ok(w)
    }

    /// How far the journal has made its rows durable (no journal: all).
    fn checkpoint(&self) -> u64 {
        self.journal
            .as_ref()
            .map_or(u64::MAX, |j| j.checkpoint.load(Ordering::Acquire))
    }

    fn seq(&mut self) -> u64 {
        let s = self.next_seq;
        self.next_seq += 1;
        s
    }

    /// Wakes for commits, which sessions wait for; marks, which nobody
    /// waits for, are picked up then or every [`MARK_INTERVAL`], so a
    /// delivery does not cost the writer a wake-up of its own. A
    /// compaction goes on a step after each batch, and when idle.
    pub(super) fn run(&mut self, commits: &Receiver<Request>, marks: &Receiver<Request>) {
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
            } else if !self.unpublished.is_empty() {
                crossbeam_channel::select! {
                    recv(commits) -> c => Wake::Commit(c.ok()),
                    recv(marks) -> m => Wake::Mark(m.ok()),
                    default(PUBLISH_WAIT) => Wake::Publish,
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
                Wake::Publish => {
                    self.publish_now();
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
        if !self.unwritten.is_empty() || !self.unwritten_events.is_empty() {
            // One last try for records a full disk refused earlier.
            self.write_batch(Vec::new());
        }
        if let Err(e) = self.active.file.sync_data() {
            error!("spool: final flush failed: {e}");
        }
        self.publish_now();
    }

    /// Flushes what is written and hands the journal what waited for it.
    fn publish_now(&mut self) {
        if self.unpublished.is_empty() {
            return;
        }
        if self.opts.sync {
            if let Err(e) = self.active.file.sync_data() {
                // Kept: the next flush that works hands them over.
                error!("spool: flush of segment {} failed: {e}", self.active.number);
                return;
            }
        }
        let entries = std::mem::take(&mut self.unpublished);
        self.send(entries);
    }

    fn send(&self, entries: Vec<Entry>) {
        if let Some(j) = &self.journal {
            if !entries.is_empty() && j.tx.send(entries).is_err() {
                error!("spool: the CDR ledger is gone; its rows come back at the next start");
            }
        }
    }

    fn write_batch(&mut self, batch: Vec<Request>) {
        let mut buf = Vec::new();
        let mut commits = Vec::new();
        let mut marks: Vec<(Unwritten, u64)> = Vec::new();
        let mut events = std::mem::take(&mut self.unwritten_events);
        // What the journal gets once this is durable, in sequence order.
        let mut entries = Vec::new();
        let feed = self.journal.is_some();
        for u in std::mem::take(&mut self.unwritten) {
            let seq = self.seq();
            frame_parts(&mut buf, &encode_mark(&u.mark.id, &u.mark.note, seq), &[]);
            if feed {
                entries.push(outcome_entry(seq, &u.mark));
            }
            marks.push((u, seq));
        }
        for payload in &events {
            let seq = self.seq();
            frame_parts(&mut buf, &encode_event(seq, payload), &[]);
            if feed {
                entries.push(Some(Entry::Event {
                    seq,
                    payload: payload.clone(),
                }));
            }
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
                    let mut data_crc = crc32fast::Hasher::new();
                    data_crc.update(&m.data);
                    let mut loc = Location {
                        segment: self.active.number,
                        offset: 0,
                        len: m.data.len() as u32,
                        crc: data_crc.clone().finalize(),
                    };
                    let record = self.active.len + buf.len() as u64;
                    let seq = self.seq();
                    let mut head = encode_message(&m, &loc, seq);
                    // The data follows the frame header and this head.
                    loc.offset = record + 8 + head.len() as u64;
                    head[M_OFFSET_AT..M_OFFSET_AT + 8].copy_from_slice(&loc.offset.to_le_bytes());
                    frame_hashed(&mut buf, &head, &m.data, &data_crc);
                    let frame = (self.active.len + buf.len() as u64 - record) as u32;
                    // Filled in once durable (the message moves there).
                    entries.push(None);
                    commits.push((m, loc, record, frame, ack, seq, entries.len() - 1));
                }
                Request::Mark(mark) => {
                    let seq = self.seq();
                    frame_parts(&mut buf, &encode_mark(&mark.id, &mark.note, seq), &[]);
                    if feed {
                        entries.push(outcome_entry(seq, &mark));
                    }
                    let u = Unwritten {
                        mark,
                        applied: false,
                        finished: false,
                        pin: None,
                    };
                    marks.push((u, seq));
                }
                Request::Event(payload) => {
                    let seq = self.seq();
                    frame_parts(&mut buf, &encode_event(seq, &payload), &[]);
                    if feed {
                        entries.push(Some(Entry::Event {
                            seq,
                            payload: payload.clone(),
                        }));
                    }
                    events.push(payload);
                }
                Request::Nudge => {}
            }
        }
        // Records the journal is told of must be on disk first: done and
        // retry records alone wait for the next flush (PUBLISH_WAIT at most).
        let flush = !commits.is_empty();
        let result = if buf.is_empty() {
            Ok(())
        } else {
            self.append(&buf, flush)
        };
        let mut acks = Vec::with_capacity(commits.len());
        match result {
            Ok(()) => {
                self.written = self.written.saturating_add(buf.len() as u64);
                let active = self.active.number;
                if !buf.is_empty() {
                    self.state.saw_seq(active, self.next_seq - 1);
                }
                for (m, loc, record, frame, ack, seq, at) in commits {
                    let total = m.jobs.iter().map(|(_, r)| r.len()).sum();
                    self.state
                        .add_message(&m.id, loc.segment, record, frame, total);
                    acks.push((ack, Ok(loc)));
                    if feed {
                        let mut m = m;
                        if m.data.len() > FED_DATA {
                            // The ledger reads a large message back when
                            // it needs it: a stalled ledger's queue holds
                            // no more than this per message.
                            m.data = Arc::from(&[][..]);
                        }
                        entries[at] = Some(Entry::Accepted {
                            seq,
                            message: m,
                            location: loc,
                        });
                    }
                }
                let mut entries: Vec<Entry> = entries.into_iter().flatten().collect();
                for (u, seq) in marks {
                    if let Some(home) = u.pin {
                        if let Some(s) = self.state.segments.get_mut(&home) {
                            s.pins -= 1;
                            s.max_seq = s.max_seq.max(seq);
                        }
                    }
                    let finished = if u.applied {
                        u.finished
                    } else {
                        self.apply(active, &u.mark, seq)
                    };
                    if finished && feed {
                        entries.push(Entry::Finished { id: u.mark.id });
                    }
                }
                if flush || !self.opts.sync {
                    let mut all = std::mem::take(&mut self.unpublished);
                    all.extend(entries);
                    self.send(all);
                } else {
                    // Written, not yet flushed: the journal may not see
                    // them before they are durable.
                    self.unpublished.extend(entries);
                }
            }
            Err(e) => {
                error!("spool: write to segment {} failed: {e}", self.active.number);
                let full = e.raw_os_error() == Some(libc::ENOSPC);
                for (_, _, _, _, ack, _, _) in commits {
                    let err = if full {
                        SpoolError::Full
                    } else {
                        SpoolError::Io(io::Error::new(e.kind(), e.to_string()))
                    };
                    acks.push((ack, Err(err)));
                }
                // Deliveries go on; what they record is kept for the next
                // write and counted now, so done segments can still go.
                // With a journal, every outcome is kept (it is a row), and
                // its message's home segment stays until it is written.
                for (mut u, _) in marks {
                    let outcome = feed && u.mark.note.outcome.is_some();
                    if !u.applied && u.mark.note.retry.is_none() {
                        let home = self.state.messages.get(&u.mark.id).map(|m| m.segment);
                        u.finished = self.apply(self.active.number, &u.mark, 0);
                        u.applied = true;
                        if let (true, Some(home)) = (outcome, home) {
                            if let Some(s) = self.state.segments.get_mut(&home) {
                                s.pins += 1;
                                u.pin = Some(home);
                            }
                        }
                    }
                    if outcome || self.state.messages.contains_key(&u.mark.id) {
                        self.unwritten.push(u);
                    }
                }
                self.unwritten_events = events;
            }
        }
        // Clean up before answering, so that what a caller sees next
        // (bytes(), the files) already reflects this batch.
        self.collect();
        for (ack, result) in acks {
            ack.send(result);
        }
    }

    /// Applies a done or retry record in memory; true when that finished
    /// its message.
    pub(super) fn apply(&mut self, segment: u64, mark: &Mark, seq: u64) -> bool {
        let done = if mark.note.retry.is_none() {
            mark.note.rcpts.len()
        } else {
            0
        };
        match self.state.apply(segment, &mark.id, &mark.note, done, seq) {
            Some(finished) => {
                if finished.moved {
                    self.moved.lock().remove(&mark.id);
                }
                true
            }
            None => false,
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
        let checkpoint = self.checkpoint();
        for n in self.state.deletable(self.active.number, checkpoint) {
            let path = self.opts.dir.join(segment_name(n));
            if let Err(e) = fs::remove_file(&path) {
                if e.kind() != io::ErrorKind::NotFound {
                    warn!("spool: cannot remove {}: {e}", path.display());
                }
            }
            self.state.segments.remove(&n);
        }
        // With a journal, outcomes not yet written hold the spool as it is.
        let held = self.journal.is_some() && !self.unwritten.is_empty();
        if self.state.messages.is_empty()
            && self.active.len > 0
            && self.state.max_seq <= checkpoint
            && !held
        {
            // Nothing is live anywhere, and the journal has it all: empty
            // the active segment in place (no new file needed, so this
            // works on a full disk too).
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
        let Some((_, _, Record::Message(mut msg, old, seq))) = recs.pop() else {
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
        let mut head = encode_message(&msg, &loc, seq);
        loc.offset = record + 8 + head.len() as u64;
        head[M_OFFSET_AT..M_OFFSET_AT + 8].copy_from_slice(&loc.offset.to_le_bytes());
        frame_parts(buf, &head, data);
        let mut notes = Vec::new();
        for n in m.notes.iter().filter(|n| n.retry.is_some()) {
            let mut n = n.clone();
            n.rcpts.retain(|r| !done(&n.peer, r));
            if !n.rcpts.is_empty() {
                frame_parts(buf, &encode_mark(id, &n, 0), &[]);
                notes.push(n);
            }
        }
        Ok((loc, left, notes))
    }
}

/// The journal's entry for a done or retry record numbered `seq`.
fn outcome_entry(seq: u64, mark: &Mark) -> Option<Entry> {
    mark.note.outcome.as_ref().map(|o| Entry::Outcome {
        seq,
        id: mark.id.clone(),
        peer: mark.note.peer.clone(),
        rcpts: mark.note.rcpts.clone(),
        outcome: o.clone(),
    })
}
