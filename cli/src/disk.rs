//! `keel disk ...`: disks with a life of their own.

use clap::Subcommand;
use keel_api::keeld::{Accepted, AttachDisk, CloneDisk, CreateDisk, Disk, ResizeDisk};
use serde_json::{Value, json};

use crate::output::{cell, print_table, show, wait};
use crate::session::{Common, Error, body, client, typed};

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

pub fn run(common: &Common, command: DiskCommand) -> Result<(), Error> {
    let c = client(common)?;
    let q = common.q();
    let post = |path: String, request: Value| -> Result<(), Error> {
        let r: Accepted<Disk> = typed("disk and operation", &c.post(&path, &request)?)?;
        wait(common, &c, &r.operation)
    };
    match command {
        DiskCommand::List => {
            let list = c.get(&format!("/api/v1/disks{q}"))?;
            if common.json {
                println!("{list}");
            } else {
                let disks: Vec<Disk> = typed("list of disks", &list)?;
                let rows: Vec<Vec<String>> = disks
                    .iter()
                    .map(|d| {
                        vec![
                            cell(&d.name),
                            cell(&d.status),
                            cell(&d.size),
                            cell(&d.vm),
                            cell(&d.id),
                        ]
                    })
                    .collect();
                print_table(&["NAME", "STATUS", "SIZE", "VM", "ID"], &rows);
            }
        }
        DiskCommand::Show { disk } => show(common, &c.get(&format!("/api/v1/disks/{disk}{q}"))?),
        DiskCommand::Create { name, size_gib } => {
            let request = CreateDisk {
                name,
                project: common.project.clone(),
                size_gib,
                readonly: false,
            };
            post("/api/v1/disks".into(), body(&request)?)?;
        }
        DiskCommand::Attach { disk, vm } => post(
            format!("/api/v1/disks/{disk}/attach{q}"),
            body(&AttachDisk { vm })?,
        )?,
        DiskCommand::Detach { disk } => post(format!("/api/v1/disks/{disk}/detach{q}"), json!({}))?,
        DiskCommand::Resize { disk, size_gib } => post(
            format!("/api/v1/disks/{disk}/resize{q}"),
            body(&ResizeDisk { size_gib })?,
        )?,
        DiskCommand::Clone { disk, name } => post(
            format!("/api/v1/disks/{disk}/clone{q}"),
            body(&CloneDisk { name })?,
        )?,
        DiskCommand::Delete { disk } => {
            c.send("DELETE", &format!("/api/v1/disks/{disk}{q}"), None, &[])?
                .ok()?;
        }
    }
    Ok(())
}
