//! `keel vm ...`: VMs managed by keeld.

use std::path::PathBuf;

use clap::Subcommand;
use keel_api::keeld::{
    Accepted, CreateVm, NewDataDisk, Page, ResizeVm, ResizedVm, RestartPolicy, UpdateVm, Vm,
    VmEvent,
};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::output::{cell, print_table, show, wait};
use crate::session::{Common, Error, body, client, typed};

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

/// `--restart-policy`, in keeld's spelling.
fn restart_policy(value: &str) -> Result<RestartPolicy, Error> {
    RestartPolicy::deserialize(Value::from(value)).map_err(|_| {
        Error::Input(format!(
            "--restart-policy {value}: expected always, on-failure or never"
        ))
    })
}

pub fn run(common: &Common, command: VmCommand) -> Result<(), Error> {
    let c = client(common)?;
    let q = common.q();
    let action = |vm: &str, what: &str| -> Result<(), Error> {
        let r = c.post(&format!("/api/v1/vms/{vm}/{what}{q}"), &json!({}))?;
        let r: Accepted<Vm> = typed("VM and operation", &r)?;
        wait(common, &c, &r.operation)?;
        if !common.no_wait {
            let now: Vm = typed("VM", &c.get(&format!("/api/v1/vms/{vm}{q}"))?)?;
            println!("{}: {}", now.name, cell(&now.status));
        }
        Ok(())
    };
    match command {
        VmCommand::List { deleted } => {
            let list = c.get(&format!(
                "/api/v1/vms{}",
                common.q_and(&format!("deleted={deleted}&limit=1000"))
            ))?;
            if common.json {
                println!("{list}");
            } else {
                let page: Page<Vm> = typed("page of VMs", &list)?;
                let rows: Vec<Vec<String>> = page
                    .items
                    .iter()
                    .map(|vm| {
                        vec![
                            cell(&vm.name),
                            cell(&vm.status),
                            cell(&vm.vcpus),
                            cell(&vm.memory_mib),
                            cell(&vm.image),
                            cell(&vm.id),
                        ]
                    })
                    .collect();
                print_table(
                    &["NAME", "STATUS", "VCPUS", "MEMORY_MIB", "IMAGE", "ID"],
                    &rows,
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
            restart_policy: policy,
            description,
            no_start,
        } => {
            let mut keys = Vec::new();
            for path in ssh_keys {
                let key = std::fs::read_to_string(&path)
                    .map_err(|e| Error::Input(format!("cannot read {}: {e}", path.display())))?;
                keys.push(key.trim().to_string());
            }
            let request = CreateVm {
                name: name.clone(),
                project: common.project.clone(),
                image,
                flavor,
                vcpus,
                memory_mib: memory,
                disk_gib,
                data_disks: data_disks
                    .into_iter()
                    .map(|size_gib| NewDataDisk {
                        name: None,
                        size_gib,
                    })
                    .collect(),
                description: description.unwrap_or_default(),
                restart_policy: policy
                    .as_deref()
                    .map(restart_policy)
                    .transpose()?
                    .unwrap_or_default(),
                hostname,
                root_password: password,
                ssh_authorized_keys: keys,
                start: Some(!no_start),
            };
            let r = c.post("/api/v1/vms", &body(&request)?)?;
            let r: Accepted<Vm> = typed("VM and operation", &r)?;
            wait(common, &c, &r.operation)?;
            let id = &r.resource.id;
            let now = c.get(&format!("/api/v1/vms/{id}"))?;
            if common.json {
                println!("{now}");
            } else {
                let now: Vm = typed("VM", &now)?;
                println!("{name} ({id}): {}", cell(&now.status));
            }
        }
        VmCommand::Show { vm } => show(common, &c.get(&format!("/api/v1/vms/{vm}{q}"))?),
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
            let request = ResizeVm {
                flavor,
                vcpus,
                memory_mib: memory,
            };
            let r = c.post(&format!("/api/v1/vms/{vm}/resize{q}"), &body(&request)?)?;
            let r: Accepted<ResizedVm> = typed("VM and operation", &r)?;
            wait(common, &c, &r.operation)?;
            println!("resize: {}", r.resource.resize);
        }
        VmCommand::Update {
            vm,
            name,
            description,
        } => {
            let request = UpdateVm {
                name,
                description,
                restart_policy: None,
            };
            let r = c
                .send(
                    "PATCH",
                    &format!("/api/v1/vms/{vm}{q}"),
                    Some(&body(&request)?),
                    &[],
                )?
                .ok()?;
            let r: Accepted<Vm> = typed("VM and operation", &r)?;
            wait(common, &c, &r.operation)?;
        }
        VmCommand::Delete { vm, purge } => {
            let r = c
                .send(
                    "DELETE",
                    &format!(
                        "/api/v1/vms/{vm}{}",
                        common.q_and(&format!("purge={purge}"))
                    ),
                    None,
                    &[],
                )?
                .ok()?;
            let r: Accepted<Vm> = typed("VM and operation", &r)?;
            wait(common, &c, &r.operation)?;
        }
        VmCommand::Events { vm } => {
            let events = c.get(&format!("/api/v1/vms/{vm}/events{q}"))?;
            if common.json {
                println!("{events}");
            } else {
                let events: Vec<VmEvent> = typed("list of events", &events)?;
                let rows: Vec<Vec<String>> = events
                    .iter()
                    .map(|e| vec![cell(&e.time), cell(&e.event), cell(&e.message)])
                    .collect();
                print_table(&["TIME", "EVENT", "MESSAGE"], &rows);
            }
        }
        VmCommand::Serial { vm } => {
            let r = c.send("GET", &format!("/api/v1/vms/{vm}/serial{q}"), None, &[])?;
            if r.status >= 300 {
                r.ok()?;
            } else {
                print!("{}", r.text);
            }
        }
    }
    Ok(())
}
