//! `keel login|passwd|vm|image|disk|flavor|node|console`: the orchestrator's
//! commands, over [`KeeldClient`]. Mutating commands wait for their
//! operation (with a progress bar) unless `--no-wait`.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Subcommand};
use keel_api::keeld_client::{KeeldClient, KeeldError};
use serde_json::{Value, json};

#[derive(Args)]
pub struct Common {
    /// keeld's address (default: from `keel login`, KEEL_SERVER, or
    /// http://127.0.0.1:8080).
    #[arg(long, global = true)]
    server: Option<String>,
    /// Project to work in (default: `default`).
    #[arg(long, global = true)]
    project: Option<String>,
    /// Print keeld's JSON answers as they are.
    #[arg(long, global = true)]
    json: bool,
    /// Return once keeld accepted the request; do not wait for it to end.
    #[arg(long, global = true)]
    no_wait: bool,
}

#[derive(Subcommand)]
pub enum VmCommand {
    /// List VMs (--deleted: the recycle bin).
    List {
        #[arg(long)]
        deleted: bool,
    },
    /// Create a VM from an image and start it.
    Create {
        name: String,
        #[arg(long)]
        image: String,
        #[arg(long)]
        flavor: Option<String>,
        #[arg(long)]
        vcpus: Option<u8>,
        /// Memory in MiB.
        #[arg(long)]
        memory: Option<u64>,
        /// System disk size in GiB.
        #[arg(long)]
        disk_gib: Option<u64>,
        /// Extra blank data disks, in GiB (repeatable).
        #[arg(long = "data-disk-gib")]
        data_disks: Vec<u64>,
        /// Root password set in the guest at first boot (cloud-init).
        #[arg(long)]
        password: Option<String>,
        /// An SSH public key file for root (repeatable).
        #[arg(long = "ssh-key")]
        ssh_keys: Vec<PathBuf>,
        #[arg(long)]
        hostname: Option<String>,
        /// always, on-failure (default) or never.
        #[arg(long)]
        restart_policy: Option<String>,
        #[arg(long)]
        description: Option<String>,
        /// Create it stopped.
        #[arg(long)]
        no_start: bool,
    },
    Show {
        vm: String,
    },
    Start {
        vm: String,
    },
    /// The ACPI power button, then force off after keeld's stop timeout.
    Stop {
        vm: String,
    },
    ForceOff {
        vm: String,
    },
    Reboot {
        vm: String,
    },
    Pause {
        vm: String,
    },
    Resume {
        vm: String,
    },
    /// Change vCPUs and memory (live where the VMM can, else at next boot).
    Resize {
        vm: String,
        #[arg(long)]
        flavor: Option<String>,
        #[arg(long)]
        vcpus: Option<u8>,
        #[arg(long)]
        memory: Option<u64>,
    },
    /// Rename or describe.
    Update {
        vm: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        description: Option<String>,
    },
    /// Move to the recycle bin (--purge: delete for good).
    Delete {
        vm: String,
        #[arg(long)]
        purge: bool,
    },
    Restore {
        vm: String,
    },
    /// Lifecycle events.
    Events {
        vm: String,
    },
    /// The end of the serial console's output.
    Serial {
        vm: String,
    },
}

#[derive(Subcommand)]
pub enum ImageCommand {
    List,
    Show {
        image: String,
    },
    /// Import from a path on the keeld host, an http URL, or upload a file.
    Import(Box<ImportArgs>),
    Delete {
        image: String,
    },
    /// Share with other projects (replaces the list).
    Share {
        image: String,
        projects: Vec<String>,
    },
}

#[derive(Args)]
pub struct ImportArgs {
    name: String,
    #[arg(long, conflicts_with_all = ["url", "upload"])]
    path: Option<PathBuf>,
    #[arg(long, conflicts_with = "upload")]
    url: Option<String>,
    /// A local file to upload.
    #[arg(long)]
    upload: Option<PathBuf>,
    /// raw (default), qcow2 or iso.
    #[arg(long)]
    format: Option<String>,
    #[arg(long)]
    sha256: Option<String>,
    #[arg(long)]
    os_type: Option<String>,
    #[arg(long)]
    os_version: Option<String>,
    /// Kernel to boot VMs of this image with (a path on the keeld host).
    #[arg(long)]
    kernel: Option<PathBuf>,
    #[arg(long)]
    initramfs: Option<PathBuf>,
    #[arg(long)]
    cmdline: Option<String>,
}

