//! `keeld serve`: Keel's orchestrator with its node agent, in one process.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use keel_orchestrator::agent::{AgentConfig, LocalAgent};
use keel_orchestrator::control::{jobs, operations, reconciler};
use keel_orchestrator::images::Cidr;
use keel_orchestrator::model::ImageStatus;
use keel_orchestrator::{Config, Keel, web};

#[derive(Parser)]
#[command(name = "keeld", version, about = "Keel's orchestrator")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the control plane and the node agent.
    Serve {
        /// Where the store, images, disks and VM files live.
        #[arg(long, default_value = "/var/lib/keel")]
        data_dir: PathBuf,
        /// Address of the web API.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// The keel-vmm binary (default: beside keeld, else on PATH).
        #[arg(long)]
        vmm: Option<PathBuf>,
        /// vCPUs that may be allocated per host CPU.
        #[arg(long, default_value_t = 4.0)]
        cpu_overcommit: f64,
        /// Seconds `stop` waits for the guest after the power button.
        #[arg(long, default_value_t = 60)]
        stop_timeout: u64,
        /// MiB of serial output kept per VM file; past it `serial.log`
        /// moves to `serial.log.1` (so at most twice this per VM).
        #[arg(long, default_value_t = 8)]
        serial_log_max_mib: u64,
        /// A directory system admins may import image, kernel and initramfs
        /// files from by host path (repeatable; none by default: tenants
        /// import by upload or URL).
        #[arg(long = "import-dir", value_name = "DIR")]
        import_dirs: Vec<PathBuf>,
        /// Wrong passwords in a row that lock an account (a source address
        /// is locked after four times as many).
        #[arg(long, value_name = "N", default_value_t = 5)]
        login_lockout_failures: u32,
        /// Minutes a locked account or address waits (15 to 1440).
        #[arg(long, value_name = "MIN", default_value_t = 15)]
        login_lockout_minutes: u64,
        /// Shortest password users may set.
        #[arg(long, value_name = "N", default_value_t = 10)]
        password_min_length: usize,
        /// Days after which a password must be changed (0: never).
        #[arg(long, value_name = "DAYS", default_value_t = 0)]
        password_max_age_days: u64,
        /// An address block URL imports may reach although it is loopback,
        /// link-local, multicast or this node's own, e.g. 127.0.0.0/8 or
        /// fd00::/8 (repeatable; none by default).
        #[arg(long = "url-import-allow", value_name = "CIDR")]
        url_import_allow: Vec<Cidr>,
        /// Seconds a URL import's connection, response or read may make no
        /// progress before the import fails.
        #[arg(long, value_name = "SECS", default_value_t = 60)]
        url_import_timeout: u64,
        /// Seconds a request's whole header block may take to arrive.
        #[arg(long, value_name = "SECS", default_value_t = 10)]
        header_timeout: u64,
        /// Seconds a client may send nothing while keeld waits for it (a
        /// request body, the next request on a kept-alive connection, an
        /// answer to the console's pings) before it is disconnected.
        #[arg(long, value_name = "SECS", default_value_t = 60)]
        client_timeout: u64,
        /// Open connections allowed per source address; more are closed at
        /// once.
        #[arg(long, value_name = "N", default_value_t = 128)]
        max_connections_per_source: usize,
        /// Log more (-v info, -vv debug).
        #[arg(short, long, action = clap::ArgAction::Count)]
        verbose: u8,
    },
}

struct StderrLogger(log::LevelFilter);

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= self.0
    }
    fn log(&self, record: &log::Record) {
        if self.enabled(record.metadata()) && record.target().starts_with("keel") {
            eprintln!("keeld: {}: {}", record.level(), record.args());
        }
    }
    fn flush(&self) {}
}

