//! Password hashing and checking with bounded memory and concurrency.
//!
//! Argon2id as configured needs 19 MiB per hash. Run for every login
//! attempt on its own allocation, a flood of logins made that much memory
//! per blocking thread, and the allocator kept it. Here at most one check
//! per CPU runs at a time, each on a buffer taken from a fixed pool and
//! given back, so keeld's memory for passwords is `CPUs × 19 MiB` whatever
//! arrives; a check that finds every worker busy for too long is refused
//! ([`Busy`]), which the API answers 429.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use argon2::password_hash::{Output, ParamsString, PasswordHash, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use thiserror::Error;
use tokio::sync::Semaphore;

/// The largest Argon2 memory a stored hash may ask for (a hash made with
/// other parameters than ours is still checked, within this).
const MAX_BLOCKS: usize = 64 * 1024;

#[derive(Debug, Error)]
pub enum PasswordError {
    #[error("Every password worker is busy; try again in a second")]
    Busy,
    #[error("Cannot hash the password: {0}")]
    Hash(String),
    #[error("The system has no source of random bytes")]
    Random,
}

pub struct PasswordPool {
    permits: Semaphore,
    /// One Argon2 working area per permit: taken while a check runs.
    buffers: Mutex<Vec<Vec<Block>>>,
    /// How long a check waits for a worker before it is refused.
    wait: Duration,
}

impl PasswordPool {
    pub fn new(workers: usize, wait: Duration) -> Arc<Self> {
        let workers = workers.max(1);
        Arc::new(PasswordPool {
            permits: Semaphore::new(workers),
            buffers: Mutex::new(Vec::with_capacity(workers)),
            wait,
        })
    }

    /// Runs `work` on a pooled buffer, on a blocking thread.
    async fn run<T: Send + 'static>(
        self: &Arc<Self>,
        work: impl FnOnce(&mut Vec<Block>) -> T + Send + 'static,
    ) -> Result<T, PasswordError> {
        let permit = tokio::time::timeout(self.wait, self.permits.acquire())
            .await
            .map_err(|_| PasswordError::Busy)?
            .map_err(|_| PasswordError::Busy)?;
        let mut buffer = self
            .buffers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop()
            .unwrap_or_default();
        let pool = self.clone();
        let result = tokio::task::spawn_blocking(move || {
            let out = work(&mut buffer);
            pool.buffers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(buffer);
            out
        })
        .await
        .map_err(|e| PasswordError::Hash(e.to_string()));
        drop(permit);
        result
    }

    /// Whether `password` matches the PHC string `hash`.
    pub async fn verify(
        self: &Arc<Self>,
        password: String,
        hash: String,
    ) -> Result<bool, PasswordError> {
        self.run(move |buffer| verify_with(buffer, password.as_bytes(), &hash))
            .await
    }

    /// A new Argon2id PHC string for `password`.
    pub async fn hash(self: &Arc<Self>, password: String) -> Result<String, PasswordError> {
        let mut salt = [0u8; 16];
        getrandom::fill(&mut salt).map_err(|_| PasswordError::Random)?;
        self.run(move |buffer| hash_with(buffer, password.as_bytes(), &salt))
            .await?
    }
}

fn blocks(buffer: &mut Vec<Block>, count: usize) -> &mut [Block] {
    if buffer.len() < count {
        buffer.resize(count, Block::default());
    }
    &mut buffer[..count]
}

/// Hashes with keeld's parameters (Argon2id, 19 MiB, 2 passes).
pub fn hash_with(
    buffer: &mut Vec<Block>,
    password: &[u8],
    salt: &[u8],
) -> Result<String, PasswordError> {
    let params = Params::default();
    let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone());
    let mut out = [0u8; Params::DEFAULT_OUTPUT_LEN];
    let err = |e: &dyn std::fmt::Display| PasswordError::Hash(e.to_string());
    argon
        .hash_password_into_with_memory(
            password,
            salt,
            &mut out,
            blocks(buffer, params.block_count()),
        )
        .map_err(|e| err(&e))?;
    let salt = SaltString::encode_b64(salt).map_err(|e| err(&e))?;
    let phc = PasswordHash {
        algorithm: Algorithm::Argon2id.ident(),
        version: Some(Version::V0x13.into()),
        params: ParamsString::try_from(&params).map_err(|e| err(&e))?,
        salt: Some(salt.as_salt()),
        hash: Some(Output::new(&out).map_err(|e| err(&e))?),
    };
    Ok(phc.to_string())
}

/// Checks against a PHC string; anything unparsable or outside our limits
/// is a mismatch.
pub fn verify_with(buffer: &mut Vec<Block>, password: &[u8], hash: &str) -> bool {
    let Ok(phc) = PasswordHash::new(hash) else {
        return false;
    };
    let (Ok(algorithm), Ok(params), Some(salt), Some(expected)) = (
        Algorithm::try_from(phc.algorithm),
        Params::try_from(&phc),
        phc.salt,
        phc.hash,
    ) else {
        return false;
    };
    let version = match phc.version.map(Version::try_from) {
        None => Version::default(),
        Some(Ok(v)) => v,
        Some(Err(_)) => return false,
    };
    if params.block_count() > MAX_BLOCKS {
        return false;
    }
    let mut salt_bytes = [0u8; 64];
    let Ok(salt) = salt.decode_b64(&mut salt_bytes) else {
        return false;
    };
    let mut out = vec![0u8; expected.len()];
    let count = params.block_count();
    let argon = Argon2::new(algorithm, version, params);
    if argon
        .hash_password_into_with_memory(password, salt, &mut out, blocks(buffer, count))
        .is_err()
    {
        return false;
    }
    // Output's equality is constant-time.
    Output::new(&out).is_ok_and(|got| got == expected)
}

