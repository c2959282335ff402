//! Passwords, bearer tokens and who may do what.
//!
//! Passwords are kept as Argon2id hashes. A token is 32 random bytes shown
//! once as hex; the store keeps only its SHA-256, so a copy of the database
//! gives no usable tokens.

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::model::{Role, User};

pub mod password;
pub mod throttle;
pub mod tickets;

#[derive(Debug, Error)]
pub enum AuthError {
    #[error("Cannot hash the password: {0}")]
    Hash(String),
    #[error("The system has no source of random bytes")]
    Random,
}

pub fn random_hex(bytes: usize) -> Result<String, AuthError> {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).map_err(|_| AuthError::Random)?;
    Ok(hex::encode(buf))
}

pub fn hash_password(password: &str) -> Result<String, AuthError> {
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).map_err(|_| AuthError::Random)?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| AuthError::Hash(e.to_string()))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| AuthError::Hash(e.to_string()))
}

pub fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash)
        .map(|parsed| {
            Argon2::default()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok()
        })
        .unwrap_or(false)
}

/// The id a token is stored under.
pub fn token_id(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// What a request needs in a project.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Look: viewers and up.
    Read,
    /// Create, change and delete resources: operators and up.
    Operate,
    /// Manage the project's members: project admins.
    Manage,
}

impl Access {
    fn needs(self) -> Role {
        match self {
            Access::Read => Role::Viewer,
            Access::Operate => Role::Operator,
            Access::Manage => Role::Admin,
        }
    }
}

pub fn role_in(user: &User, project: &str) -> Option<Role> {
    if user.system_admin {
        return Some(Role::Admin);
    }
    user.memberships
        .iter()
        .find(|m| m.project == project)
        .map(|m| m.role)
}

pub fn allowed(user: &User, project: &str, access: Access) -> bool {
    role_in(user, project).is_some_and(|role| role >= access.needs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Membership;

    #[test]
    fn password_round_trip() {
        let h = hash_password("s3cret").unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(verify_password("s3cret", &h));
        assert!(!verify_password("s3creT", &h));
        assert!(!verify_password("s3cret", "not a hash"));
    }

    #[test]
    fn roles_nest() {
        let user = User {
            id: "u".into(),
            name: "u".into(),
            password_hash: String::new(),
            system_admin: false,
            memberships: vec![Membership {
                project: "p".into(),
                role: Role::Operator,
            }],
            created_at: 0,
            password_changed_at: 0,
            must_change_password: false,
        };
        assert!(allowed(&user, "p", Access::Read));
        assert!(allowed(&user, "p", Access::Operate));
        assert!(!allowed(&user, "p", Access::Manage));
        assert!(!allowed(&user, "q", Access::Read));
        let admin = User {
            system_admin: true,
            memberships: vec![],
            ..user
        };
        assert!(allowed(&admin, "q", Access::Manage));
    }

    #[test]
    fn tokens_are_stored_hashed() {
        let t = random_hex(32).unwrap();
        assert_eq!(t.len(), 64);
        assert_ne!(token_id(&t), t);
        assert_eq!(token_id(&t), token_id(&t));
    }
}
