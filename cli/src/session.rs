//! The session with keeld: the options every keeld command takes, the
//! server and token (flags, environment, the saved login), `keel login`
//! and `keel passwd`, and reading keeld's answers as `keel_api::keeld`
//! types.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use clap::Args;
use keel_api::keeld::{ChangePassword, NewToken};
use keel_api::keeld_client::{KeeldClient, KeeldError};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

#[derive(Args)]
pub struct Common {
    /// keeld's address (default: from `keel login`, KEEL_SERVER, or
    /// http://127.0.0.1:8080).
    #[arg(long, global = true)]
    pub server: Option<String>,
    /// Project to work in (default: `default`).
    #[arg(long, global = true)]
    pub project: Option<String>,
    /// Print keeld's JSON answers as they are.
    #[arg(long, global = true)]
    pub json: bool,
    /// Return once keeld accepted the request; do not wait for it to end.
    #[arg(long, global = true)]
    pub no_wait: bool,
}

impl Common {
    /// `?project=P`, or nothing.
    pub fn q(&self) -> String {
        self.project
            .as_ref()
            .map(|p| format!("?project={p}"))
            .unwrap_or_default()
    }

    /// `?project=P&more`, or `?more`.
    pub fn q_and(&self, more: &str) -> String {
        match &self.project {
            Some(p) => format!("?project={p}&{more}"),
            None => format!("?{more}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Keeld(#[from] KeeldError),
    #[error("{0}")]
    Input(String),
    #[error("keeld's answer is not the {what} expected")]
    Reply {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
}

/// Reads an answer as the `keel_api::keeld` type it is (`what` names it
/// in the error).
pub fn typed<T: DeserializeOwned>(what: &'static str, value: &Value) -> Result<T, Error> {
    T::deserialize(value).map_err(|source| Error::Reply { what, source })
}

/// A request body as JSON.
pub fn body<T: Serialize>(request: &T) -> Result<Value, Error> {
    serde_json::to_value(request)
        .map_err(|e| Error::Input(format!("cannot write the request: {e}")))
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Credentials {
    server: String,
    token: String,
}

fn credentials_path() -> PathBuf {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("keel").join("credentials.json")
}

/// The client for a command: server and token from the flags, the
/// environment or the saved login.
pub fn client(common: &Common) -> Result<KeeldClient, Error> {
    let saved: Option<Credentials> = std::fs::read_to_string(credentials_path())
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    let server = common
        .server
        .clone()
        .or_else(|| std::env::var("KEEL_SERVER").ok())
        .or_else(|| saved.as_ref().map(|c| c.server.clone()))
        .unwrap_or_else(|| "http://127.0.0.1:8080".into());
    let mut client = KeeldClient::new(&server)?;
    let token = std::env::var("KEEL_TOKEN").ok().or_else(|| {
        saved
            .filter(|c| c.server == client.server())
            .map(|c| c.token)
    });
    if let Some(token) = token {
        client = client.with_token(token);
    }
    Ok(client)
}

fn read_password() -> Result<String, Error> {
    read_secret(Some("KEEL_PASSWORD"), "Password")
}

/// A secret from the environment variable `env`, else from stdin (with
/// `prompt` and no echo on a terminal).
fn read_secret(env: Option<&str>, prompt: &str) -> Result<String, Error> {
    if let Some(p) = env.and_then(|e| std::env::var(e).ok()) {
        return Ok(p);
    }
    let tty = std::io::stdin().is_terminal();
    if tty {
        eprint!("{prompt}: ");
        let _ = std::io::stderr().flush();
        let _ = std::process::Command::new("stty").arg("-echo").status();
    }
    let mut line = String::new();
    let read = std::io::stdin().read_line(&mut line);
    if tty {
        let _ = std::process::Command::new("stty").arg("echo").status();
        eprintln!();
    }
    read.map_err(|e| Error::Input(format!("cannot read the {}: {e}", prompt.to_lowercase())))?;
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

pub fn login(common: &Common, user: &str) -> Result<(), Error> {
    let mut client = client(common)?;
    let password = read_password()?;
    let session: NewToken = typed("session token", &client.login(user, &password)?)?;
    let creds = Credentials {
        server: client.server(),
        token: session.token,
    };
    let path = credentials_path();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::Input(format!("cannot create {}: {e}", dir.display())))?;
    }
    let text = serde_json::to_string(&creds).unwrap_or_default();
    write_private(&path, &text)?;
    println!("Logged in to {} as {user}", creds.server);
    Ok(())
}

/// `keel passwd`: the current password (KEEL_PASSWORD or a prompt) and a
/// new one (KEEL_NEW_PASSWORD or two prompts that must match). keeld ends
/// the user's other sessions; the saved one goes on working.
pub fn passwd(common: &Common, user: Option<&str>) -> Result<(), Error> {
    let c = client(common)?;
    let current = read_secret(Some("KEEL_PASSWORD"), "Current password")?;
    let new = match std::env::var("KEEL_NEW_PASSWORD") {
        Ok(p) => p,
        Err(_) => {
            let first = read_secret(None, "New password")?;
            if read_secret(None, "New password again")? != first {
                return Err(Error::Input("The new passwords do not match".into()));
            }
            first
        }
    };
    // Without a saved login keeld cannot tell whose password it is.
    let username = match (user, c.token()) {
        (Some(u), _) => Some(u.to_string()),
        (None, None) => Some("admin".to_string()),
        (None, Some(_)) => None,
    };
    let request = ChangePassword {
        username,
        current_password: current,
        new_password: new,
    };
    c.send("POST", "/api/v1/password", Some(&body(&request)?), &[])?
        .ok()?;
    println!("Password changed");
    Ok(())
}

fn write_private(path: &Path, text: &str) -> Result<(), Error> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::Input(format!("cannot write {}: {e}", path.display())))?;
    f.write_all(text.as_bytes())
        .map_err(|e| Error::Input(format!("cannot write {}: {e}", path.display())))
}
