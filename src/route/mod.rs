//! MMS addresses and the routing table: which peer a recipient belongs to.
//!
//! Address forms (MM4.md §3): `+E164/TYPE=PLMN@domain`, `a.b.c.d/TYPE=IPv4@domain`,
//! `ipv6/TYPE=IPv6@domain`, or a plain mailbox `local@domain`.
//!
//! Routing policy, first match wins:
//! - a PLMN number: its number-portability entry (`np.rs`: the number
//!   itself, else the longest block it is in), then the longest number
//!   prefix, then the domain, then the default peer;
//! - anything else: the domain (exact, then the longest `*.suffix`), then
//!   the default peer.
//!
//! `access.rs` is relay control: who a client is by its address, and
//! where it may send. This part is pure tables: no I/O, no other part.

pub mod access;
pub mod np;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use np::{NpMatch, NpTable};

/// Index of a peer in the relay's peer list.
pub type PeerId = usize;

/// Longest E.164 number (ITU-T E.164 §6).
const MAX_E164_DIGITS: usize = 15;

/// What kind of address the local part holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AddressKind {
    /// A phone number, normalised to `+` and digits.
    Plmn(String),
    /// `/TYPE=IPv4`.
    Ipv4(Ipv4Addr),
    /// `/TYPE=IPv6`.
    Ipv6(Ipv6Addr),
    /// An ordinary mailbox (system mailbox, e-mail user).
    Mailbox,
}

/// A parsed MMS address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Address {
    /// The local part, without surrounding quotes.
    pub local: String,
    /// The domain in lower case; empty when the address had none (headers only).
    pub domain: String,
    /// What the local part names.
    pub kind: AddressKind,
}

/// Why an address cannot be parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddressError(pub &'static str);

impl fmt::Display for AddressError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for AddressError {}

impl Address {
    /// Parses an envelope address (RCPT/MAIL path); the domain is required.
    pub fn parse_envelope(s: &str) -> Result<Address, AddressError> {
        let a = Address::parse(s)?;
        if a.domain.is_empty() {
            return Err(AddressError("address needs a domain"));
        }
        Ok(a)
    }

    /// Parses an envelope address whose number may be in the national
    /// forms `numbering` allows.
    pub fn parse_envelope_in(s: &str, numbering: &Numbering) -> Result<Address, AddressError> {
        let a = Address::parse_in(s, numbering)?;
        if a.domain.is_empty() {
            return Err(AddressError("address needs a domain"));
        }
        Ok(a)
    }

    /// Parses an address as found in a header: `@domain` may be missing.
    pub fn parse(s: &str) -> Result<Address, AddressError> {
        Address::parse_in(s, &Numbering::default())
    }

    /// As [`Address::parse`], with numbers read by `numbering`.
    pub fn parse_in(s: &str, numbering: &Numbering) -> Result<Address, AddressError> {
        let s = s.trim();
        let (local, domain) = match s.rfind('@') {
            Some(i) if !s[i..].contains('"') => (&s[..i], &s[i + 1..]),
            _ => (s, ""),
        };
        if !domain.is_empty() && !valid_domain(domain) {
            return Err(AddressError("bad domain"));
        }
        if s.contains('@') && domain.is_empty() {
            return Err(AddressError("empty domain"));
        }
        let local = local
            .strip_prefix('"')
            .and_then(|l| l.strip_suffix('"'))
            .unwrap_or(local);
        if local.is_empty() {
            return Err(AddressError("empty local part"));
        }
        let kind = match find_ci(local, "/TYPE=") {
            None => AddressKind::Mailbox,
            Some(i) => {
                let (value, ty) = (&local[..i], &local[i + 6..]);
                if ty.eq_ignore_ascii_case("PLMN") {
                    AddressKind::Plmn(numbering.international(value)?)
                } else if ty.eq_ignore_ascii_case("IPv4") {
                    AddressKind::Ipv4(
                        value
                            .parse()
                            .map_err(|_| AddressError("bad IPv4 address"))?,
                    )
                } else if ty.eq_ignore_ascii_case("IPv6") {
                    AddressKind::Ipv6(
                        value
                            .parse()
                            .map_err(|_| AddressError("bad IPv6 address"))?,
                    )
                } else {
                    return Err(AddressError("unknown /TYPE"));
                }
            }
        };
        Ok(Address {
            local: local.to_string(),
            domain: domain.to_ascii_lowercase(),
            kind,
        })
    }

