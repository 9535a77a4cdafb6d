//! An accepted message and the jobs made from it: one job per destination
//! peer, carrying only that peer's recipients and sharing the message data.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

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
    /// The message data: our `Received:` line, then the octets as received.
    pub data: Vec<u8>,
    /// IDs for the logs.
    pub info: Mm4Info,
    /// When it was accepted, for the delay in log lines.
    pub accepted: Instant,
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
}

/// Makes queue IDs: seconds since the epoch at start, then a counter, in
/// hex, so IDs sort by acceptance and do not repeat after a restart.
#[derive(Debug)]
pub struct IdSource {
    epoch: u64,
    next: AtomicU64,
}

impl IdSource {
    /// A source seeded with the current time.
    pub fn new() -> IdSource {
        let epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        IdSource {
            epoch,
            next: AtomicU64::new(0),
        }
    }

    /// The next ID.
    pub fn next_id(&self) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        format!("{:09X}{:07X}", self.epoch, n)
    }
}

impl Default for IdSource {
    fn default() -> Self {
        IdSource::new()
    }
}

/// The `Received:` trace line we add (RFC 5321 §4.4), ending in CRLF.
pub fn received_header(
    helo: &str,
    client_ip: &str,
    hostname: &str,
    id: &str,
    now: SystemTime,
) -> String {
    format!(
        "Received: from {helo} ([{client_ip}])\r\n\tby {hostname} (mm4relay) with ESMTP id {id};\r\n\t{}\r\n",
        rfc5322_date(now)
    )
}

/// A date such as `Thu, 26 Nov 2026 03:26:51 +0000`, in UTC.
pub fn rfc5322_date(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{}, {:02} {} {} {:02}:{:02}:{:02} +0000",
        WEEKDAYS[(days % 7) as usize],
        day,
        MONTHS[(month - 1) as usize],
        year,
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn formats_dates() {
        let t = UNIX_EPOCH + Duration::from_secs(1_795_663_611);
        assert_eq!(rfc5322_date(t), "Thu, 26 Nov 2026 03:26:51 +0000");
        assert_eq!(rfc5322_date(UNIX_EPOCH), "Thu, 01 Jan 1970 00:00:00 +0000");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc5322_date(leap), "Tue, 29 Feb 2000 00:00:00 +0000");
    }

    #[test]
    fn ids_are_unique_and_ordered() {
        let s = IdSource::new();
        let (a, b) = (s.next_id(), s.next_id());
        assert!(a < b);
        assert_eq!(a.len(), 16);
    }

    #[test]
    fn received_header_is_folded_crlf() {
        let h = received_header("mmsc", "127.0.0.1", "relay", "ID1", UNIX_EPOCH);
        assert!(h.starts_with("Received: from mmsc ([127.0.0.1])\r\n\tby relay"));
        assert!(h.ends_with("+0000\r\n"));
        assert!(h.lines().all(|l| l.len() < 998));
    }
}
