//! `mm4relay status`, as a table for people and as JSON for scripts, from
//! one list of fields ([`peer_fields`]): every field is in the JSON, and
//! each that has a column is in the table, in [`TABLE_ORDER`] (a unit test
//! holds the two lists together).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use std::sync::Arc;

use crate::cdr::{EVENTS, LedgerStats};
use crate::config::PortedLoad;
use crate::inbound::InboundStats;
use crate::ops::control::Sources;
use crate::peer::PeerSnapshot;
use crate::spool::SpoolStats;
use crate::sys::printable::Printable;

/// A value as both forms show it.
enum Value<'a> {
    Text(&'a str),
    Flag(bool),
    Count(u64),
    /// Messages a second.
    Rate(f64),
    /// An age in seconds, if there is one.
    Age(Option<u64>),
}

/// Where a field stands in the table, if it does.
enum Column {
    /// Not in the table (JSON only).
    None,
    /// A column of its own: header and width; text is left-aligned,
    /// numbers right-aligned.
    Own(&'static str, usize),
    /// Joined to the cell before it with a `/` (open/busy).
    Joined,
    /// The last column, unpadded.
    Last(&'static str),
}

struct Field<'a> {
    key: &'static str,
    column: Column,
    value: Value<'a>,
}

/// Every field of one peer, in JSON order; the table takes its columns
/// from the same list, in [`TABLE_ORDER`].
fn peer_fields(p: &PeerSnapshot) -> [Field<'_>; 17] {
    use Column::*;
    use Value::*;
    let f = |key, column, value| Field { key, column, value };
    [
        f("name", Own("peer", 10), Text(&p.name)),
        f("healthy", None, Flag(p.healthy)),
        f("allowance", Own("allow", 5), Count(p.allowance as u64)),
        f(
            "connections_open",
            Own("open/busy", 9),
            Count(p.connections_open as u64),
        ),
        f("busy", Joined, Count(p.busy as u64)),
        f("pool_depth", Own("pool", 6), Count(p.pool_depth as u64)),
        f("overflow", Own("overflow", 8), Count(p.overflow as u64)),
        f(
            "waiting_retry",
            Own("waiting", 7),
            Count(p.waiting_retry as u64),
        ),
        f("sent", Own("sent", 9), Count(p.sent)),
        f("deferred", Own("deferred", 9), Count(p.deferred)),
        f("failed", Own("failed", 7), Count(p.failed)),
        f("connections_opened", None, Count(p.connections_opened)),
        f("connections_failed", None, Count(p.connections_failed)),
        f("last_error", Last("last error"), Text(&p.last_error)),
        f("state", Own("health", 13), Text(p.state())),
        f("oldest_secs", Own("oldest", 6), Age(p.oldest_secs)),
        f(
            "msgs_per_sec",
            Own("msg/s", 7),
            Rate(p.rate_milli as f64 / 1000.0),
        ),
    ]
}

/// The table's columns, by the keys of [`peer_fields`].
const TABLE_ORDER: [&str; 14] = [
    "name",
    "state",
    "allowance",
    "connections_open",
    "busy",
    "pool_depth",
    "overflow",
    "waiting_retry",
    "oldest_secs",
    "sent",
    "deferred",
    "failed",
    "msgs_per_sec",
    "last_error",
];

/// The fields of the table, in its order.
fn table_fields<'a, 'b>(fields: &'b [Field<'a>]) -> impl Iterator<Item = &'b Field<'a>> {
    TABLE_ORDER
        .iter()
        .filter_map(move |key| fields.iter().find(|f| f.key == *key))
}

