//! What the ledger keeps beside the spool's records: the accounting facts
//! of an accepted message (in its `M` record's `account` field) and the
//! events it journals (`E` records). Tab-separated text, every field
//! cleaned of control characters, so nothing a client sent can shift a
//! field.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::mm4::{Mm4Info, Pdu};

/// Longest header value kept (a status code, a status text).
const MAX_VALUE: usize = 128;

/// The accounting facts of an accepted message.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Facts {
    /// `X-Mms-Message-Type`, as the PDU's name (empty: none).
    pub pdu: String,
    /// `X-Mms-Ack-Request: Yes`.
    pub ack: bool,
    /// `X-Mms-Delivery-Report: Yes`.
    pub report: bool,
    /// `X-Mms-Request-Status-Code` (a RES) or `X-Mms-MM-Status-Code` (a
    /// delivery report).
    pub status: String,
    /// `X-Mms-Status-Text`.
    pub status_text: String,
    /// Where it came from: `local`, `partner NAME` or `unknown`.
    pub origin: String,
    /// The client's address.
    pub client: String,
}

fn tidy(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .take(MAX_VALUE)
        .collect()
}

impl Facts {
    /// The facts of a message the MM4 check read as `info`.
    pub fn of(info: &Mm4Info, origin: &str, client: &str) -> Facts {
        Facts {
            pdu: info.pdu.map_or(String::new(), |p| p.name().to_string()),
            ack: info.ack_request,
            report: info.delivery_report,
            status: tidy(info.status.as_deref().unwrap_or("")),
            status_text: tidy(info.status_text.as_deref().unwrap_or("")),
            origin: tidy(origin),
            client: tidy(client),
        }
    }

    /// As the `M` record keeps them.
    pub fn encode(&self) -> String {
        [
            self.pdu.as_str(),
            if self.ack { "Y" } else { "N" },
            if self.report { "Y" } else { "N" },
            &self.status,
            &self.status_text,
            &self.origin,
            &self.client,
        ]
        .join("\t")
    }

    /// Reads them back (what is missing stays empty).
    pub fn decode(s: &str) -> Facts {
        let mut f = s.split('\t');
        let mut next = || f.next().unwrap_or("").to_string();
        Facts {
            pdu: next(),
            ack: next() == "Y",
            report: next() == "Y",
            status: next(),
            status_text: next(),
            origin: next(),
            client: next(),
        }
    }

    /// True for an MM4_forward.REQ.
    pub fn is(&self, pdu: Pdu) -> bool {
        self.pdu == pdu.name()
    }
}

/// An event the ledger journals, to be made a row once durable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A PDU answered 250 as a duplicate and not queued: one per recipient.
    Duplicate {
        /// When.
        at: SystemTime,
        /// The envelope sender.
        from: String,
        /// The recipient.
        to: String,
        /// The peer it would have gone to.
        peer: String,
        /// X-Mms-Transaction-ID.
        transaction_id: String,
        /// X-Mms-Message-ID.
        message_id: String,
        /// Its size.
        size: u64,
        /// Its facts.
        facts: Box<Facts>,
    },
    /// No MM4_forward.RES came for the transaction sent to the peer in time.
    ResMissing {
        /// When the ledger gave up waiting.
        at: SystemTime,
        /// X-Mms-Transaction-ID.
        transaction_id: String,
        /// The peer.
        peer: String,
        /// The REQ's queue ID (empty in records of versions before it).
        queue_id: String,
    },
}

fn ms(t: SystemTime) -> String {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
        .to_string()
}

fn from_ms(s: &str) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(s.parse().unwrap_or(0))
}

impl Event {
    /// As the `E` record keeps it.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Event::Duplicate {
                at,
                from,
                to,
                peer,
                transaction_id,
                message_id,
                size,
                facts,
            } => [
                "duplicate",
                &ms(*at),
                &tidy_long(from),
                &tidy_long(to),
                &tidy(peer),
                &tidy_long(transaction_id),
                &tidy_long(message_id),
                &size.to_string(),
                &facts.encode(),
            ]
            .join("\t"),
            Event::ResMissing {
                at,
                transaction_id,
                peer,
                queue_id,
            } => [
                "res_missing",
                &ms(*at),
                &tidy_long(transaction_id),
                &tidy(peer),
                &tidy(queue_id),
            ]
            .join("\t"),
        }
        .into_bytes()
    }

    /// Reads one back; `None` for anything this version does not know.
    pub fn decode(payload: &[u8]) -> Option<Event> {
        let s = std::str::from_utf8(payload).ok()?;
        let f: Vec<&str> = s.splitn(9, '\t').collect();
        match *f.first()? {
            "duplicate" if f.len() == 9 => Some(Event::Duplicate {
                at: from_ms(f[1]),
                from: f[2].into(),
                to: f[3].into(),
                peer: f[4].into(),
                transaction_id: f[5].into(),
                message_id: f[6].into(),
                size: f[7].parse().unwrap_or(0),
                facts: Box::new(Facts::decode(f[8])),
            }),
            "res_missing" if (4..=5).contains(&f.len()) => Some(Event::ResMissing {
                at: from_ms(f[1]),
                transaction_id: f[2].into(),
                peer: f[3].into(),
                queue_id: f.get(4).map_or("", |q| q).into(),
            }),
            _ => None,
        }
    }
}

/// An address or ID without control characters (tabs included), whole.
fn tidy_long(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn facts_and_events_read_back_and_tabs_cannot_shift_a_field() {
        let facts = Facts {
            pdu: "MM4_forward.REQ".into(),
            ack: true,
            report: false,
            status: "Ok\tY".into(),
            status_text: String::new(),
            origin: "partner b".into(),
            client: "10.0.0.1".into(),
        };
        let clean = Facts::decode(
            &Facts {
                status: tidy(&facts.status),
                ..facts.clone()
            }
            .encode(),
        );
        assert_eq!(clean.status, "Ok?Y");
        assert_eq!(clean.origin, "partner b");
        let e = Event::Duplicate {
            at: UNIX_EPOCH + Duration::from_millis(1234),
            from: "a\t@b".into(),
            to: "+1/TYPE=PLMN@x".into(),
            peer: "B".into(),
            transaction_id: "T1".into(),
            message_id: "M1".into(),
            size: 77,
            facts: Box::new(facts.clone()),
        };
        let Some(Event::Duplicate { from, size, at, .. }) = Event::decode(&e.encode()) else {
            panic!("does not read back");
        };
        assert_eq!((from.as_str(), size), ("a?@b", 77));
        assert_eq!(at, UNIX_EPOCH + Duration::from_millis(1234));
        assert!(Event::decode(b"nonsense\t1").is_none());
        let missing = Event::ResMissing {
            at: UNIX_EPOCH,
            transaction_id: "T\t1".into(),
            peer: "B".into(),
            queue_id: "Q1".into(),
        };
        let Some(Event::ResMissing {
            transaction_id,
            queue_id,
            ..
        }) = Event::decode(&missing.encode())
        else {
            panic!("does not read back");
        };
        assert_eq!((transaction_id.as_str(), queue_id.as_str()), ("T?1", "Q1"));
        // As versions before the queue ID wrote it.
        let Some(Event::ResMissing { queue_id, .. }) = Event::decode(b"res_missing\t0\tT\tB")
        else {
            panic!("an older record does not read");
        };
        assert_eq!(queue_id, "");
    }
}
