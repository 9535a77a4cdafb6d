//! Number portability at carrier scale: tens of millions of `NUMBER PEER`
//! entries, exact numbers and blocks (`NUMBER*`, every number that starts
//! with those digits), in two sorted arrays of packed keys. An entry costs
//! 10 octets (an 8-octet key and a 2-octet peer) and half an octet of
//! index: a look-up goes through the index to a bucket of a few keys and
//! searches only those, once for the number and once per length of block
//! the table has. A table is built whole and then swapped in: it is never
//! changed in place.
//!
//! The file format (`[routes] ported_file`): one entry a line, the number
//! and the peer's name separated by spaces, tabs, a comma or a semicolon;
//! the number is E.164 digits with or without a leading `+`; a trailing
//! `*` makes it a block; `#` starts a comment; blank lines are ignored.

use std::fmt;
use std::sync::Arc;

use super::PeerId;

/// Most digits of an E.164 number.
const MAX_DIGITS: usize = 15;

/// A number or block as one `u64`: the digits' value, then their count in
/// the low four bits (so `44` and `044` differ, and blocks of different
/// lengths never collide).
fn pack(digits: &[u8]) -> u64 {
    let value = digits
        .iter()
        .fold(0u64, |v, d| v * 10 + u64::from(d - b'0'));
    (value << 4) | digits.len() as u64
}

/// How an entry matched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NpMatch {
    /// The number itself.
    Exact,
    /// A block of this many leading digits.
    Block(usize),
}

/// A line that cannot be an entry: its number (1-based) and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NpError {
    /// The line, counted from 1.
    pub line: usize,
    /// What is wrong with it.
    pub problem: String,
}

impl fmt::Display for NpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.problem)
    }
}

impl std::error::Error for NpError {}

/// Sorted keys and their peers. The keys and their index are shared
/// between a table and its remapped copies (a reload that renumbers peers).
#[derive(Clone, Debug, Default)]
struct Packed {
    keys: Arc<[u64]>,
    peers: Arc<[u16]>,
    index: Arc<Index>,
}

/// Where the keys of each bucket start: bucket `b` holds the keys whose
/// `(key - base) >> shift` is `b`, at `starts[b]..starts[b + 1]`. A binary
/// search over tens of millions of keys costs a cache miss a step; one
/// over a bucket of about eight keys, one or two.
#[derive(Debug, Default)]
struct Index {
    base: u64,
    shift: u32,
    starts: Vec<u32>,
}

/// Keys per bucket the index aims at.
const PER_BUCKET: usize = 8;

impl Index {
    fn new(keys: &[u64]) -> Index {
        let (Some(&base), Some(&last)) = (keys.first(), keys.last()) else {
            return Index::default();
        };
        let buckets = (keys.len() / PER_BUCKET).max(1).next_power_of_two() as u64;
        let span = last - base;
        // The smallest shift that puts the whole span in `buckets`.
        let shift = (64 - (span / buckets).leading_zeros()).min(63);
        let count = (span >> shift) as usize + 1;
        let mut starts = Vec::with_capacity(count + 1);
        let mut i = 0;
        for b in 0..count as u64 {
            while i < keys.len() && (keys[i] - base) >> shift < b {
                i += 1;
            }
            starts.push(i as u32);
        }
        starts.push(keys.len() as u32);
        Index {
            base,
            shift,
            starts,
        }
    }

    /// The range of `keys` that may hold `key`.
    fn range(&self, key: u64) -> std::ops::Range<usize> {
        let Some(off) = key.checked_sub(self.base) else {
            return 0..0;
        };
        let b = (off >> self.shift) as usize;
        match (self.starts.get(b), self.starts.get(b + 1)) {
            (Some(&from), Some(&to)) => from as usize..to as usize,
            _ => 0..0,
        }
    }
}

impl Packed {
    fn get(&self, key: u64) -> Option<PeerId> {
        let range = self.index.range(key);
        let from = range.start;
        self.keys[range]
            .binary_search(&key)
            .ok()
            .map(|i| usize::from(self.peers[from + i]))
    }
}

/// A number-portability table.
#[derive(Clone, Debug, Default)]
pub struct NpTable {
    exact: Packed,
    blocks: Packed,
    /// Which lengths of block exist: bit `n` for `n` digits.
    block_lengths: u16,
}

/// Entries while a table is built: key, peer, and the line it came from
/// (for the error when a key is given twice with different peers).
#[derive(Debug, Default)]
pub struct NpBuilder {
    exact: Vec<(u64, u16, u32)>,
    blocks: Vec<(u64, u16, u32)>,
}

impl NpBuilder {
    /// An empty builder.
    pub fn new() -> NpBuilder {
        NpBuilder::default()
    }

