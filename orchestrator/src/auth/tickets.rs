//! Console tickets: a browser cannot put a bearer token on a WebSocket, so
//! it asks for a ticket (with its token, in the header) and opens the
//! console with `?ticket=`. A ticket names one user and one VM, works once,
//! and only for a short while, so one that leaks into a log or a browser's
//! history is worth nothing.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a ticket may wait to be used.
pub const TTL: Duration = Duration::from_secs(60);
/// Tickets outstanding at most (each user asking is bounded by this too).
const MAX_TICKETS: usize = 10_000;

struct Ticket {
    user: String,
    vm: String,
    expires: Instant,
}

#[derive(Default)]
pub struct Tickets {
    /// By the SHA-256 of the secret, like tokens.
    by_id: Mutex<HashMap<String, Ticket>>,
}

impl Tickets {
    /// A new ticket's secret, or `None` when too many are outstanding.
    pub fn issue(&self, user: &str, vm: &str, now: Instant) -> Option<String> {
        let secret = super::random_hex(32).ok()?;
        let mut map = self.by_id.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_TICKETS {
            map.retain(|_, t| t.expires > now);
            if map.len() >= MAX_TICKETS {
                return None;
            }
        }
        map.insert(
            super::token_id(&secret),
            Ticket {
                user: user.to_string(),
                vm: vm.to_string(),
                expires: now + TTL,
            },
        );
        Some(secret)
    }

    /// Uses up a ticket: (user id, VM id) while it is fresh.
    pub fn redeem(&self, secret: &str, now: Instant) -> Option<(String, String)> {
        let mut map = self.by_id.lock().unwrap_or_else(|p| p.into_inner());
        let ticket = map.remove(&super::token_id(secret))?;
        (ticket.expires > now).then_some((ticket.user, ticket.vm))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ticket_works_once_for_its_vm_while_fresh() {
        let t = Tickets::default();
        let now = Instant::now();
        let s = t.issue("u1", "vm-a", now).unwrap();
        assert_eq!(t.redeem(&s, now), Some(("u1".into(), "vm-a".into())));
        assert_eq!(t.redeem(&s, now), None);
        let s = t.issue("u1", "vm-a", now).unwrap();
        assert_eq!(t.redeem(&s, now + TTL), None);
        assert_eq!(t.redeem("made-up", now), None);
    }
}
