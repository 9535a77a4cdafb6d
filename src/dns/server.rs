//! A small authoritative DNS server on loopback, for the tests and the
//! demo: a zone held in memory that they change as they go, served on one
//! UDP and one TCP port with the same number. A UDP answer longer than 512
//! octets goes out truncated, so the client must ask again over TCP.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, MX, NAPTR, SOA};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use parking_lot::Mutex;

use crate::sys::owned::Owned;

/// Largest UDP answer sent whole (RFC 1035 §4.2.1).
const UDP_LIMIT: usize = 512;

/// What the server says for one name and type.
#[derive(Clone, Debug)]
pub enum Reply {
    /// These records, with this TTL in seconds.
    Records(Vec<RData>, u32),
    /// NXDOMAIN, with an SOA whose minimum is this many seconds.
    NxDomain(u32),
    /// SERVFAIL.
    ServFail,
    /// No answer at all: the client must time out.
    Silent,
}

type Zone = HashMap<(String, RecordType), Reply>;

/// The server; stopped and joined when dropped.
pub struct DnsServer {
    addr: SocketAddr,
    zone: Arc<Mutex<Zone>>,
    queries: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    threads: Vec<Owned<()>>,
}

fn key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

fn name(s: &str) -> Name {
    Name::from_str(&format!("{}.", key(s))).expect("a test zone's names are valid")
}

/// An MX record's data.
pub fn mx(preference: u16, exchange: &str) -> RData {
    RData::MX(MX::new(preference, name(exchange)))
}

/// An A record's data.
pub fn a(ip: Ipv4Addr) -> RData {
    RData::A(A(ip))
}

/// An AAAA record's data.
pub fn aaaa(ip: Ipv6Addr) -> RData {
    RData::AAAA(AAAA(ip))
}

/// A terminal `E2U+mms:mailto` NAPTR record whose regexp sends every
/// number to `domain`.
pub fn mms_naptr(order: u16, preference: u16, domain: &str) -> RData {
    naptr(
        order,
        preference,
        "E2U+mms:mailto",
        &format!("!^(.*)$!mailto:\\1/TYPE=PLMN@{domain}!"),
    )
}

/// A terminal NAPTR record with these services and regexp.
pub fn naptr(order: u16, preference: u16, services: &str, regexp: &str) -> RData {
    RData::NAPTR(NAPTR::new(
        order,
        preference,
        b"u".to_vec().into(),
        services.as_bytes().into(),
        regexp.as_bytes().into(),
        Name::root(),
    ))
}

impl DnsServer {
    /// A server on 127.0.0.1 with an empty zone (every name: NXDOMAIN).
    pub fn start() -> io::Result<DnsServer> {
        let (udp, tcp) = bind_pair()?;
        let addr = udp.local_addr()?;
        let zone: Arc<Mutex<Zone>> = Arc::default();
        let queries = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        {
            let (zone, queries, stop) = (zone.clone(), queries.clone(), stop.clone());
            threads.push(Owned::spawn("dns-udp", move || {
                let mut buf = [0u8; 4096];
                while let Ok((n, from)) = udp.recv_from(&mut buf) {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    queries.fetch_add(1, Ordering::SeqCst);
                    if let Some(out) = answer(&zone, &buf[..n], true) {
                        let _ = udp.send_to(&out, from);
                    }
                }
            })?);
        }
        {
            let (zone, queries, stop) = (zone.clone(), queries.clone(), stop.clone());
            threads.push(Owned::spawn("dns-tcp", move || {
                for conn in tcp.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    if let Ok(mut s) = conn {
                        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                        queries.fetch_add(1, Ordering::SeqCst);
                        let _ = serve_tcp(&zone, &mut s);
                    }
                }
            })?);
        }
        Ok(DnsServer {
            addr,
            zone,
            queries,
            stop,
            threads,
        })
    }

    /// The address it serves on, UDP and TCP.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Says `reply` for `name` and `rtype` from now on.
    pub fn set(&self, name: &str, rtype: RecordType, reply: Reply) {
        self.zone.lock().insert((key(name), rtype), reply);
    }

    /// Queries received so far, UDP and TCP.
    pub fn queries(&self) -> u64 {
        self.queries.load(Ordering::SeqCst)
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake both loops: each sees the flag on its next packet.
        if let Ok(s) = UdpSocket::bind("127.0.0.1:0") {
            let _ = s.send_to(b"", self.addr);
        }
        let _ = TcpStream::connect(self.addr);
        for t in self.threads.drain(..) {
            t.join();
        }
    }
}

