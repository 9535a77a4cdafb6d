//! Transactions waiting for their MM4_forward.RES: a forward.REQ that asked
//! for one (`X-Mms-Ack-Request: Yes`) and that a peer took, by transaction
//! ID and peer. A RES answers only the REQs it can be about ([`Answer`]): one
//! from partner P those that went to P, one from the local MMSC to P those
//! that came from P. Bounded: past the cap the soonest due wait of the
//! origin holding the most goes first (counted, and made a `res_missing`
//! row by the ledger), so one sender flooding acks cannot push out the
//! others'. One transaction ID holds a few waits per origin at most, one
//! per message, and a RES answers the oldest it can: a sender repeating an
//! ID cannot grow one wait, nor push out or take another sender's. Fed only
//! by the journal's entries in order, and every choice is ordered (never by
//! hash order), so replaying the same entries gives the same state.

use std::collections::{BTreeMap, BTreeSet, HashMap};

/// How long a RES that came before its REQ's delivery was recorded (a fast
/// partner) waits for it.
pub const EARLY_WINDOW_MS: u64 = 10 * 60 * 1000;
/// Most such early RESs kept.
pub const MAX_EARLY: usize = 10_000;
/// Most waits for one transaction ID from one origin.
pub const PER_TRANSACTION: usize = 16;

/// Which waits a RES can answer.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Answer {
    /// A RES from this partner: the REQs that went to it.
    SentTo(String),
    /// A RES from the local MMSC to this partner: the REQs that came
    /// from it.
    CameFrom(String),
}

impl Answer {
    fn fits(&self, peer: &str, w: &Waiting) -> bool {
        match self {
            Answer::SentTo(p) => p == peer,
            Answer::CameFrom(p) => w.origin.strip_prefix("partner ") == Some(p.as_str()),
        }
    }

    /// As the checkpoint writes it.
    pub fn encode(&self) -> String {
        match self {
            Answer::SentTo(p) => format!("to {p}"),
            Answer::CameFrom(p) => format!("from {p}"),
        }
    }

    /// Reads [`Answer::encode`] back.
    pub fn decode(s: &str) -> Option<Answer> {
        match s.split_once(' ')? {
            ("to", p) => Some(Answer::SentTo(p.into())),
            ("from", p) => Some(Answer::CameFrom(p.into())),
            _ => None,
        }
    }
}

/// A forward.REQ waiting for its RES.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Waiting {
    /// Queue ID of the REQ.
    pub queue_id: String,
    /// Its X-Mms-Message-ID.
    pub message_id: String,
    /// Its envelope sender.
    pub from: String,
    /// Where it came from (`local` or `partner NAME`).
    pub origin: String,
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
    /// The REQs it can answer.
    pub answers: Answer,
}

/// A wait's place: (deadline, journal sequence number), one per wait.
type Place = (u64, u64);

/// An early RES's key: (transaction ID, the REQs it can answer).
type EarlyKey = (String, Answer);

/// One wait and whose it is.
#[derive(Debug)]
struct Slot {
    tid: String,
    peer: String,
    w: Waiting,
}

/// What a wait is given back as: transaction ID, peer, the wait.
pub type Gone = (String, String, Waiting);

