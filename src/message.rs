//! An accepted message and the jobs made from it: one job per destination
//! peer, carrying only that peer's recipients. The message data lives in
//! the spool; a job holds it in memory only while it is in a pool or being
//! delivered, so memory does not grow with the length of the queue.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::mm4::Mm4Info;
use crate::route::PeerId;
use crate::smtp::command::BodyType;

/// A message as accepted: envelope sender, data with our trace header, and
/// what the MM4 check learned.
#[derive(Debug)]
pub struct Message {
    /// Queue ID, unique within this relay's lifetime and across restarts.
    pub id: String,
    /// Envelope sender (`""` for the null sender).
    pub from: String,
    /// Body type to declare to peers (8BITMIME when received with it).
    pub body_type: BodyType,
    /// IDs for the logs and duplicate suppression.
    pub info: Mm4Info,
    /// When it was accepted (wall clock: it survives restarts).
    pub accepted: SystemTime,
    /// After this it is failed instead of retried.
    pub expires: SystemTime,
    /// Where the data (our `Received:` line, then the octets as received)
    /// is in the spool.
    pub location: Location,
}

/// Where a message's data is kept in the spool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    /// Segment number.
    pub segment: u64,
    /// Offset of the data in the segment file.
    pub offset: u64,
    /// Length in octets.
    pub len: u32,
    /// CRC-32 of the data, checked when it is read back.
    pub crc: u32,
}

/// Work for one peer: deliver `message` to `rcpts`.
#[derive(Clone, Debug)]
pub struct Job {
    /// The shared message.
    pub message: Arc<Message>,
    /// The destination peer.
    pub peer: PeerId,
    /// Recipients at that peer.
    pub rcpts: Vec<String>,
    /// Delivery attempts made so far.
    pub attempts: u32,
    /// The message data while the job is in a pool or in flight; `None`
    /// while it waits in the queue manager (read back from the spool).
    pub data: Option<Arc<[u8]>>,
}

/// How long a message that came already expired has for its first
/// attempt.
pub const FIRST_ATTEMPT: Duration = Duration::from_secs(60);

impl Message {
    /// When the queue fails what is left of it, whatever its peers' state:
    /// its expiry; for one that came already expired, [`FIRST_ATTEMPT`]
    /// after its acceptance (its first attempt is still made: the
    /// receiving MMSC enforces X-Mms-Expiry towards its subscriber; only
    /// the retries stop).
    pub fn deadline(&self) -> SystemTime {
        if self.expires > self.accepted {
            self.expires
        } else {
            self.accepted + FIRST_ATTEMPT
        }
    }
}

impl Job {
    /// True if this job's time is up at `now`: past the message's
    /// deadline, or past its expiry once an attempt was made.
    pub fn expired(&self, now: SystemTime) -> bool {
        now >= self.message.deadline() || (self.attempts > 0 && now >= self.message.expires)
    }
}

/// Makes queue IDs: seconds since the epoch at start, then a counter, in
/// hex, so IDs sort by acceptance and do not repeat after a restart.
///
/// The spool keys everything by queue ID, so a restart must never reuse
/// one that is still in it: a restart within the same second, or after
/// the clock stepped back, starts above the highest ID the spool holds.
#[derive(Debug)]
pub struct IdSource {
    epoch: u64,
    next: AtomicU64,
}

/// Hex digits of the seconds part of an ID.
const EPOCH_DIGITS: usize = 9;

impl IdSource {
    /// A source whose IDs all sort above `highest` (the highest ID the
    /// spool holds), and above what the time `now` gives.
    pub fn after(highest: Option<&str>, now: SystemTime) -> IdSource {
        let now = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let taken = highest
            .and_then(|h| h.get(..EPOCH_DIGITS))
            .and_then(|e| u64::from_str_radix(e, 16).ok())
            .map_or(0, |e| e + 1);
        IdSource {
            epoch: now.max(taken),
            next: AtomicU64::new(0),
        }
    }

    /// The next ID.
    pub fn next_id(&self) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        format!("{:09X}{:07X}", self.epoch, n)
    }
}

/// The `Received:` trace line we add (RFC 5321 §4.4), ending in CRLF;
/// `protocol` is its `with` value (RFC 3848: `ESMTPS` and so on).
pub fn received_header(
    helo: &str,
    client_ip: &str,
    hostname: &str,
    protocol: &str,
    id: &str,
    now: SystemTime,
) -> String {
    format!(
        "Received: from {helo} ([{client_ip}])\r\n\tby {hostname} (mm4relay) with {protocol} id {id};\r\n\t{}\r\n",
        crate::mm4::date::format(now)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_and_ordered() {
        let s = IdSource::after(None, SystemTime::now());
        let (a, b) = (s.next_id(), s.next_id());
        assert!(a < b);
        assert_eq!(a.len(), 16);
    }

    #[test]
    fn a_restart_starts_above_the_spool() {
        // Two starts in the same second would give the same IDs, and the
        // spool keys records by ID.
        let first = IdSource::after(None, SystemTime::now());
        let taken = first.next_id();
        let second = IdSource::after(Some(&taken), SystemTime::now());
        assert!(second.next_id() > taken);
        // A clock far behind the spool (stepped back) changes nothing.
        let future = "FFFFFFFF00000005";
        assert!(
            IdSource::after(Some(future), SystemTime::now())
                .next_id()
                .as_str()
                > future
        );
        // Garbage in the spool's highest ID is ignored.
        assert!(
            IdSource::after(Some("zz"), SystemTime::now())
                .next_id()
                .len()
                == 16
        );
    }

    #[test]
    fn received_header_is_folded_crlf() {
        let h = received_header("mmsc", "127.0.0.1", "relay", "ESMTPSA", "ID1", UNIX_EPOCH);
        assert!(h.starts_with("Received: from mmsc ([127.0.0.1])\r\n\tby relay"));
        assert!(h.contains("(mm4relay) with ESMTPSA id ID1;"), "{h}");
        assert!(h.ends_with("+0000\r\n"));
        assert!(h.lines().all(|l| l.len() < 998));
    }
}
