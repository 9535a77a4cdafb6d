//! Text from the network, made safe to show: in the log, in `queue list`,
//! `queue show` and `status`, and in the headers of a delivery status
//! notification. A client's bare CR could forge a log line, an ESC could
//! drive an operator's terminal, a CR LF could add a header field: every
//! octet below 0x20, DEL, a backslash and anything outside ASCII is
//! written as `\xNN` (a backslash as `\\`), so what is shown is one line
//! of printable ASCII that still tells the octets apart.

use std::fmt;

/// Displays its text with what is not printable ASCII escaped.
#[derive(Clone, Copy, Debug)]
pub struct Printable<'a>(pub &'a str);

impl fmt::Display for Printable<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bytes = self.0.as_bytes();
        // Clean runs are written whole; they are ASCII, so always UTF-8.
        let mut clean = 0;
        for (i, &b) in bytes.iter().enumerate() {
            if (0x20..0x7f).contains(&b) && b != b'\\' {
                continue;
            }
            f.write_str(std::str::from_utf8(&bytes[clean..i]).unwrap_or_default())?;
            if b == b'\\' {
                f.write_str("\\\\")?;
            } else {
                write!(f, "\\x{b:02x}")?;
            }
            clean = i + 1;
        }
        f.write_str(std::str::from_utf8(&bytes[clean..]).unwrap_or_default())
    }
}

/// At most the first [`BRIEF`] characters of a text, escaped as
/// [`Printable`] does, and when it was longer how long: for log lines that
/// quote an ID or an address a client sent, which may be 60 KB.
#[derive(Clone, Copy, Debug)]
pub struct Brief<'a>(pub &'a str);

/// How many characters of a text [`Brief`] shows.
pub const BRIEF: usize = 256;

impl fmt::Display for Brief<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.char_indices().nth(BRIEF) {
            Some((cut, _)) => write!(
                f,
                "{}...({} octets)",
                Printable(&self.0[..cut]),
                self.0.len()
            ),
            None => Printable(self.0).fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn escape(s: &str) -> String {
        Printable(s).to_string()
    }

    #[test]
    fn escapes_what_is_not_printable() {
        assert_eq!(escape("a@b.example"), "a@b.example");
        assert_eq!(escape("x\r1 sent status=sent"), "x\\x0d1 sent status=sent");
        assert_eq!(escape("\x1b[2J\0\x7f"), "\\x1b[2J\\x00\\x7f");
        assert_eq!(escape("a\r\nBcc: x"), "a\\x0d\\x0aBcc: x");
        assert_eq!(escape("back\\slash"), "back\\\\slash");
        assert_eq!(escape("é"), "\\xc3\\xa9");
        assert_eq!(escape(""), "");
    }

    #[test]
    fn brief_cuts_long_text() {
        assert_eq!(Brief("m-1\r").to_string(), "m-1\\x0d");
        let long = "x".repeat(30_000);
        let shown = Brief(&long).to_string();
        assert_eq!(shown, format!("{}...(30000 octets)", "x".repeat(BRIEF)));
        let wide = "é".repeat(1000);
        assert!(Brief(&wide).to_string().ends_with("...(2000 octets)"));
    }
}
