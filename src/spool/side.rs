//! The side files: `holds` (what an operator holds) and `recent` (the
//! duplicate-suppression keys a clean stop saved). Each is replaced whole.

use std::fs::{self};
use std::io;
use std::path::Path;
use std::time::SystemTime;

use log::warn;

use super::record::{Dec, Enc, frame_at, frame_parts};
use super::{RecentKey, from_unix_ms, unix_ms};

/// What an operator holds: peers by name, messages by queue ID.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Holds {
    /// Held peers.
    pub peers: Vec<String>,
    /// Held messages.
    pub messages: Vec<String>,
}

/// Where [`Holds`] are kept: lines `peer NAME` and `message ID`.
pub(super) const HOLDS_FILE: &str = "holds";

pub(super) fn read_holds(dir: &Path) -> Holds {
    let text = match fs::read_to_string(dir.join(HOLDS_FILE)) {
        Ok(t) => t,
        Err(e) => {
            if e.kind() != io::ErrorKind::NotFound {
                warn!("spool: cannot read the operator's holds: {e}");
            }
            return Holds::default();
        }
    };
    let mut holds = Holds::default();
    for line in text.lines() {
        match line.split_once(' ') {
            Some(("peer", name)) => holds.peers.push(name.to_string()),
            Some(("message", id)) => holds.messages.push(id.to_string()),
            _ => warn!("spool: {HOLDS_FILE}: ignoring {line:?}"),
        }
    }
    holds
}

/// Where a clean stop leaves the duplicate-suppression keys of its window,
/// for the next start (the journal may no longer hold them).
pub(super) const RECENT_FILE: &str = "recent";

/// One `D` record per pair: when, then the digest.
pub(super) fn encode_recent(keys: &[RecentKey]) -> Vec<u8> {
    let mut out = Vec::with_capacity(keys.len() * 33);
    for (digest, at) in keys {
        let mut e = Enc(Vec::with_capacity(25));
        e.u8(b'D');
        e.u64(unix_ms(*at));
        e.0.extend_from_slice(digest);
        frame_parts(&mut out, &e.0, &[]);
    }
    out
}

/// The pairs in a recent file accepted at or after `since`. A file of the
/// relays before digests (`K` records of text keys) counts for nothing:
/// those keys no longer match any.
pub(super) fn decode_recent(data: &[u8], since: SystemTime) -> Vec<RecentKey> {
    let mut out = Vec::new();
    let mut pos = 0;
    while let Some(payload) = frame_at(data, pos) {
        pos += 8 + payload.len();
        let mut d = Dec(payload);
        let ok = (|| {
            let tag = d.u8()?;
            let at = from_unix_ms(d.u64()?);
            match tag {
                b'D' => {
                    let digest = d.take(16)?.try_into().ok()?;
                    if at >= since {
                        out.push((digest, at));
                    }
                }
                _ => return None,
            }
            Some(())
        })();
        if ok.is_none() {
            break;
        }
    }
    out
}