    /// True if a header address names the same recipient as this envelope
    /// address: same number, or same mailbox; the header may omit the domain.
    pub fn same_recipient(&self, header: &Address) -> bool {
        let same_domain = header.domain.is_empty() || header.domain == self.domain;
        match (&self.kind, &header.kind) {
            (AddressKind::Plmn(a), AddressKind::Plmn(b)) => a == b && same_domain,
            _ => self.local.eq_ignore_ascii_case(&header.local) && same_domain,
        }
    }
}

fn find_ci(haystack: &str, needle: &str) -> Option<usize> {
    haystack
        .as_bytes()
        .windows(needle.len())
        .position(|w| w.eq_ignore_ascii_case(needle.as_bytes()))
}

/// How numbers in national and international forms read (`[routes]
/// country_code`, `national_prefix`, `international_prefix`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Numbering {
    /// The country code of national numbers (`None`: national forms are
    /// refused, since they cannot be routed without it).
    pub country_code: Option<String>,
    /// What a national number starts with instead of the country code.
    pub national_prefix: String,
    /// What an international number starts with instead of `+`.
    pub international_prefix: String,
}

impl Default for Numbering {
    /// No country code; `0` and `00`.
    fn default() -> Numbering {
        Numbering {
            country_code: None,
            national_prefix: "0".into(),
            international_prefix: "00".into(),
        }
    }
}

impl Numbering {
    /// A number as `+` and digits: `+4477...`, `004477...` (the
    /// international prefix) and, with a country code, `077...` (the
    /// national prefix) all become `+4477...`.
    pub fn international(&self, s: &str) -> Result<String, AddressError> {
        let ip = &self.international_prefix;
        let digits = if let Some(d) = s.strip_prefix('+') {
            d.to_string()
        } else if let Some(d) = s.strip_prefix(ip.as_str()).filter(|_| !ip.is_empty()) {
            d.to_string()
        } else if let (Some(cc), Some(d)) = (
            &self.country_code,
            s.strip_prefix(self.national_prefix.as_str())
                .filter(|d| !d.is_empty()),
        ) {
            format!("{cc}{d}")
        } else {
            return Err(AddressError("PLMN number must be international (+CC...)"));
        };
        if digits.is_empty()
            || digits.len() > MAX_E164_DIGITS
            || !digits.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(AddressError("PLMN number must be + and 1 to 15 digits"));
        }
        Ok(format!("+{digits}"))
    }
}

/// True if `d` is a domain name (labels of letters, digits and `-`) or an
/// address literal.
pub fn valid_domain(d: &str) -> bool {
    if let Some(lit) = d.strip_prefix('[').and_then(|d| d.strip_suffix(']')) {
        return lit.parse::<Ipv4Addr>().is_ok()
            || lit
                .strip_prefix("IPv6:")
                .is_some_and(|v6| v6.parse::<Ipv6Addr>().is_ok());
    }
    d.len() <= 255
        && d.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// The rule that routed a recipient.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rule {
    /// A number-portability entry for the number itself.
    PortedExact,
    /// A number-portability block of this many digits.
    PortedBlock(usize),
    /// The domain an ENUM answer gave the number.
    Enum(String),
    /// A peer's number prefix.
    Prefix(String),
    /// A peer's domain, exactly.
    Domain(String),
    /// A peer's `*.suffix`.
    Suffix(String),
    /// `[routes] default`.
    Default,
    /// A peer made at run time for this domain (`[routes] dynamic`).
    Dynamic(String),
}

