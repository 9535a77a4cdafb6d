//! SMTP replies (RFC 5321 §4.2): a three-digit code and one or more text
//! lines, parsed incrementally on the client side and formatted on the
//! server side.
//!
//! Parsing takes a byte buffer that may hold a partial reply and answers
//! `Ok(None)` ("need more") until the last line (`ddd SP text CRLF`) is in.

use std::fmt;

/// Longest reply line we accept from a peer (RFC 5321 allows 512; partners
/// exceed it in EHLO lists, so allow more, but never unbounded).
pub const MAX_REPLY_LINE: usize = 4096;
/// Most lines in one multi-line reply.
pub const MAX_REPLY_LINES: usize = 128;

/// One SMTP reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// The three-digit reply code.
    pub code: u16,
    /// The text of each line, without the code, separator or CRLF.
    pub lines: Vec<String>,
}

/// What is wrong with bytes that should have been a reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplyError {
    /// A line does not start with three digits and a separator.
    Malformed(String),
    /// The lines of one reply carry different codes.
    MixedCodes,
    /// A line or the whole reply is longer than the limits above.
    TooLong,
}

impl fmt::Display for ReplyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReplyError::Malformed(l) => write!(f, "malformed reply line {l:?}"),
            ReplyError::MixedCodes => f.write_str("reply lines carry different codes"),
            ReplyError::TooLong => f.write_str("reply too long"),
        }
    }
}

impl std::error::Error for ReplyError {}

impl Reply {
    /// A one-line reply.
    pub fn new(code: u16, text: impl Into<String>) -> Reply {
        Reply {
            code,
            lines: vec![text.into()],
        }
    }

    /// 2xx: the command succeeded.
    pub fn is_positive(&self) -> bool {
        (200..300).contains(&self.code)
    }

    /// 3xx: go on (354 after DATA).
    pub fn is_intermediate(&self) -> bool {
        (300..400).contains(&self.code)
    }

    /// 4xx: try again later.
    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }

    /// 5xx: do not try again.
    pub fn is_permanent(&self) -> bool {
        (500..600).contains(&self.code)
    }

    /// All lines joined by a space, for logs.
    pub fn text(&self) -> String {
        self.lines.join(" ")
    }

    /// Appends the wire form (`ddd-text` lines, last `ddd text`) to `out`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        let last = self.lines.len().saturating_sub(1);
        if self.lines.is_empty() {
            out.extend_from_slice(format!("{}\r\n", self.code).as_bytes());
        }
        for (i, line) in self.lines.iter().enumerate() {
            let sep = if i == last { ' ' } else { '-' };
            out.extend_from_slice(format!("{}{}{}\r\n", self.code, sep, line).as_bytes());
        }
    }

    /// Parses one reply from the start of `buf`. Returns the reply and how
    /// many bytes it took, or `None` if `buf` ends before the reply does.
    pub fn parse(buf: &[u8]) -> Result<Option<(Reply, usize)>, ReplyError> {
        let mut pos = 0;
        let mut code = None;
        let mut lines = Vec::new();
        loop {
            let rest = &buf[pos..];
            let Some(nl) = rest.iter().position(|&b| b == b'\n') else {
                if rest.len() > MAX_REPLY_LINE {
                    return Err(ReplyError::TooLong);
                }
                return Ok(None);
            };
            if nl > MAX_REPLY_LINE || lines.len() >= MAX_REPLY_LINES {
                return Err(ReplyError::TooLong);
            }
            // Peers are required to send CRLF; accept a bare LF from them
            // rather than failing a delivery over it.
            let line = rest[..nl].strip_suffix(b"\r").unwrap_or(&rest[..nl]);
            pos += nl + 1;
            let malformed = || ReplyError::Malformed(String::from_utf8_lossy(line).into_owned());
            if line.len() < 3 || !line[..3].iter().all(u8::is_ascii_digit) {
                return Err(malformed());
            }
            let this_code = (line[0] - b'0') as u16 * 100
                + (line[1] - b'0') as u16 * 10
                + (line[2] - b'0') as u16;
            if !(200..600).contains(&this_code) {
                return Err(malformed());
            }
            if *code.get_or_insert(this_code) != this_code {
                return Err(ReplyError::MixedCodes);
            }
            let (last, text) = match line.get(3) {
                None => (true, &line[3..]),
                Some(b' ') => (true, &line[4..]),
                Some(b'-') => (false, &line[4..]),
                Some(_) => return Err(malformed()),
            };
            lines.push(String::from_utf8_lossy(text).into_owned());
            if last {
                return Ok(Some((
                    Reply {
                        code: this_code,
                        lines,
                    },
                    pos,
                )));
            }
        }
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code, self.text())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_single_and_multiline() {
        let (r, n) = Reply::parse(b"250 2.0.0 ok\r\nrest").unwrap().unwrap();
        assert_eq!(r, Reply::new(250, "2.0.0 ok"));
        assert_eq!(n, 14);
        let wire = b"250-mx.example\r\n250-PIPELINING\r\n250 SIZE 100\r\n";
        let (r, n) = Reply::parse(wire).unwrap().unwrap();
        assert_eq!(r.lines, vec!["mx.example", "PIPELINING", "SIZE 100"]);
        assert_eq!(n, wire.len());
    }

    #[test]
    fn every_prefix_needs_more() {
        let wire = b"250-mx.example\r\n250-PIPELINING\r\n250 SIZE 100\r\n";
        for cut in 0..wire.len() {
            assert_eq!(Reply::parse(&wire[..cut]), Ok(None), "cut at {cut}");
        }
    }

    #[test]
    fn round_trips() {
        let r = Reply {
            code: 221,
            lines: vec!["a".into(), "b".into()],
        };
        let mut out = Vec::new();
        r.write_to(&mut out);
        assert_eq!(out, b"221-a\r\n221 b\r\n");
        assert_eq!(Reply::parse(&out).unwrap().unwrap().0, r);
    }

    #[test]
    fn rejects_garbage() {
        assert!(Reply::parse(b"hello\r\n").is_err());
        assert!(Reply::parse(b"250-a\r\n251 b\r\n").is_err());
        assert!(Reply::parse(b"999 x\r\n").is_err());
        assert!(Reply::parse(b"250xok\r\n").is_err());
        assert_eq!(
            Reply::parse(&vec![b'2'; MAX_REPLY_LINE + 2]),
            Err(ReplyError::TooLong)
        );
    }

    #[test]
    fn classifies() {
        assert!(Reply::new(250, "").is_positive());
        assert!(Reply::new(354, "").is_intermediate());
        assert!(Reply::new(421, "").is_transient());
        assert!(Reply::new(554, "").is_permanent());
    }
}
