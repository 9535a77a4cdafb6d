//! Answers kept for their TTL: records for the smallest TTL among them,
//! a name that does not exist or has no such record for the SOA minimum
//! (RFC 2308). Bounded: at most 20,000 names, each answer at most
//! `MAX_RECORDS` records; a flood of invented names pushes out the
//! entries that expire soonest.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::rr::RecordType;

use super::Answer;

/// Most names (with their type) kept.
pub(super) const MAX_ENTRIES: usize = 20_000;

/// Longest any answer is kept, whatever its TTL says.
pub(super) const MAX_TTL: Duration = Duration::from_secs(86_400);

/// How long a negative answer is kept when it carries no SOA.
pub(super) const NEGATIVE_TTL: Duration = Duration::from_secs(60);

/// The cache: (lower-case name, type) to an answer (or what was made of
/// one) and when it expires.
#[derive(Debug)]
pub(super) struct Cache<V = Answer> {
    entries: HashMap<(String, RecordType), (Instant, Arc<V>)>,
}

impl<V> Default for Cache<V> {
    fn default() -> Self {
        Cache {
            entries: HashMap::new(),
        }
    }
}

impl<V> Cache<V> {
    /// The answer for `name` and `rtype` while it is fresh at `now`, and
    /// when it expires.
    pub(super) fn get(
        &self,
        name: &str,
        rtype: RecordType,
        now: Instant,
    ) -> Option<(Arc<V>, Instant)> {
        self.entries
            .get(&(name.to_string(), rtype))
            .filter(|(expires, _)| *expires > now)
            .map(|(e, a)| (a.clone(), *e))
    }

    /// Keeps `answer` for `ttl` from `now` (nothing is kept for a TTL of 0).
    /// When full, the expired entries go, and then the ones that expire
    /// soonest.
    pub(super) fn put(
        &mut self,
        name: &str,
        rtype: RecordType,
        answer: Arc<V>,
        ttl: Duration,
        now: Instant,
    ) {
        if ttl.is_zero() {
            return;
        }
        if self.entries.len() >= MAX_ENTRIES {
            self.entries.retain(|_, (expires, _)| *expires > now);
        }
        if self.entries.len() >= MAX_ENTRIES {
            let mut by_expiry: Vec<Instant> = self.entries.values().map(|(e, _)| *e).collect();
            by_expiry.sort_unstable();
            let cut = by_expiry[MAX_ENTRIES / 4];
            self.entries.retain(|_, (expires, _)| *expires > cut);
        }
        self.entries
            .insert((name.to_string(), rtype), (now + ttl.min(MAX_TTL), answer));
    }

    /// Entries held.
    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_answers_only_and_a_bounded_size() {
        let mut c: Cache = Cache::default();
        let now = Instant::now();
        let a = Arc::new(Answer::NxDomain);
        c.put(
            "a.test",
            RecordType::MX,
            a.clone(),
            Duration::from_secs(5),
            now,
        );
        c.put("b.test", RecordType::MX, a.clone(), Duration::ZERO, now);
        assert!(c.get("a.test", RecordType::MX, now).is_some());
        assert!(c.get("a.test", RecordType::A, now).is_none());
        assert!(c.get("b.test", RecordType::MX, now).is_none());
        assert!(
            c.get("a.test", RecordType::MX, now + Duration::from_secs(5))
                .is_none()
        );
        for i in 0..MAX_ENTRIES + 10 {
            let ttl = Duration::from_secs(10 + i as u64);
            c.put(&format!("n{i}.test"), RecordType::A, a.clone(), ttl, now);
        }
        assert!(c.len() <= MAX_ENTRIES);
        let last = format!("n{}.test", MAX_ENTRIES + 9);
        assert!(c.get(&last, RecordType::A, now).is_some());
    }
}
