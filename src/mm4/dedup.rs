//! Duplicate suppression: which (PDU, recipient) pairs were accepted within
//! `dedup_window`, so a sender that retries after losing our 250 does not
//! make the peer receive the PDU twice.
//!
//! A PDU is named by who sent it (the local MMSC or which partner: one
//! partner must not be able to make another's message a duplicate), its
//! type, X-Mms-Message-ID and X-Mms-Transaction-ID; the IDs are the
//! sender's text, of any length up to the header limit. The window needs
//! equality, not the text, so it keeps a SHA-256 digest of each pair, cut
//! to 128 bits: a 32-octet map entry and a 32-octet place in the pruning
//! order per recipient, some 85-110 octets with the tables' slack
//! (`benches/dedup.rs`), whatever the sender writes. A cryptographic
//! digest, because a collision would drop a real message as a duplicate:
//! no sender may be able to make one. The window holds at most
//! [`MAX_PAIRS`]; past that the oldest pairs go first, so a flood of
//! recipients costs at most that much memory (a pair forgotten early only
//! risks a duplicate delivery, which the receiving MMSC suppresses).

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;

/// A (PDU, recipient) pair as the window keeps it.
pub type Digest = [u8; 16];

/// Most pairs the window holds: about 100 MiB.
pub const MAX_PAIRS: usize = 1_000_000;

/// The key of a PDU as the spool stores it: 32 hex digits of the digest
/// of its sender, type, message ID and transaction ID. They are joined by
/// NUL, which no header value holds (DATA refuses it), so no two
/// different lists of them give the same text.
pub fn pdu_key(origin: &str, pdu: &str, message_id: &str, transaction_id: &str) -> String {
    // The streaming hasher: OpenSSL 3's one-shot SHA256() looks the
    // algorithm up in its providers at every call, which cost more than
    // the hashing.
    let mut h = openssl::sha::Sha256::new();
    for (i, part) in [origin, pdu, message_id, transaction_id].iter().enumerate() {
        if i > 0 {
            h.update(b"\0");
        }
        h.update(part.as_bytes());
    }
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut key = String::with_capacity(32);
    for b in &h.finish()[..16] {
        key.push(char::from(HEX[usize::from(b >> 4)]));
        key.push(char::from(HEX[usize::from(b & 15)]));
    }
    key
}

/// The digest of `rcpt` under the PDU `key`.
pub fn digest(key: &str, rcpt: &str) -> Digest {
    let mut h = openssl::sha::Sha256::new();
    h.update(key.as_bytes());
    h.update(b"\n");
    h.update(rcpt.as_bytes());
    let full = h.finish();
    full[..16].try_into().expect("16 of 32 octets")
}

/// The pairs accepted within the window, and the same in time order for
/// pruning.
#[derive(Default)]
struct Seen {
    at: HashMap<Digest, Instant>,
    order: VecDeque<(Instant, Digest)>,
}

/// Recently accepted (PDU, recipient) pairs.
pub struct Dedup {
    window: Duration,
    seen: Mutex<Seen>,
}

impl Dedup {
    /// An empty window of `window` (zero: suppression off).
    pub fn new(window: Duration) -> Dedup {
        Dedup {
            window,
            seen: Mutex::default(),
        }
    }

    /// True when the window is zero: nothing is kept.
    pub fn is_off(&self) -> bool {
        self.window.is_zero()
    }

    /// True if the PDU `key` was accepted for `rcpt` within the window.
    pub fn seen(&self, key: Option<&str>, rcpt: &str) -> bool {
        let Some(key) = key.filter(|_| !self.is_off()) else {
            return false;
        };
        let d = digest(key, rcpt);
        let mut seen = self.seen.lock();
        let now = Instant::now();
        let Seen { at, order } = &mut *seen;
        while let Some((t, old)) = order.front() {
            if now.duration_since(*t) < self.window {
                break;
            }
            if at.get(old) == Some(t) {
                at.remove(old);
            }
            order.pop_front();
        }
        at.contains_key(&d)
    }

    /// Records the PDU `key` as accepted now for `rcpts`.
    pub fn record(&self, key: Option<&str>, rcpts: &[String]) {
        let Some(key) = key.filter(|_| !self.is_off()) else {
            return;
        };
        let digests: Vec<Digest> = rcpts.iter().map(|r| digest(key, r)).collect();
        self.record_digests(&digests, Instant::now());
    }

