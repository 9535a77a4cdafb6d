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
}