/// The listener's counters, for both forms.
fn listener_counts(i: &InboundStats) -> [(&'static str, u64); 11] {
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    [
        (
            "sessions_open",
            i.sessions_open.load(Ordering::Relaxed) as u64,
        ),
        ("sessions_total", load(&i.sessions_total)),
        ("tls_sessions", load(&i.tls_sessions)),
        ("accepted", load(&i.accepted)),
        ("duplicates", load(&i.duplicates)),
        ("rejected_content", load(&i.rejected_content)),
        ("rejected_spool", load(&i.rejected_spool)),
        (
            "rcpt_refused",
            load(&i.rcpt_bad_address) + load(&i.rcpt_unroutable) + load(&i.rcpt_relay_denied),
        ),
        ("refused_per_ip", load(&i.refused_per_ip)),
        ("auth_failures", load(&i.auth_failures)),
        ("auth_delayed", load(&i.auth_delayed)),
    ]
}

/// The spool's figures, for both forms.
fn spool_counts(s: &SpoolStats) -> [(&'static str, u64); 4] {
    [
        ("bytes", s.bytes),
        ("live_bytes", s.live_bytes),
        ("segments", s.segments),
        ("compactions", s.compactions),
    ]
}

/// An age as the table shows it: 45s, 12m, 3h, 2d.
fn short_age(secs: u64) -> String {
    match secs {
        0..120 => format!("{secs}s"),
        120..7200 => format!("{}m", secs / 60),
        7200..172_800 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86_400),
    }
}

fn cell(v: &Value) -> String {
    match v {
        Value::Text(t) => Printable(t).to_string(),
        Value::Flag(b) => b.to_string(),
        Value::Count(n) => n.to_string(),
        Value::Rate(r) => format!("{r:.1}"),
        Value::Age(a) => a.map_or("-".into(), short_age),
    }
}

/// Appends one table row: `cells` are (column, text, left-aligned).
fn row<'a>(out: &mut String, cells: impl Iterator<Item = (&'a Column, String, bool)>) {
    let mut pending: Option<(usize, bool, String)> = None;
    let mut line = String::new();
    let flush = |line: &mut String, p: Option<(usize, bool, String)>| {
        if let Some((w, left, text)) = p {
            if !line.is_empty() {
                line.push(' ');
            }
            let _ = if left {
                write!(line, "{text:<w$}")
            } else {
                write!(line, "{text:>w$}")
            };
        }
    };
    for (column, text, left) in cells {
        match column {
            Column::Own(_, w) => {
                flush(&mut line, pending.take());
                pending = Some((*w, left, text));
            }
            Column::Joined => {
                // The header has its name in the cell before.
                if let Some((_, _, t)) = pending.as_mut().filter(|_| !text.is_empty()) {
                    t.push('/');
                    t.push_str(&text);
                }
            }
            Column::Last(_) => {
                flush(&mut line, pending.take());
                let _ = write!(line, "  {text}");
            }
            Column::None => {}
        }
    }
    flush(&mut line, pending);
    out.push_str(line.trim_end());
    out.push('\n');
}

/// What the status says besides the peers.
pub struct Totals<'a> {
    /// The spool's figures.
    pub spool: SpoolStats,
    /// The listener's counters.
    pub inbound: &'a InboundStats,
    /// How the number-portability table in force was loaded.
    pub ported: PortedLoad,
    /// The resolver's counters (MX and ENUM look-ups) and cached names.
    pub dns: ([(&'static str, u64); 8], usize),
    /// The CDR ledger's figures, when CDRs are on.
    pub cdr: Option<Arc<LedgerStats>>,
}

impl Totals<'_> {
    /// The totals of the running relay.
    pub fn of(sources: &Sources) -> Totals<'_> {
        Totals {
            spool: sources.spool.stats(),
            inbound: &sources.inbound,
            ported: sources.intake.ported_load(),
            dns: {
                let r = sources.intake.resolver();
                (r.stats().counts(), r.cached())
            },
            cdr: sources.cdr.clone(),
        }
    }
}

/// The share of `ok` in `asked`, in per cent.
fn share(ok: u64, asked: u64) -> f64 {
    if asked == 0 {
        0.0
    } else {
        ok as f64 * 100.0 / asked as f64
    }
}

