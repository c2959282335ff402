//! A small logger for `log`: one line per record, to stderr or a file,
//! `-v` raising the level as cloud-hypervisor's does.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

use log::{LevelFilter, Log, Metadata, Record};

struct Logger {
    start: Instant,
    out: Mutex<Option<File>>,
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let elapsed = self.start.elapsed();
        let thread = std::thread::current();
        let line = format!(
            "keel-vmm: {:>4}.{:06} {:<5} {}: {}\n",
            elapsed.as_secs(),
            elapsed.subsec_micros(),
            record.level(),
            thread.name().unwrap_or("-"),
            record.args()
        );
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        let _ = match out.as_mut() {
            Some(file) => file.write_all(line.as_bytes()),
            None => io::stderr().write_all(line.as_bytes()),
        };
    }

    fn flush(&self) {}
}

/// `verbosity` counts `-v`: none shows errors, then warnings, info, debug, trace.
pub fn init(verbosity: u8, file: Option<&Path>) -> io::Result<()> {
    let out = match file {
        Some(path) => Some(OpenOptions::new().create(true).append(true).open(path)?),
        None => None,
    };
    let level = match verbosity {
        0 => LevelFilter::Error,
        1 => LevelFilter::Warn,
        2 => LevelFilter::Info,
        3 => LevelFilter::Debug,
        _ => LevelFilter::Trace,
    };
    let logger = Box::new(Logger {
        start: Instant::now(),
        out: Mutex::new(out),
    });
    log::set_boxed_logger(logger).map_err(io::Error::other)?;
    log::set_max_level(level);
    Ok(())
}
