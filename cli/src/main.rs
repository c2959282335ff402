//! `keel`: Keel's command line, one file per noun. `keel vmm --socket PATH
//! <command>` drives one keel-vmm (or Cloud Hypervisor) through its API
//! socket, with ch-remote's argument syntax (`vmm.rs`); `keel
//! login|passwd|vm|image|disk|flavors|node|console` drive keeld, over the
//! session `session.rs` opens, reading its answers as `keel_api::keeld`
//! types. Mutating commands wait for their operation (with a progress bar,
//! `output.rs`) unless `--no-wait`.

mod console;
mod disk;
mod flavor;
mod image;
mod node;
mod output;
mod session;
mod vm;
mod vmm;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "keel", version, about = "Keel's command line")]
struct Cli {
    #[command(subcommand)]
    command: Top,
}

#[derive(Subcommand)]
enum Top {
    /// Drive one keel-vmm through its API socket.
    Vmm {
        /// The VMM's API socket (keel-vmm --api-socket).
        #[arg(long, value_name = "PATH")]
        socket: PathBuf,
        /// Print the VMM's JSON answers as they are.
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        command: vmm::VmmCommand,
    },
    /// Log in to keeld and keep the session token (~/.config/keel).
    Login {
        /// User name.
        #[arg(long, default_value = "admin")]
        user: String,
        #[command(flatten)]
        common: session::Common,
    },
    /// Change a keeld password: yours (logged in), or with --user that of
    /// an account whose password expired or was reset.
    Passwd {
        /// The account (default: the one logged in, else admin).
        #[arg(long)]
        user: Option<String>,
        #[command(flatten)]
        common: session::Common,
    },
    /// VMs managed by keeld.
    Vm {
        #[command(flatten)]
        common: session::Common,
        #[command(subcommand)]
        command: vm::VmCommand,
    },
    /// Images.
    Image {
        #[command(flatten)]
        common: session::Common,
        #[command(subcommand)]
        command: image::ImageCommand,
    },
    /// Disks.
    Disk {
        #[command(flatten)]
        common: session::Common,
        #[command(subcommand)]
        command: disk::DiskCommand,
    },
    /// Flavors.
    Flavors {
        #[command(flatten)]
        common: session::Common,
    },
    /// The node: capacity, allocation, VM counts.
    Node {
        #[command(flatten)]
        common: session::Common,
    },
    /// A VM's serial console, interactive (Ctrl-] quits).
    Console {
        vm: String,
        #[command(flatten)]
        common: session::Common,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result: Result<(), Box<dyn std::error::Error>> = match cli.command {
        Top::Vmm {
            socket,
            json,
            command,
        } => vmm::run(&socket, json, command).map_err(Into::into),
        Top::Login { user, common } => session::login(&common, &user).map_err(Into::into),
        Top::Passwd { user, common } => {
            session::passwd(&common, user.as_deref()).map_err(Into::into)
        }
        Top::Vm { common, command } => vm::run(&common, command).map_err(Into::into),
        Top::Image { common, command } => image::run(&common, command).map_err(Into::into),
        Top::Disk { common, command } => disk::run(&common, command).map_err(Into::into),
        Top::Flavors { common } => flavor::list(&common).map_err(Into::into),
        Top::Node { common } => node::show_node(&common).map_err(Into::into),
        Top::Console { vm, common } => console::run(&common, &vm).map_err(Into::into),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keel: {}", keel_api::error_chain(&*e));
            ExitCode::FAILURE
        }
    }
}
