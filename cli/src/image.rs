//! `keel image ...`: import (a path on keeld's host, a URL, or an upload
//! with a progress bar), list, share, delete.

use std::io::IsTerminal;
use std::path::PathBuf;

use clap::{Args, Subcommand};
use keel_api::keeld::{
    CreateImage, Image, ImageBootFiles, ImageCreated, ImageFormat, ImageSource, ShareImage,
};
use keel_api::keeld_client::KeeldClient;
use serde::Deserialize;
use serde_json::Value;

use crate::output::{cell, print_table, progress_bar, show, wait};
use crate::session::{Common, Error, body, client, typed};

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

/// `--format`, in keeld's spelling.
fn format(value: &str) -> Result<ImageFormat, Error> {
    ImageFormat::deserialize(Value::from(value))
        .map_err(|_| Error::Input(format!("--format {value}: expected raw, qcow2 or iso")))
}

pub fn run(common: &Common, command: ImageCommand) -> Result<(), Error> {
    let c = client(common)?;
    let q = common.q();
    match command {
        ImageCommand::List => {
            let list = c.get(&format!("/api/v1/images{q}"))?;
            if common.json {
                println!("{list}");
            } else {
                let images: Vec<Image> = typed("list of images", &list)?;
                let rows: Vec<Vec<String>> = images
                    .iter()
                    .map(|i| {
                        vec![
                            cell(&i.name),
                            cell(&i.status),
                            cell(&i.size),
                            cell(&i.source_format),
                            cell(&i.os_type),
                            cell(&i.id),
                        ]
                    })
                    .collect();
                print_table(&["NAME", "STATUS", "SIZE", "FORMAT", "OS", "ID"], &rows);
            }
        }
        ImageCommand::Show { image } => {
            show(common, &c.get(&format!("/api/v1/images/{image}{q}"))?)
        }
        ImageCommand::Import(args) => import(common, &c, *args)?,
        ImageCommand::Delete { image } => {
            c.send("DELETE", &format!("/api/v1/images/{image}{q}"), None, &[])?
                .ok()?;
        }
        ImageCommand::Share { image, projects } => {
            let request = ShareImage { projects };
            show(
                common,
                &c.post(
                    &format!("/api/v1/images/{image}/share{q}"),
                    &body(&request)?,
                )?,
            );
        }
    }
    Ok(())
}

fn import(common: &Common, c: &KeeldClient, args: ImportArgs) -> Result<(), Error> {
    let ImportArgs {
        name,
        path,
        url,
        upload,
        format: image_format,
        sha256,
        os_type,
        os_version,
        kernel,
        initramfs,
        cmdline,
    } = args;
    let source = match (&path, &url, &upload) {
        (Some(p), None, None) => ImageSource {
            path: Some(std::fs::canonicalize(p).unwrap_or_else(|_| p.clone())),
            ..ImageSource::default()
        },
        (None, Some(u), None) => ImageSource {
            url: Some(u.clone()),
            ..ImageSource::default()
        },
        (None, None, Some(_)) => ImageSource {
            upload: true,
            ..ImageSource::default()
        },
        _ => return Err(Error::Input("give one of --path, --url or --upload".into())),
    };
    let boot = (kernel.is_some() || initramfs.is_some() || cmdline.is_some()).then(|| {
        let abs = |p: PathBuf| std::fs::canonicalize(&p).unwrap_or(p);
        ImageBootFiles {
            kernel_path: kernel.map(abs),
            initramfs_path: initramfs.map(abs),
            cmdline: cmdline.unwrap_or_default(),
        }
    });
    let request = CreateImage {
        name: name.clone(),
        project: common.project.clone(),
        format: image_format.as_deref().map(format).transpose()?,
        source,
        sha256,
        os_type: os_type.unwrap_or_default(),
        os_version: os_version.unwrap_or_default(),
        default_flavor: None,
        min_disk_gib: 0,
        boot,
    };
    let r = c.post("/api/v1/images", &body(&request)?)?;
    let created: ImageCreated = typed("image", &r)?;
    let id = &created.image.id;
    if let Some(file) = upload {
        let tty = std::io::stderr().is_terminal();
        let reply = c.upload(
            &format!("/api/v1/images/{id}/data"),
            &file,
            |sent, total| {
                if tty {
                    progress_bar("upload", sent * 100 / total.max(1));
                }
            },
        )?;
        if tty {
            eprintln!();
        }
        reply.ok()?;
    } else if let Some(op) = &created.operation {
        wait(common, c, op)?;
    }
    let now = c.get(&format!("/api/v1/images/{id}"))?;
    if common.json {
        println!("{now}");
    } else {
        let now: Image = typed("image", &now)?;
        println!(
            "{name} ({id}): {} {} bytes sha256 {}",
            cell(&now.status),
            now.size,
            now.sha256
        );
    }
    Ok(())
}