/// Why `user` must set a new password before logging in at `now`, if so:
/// an admin's reset, or a password older than `max_age`.
pub fn expired(user: &crate::model::User, max_age: Option<Duration>, now: u64) -> Option<String> {
    if user.must_change_password {
        return Some("An administrator reset your password: set a new one".into());
    }
    let max_age = max_age?;
    let set = if user.password_changed_at == 0 {
        user.created_at
    } else {
        user.password_changed_at
    };
    (now.saturating_sub(set) > max_age.as_secs()).then(|| {
        format!(
            "Your password is older than {} days: set a new one",
            max_age.as_secs() / 86400
        )
    })
}

/// What a password must be like.
#[derive(Clone, Copy, Debug)]
pub struct Policy {
    pub min_length: usize,
    /// Of lowercase, uppercase, digits and other characters.
    pub min_classes: usize,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            min_length: 10,
            min_classes: 3,
        }
    }
}

/// Why a new password was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PolicyError {
    #[error("The password must be {min} to 1024 characters")]
    Length { min: usize },
    #[error(
        "The password needs at least {min} of: lowercase letters, uppercase letters, digits, \
         other characters"
    )]
    Classes { min: usize },
}

impl Policy {
    pub fn check(&self, password: &str) -> Result<(), PolicyError> {
        let length = password.chars().count();
        if length < self.min_length || password.len() > 1024 {
            return Err(PolicyError::Length {
                min: self.min_length,
            });
        }
        let classes = [
            password.chars().any(|c| c.is_lowercase()),
            password.chars().any(|c| c.is_uppercase()),
            password.chars().any(|c| c.is_ascii_digit()),
            password
                .chars()
                .any(|c| !c.is_alphanumeric() && !c.is_whitespace()),
        ]
        .iter()
        .filter(|&&b| b)
        .count();
        if classes < self.min_classes {
            return Err(PolicyError::Classes {
                min: self.min_classes,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use argon2::PasswordVerifier;

    #[test]
    fn pooled_hashes_are_standard_argon2id() {
        let mut buf = Vec::new();
        let h = hash_with(&mut buf, b"s3cret", b"0123456789abcdef").unwrap();
        assert!(h.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{h}");
        // The argon2 crate's own verifier agrees, both ways.
        let parsed = PasswordHash::new(&h).unwrap();
        assert!(
            Argon2::default()
                .verify_password(b"s3cret", &parsed)
                .is_ok()
        );
        assert!(verify_with(&mut buf, b"s3cret", &h));
        assert!(!verify_with(&mut buf, b"s3creT", &h));
        assert!(!verify_with(&mut buf, b"s3cret", "not a hash"));
        let theirs = crate::auth::hash_password("other").unwrap();
        assert!(verify_with(&mut buf, b"other", &theirs));
        // A stored hash asking for absurd memory is refused, not run.
        let huge = h.replace("m=19456", "m=4000000");
        assert!(!verify_with(&mut buf, b"s3cret", &huge));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_pool_bounds_concurrency_and_refuses_when_busy() {
        let pool = PasswordPool::new(1, Duration::from_millis(1));
        let h = pool.hash("pw-1".into()).await.unwrap();
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let p = pool.clone();
            let h = h.clone();
            tasks.push(tokio::spawn(
                async move { p.verify("pw-1".into(), h).await },
            ));
        }
        let mut busy = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(ok) => assert!(ok),
                Err(PasswordError::Busy) => busy += 1,
                Err(e) => panic!("{e}"),
            }
        }
        assert!(busy > 0, "8 checks at once on one worker with no wait");
        assert!(pool.buffers.lock().unwrap().len() <= 1);
    }

    #[test]
    fn passwords_expire_by_age_or_reset() {
        let day = 86400;
        let mut user = crate::model::User {
            id: "u".into(),
            name: "u".into(),
            password_hash: String::new(),
            system_admin: false,
            memberships: vec![],
            created_at: 1000,
            password_changed_at: 0,
            must_change_password: false,
        };
        let max = Some(Duration::from_secs(90 * day));
        assert!(expired(&user, None, 1000 + 1000 * day).is_none());
        assert!(expired(&user, max, 1000 + 90 * day).is_none());
        let why = expired(&user, max, 1001 + 90 * day).unwrap();
        assert!(why.contains("older than 90 days"), "{why}");
        user.password_changed_at = 1000 + 80 * day;
        assert!(expired(&user, max, 1001 + 90 * day).is_none());
        user.must_change_password = true;
        assert!(expired(&user, None, 0).unwrap().contains("reset"));
    }

    #[test]
    fn policy() {
        let p = Policy::default();
        assert!(p.check("password-1").is_ok());
        assert!(p.check("Password12").is_ok());
        assert!(p.check("short-1").is_err());
        assert!(p.check("passwordpassword").is_err());
        assert!(p.check(&"aA1-".repeat(300)).is_err());
    }
}