#[derive(Subcommand)]
pub enum DiskCommand {
    List,
    Show {
        disk: String,
    },
    Create {
        name: String,
        #[arg(long)]
        size_gib: u64,
    },
    Attach {
        disk: String,
        vm: String,
    },
    Detach {
        disk: String,
    },
    Resize {
        disk: String,
        #[arg(long)]
        size_gib: u64,
    },
    Clone {
        disk: String,
        name: String,
    },
    Delete {
        disk: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Keeld(#[from] KeeldError),
    #[error("{0}")]
    Input(String),
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
    client.login(user, &password)?;
    let creds = Credentials {
        server: client.server(),
        token: client.token().unwrap_or_default().to_string(),
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
    let mut body = json!({"current_password": current, "new_password": new});
    // Without a saved login keeld cannot tell whose password it is.
    match (user, c.token()) {
        (Some(u), _) => body["username"] = u.into(),
        (None, None) => body["username"] = "admin".into(),
        (None, Some(_)) => {}
    }
    c.send("POST", "/api/v1/password", Some(&body), &[])?.ok()?;
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

fn q(common: &Common) -> String {
    common
        .project
        .as_ref()
        .map(|p| format!("?project={p}"))
        .unwrap_or_default()
}

fn q_and(common: &Common, more: &str) -> String {
    match &common.project {
        Some(p) => format!("?project={p}&{more}"),
        None => format!("?{more}"),
    }
}

/// Prints a progress bar on stderr while an operation runs.
fn wait(common: &Common, client: &KeeldClient, reply: &Value) -> Result<(), Error> {
    let Some(id) = reply["operation"]["id"].as_str() else {
        return Ok(());
    };
    if common.no_wait {
        println!("operation {id} started");
        return Ok(());
    }
    let action = reply["operation"]["action"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let tty = std::io::stderr().is_terminal();
    let result = client.wait_operation(id, Duration::from_secs(3600), |p| {
        if tty {
            let filled = (p as usize * 30) / 100;
            eprint!(
                "\r{action:<14} [{}{}] {p:>3}%",
                "#".repeat(filled),
                " ".repeat(30 - filled)
            );
        }
    });
    if tty {
        eprintln!();
    }
    result?;
    Ok(())
}

fn print_table(rows: &[Value], columns: &[(&str, &str)]) {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            columns
                .iter()
                .map(|(_, key)| match &r[*key] {
                    Value::String(s) => s.clone(),
                    Value::Null => "-".into(),
                    v => v.to_string(),
                })
                .collect()
        })
        .collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, (h, _))| {
            cells
                .iter()
                .map(|c| c[i].len())
                .chain([h.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |items: Vec<&str>| {
        items
            .iter()
            .zip(&widths)
            .map(|(s, w)| format!("{s:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    println!("{}", line(columns.iter().map(|(h, _)| *h).collect()));
    for c in &cells {
        println!("{}", line(c.iter().map(String::as_str).collect()));
    }
}

fn show(common: &Common, value: &Value) {
    if common.json {
        println!("{value}");
    } else {
        println!(
            "{}",
            serde_json::to_string_pretty(value).unwrap_or_default()
        );
    }
}

pub fn vm(common: &Common, command: VmCommand) -> Result<(), Error> {
    let c = client(common)?;
    let action = |vm: &str, what: &str| -> Result<(), Error> {
        let r = c.post(&format!("/api/v1/vms/{vm}/{what}{}", q(common)), &json!({}))?;
        wait(common, &c, &r)?;
        if !common.no_wait {
            let now = c.get(&format!("/api/v1/vms/{vm}{}", q(common)))?;
            println!(
                "{}: {}",
                now["name"].as_str().unwrap_or(vm),
                now["status"].as_str().unwrap_or("?")
            );
        }
        Ok(())
    };
    match command {
        VmCommand::List { deleted } => {
            let list = c.get(&format!(
                "/api/v1/vms{}",
                q_and(common, &format!("deleted={deleted}&limit=1000"))
            ))?;
            if common.json {
                println!("{list}");
            } else {
                let items = list["items"].as_array().cloned().unwrap_or_default();
                print_table(
                    &items,
                    &[
                        ("NAME", "name"),
                        ("STATUS", "status"),
                        ("VCPUS", "vcpus"),
                        ("MEMORY_MIB", "memory_mib"),
                        ("IMAGE", "image"),
                        ("ID", "id"),
                    ],
                );
            }
        }
        VmCommand::Create {
            name,
            image,
            flavor,
            vcpus,
            memory,
            disk_gib,
            data_disks,
            password,
            ssh_keys,
            hostname,
            restart_policy,
            description,
            no_start,
        } => {
            let mut keys = Vec::new();
            for path in ssh_keys {
                let key = std::fs::read_to_string(&path)
                    .map_err(|e| Error::Input(format!("cannot read {}: {e}", path.display())))?;
                keys.push(key.trim().to_string());
            }
            let mut body = json!({"name": name, "image": image, "start": !no_start,
                "data_disks": data_disks.iter().map(|g| json!({"size_gib": g})).collect::<Vec<_>>(),
                "ssh_authorized_keys": keys});
            for (k, v) in [
                ("flavor", flavor.map(Value::from)),
                ("vcpus", vcpus.map(Value::from)),
                ("memory_mib", memory.map(Value::from)),
                ("disk_gib", disk_gib.map(Value::from)),
                ("root_password", password.map(Value::from)),
                ("hostname", hostname.map(Value::from)),
                ("restart_policy", restart_policy.map(Value::from)),
                ("description", description.map(Value::from)),
                ("project", common.project.clone().map(Value::from)),
            ] {
                if let Some(v) = v {
                    body[k] = v;
                }
            }
            let r = c.post("/api/v1/vms", &body)?;
            wait(common, &c, &r)?;
            let id = r["vm"]["id"].as_str().unwrap_or_default();
            if common.json {
                println!("{}", c.get(&format!("/api/v1/vms/{id}"))?);
            } else {
                let now = c.get(&format!("/api/v1/vms/{id}"))?;
                println!("{} ({id}): {}", name, now["status"].as_str().unwrap_or("?"));
            }
        }
        VmCommand::Show { vm } => show(common, &c.get(&format!("/api/v1/vms/{vm}{}", q(common)))?),
        VmCommand::Start { vm } => action(&vm, "start")?,
        VmCommand::Stop { vm } => action(&vm, "stop")?,
        VmCommand::ForceOff { vm } => action(&vm, "force-off")?,
        VmCommand::Reboot { vm } => action(&vm, "reboot")?,
        VmCommand::Pause { vm } => action(&vm, "pause")?,
        VmCommand::Resume { vm } => action(&vm, "resume")?,
        VmCommand::Restore { vm } => action(&vm, "restore")?,
        VmCommand::Resize {
            vm,
            flavor,
            vcpus,
            memory,
        } => {
            let mut body = json!({});
            if let Some(f) = flavor {
                body["flavor"] = f.into();
            }
            if let Some(v) = vcpus {
                body["vcpus"] = v.into();
            }
            if let Some(m) = memory {
                body["memory_mib"] = m.into();
            }
            let r = c.post(&format!("/api/v1/vms/{vm}/resize{}", q(common)), &body)?;
            wait(common, &c, &r)?;
            println!("resize: {}", r["vm"]["resize"].as_str().unwrap_or("?"));
        }
        VmCommand::Update {
            vm,
            name,
            description,
        } => {
            let mut body = json!({});
            if let Some(n) = name {
                body["name"] = n.into();
            }
            if let Some(d) = description {
                body["description"] = d.into();
            }
            let r = c
                .send(
                    "PATCH",
                    &format!("/api/v1/vms/{vm}{}", q(common)),
                    Some(&body),
                    &[],
                )?
                .ok()?;
            wait(common, &c, &r)?;
        }
        VmCommand::Delete { vm, purge } => {
            let r = c
                .send(
                    "DELETE",
                    &format!(
                        "/api/v1/vms/{vm}{}",
                        q_and(common, &format!("purge={purge}"))
                    ),
                    None,
                    &[],
                )?
                .ok()?;
            wait(common, &c, &r)?;
        }
        VmCommand::Events { vm } => {
            let events = c.get(&format!("/api/v1/vms/{vm}/events{}", q(common)))?;
            if common.json {
                println!("{events}");
            } else {
                print_table(
                    events.as_array().map(Vec::as_slice).unwrap_or_default(),
                    &[("TIME", "time"), ("EVENT", "event"), ("MESSAGE", "message")],
                );
            }
        }
        VmCommand::Serial { vm } => {
            let r = c.send(
                "GET",
                &format!("/api/v1/vms/{vm}/serial{}", q(common)),
                None,
                &[],
            )?;
            if r.status >= 300 {
                r.ok()?;
            } else {
                print!("{}", r.text);
            }
        }
    }
    Ok(())
}

pub fn image(common: &Common, command: ImageCommand) -> Result<(), Error> {
    let c = client(common)?;
    match command {
        ImageCommand::List => {
            let list = c.get(&format!("/api/v1/images{}", q(common)))?;
            if common.json {
                println!("{list}");
            } else {
                print_table(
                    list.as_array().map(Vec::as_slice).unwrap_or_default(),
                    &[
                        ("NAME", "name"),
                        ("STATUS", "status"),
                        ("SIZE", "size"),
                        ("FORMAT", "source_format"),
                        ("OS", "os_type"),
                        ("ID", "id"),
                    ],
                );
            }
        }
        ImageCommand::Show { image } => show(
            common,
            &c.get(&format!("/api/v1/images/{image}{}", q(common)))?,
        ),
        ImageCommand::Import(args) => {
            let ImportArgs {
                name,
                path,
                url,
                upload,
                format,
                sha256,
                os_type,
                os_version,
                kernel,
                initramfs,
                cmdline,
            } = *args;
            let source = match (&path, &url, &upload) {
                (Some(p), None, None) => {
                    json!({"path": std::fs::canonicalize(p).unwrap_or_else(|_| p.clone())})
                }
                (None, Some(u), None) => json!({"url": u}),
                (None, None, Some(_)) => json!({"upload": true}),
                _ => return Err(Error::Input("give one of --path, --url or --upload".into())),
            };
            let mut body = json!({"name": name, "source": source});
            for (k, v) in [
                ("format", format),
                ("sha256", sha256),
                ("os_type", os_type),
                ("os_version", os_version),
                ("project", common.project.clone()),
            ] {
                if let Some(v) = v {
                    body[k] = v.into();
                }
            }
            if kernel.is_some() || initramfs.is_some() || cmdline.is_some() {
                let abs = |p: PathBuf| std::fs::canonicalize(&p).unwrap_or(p);
                body["boot"] = json!({"kernel_path": kernel.map(abs), "initramfs_path": initramfs.map(abs), "cmdline": cmdline.unwrap_or_default()});
            }
            let r = c.post("/api/v1/images", &body)?;
            if let Some(file) = upload {
                let id = r["image"]["id"].as_str().unwrap_or_default().to_string();
                let tty = std::io::stderr().is_terminal();
                let reply = c.upload(
                    &format!("/api/v1/images/{id}/data"),
                    &file,
                    |sent, total| {
                        if tty {
                            let p = sent * 100 / total.max(1);
                            let filled = (p as usize * 30) / 100;
                            eprint!(
                                "\rupload         [{}{}] {p:>3}%",
                                "#".repeat(filled),
                                " ".repeat(30 - filled)
                            );
                        }
                    },
                )?;
                if tty {
                    eprintln!();
                }
                reply.ok()?;
            } else {
                wait(common, &c, &r)?;
            }
            let id = r["image"]["id"].as_str().unwrap_or_default();
            let now = c.get(&format!("/api/v1/images/{id}"))?;
            if common.json {
                println!("{now}");
            } else {
                println!(
                    "{name} ({id}): {} {} bytes sha256 {}",
                    now["status"].as_str().unwrap_or("?"),
                    now["size"],
                    now["sha256"].as_str().unwrap_or("")
                );
            }
        }
        ImageCommand::Delete { image } => {
            c.send(
                "DELETE",
                &format!("/api/v1/images/{image}{}", q(common)),
                None,
                &[],
            )?
            .ok()?;
        }
        ImageCommand::Share { image, projects } => {
            show(
                common,
                &c.post(
                    &format!("/api/v1/images/{image}/share{}", q(common)),
                    &json!({"projects": projects}),
                )?,
            );
        }
    }
    Ok(())
}

pub fn disk(common: &Common, command: DiskCommand) -> Result<(), Error> {
    let c = client(common)?;
    let post = |path: String, body: Value| -> Result<(), Error> {
        let r = c.post(&path, &body)?;
        wait(common, &c, &r)
    };
    match command {
        DiskCommand::List => {
            let list = c.get(&format!("/api/v1/disks{}", q(common)))?;
            if common.json {
                println!("{list}");
            } else {
                print_table(
                    list.as_array().map(Vec::as_slice).unwrap_or_default(),
                    &[
                        ("NAME", "name"),
                        ("STATUS", "status"),
                        ("SIZE", "size"),
                        ("VM", "vm"),
                        ("ID", "id"),
                    ],
                );
            }
        }
        DiskCommand::Show { disk } => show(
            common,
            &c.get(&format!("/api/v1/disks/{disk}{}", q(common)))?,
        ),
        DiskCommand::Create { name, size_gib } => {
            let mut body = json!({"name": name, "size_gib": size_gib});
            if let Some(p) = &common.project {
                body["project"] = p.clone().into();
            }
            post("/api/v1/disks".into(), body)?;
        }
        DiskCommand::Attach { disk, vm } => post(
            format!("/api/v1/disks/{disk}/attach{}", q(common)),
            json!({"vm": vm}),
        )?,
        DiskCommand::Detach { disk } => post(
            format!("/api/v1/disks/{disk}/detach{}", q(common)),
            json!({}),
        )?,
        DiskCommand::Resize { disk, size_gib } => post(
            format!("/api/v1/disks/{disk}/resize{}", q(common)),
            json!({"size_gib": size_gib}),
        )?,
        DiskCommand::Clone { disk, name } => post(
            format!("/api/v1/disks/{disk}/clone{}", q(common)),
            json!({"name": name}),
        )?,
        DiskCommand::Delete { disk } => {
            c.send(
                "DELETE",
                &format!("/api/v1/disks/{disk}{}", q(common)),
                None,
                &[],
            )?
            .ok()?;
        }
    }
    Ok(())
}

pub fn flavors(common: &Common) -> Result<(), Error> {
    let list = client(common)?.get("/api/v1/flavors")?;
    if common.json {
        println!("{list}");
    } else {
        print_table(
            list.as_array().map(Vec::as_slice).unwrap_or_default(),
            &[
                ("NAME", "id"),
                ("VCPUS", "vcpus"),
                ("MEMORY_MIB", "memory_mib"),
            ],
        );
    }
    Ok(())
}

pub fn node(common: &Common) -> Result<(), Error> {
    show(common, &client(common)?.get("/api/v1/node")?);
    Ok(())
}

/// An interactive serial console: keys go to the guest, its output to
/// this terminal; `Ctrl-]` ends the session.
pub fn console(common: &Common, vm: &str) -> Result<(), Error> {
    let c = client(common)?;
    let info = c.get(&format!("/api/v1/vms/{vm}{}", q(common)))?;
    let id = info["id"].as_str().unwrap_or(vm).to_string();
    let url = format!(
        "{}/api/v1/vms/{id}/console",
        c.server().replacen("http://", "ws://", 1),
    );
    // The token goes in the header, never in the URL.
    let mut request = tungstenite::client::IntoClientRequest::into_client_request(url)
        .map_err(|e| Error::Input(format!("cannot open the console: {e}")))?;
    if let Some(token) = c.token()
        && let Ok(value) = format!("Bearer {token}").parse()
    {
        request.headers_mut().insert("authorization", value);
    }
    let (ws, _) = tungstenite::connect(request)
        .map_err(|e| Error::Input(format!("cannot open the console: {e}")))?;
    let ws = std::sync::Arc::new(std::sync::Mutex::new(ws));
    eprintln!("Connected to {vm}'s serial console; Ctrl-] quits.");
    let raw = std::io::stdin().is_terminal();
    if raw {
        let _ = std::process::Command::new("stty")
            .args(["raw", "-echo"])
            .status();
    }
    // Keys: a thread reading stdin.
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        let mut buf = [0u8; 256];
        loop {
            match std::io::Read::read(&mut std::io::stdin(), &mut buf) {
                Ok(0) | Err(_) => {
                    let _ = tx.send(vec![0x1d]);
                    return;
                }
                Ok(n) => {
                    if tx.send(buf[..n].to_vec()).is_err() {
                        return;
                    }
                }
            }
        }
    });
    if let Ok(mut guard) = ws.lock()
        && let tungstenite::stream::MaybeTlsStream::Plain(s) = guard.get_mut()
    {
        let _ = s.set_read_timeout(Some(Duration::from_millis(20)));
    }
    let mut out = std::io::stdout();
    let result = 'session: loop {
        let Ok(mut socket) = ws.lock() else {
            break Ok(());
        };
        while let Ok(keys) = rx.try_recv() {
            if keys.contains(&0x1d) {
                let _ = socket.close(None);
                drop(socket);
                if raw {
                    let _ = std::process::Command::new("stty").arg("sane").status();
                }
                eprintln!();
                return Ok(());
            }
            if let Err(e) = socket.send(tungstenite::Message::Binary(keys.into())) {
                break 'session Err(Error::Input(format!("the console connection ended: {e}")));
            }
        }
        match socket.read() {
            Ok(tungstenite::Message::Binary(b)) => {
                let _ = out.write_all(&b);
                let _ = out.flush();
            }
            Ok(tungstenite::Message::Close(_)) => break Ok(()),
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => break Err(Error::Input(format!("the console connection ended: {e}"))),
        }
    };
    if raw {
        let _ = std::process::Command::new("stty").arg("sane").status();
    }
    result
}
