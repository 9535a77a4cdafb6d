//! Spool recovery time: fill a spool with `RECOVERY_JOBS` queued jobs
//! (default 1,000,000; one recipient each, `RECOVERY_SIZE` octets of data,
//! default 512), close it, and time the replay at the next open.
//!
//! `cargo bench --bench recovery`

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use mm4relay::config::Config;
use mm4relay::relay::Relay;
use mm4relay::smtp::command::BodyType;
use mm4relay::spool::{NewMessage, Spool, SpoolOptions};

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("recovery: run with `cargo bench --bench recovery`");
        return;
    }
    let jobs = env_or("RECOVERY_JOBS", 1_000_000);
    let size = env_or("RECOVERY_SIZE", 512);
    let dir = tempfile::tempdir().unwrap();
    let opts = SpoolOptions {
        dir: dir.path().to_path_buf(),
        // Filling is not what is measured; the replay reads the same bytes.
        sync: false,
        max_bytes: 0,
        segment_size: mm4relay::spool::SEGMENT_SIZE,
        dedup_window: Duration::ZERO,
    };
    let (spool, _) = Spool::open(&opts).unwrap();
    let spool = Arc::new(spool);
    let data: Arc<[u8]> = Arc::from(vec![b'x'; size]);
    let next = Arc::new(AtomicUsize::new(0));
    let fill = Instant::now();
    let writers: Vec<_> = (0..16)
        .map(|_| {
            let (spool, data, next) = (spool.clone(), data.clone(), next.clone());
            thread::spawn(move || {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= jobs {
                        break;
                    }
                    let now = SystemTime::now();
                    spool
                        .commit(NewMessage {
                            id: format!("{i:016X}"),
                            from: "+447700900001/TYPE=PLMN@mms.mnc010.mcc001.gprs".into(),
                            body_type: BodyType::SevenBit,
                            message_id: Some(format!("M{i:08}@mms.mnc010.mcc001.gprs")),
                            transaction_id: Some(format!("T{i:08}")),
                            accepted: now,
                            expires: now + Duration::from_secs(72 * 3600),
                            data: data.clone(),
                            jobs: vec![(
                                "B".into(),
                                vec![format!(
                                    "+1202555{:04}/TYPE=PLMN@mms.mnc020.mcc001.gprs",
                                    i % 10_000
                                )],
                            )],
                            dedup_key: None,
                            account: String::new(),
                        })
                        .unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    let bytes = spool.bytes();
    Arc::try_unwrap(spool).ok().unwrap().close();
    println!(
        "recovery: filled {jobs} jobs ({:.0} MiB on disk) in {:.1}s",
        bytes as f64 / (1 << 20) as f64,
        fill.elapsed().as_secs_f64()
    );
    let start = Instant::now();
    let (spool, recovered) = Spool::open(&opts).unwrap();
    let took = start.elapsed();
    let n: usize = recovered.iter().map(|r| r.jobs.len()).sum();
    assert_eq!(n, jobs);
    println!(
        "recovery: replayed {n} queued jobs in {:.2}s",
        took.as_secs_f64()
    );
    drop(recovered);
    spool.close();

    // The whole start: replay, then every job queued again at its peer.
    // B's host refuses connections: nothing is delivered meanwhile.
    let ini = format!(
        "[relay]\nhostname = bench.test\nspool_dir = {}\ncontrol_socket =\nlog_level = error\n\
         [listener]\nlisten = 127.0.0.1:0\n\
         [peer.B]\nhosts = 127.0.0.1:1\ndomains = mms.mnc020.mcc001.gprs\nmin_connections = 0\n",
        dir.path().display()
    );
    let config = Config::parse(&ini, std::path::Path::new("bench.ini")).unwrap();
    let rss_before = rss_kib();
    let start = Instant::now();
    let relay = Relay::start(&config).unwrap();
    let took = start.elapsed();
    let queued = relay.queue().queued_len(0);
    println!(
        "recovery: relay started with {queued} messages queued again in {:.2}s; \
         RSS grew by {:.0} MiB ({:.0} bytes per queued job)",
        took.as_secs_f64(),
        (rss_kib() - rss_before) as f64 / 1024.0,
        (rss_kib() - rss_before) as f64 * 1024.0 / queued.max(1) as f64
    );
    relay.shutdown();
}

/// Resident set size of this process now.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}
