//! The control plane's state: configuration, the store and its in-memory
//! collections, and the node agent it drives (through [`NodeAgent`] only).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use thiserror::Error;

use crate::agent::NodeAgent;
use crate::auth;
use crate::collection::Collection;
use crate::model::{
    Disk, Flavor, IdempotentReply, Image, Membership, Operation, Project, Role, Token, User, Vm,
    new_id, now,
};
use crate::store::sqlite::SqliteStore;
use crate::store::{Log, Store, StoreError};

pub use crate::paths::Paths;

#[derive(Clone, Debug)]
pub struct Config {
    pub data_dir: PathBuf,
    /// The keel-vmm binary the agent runs.
    pub vmm_binary: PathBuf,
    /// vCPUs that may be allocated per host CPU.
    pub cpu_overcommit: f64,
    /// How long `stop` waits for the guest to power off after the ACPI
    /// power button before it forces the VM off.
    pub stop_timeout: Duration,
    /// How long a login session lasts.
    pub session_ttl: Duration,
    /// Serial output kept per VM file before `serial.log` is rotated to
    /// `serial.log.1` (so at most twice this on disk per VM).
    pub serial_log_max: u64,
    /// Failed logins that lock an account, and for how long.
    pub login_throttle: crate::auth::throttle::Policy,
    /// What new passwords must be like.
    pub password_policy: crate::auth::password::Policy,
    /// Passwords older than this must be changed before the next login.
    pub password_max_age: Option<Duration>,
    /// Directories system admins may import image and boot files from
    /// (`--import-dir`); none by default.
    pub import_dirs: Vec<PathBuf>,
    /// Address blocks URL imports may reach although they are loopback,
    /// link-local, ... or this node's own (`--url-import-allow`).
    pub url_import_allow: Vec<crate::images::Cidr>,
    /// How long a URL import's connection or read may make no progress.
    pub url_import_timeout: Duration,
    /// The web API: a request's whole header block must arrive within
    /// this (`--header-timeout`).
    pub header_timeout: Duration,
    /// The web API: a client that sends nothing for this long while keeld
    /// waits for it is disconnected (`--client-timeout`).
    pub client_timeout: Duration,
    /// The web API: open connections per source address
    /// (`--max-connections-per-source`).
    pub max_connections_per_source: usize,
}

impl Config {
    pub fn new(data_dir: PathBuf) -> Self {
        Config {
            data_dir,
            vmm_binary: default_vmm_binary(),
            cpu_overcommit: 4.0,
            stop_timeout: Duration::from_secs(60),
            session_ttl: Duration::from_secs(12 * 3600),
            serial_log_max: 8 << 20,
            login_throttle: Default::default(),
            password_policy: Default::default(),
            password_max_age: None,
            import_dirs: Vec::new(),
            url_import_allow: Vec::new(),
            url_import_timeout: Duration::from_secs(60),
            header_timeout: Duration::from_secs(10),
            client_timeout: Duration::from_secs(60),
            max_connections_per_source: 128,
        }
    }
}

/// keel-vmm beside keeld's own binary, else from PATH.
fn default_vmm_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("keel-vmm")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("keel-vmm"))
}

