//! MM4 PDU recognition and checks (3GPP TS 23.140 §8.4; see MM4.md).
//!
//! The relay never rewrites a message, so this module reads the raw octets:
//! the header section as it is (no decoding, no reordering), and the MIME
//! structure only as deep as needed to prove it is sound. A general mail
//! parser would decode and forgive where a relay must refuse (duplicate
//! type headers, a multipart without its closing delimiter, 40 levels of
//! nesting), so the scan here is our own, bounded in depth and linear in
//! size.
//!
//! Checks, by mode:
//! - `strict`: one known `X-Mms-Message-Type`; the version syntax; the
//!   mandatory headers of that PDU; the value sets of status headers; no
//!   8-bit octets in headers (we do not offer SMTPUTF8); the forward
//!   counter; MIME structure; and for every PDU but forward.REQ, one
//!   recipient that matches the `To` header.
//! - `lenient`: one known type, a transaction ID, MIME structure and the
//!   forward counter.
//! - `off`: nothing; the IDs are still read for the logs.
//!
//! `summary.rs` reads an accepted message with mail-parser for what
//! operators see of its content (Subject, parts), apart from the checks.
//!
//! This part knows MM4 (PDUs, their dates, what makes two of them
//! duplicates) and nothing about sockets, the spool or peers.

pub mod date;
pub mod dedup;
pub mod summary;

use std::fmt;

use crate::config::Mm4Check;
use crate::route::{Address, Numbering};

/// Bounds on a message's structure that hold in every check mode, so a
/// hostile message costs bounded work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Most header fields in one header section: the message's, or a
    /// MIME part's.
    pub max_header_fields: usize,
    /// Largest header section, the message's or a MIME part's, in octets.
    pub max_header_size: usize,
    /// Most nested multiparts.
    pub max_mime_depth: usize,
}

impl Default for Limits {
    /// 1000 fields, 64 KiB, 10 levels (corpus README for the depth).
    fn default() -> Limits {
        Limits {
            max_header_fields: 1000,
            max_header_size: 64 * 1024,
            max_mime_depth: 10,
        }
    }
}

/// Refuses a header section with too many fields or too many octets,
/// looking no further than the limits.
pub fn check_limits(data: &[u8], limits: &Limits) -> Result<(), Mm4Error> {
    let mut fields = 0;
    for (pos, line) in lines(data) {
        let end = pos + line.len();
        if line == b"\r\n" || line == b"\n" {
            return Ok(());
        }
        if !matches!(line[0], b' ' | b'\t') {
            fields += 1;
        }
        if fields > limits.max_header_fields {
            return Err(Mm4Error {
                status: "5.3.4",
                reason: format!("more than {} header fields", limits.max_header_fields),
            });
        }
        if end > limits.max_header_size {
            return Err(Mm4Error {
                status: "5.3.4",
                reason: format!("header section over {} octets", limits.max_header_size),
            });
        }
    }
    Ok(())
}

/// The lines of `data`, each with its offset, LF included (the last one
/// may have none).
fn lines(data: &[u8]) -> impl Iterator<Item = (usize, &[u8])> {
    let mut pos = 0;
    std::iter::from_fn(move || {
        let start = pos;
        if start >= data.len() {
            return None;
        }
        pos = data[start..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(data.len(), |p| start + p + 1);
        Some((start, &data[start..pos]))
    })
}
/// Highest `X-Mms-Forward-Counter` before we call it a loop.
pub const MAX_FORWARD_COUNTER: u32 = 10;

/// The six MM4 PDUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pdu {
    /// MM4_forward.REQ: carries the MM.
    ForwardReq,
    /// MM4_forward.RES.
    ForwardRes,
    /// MM4_delivery_report.REQ.
    DeliveryReportReq,
    /// MM4_delivery_report.RES.
    DeliveryReportRes,
    /// MM4_read_reply_report.REQ.
    ReadReplyReq,
    /// MM4_read_reply_report.RES.
    ReadReplyRes,
}