/// The waiting transactions.
#[derive(Debug, Default)]
pub struct Tracker {
    /// By deadline: which is due first.
    slots: BTreeMap<Place, Slot>,
    /// Each transaction ID's waits, oldest first.
    by_tid: HashMap<String, Vec<Place>>,
    /// Each origin's waits, by deadline.
    by_origin: HashMap<String, BTreeSet<Place>>,
    /// Early RESs, each with its place in `early_order`.
    early: HashMap<EarlyKey, ((u64, u64), Early)>,
    /// By (accepted, arrival): which goes first.
    early_order: BTreeMap<(u64, u64), EarlyKey>,
    /// Arrivals of early RESs so far (orders ties).
    early_count: u64,
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
        self.slots.len()
    }

    /// Starts the wait of transaction `tid` at `peer` (or widens the one
    /// of the same message); returns what the bounds pushed out.
    pub fn wait(&mut self, tid: &str, peer: &str, w: Waiting) -> Vec<Gone> {
        let mine = self.by_tid.get(tid).cloned().unwrap_or_default();
        for place in &mine {
            let Some(old) = self.slots.get_mut(place) else {
                continue;
            };
            if old.peer == peer && old.w.queue_id == w.queue_id {
                // More recipients of the same message, delivered later.
                for r in w.rcpts {
                    if !old.w.rcpts.contains(&r) {
                        old.w.rcpts.push(r);
                    }
                }
                return Vec::new();
            }
        }
        let mut out = Vec::new();
        let same_origin: Vec<Place> = mine
            .iter()
            .copied()
            .filter(|p| self.slots.get(p).is_some_and(|s| s.w.origin == w.origin))
            .collect();
        if same_origin.len() >= PER_TRANSACTION {
            out.extend(self.remove(same_origin[0]));
        }
        while self.slots.len() >= self.cap {
            let Some(place) = self.heaviest_first() else {
                break;
            };
            out.extend(self.remove(place));
        }
        self.insert(tid, peer, w);
        out
    }

    /// Puts back a wait the checkpoint held, as it was (no bound applies:
    /// they held when it was saved).
    pub fn restore(&mut self, tid: &str, peer: &str, w: Waiting) {
        self.insert(tid, peer, w);
    }

    fn insert(&mut self, tid: &str, peer: &str, w: Waiting) {
        let place = (w.deadline_ms, w.seq);
        if self.slots.contains_key(&place) {
            return;
        }
        let v = self.by_tid.entry(tid.to_string()).or_default();
        let at = v.partition_point(|p| p.1 < place.1);
        v.insert(at, place);
        self.by_origin
            .entry(w.origin.clone())
            .or_default()
            .insert(place);
        let slot = Slot {
            tid: tid.to_string(),
            peer: peer.to_string(),
            w,
        };
        self.slots.insert(place, slot);
    }

    /// The soonest due wait of the origin holding the most (ties to the
    /// first origin by name).
    fn heaviest_first(&self) -> Option<Place> {
        let (_, set) = self
            .by_origin
            .iter()
            .max_by(|a, b| a.1.len().cmp(&b.1.len()).then_with(|| b.0.cmp(a.0)))?;
        set.first().copied()
    }

    fn remove(&mut self, place: Place) -> Option<Gone> {
        let slot = self.slots.remove(&place)?;
        if let Some(v) = self.by_tid.get_mut(&slot.tid) {
            v.retain(|p| *p != place);
            if v.is_empty() {
                self.by_tid.remove(&slot.tid);
            }
        }
        if let Some(set) = self.by_origin.get_mut(&slot.w.origin) {
            set.remove(&place);
            if set.is_empty() {
                self.by_origin.remove(&slot.w.origin);
            }
        }
        Some((slot.tid, slot.peer, slot.w))
    }

    /// Ends the oldest wait of `tid` that a RES can answer.
    pub fn answer(&mut self, tid: &str, by: &Answer) -> Option<(String, Waiting)> {
        let place = *self
            .by_tid
            .get(tid)?
            .iter()
            .find(|p| self.slots.get(p).is_some_and(|s| by.fits(&s.peer, &s.w)))?;
        self.remove(place).map(|(_, p, w)| (p, w))
    }

    /// Ends the oldest wait of `tid` at `peer`.
    pub fn answer_at(&mut self, tid: &str, peer: &str) -> Option<Waiting> {
        self.answer(tid, &Answer::SentTo(peer.to_string()))
            .map(|(_, w)| w)
    }

    /// Ends the wait of message `queue_id` for `tid` at `peer`.
    pub fn give_up(&mut self, tid: &str, peer: &str, queue_id: &str) -> Option<Waiting> {
        let place = *self.by_tid.get(tid)?.iter().find(|p| {
            self.slots
                .get(p)
                .is_some_and(|s| s.peer == peer && s.w.queue_id == queue_id)
        })?;
        self.remove(place).map(|(_, _, w)| w)
    }

    /// The waits due by `now_ms`, soonest first, as (transaction ID, peer,
    /// queue ID): they stay until answered or given up through the journal.
    pub fn due(&self, now_ms: u64) -> Vec<(String, String, String)> {
        self.slots
            .range(..=(now_ms, u64::MAX))
            .map(|(_, s)| (s.tid.clone(), s.peer.clone(), s.w.queue_id.clone()))
            .collect()
    }

    /// Puts back an early RES the checkpoint held, after those before it.
    pub fn restore_early(&mut self, tid: &str, e: Early) {
        self.insert_early(tid, e);
    }

    fn insert_early(&mut self, tid: &str, e: Early) {
        let key = (tid.to_string(), e.answers.clone());
        if self.early.contains_key(&key) {
            return;
        }
        self.early_count += 1;
        let place = (e.at_ms, self.early_count);
        self.early_order.insert(place, key.clone());
        self.early.insert(key, (place, e));
    }

    /// Keeps a RES that came first (the first one, for its transaction ID
    /// and the REQs it can answer), dropping those out of their window
    /// and, past [`MAX_EARLY`], the oldest.
    pub fn early(&mut self, tid: &str, e: Early) {
        while let Some((&(at, n), _)) = self.early_order.first_key_value() {
            if self.early.len() < MAX_EARLY && at + EARLY_WINDOW_MS >= e.at_ms {
                break;
            }
            if let Some(key) = self.early_order.remove(&(at, n)) {
                self.early.remove(&key);
            }
        }
        self.insert_early(tid, e);
    }

    /// A RES that came before the REQ it answers (`w`, sent to `peer`) was
    /// recorded sent: one from `peer`, else one from the local MMSC to the
    /// REQ's partner.
    pub fn take_early(&mut self, tid: &str, peer: &str, w: &Waiting) -> Option<Early> {
        let mut keys = vec![(tid.to_string(), Answer::SentTo(peer.to_string()))];
        if let Some(p) = w.origin.strip_prefix("partner ") {
            keys.push((tid.to_string(), Answer::CameFrom(p.to_string())));
        }
        let key = keys.into_iter().find(|k| {
            self.early
                .get(k)
                .is_some_and(|(_, e)| e.at_ms + EARLY_WINDOW_MS >= w.sent_ms)
        })?;
        let (place, e) = self.early.remove(&key)?;
        self.early_order.remove(&place);
        Some(e)
    }

    /// Every wait, for the checkpoint.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &str, &Waiting)> {
        self.slots
            .values()
            .map(|s| (s.tid.as_str(), s.peer.as_str(), &s.w))
    }

    /// Every early RES, oldest first, for the checkpoint.
    pub fn early_entries(&self) -> impl Iterator<Item = (&str, &Early)> {
        self.early_order
            .values()
            .filter_map(|key| Some((key.0.as_str(), &self.early.get(key)?.1)))
    }

    /// Early RESs kept.
    pub fn early_len(&self) -> usize {
        self.early.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(seq: u64, deadline_ms: u64) -> Waiting {
        wo(seq, deadline_ms, "local")
    }

    fn wo(seq: u64, deadline_ms: u64, origin: &str) -> Waiting {
        Waiting {
            queue_id: format!("q{seq}"),
            message_id: String::new(),
            from: String::new(),
            origin: origin.into(),
            rcpts: vec!["r".into()],
            size: 1,
            sent_ms: 0,
            deadline_ms,
            seq,
        }
    }

    fn to(p: &str) -> Answer {
        Answer::SentTo(p.into())
    }

    fn from(p: &str) -> Answer {
        Answer::CameFrom(p.into())
    }

    #[test]
    fn the_cap_pushes_out_the_soonest_due_and_answers_need_the_right_peer() {
        let mut t = Tracker::new(2);
        assert!(t.wait("T1", "A", w(1, 100)).is_empty());
        assert!(t.wait("T2", "A", w(2, 50)).is_empty());
        let out = t.wait("T3", "B", w(3, 200));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].0, "T2");
        assert_eq!(
            t.due(150),
            [("T1".to_string(), "A".to_string(), "q1".to_string())]
        );
        assert!(t.answer("T3", &to("A")).is_none(), "wrong peer");
        assert!(t.answer("T3", &from("B")).is_none(), "not from B");
        assert_eq!(t.answer("T3", &to("B")).unwrap().0, "B");
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn a_res_of_the_local_mmsc_answers_only_its_partners_req() {
        let mut t = Tracker::new(100);
        // Partner A reuses partner B's transaction ID, first.
        t.wait("T", "LOCAL", wo(1, 100, "partner A"));
        t.wait("T", "LOCAL", wo(2, 100, "partner B"));
        let (_, w) = t.answer("T", &from("B")).unwrap();
        assert_eq!(w.queue_id, "q2", "B's own REQ");
        // A flood of A's REQs with the ID cannot push out B's wait.
        t.wait("T", "LOCAL", wo(3, 100, "partner B"));
        let mut out = Vec::new();
        for seq in 10..(10 + 2 * PER_TRANSACTION as u64) {
            out.extend(t.wait("T", "LOCAL", wo(seq, 100 + seq, "partner A")));
        }
        assert!(out.iter().all(|g| g.2.origin == "partner A"), "{out:?}");
        assert_eq!(t.answer("T", &from("B")).unwrap().1.queue_id, "q3");
    }

    #[test]
    fn the_cap_takes_from_the_origin_holding_the_most() {
        let mut t = Tracker::new(4);
        t.wait("L1", "A", wo(1, 10, "local"));
        t.wait("F1", "A", wo(2, 20, "partner X"));
        t.wait("F2", "A", wo(3, 30, "partner X"));
        t.wait("F3", "A", wo(4, 40, "partner X"));
        // The local wait is due first, but partner X holds three.
        let out = t.wait("F4", "A", wo(5, 50, "partner X"));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].0, "F1");
        assert!(t.answer_at("L1", "A").is_some());
    }

    #[test]
    fn one_transaction_id_holds_a_few_waits_and_a_res_answers_the_oldest() {
        let mut t = Tracker::new(1000);
        // The same message delivered in two parts: one wait.
        t.wait("T", "A", w(1, 100));
        let mut more = w(1, 100);
        more.rcpts = vec!["s".into()];
        more.seq = 2;
        assert!(t.wait("T", "A", more).is_empty());
        assert_eq!(t.len(), 1);
        // Other messages reusing the ID: their own waits, at most a few.
        let mut pushed = Vec::new();
        for seq in 3..(3 + PER_TRANSACTION as u64) {
            pushed.extend(t.wait("T", "A", w(seq, 100 + seq)));
        }
        assert_eq!(t.len(), PER_TRANSACTION);
        assert_eq!(pushed.len(), 1);
        assert_eq!(pushed[0].2.rcpts, ["r", "s"]);
        assert_eq!(t.answer_at("T", "A").unwrap().queue_id, "q3");
        assert!(t.give_up("T", "A", "q5").is_some());
        assert!(t.give_up("T", "A", "q5").is_none(), "once");
    }

    #[test]
    fn an_early_res_is_kept_for_its_req_and_no_longer() {
        let mut t = Tracker::new(10);
        let e = |at_ms, answers| Early {
            status: "Ok".into(),
            text: String::new(),
            at_ms,
            answers,
        };
        t.early("T1", e(1000, to("A")));
        // Another partner's RES with the same ID takes nothing from A's.
        t.early("T1", e(1500, to("B")));
        assert_eq!(t.early_entries().count(), 2);
        let req = |sent_ms| Waiting { sent_ms, ..w(1, 0) };
        assert!(
            t.take_early("T1", "C", &req(1000)).is_none(),
            "another peer"
        );
        assert!(
            t.take_early("T1", "A", &req(1000 + EARLY_WINDOW_MS + 1))
                .is_none()
        );
        assert_eq!(t.take_early("T1", "A", &req(2000)).unwrap().at_ms, 1000);
        assert!(t.take_early("T1", "A", &req(2000)).is_none(), "once");
        assert_eq!(t.take_early("T1", "B", &req(2000)).unwrap().at_ms, 1500);
        // The local MMSC's RES to partner X: for X's REQ to us.
        t.early("T2", e(3000, from("X")));
        let theirs = Waiting {
            origin: "partner X".into(),
            ..req(3000)
        };
        assert!(t.take_early("T2", "LOCAL", &req(3000)).is_none());
        assert!(t.take_early("T2", "LOCAL", &theirs).is_some());
    }

    #[test]
    fn early_res_taken_leave_nothing_behind() {
        let mut t = Tracker::new(10);
        for i in 0..1000u64 {
            let e = Early {
                status: "Ok".into(),
                text: String::new(),
                at_ms: i,
                answers: to("A"),
            };
            t.early(&format!("T{i}"), e);
            let req = Waiting {
                sent_ms: i,
                ..w(i, 0)
            };
            assert!(t.take_early(&format!("T{i}"), "A", &req).is_some());
        }
        assert_eq!((t.early_len(), t.early_order.len()), (0, 0));
    }
}
