//! The journal's record codec: frames `length:u32 crc32:u32 payload`
//! and the `M`, `D` and `R` payloads inside them. Bytes in, bytes out: no
//! file is opened here.

use std::sync::Arc;

use crate::message::Location;
use crate::smtp::command::BodyType;

use super::{MAX_RECORD, Mark, NewMessage, Note, Outcome, OutcomeKind, from_unix_ms, unix_ms};

pub(super) struct Enc(pub(super) Vec<u8>);

impl Enc {
    pub(super) fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(super) fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(super) fn str(&mut self, s: &str) {
        let b = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
        self.u16(b.len() as u16);
        self.0.extend_from_slice(b);
    }
    pub(super) fn strs(&mut self, v: &[String]) {
        self.u16(v.len().min(u16::MAX as usize) as u16);
        v.iter().take(u16::MAX as usize).for_each(|s| self.str(s));
    }
}

/// Frames the payload `head` + `tail` as `len crc payload` onto `out`.
pub(super) fn frame_parts(out: &mut Vec<u8>, head: &[u8], tail: &[u8]) {
    let mut tail_crc = crc32fast::Hasher::new();
    tail_crc.update(tail);
    frame_hashed(out, head, tail, &tail_crc);
}

/// [`frame_parts`] for a `tail` already hashed into `tail_crc` (a
/// message's data, whose own CRC is in its `M` record): the frame's CRC
/// is the two combined, without reading the data again.
pub(super) fn frame_hashed(
    out: &mut Vec<u8>,
    head: &[u8],
    tail: &[u8],
    tail_crc: &crc32fast::Hasher,
) {
    let mut crc = crc32fast::Hasher::new();
    crc.update(head);
    crc.combine(tail_crc);
    out.extend_from_slice(&((head.len() + tail.len()) as u32).to_le_bytes());
    out.extend_from_slice(&crc.finalize().to_le_bytes());
    out.extend_from_slice(head);
    out.extend_from_slice(tail);
}

/// Where the data offset sits in an `M` record's payload (after the type
/// octet and the segment number), so it can be filled in once known.
pub(super) const M_OFFSET_AT: usize = 9;

/// The `M` record's payload without the data that follows it; `seq` is
/// the journal sequence number of its acceptance (a copy keeps it).
pub(super) fn encode_message(m: &NewMessage, loc: &Location, seq: u64) -> Vec<u8> {
    let mut e = Enc(Vec::with_capacity(256));
    e.u8(b'M');
    e.u64(loc.segment);
    e.u64(loc.offset);
    e.u32(loc.len);
    e.u32(loc.crc);
    e.str(&m.id);
    e.u64(unix_ms(m.accepted));
    e.u64(unix_ms(m.expires));
    e.u8(u8::from(m.body_type == BodyType::EightBitMime));
    e.str(&m.from);
    e.str(m.message_id.as_deref().unwrap_or(""));
    e.str(m.transaction_id.as_deref().unwrap_or(""));
    e.u16(m.jobs.len() as u16);
    for (peer, rcpts) in &m.jobs {
        e.str(peer);
        e.strs(rcpts);
    }
    // Trailing fields: a reader tells them from the data by the data's
    // length, so records written before them still read.
    e.str(m.dedup_key.as_deref().unwrap_or(""));
    e.u64(seq);
    e.str(&m.account);
    e.0
}

/// A `D` or `R` record; `seq` 0 for a copy (it records no new event).
pub(super) fn encode_mark(id: &str, n: &Note, seq: u64) -> Vec<u8> {
    let mut e = Enc(Vec::with_capacity(128));
    e.u8(if n.retry.is_some() { b'R' } else { b'D' });
    e.str(id);
    e.str(&n.peer);
    e.strs(&n.rcpts);
    if let Some((attempts, next)) = n.retry {
        e.u32(attempts);
        e.u64(unix_ms(next));
    }
    // Trailing: the outcome, for the CDR (records without it still read).
    if let (Some(o), true) = (&n.outcome, seq > 0) {
        e.u64(seq);
        e.u8(o.kind as u8);
        e.u16(o.code);
        e.str(&o.reply);
        e.u32(o.attempts);
        e.u64(unix_ms(o.at));
    }
    e.0
}

/// An `E` record: an event for the CDR that is about no queued message.
pub(super) fn encode_event(seq: u64, payload: &[u8]) -> Vec<u8> {
    let mut e = Enc(Vec::with_capacity(16 + payload.len()));
    e.u8(b'E');
    e.u64(seq);
    e.0.extend_from_slice(payload);
    e.0
}

pub(super) struct Dec<'a>(pub(super) &'a [u8]);

impl Dec<'_> {
    pub(super) fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    pub(super) fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
    }
    pub(super) fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }
    pub(super) fn str(&mut self) -> Option<String> {
        let n = self.u16()? as usize;
        self.take(n)
            .map(|b| String::from_utf8_lossy(b).into_owned())
    }
    pub(super) fn strs(&mut self) -> Option<Vec<String>> {
        let n = self.u16()? as usize;
        (0..n).map(|_| self.str()).collect()
    }
}