fn main() -> ExitCode {
    let Cli {
        command:
            Command::Serve {
                data_dir,
                listen,
                vmm,
                cpu_overcommit,
                stop_timeout,
                serial_log_max_mib,
                import_dirs,
                login_lockout_failures,
                login_lockout_minutes,
                password_min_length,
                password_max_age_days,
                url_import_allow,
                url_import_timeout,
                header_timeout,
                client_timeout,
                max_connections_per_source,
                verbose,
            },
    } = Cli::parse();
    let level = match verbose {
        0 => log::LevelFilter::Warn,
        1 => log::LevelFilter::Info,
        _ => log::LevelFilter::Debug,
    };
    // Everything keeld creates (store, images, disks, seeds with root
    // passwords, logs, sockets) is its own: 0600 files, 0700 directories.
    // SAFETY: umask only changes this process's file creation mask.
    unsafe { libc::umask(0o077) };
    let logger = Box::leak(Box::new(StderrLogger(level)));
    let _ = log::set_logger(logger).map(|()| log::set_max_level(level));

    if !(cpu_overcommit > 0.0 && cpu_overcommit <= 64.0) {
        eprintln!("keeld: --cpu-overcommit must be above 0 and at most 64");
        return ExitCode::from(1);
    }
    let mut config = Config::new(data_dir);
    if let Some(vmm) = vmm {
        config.vmm_binary = vmm;
    }
    config.cpu_overcommit = cpu_overcommit;
    config.stop_timeout = Duration::from_secs(stop_timeout);
    if !(1..=4096).contains(&serial_log_max_mib) {
        eprintln!("keeld: --serial-log-max-mib must be 1 to 4096");
        return ExitCode::from(1);
    }
    config.serial_log_max = serial_log_max_mib << 20;
    config.import_dirs = import_dirs;
    if !(1..=100).contains(&login_lockout_failures) || !(15..=1440).contains(&login_lockout_minutes)
    {
        eprintln!(
            "keeld: --login-lockout-failures must be 1 to 100 and --login-lockout-minutes 15 to 1440"
        );
        return ExitCode::from(1);
    }
    config.login_throttle = keel_orchestrator::auth::throttle::Policy {
        lockout_failures: login_lockout_failures,
        lockout: Duration::from_secs(login_lockout_minutes * 60),
    };
    if !(8..=256).contains(&password_min_length) || password_max_age_days > 3650 {
        eprintln!(
            "keeld: --password-min-length must be 8 to 256, --password-max-age-days at most 3650"
        );
        return ExitCode::from(1);
    }
    config.password_policy.min_length = password_min_length;
    config.password_max_age =
        (password_max_age_days > 0).then(|| Duration::from_secs(password_max_age_days * 86400));
    if !(1..=3600).contains(&url_import_timeout) {
        eprintln!("keeld: --url-import-timeout must be 1 to 3600 seconds");
        return ExitCode::from(1);
    }
    config.url_import_allow = url_import_allow;
    config.url_import_timeout = Duration::from_secs(url_import_timeout);
    if !(1..=600).contains(&header_timeout) {
        eprintln!("keeld: --header-timeout must be 1 to 600 seconds");
        return ExitCode::from(1);
    }
    if !(3..=3600).contains(&client_timeout) {
        eprintln!("keeld: --client-timeout must be 3 to 3600 seconds");
        return ExitCode::from(1);
    }
    if !(1..=65536).contains(&max_connections_per_source) {
        eprintln!("keeld: --max-connections-per-source must be 1 to 65536");
        return ExitCode::from(1);
    }
    config.header_timeout = Duration::from_secs(header_timeout);
    config.client_timeout = Duration::from_secs(client_timeout);
    config.max_connections_per_source = max_connections_per_source;
    // Connections take file descriptors: allow all the hard limit does.
    let open_files = match web::server::raise_open_file_limit() {
        Ok((before, after)) => {
            log::info!("Open file limit: {after} (was {before})");
            after
        }
        Err(e) => {
            log::warn!("Cannot raise the open file limit: {e}");
            1024
        }
    };
    let max_connections = web::server::connection_limit(open_files);

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("keeld: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(async move {
        // The node agent first: it finds the VMMs that outlived the last
        // keeld (each holds its VM's lock) before the control plane looks.
        let agent = LocalAgent::new(AgentConfig {
            data_dir: config.data_dir.clone(),
            vmm_binary: config.vmm_binary.clone(),
            stop_timeout: config.stop_timeout,
            serial_log_max: config.serial_log_max,
        });
        agent.recover().await;
        let (keel, password) = match Keel::open(config, agent) {
            Ok(opened) => opened,
            Err(e) => {
                eprintln!("keeld: {}", keel_orchestrator::files::chain(&e));
                return ExitCode::from(1);
            }
        };
        if let Some(password) = password {
            println!(
                "keeld: created user admin with password {password} (also in {}; change it \
                 or make other users, then delete that file)",
                keel.paths.admin_password().display()
            );
        }
        let listener = match tokio::net::TcpListener::bind(listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("keeld: cannot listen on {listen}: {e}");
                return ExitCode::from(1);
            }
        };
        jobs::repair(&keel);
        operations::resume(&keel);
        reconciler::spawn(keel.clone());
        for image in keel.images.filter(|i| i.status == ImageStatus::Ready) {
            keel_orchestrator::control::images::ready(&keel, &image.id);
        }
        println!(
            "keeld: serving http://{listen}/api/v1 (data in {})",
            keel.data_dir().display()
        );
        let limits = web::server::Limits {
            header_timeout: keel.config.header_timeout,
            client_timeout: keel.config.client_timeout,
            per_source: keel.config.max_connections_per_source,
            total: max_connections,
        };
        let app = web::router(keel.clone());
        let shutdown = async {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(_) => return std::future::pending().await,
                };
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        };
        // VMs keep running when keeld stops: a restarted keeld re-attaches.
        web::server::serve(listener, app, limits, shutdown).await;
        ExitCode::SUCCESS
    })
}
