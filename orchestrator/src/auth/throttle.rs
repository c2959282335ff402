//! Login throttling: each failed password makes the next try from the same
//! account, and from the same source address, wait longer, and enough of
//! them lock it out for a while. While a key is waiting or locked, no
//! password is checked at all, so the right one is refused too.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Failures allowed before any delay.
const FREE_FAILURES: u32 = 3;
/// The longest delay between tries before the lockout.
const MAX_DELAY: Duration = Duration::from_secs(30);
/// Keys remembered at most; past it, forgotten ones are dropped first and
/// then new keys are refused (a flood of sources cannot grow memory).
const MAX_KEYS: usize = 100_000;
/// A source address may fail this many times more than one account.
const SOURCE_FACTOR: u32 = 4;

#[derive(Clone, Copy, Debug)]
pub struct Policy {
    /// Failures of one account that lock it (a source: 4 times as many).
    pub lockout_failures: u32,
    pub lockout: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            lockout_failures: 5,
            lockout: Duration::from_secs(15 * 60),
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Record {
    failures: u32,
    not_before: Instant,
    last: Instant,
}

pub struct Throttle {
    policy: Policy,
    keys: Mutex<HashMap<String, Record>>,
}

/// How long the caller must wait.
#[derive(Debug, PartialEq)]
pub struct Wait(pub Duration);

impl Throttle {
    pub fn new(policy: Policy) -> Self {
        Throttle {
            policy,
            keys: Mutex::new(HashMap::new()),
        }
    }

    fn keys(user: &str, source: Option<IpAddr>) -> [Option<(String, u32)>; 2] {
        // Long names are not stored whole.
        let user: String = user.chars().take(64).collect();
        [
            Some((format!("user:{user}"), 1)),
            source.map(|ip| (format!("source:{ip}"), SOURCE_FACTOR)),
        ]
    }

    /// Whether a try may go ahead now.
    pub fn check(&self, user: &str, source: Option<IpAddr>, now: Instant) -> Result<(), Wait> {
        let keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        let mut wait = Duration::ZERO;
        for (key, _) in Self::keys(user, source).into_iter().flatten() {
            if let Some(r) = keys.get(&key) {
                wait = wait.max(r.not_before.saturating_duration_since(now));
            }
        }
        if wait.is_zero() {
            Ok(())
        } else {
            Err(Wait(wait.max(Duration::from_secs(1))))
        }
    }

    /// Records a wrong password; answers how long the next try must wait.
    pub fn failed(&self, user: &str, source: Option<IpAddr>, now: Instant) -> Duration {
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        if keys.len() >= MAX_KEYS {
            let lockout = self.policy.lockout;
            keys.retain(|_, r| now.saturating_duration_since(r.last) < lockout);
        }
        let mut wait = Duration::ZERO;
        for (key, factor) in Self::keys(user, source).into_iter().flatten() {
            if keys.len() >= MAX_KEYS && !keys.contains_key(&key) {
                continue;
            }
            let r = keys.entry(key).or_insert(Record {
                failures: 0,
                not_before: now,
                last: now,
            });
            // A quiet lockout period wipes the slate.
            if now.saturating_duration_since(r.last) >= self.policy.lockout {
                r.failures = 0;
            }
            r.failures += 1;
            r.last = now;
            let limit = self.policy.lockout_failures.saturating_mul(factor);
            let free = FREE_FAILURES.saturating_mul(factor);
            let delay = if r.failures >= limit {
                self.policy.lockout
            } else if r.failures > free {
                let n = (r.failures - free).min(16);
                Duration::from_secs(1u64 << (n - 1)).min(MAX_DELAY)
            } else {
                Duration::ZERO
            };
            r.not_before = now + delay;
            wait = wait.max(delay);
        }
        wait
    }

    /// A right password: the account's record goes (the source's stays, so
    /// one good account cannot launder guesses at others).
    pub fn succeeded(&self, user: &str) {
        let user: String = user.chars().take(64).collect();
        self.keys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&format!("user:{user}"));
    }

    /// An admin reset the account's password: it may log in at once.
    pub fn clear_user(&self, user: &str) {
        self.succeeded(user);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            lockout_failures: 5,
            lockout: Duration::from_secs(900),
        }
    }

    #[test]
    fn delays_grow_then_lock_then_expire() {
        let t = Throttle::new(policy());
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let mut now = Instant::now();
        for _ in 0..FREE_FAILURES {
            assert!(t.check("bob", Some(ip), now).is_ok());
            assert_eq!(t.failed("bob", Some(ip), now), Duration::ZERO);
        }
        assert_eq!(t.failed("bob", Some(ip), now), Duration::from_secs(1));
        assert!(t.check("bob", Some(ip), now).is_err());
        now += Duration::from_secs(1);
        assert!(t.check("bob", Some(ip), now).is_ok());
        // The fifth failure locks the account for the lockout period.
        assert_eq!(t.failed("bob", Some(ip), now), Duration::from_secs(900));
        let Err(Wait(w)) = t.check("bob", None, now + Duration::from_secs(60)) else {
            panic!("locked");
        };
        assert_eq!(w, Duration::from_secs(840));
        // Another account from another address is not affected.
        assert!(t.check("alice", None, now).is_ok());
        // After the lockout it may try again.
        assert!(t.check("bob", None, now + Duration::from_secs(900)).is_ok());
    }

    #[test]
    fn a_source_guessing_many_accounts_is_slowed_too() {
        let t = Throttle::new(policy());
        let ip: IpAddr = "10.0.0.2".parse().unwrap();
        let now = Instant::now();
        for n in 0..FREE_FAILURES * SOURCE_FACTOR {
            t.failed(&format!("user{n}"), Some(ip), now);
        }
        assert!(t.check("fresh", Some(ip), now).is_ok());
        t.failed("another", Some(ip), now);
        assert!(t.check("fresh", Some(ip), now).is_err());
        assert!(t.check("fresh", None, now).is_ok());
        // A success on one account does not clear the source.
        t.succeeded("fresh");
        assert!(t.check("fresh", Some(ip), now).is_err());
    }

    #[test]
    fn memory_is_bounded() {
        let t = Throttle::new(policy());
        let now = Instant::now();
        for n in 0..(MAX_KEYS + 10) {
            t.failed(&format!("u{n}"), None, now);
        }
        assert!(t.keys.lock().unwrap().len() <= MAX_KEYS);
    }
}