/// A UDP and a TCP socket on the same loopback port.
fn bind_pair() -> io::Result<(UdpSocket, TcpListener)> {
    let mut last = None;
    for _ in 0..20 {
        let udp = UdpSocket::bind("127.0.0.1:0")?;
        match TcpListener::bind(udp.local_addr()?) {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no port")))
}

fn serve_tcp(zone: &Mutex<Zone>, s: &mut TcpStream) -> io::Result<()> {
    let mut len = [0u8; 2];
    s.read_exact(&mut len)?;
    let mut body = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut body)?;
    if let Some(out) = answer(zone, &body, false) {
        let mut framed = u16::try_from(out.len())
            .map_err(io::Error::other)?
            .to_be_bytes()
            .to_vec();
        framed.extend_from_slice(&out);
        s.write_all(&framed)?;
    }
    Ok(())
}

/// The answer to one query as octets, or `None` to stay silent.
fn answer(zone: &Mutex<Zone>, query: &[u8], udp: bool) -> Option<Vec<u8>> {
    let q = Message::from_vec(query).ok()?;
    let question = q.queries.first()?.clone();
    let reply = zone
        .lock()
        .get(&(key(&question.name.to_ascii()), question.query_type))
        .cloned()
        .unwrap_or(Reply::NxDomain(60));
    let mut m = Message::response(q.metadata.id, q.metadata.op_code);
    m.metadata.authoritative = true;
    m.metadata.recursion_desired = q.metadata.recursion_desired;
    m.add_query(question.clone());
    let soa = |minimum: u32| {
        Record::from_rdata(
            Name::root(),
            minimum,
            RData::SOA(SOA::new(
                Name::root(),
                Name::root(),
                1,
                3600,
                600,
                86_400,
                minimum,
            )),
        )
    };
    match reply {
        Reply::Silent => return None,
        Reply::ServFail => m.metadata.response_code = ResponseCode::ServFail,
        Reply::NxDomain(min) => {
            m.metadata.response_code = ResponseCode::NXDomain;
            m.add_authority(soa(min));
        }
        Reply::Records(rs, ttl) if rs.is_empty() => {
            m.add_authority(soa(ttl));
        }
        Reply::Records(rs, ttl) => {
            for r in rs {
                m.add_answer(Record::from_rdata(question.name.clone(), ttl, r));
            }
        }
    }
    let out = m.to_vec().ok()?;
    if udp && out.len() > UDP_LIMIT {
        let mut cut = Message::response(q.metadata.id, q.metadata.op_code);
        cut.metadata.truncation = true;
        cut.add_query(question);
        return cut.to_vec().ok();
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::{Answer, MxError, Resolver, Settings, Target};

    fn resolver(server: &DnsServer, timeout_ms: u64) -> Resolver {
        Resolver::new(Settings {
            servers: vec![server.addr()],
            timeout: Duration::from_millis(timeout_ms),
            attempts: 2,
        })
    }

    #[test]
    fn mx_in_preference_order_with_addresses_and_the_cache() {
        let s = DnsServer::start().unwrap();
        s.set(
            "b.test",
            RecordType::MX,
            Reply::Records(vec![mx(20, "mx2.b.test"), mx(10, "mx1.b.test")], 300),
        );
        s.set(
            "mx1.b.test",
            RecordType::A,
            Reply::Records(vec![a(Ipv4Addr::new(127, 0, 1, 1))], 300),
        );
        s.set("mx1.b.test", RecordType::AAAA, Reply::Records(vec![], 300));
        s.set(
            "mx2.b.test",
            RecordType::A,
            Reply::Records(vec![a(Ipv4Addr::new(127, 0, 1, 2))], 300),
        );
        s.set(
            "mx2.b.test",
            RecordType::AAAA,
            Reply::Records(vec![aaaa(Ipv6Addr::LOCALHOST)], 300),
        );
        let r = resolver(&s, 2000);
        let want = vec![
            Target {
                name: "mx1.b.test".into(),
                addrs: vec!["127.0.1.1:2525".parse().unwrap()],
            },
            Target {
                name: "mx2.b.test".into(),
                addrs: vec![
                    "127.0.1.2:2525".parse().unwrap(),
                    "[::1]:2525".parse().unwrap(),
                ],
            },
        ];
        assert_eq!(r.mx_targets("B.test.", 2525).unwrap(), want);
        let asked = s.queries();
        assert_eq!(r.mx_targets("b.test", 2525).unwrap(), want);
        assert_eq!(s.queries(), asked, "the second look-up is the cache's");
        assert_eq!(r.stats().cache_hits.load(Ordering::Relaxed), 5);
    }

    #[test]
    fn no_mx_means_the_domain_itself_and_nxdomain_or_a_null_mx_none() {
        let s = DnsServer::start().unwrap();
        s.set("plain.test", RecordType::MX, Reply::Records(vec![], 60));
        s.set(
            "plain.test",
            RecordType::A,
            Reply::Records(vec![a(Ipv4Addr::new(127, 0, 0, 9))], 60),
        );
        s.set("plain.test", RecordType::AAAA, Reply::Records(vec![], 60));
        s.set(
            "null.test",
            RecordType::MX,
            Reply::Records(vec![mx(0, ".")], 60),
        );
        let r = resolver(&s, 2000);
        let t = r.mx_targets("plain.test", 25).unwrap();
        assert_eq!(t[0].addrs, vec!["127.0.0.9:25".parse().unwrap()]);
        assert_eq!(r.mx_targets("gone.test", 25), Err(MxError::NotFound));
        assert_eq!(r.mx_targets("null.test", 25), Err(MxError::NotFound));
    }

    #[test]
    fn truncated_answers_are_asked_again_over_tcp() {
        let s = DnsServer::start().unwrap();
        let many: Vec<RData> = (0..40)
            .map(|i| mx(i, &format!("mx{i}.long-name-for-size.big.test")))
            .collect();
        s.set("big.test", RecordType::MX, Reply::Records(many, 60));
        let r = resolver(&s, 2000);
        match &*r.lookup("big.test", RecordType::MX).unwrap() {
            Answer::Records(rs) => assert_eq!(rs.len(), crate::dns::MAX_RECORDS, "kept of 40"),
            other => panic!("{other:?}"),
        }
        assert_eq!(r.stats().tcp_retries.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn failures_and_silence_end_within_the_timeouts() {
        let s = DnsServer::start().unwrap();
        s.set("fail.test", RecordType::MX, Reply::ServFail);
        s.set("quiet.test", RecordType::MX, Reply::Silent);
        let r = resolver(&s, 200);
        assert!(matches!(
            r.mx_targets("fail.test", 25),
            Err(MxError::Failed(DnsError::Server(_)))
        ));
        let t = std::time::Instant::now();
        assert_eq!(
            r.mx_targets("quiet.test", 25),
            Err(MxError::Failed(DnsError::Timeout))
        );
        assert!(
            t.elapsed() < Duration::from_millis(2000),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(r.stats().timeouts.load(Ordering::Relaxed), 2);
        // Failures are not cached: the next look-up asks again.
        let asked = s.queries();
        let _ = r.mx_targets("fail.test", 25);
        assert!(s.queries() > asked);
    }

    #[test]
    fn enum_answers_nxdomain_and_the_negative_cache() {
        let s = DnsServer::start().unwrap();
        let n = "+447700900123";
        s.set(
            &crate::dns::naptr::enum_name(n, "e164.test"),
            RecordType::NAPTR,
            Reply::Records(vec![mms_naptr(10, 10, "mms.mnc005.mcc001.gprs")], 60),
        );
        let r = resolver(&s, 2000);
        assert_eq!(
            r.enum_domain(n, "e164.test").unwrap().as_deref(),
            Some("mms.mnc005.mcc001.gprs")
        );
        assert_eq!(r.enum_domain("+447700900999", "e164.test"), Ok(None));
        let asked = s.queries();
        assert_eq!(r.enum_domain("+447700900999", "e164.test"), Ok(None));
        assert_eq!(s.queries(), asked, "NXDOMAIN is cached for the SOA minimum");
    }

    #[test]
    fn an_mx_look_up_ends_within_one_budget_however_many_exchanges_are_silent() {
        let s = DnsServer::start().unwrap();
        let many: Vec<RData> = (0..20)
            .map(|i| mx(10, &format!("mx{i}.slow.test")))
            .collect();
        s.set("slow.test", RecordType::MX, Reply::Records(many, 60));
        for i in 0..20 {
            s.set(&format!("mx{i}.slow.test"), RecordType::A, Reply::Silent);
        }
        let r = resolver(&s, 200);
        let t = std::time::Instant::now();
        assert!(matches!(
            r.mx_targets("slow.test", 25),
            Err(MxError::Failed(DnsError::Timeout))
        ));
        // timeout x attempts x servers = 400ms; one in-flight query may end it.
        assert!(
            t.elapsed() < Duration::from_millis(1500),
            "{:?}",
            t.elapsed()
        );
    }

    #[test]
    fn records_of_other_names_are_dropped_and_cname_chains_followed() {
        let m = |answers: Vec<Record>| {
            let mut m = Message::response(1, hickory_proto::op::OpCode::Query);
            for a in answers {
                m.add_answer(a);
            }
            m
        };
        let asked = name("victim.test");
        let evil = Record::from_rdata(name("elsewhere.evil"), 60, a(Ipv4Addr::new(10, 6, 6, 6)));
        let answer = crate::dns::read_answer(&m(vec![evil.clone()]), &asked, RecordType::A);
        assert_eq!(answer.unwrap().0, Answer::NoData);
        let cname = Record::from_rdata(
            asked.clone(),
            60,
            RData::CNAME(hickory_proto::rr::rdata::CNAME(name("real.test"))),
        );
        let real = Record::from_rdata(name("real.test"), 30, a(Ipv4Addr::new(127, 0, 1, 9)));
        let (answer, ttl) =
            crate::dns::read_answer(&m(vec![evil, cname, real]), &asked, RecordType::A).unwrap();
        assert_eq!(
            answer,
            Answer::Records(vec![a(Ipv4Addr::new(127, 0, 1, 9))])
        );
        assert_eq!(ttl, Duration::from_secs(30));
    }

    #[test]
    fn an_enum_outage_costs_one_timeout_per_hold_down_not_one_per_number() {
        let s = DnsServer::start().unwrap();
        let r = resolver(&s, 200);
        s.set(
            &crate::dns::naptr::enum_name("+441", "e164.test"),
            RecordType::NAPTR,
            Reply::Silent,
        );
        assert_eq!(r.enum_domain("+441", "e164.test"), Err(DnsError::Timeout));
        let asked = s.queries();
        let t = std::time::Instant::now();
        for n in ["+442", "+443", "+444"] {
            assert!(r.enum_domain(n, "e164.test").is_err());
        }
        assert_eq!(s.queries(), asked, "held down: no query");
        assert!(
            t.elapsed() < Duration::from_millis(100),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(r.stats().enum_failures.load(Ordering::Relaxed), 4);
    }

    use crate::dns::DnsError;
}