impl Pdu {
    fn parse(v: &str) -> Option<Pdu> {
        const NAMES: [(&str, Pdu); 6] = [
            ("MM4_forward.REQ", Pdu::ForwardReq),
            ("MM4_forward.RES", Pdu::ForwardRes),
            ("MM4_delivery_report.REQ", Pdu::DeliveryReportReq),
            ("MM4_delivery_report.RES", Pdu::DeliveryReportRes),
            ("MM4_read_reply_report.REQ", Pdu::ReadReplyReq),
            ("MM4_read_reply_report.RES", Pdu::ReadReplyRes),
        ];
        NAMES
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(v))
            .map(|&(_, p)| p)
    }

    /// The canonical `X-Mms-Message-Type` value.
    pub fn name(self) -> &'static str {
        match self {
            Pdu::ForwardReq => "MM4_forward.REQ",
            Pdu::ForwardRes => "MM4_forward.RES",
            Pdu::DeliveryReportReq => "MM4_delivery_report.REQ",
            Pdu::DeliveryReportRes => "MM4_delivery_report.RES",
            Pdu::ReadReplyReq => "MM4_read_reply_report.REQ",
            Pdu::ReadReplyRes => "MM4_read_reply_report.RES",
        }
    }

    /// Headers that must be present (beyond type and version).
    fn mandatory(self) -> &'static [&'static str] {
        const TID: &str = "X-Mms-Transaction-ID";
        const MID: &str = "X-Mms-Message-ID";
        const RSC: &str = "X-Mms-Request-Status-Code";
        match self {
            Pdu::ForwardReq => &[TID, MID, "From", "Date", "Content-Type"],
            Pdu::ForwardRes => &[TID, MID, RSC],
            Pdu::DeliveryReportReq => &[TID, MID, "From", "To", "Date", "X-Mms-MM-Status-Code"],
            Pdu::ReadReplyReq => &[TID, MID, "From", "To", "Date", "X-Mms-Read-Status"],
            Pdu::DeliveryReportRes | Pdu::ReadReplyRes => &[TID, RSC],
        }
    }
}

impl fmt::Display for Pdu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What the relay learns from a message that passed the check.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Mm4Info {
    /// The PDU type, when known.
    pub pdu: Option<Pdu>,
    /// `X-Mms-Message-ID`, unquoted.
    pub message_id: Option<String>,
    /// `X-Mms-Transaction-ID`, unquoted.
    pub transaction_id: Option<String>,
    /// `X-Mms-Expiry`, when it parses.
    pub expiry: Option<Expiry>,
    /// `X-Mms-Ack-Request: Yes`: the sender wants an MM4_forward.RES.
    pub ack_request: bool,
    /// `X-Mms-Delivery-Report: Yes`.
    pub delivery_report: bool,
    /// `X-Mms-Request-Status-Code`, or for a report `X-Mms-MM-Status-Code`.
    pub status: Option<String>,
    /// `X-Mms-Status-Text`.
    pub status_text: Option<String>,
}

/// `X-Mms-Expiry`: an RFC 2822 date, or (seen in the wild) seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expiry {
    /// This long after acceptance.
    Relative(std::time::Duration),
    /// At this time.
    Absolute(std::time::SystemTime),
}

impl Expiry {
    fn parse(v: &str) -> Option<Expiry> {
        match v.trim().parse::<u64>() {
            Ok(secs) => Some(Expiry::Relative(std::time::Duration::from_secs(secs))),
            Err(_) => crate::mm4::date::parse(v).map(Expiry::Absolute),
        }
    }

    /// The moment it expires, for a message accepted at `accepted`; `None`
    /// when that lies beyond what the clock can represent (a sender's
    /// `X-Mms-Expiry: 9999999999999999999` means "never", not a panic).
    pub fn at(self, accepted: std::time::SystemTime) -> Option<std::time::SystemTime> {
        match self {
            Expiry::Relative(d) => accepted.checked_add(d),
            Expiry::Absolute(t) => Some(t),
        }
    }
}

/// A header value as a refusal quotes it: its first 64 characters, in
/// Rust's escaped form. The reason becomes a reply line and a log line; a
/// sender's 63 KB value must not make either long.
fn quote(v: &str) -> String {
    const MAX: usize = 64;
    match v.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{:?}... ({} octets)", &v[..cut], v.len()),
        None => format!("{v:?}"),
    }
}

/// Why a message was refused: becomes the reply at the end of DATA.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mm4Error {
    /// Enhanced status code, such as `5.6.0`.
    pub status: &'static str,
    /// The reason, for the reply text and the log.
    pub reason: String,
}

