//! Builds Keel's freestanding test guest (tests/guest/freestanding) with its
//! Makefile into OUT_DIR and hands its path to the crate as
//! `KEEL_FREESTANDING_GUEST`.

use std::env;
use std::path::PathBuf;
use std::process::{Command, exit};

/// The programs the Makefile runs.
const TOOLS: [&str; 4] = ["make", "gcc", "ld", "objcopy"];

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets this"));
    let src = manifest_dir.join("guest").join("freestanding");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets this")).join("freestanding");
    println!("cargo:rerun-if-changed={}", src.display());

    for tool in TOOLS {
        if Command::new(tool).arg("--version").output().is_err() {
            fail(&format!(
                "`{tool}` was not found. Keel's freestanding test guest is built with make, \
                 gcc (with -m32 support), ld and objcopy from binutils; on Debian: \
                 apt-get install make gcc binutils"
            ));
        }
    }

    // The tools are named here rather than taken from CC/LD in the
    // environment, which may name a compiler for some other target.
    let output = Command::new("make")
        .arg("-C")
        .arg(&src)
        .arg(format!("O={}", out.display()))
        .args(["CC=gcc", "LD=ld", "OBJCOPY=objcopy"])
        .output();
    let output = match output {
        Ok(output) => output,
        Err(e) => fail(&format!("Cannot run make: {e}")),
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        fail(&format!(
            "Building the freestanding test guest failed ({}):\n{stdout}{stderr}",
            output.status
        ));
    }
    // The guest is meant to build without warnings; surface any.
    for line in stderr.lines().filter(|l| l.contains("warning")) {
        println!("cargo:warning=freestanding guest: {line}");
    }

    let elf = out.join("keel-test-guest.elf");
    println!("cargo:rustc-env=KEEL_FREESTANDING_GUEST={}", elf.display());
}

fn fail(message: &str) -> ! {
    eprintln!("error: {message}");
    exit(1);
}
