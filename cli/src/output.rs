//! What the keeld commands print: tables, JSON, and a progress bar on
//! stderr while an operation runs.

use std::io::IsTerminal;
use std::time::Duration;

use keel_api::keeld::Operation;
use keel_api::keeld_client::KeeldClient;
use serde::Serialize;
use serde_json::Value;

use crate::session::{Common, Error};

/// A table cell: a string as it is, a missing value as `-`, anything else
/// as its JSON (numbers; enums print as their wire names).
pub fn cell<T: Serialize + ?Sized>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(Value::String(s)) => s,
        Ok(Value::Null) | Err(_) => "-".into(),
        Ok(v) => v.to_string(),
    }
}

/// Prints rows under their headers, each column as wide as its widest
/// cell.
pub fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    let widths: Vec<usize> = headers
        .iter()
        .enumerate()
        .map(|(i, h)| {
            rows.iter()
                .map(|r| r[i].len())
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
    println!("{}", line(headers.to_vec()));
    for r in rows {
        println!("{}", line(r.iter().map(String::as_str).collect()));
    }
}

/// Prints an answer as keeld sent it: one line with `--json`, else
/// indented.
pub fn show(common: &Common, value: &Value) {
    if common.json {
        println!("{value}");
    } else {
        println!(
            "{}",
            serde_json::to_string_pretty(value).unwrap_or_default()
        );
    }
}

/// Draws `label [####      ]  40%` over the previous one.
pub fn progress_bar(label: &str, percent: u64) {
    let filled = (percent.min(100) as usize * 30) / 100;
    eprint!(
        "\r{label:<14} [{}{}] {percent:>3}%",
        "#".repeat(filled),
        " ".repeat(30 - filled)
    );
}

/// Waits for an operation to end, with a progress bar on a terminal;
/// with `--no-wait` only says it started.
pub fn wait(common: &Common, client: &KeeldClient, op: &Operation) -> Result<(), Error> {
    if common.no_wait {
        println!("operation {} started", op.id);
        return Ok(());
    }
    let tty = std::io::stderr().is_terminal();
    let result = client.wait_operation(&op.id, Duration::from_secs(3600), |p| {
        if tty {
            progress_bar(&op.action, p);
        }
    });
    if tty {
        eprintln!();
    }
    result?;
    Ok(())
}
