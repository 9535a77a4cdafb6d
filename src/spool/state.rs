//! What recovery finds and the writer keeps up to date: the segments,
//! the live messages in them, and which segment may go when.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::{Note, RecentKey};

#[derive(Default)]
pub(super) struct Segment {
    /// Messages whose current copy is in this segment, with recipients left.
    live: usize,
    /// Bytes of their records.
    pub(super) live_bytes: u64,
    /// Bytes of the file.
    pub(super) bytes: u64,
    /// Segments holding records that this segment's records build on: the
    /// messages its done and retry records speak of, the earlier copies of
    /// the messages it holds copies of. It may not go before they do.
    refs: HashSet<u64>,
    /// The highest sequence number of its records: it may not go before
    /// the journal's checkpoint has passed it. A message's home segment
    /// also takes the numbers of its done and retry records, so that a
    /// replay never meets an outcome without its message.
    pub(super) max_seq: u64,
    /// Done records of its messages that a failed write could not store
    /// yet: it may not go before they are written.
    pub(super) pins: usize,
}

/// A message with recipients left.
pub(super) struct Live {
    /// The segment of its current copy.
    pub(super) segment: u64,
    /// Where that copy's frame starts in the segment, and its length.
    pub(super) record: u64,
    pub(super) frame: u32,
    /// Recipients left.
    remaining: usize,
    /// What its done and retry records said since that copy was written:
    /// what a new copy must carry.
    pub(super) notes: Vec<Note>,
    /// Copied forward since the spool was opened (readers look it up).
    pub(super) moved: bool,
}

#[derive(Default)]
pub(super) struct State {
    pub(super) segments: BTreeMap<u64, Segment>,
    pub(super) messages: HashMap<String, Live>,
    /// The highest queue ID recovery met, done or not.
    pub(super) highest_id: Option<String>,
    /// Keyed messages recovery met that were accepted within the dedup
    /// window, done or not.
    pub(super) recent: Vec<RecentKey>,
    /// The highest sequence number met.
    pub(super) max_seq: u64,
}

impl State {
    /// Notes a record numbered `seq` in `segment`.
    pub(super) fn saw_seq(&mut self, segment: u64, seq: u64) {
        let s = self.segments.entry(segment).or_default();
        s.max_seq = s.max_seq.max(seq);
        self.max_seq = self.max_seq.max(seq);
    }

    pub(super) fn total_bytes(&self) -> u64 {
        self.segments.values().map(|s| s.bytes).sum()
    }

    /// Records a message's copy at `segment`; a later copy of a message
    /// supersedes the earlier one.
    pub(super) fn add_message(
        &mut self,
        id: &str,
        segment: u64,
        record: u64,
        frame: u32,
        rcpts: usize,
    ) {
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

    /// Applies a done or retry record numbered `seq` (0: none yet) written
    /// to `segment`, which took `done` recipients off. Returns the
    /// message's entry when that finished it.
    pub(super) fn apply(
        &mut self,
        segment: u64,
        id: &str,
        note: &Note,
        done: usize,
        seq: u64,
    ) -> Option<Live> {
        let m = self.messages.get_mut(id)?;
        if let Some(home) = self.segments.get_mut(&m.segment) {
            home.max_seq = home.max_seq.max(seq);
        }
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

    /// Segments that may go now (never `active`, none with a record past
    /// `checkpoint`), in an order in which they may go: none before a
    /// segment it builds on.
    pub(super) fn deletable(&self, active: u64, checkpoint: u64) -> Vec<u64> {
        let mut gone: Vec<u64> = Vec::new();
        let mut set: HashSet<u64> = HashSet::new();
        loop {
            let before = gone.len();
            for (&n, s) in &self.segments {
                if n == active
                    || set.contains(&n)
                    || s.live > 0
                    || s.pins > 0
                    || s.max_seq > checkpoint
                {
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
