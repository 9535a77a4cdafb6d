//! One CDR row: its columns, written as an RFC 4180 line and read back.
//! Every field is cleaned of control characters before it is written, so a
//! row is always exactly one line (`trace` and recovery read lines).

use std::time::SystemTime;

/// The columns, in file order; the header line names them. The first
/// thirteen are the contract; the README documents every one.
pub const COLUMNS: [&str; 21] = [
    "event",
    "time",
    "queue_id",
    "pdu",
    "transaction_id",
    "message_id",
    "from",
    "to",
    "peer",
    "size",
    "status",
    "reply",
    "attempts",
    "cdr_id",
    "record_type",
    "accepted",
    "origin",
    "client",
    "latency",
    "subject",
    "parts",
];

/// Where each column is in a row.
pub mod col {
    /// `event`.
    pub const EVENT: usize = 0;
    /// `time`.
    pub const TIME: usize = 1;
    /// `queue_id`.
    pub const QUEUE_ID: usize = 2;
    /// `transaction_id`.
    pub const TRANSACTION_ID: usize = 4;
    /// `message_id`.
    pub const MESSAGE_ID: usize = 5;
    /// `from`.
    pub const FROM: usize = 6;
    /// `to`.
    pub const TO: usize = 7;
    /// `cdr_id`.
    pub const CDR_ID: usize = 13;
}

/// Longest field written; a longer one is cut (IDs are bounded by the
/// header limits already, replies by the SMTP line length).
const MAX_FIELD: usize = 1024;

/// A row, field by field, in [`COLUMNS`] order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Row(pub [String; COLUMNS.len()]);

impl Row {
    /// Appends the row as one CSV line (CRLF-free: `\n` ends it).
    pub fn write_to(&self, out: &mut Vec<u8>) {
        line(self.0.iter().map(String::as_str), out);
    }

    /// The header line.
    pub fn header() -> Vec<u8> {
        let mut out = COLUMNS.join(",").into_bytes();
        out.push(b'\n');
        out
    }

    /// Reads one line (without its `\n`) back; `None` if it has the wrong
    /// number of fields or broken quoting.
    pub fn parse(line: &[u8]) -> Option<Row> {
        let fields = split(line)?;
        let fields: [String; COLUMNS.len()] = fields.try_into().ok()?;
        Some(Row(fields))
    }

    /// The `cdr_id` as (journal sequence number, row within it).
    pub fn cdr_id(&self) -> Option<(u64, u32)> {
        parse_id(&self.0[col::CDR_ID])
    }
}

/// `seq.k` as written in `cdr_id`.
pub fn format_id(seq: u64, k: u32) -> String {
    format!("{seq}.{k}")
}

/// Reads a `cdr_id`.
pub fn parse_id(s: &str) -> Option<(u64, u32)> {
    let (a, b) = s.split_once('.')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// A time as the rows write it.
pub fn time(t: SystemTime) -> String {
    crate::mm4::date::rfc3339(t)
}

/// `s` without control characters (each becomes `?`), cut at
/// [`MAX_FIELD`] octets on a character boundary.
pub fn clean(s: &str) -> String {
    let mut out = String::with_capacity(s.len().min(MAX_FIELD));
    for c in s.chars() {
        if out.len() + c.len_utf8() > MAX_FIELD {
            break;
        }
        out.push(if c.is_control() { '?' } else { c });
    }
    out
}

/// Appends `fields` as one CSV line, `\n` at its end.
pub fn line<'a>(fields: impl Iterator<Item = &'a str>, out: &mut Vec<u8>) {
    for (i, f) in fields.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        field(out, f);
    }
    out.push(b'\n');
}

/// One field, quoted when it holds a comma or a quote (RFC 4180).
fn field(out: &mut Vec<u8>, f: &str) {
    let clean;
    let f = if f.chars().any(char::is_control) || f.len() > MAX_FIELD {
        clean = self::clean(f);
        clean.as_str()
    } else {
        f
    };
    if f.bytes().any(|b| b == b',' || b == b'"') {
        out.push(b'"');
        for b in f.bytes() {
            if b == b'"' {
                out.push(b'"');
            }
            out.push(b);
        }
        out.push(b'"');
    } else {
        out.extend_from_slice(f.as_bytes());
    }
}

/// Splits one CSV line into its fields.
pub fn split(line: &[u8]) -> Option<Vec<String>> {
    let mut fields = Vec::with_capacity(COLUMNS.len());
    let mut i = 0;
    loop {
        let mut f = Vec::new();
        if line.get(i) == Some(&b'"') {
            i += 1;
            loop {
                match line.get(i)? {
                    b'"' if line.get(i + 1) == Some(&b'"') => {
                        f.push(b'"');
                        i += 2;
                    }
                    b'"' => {
                        i += 1;
                        break;
                    }
                    &b => {
                        f.push(b);
                        i += 1;
                    }
                }
            }
        } else {
            while let Some(&b) = line.get(i) {
                if b == b',' {
                    break;
                }
                if b == b'"' {
                    return None;
                }
                f.push(b);
                i += 1;
            }
        }
        fields.push(String::from_utf8_lossy(&f).into_owned());
        match line.get(i) {
            None => return Some(fields),
            Some(b',') => i += 1,
            Some(_) => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_is_one_line_and_reads_back() {
        let mut row = Row::default();
        row.0[0] = "sent".into();
        row.0[11] = "250 2.0.0 \"ok\", queued".into();
        row.0[19] = "line\r\nbreak\0".into();
        row.0[13] = format_id(42, 3);
        let mut out = Vec::new();
        row.write_to(&mut out);
        assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 1);
        assert!(!out.contains(&b'\r'));
        let back = Row::parse(&out[..out.len() - 1]).unwrap();
        assert_eq!(back.0[11], row.0[11]);
        assert_eq!(back.0[19], "line??break?");
        assert_eq!(back.cdr_id(), Some((42, 3)));
        assert!(Row::parse(b"a,b").is_none());
        assert!(Row::parse(b"\"open").is_none());
    }

    #[test]
    fn long_fields_are_cut_on_a_character_boundary() {
        let s = "é".repeat(1000);
        let c = clean(&s);
        assert!(c.len() <= MAX_FIELD);
        assert_eq!(c.chars().count(), MAX_FIELD / 2);
    }
}