#[derive(Debug, Error)]
pub enum StartError {
    #[error("Cannot create the data directory {path}")]
    DataDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Auth(#[from] auth::AuthError),
    #[error(transparent)]
    ImportDir(#[from] crate::host_files::ImportDirError),
    #[error("Cannot write the initial admin password to {path}")]
    Password {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

pub struct Keel {
    pub config: Config,
    pub paths: Paths,
    pub store: Arc<dyn Store>,
    pub projects: Collection<Project>,
    pub users: Collection<User>,
    pub tokens: Collection<Token>,
    pub flavors: Collection<Flavor>,
    pub images: Collection<Image>,
    pub disks: Collection<Disk>,
    pub vms: Collection<Vm>,
    pub operations: Collection<Operation>,
    pub idempotency: Collection<IdempotentReply>,
    /// This node's agent (`keeld serve` runs it in-process).
    pub agent: Arc<dyn NodeAgent>,
    /// What the reconciler has in hand (starts and stops in flight,
    /// restarts due).
    pub reconciler: crate::control::reconciler::Reconciler,
    /// Where system admins may import host files from.
    pub import_roots: crate::host_files::ImportRoots,
    /// Argon2 runs here: bounded in number and memory.
    pub passwords: Arc<crate::auth::password::PasswordPool>,
    pub login_throttle: crate::auth::throttle::Throttle,
    /// Short-lived, single-use tickets that open a VM's console.
    pub console_tickets: crate::auth::tickets::Tickets,
    /// Serialized VM list pages, by query, with the generation of
    /// `vms` they were made from.
    pub vm_list_cache: Mutex<HashMap<String, (u64, axum::body::Bytes)>>,
    /// One lock per idempotency key while its first request runs.
    pub idempotency_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

fn keel_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// The flavors a new installation has.
const DEFAULT_FLAVORS: [(&str, u8, u64); 4] = [
    ("1c2g", 1, 2048),
    ("2c4g", 2, 4096),
    ("4c8g", 4, 8192),
    ("8c16g", 8, 16384),
];

pub const DEFAULT_PROJECT: &str = "default";

impl Keel {
    /// Opens the data dir and store; on first start creates the default
    /// project, flavors and the admin user, returning its password once.
    pub fn open(
        config: Config,
        agent: Arc<dyn NodeAgent>,
    ) -> Result<(Arc<Keel>, Option<String>), StartError> {
        let paths = Paths::new(&config.data_dir);
        for dir in [
            paths.root().to_path_buf(),
            paths.images(),
            paths.disks(),
            paths.vms(),
        ] {
            std::fs::create_dir_all(&dir).map_err(|source| StartError::DataDir {
                path: dir.display().to_string(),
                source,
            })?;
        }
        crate::files::restrict_tree(paths.root()).map_err(|source| StartError::DataDir {
            path: paths.root().display().to_string(),
            source,
        })?;
        let import_roots = crate::host_files::ImportRoots::new(&config.import_dirs, paths.root())?;
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&paths.database())?);
        let keel = Arc::new(Keel {
            projects: Collection::load(store.clone())?,
            users: Collection::load(store.clone())?,
            tokens: Collection::load(store.clone())?,
            flavors: Collection::load(store.clone())?,
            images: Collection::load(store.clone())?,
            disks: Collection::load(store.clone())?,
            vms: Collection::load(store.clone())?,
            operations: Collection::load(store.clone())?,
            idempotency: Collection::load(store.clone())?,
            agent,
            reconciler: Default::default(),
            import_roots,
            passwords: crate::auth::password::PasswordPool::new(
                keel_cpus(),
                Duration::from_secs(2),
            ),
            login_throttle: crate::auth::throttle::Throttle::new(config.login_throttle),
            console_tickets: Default::default(),
            idempotency_locks: Mutex::new(HashMap::new()),
            vm_list_cache: Mutex::new(HashMap::new()),
            store,
            paths,
            config,
        });
        keel.scrub_legacy_secrets()?;
        let password = keel.first_start()?;
        Ok((keel, password))
    }

    /// Secrets an older keeld stored are removed from every file of the
    /// store: root passwords in VM records (the seeds hold them) and token
    /// secrets in kept idempotent replies.
    fn scrub_legacy_secrets(&self) -> Result<(), StoreError> {
        let vms = self
            .vms
            .filter(|vm| vm.guest_init.legacy_root_password.is_some());
        for vm in &vms {
            self.vms.update::<StoreError>(&vm.id, |vm| {
                vm.guest_init.legacy_root_password = None;
                vm.guest_init.root_password_set = true;
                Ok(())
            })?;
        }
        let replies = self
            .idempotency
            .filter(|r| !r.secret && r.body.contains("\"token\""));
        for reply in &replies {
            self.idempotency.remove(&reply.id)?;
        }
        if !vms.is_empty() || !replies.is_empty() {
            log::warn!(
                "Removed {} root passwords and {} token secrets an older keeld had stored",
                vms.len(),
                replies.len()
            );
            self.store.compact()?;
        }
        Ok(())
    }

    fn first_start(&self) -> Result<Option<String>, StartError> {
        if self.projects.get(DEFAULT_PROJECT).is_none() {
            self.projects.insert(Project {
                id: DEFAULT_PROJECT.into(),
                name: DEFAULT_PROJECT.into(),
                description: "Created at installation".into(),
                quota: Default::default(),
                created_at: now(),
            })?;
        }
        if self.flavors.is_empty() {
            for (id, vcpus, memory_mib) in DEFAULT_FLAVORS {
                self.flavors.insert(Flavor {
                    id: id.into(),
                    vcpus,
                    memory_mib,
                })?;
            }
        }
        if !self.users.is_empty() {
            return Ok(None);
        }
        let password = auth::random_hex(12)?;
        self.users.insert(User {
            id: new_id("user"),
            name: "admin".into(),
            password_hash: auth::hash_password(&password)?,
            system_admin: true,
            memberships: vec![Membership {
                project: DEFAULT_PROJECT.into(),
                role: Role::Admin,
            }],
            created_at: now(),
            password_changed_at: now(),
            must_change_password: false,
        })?;
        let path = self.paths.admin_password();
        crate::files::write_atomic(&path, format!("{password}\n").as_bytes(), 0o600).map_err(
            |source| StartError::Password {
                path: path.display().to_string(),
                source,
            },
        )?;
        Ok(Some(password))
    }

    pub fn data_dir(&self) -> &Path {
        &self.config.data_dir
    }

    /// Records a VM event (from its VMM or from the agent) in the store's
    /// event log.
    pub fn event(&self, vm: &str, kind: &str, message: &str) {
        let body = serde_json::json!({
            "time": now(),
            "vm": vm,
            "event": kind,
            "message": message,
        });
        if let Err(e) = self.store.append(Log::Event, vm, &body) {
            log::warn!("Cannot record event {kind} of {vm}: {e}");
        }
    }
}