pub(super) enum Record {
    /// A message, where its data is, and its acceptance's sequence number.
    Message(Box<NewMessage>, Location, u64),
    /// A done or retry record, with its sequence number (0: none).
    Mark(Mark, u64),
    /// An event, with its sequence number.
    Event(u64, Vec<u8>),
}

fn decode(payload: &[u8]) -> Option<Record> {
    let mut d = Dec(payload);
    match d.u8()? {
        b'M' => {
            let loc = Location {
                segment: d.u64()?,
                offset: d.u64()?,
                len: d.u32()?,
                crc: d.u32()?,
            };
            let id = d.str()?;
            let accepted = from_unix_ms(d.u64()?);
            let expires = from_unix_ms(d.u64()?);
            let body_type = if d.u8()? == 1 {
                BodyType::EightBitMime
            } else {
                BodyType::SevenBit
            };
            let from = d.str()?;
            let message_id = Some(d.str()?).filter(|s| !s.is_empty());
            let transaction_id = Some(d.str()?).filter(|s| !s.is_empty());
            let njobs = d.u16()? as usize;
            let jobs = (0..njobs)
                .map(|_| Some((d.str()?, d.strs()?)))
                .collect::<Option<Vec<_>>>()?;
            let dedup_key = if d.0.len() > loc.len as usize {
                Some(d.str()?).filter(|k| !k.is_empty())
            } else {
                None
            };
            let (seq, account) = if d.0.len() > loc.len as usize {
                (d.u64()?, d.str()?)
            } else {
                (0, String::new())
            };
            // The data is what is left of the payload.
            if d.0.len() != loc.len as usize {
                return None;
            }
            let m = NewMessage {
                id,
                from,
                body_type,
                message_id,
                transaction_id,
                accepted,
                expires,
                data: Arc::from(&[][..]),
                jobs,
                dedup_key,
                account,
            };
            Some(Record::Message(Box::new(m), loc, seq))
        }
        kind @ (b'D' | b'R') => {
            let (id, peer, rcpts) = (d.str()?, d.str()?, d.strs()?);
            let retry = match kind {
                b'R' => Some((d.u32()?, from_unix_ms(d.u64()?))),
                _ => None,
            };
            let (seq, outcome) = if d.0.is_empty() {
                (0, None)
            } else {
                let seq = d.u64()?;
                let kind = OutcomeKind::from_u8(d.u8()?)?;
                let o = Outcome {
                    kind,
                    code: d.u16()?,
                    reply: d.str()?,
                    attempts: d.u32()?,
                    at: from_unix_ms(d.u64()?),
                };
                (seq, Some(o))
            };
            let note = Note {
                peer,
                rcpts,
                retry,
                outcome,
            };
            Some(Record::Mark(Mark { id, note }, seq))
        }
        b'E' => {
            let seq = d.u64()?;
            Some(Record::Event(seq, d.0.to_vec()))
        }
        _ => None,
    }
}

/// The payload of the framed record at `pos` in `data`, if it is whole
/// and passes its CRC.
pub(super) fn frame_at(data: &[u8], pos: usize) -> Option<&[u8]> {
    let head = data.get(pos..pos + 8)?;
    let len = u32::from_le_bytes(head[..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(head[4..].try_into().expect("4 bytes"));
    if len > MAX_RECORD {
        return None;
    }
    let payload = data.get(pos + 8..pos + 8 + len)?;
    (crc32fast::hash(payload) == crc).then_some(payload)
}

/// Reads framed records from `data`; returns each with where its frame
/// starts and how long it is, and the length of the good prefix (a torn or
/// corrupt record ends it).
pub(super) fn read_records(data: &[u8]) -> (Vec<(u64, u32, Record)>, usize) {
    let mut out = Vec::new();
    let mut pos = 0;
    while let Some(payload) = frame_at(data, pos) {
        let Some(r) = decode(payload) else { break };
        out.push((pos as u64, (8 + payload.len()) as u32, r));
        pos += 8 + payload.len();
    }
    (out, pos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_of_hashed_data_is_the_frame_of_the_data() {
        let data: Vec<u8> = (0..70_000u32).map(|i| (i * 7 % 251) as u8).collect();
        for (head, tail) in [
            (&b"M head"[..], &data[..]),
            (b"", &data[..1]),
            (b"head", b""),
            (b"", b""),
        ] {
            let mut crc = crc32fast::Hasher::new();
            crc.update(tail);
            let (mut a, mut b) = (Vec::new(), Vec::new());
            frame_parts(&mut a, head, tail);
            frame_hashed(&mut b, head, tail, &crc);
            assert_eq!(a, b);
            let whole = [head, tail].concat();
            assert_eq!(&a[..4], &(whole.len() as u32).to_le_bytes());
            assert_eq!(&a[4..8], &crc32fast::hash(&whole).to_le_bytes());
            assert_eq!(frame_at(&a, 0), Some(&whole[..]));
        }
    }
}