    /// Adds one entry: `number` is digits with or without `+`, and a
    /// trailing `*` for a block; `line` names it in errors (0: the INI's
    /// `[ported]` section).
    pub fn add(&mut self, number: &str, peer: PeerId, line: usize) -> Result<(), NpError> {
        let err = |problem: String| NpError { line, problem };
        let n = number.strip_prefix('+').unwrap_or(number);
        let (digits, block) = match n.strip_suffix('*') {
            Some(d) => (d, true),
            None => (n, false),
        };
        if digits.is_empty()
            || digits.len() > MAX_DIGITS
            || !digits.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(err(format!(
                "{number:?} is not a number: 1 to {MAX_DIGITS} digits, with or without +, \
                 and * after a block"
            )));
        }
        let peer = u16::try_from(peer).map_err(|_| err("too many peers".into()))?;
        let line = u32::try_from(line).unwrap_or(u32::MAX);
        let entry = (pack(digits.as_bytes()), peer, line);
        if block {
            self.blocks.push(entry);
        } else {
            self.exact.push(entry);
        }
        Ok(())
    }

    /// Adds every entry of a ported file; `peer_index` names the peers.
    pub fn add_file(
        &mut self,
        text: &str,
        peer_index: impl Fn(&str) -> Option<PeerId>,
    ) -> Result<(), NpError> {
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let content = raw.split('#').next().unwrap_or("").trim();
            if content.is_empty() {
                continue;
            }
            let mut fields = content
                .split([' ', '\t', ',', ';'])
                .filter(|f| !f.is_empty());
            let (Some(number), Some(peer), None) = (fields.next(), fields.next(), fields.next())
            else {
                return Err(NpError {
                    line,
                    problem: format!("expected NUMBER PEER, found {content:?}"),
                });
            };
            let id = peer_index(peer).ok_or_else(|| NpError {
                line,
                problem: format!("no peer named {peer:?}"),
            })?;
            self.add(number, id, line)?;
        }
        Ok(())
    }

    /// The table; a number or block given twice for two different peers
    /// is an error naming both lines.
    pub fn build(self) -> Result<NpTable, NpError> {
        let exact = pack_sorted(self.exact)?;
        let blocks = pack_sorted(self.blocks)?;
        let block_lengths = blocks
            .keys
            .iter()
            .fold(0u16, |bits, k| bits | (1 << (k & 0xf)));
        Ok(NpTable {
            exact,
            blocks,
            block_lengths,
        })
    }
}

fn pack_sorted(mut entries: Vec<(u64, u16, u32)>) -> Result<Packed, NpError> {
    entries.sort_unstable_by_key(|&(k, _, line)| (k, line));
    entries.dedup_by(|b, a| a.0 == b.0 && a.1 == b.1);
    if let Some(w) = entries.windows(2).find(|w| w[0].0 == w[1].0) {
        // Line 0: an entry of the INI's [ported] section.
        let earlier = match w[0].2 {
            0 => "in [ported]".to_string(),
            n => format!("on line {n}"),
        };
        return Err(NpError {
            line: w[1].2 as usize,
            problem: format!("this number is already given {earlier} for another peer"),
        });
    }
    let keys: Arc<[u64]> = entries.iter().map(|e| e.0).collect();
    Ok(Packed {
        index: Arc::new(Index::new(&keys)),
        keys,
        peers: entries.iter().map(|e| e.1).collect(),
    })
}

impl Packed {
    fn remap(&self, id: &impl Fn(PeerId) -> PeerId) -> Packed {
        Packed {
            keys: self.keys.clone(),
            index: self.index.clone(),
            peers: self
                .peers
                .iter()
                .map(|&p| u16::try_from(id(usize::from(p))).unwrap_or(u16::MAX))
                .collect(),
        }
    }
}

impl NpTable {
    /// A table of a few exact numbers (`+` and digits, or a block with
    /// `*`); an entry that is not a number is left out.
    pub fn from_entries(entries: &[(&str, PeerId)]) -> NpTable {
        let mut b = NpBuilder::new();
        for (number, peer) in entries {
            let _ = b.add(number, *peer, 0);
        }
        b.build().unwrap_or_default()
    }

    /// The peer for a number (`+` and digits, or digits), and how it
    /// matched: the number itself, else the longest block it is in.
    pub fn lookup(&self, number: &str) -> Option<(PeerId, NpMatch)> {
        let digits = number.strip_prefix('+').unwrap_or(number).as_bytes();
        if digits.is_empty() || digits.len() > MAX_DIGITS || !digits.iter().all(u8::is_ascii_digit)
        {
            return None;
        }
        if let Some(p) = self.exact.get(pack(digits)) {
            return Some((p, NpMatch::Exact));
        }
        (1..=digits.len())
            .rev()
            .filter(|n| self.block_lengths & (1 << n) != 0)
            .find_map(|n| {
                self.blocks
                    .get(pack(&digits[..n]))
                    .map(|p| (p, NpMatch::Block(n)))
            })
    }

    /// Entries: exact numbers and blocks.
    pub fn len(&self) -> usize {
        self.exact.keys.len() + self.blocks.keys.len()
    }

    /// True when the table has no entry.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Octets the entries and their index take.
    pub fn bytes(&self) -> usize {
        let per = std::mem::size_of::<u64>() + std::mem::size_of::<u16>();
        let index = (self.exact.index.starts.len() + self.blocks.index.starts.len()) * 4;
        self.len() * per + index
    }

