//! Relay control: who a client is, by its address, and where it may send.
//!
//! - A host of the local MMSC (`[listener] relay_from`) may send to any
//!   routable recipient.
//! - A partner's host (`[peer.NAME] accept_from`) may send only to
//!   recipients that route to a local peer (our own MMSC).
//! - Anybody else may send nothing: an open relay is a security defect.

use std::fmt;
use std::net::IpAddr;

use crate::route::PeerId;

/// An address block such as `10.0.0.0/8` or `2001:db8::/32`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `addr/len`, or a bare address meaning a single host.
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address or CIDR block"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|&p| p <= max)
                .ok_or_else(|| format!("{s:?} has a bad prefix length"))?,
        };
        Ok(Cidr { addr, prefix })
    }

    /// True if `ip` is inside this block (IPv4-mapped IPv6 counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - self.prefix as u32).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - self.prefix as u32).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// What a connecting client is allowed to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientClass {
    /// A host of the local MMSC.
    Local,
    /// A host of this partner peer.
    Partner(PeerId),
    /// Nobody we know.
    Unknown,
}

/// The relay-control table.
#[derive(Clone, Debug, Default)]
pub struct AccessControl {
    relay_from: Vec<Cidr>,
    partners: Vec<(Cidr, PeerId)>,
    local_peers: Vec<bool>,
}

impl AccessControl {
    /// Builds the table: `relay_from` blocks, each peer's `accept_from`
    /// blocks and whether each peer is local, indexed by peer id.
    pub fn new(
        relay_from: Vec<Cidr>,
        accept_from: &[Vec<Cidr>],
        local_peers: Vec<bool>,
    ) -> AccessControl {
        let partners = accept_from
            .iter()
            .enumerate()
            .flat_map(|(peer, blocks)| blocks.iter().map(move |&c| (c, peer)))
            .collect();
        AccessControl {
            relay_from,
            partners,
            local_peers,
        }
    }

    /// Classifies a client by its address; `relay_from` wins over partners.
    pub fn classify(&self, ip: IpAddr) -> ClientClass {
        if self.relay_from.iter().any(|c| c.contains(ip)) {
            return ClientClass::Local;
        }
        self.partners
            .iter()
            .find(|(c, _)| c.contains(ip))
            .map_or(ClientClass::Unknown, |&(_, p)| ClientClass::Partner(p))
    }

    /// True if `client` may send to a recipient that routes to `dest`.
    pub fn may_send(&self, client: ClientClass, dest: PeerId) -> bool {
        match client {
            ClientClass::Local => true,
            ClientClass::Partner(_) => self.local_peers.get(dest).copied().unwrap_or(false),
            ClientClass::Unknown => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn cidr_matching() {
        let c = Cidr::parse("10.1.0.0/16").unwrap();
        assert!(c.contains(ip("10.1.200.3")));
        assert!(!c.contains(ip("10.2.0.1")));
        assert!(c.contains(ip("::ffff:10.1.0.9")));
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains(ip("192.0.2.1")));
        assert!(
            Cidr::parse("2001:db8::/32")
                .unwrap()
                .contains(ip("2001:db8:1::5"))
        );
        assert!(Cidr::parse("127.0.0.1").unwrap().contains(ip("127.0.0.1")));
        assert!(!Cidr::parse("127.0.0.1").unwrap().contains(ip("127.0.0.2")));
        for bad in ["10.0.0.0/33", "nothing", "10.0.0.0/x", "::/129"] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn relay_control() {
        let acl = AccessControl::new(
            vec![Cidr::parse("127.0.0.1").unwrap()],
            &[vec![], vec![Cidr::parse("127.0.0.2").unwrap()]],
            vec![true, false],
        );
        let local = acl.classify(ip("127.0.0.1"));
        let partner = acl.classify(ip("127.0.0.2"));
        let unknown = acl.classify(ip("127.0.0.9"));
        assert_eq!(
            (local, partner, unknown),
            (
                ClientClass::Local,
                ClientClass::Partner(1),
                ClientClass::Unknown
            )
        );
        assert!(acl.may_send(local, 1));
        assert!(acl.may_send(partner, 0));
        assert!(!acl.may_send(partner, 1));
        assert!(!acl.may_send(unknown, 0));
    }
}
