//! Transactions waiting for their MM4_forward.RES: a forward.REQ that asked
//! for one (`X-Mms-Ack-Request: Yes`) and that a peer took, by transaction
//! ID and peer. Bounded: past the cap the oldest goes first (counted, and
//! made a `res_missing` row by the ledger). Fed only by the journal's
//! entries in order, so replaying the same entries gives the same state.

use std::collections::{BTreeMap, HashMap, VecDeque};

/// How long a RES that came before its REQ's delivery was recorded (a fast
/// partner) waits for it.
pub const EARLY_WINDOW_MS: u64 = 10 * 60 * 1000;
/// Most such early RESs kept.
pub const MAX_EARLY: usize = 10_000;

/// A forward.REQ waiting for its RES.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Waiting {
    /// Queue ID of the REQ.
    pub queue_id: String,
    /// Its X-Mms-Message-ID.
    pub message_id: String,
    /// Its envelope sender.
    pub from: String,
    /// The recipients the peer took.
    pub rcpts: Vec<String>,
    /// Its size.
    pub size: u64,
    /// When the peer took it (ms since the epoch).
    pub sent_ms: u64,
    /// When the RES is due.
    pub deadline_ms: u64,
    /// The journal sequence number that started the wait (orders ties).
    pub seq: u64,
}

/// A RES seen before its REQ's delivery was recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Early {
    /// Its X-Mms-Request-Status-Code.
    pub status: String,
    /// Its X-Mms-Status-Text.
    pub text: String,
    /// When it was accepted (ms since the epoch).
    pub at_ms: u64,
    /// The partner it came from, if a known one.
    pub origin: Option<String>,
}

/// Key: (transaction ID, peer).
type Key = (String, String);

/// The waiting transactions.
#[derive(Debug, Default)]
pub struct Tracker {
    waiting: HashMap<Key, Waiting>,
    /// By deadline: which is due first (and goes first past the cap).
    order: BTreeMap<(u64, u64), Key>,
    early: HashMap<String, Early>,
    early_order: VecDeque<(u64, String)>,
    /// Most transactions waiting.
    pub cap: usize,
}

impl Tracker {
    /// An empty tracker holding at most `cap`.
    pub fn new(cap: usize) -> Tracker {
        Tracker {
            cap: cap.max(1),
            ..Tracker::default()
        }
    }

    /// Transactions waiting.
    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    /// Starts (or widens) the wait of transaction `tid` at `peer`; returns
    /// what the cap pushed out, oldest first.
    pub fn wait(&mut self, tid: &str, peer: &str, w: Waiting) -> Vec<(String, String, Waiting)> {
        let key = (tid.to_string(), peer.to_string());
        if let Some(old) = self.waiting.get_mut(&key) {
            // More recipients of the same transaction, delivered later.
            for r in w.rcpts {
                if !old.rcpts.contains(&r) {
                    old.rcpts.push(r);
                }
            }
            return Vec::new();
        }
        let mut out = Vec::new();
        while self.waiting.len() >= self.cap {
            let Some((_, k)) = self.order.pop_first() else {
                break;
            };
            if let Some(gone) = self.waiting.remove(&k) {
                out.push((k.0, k.1, gone));
            }
        }
        self.order.insert((w.deadline_ms, w.seq), key.clone());
        self.waiting.insert(key, w);
        out
    }

    /// Ends the wait of `tid`: at `peer` if given, else at the one peer
    /// waiting for it (none if several are: a RES must say which).
    pub fn answer(&mut self, tid: &str, peer: Option<&str>) -> Option<(String, Waiting)> {
        let peer = match peer {
            Some(p) => p.to_string(),
            None => {
                let mut peers = self.waiting.keys().filter(|k| k.0 == tid).map(|k| &k.1);
                let p = peers.next()?.clone();
                if peers.next().is_some() {
                    return None;
                }
                p
            }
        };
        let key = (tid.to_string(), peer);
        let w = self.waiting.remove(&key)?;
        self.order.remove(&(w.deadline_ms, w.seq));
        Some((key.1, w))
    }

    /// The waits due by `now_ms`, soonest first (they stay until answered
    /// or given up through the journal).
    pub fn due(&self, now_ms: u64) -> Vec<(String, String)> {
        self.order
            .range(..=(now_ms, u64::MAX))
            .map(|(_, k)| k.clone())
            .collect()
    }

    /// Keeps a RES that came first.
    pub fn early(&mut self, tid: &str, e: Early) {
        while let Some((at, _)) = self.early_order.front() {
            if self.early_order.len() < MAX_EARLY && at + EARLY_WINDOW_MS >= e.at_ms {
                break;
            }
            if let Some((_, t)) = self.early_order.pop_front() {
                self.early.remove(&t);
            }
        }
        if self.early.insert(tid.to_string(), e.clone()).is_none() {
            self.early_order.push_back((e.at_ms, tid.to_string()));
        }
    }

    /// A RES that came before the REQ it answers was recorded sent at
    /// `sent_ms` to `peer`.
    pub fn take_early(&mut self, tid: &str, peer: &str, sent_ms: u64) -> Option<Early> {
        let e = self.early.get(tid)?;
        let fits =
            e.origin.as_deref().is_none_or(|o| o == peer) && e.at_ms + EARLY_WINDOW_MS >= sent_ms;
        if !fits {
            return None;
        }
        self.early.remove(tid)
    }

    /// Every wait, for the checkpoint.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &str, &Waiting)> {
        self.waiting
            .iter()
            .map(|((t, p), w)| (t.as_str(), p.as_str(), w))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(seq: u64, deadline_ms: u64) -> Waiting {
        Waiting {
            queue_id: format!("q{seq}"),
            message_id: String::new(),
            from: String::new(),
            rcpts: vec!["r".into()],
            size: 1,
            sent_ms: 0,
            deadline_ms,
            seq,
        }
    }

    #[test]
    fn the_cap_pushes_out_the_soonest_due_and_answers_need_the_right_peer() {
        let mut t = Tracker::new(2);
        assert!(t.wait("T1", "A", w(1, 100)).is_empty());
        assert!(t.wait("T2", "A", w(2, 50)).is_empty());
        let out = t.wait("T3", "B", w(3, 200));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].0, "T2");
        assert_eq!(t.due(150), [("T1".to_string(), "A".to_string())]);
        assert!(t.answer("T3", Some("A")).is_none(), "wrong peer");
        assert_eq!(t.answer("T3", None).unwrap().0, "B");
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn an_early_res_is_kept_for_its_req_and_no_longer() {
        let mut t = Tracker::new(10);
        let e = |at_ms| Early {
            status: "Ok".into(),
            text: String::new(),
            at_ms,
            origin: Some("A".into()),
        };
        t.early("T1", e(1000));
        assert!(t.take_early("T1", "B", 1000).is_none(), "another peer");
        assert!(
            t.take_early("T1", "A", 1000 + EARLY_WINDOW_MS + 1)
                .is_none()
        );
        assert!(t.take_early("T1", "A", 2000).is_some());
        assert!(t.take_early("T1", "A", 2000).is_none(), "once");
    }
}
