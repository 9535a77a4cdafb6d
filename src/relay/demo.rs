//! `mm4relay demo`: the relay on built-in defaults, with three simulated
//! partner MMSCs on loopback, one of them slow. It sends MM4_forward.REQ
//! messages spread evenly over the three and prints, per peer, how much
//! arrived, over how many connections, and how fast: the healthy peers run
//! at full speed while the slow one delays only its own messages.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::relay::{Relay, RelayError};
use crate::sim::{Fault, Outgoing, SimPeer, forward_req, send_load};

/// What the demo does.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// Messages in all.
    pub messages: usize,
    /// Parallel inbound sessions.
    pub sessions: usize,
    /// Delay of the slow peer before each final reply.
    pub slow_delay: Duration,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            messages: 3000,
            sessions: 8,
            slow_delay: Duration::from_millis(20),
        }
    }
}

/// The peers of the demo: name, domain, number prefix, local or not.
const PEERS: [(&str, &str, &str, bool); 3] = [
    ("A", "mms.mnc010.mcc001.gprs", "+447700900", true),
    ("B", "mms.mnc020.mcc001.gprs", "+1202555", false),
    ("C", "mms.mnc456.mcc999.gprs", "+61491570", false),
];

/// The configuration the demo runs with, as INI text.
pub fn demo_config(sims: &[SimPeer], spool: &Path) -> String {
    let mut ini = format!(
        "[relay]\nhostname = relay.demo.test\nmax_connections = 32\nlog_level = warn\nretry_min = 1s\nretry_max = 10s\n\
         spool_dir = {}\ncontrol_socket =\n\n\
         [listener]\nlisten = 127.0.0.1:0\nrelay_from = 127.0.0.1/32\nmax_sessions = 64\n\n",
        spool.display()
    );
    for ((name, domain, prefix, local), sim) in PEERS.iter().zip(sims) {
        ini.push_str(&format!(
            "[peer.{name}]\nhosts = {}\ndomains = {domain}\nprefixes = {prefix}\nlocal = {}\n\
             min_connections = 2\nmax_connections = 8\npool_size = 500\n\n",
            sim.addr(),
            if *local { "yes" } else { "no" }
        ));
    }
    ini
}

/// Runs the demo and prints the table to stdout.
pub fn run(opts: &DemoOptions) -> Result<(), RelayError> {
    let sims = [
        SimPeer::start(false)?,
        SimPeer::start(false)?,
        SimPeer::start(false)?,
    ];
    sims[2].set_fault(Fault::Delay(opts.slow_delay));
    // A fresh spool of its own, removed at the end.
    let spool = std::env::temp_dir().join(format!("mm4relay-demo-{}", std::process::id()));
    let config = Config::parse(
        &demo_config(&sims, &spool),
        Path::new("(built-in demo config)"),
    )?;
    let relay = Relay::start(&config)?;
    let target = relay.local_addrs()[0];

    let messages: Vec<Outgoing> = (0..opts.messages)
        .map(|i| {
            let (_, domain, prefix, _) = PEERS[i % 3];
            let rcpt = format!("{prefix}{:04}/TYPE=PLMN@{domain}", i % 10_000);
            Outgoing {
                from: "+447700900001/TYPE=PLMN@mms.mnc010.mcc001.gprs".into(),
                rcpts: vec![rcpt.clone()],
                data: forward_req(i, &rcpt, 2048),
            }
        })
        .collect();
    let want: Vec<u64> = (0..3).map(|p| (opts.messages + 2 - p) as u64 / 3).collect();
    println!(
        "mm4relay demo: {} MM4_forward.REQ of 2 KiB over {} sessions to 3 simulated MMSCs (C answers after {:?})",
        opts.messages, opts.sessions, opts.slow_delay
    );
    let start = Instant::now();
    let sessions = opts.sessions;
    let messages = Arc::new(messages);
    let load = thread::spawn(move || send_load(target, sessions, messages));

    let mut done_at: [Option<Duration>; 3] = [None; 3];
    let deadline = start + Duration::from_secs(300);
    while done_at.iter().any(Option::is_none) && Instant::now() < deadline {
        for (i, sim) in sims.iter().enumerate() {
            if done_at[i].is_none() && sim.recipients() >= want[i] {
                done_at[i] = Some(start.elapsed());
            }
        }
        thread::sleep(Duration::from_millis(5));
    }
    let report = load
        .join()
        .map_err(|_| io::Error::other("load generator panicked"))?;
    let snapshots = relay.peer_snapshots();

    println!(
        "accepted {} of {} messages in {:.2}s\n",
        report.accepted,
        opts.messages,
        report.elapsed.as_secs_f64()
    );
    println!(
        "{:<5} {:<18} {:>10} {:>12} {:>10} {:>10}",
        "peer", "behaviour", "delivered", "connections", "done at", "msgs/s"
    );
    for (i, sim) in sims.iter().enumerate() {
        let behaviour = if i == 2 {
            format!("slow ({}ms/msg)", opts.slow_delay.as_millis())
        } else {
            "healthy".to_string()
        };
        let (done, rate) = match done_at[i] {
            Some(d) => (
                format!("{:.2}s", d.as_secs_f64()),
                format!("{:.0}", sim.recipients() as f64 / d.as_secs_f64()),
            ),
            None => ("not done".into(), "-".into()),
        };
        println!(
            "{:<5} {:<18} {:>10} {:>12} {:>10} {:>10}",
            snapshots[i].name,
            behaviour,
            format!("{}/{}", sim.recipients(), want[i]),
            sim.connections(),
            done,
            rate
        );
    }
    let stop = relay.shutdown();
    println!(
        "\nrelay stopped; {} jobs left undelivered",
        stop.undelivered
    );
    for sim in sims {
        sim.stop();
    }
    std::fs::remove_dir_all(&spool)?;
    Ok(())
}