impl Mm4Error {
    fn format(reason: impl Into<String>) -> Mm4Error {
        Mm4Error {
            status: "5.6.0",
            reason: reason.into(),
        }
    }
}

impl fmt::Display for Mm4Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.status, self.reason)
    }
}

impl std::error::Error for Mm4Error {}

/// One header field, with its raw value (folding kept, CRLFs inside).
#[derive(Clone, Copy, Debug)]
pub struct Field<'a> {
    /// The name as written.
    pub name: &'a str,
    /// The raw value after the colon.
    pub value: &'a [u8],
}

impl Field<'_> {
    /// The value unfolded, trimmed, and with surrounding quotes removed.
    pub fn text(&self) -> String {
        let unfolded: String = String::from_utf8_lossy(self.value).replace("\r\n", "");
        let t = unfolded.trim();
        t.strip_prefix('"')
            .and_then(|t| t.strip_suffix('"'))
            .unwrap_or(t)
            .to_string()
    }
}

/// Splits a header section from its body. Returns the fields and the
/// offset where the body starts (after the empty line), or an error for a
/// line that is neither a field nor a continuation.
pub fn parse_header(data: &[u8]) -> Result<(Vec<Field<'_>>, usize), Mm4Error> {
    /// Name start, colon, value end of the field being read.
    type Open = Option<(usize, usize, usize)>;
    fn flush<'a>(data: &'a [u8], cur: Open, fields: &mut Vec<Field<'a>>) {
        if let Some((start, colon, end)) = cur {
            let name = std::str::from_utf8(&data[start..colon])
                .unwrap_or("")
                .trim_end();
            fields.push(Field {
                name,
                value: &data[colon + 1..end],
            });
        }
    }
    let mut fields = Vec::new();
    let mut current: Open = None;
    for (pos, line) in lines(data) {
        let end = pos + line.len();
        let content_end = end
            - line
                .iter()
                .rev()
                .take_while(|&&b| b == b'\n' || b == b'\r')
                .count();
        if content_end == pos {
            flush(data, current.take(), &mut fields);
            return Ok((fields, end));
        }
        if line[0] == b' ' || line[0] == b'\t' {
            let Some(cur) = current.as_mut() else {
                return Err(Mm4Error::format(
                    "header section starts with a continuation line",
                ));
            };
            cur.2 = content_end;
        } else {
            flush(data, current.take(), &mut fields);
            let colon = line
                .iter()
                .position(|&b| b == b':')
                .filter(|&c| c > 0 && line[..c].iter().all(|&b| b.is_ascii_graphic() || b == b' '))
                .ok_or_else(|| {
                    Mm4Error::format("malformed header line (no field name and colon)")
                })?;
            current = Some((pos, pos + colon, content_end));
        }
    }
    flush(data, current, &mut fields);
    Ok((fields, data.len()))
}

fn find<'a>(fields: &[Field<'a>], name: &str) -> Option<Field<'a>> {
    fields
        .iter()
        .find(|f| f.name.eq_ignore_ascii_case(name))
        .copied()
}

