//! Slowing down what a client repeats: failed AUTH attempts, per address
//! and per account, and log lines about refused connections.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use log::warn;
use parking_lot::Mutex;

/// The delay before the verdict on an AUTH after one recent failure; it
/// doubles with each further one.
pub const AUTH_DELAY_MIN: Duration = Duration::from_millis(250);
/// The longest delay.
pub const AUTH_DELAY_MAX: Duration = Duration::from_secs(8);
/// Failures are forgotten this long after the last one.
pub const AUTH_FORGET: Duration = Duration::from_secs(15 * 60);
/// Most client addresses tracked; past it, the one whose last failure is
/// oldest goes.
const MAX_ADDRESSES: usize = 10_000;

#[derive(Clone, Copy)]
struct Failures {
    count: u32,
    last: Instant,
}

impl Failures {
    fn recent(self, now: Instant) -> u32 {
        if now.duration_since(self.last) < AUTH_FORGET {
            self.count
        } else {
            0
        }
    }
}

/// Recent AUTH failures by client address (an IPv6 client by its /64, what
/// one host usually holds) and by configured account.
#[derive(Default)]
pub struct AuthThrottle {
    by_address: Mutex<HashMap<IpAddr, Failures>>,
    by_account: Mutex<HashMap<String, Failures>>,
}

/// The address a client counts as for per-address limits and AUTH
/// failures: itself, or for IPv6 its /64, what one host usually holds.
pub fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(bits.into())
        }
        v4 => v4,
    }
}

impl AuthThrottle {
    /// How long to wait before answering an AUTH from `ip` for `account`
    /// (a configured account, or `None`): zero without recent failures,
    /// then [`AUTH_DELAY_MIN`] doubling per failure up to [`AUTH_DELAY_MAX`].
    pub fn delay(&self, ip: IpAddr, account: Option<&str>) -> Duration {
        let now = Instant::now();
        let by_ip = self
            .by_address
            .lock()
            .get(&address_key(ip))
            .map_or(0, |f| f.recent(now));
        let by_account = account
            .and_then(|a| self.by_account.lock().get(a).map(|f| f.recent(now)))
            .unwrap_or(0);
        match by_ip.max(by_account) {
            0 => Duration::ZERO,
            n => AUTH_DELAY_MIN
                .saturating_mul(1 << (n - 1).min(16))
                .min(AUTH_DELAY_MAX),
        }
    }

    /// Counts a failed AUTH.
    pub fn failed(&self, ip: IpAddr, account: Option<&str>) {
        let now = Instant::now();
        let bump = |f: &mut Failures| {
            f.count = f.recent(now).saturating_add(1);
            f.last = now;
        };
        let fresh = Failures {
            count: 0,
            last: now,
        };
        {
            let mut map = self.by_address.lock();
            if map.len() >= MAX_ADDRESSES && !map.contains_key(&address_key(ip)) {
                map.retain(|_, f| f.recent(now) > 0);
                if map.len() >= MAX_ADDRESSES {
                    if let Some(oldest) = map.iter().min_by_key(|(_, f)| f.last).map(|(k, _)| *k) {
                        map.remove(&oldest);
                    }
                }
            }
            bump(map.entry(address_key(ip)).or_insert(fresh));
        }
        if let Some(a) = account {
            bump(self.by_account.lock().entry(a.to_string()).or_insert(fresh));
        }
    }

    /// A good AUTH clears what the address and the account had.
    pub fn succeeded(&self, ip: IpAddr, account: Option<&str>) {
        self.by_address.lock().remove(&address_key(ip));
        if let Some(a) = account {
            self.by_account.lock().remove(a);
        }
    }
}

/// A warning that may repeat at the rate of the traffic that causes it
/// (connections over a limit, failed accepts): written at most once per
/// interval, with how many like it were left out since.
pub struct RateLimitedWarning {
    interval: Duration,
    state: Mutex<(Option<Instant>, u64)>,
}

impl RateLimitedWarning {
    /// At most one line per `interval`.
    pub fn new(interval: Duration) -> RateLimitedWarning {
        RateLimitedWarning {
            interval,
            state: Mutex::new((None, 0)),
        }
    }

    /// Logs `line()` unless a line went out within the interval.
    pub fn warn(&self, line: impl FnOnce() -> String) {
        let mut state = self.state.lock();
        let now = Instant::now();
        if state
            .0
            .is_some_and(|t| now.duration_since(t) < self.interval)
        {
            state.1 += 1;
            return;
        }
        let left_out = std::mem::take(&mut state.1);
        state.0 = Some(now);
        drop(state);
        if left_out > 0 {
            warn!("{} ({left_out} more like it left out)", line());
        } else {
            warn!("{}", line());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_per_address_and_per_account() {
        let t = AuthThrottle::default();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        assert_eq!(t.delay(a, Some("bob")), Duration::ZERO);
        t.failed(a, Some("bob"));
        assert_eq!(t.delay(a, None), AUTH_DELAY_MIN);
        t.failed(a, None);
        assert_eq!(t.delay(a, None), AUTH_DELAY_MIN * 2);
        // Another address guessing bob's password waits as bob's guesser.
        assert_eq!(t.delay(b, Some("bob")), AUTH_DELAY_MIN);
        assert_eq!(t.delay(b, None), Duration::ZERO);
        for _ in 0..100 {
            t.failed(a, None);
        }
        assert_eq!(t.delay(a, None), AUTH_DELAY_MAX);
        t.succeeded(a, Some("bob"));
        assert_eq!(t.delay(a, Some("bob")), Duration::ZERO);
    }

    #[test]
    fn an_ipv6_host_counts_by_its_64() {
        let t = AuthThrottle::default();
        t.failed("2001:db8:1:2::1".parse().unwrap(), None);
        assert_eq!(
            t.delay("2001:db8:1:2:ffff::9".parse().unwrap(), None),
            AUTH_DELAY_MIN
        );
        assert_eq!(
            t.delay("2001:db8:1:3::1".parse().unwrap(), None),
            Duration::ZERO
        );
    }

    #[test]
    fn the_address_table_is_bounded() {
        let t = AuthThrottle::default();
        for i in 0..(MAX_ADDRESSES as u32 + 50) {
            t.failed(IpAddr::V4(i.into()), None);
        }
        assert_eq!(t.by_address.lock().len(), MAX_ADDRESSES);
    }
}