    /// The same entries with every peer `p` as `id(p)` (peers numbered
    /// anew at a reload); the keys are shared, not copied.
    pub fn remap(&self, id: impl Fn(PeerId) -> PeerId) -> NpTable {
        NpTable {
            exact: self.exact.remap(&id),
            blocks: self.blocks.remap(&id),
            block_lengths: self.block_lengths,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peers(name: &str) -> Option<PeerId> {
        ["A", "B", "C"].iter().position(|p| *p == name)
    }

    fn table(text: &str) -> Result<NpTable, NpError> {
        let mut b = NpBuilder::new();
        b.add_file(text, peers)?;
        b.build()
    }

    #[test]
    fn exact_beats_block_and_longer_blocks_beat_shorter() {
        let t = table(
            "# a comment\n\
             \n\
             447700900* A\n\
             4477009001* B # the longer block\n\
             +447700900123,C\n\
             1202555;B\n\
             61491570\tC  # tab-separated\n",
        )
        .unwrap();
        assert_eq!(t.len(), 5);
        assert_eq!(t.lookup("+447700900123"), Some((2, NpMatch::Exact)));
        assert_eq!(t.lookup("+447700900199"), Some((1, NpMatch::Block(10))));
        assert_eq!(t.lookup("+447700900299"), Some((0, NpMatch::Block(9))));
        assert_eq!(t.lookup("447700900299"), Some((0, NpMatch::Block(9))));
        assert_eq!(t.lookup("+1202555"), Some((1, NpMatch::Exact)));
        // An exact entry is not a block: longer numbers do not match it.
        assert_eq!(t.lookup("+12025550142"), None);
        assert_eq!(t.lookup("+61491570"), Some((2, NpMatch::Exact)));
        assert_eq!(t.lookup("+4477"), None);
        assert_eq!(t.lookup("not a number"), None);
        assert_eq!(t.lookup(""), None);
    }

    #[test]
    fn leading_zeros_and_lengths_do_not_collide() {
        let t = table("44* A\n044* B\n4* C\n").unwrap();
        assert_eq!(t.lookup("+441"), Some((0, NpMatch::Block(2))));
        assert_eq!(t.lookup("0441"), Some((1, NpMatch::Block(3))));
        assert_eq!(t.lookup("+45"), Some((2, NpMatch::Block(1))));
    }

    #[test]
    fn malformed_lines_are_refused_with_their_number() {
        for (text, line, problem) in [
            ("447700900123 A\n447700900124\n", 2, "expected NUMBER PEER"),
            ("447700900123 A B\n", 1, "expected NUMBER PEER"),
            ("\n\n447700900123 Z\n", 3, "no peer named \"Z\""),
            ("44770090012x A\n", 1, "is not a number"),
            ("1234567890123456 A\n", 1, "is not a number"),
            ("* A\n", 1, "is not a number"),
            ("+ A\n", 1, "is not a number"),
            ("4477* A\n1 B\n4477* C\n", 3, "already given on line 1"),
        ] {
            let e = table(text).unwrap_err();
            assert_eq!(e.line, line, "{text:?}: {e}");
            assert!(e.problem.contains(problem), "{text:?}: {e}");
        }
        // The same entry twice for the same peer is no conflict.
        assert_eq!(table("4477 A\n4477 A\n").unwrap().len(), 1);
    }

    #[test]
    fn the_index_finds_every_key_and_nothing_else() {
        // Clustered and spread keys, and every length: the buckets must
        // cover all of them.
        let mut b = NpBuilder::new();
        let mut numbers = Vec::new();
        for i in 0..5000u64 {
            numbers.push(format!("+4477009{i:05}"));
            numbers.push(format!("{}", 1 + i * 7_919_999_999 % 999_999_999_999));
            numbers.push(format!("{}", i % 97 + 1));
        }
        for (i, n) in numbers.iter().enumerate() {
            // The same number given twice names the same peer.
            b.add(n, n.len() % 3, i + 1).unwrap();
        }
        let t = b.build().unwrap();
        for n in &numbers {
            assert!(matches!(t.lookup(n), Some((_, NpMatch::Exact))), "{n}");
        }
        for n in ["+447700950000", "+999999999999999", "+0", "+98", "+4477009"] {
            let given = numbers
                .iter()
                .any(|m| m.strip_prefix('+').unwrap_or(m) == &n[1..]);
            assert_eq!(t.lookup(n).is_some(), given, "{n}");
        }
    }

    #[test]
    fn an_entry_costs_ten_octets() {
        let mut b = NpBuilder::new();
        for i in 0..1000u64 {
            b.add(&format!("+4477009{i:05}"), 1, 1).unwrap();
        }
        let t = b.build().unwrap();
        assert_eq!(t.len(), 1000);
        // Ten for the entry, half an octet or so for the index.
        assert!(t.bytes() <= 1000 * 11, "{}", t.bytes());
    }
}
