//! Recovery at start: every segment replayed in order, a torn tail cut
//! off, and the messages with recipients left handed back to be queued.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use log::{error, info, warn};

use crate::message::Location;

use super::record::{Record, read_records};
use super::state::State;
use super::{Entry, Mark, NewMessage, Recovered, RecoveredJob, segment_name};

/// A recipient still to do: indexes into its message's jobs.
struct Left {
    job: usize,
    rcpt: usize,
    attempts: u32,
    next: SystemTime,
}

/// A message as replayed so far, with the recipients it has left.
struct Pending {
    message: NewMessage,
    location: Location,
    left: Vec<Left>,
}

/// The replay of the journal, one record after another.
struct Replay {
    state: State,
    pending: Vec<Pending>,
    /// Queue ID to its place in `pending`.
    index: HashMap<String, usize>,
    /// Messages accepted since then still count for duplicates (`None`:
    /// no duplicate window).
    dedup_since: Option<SystemTime>,
    records: usize,
    /// With a journal: the entries after this sequence number are kept.
    from: Option<u64>,
    entries: Vec<Entry>,
}

/// Replays every segment of `dir` in order: the state the writer goes on
/// from, the messages with recipients left, and (with a journal from
/// `from`) the journal's entries.
pub(super) fn recover(
    dir: &Path,
    dedup_window: Duration,
    from: Option<u64>,
) -> io::Result<(State, Vec<Recovered>, Vec<Entry>)> {
    let started = std::time::Instant::now();
    let numbers = segment_numbers(dir)?;
    let mut replay = Replay {
        state: State::default(),
        pending: Vec::new(),
        index: HashMap::new(),
        dedup_since: SystemTime::now()
            .checked_sub(dedup_window)
            .filter(|_| !dedup_window.is_zero()),
        records: 0,
        from,
        entries: Vec::new(),
    };
    // One buffer for every segment: no fresh pages per segment.
    let mut data = Vec::new();
    for &n in &numbers {
        replay.segment(dir, n, &mut data)?;
    }
    let records = replay.records;
    let entries = std::mem::take(&mut replay.entries);
    let (state, recovered) = replay.finish();
    info!(
        "spool: recovered {} messages ({} jobs) from {} segments, {records} records, in {:.3}s",
        recovered.len(),
        recovered.iter().map(|r| r.jobs.len()).sum::<usize>(),
        numbers.len(),
        started.elapsed().as_secs_f64()
    );
    Ok((state, recovered, entries))
}

/// The numbers of the segment files in `dir`, in order.
fn segment_numbers(dir: &Path) -> io::Result<Vec<u64>> {
    let mut numbers: Vec<u64> = fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            name.strip_suffix(".log")?.parse().ok()
        })
        .collect();
    numbers.sort_unstable();
    Ok(numbers)
}

impl Replay {
    /// Replays segment `n`, read into `data`; a torn or corrupt tail is
    /// cut off the file.
    fn segment(&mut self, dir: &Path, n: u64, data: &mut Vec<u8>) -> io::Result<()> {
        let path = dir.join(segment_name(n));
        data.clear();
        File::open(&path)?.read_to_end(data)?;
        let (recs, good) = read_records(data);
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
        self.state.segments.entry(n).or_default().bytes = good as u64;
        self.records += recs.len();
        for (record, frame, r) in recs {
            match r {
                Record::Message(m, loc, seq) => {
                    self.state.saw_seq(n, seq);
                    if self.from.is_some() {
                        let message = Box::new(m.as_ref().clone());
                        self.entries.push(Entry::Accepted {
                            seq,
                            message,
                            location: loc,
                        });
                    }
                    self.message(n, good as u64, record, frame, *m, loc)
                }
                Record::Mark(mark, seq) => {
                    self.state.saw_seq(n, seq);
                    self.mark(n, mark, seq)
                }
                Record::Event(seq, payload) => {
                    self.state.saw_seq(n, seq);
                    if self.from.is_some_and(|f| seq > f) {
                        self.entries.push(Entry::Event { seq, payload });
                    }
                }
            }
        }
        Ok(())
    }

    /// An `M` record at `record` (frame length `frame`) of segment `n`,
    /// whose good part ends at `good`.
    fn message(
        &mut self,
        n: u64,
        good: u64,
        record: u64,
        frame: u32,
        m: NewMessage,
        loc: Location,
    ) {
        // A copy made by compaction supersedes the earlier one.
        let earlier = self.index.get(&m.id).copied();
        if self.state.highest_id.as_ref().is_none_or(|h| m.id > *h) {
            self.state.highest_id = Some(m.id.clone());
        }
        if let (None, Some(key), Some(since)) = (earlier, &m.dedup_key, self.dedup_since) {
            if m.accepted >= since {
                let pairs = m.jobs.iter().flat_map(|(_, r)| r.iter());
                self.state
                    .recent
                    .extend(pairs.map(|r| (crate::mm4::dedup::digest(key, r), m.accepted)));
            }
        }
        if loc.segment != n || loc.offset + loc.len as u64 > good {
            error!(
                "spool: message {} points outside segment {n}; dropped",
                m.id
            );
            return;
        }
        let total: usize = m.jobs.iter().map(|(_, r)| r.len()).sum();
        self.state.add_message(&m.id, n, record, frame, total);
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
            message: m,
            location: loc,
            left,
        };
        match earlier {
            Some(i) => self.pending[i] = p,
            None => {
                self.index.insert(p.message.id.clone(), self.pending.len());
                self.pending.push(p);
            }
        }
    }

    /// A `D` or `R` record of segment `n`, numbered `seq`.
    fn mark(&mut self, n: u64, Mark { id, note }: Mark, seq: u64) {
        if let (Some(outcome), Some(from)) = (&note.outcome, self.from) {
            if seq > from {
                self.entries.push(Entry::Outcome {
                    seq,
                    id: id.clone(),
                    peer: note.peer.clone(),
                    rcpts: note.rcpts.clone(),
                    outcome: outcome.clone(),
                });
            }
        }
        let Some(p) = self.index.get(&id).map(|&i| &mut self.pending[i]) else {
            return;
        };
        let jobs = &p.message.jobs;
        let hit =
            |l: &Left| jobs[l.job].0 == note.peer && note.rcpts.contains(&jobs[l.job].1[l.rcpt]);
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
        let finished = self.state.apply(n, &id, &note, before - p.left.len(), seq);
        if finished.is_some() && self.from.is_some() {
            self.entries.push(Entry::Finished { id });
        }
    }

    /// The state, and every message with recipients left, its recipients
    /// grouped into one job per peer, attempts and next attempt.
    fn finish(self) -> (State, Vec<Recovered>) {
        let recovered = self
            .pending
            .into_iter()
            .filter(|p| !p.left.is_empty())
            .map(|p| Recovered {
                jobs: jobs_left(&p),
                message: p.message,
                location: p.location,
            })
            .collect();
        (self.state, recovered)
    }
}

/// The recipients `p` has left, as jobs.
fn jobs_left(p: &Pending) -> Vec<RecoveredJob> {
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
    jobs
}
