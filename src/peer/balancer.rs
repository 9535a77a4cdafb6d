//! Connections follow traffic. Every `balance_interval` the balancer looks
//! at each peer's demand (jobs in its pool and overflow, plus busy workers)
//! and sets its allowance, the number of its workers that may hold a
//! connection, within the global budget `[relay] max_connections`:
//!
//! - a healthy peer with more demand than allowance grows: doubling per
//!   tick (slow start), one per tick right after a recovery, never past its
//!   `max_connections` nor past its demand;
//! - a peer with no demand for its `idle_timeout` falls back to its
//!   `min_connections`;
//! - every healthy peer keeps its min (so a big backlog elsewhere never
//!   starves its trickle); an unhealthy peer keeps one probing connection;
//! - the sum of allowances never exceeds the budget: growth comes from free
//!   budget, and from peers with nothing to do above their min (at once,
//!   before their idle_timeout), handed out one connection at a time in
//!   turn.
//!
//! Workers above their allowance finish their message, QUIT and park. Every
//! change is logged with its reason, and a statistics line per peer every
//! `stats_interval`.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use log::info;

use crate::peer::{Budget, PeerViews};
use crate::queue::Queue;
use crate::sys::owned::Owned;
use crate::sys::printable::Printable;

/// What the balancer knows of one peer at a tick.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Load {
    /// `min_connections`.
    pub min: usize,
    /// `max_connections`.
    pub max: usize,
    /// The allowance now.
    pub allowance: usize,
    /// Jobs waiting plus workers busy.
    pub demand: usize,
    /// False while isolated and probed.
    pub healthy: bool,
    /// Just recovered: grow by one, not by doubling.
    pub recovering: bool,
    /// No demand for at least its `idle_timeout`.
    pub idle: bool,
    /// Held by an operator: no connections at all.
    pub held: bool,
}

/// The allowances for the next tick.
pub fn plan(loads: &[Load], budget: usize) -> Vec<usize> {
    let floor: Vec<usize> = loads
        .iter()
        .map(|l| match (l.held, l.healthy) {
            (true, _) => 0,
            (false, true) => l.min,
            (false, false) => 1,
        })
        .collect();
    let want: Vec<usize> = loads
        .iter()
        .zip(&floor)
        .map(|(l, &floor)| {
            if l.held || !l.healthy {
                return floor;
            }
            let target = if l.demand > l.allowance {
                let step = if l.recovering { 1 } else { l.allowance.max(1) };
                (l.allowance + step).min(l.demand)
            } else if l.idle {
                floor
            } else {
                l.allowance
            };
            target.clamp(floor, l.max.max(floor))
        })
        .collect();
    if want.iter().sum::<usize>() <= budget {
        return want;
    }
    // Over budget: everybody gets its floor, then the rest one at a time
    // in turn: first to busy peers keeping what they hold, then to busy
    // peers growing, and only then to idle peers keeping theirs.
    let mut give: Vec<usize> = floor.clone();
    let mut left = budget.saturating_sub(give.iter().sum());
    let keep: Vec<usize> = loads
        .iter()
        .zip(&want)
        .zip(&floor)
        .map(|((l, &w), &f)| if l.demand > 0 { w.min(l.allowance) } else { f })
        .collect();
    let need: Vec<usize> = loads
        .iter()
        .zip(&want)
        .zip(&floor)
        .map(|((l, &w), &f)| if l.demand > 0 { w } else { f })
        .collect();
    for limit in [&keep, &need, &want] {
        let mut progress = true;
        while left > 0 && progress {
            progress = false;
            for i in 0..give.len() {
                if left > 0 && give[i] < limit[i] {
                    give[i] += 1;
                    left -= 1;
                    progress = true;
                }
            }
        }
    }
    give
}

/// The balancer thread: dropping it stops and joins it (the stop
/// channel goes first, fields drop in order).
pub struct Balancer {
    stop: crossbeam_channel::Sender<()>,
    thread: Owned<()>,
}

impl Balancer {
    /// Starts balancing `peers` within `budget`.
    pub fn start(
        peers: PeerViews,
        queue: Arc<Queue>,
        budget: Arc<Budget>,
        interval: Duration,
        stats_interval: Duration,
    ) -> std::io::Result<Balancer> {
        let (stop_tx, stop_rx) = crossbeam_channel::bounded(0);
        let thread = Owned::spawn("balancer", move || {
            run(&peers, &queue, &budget, interval, stats_interval, &stop_rx)
        })?;
        Ok(Balancer {
            stop: stop_tx,
            thread,
        })
    }

    /// Stops the thread and waits for it.
    pub fn stop(self) {
        drop(self.stop);
        self.thread.join();
    }
}