/// The `cdr:` line and one `acks PEER:` line per peer that was asked.
fn cdr_text(out: &mut String, c: &LedgerStats) {
    let rows: Vec<String> = EVENTS
        .iter()
        .zip(&c.rows)
        .map(|(e, n)| format!("{e}={}", n.load(Ordering::Relaxed)))
        .collect();
    let _ = writeln!(
        out,
        "cdr: rows {}; checkpoint {}, {} waiting for a RES, {} files closed, {} write errors",
        rows.join(" "),
        c.checkpoint.load(Ordering::Relaxed),
        c.waiting.load(Ordering::Relaxed),
        c.files_closed.load(Ordering::Relaxed),
        c.write_errors.load(Ordering::Relaxed)
    );
    for (peer, a) in c.peers.lock().iter() {
        let ok = a.ok();
        let other: u64 = a.answered.values().sum::<u64>() - ok;
        let _ = writeln!(
            out,
            "acks {}: {} asked, {ok} Ok ({:.1}%), {other} other, {} missing ({} pushed out by the cap)",
            Printable(peer),
            a.asked,
            share(ok, a.asked),
            a.missing,
            a.evicted
        );
    }
}

fn cdr_json(c: &LedgerStats) -> String {
    let rows: Vec<String> = EVENTS
        .iter()
        .zip(&c.rows)
        .map(|(e, n)| format!("\"{e}\":{}", n.load(Ordering::Relaxed)))
        .collect();
    let acks: Vec<String> = c
        .peers
        .lock()
        .iter()
        .map(|(peer, a)| {
            let ok = a.ok();
            let answered: Vec<String> = a
                .answered
                .iter()
                .map(|(s, n)| format!("{}:{n}", json_str(s)))
                .collect();
            format!(
                "{}:{{\"asked\":{},\"ok\":{ok},\"ok_share\":{:.3},\"answered\":{{{}}},\"missing\":{},\"evicted\":{}}}",
                json_str(peer),
                a.asked,
                share(ok, a.asked) / 100.0,
                answered.join(","),
                a.missing,
                a.evicted
            )
        })
        .collect();
    format!(
        "\"cdr\":{{\"rows\":{{{}}},\"checkpoint\":{},\"waiting\":{},\"files_closed\":{},\"write_errors\":{},\"acks\":{{{}}}}}",
        rows.join(","),
        c.checkpoint.load(Ordering::Relaxed),
        c.waiting.load(Ordering::Relaxed),
        c.files_closed.load(Ordering::Relaxed),
        c.write_errors.load(Ordering::Relaxed),
        acks.join(",")
    )
}

/// The table's figures, for both forms: entries, file, seconds to load,
/// and when it was loaded (Unix seconds).
fn ported_figures(p: &PortedLoad) -> (usize, Option<String>, f64, Option<u64>) {
    let at =
        p.at.and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_secs());
    let file = p.file.as_ref().map(|f| f.display().to_string());
    (p.entries, file, p.seconds, at)
}

/// The per-peer table of `mm4relay status`, then the lines of the
/// listener, the spool and the routes.
pub fn text(peers: &[PeerSnapshot], totals: &Totals) -> String {
    let (spool, inbound) = (&totals.spool, totals.inbound);
    let mut out = String::new();
    let blank = PeerSnapshot::default();
    let header = peer_fields(&blank);
    row(
        &mut out,
        table_fields(&header).map(|f| {
            let name = match f.column {
                Column::Own(h, _) | Column::Last(h) => h.to_string(),
                _ => String::new(),
            };
            (&f.column, name, matches!(f.value, Value::Text(_)))
        }),
    );
    for p in peers {
        let fields = peer_fields(p);
        row(
            &mut out,
            table_fields(&fields)
                .map(|f| (&f.column, cell(&f.value), matches!(f.value, Value::Text(_)))),
        );
    }
    let counts: Vec<String> = listener_counts(inbound)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let _ = writeln!(out, "listener: {}", counts.join(" "));
    let [bytes, live, segments, compactions] = spool_counts(spool).map(|(_, v)| v);
    let _ = writeln!(
        out,
        "spool: {bytes} bytes, {live} of them live, {segments} segments, {compactions} compactions"
    );
    let (entries, file, seconds, at) = ported_figures(&totals.ported);
    let _ = write!(out, "routes: {entries} ported entries");
    if let Some(file) = file {
        let _ = write!(out, " from {}, loaded in {seconds:.2}s", Printable(&file));
    }
    if let Some(ago) = at.and_then(|at| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?;
        now.as_secs().checked_sub(at)
    }) {
        let _ = write!(out, ", {} ago", short_age(ago));
    }
    out.push('\n');
    let (counts, cached) = &totals.dns;
    let counts: Vec<String> = counts.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let _ = writeln!(out, "dns: {} cached={cached}", counts.join(" "));
    if let Some(c) = &totals.cdr {
        cdr_text(&mut out, c);
    }
    out
}

fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            // Control characters (C0, DEL, C1: a terminal acts on them),
            // line separators and bidi overrides, as escapes: a peer's
            // reply text cannot drive the terminal that reads this.
            c if c.is_control()
                || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}') =>
            {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn json_value(v: &Value) -> String {
    match v {
        Value::Text(t) => json_str(t),
        Value::Flag(b) => b.to_string(),
        Value::Count(n) => n.to_string(),
        Value::Rate(r) => format!("{r:.3}"),
        Value::Age(a) => a.map_or("null".into(), |s| s.to_string()),
    }
}

/// The same as JSON, for scripts.
pub fn json(peers: &[PeerSnapshot], totals: &Totals) -> String {
    let (spool, inbound) = (&totals.spool, totals.inbound);
    let items: Vec<String> = peers
        .iter()
        .map(|p| {
            let fields: Vec<String> = peer_fields(p)
                .iter()
                .map(|f| format!("\"{}\":{}", f.key, json_value(&f.value)))
                .collect();
            format!("{{{}}}", fields.join(","))
        })
        .collect();
    let listener: Vec<String> = listener_counts(inbound)
        .iter()
        .map(|(k, v)| format!("\"{k}\":{v}"))
        .collect();
    let spool: Vec<String> = spool_counts(spool)
        .iter()
        .map(|(k, v)| format!("\"spool_{k}\":{v}"))
        .collect();
    let (entries, file, seconds, at) = ported_figures(&totals.ported);
    let routes = format!(
        "\"routes\":{{\"ported_entries\":{entries},\"ported_file\":{},\
         \"ported_load_seconds\":{seconds:.3},\"ported_loaded_at\":{}}}",
        file.as_deref().map_or("null".into(), json_str),
        at.map_or("null".into(), |a| a.to_string())
    );
    let (counts, cached) = &totals.dns;
    let dns: Vec<String> = counts.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
    let cdr = totals
        .cdr
        .as_deref()
        .map_or(String::new(), |c| format!(",{}", cdr_json(c)));
    format!(
        "{{\"peers\":[{}],\"listener\":{{{}}},{},{routes},\"dns\":{{{},\"cached\":{cached}}}{cdr}}}\n",
        items.join(","),
        listener.join(","),
        spool.join(","),
        dns.join(",")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_strings_escape_c1_controls_and_bidi_overrides() {
        assert_eq!(
            json_str("550 \u{9b}31m\u{202e}x\u{1b}"),
            "\"550 \\u009b31m\\u202ex\\u001b\""
        );
    }

    #[test]
    fn the_table_shows_every_field_with_a_column_once() {
        let blank = PeerSnapshot::default();
        let fields = peer_fields(&blank);
        let in_table: Vec<&str> = fields
            .iter()
            .filter(|f| !matches!(f.column, Column::None))
            .map(|f| f.key)
            .collect();
        let mut order = TABLE_ORDER.to_vec();
        order.sort_unstable();
        let mut want = in_table.clone();
        want.sort_unstable();
        assert_eq!(order, want);
        let inbound = InboundStats::default();
        let totals = Totals {
            spool: SpoolStats::default(),
            inbound: &inbound,
            ported: PortedLoad::default(),
            dns: (crate::dns::Stats::default().counts(), 0),
            cdr: None,
        };
        let text = text(&[], &totals);
        assert!(
            text.starts_with(
                "peer       health        allow open/busy   pool overflow waiting oldest      sent  deferred  failed   msg/s  last error\n"
            ),
            "{text:?}"
        );
    }

    #[test]
    fn renders_text_and_json() {
        let p = PeerSnapshot {
            name: "B".into(),
            sent: 7,
            healthy: false,
            allowance: 1,
            last_error: "said \"no\"".into(),
            ..PeerSnapshot::default()
        };
        let inbound = InboundStats::default();
        inbound.accepted.fetch_add(5, Ordering::Relaxed);
        let spool = SpoolStats {
            bytes: 42,
            live_bytes: 40,
            segments: 1,
            compactions: 3,
            max_bytes: 0,
        };
        let totals = Totals {
            spool,
            inbound: &inbound,
            ported: PortedLoad {
                file: Some("/var/lib/ported.txt".into()),
                entries: 10,
                seconds: 1.5,
                at: Some(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1000)),
            },
            dns: {
                let stats = crate::dns::Stats::default();
                stats.enum_lookups.fetch_add(3, Ordering::Relaxed);
                (stats.counts(), 2)
            },
            cdr: {
                let c = LedgerStats::default();
                c.rows[0].fetch_add(7, Ordering::Relaxed);
                let mut peers = c.peers.lock();
                let b = peers.entry("B".into()).or_default();
                b.asked = 4;
                b.answered.insert("Ok", 3);
                b.missing = 1;
                drop(peers);
                Some(Arc::new(c))
            },
        };
        let text = text(std::slice::from_ref(&p), &totals);
        assert!(
            text.contains("cdr: rows sent=7 failed=0 ")
                && text.ends_with(
                    "\nacks B: 4 asked, 3 Ok (75.0%), 0 other, 1 missing (0 pushed out by the cap)\n"
                ),
            "{text}"
        );
        assert!(text.contains("B          probing"), "{text}");
        assert!(
            text.contains("listener: sessions_open=0 sessions_total=0 tls_sessions=0 accepted=5"),
            "{text}"
        );
        assert!(
            text.contains("\nspool: 42 bytes, 40 of them live, 1 segments, 3 compactions\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "\nroutes: 10 ported entries from /var/lib/ported.txt, loaded in 1.50s, "
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "\ndns: queries=0 cache_hits=0 failures=0 timeouts=0 tcp_retries=0 \
                 enum_lookups=3 enum_answers=0 enum_failures=0 cached=2\n"
            ),
            "{text}"
        );
        assert_eq!(short_age(59), "59s");
        assert_eq!(short_age(3600), "60m");
        assert_eq!(short_age(7200), "2h");
        assert_eq!(short_age(3 * 86_400), "3d");
        let json = json(&[p], &totals);
        assert!(
            json.contains("\"acks\":{\"B\":{\"asked\":4,\"ok\":3,\"ok_share\":0.750,"),
            "{json}"
        );
        assert!(
            json.contains("\"state\":\"probing\",\"oldest_secs\":null"),
            "{json}"
        );
        assert!(
            json.contains("\"listener\":{\"sessions_open\":0,"),
            "{json}"
        );
        assert!(
            json.contains("\"name\":\"B\",\"healthy\":false,\"allowance\":1"),
            "{json}"
        );
        assert!(
            json.contains("\"last_error\":\"said \\\"no\\\"\""),
            "{json}"
        );
        assert!(
            json.contains(
                "\"spool_bytes\":42,\"spool_live_bytes\":40,\"spool_segments\":1,\"spool_compactions\":3,\
                 \"routes\":{\"ported_entries\":10,\"ported_file\":\"/var/lib/ported.txt\",\
                 \"ported_load_seconds\":1.500,\"ported_loaded_at\":1000},\
                 \"dns\":{\"queries\":0,\"cache_hits\":0,\"failures\":0,\"timeouts\":0,\
                 \"tcp_retries\":0,\"enum_lookups\":3,\"enum_answers\":0,\"enum_failures\":0,\
                 \"cached\":2},\"cdr\":{"
            ),
            "{json}"
        );
    }
}