/// Where a recipient goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Routed {
    /// To a peer, by a rule.
    Peer(PeerId, Rule),
    /// To a dynamic peer not made yet, for this domain.
    NewPeer(String),
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rule::PortedExact => f.write_str("ported (exact number)"),
            Rule::PortedBlock(n) => write!(f, "ported (block of {n} digits)"),
            Rule::Enum(d) => write!(f, "ENUM answer {d}"),
            Rule::Prefix(p) => write!(f, "prefix {p}"),
            Rule::Domain(d) => write!(f, "domain {d}"),
            Rule::Suffix(s) => write!(f, "domain *{s}"),
            Rule::Default => f.write_str("default"),
            Rule::Dynamic(d) => write!(f, "dynamic peer for {d}"),
        }
    }
}

/// The routing table, built once from the configuration.
#[derive(Clone, Debug, Default)]
pub struct Router {
    ported: Arc<NpTable>,
    prefixes: HashMap<String, PeerId>,
    longest_prefix: usize,
    domains: HashMap<String, PeerId>,
    /// `(".suffix", peer)`, longest suffix first.
    suffixes: Vec<(String, PeerId)>,
    default: Option<PeerId>,
    numbering: Numbering,
    /// `[routes] dynamic`: domains no peer claims get a peer of their own.
    dynamic: bool,
    /// The peers made that way.
    dynamic_peers: HashSet<PeerId>,
}

impl Router {
    /// An empty table.
    pub fn new() -> Router {
        Router::default()
    }

    /// Routes the numbers and blocks of `table` ahead of any prefix.
    pub fn set_ported(&mut self, table: Arc<NpTable>) {
        self.ported = table;
    }

    /// Routes numbers starting with `prefix` (`+` and digits) to `peer`.
    pub fn add_prefix(&mut self, prefix: &str, peer: PeerId) {
        self.longest_prefix = self.longest_prefix.max(prefix.len());
        self.prefixes.insert(prefix.to_string(), peer);
    }

    /// Routes a domain (exact, or `*.suffix` for its subdomains) to `peer`.
    pub fn add_domain(&mut self, pattern: &str, peer: PeerId) {
        let pattern = pattern.to_ascii_lowercase();
        match pattern.strip_prefix('*') {
            Some(suffix) => {
                self.suffixes.push((suffix.to_string(), peer));
                self.suffixes
                    .sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
            }
            None => {
                self.domains.insert(pattern, peer);
            }
        }
    }

    /// Reads recipients' numbers by `numbering`.
    pub fn set_numbering(&mut self, numbering: Numbering) {
        self.numbering = numbering;
    }

    /// How recipients' numbers are read.
    pub fn numbering(&self) -> &Numbering {
        &self.numbering
    }

    /// Makes a peer for every domain no peer claims; `made` are those
    /// made so far.
    pub fn set_dynamic(&mut self, made: impl IntoIterator<Item = PeerId>) {
        self.dynamic = true;
        self.dynamic_peers = made.into_iter().collect();
    }

    /// Sends everything no other rule matches to `peer`.
    pub fn set_default(&mut self, peer: PeerId) {
        self.default = Some(peer);
    }

    /// The peer for `addr`, if any rule matches.
    pub fn route(&self, addr: &Address) -> Option<PeerId> {
        self.explain(addr).map(|(p, _)| p)
    }

    /// The peer for `addr` and the rule that chose it.
    pub fn explain(&self, addr: &Address) -> Option<(PeerId, Rule)> {
        match self.explain_with(addr, |_| None)? {
            Routed::Peer(p, rule) => Some((p, rule)),
            Routed::NewPeer(_) => None,
        }
    }