fn run(
    views: &PeerViews,
    queue: &Queue,
    budget: &Budget,
    interval: Duration,
    stats_every: Duration,
    stop: &Receiver<()>,
) {
    let mut last_busy: Vec<Instant> = Vec::new();
    let mut last_sent: Vec<(Instant, u64)> = Vec::new();
    let mut last_stats = Instant::now();
    loop {
        match stop.recv_timeout(interval) {
            Err(RecvTimeoutError::Timeout) => {}
            _ => return,
        }
        let now = Instant::now();
        // A reload may have added peers since the last tick.
        let peers = views.list();
        last_busy.resize(peers.len(), now);
        last_sent.resize(peers.len(), (now, 0));
        let snapshots: Vec<_> = peers.iter().map(|p| p.snapshot(queue)).collect();
        for ((p, s), (at, sent)) in peers.iter().zip(&snapshots).zip(&mut last_sent) {
            let secs = now.duration_since(*at).as_secs_f64();
            if secs > 0.0 {
                let rate = s.sent.saturating_sub(*sent) as f64 / secs;
                p.stats()
                    .rate_milli
                    .store((rate * 1000.0) as u64, Ordering::Relaxed);
            }
            *at = now;
            *sent = s.sent;
        }
        let loads: Vec<Load> = peers
            .iter()
            .zip(&snapshots)
            .zip(&mut last_busy)
            .map(|((p, s), busy_at)| {
                let demand = s.pool_depth + s.overflow + s.busy;
                if demand > 0 {
                    *busy_at = now;
                }
                Load {
                    min: p.settings().cfg.min_connections,
                    max: p.settings().cfg.max_connections,
                    allowance: s.allowance,
                    demand,
                    healthy: s.healthy,
                    recovering: false,
                    idle: now.duration_since(*busy_at) >= p.settings().cfg.idle_timeout,
                    held: p.control().held() || p.control().removed(),
                }
            })
            .collect();
        // Recovery is consumed only when it could matter, so a recovered
        // peer grows by one on its next tick with demand.
        let loads: Vec<Load> = loads
            .into_iter()
            .zip(&peers)
            .map(|(l, p)| Load {
                recovering: l.demand > l.allowance && p.control().take_recovering(),
                ..l
            })
            .collect();
        let next = plan(&loads, budget.max());
        for ((p, l), &n) in peers.iter().zip(&loads).zip(&next) {
            if n != l.allowance {
                let why = if p.control().removed() {
                    "removed by a reload".to_string()
                } else if l.held {
                    "held by an operator".to_string()
                } else if !l.healthy {
                    "unhealthy: one probing connection".to_string()
                } else if n > l.allowance {
                    format!("demand {}", l.demand)
                } else if l.idle {
                    "idle".to_string()
                } else {
                    "budget needed elsewhere".to_string()
                };
                info!("peer={} allowance {} -> {n} ({why})", p.name(), l.allowance);
                p.control().set_allowance(n);
            }
        }
        if !stats_every.is_zero() && now.duration_since(last_stats) >= stats_every {
            last_stats = now;
            for s in &snapshots {
                info!(
                    "stats peer={} health={} allowance={} open={} busy={} pool={} overflow={} \
                     waiting_retry={} sent={} deferred={} failed={} last_error=\"{}\"",
                    s.name,
                    if s.healthy { "ok" } else { "probing" },
                    s.allowance,
                    s.connections_open,
                    s.busy,
                    s.pool_depth,
                    s.overflow,
                    s.waiting_retry,
                    s.sent,
                    s.deferred,
                    s.failed,
                    Printable(&s.last_error.replace('"', "'")),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(min: usize, max: usize, allowance: usize, demand: usize) -> Load {
        Load {
            min,
            max,
            allowance,
            demand,
            healthy: true,
            recovering: false,
            idle: false,
            held: false,
        }
    }

    #[test]
    fn a_held_peer_gets_nothing() {
        let held = Load {
            held: true,
            ..load(2, 8, 4, 100)
        };
        assert_eq!(plan(&[held, load(1, 8, 1, 100)], 64), [0, 2]);
    }

    #[test]
    fn grows_by_doubling_up_to_demand_and_max() {
        assert_eq!(plan(&[load(1, 8, 1, 100)], 64), [2]);
        assert_eq!(plan(&[load(1, 8, 2, 100)], 64), [4]);
        assert_eq!(plan(&[load(1, 8, 4, 100)], 64), [8]);
        assert_eq!(plan(&[load(1, 8, 8, 100)], 64), [8]);
        assert_eq!(plan(&[load(1, 8, 4, 5)], 64), [5]);
        let recovering = Load {
            recovering: true,
            ..load(1, 8, 1, 100)
        };
        assert_eq!(plan(&[recovering], 64), [2]);
    }

    #[test]
    fn idle_peers_fall_back_to_min_and_busy_ones_keep() {
        let idle = Load {
            idle: true,
            ..load(2, 8, 8, 0)
        };
        assert_eq!(plan(&[idle], 64), [2]);
        assert_eq!(plan(&[load(2, 8, 8, 0)], 64), [8], "not idle long enough");
    }

    #[test]
    fn the_budget_is_never_exceeded_and_every_min_is_kept() {
        // A has a huge backlog, B a trickle, C is down.
        let down = Load {
            healthy: false,
            ..load(2, 8, 8, 50)
        };
        let loads = [load(1, 16, 8, 100_000), load(2, 8, 2, 1), down];
        let next = plan(&loads, 10);
        assert_eq!(next.iter().sum::<usize>(), 10);
        assert_eq!(next[1], 2, "B keeps its min");
        assert_eq!(next[2], 1, "C probes with one");
        assert_eq!(next[0], 7);
        // Peers with nothing to do give way to demand at once, before
        // their idle_timeout.
        assert_eq!(plan(&[load(1, 8, 4, 100), load(1, 8, 6, 0)], 8), [7, 1]);
    }

    #[test]
    fn holders_keep_before_others_grow() {
        // Both want more than the budget allows: each keeps what it holds.
        let next = plan(&[load(1, 16, 6, 1000), load(1, 16, 2, 1000)], 8);
        assert_eq!(next, [6, 2]);
    }
}
