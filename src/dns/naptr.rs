//! ENUM without I/O: the name to ask for a number (RFC 6116 §2.4), the
//! best `E2U+mms` NAPTR record (RFC 3403 order and preference, RFC 4355's
//! "mms" Enumservice) and its regexp applied to the number (RFC 3402 §3.2).

use hickory_proto::rr::RData;
use hickory_proto::rr::rdata::NAPTR;
use regex::RegexBuilder;

/// Most octets a compiled ENUM regexp may take (a hostile record cannot
/// make the relay build a huge automaton).
const REGEX_SIZE_LIMIT: usize = 64 * 1024;

/// The ENUM name of `number` (`+` and digits) under `suffix`:
/// `+4477009` under `e164.arpa` is `9.0.0.7.7.4.4.e164.arpa.`.
pub fn enum_name(number: &str, suffix: &str) -> String {
    let mut name = String::with_capacity(number.len() * 2 + suffix.len() + 1);
    for d in number.bytes().rev().filter(u8::is_ascii_digit) {
        name.push(char::from(d));
        name.push('.');
    }
    name.push_str(suffix.trim_matches('.'));
    name.push('.');
    name
}

/// True if `services` names the mms Enumservice: `E2U+mms`, `E2U+mms:mailto`
/// or `E2U+mms:mms`, among others joined by `+`, in any case.
fn is_mms(services: &[u8]) -> bool {
    let Ok(s) = std::str::from_utf8(services) else {
        return false;
    };
    let mut parts = s.split('+');
    if !parts.next().is_some_and(|p| p.eq_ignore_ascii_case("E2U")) {
        return false;
    }
    parts.any(|p| {
        let (ty, sub) = p.split_once(':').unwrap_or((p, ""));
        ty.eq_ignore_ascii_case("mms")
            && (sub.is_empty()
                || sub.eq_ignore_ascii_case("mailto")
                || sub.eq_ignore_ascii_case("mms"))
    })
}

/// The URI `record`'s regexp makes of `number`, if it is terminal, its
/// regexp is well formed and it matches.
fn apply(record: &NAPTR, number: &str) -> Option<String> {
    // Only terminal rules ("u"): a non-terminal one would send us on to
    // another query, which ENUM for MMS does not use.
    if !record.flags.eq_ignore_ascii_case(b"u") {
        return None;
    }
    let re = std::str::from_utf8(&record.regexp).ok()?;
    let delim = re.chars().next()?;
    if delim.is_ascii_digit() || delim == '\\' || delim == 'i' {
        return None;
    }
    let body = &re[delim.len_utf8()..];
    let mut parts = body.split(delim);
    let (ere, repl, flags) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || !flags.chars().all(|c| c == 'i') {
        return None;
    }
    let re = RegexBuilder::new(ere)
        .case_insensitive(flags == "i")
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
        .ok()?;
    let caps = re.captures(number)?;
    let mut out = String::new();
    let mut chars = repl.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next()? {
                d @ '1'..='9' => {
                    let i = d.to_digit(10)? as usize;
                    out.push_str(caps.get(i).map_or("", |m| m.as_str()));
                }
                other => out.push(other),
            },
            c => out.push(c),
        }
    }
    Some(out)
}

/// The NAPTR records among an answer's `records`.
pub fn naptrs(records: &[RData]) -> Vec<NAPTR> {
    records
        .iter()
        .filter_map(|r| match r {
            RData::NAPTR(n) => Some(n.clone()),
            _ => None,
        })
        .collect()
}

/// The domain of the best usable `E2U+mms` record for `number`: the
/// lowest order, then the lowest preference, whose regexp yields a
/// `mailto:` or `mms:` URI with a domain.
pub fn best_domain(records: &[NAPTR], number: &str) -> Option<String> {
    let mut usable: Vec<&NAPTR> = records.iter().filter(|r| is_mms(&r.services)).collect();
    usable.sort_by_key(|r| (r.order, r.preference));
    usable.into_iter().find_map(|r| {
        let uri = apply(r, number)?;
        let (scheme, rest) = uri.split_once(':')?;
        if !scheme.eq_ignore_ascii_case("mailto") && !scheme.eq_ignore_ascii_case("mms") {
            return None;
        }
        let domain = rest.rsplit_once('@')?.1.trim_end_matches('.');
        let domain = domain.to_ascii_lowercase();
        // A name, not an address literal: the relay routes by domain.
        (crate::route::valid_domain(&domain) && !domain.starts_with('[')).then_some(domain)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::Name;

    fn naptr(order: u16, pref: u16, flags: &str, services: &str, regexp: &str) -> NAPTR {
        NAPTR::new(
            order,
            pref,
            flags.as_bytes().into(),
            services.as_bytes().into(),
            regexp.as_bytes().into(),
            Name::root(),
        )
    }

    #[test]
    fn the_enum_name_is_the_reversed_digits() {
        assert_eq!(
            enum_name("+447700900123", "e164.arpa"),
            "3.2.1.0.0.9.0.0.7.7.4.4.e164.arpa."
        );
        assert_eq!(enum_name("+12", ".e164.example."), "2.1.e164.example.");
    }

    #[test]
    fn the_best_mms_record_by_order_then_preference() {
        let n = "+447700900123";
        let to = |d: &str| format!("!^.*$!mailto:+447700900123/TYPE=PLMN@{d}!");
        let records = [
            naptr(10, 10, "u", "E2U+sip", "!^.*$!sip:x@sip.test!"),
            naptr(20, 10, "u", "E2U+mms:mailto", &to("late.test")),
            naptr(10, 20, "u", "E2U+mms:mailto", &to("second.test")),
            naptr(10, 10, "U", "e2u+MMS:mailto", &to("MMS.mnc005.mcc001.gprs")),
        ];
        assert_eq!(
            best_domain(&records, n).as_deref(),
            Some("mms.mnc005.mcc001.gprs")
        );
        assert_eq!(
            best_domain(&records[..3], n).as_deref(),
            Some("second.test")
        );
        assert_eq!(best_domain(&records[..1], n), None);
    }

    #[test]
    fn regexps_with_groups_flags_and_other_delimiters() {
        let n = "+447700900123";
        let r = naptr(1, 1, "u", "E2U+mms", "/^\\+44(.*)$/mms:0\\1@b.test/i");
        assert_eq!(best_domain(&[r], n).as_deref(), Some("b.test"));
        for bad in [
            "!^.*$!mailto:x@bad_domain!",
            "!^.*$!sip:x@a.test!",
            "!^\\+1.*$!mailto:x@a.test!",
            "!^(.*$!mailto:x@a.test!",
            "!^.*$!mailto:x@a.test!x",
            "!^.*$!mailto:nodomain!",
            "!^.*$!mailto:x@[10.0.0.1]!",
            "1^.*1mailto:x@a.test1",
        ] {
            let r = naptr(1, 1, "u", "E2U+mms:mailto", bad);
            assert_eq!(best_domain(&[r], n), None, "{bad}");
        }
        let nonterminal = naptr(1, 1, "", "E2U+mms:mailto", "!^.*$!mailto:x@a.test!");
        assert_eq!(best_domain(&[nonterminal], n), None);
        let huge = format!("!^{}$!mailto:x@a.test!", "(a*)*".repeat(2000));
        assert_eq!(best_domain(&[naptr(1, 1, "u", "E2U+mms", &huge)], n), None);
    }
}