    /// As [`Router::explain`], asking `enum_domain` for the domain of a
    /// number that has no number-portability entry: a domain a peer
    /// claims routes there; with `dynamic`, one no peer claims gets a peer
    /// of its own, ahead of prefixes, and so does a recipient's domain no
    /// peer claims, ahead of the default.
    pub fn explain_with(
        &self,
        addr: &Address,
        enum_domain: impl FnOnce(&str) -> Option<String>,
    ) -> Option<Routed> {
        if let AddressKind::Plmn(number) = &addr.kind {
            match self.ported.lookup(number) {
                Some((p, NpMatch::Exact)) => return Some(Routed::Peer(p, Rule::PortedExact)),
                Some((p, NpMatch::Block(n))) => {
                    return Some(Routed::Peer(p, Rule::PortedBlock(n)));
                }
                None => {}
            }
            if let Some(domain) = enum_domain(number) {
                match self.route_domain(&domain) {
                    Some((p, _)) => return Some(Routed::Peer(p, Rule::Enum(domain))),
                    None if self.dynamic && domain.contains('.') && !domain.starts_with('[') => {
                        return Some(Routed::NewPeer(domain));
                    }
                    None => {}
                }
            }
            let longest = self.longest_prefix.min(number.len());
            for len in (2..=longest).rev() {
                if let Some(&p) = self.prefixes.get(&number[..len]) {
                    return Some(Routed::Peer(p, Rule::Prefix(number[..len].to_string())));
                }
            }
        }
        if let Some((p, rule)) = self.route_domain(&addr.domain) {
            return Some(Routed::Peer(p, rule));
        }
        // A dotted name, not a literal: a dynamic peer's name is its
        // domain, which can then never be a configured peer's name.
        if self.dynamic && addr.domain.contains('.') && !addr.domain.starts_with('[') {
            return Some(Routed::NewPeer(addr.domain.clone()));
        }
        self.default.map(|p| Routed::Peer(p, Rule::Default))
    }

    /// What `mm4relay route` prints for `rcpt`: the peer and the rule, or
    /// why there is none; `peer_names` by peer id, `enum_domain` as for
    /// [`Router::explain_with`].
    pub fn explain_text(
        &self,
        rcpt: &str,
        peer_names: &[String],
        enum_domain: impl FnOnce(&str) -> Option<String>,
    ) -> String {
        let addr = match Address::parse_envelope_in(rcpt, &self.numbering) {
            Ok(a) => a,
            Err(e) => return format!("error: {rcpt:?} is not an address: {e}\n"),
        };
        match self.explain_with(&addr, enum_domain) {
            Some(Routed::Peer(p, rule)) => format!(
                "{rcpt} -> {} by {rule}\n",
                peer_names.get(p).map_or("?", String::as_str)
            ),
            Some(Routed::NewPeer(d)) => {
                format!("{rcpt} -> a new dynamic peer for {d}, if DNS finds it\n")
            }
            None => format!("{rcpt} -> no peer: 550 5.1.2 at RCPT\n"),
        }
    }

