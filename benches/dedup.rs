//! Memory of the duplicate-suppression window per recipient, counted by a
//! global allocator (heap bytes live after recording, so the figure does
//! not depend on what else the machine does), for short IDs and for the
//! 30 KB folded IDs of the attack in issue 11. The baseline, in the same
//! run, is the window as it was before digests: a map and a queue of the
//! (key text, recipient) strings.
//!
//! `cargo bench --bench dedup`; `DEDUP_MESSAGES` (default 1000), 100
//! recipients each.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

use mm4relay::mm4::dedup::{Dedup, pdu_key};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call goes to the system allocator unchanged; the counter
// only adds up the sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new as isize - layout.size() as isize, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const RCPTS: usize = 100;

/// The window before digests, for the baseline.
type TextWindow = (
    HashMap<(String, String), Instant>,
    VecDeque<(Instant, String, String)>,
);

fn ids(m: usize, id_len: usize) -> (String, String) {
    let pad = "x".repeat(id_len.saturating_sub(12));
    (format!("M{m:010}{pad}"), format!("T{m:010}{pad}"))
}

fn rcpts() -> Vec<String> {
    (0..RCPTS)
        .map(|i| format!("+4477009{i:05}/TYPE=PLMN@mms.mnc010.mcc001.gprs"))
        .collect()
}

/// Live heap bytes per recipient after recording `messages` messages.
fn digests(messages: usize, id_len: usize) -> (f64, Duration) {
    let rcpts = rcpts();
    let window = Dedup::new(Duration::from_secs(3600));
    let before = LIVE.load(Ordering::Relaxed);
    let started = Instant::now();
    for m in 0..messages {
        let (mid, tid) = ids(m, id_len);
        let key = pdu_key("local", "MM4_forward.REQ", &mid, &tid);
        window.record(Some(&key), &rcpts);
    }
    let took = started.elapsed();
    let bytes = LIVE.load(Ordering::Relaxed) - before;
    std::hint::black_box(&window);
    (bytes as f64 / (messages * RCPTS) as f64, took)
}

fn texts(messages: usize, id_len: usize) -> (f64, Duration) {
    let rcpts = rcpts();
    let mut window: TextWindow = Default::default();
    let before = LIVE.load(Ordering::Relaxed);
    let started = Instant::now();
    for m in 0..messages {
        let (mid, tid) = ids(m, id_len);
        let key = format!("MM4_forward.REQ {mid} {tid}");
        let now = Instant::now();
        for r in &rcpts {
            window.0.insert((key.clone(), r.clone()), now);
            window.1.push_back((now, key.clone(), r.clone()));
        }
    }
    let took = started.elapsed();
    let bytes = LIVE.load(Ordering::Relaxed) - before;
    std::hint::black_box(&window);
    (bytes as f64 / (messages * RCPTS) as f64, took)
}

fn main() {
    let messages: usize = std::env::var("DEDUP_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    println!(
        "dedup window: {messages} messages x {RCPTS} recipients; heap bytes per recipient, \
         time to record"
    );
    println!(
        "{:>10} {:>14} {:>12} {:>14} {:>12} {:>8}",
        "IDs", "digests B", "digests ms", "text (old) B", "text ms", "ratio"
    );
    for (label, id_len, n) in [("20 B", 20, messages), ("30 KB", 30_000, messages / 20)] {
        let n = n.max(1);
        let (d, dt) = digests(n, id_len);
        let (t, tt) = texts(n, id_len);
        println!(
            "{label:>10} {d:>14.1} {:>12.1} {t:>14.1} {:>12.1} {:>8.4}",
            dt.as_secs_f64() * 1000.0,
            tt.as_secs_f64() * 1000.0,
            d / t
        );
    }
}
