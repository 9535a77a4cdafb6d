//! The whole intake path of a running relay: a real `Relay` in this
//! process, listening on loopback, with a simulated local MMSC as its only
//! peer, and one SMTP session that each input sends a transaction over.
//!
//! The input is split at LF into the values that turn into numbers and
//! times: X-Mms-Expiry, Date, X-Mms-Forward-Counter, the SIZE parameter of
//! MAIL FROM, X-Mms-Message-Size, then more header lines, as given (CR and
//! LF removed, so the SMTP framing holds). Whatever they hold, the session
//! must answer every command with a well-formed reply and stay open: a
//! panic in a session thread closes the connection, and fails here.
#![no_main]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use mm4relay::config::Config;
use mm4relay::relay::Relay;
use mm4relay::sim::SimPeer;
use mm4relay::smtp::Reply;
use mm4relay::smtp::codec::dot_stuff;

struct World {
    _relay: Relay,
    _sim: SimPeer,
    client: Mutex<(TcpStream, Vec<u8>)>,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let sim = SimPeer::start(false).expect("a simulated MMSC");
        let dir = std::env::temp_dir().join(format!("mm4relay-fuzz-intake-{}", std::process::id()));
        let ini = format!(
            "[relay]\nhostname = relay.fuzz\nspool_dir = {}\nspool_sync = no\ncontrol_socket =\n\
             log_level = off\nretry_min = 100ms\n\
             [listener]\nlisten = 127.0.0.1:0\nrelay_from = 127.0.0.1/32\nmax_message_size = 65536\n\
             mm4_check = strict\nmax_bad_commands = 0\nmax_refused_recipients = 0\nsession_timeout = 0s\n\
             [peer.A]\nhosts = {}\ndomains = mms.mnc010.mcc001.gprs\nprefixes = +447700900\nlocal = yes\n",
            dir.display(),
            sim.addr()
        );
        let config = Config::parse(&ini, Path::new("fuzz.ini")).expect("a valid configuration");
        let relay = Relay::start(&config).expect("the relay starts");
        let stream = TcpStream::connect(relay.local_addrs()[0]).expect("connect");
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut client = (stream, Vec::new());
        assert_eq!(reply(&mut client).code, 220);
        client.0.write_all(b"EHLO fuzz.test\r\n").unwrap();
        assert_eq!(reply(&mut client).code, 250);
        World {
            _relay: relay,
            _sim: sim,
            client: Mutex::new(client),
        }
    })
}

/// The next whole reply; panics if the relay hung up or wrote garbage.
fn reply(client: &mut (TcpStream, Vec<u8>)) -> Reply {
    let (stream, buf) = client;
    loop {
        match Reply::parse(buf) {
            Ok(Some((r, n))) => {
                buf.drain(..n);
                return r;
            }
            Ok(None) => {}
            Err(e) => panic!("bad reply {e}: {:?}", String::from_utf8_lossy(buf)),
        }
        let mut chunk = [0u8; 4096];
        let n = match stream.read(&mut chunk) {
            Ok(n) => n,
            // libFuzzer's timer signal interrupts the wait.
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => panic!("no reply from the relay: {e}"),
        };
        assert!(n > 0, "the relay closed the session");
        buf.extend_from_slice(&chunk[..n]);
    }
}

fuzz_target!(|input: &[u8]| {
    let world = world();
    let text = String::from_utf8_lossy(input).replace('\r', "");
    let mut values = text.split('\n');
    let mut next = || values.next().unwrap_or("").to_string();
    let (expiry, date, counter, size, msg_size) = (next(), next(), next(), next(), next());
    let extra: Vec<String> = values.map(str::to_string).collect();
    let mut message = format!(
        "X-Mms-3GPP-MMS-Version: 6.8.0\r\nX-Mms-Message-Type: MM4_forward.REQ\r\n\
         X-Mms-Transaction-ID: T-fuzz\r\nX-Mms-Message-ID: M-{}\r\n\
         X-Mms-Expiry: {expiry}\r\nDate: {date}\r\nX-Mms-Forward-Counter: {counter}\r\n\
         X-Mms-Message-Size: {msg_size}\r\n\
         From: +447700900001/TYPE=PLMN@mms.mnc010.mcc001.gprs\r\n\
         To: +447700900123/TYPE=PLMN@mms.mnc010.mcc001.gprs\r\n",
        input.len()
    );
    for line in &extra {
        message.push_str(line);
        message.push_str("\r\n");
    }
    message.push_str("Content-Type: text/plain\r\n\r\nhello\r\n");
    let size: String = size.chars().filter(|c| !c.is_whitespace()).take(40).collect();
    let size = if size.is_empty() {
        String::new()
    } else {
        format!(" SIZE={size}")
    };
    let mut wire = format!(
        "MAIL FROM:<+447700900001/TYPE=PLMN@mms.mnc010.mcc001.gprs>{size}\r\n\
         RCPT TO:<+447700900123/TYPE=PLMN@mms.mnc010.mcc001.gprs>\r\nDATA\r\n"
    )
    .into_bytes();
    let mut client = world.client.lock().unwrap();
    client.0.write_all(&wire).unwrap();
    let mail = reply(&mut client);
    let rcpt = reply(&mut client);
    let data = reply(&mut client);
    if data.code == 354 {
        wire.clear();
        dot_stuff(message.as_bytes(), &mut wire);
        client.0.write_all(&wire).unwrap();
        let end = reply(&mut client);
        assert!(
            matches!(end.code, 250 | 451 | 452 | 552 | 554),
            "end of data: {end}"
        );
    } else {
        assert!(mail.code != 250 || rcpt.code != 250, "{mail} {rcpt} {data}");
    }
    client.0.write_all(b"RSET\r\n").unwrap();
    assert_eq!(reply(&mut client).code, 250);
});