    fn route_domain(&self, domain: &str) -> Option<(PeerId, Rule)> {
        if let Some(&p) = self.domains.get(domain) {
            if self.dynamic_peers.contains(&p) {
                return Some((p, Rule::Dynamic(domain.to_string())));
            }
            return Some((p, Rule::Domain(domain.to_string())));
        }
        self.suffixes
            .iter()
            .find(|(suffix, _)| domain.len() > suffix.len() && domain.ends_with(suffix.as_str()))
            .map(|(suffix, p)| (*p, Rule::Suffix(suffix.clone())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_address_forms() {
        let a = Address::parse_envelope("+447700900123/TYPE=PLMN@MMS.mnc010.mcc001.gprs").unwrap();
        assert_eq!(a.kind, AddressKind::Plmn("+447700900123".into()));
        assert_eq!(a.domain, "mms.mnc010.mcc001.gprs");
        let a = Address::parse_envelope("0061491570156/type=plmn@x.gprs").unwrap();
        assert_eq!(a.kind, AddressKind::Plmn("+61491570156".into()));
        let a = Address::parse_envelope("198.51.100.23/TYPE=IPv4@x.gprs").unwrap();
        assert_eq!(a.kind, AddressKind::Ipv4(Ipv4Addr::new(198, 51, 100, 23)));
        let a = Address::parse_envelope("\"2001:db8::1/TYPE=IPv6\"@x.gprs").unwrap();
        assert!(matches!(a.kind, AddressKind::Ipv6(_)));
        let a = Address::parse_envelope("MMSC-OUT@mms.mnc456.mcc999.gprs").unwrap();
        assert_eq!(a.kind, AddressKind::Mailbox);
        assert_eq!(
            Address::parse("+447700900123/TYPE=PLMN").unwrap().domain,
            ""
        );
    }

    #[test]
    fn refuses_bad_addresses() {
        for bad in [
            "+4477OO900123/TYPE=PLMN@x.gprs",
            "447700900123/TYPE=PLMN@x.gprs",
            "+1234567890123456/TYPE=PLMN@x.gprs",
            "1.2.3/TYPE=IPv4@x.gprs",
            "+44/TYPE=FAX@x.gprs",
            "user@",
            "@x.gprs",
            "user@bad_domain",
            "user",
        ] {
            assert!(Address::parse_envelope(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn national_and_international_forms_read_by_the_numbering_plan() {
        let none = Numbering::default();
        let uk = Numbering {
            country_code: Some("44".into()),
            ..Numbering::default()
        };
        let us = Numbering {
            country_code: Some("1".into()),
            national_prefix: "1".into(),
            international_prefix: "011".into(),
        };
        for (n, s, want) in [
            (&none, "+447700900123", Ok("+447700900123")),
            (&none, "00447700900123", Ok("+447700900123")),
            (&none, "07700900123", Err(())),
            (&uk, "07700900123", Ok("+447700900123")),
            (&uk, "00447700900123", Ok("+447700900123")),
            (&uk, "+447700900123", Ok("+447700900123")),
            (&uk, "7700900123", Err(())),
            (&uk, "0", Err(())),
            (&uk, "0770090012345678", Err(())),
            (&us, "12025550142", Ok("+12025550142")),
            (&us, "01144770090012", Ok("+44770090012")),
            (&us, "0012025550142", Err(())),
        ] {
            assert_eq!(
                n.international(s).map_err(|_| ()),
                want.map(String::from),
                "{s}"
            );
        }
        let a = Address::parse_envelope_in("07700900123/TYPE=PLMN@x.gprs", &uk).unwrap();
        assert_eq!(a.kind, AddressKind::Plmn("+447700900123".into()));
        let mut r = router();
        let refused = r.explain_text("07700900123/TYPE=PLMN@x.gprs", &[], |_| None);
        assert!(refused.contains("not an address"), "{refused}");
        r.set_numbering(uk);
        assert_eq!(
            r.explain_text("07700900123/TYPE=PLMN@x.gprs", &["A".into()], |_| None),
            "07700900123/TYPE=PLMN@x.gprs -> A by prefix +447700900\n"
        );
    }

    fn router() -> Router {
        let mut r = Router::new();
        r.add_domain("mms.mnc010.mcc001.gprs", 0);
        r.add_prefix("+447700900", 0);
        r.add_domain("mms.mnc020.mcc001.gprs", 1);
        r.add_prefix("+1202555", 1);
        r.add_domain("*.mcc999.gprs", 2);
        r.add_prefix("+61491570", 2);
        r.set_ported(Arc::new(np::NpTable::from_entries(&[("+12025550177", 2)])));
        r
    }

    fn route(r: &Router, s: &str) -> Option<PeerId> {
        r.route(&Address::parse_envelope(s).unwrap())
    }

    #[test]
    fn routes_by_override_prefix_domain_default() {
        let mut r = router();
        assert_eq!(
            route(&r, "+12025550177/TYPE=PLMN@mms.mnc020.mcc001.gprs"),
            Some(2)
        );
        assert_eq!(
            route(&r, "+12025550142/TYPE=PLMN@mms.mnc010.mcc001.gprs"),
            Some(1)
        );
        assert_eq!(
            route(&r, "+99955501234/TYPE=PLMN@mms.mnc020.mcc001.gprs"),
            Some(1)
        );
        assert_eq!(route(&r, "MMSC-OUT@mms.mnc456.mcc999.gprs"), Some(2));
        assert_eq!(route(&r, "x@mcc999.gprs"), None);
        assert_eq!(
            route(&r, "198.51.100.23/TYPE=IPv4@MMS.mnc020.mcc001.gprs"),
            Some(1)
        );
        assert_eq!(
            route(&r, "+99955501234/TYPE=PLMN@mms.mnc099.mcc998.gprs"),
            None
        );
        r.set_default(0);
        assert_eq!(
            route(&r, "+99955501234/TYPE=PLMN@mms.mnc099.mcc998.gprs"),
            Some(0)
        );
    }

    #[test]
    fn enum_comes_after_number_portability_and_before_prefixes() {
        let r = router();
        let addr = |s: &str| Address::parse_envelope(s).unwrap();
        let to_b = |_: &str| Some("mms.mnc020.mcc001.gprs".to_string());
        let ported = addr("+12025550177/TYPE=PLMN@x.gprs");
        assert_eq!(
            r.explain_with(&ported, to_b),
            Some(Routed::Peer(2, Rule::PortedExact))
        );
        let plain = addr("+447700900123/TYPE=PLMN@x.gprs");
        assert_eq!(
            r.explain_with(&plain, to_b),
            Some(Routed::Peer(1, Rule::Enum("mms.mnc020.mcc001.gprs".into())))
        );
        let nobody = |_: &str| Some("unclaimed.test".to_string());
        assert_eq!(
            r.explain_with(&plain, nobody),
            Some(Routed::Peer(0, Rule::Prefix("+447700900".into())))
        );
        let mailbox = addr("x@mms.mnc010.mcc001.gprs");
        let never = |_: &str| -> Option<String> { panic!("ENUM asked for a mailbox") };
        assert_eq!(
            r.explain_with(&mailbox, never),
            Some(Routed::Peer(
                0,
                Rule::Domain("mms.mnc010.mcc001.gprs".into())
            ))
        );
    }

    #[test]
    fn dynamic_peers_for_unclaimed_domains_ahead_of_prefix_and_default() {
        let mut r = router();
        r.set_default(0);
        r.add_domain("made.test", 3);
        r.set_dynamic(vec![3]);
        let addr = |s: &str| Address::parse_envelope(s).unwrap();
        let plain = addr("+447700900123/TYPE=PLMN@x.gprs");
        assert_eq!(
            r.explain_with(&plain, |_| Some("new.test".into())),
            Some(Routed::NewPeer("new.test".into()))
        );
        assert_eq!(
            r.explain_with(&plain, |_| Some("made.test".into())),
            Some(Routed::Peer(3, Rule::Enum("made.test".into())))
        );
        assert_eq!(
            r.explain_with(&addr("x@other.test"), |_| None),
            Some(Routed::NewPeer("other.test".into()))
        );
        assert_eq!(
            r.explain_with(&addr("x@made.test"), |_| None),
            Some(Routed::Peer(3, Rule::Dynamic("made.test".into())))
        );
        assert_eq!(
            r.explain_with(&addr("x@[127.0.0.1]"), |_| None),
            Some(Routed::Peer(0, Rule::Default))
        );
    }

    #[test]
    fn header_matching() {
        let rcpt =
            Address::parse_envelope("+447700900123/TYPE=PLMN@mms.mnc010.mcc001.gprs").unwrap();
        assert!(rcpt.same_recipient(&Address::parse("+447700900123/TYPE=PLMN").unwrap()));
        assert!(rcpt.same_recipient(
            &Address::parse("+447700900123/TYPE=PLMN@MMS.mnc010.mcc001.gprs").unwrap()
        ));
        assert!(!rcpt.same_recipient(&Address::parse("+447700900999/TYPE=PLMN").unwrap()));
        let sys = Address::parse_envelope("mm4gw@mms.mnc010.mcc001.gprs").unwrap();
        assert!(sys.same_recipient(&Address::parse("MM4GW@mms.mnc010.mcc001.gprs").unwrap()));
        assert!(!sys.same_recipient(&Address::parse("mm4gw@other.gprs").unwrap()));
    }
}