fn count(fields: &[Field<'_>], name: &str) -> usize {
    fields
        .iter()
        .filter(|f| f.name.eq_ignore_ascii_case(name))
        .count()
}

/// Checks a message received for `rcpts` and reads its IDs.
pub fn check(
    data: &[u8],
    rcpts: &[&str],
    mode: Mm4Check,
    limits: &Limits,
) -> Result<Mm4Info, Mm4Error> {
    check_in(data, rcpts, mode, limits, &Numbering::default())
}

/// As [`check`], with the numbers of `rcpts` and of the `To` header read
/// by `numbering` (national forms, where the relay is configured for
/// them).
pub fn check_in(
    data: &[u8],
    rcpts: &[&str],
    mode: Mm4Check,
    limits: &Limits,
    numbering: &Numbering,
) -> Result<Mm4Info, Mm4Error> {
    check_limits(data, limits)?;
    let parsed = parse_header(data);
    if mode == Mm4Check::Off {
        let fields = parsed.map(|(f, _)| f).unwrap_or_default();
        return Ok(info(&fields, None));
    }
    let (fields, body_start) = parsed?;
    let strict = mode == Mm4Check::Strict;

    let pdu = match count(&fields, "X-Mms-Message-Type") {
        0 => return Err(Mm4Error::format("no X-Mms-Message-Type header")),
        1 => {
            let v = find(&fields, "X-Mms-Message-Type").expect("counted").text();
            Pdu::parse(&v).ok_or_else(|| {
                Mm4Error::format(format!("unknown X-Mms-Message-Type {}", quote(&v)))
            })?
        }
        _ => return Err(Mm4Error::format("more than one X-Mms-Message-Type header")),
    };
    if find(&fields, "X-Mms-Transaction-ID").is_none_or(|f| f.text().is_empty()) {
        return Err(Mm4Error::format("missing X-Mms-Transaction-ID"));
    }
    if strict {
        check_strict(&fields, data, body_start, pdu, rcpts, numbering)?;
    }
    if let Some(fc) = find(&fields, "X-Mms-Forward-Counter") {
        let n: u32 = fc
            .text()
            .parse()
            .map_err(|_| Mm4Error::format("X-Mms-Forward-Counter is not a number"))?;
        if n > MAX_FORWARD_COUNTER {
            return Err(Mm4Error {
                status: "5.4.6",
                reason: format!(
                    "X-Mms-Forward-Counter {n} over {MAX_FORWARD_COUNTER}: routing loop"
                ),
            });
        }
    }
    check_mime(&fields, &data[body_start..], 0, limits)?;
    if strict && pdu == Pdu::ForwardReq && body_start >= data.len() {
        return Err(Mm4Error::format("MM4_forward.REQ without a body"));
    }
    Ok(info(&fields, Some(pdu)))
}

fn info(fields: &[Field<'_>], pdu: Option<Pdu>) -> Mm4Info {
    let text = |n| find(fields, n).map(|f| f.text()).filter(|t| !t.is_empty());
    Mm4Info {
        pdu: pdu.or_else(|| find(fields, "X-Mms-Message-Type").and_then(|f| Pdu::parse(&f.text()))),
        message_id: text("X-Mms-Message-ID"),
        transaction_id: text("X-Mms-Transaction-ID"),
        expiry: text("X-Mms-Expiry").and_then(|v| Expiry::parse(&v)),
        ack_request: text("X-Mms-Ack-Request").is_some_and(|v| v.eq_ignore_ascii_case("yes")),
        delivery_report: text("X-Mms-Delivery-Report")
            .is_some_and(|v| v.eq_ignore_ascii_case("yes")),
        status: text("X-Mms-Request-Status-Code").or_else(|| text("X-Mms-MM-Status-Code")),
        status_text: text("X-Mms-Status-Text"),
    }
}

fn check_strict(
    fields: &[Field<'_>],
    data: &[u8],
    body_start: usize,
    pdu: Pdu,
    rcpts: &[&str],
    numbering: &Numbering,
) -> Result<(), Mm4Error> {
    if !data[..body_start].is_ascii() {
        return Err(Mm4Error::format(
            "8-bit octets in the header section (SMTPUTF8 is not offered)",
        ));
    }
    let version = find(fields, "X-Mms-3GPP-MMS-Version")
        .ok_or_else(|| Mm4Error::format("no X-Mms-3GPP-MMS-Version header"))?;
    let v = version.text();
    let parts: Vec<&str> = v.split('.').collect();
    if parts.len() != 3
        || parts
            .iter()
            .any(|p| p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(Mm4Error::format(format!(
            "X-Mms-3GPP-MMS-Version {} is not d.d.d",
            quote(&v)
        )));
    }
    for name in pdu.mandatory() {
        if find(fields, name).is_none_or(|f| f.text().is_empty()) {
            return Err(Mm4Error::format(format!(
                "{pdu} without the mandatory {name} header"
            )));
        }
    }
    if let Some(f) = find(fields, "X-Mms-MM-Status-Code") {
        const CODES: [&str; 8] = [
            "Expired",
            "Retrieved",
            "Rejected",
            "Deferred",
            "Indeterminate",
            "Forwarded",
            "Unrecognised",
            "Unreachable",
        ];
        let v = f.text();
        if !CODES.iter().any(|c| c.eq_ignore_ascii_case(&v)) {
            return Err(Mm4Error::format(format!(
                "X-Mms-MM-Status-Code {} is not a known status",
                quote(&v)
            )));
        }
    }
    if let Some(f) = find(fields, "X-Mms-Read-Status") {
        let v = f.text();
        if !["Read", "Deleted without being read"]
            .iter()
            .any(|c| c.eq_ignore_ascii_case(&v))
        {
            return Err(Mm4Error::format(format!(
                "X-Mms-Read-Status {} is not Read or Deleted without being read",
                quote(&v)
            )));
        }
    }
    if let Some(f) = find(fields, "X-Mms-Request-Status-Code") {
        let v = f.text();
        let ok = v.eq_ignore_ascii_case("Ok")
            || v.get(..6).is_some_and(|p| p.eq_ignore_ascii_case("Error-"));
        if !ok {
            return Err(Mm4Error::format(format!(
                "X-Mms-Request-Status-Code {} is not Ok or Error-*",
                quote(&v)
            )));
        }
    }
    if pdu != Pdu::ForwardReq {
        check_point_to_point(fields, pdu, rcpts, numbering)?;
    }
    Ok(())
}

/// RES and report PDUs go to one recipient, the one their `To` names.
fn check_point_to_point(
    fields: &[Field<'_>],
    pdu: Pdu,
    rcpts: &[&str],
    numbering: &Numbering,
) -> Result<(), Mm4Error> {
    let [rcpt] = rcpts else {
        return Err(Mm4Error::format(format!(
            "{pdu} must have exactly one recipient"
        )));
    };
    let to =
        find(fields, "To").ok_or_else(|| Mm4Error::format(format!("{pdu} without a To header")))?;
    let rcpt = Address::parse_envelope_in(rcpt, numbering)
        .map_err(|e| Mm4Error::format(format!("recipient: {e}")))?;
    let matches = split_addresses(&to.text())
        .iter()
        .filter_map(|a| Address::parse_in(a, numbering).ok())
        .any(|a| rcpt.same_recipient(&a));
    if !matches {
        return Err(Mm4Error::format(format!(
            "{pdu}: recipient {} is not the To header",
            rcpt.local
        )));
    }
    Ok(())
}

/// The addr-specs of an address list: `Name <a@b>, c@d` gives `a@b`, `c@d`.
fn split_addresses(list: &str) -> Vec<String> {
    let mut out = Vec::new();
    let (mut quoted, mut angle, mut start) = (false, false, 0);
    let push = |s: &str, out: &mut Vec<String>| {
        let s = s.trim();
        let addr = match (s.rfind('<'), s.rfind('>')) {
            (Some(a), Some(b)) if a < b => &s[a + 1..b],
            _ => s,
        };
        if !addr.is_empty() {
            out.push(addr.to_string());
        }
    };
    for (i, c) in list.char_indices() {
        match c {
            '"' => quoted = !quoted,
            '<' if !quoted => angle = true,
            '>' if !quoted => angle = false,
            ',' if !quoted && !angle => {
                push(&list[start..i], &mut out);
                start = i + 1;
            }
            _ => {}
        }
    }
    push(&list[start..], &mut out);
    out
}

/// The media type (lower case) and the `boundary` parameter of a
/// Content-Type value.
fn content_type(value: &str) -> (String, Option<String>) {
    let mut parts = split_params(value).into_iter();
    let media = parts.next().unwrap_or_default().trim().to_ascii_lowercase();
    let boundary = parts.find_map(|p| {
        let (k, v) = p.split_once('=')?;
        k.trim().eq_ignore_ascii_case("boundary").then(|| {
            let v = v.trim();
            v.strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(v)
                .to_string()
        })
    });
    (media, boundary)
}

fn split_params(value: &str) -> Vec<String> {
    let mut out = Vec::new();
    let (mut quoted, mut start) = (false, 0);
    for (i, c) in value.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ';' if !quoted => {
                out.push(value[start..i].to_string());
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(value[start..].to_string());
    out
}

/// Checks that every multipart has a boundary, at least one part and its
/// closing delimiter, no deeper than the limit, and every part's header
/// section within the header limits.
fn check_mime(
    fields: &[Field<'_>],
    body: &[u8],
    depth: usize,
    limits: &Limits,
) -> Result<(), Mm4Error> {
    let max_depth = limits.max_mime_depth;
    let Some(ct) = find(fields, "Content-Type") else {
        return Ok(());
    };
    let (media, boundary) = content_type(&ct.text());
    if !media.starts_with("multipart/") {
        return Ok(());
    }
    if depth >= max_depth {
        return Err(Mm4Error::format(format!(
            "MIME nesting deeper than {max_depth}"
        )));
    }
    let boundary = boundary
        .filter(|b| !b.is_empty() && b.len() <= 70)
        .ok_or_else(|| Mm4Error::format(format!("{} without a valid boundary", quote(&media))))?;
    let delimiter = format!("--{boundary}");
    let mut part_start: Option<usize> = None;
    for (pos, line) in lines(body) {
        let end = pos + line.len();
        if let Some(rest) = line.strip_prefix(delimiter.as_bytes()) {
            let closing = rest.starts_with(b"--");
            let tail = if closing { &rest[2..] } else { rest };
            if tail.iter().all(|b| b.is_ascii_whitespace()) {
                if let Some(start) = part_start {
                    // The CRLF before the delimiter belongs to the delimiter.
                    let part_end = pos.saturating_sub(2).max(start);
                    check_part(&body[start..part_end], depth, limits)?;
                }
                if closing {
                    return Ok(());
                }
                part_start = Some(end);
            }
        }
    }
    Err(Mm4Error::format(match part_start {
        None => format!("{} body has no part", quote(&media)),
        Some(_) => format!("{} body has no closing boundary", quote(&media)),
    }))
}

fn check_part(part: &[u8], depth: usize, limits: &Limits) -> Result<(), Mm4Error> {
    check_limits(part, limits)?;
    let (fields, body_start) = parse_header(part)?;
    check_mime(&fields, &part[body_start..], depth + 1, limits)
}

#[cfg(test)]
mod tests {
    use super::*;

    const REQ: &str = "X-Mms-3GPP-MMS-Version: 6.8.0\r\nX-Mms-Message-Type: MM4_forward.REQ\r\n\
        X-Mms-Transaction-ID: \"t-1\"\r\nX-Mms-Message-ID: m-1\r\nFrom: +447700900123/TYPE=PLMN\r\n\
        To: +12025550142/TYPE=PLMN\r\nDate: Tue, 18 Mar 2025 09:00:00 +0000\r\n\
        Content-Type: multipart/mixed;\r\n\tboundary=\"b1\"\r\n\r\npreamble\r\n--b1\r\n\
        Content-Type: text/plain\r\n\r\nhello\r\n--b1--\r\n";
    const RCPT: &str = "+12025550142/TYPE=PLMN@mms.mnc020.mcc001.gprs";

    fn strict(msg: &str, rcpts: &[&str]) -> Result<Mm4Info, Mm4Error> {
        check(msg.as_bytes(), rcpts, Mm4Check::Strict, &Limits::default())
    }

    #[test]
    fn accepts_a_forward_req_and_reads_ids() {
        let info = strict(REQ, &[RCPT]).unwrap();
        assert_eq!(info.pdu, Some(Pdu::ForwardReq));
        assert_eq!(info.transaction_id.as_deref(), Some("t-1"));
        assert_eq!(info.message_id.as_deref(), Some("m-1"));
        assert_eq!(info.expiry, None);
        let relative =
            strict(&REQ.replace("From:", "X-Mms-Expiry: 600\r\nFrom:"), &[RCPT]).unwrap();
        assert_eq!(
            relative.expiry,
            Some(Expiry::Relative(std::time::Duration::from_secs(600)))
        );
        let absolute = REQ.replace(
            "From:",
            "X-Mms-Expiry: Tue, 18 Mar 2025 10:00:00 +0000\r\nFrom:",
        );
        assert!(matches!(
            strict(&absolute, &[RCPT]).unwrap().expiry,
            Some(Expiry::Absolute(_))
        ));
    }

    #[test]
    fn refuses_broken_pdus() {
        let cases = [
            (
                REQ.replace("X-Mms-Message-Type: MM4_forward.REQ\r\n", ""),
                "no X-Mms-Message-Type",
            ),
            (
                REQ.replace("MM4_forward.REQ", "MM7_submit.REQ"),
                "unknown X-Mms-Message-Type",
            ),
            (
                REQ.replace("X-Mms-Message-ID: m-1\r\n", ""),
                "mandatory X-Mms-Message-ID",
            ),
            (REQ.replace("6.8.0", "6.8"), "not d.d.d"),
            (REQ.replace("--b1--", "--b1"), "no closing boundary"),
            (
                REQ.replace("boundary=\"b1\"", "charset=x"),
                "without a valid boundary",
            ),
            (
                REQ.replace("Date:", "Date : x\r\nbroken line\r\nX:"),
                "malformed header",
            ),
            (
                REQ.replace("From:", "X-Mms-Forward-Counter: 11\r\nFrom:"),
                "routing loop",
            ),
            (REQ.replace("From:", "Subject: caf\u{e9}\r\nFrom:"), "8-bit"),
        ];
        for (msg, want) in cases {
            let err = strict(&msg, &[RCPT]).unwrap_err();
            assert!(err.reason.contains(want), "{err} lacks {want}");
        }
    }

    #[test]
    fn lenient_and_off() {
        let eight_bit = REQ.replace("From:", "Subject: caf\u{e9}\r\nFrom:");
        assert!(
            check(
                eight_bit.as_bytes(),
                &[RCPT],
                Mm4Check::Lenient,
                &Limits::default()
            )
            .is_ok()
        );
        let no_type = REQ.replace("X-Mms-Message-Type: MM4_forward.REQ\r\n", "");
        assert!(
            check(
                no_type.as_bytes(),
                &[RCPT],
                Mm4Check::Lenient,
                &Limits::default()
            )
            .is_err()
        );
        let info = check(b"garbage", &[RCPT], Mm4Check::Off, &Limits::default()).unwrap();
        assert_eq!(info.pdu, None);
    }

    #[test]
    fn report_must_match_its_recipient() {
        let report = "X-Mms-3GPP-MMS-Version: 6.8.0\r\nX-Mms-Message-Type: MM4_delivery_report.REQ\r\n\
            X-Mms-Transaction-ID: t\r\nX-Mms-Message-ID: m\r\nX-Mms-MM-Status-Code: Retrieved\r\n\
            From: +12025550142/TYPE=PLMN\r\nTo: \"Ann\" <+447700900123/TYPE=PLMN>\r\nDate: x\r\n\r\n";
        let ok = "+447700900123/TYPE=PLMN@mms.mnc010.mcc001.gprs";
        let other = "+447700900999/TYPE=PLMN@mms.mnc010.mcc001.gprs";
        assert!(strict(report, &[ok]).is_ok());
        assert!(strict(report, &[other]).is_err());
        assert!(strict(report, &[ok, ok]).is_err());
        assert!(
            check(
                report.as_bytes(),
                &[other],
                Mm4Check::Lenient,
                &Limits::default()
            )
            .is_ok()
        );
        let bad_status = report.replace("Retrieved", "Delivered");
        assert!(
            strict(&bad_status, &[ok])
                .unwrap_err()
                .reason
                .contains("Delivered")
        );
    }

    #[test]
    fn a_report_in_national_form_matches_by_the_numbering_plan() {
        let report = "X-Mms-3GPP-MMS-Version: 6.8.0\r\nX-Mms-Message-Type: MM4_delivery_report.REQ\r\n\
            X-Mms-Transaction-ID: t\r\nX-Mms-Message-ID: m\r\nX-Mms-MM-Status-Code: Retrieved\r\n\
            From: +12025550142/TYPE=PLMN\r\nTo: 07700900123/TYPE=PLMN\r\nDate: x\r\n\r\n";
        let uk = Numbering {
            country_code: Some("44".into()),
            ..Numbering::default()
        };
        let strict_in = |rcpt: &str, n: &Numbering| {
            check_in(
                report.as_bytes(),
                &[rcpt],
                Mm4Check::Strict,
                &Limits::default(),
                n,
            )
        };
        // The envelope in either form, the To header national.
        for rcpt in [
            "07700900123/TYPE=PLMN@mms.mnc010.mcc001.gprs",
            "+447700900123/TYPE=PLMN@mms.mnc010.mcc001.gprs",
        ] {
            assert!(strict_in(rcpt, &uk).is_ok(), "{rcpt}");
            assert!(strict_in(rcpt, &Numbering::default()).is_err(), "{rcpt}");
        }
        assert!(strict_in("07700900999/TYPE=PLMN@mms.mnc010.mcc001.gprs", &uk).is_err());
    }

    #[test]
    fn nesting_is_bounded() {
        let mut msg = String::from(
            "X-Mms-3GPP-MMS-Version: 6.8.0\r\nX-Mms-Message-Type: MM4_forward.REQ\r\nX-Mms-Transaction-ID: t\r\n\
             X-Mms-Message-ID: m\r\nFrom: a\r\nDate: d\r\nContent-Type: multipart/mixed; boundary=b0\r\n\r\n",
        );
        let depth = 40;
        for i in 0..depth {
            msg.push_str(&format!(
                "--b{i}\r\nContent-Type: multipart/mixed; boundary=b{}\r\n\r\n",
                i + 1
            ));
        }
        msg.push_str(&format!("--b{depth}\r\n\r\nx\r\n--b{depth}--\r\n"));
        for i in (0..depth).rev() {
            msg.push_str(&format!("--b{i}--\r\n"));
        }
        let err = strict(&msg, &[RCPT]).unwrap_err();
        assert!(err.reason.contains("deeper"), "{err}");
    }

    #[test]
    fn splits_address_lists() {
        assert_eq!(split_addresses("\"A, B\" <a@b>, c@d"), vec!["a@b", "c@d"]);
        assert_eq!(split_addresses(""), Vec::<String>::new());
    }

    #[test]
    fn header_limits_hold_in_every_mode() {
        let limits = Limits {
            max_header_fields: 5,
            max_header_size: 1024,
            max_mime_depth: 10,
        };
        let mut many = String::new();
        for i in 0..6 {
            many.push_str(&format!("X-H{i}: v\r\n  folded\r\n"));
        }
        many.push_str("\r\nbody\r\n");
        let big = format!("Subject: {}\r\n\r\n", "x".repeat(2000));
        for mode in [Mm4Check::Strict, Mm4Check::Lenient, Mm4Check::Off] {
            let e = check(many.as_bytes(), &[RCPT], mode, &limits).unwrap_err();
            assert!(e.to_string().contains("more than 5 header fields"), "{e}");
            let e = check(big.as_bytes(), &[RCPT], mode, &limits).unwrap_err();
            assert!(
                e.to_string().starts_with("5.3.4 header section over 1024"),
                "{e}"
            );
        }
        // Five fields with continuation lines, and a big body, are fine.
        let five: String = many.lines().take(10).map(|l| format!("{l}\r\n")).collect();
        let ok = format!("{five}\r\n{}", "y".repeat(5000));
        assert!(check_limits(ok.as_bytes(), &limits).is_ok());
    }

    #[test]
    fn header_limits_hold_in_every_mime_part() {
        let limits = Limits {
            max_header_fields: 5,
            max_header_size: 1024,
            max_mime_depth: 10,
        };
        let part_fields: String = (0..9).map(|i| format!("X-P{i}: v\r\n")).collect();
        let many = REQ.replace(
            "--b1\r\nContent-Type: text/plain\r\n",
            &format!("--b1\r\n{part_fields}"),
        );
        let big = REQ.replace(
            "--b1\r\nContent-Type: text/plain\r\n",
            &format!("--b1\r\nX-Big: {}\r\n", "x".repeat(2000)),
        );
        // The message's own section has 8 fields: allowed; the part's 9 not.
        let limits = Limits {
            max_header_fields: 8,
            ..limits
        };
        for mode in [Mm4Check::Strict, Mm4Check::Lenient] {
            let e = check(many.as_bytes(), &[RCPT], mode, &limits).unwrap_err();
            assert!(e.to_string().contains("more than 8 header fields"), "{e}");
            let e = check(big.as_bytes(), &[RCPT], mode, &limits).unwrap_err();
            assert!(
                e.to_string().starts_with("5.3.4 header section over 1024"),
                "{e}"
            );
            assert!(check(REQ.as_bytes(), &[RCPT], mode, &limits).is_ok());
        }
    }

    #[test]
    fn an_expiry_beyond_the_clock_is_never_a_panic() {
        let msg = REQ.replace("From:", "X-Mms-Expiry: 9999999999999999999\r\nFrom:");
        let info = strict(&msg, &[RCPT]).unwrap();
        let expiry = info.expiry.expect("read as relative seconds");
        assert_eq!(expiry.at(std::time::SystemTime::now()), None);
        let soon = Expiry::Relative(std::time::Duration::from_secs(600));
        assert!(soon.at(std::time::SystemTime::now()).is_some());
    }
}