    /// Records pairs accepted at `at`; calls come in time order.
    pub fn record_digests(&self, digests: &[Digest], at: Instant) {
        if self.is_off() {
            return;
        }
        let mut seen = self.seen.lock();
        let Seen { at: map, order } = &mut *seen;
        for d in digests {
            map.insert(*d, at);
            order.push_back((at, *d));
        }
        while order.len() > MAX_PAIRS {
            if let Some((t, old)) = order.pop_front() {
                if map.get(&old) == Some(&t) {
                    map.remove(&old);
                }
            }
        }
    }

    /// Every pair still within the window, with when it was accepted by
    /// the wall clock that reads `now` at this instant.
    pub fn export(&self, now: SystemTime) -> Vec<(Digest, SystemTime)> {
        let seen = self.seen.lock();
        let instant = Instant::now();
        seen.at
            .iter()
            .filter(|(_, t)| instant.duration_since(**t) < self.window)
            .map(|(d, t)| {
                let at = now.checked_sub(instant.duration_since(*t)).unwrap_or(now);
                (*d, at)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_name_the_sender_the_pdu_and_the_recipient() {
        let key = pdu_key("partner B", "MM4_forward.REQ", "m-1", "t-1");
        // Keys stored in spools and dedup files stay what they were: the
        // first half of SHA-256 of the NUL-joined parts, in hex.
        assert_eq!(key, "af7546bd7769a6b766ceeab385dcbedf");
        assert_ne!(digest(&key, "a@b"), digest(&key, "a@c"));
        for other in [
            pdu_key("partner C", "MM4_forward.REQ", "m-1", "t-1"),
            pdu_key("partner B", "MM4_forward.RES", "m-1", "t-1"),
            pdu_key("partner B", "MM4_forward.REQ", "m-1", "t-2"),
            // Where one ID ends and the next starts is part of the key.
            pdu_key("partner B", "MM4_forward.REQ", "m-1 t-1", ""),
        ] {
            assert_ne!(key, other);
        }
    }

    #[test]
    fn the_window_holds_at_most_max_pairs_the_oldest_going_first() {
        let d = Dedup::new(Duration::from_secs(3600));
        let key = pdu_key("local", "MM4_forward.REQ", "m", "t");
        let now = Instant::now();
        let digests: Vec<Digest> = (0..MAX_PAIRS as u32 + 10)
            .map(|i| digest(&key, &i.to_string()))
            .collect();
        d.record_digests(&digests, now);
        let seen = d.seen.lock();
        assert_eq!((seen.at.len(), seen.order.len()), (MAX_PAIRS, MAX_PAIRS));
        assert!(!seen.at.contains_key(&digests[0]));
        assert!(seen.at.contains_key(&digests[MAX_PAIRS + 9]));
    }

    #[test]
    fn the_window_holds_pairs_until_it_passes() {
        let d = Dedup::new(Duration::from_secs(60));
        let key = pdu_key("local", "MM4_forward.REQ", "m", "t");
        d.record(Some(&key), &["x".into(), "y".into()]);
        assert!(d.seen(Some(&key), "x") && d.seen(Some(&key), "y"));
        assert!(!d.seen(Some(&key), "z") && !d.seen(None, "x"));
        let old = Instant::now() - Duration::from_secs(61);
        let d = Dedup::new(Duration::from_secs(60));
        d.record_digests(&[digest(&key, "x")], old);
        assert!(!d.seen(Some(&key), "x"), "past the window");
        assert!(d.seen.lock().at.is_empty(), "and pruned");
        let off = Dedup::new(Duration::ZERO);
        off.record(Some(&key), &["x".into()]);
        assert!(!off.seen(Some(&key), "x"));
    }

    #[test]
    fn a_long_id_costs_what_a_short_one_does() {
        let d = Dedup::new(Duration::from_secs(60));
        let long = pdu_key(
            "local",
            "MM4_forward.REQ",
            &"m".repeat(31_000),
            &"t".repeat(31_000),
        );
        let rcpts: Vec<String> = (0..100)
            .map(|i| format!("+4477009{i:05}/TYPE=PLMN@x"))
            .collect();
        d.record(Some(&long), &rcpts);
        assert_eq!(d.seen.lock().at.len(), 100);
        assert_eq!(std::mem::size_of::<(Digest, Instant)>(), 32);
        assert!(rcpts.iter().all(|r| d.seen(Some(&long), r)));
    }
}
