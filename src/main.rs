//! The `oci-upstream` command: `serve` (the default) or `check-config FILE`.
//! Parses flags and config, starts logging (and span export), binds, and
//! hands over to [`oci_upstream::app::run`].

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use oci_upstream::config::{CONFIG_ENV, Config};

/// Exit status for a bad command line or configuration (EX_USAGE).
const EX_USAGE: u8 = 64;

/// gRPC gateway that fetches OCI manifests, blobs and tags from upstream
/// registries, verifying every byte.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Config file (TOML). Without one, Docker Hub is the only upstream.
    #[arg(long, global = true, env = CONFIG_ENV, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve gRPC (the default).
    Serve,
    /// Validate a config file and exit.
    CheckConfig {
        /// The file to check.
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let env = |key: &str| std::env::var(key).ok();
    match cli.command.unwrap_or(Command::Serve) {
        Command::CheckConfig { file } => {
            let checked = Config::load(Some(&file), env)
                .map_err(|e| e.to_string())
                .and_then(|config| {
                    oci_upstream::app::preflight(&config)
                        .map(|()| config)
                        .map_err(|e| oci_upstream::telemetry::describe(&e))
                });
            match checked {
                Ok(config) => {
                    println!(
                        "{}: OK ({} upstream{}); gRPC on {}; metrics on {}; mirror on {}; cache at {} ({}){}",
                        file.display(),
                        config.upstreams.len(),
                        if config.upstreams.len() == 1 { "" } else { "s" },
                        config.listen,
                        config
                            .metrics_listen
                            .map_or_else(|| "none".to_owned(), |a| a.to_string()),
                        config
                            .mirror_listen
                            .map_or_else(|| "none".to_owned(), |a| a.to_string()),
                        config.cache.dir.display(),
                        config.cache.dir.describe(),
                        config.cache.shared().map_or_else(String::new, |s3| format!(
                            ", shared with {}",
                            s3.describe()
                        )),
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{}: {e}", file.display());
                    ExitCode::from(EX_USAGE)
                }
            }
        }
        Command::Serve => {
            let config = match Config::load(cli.config.as_deref(), env) {
                Ok(config) => config,
                Err(e) => {
                    eprintln!("invalid configuration: {e}");
                    return ExitCode::from(EX_USAGE);
                }
            };
            if let Err(e) = oci_upstream::app::preflight(&config) {
                eprintln!(
                    "invalid configuration: {}",
                    oci_upstream::telemetry::describe(&e)
                );
                return ExitCode::from(EX_USAGE);
            }
            serve(config)
        }
    }
}

fn serve(config: Config) -> ExitCode {
    tune_allocator();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Span export connects to its collector on the runtime, so telemetry
    // starts inside it.
    let telemetry = {
        let _runtime = runtime.enter();
        oci_upstream::telemetry::init(config.log_format, config.otlp_endpoint.as_ref())
    };
    let telemetry = match telemetry {
        Ok(telemetry) => telemetry,
        Err(e) => {
            eprintln!(
                "invalid configuration: {}",
                oci_upstream::telemetry::describe(&e)
            );
            return ExitCode::from(EX_USAGE);
        }
    };
    let code = runtime.block_on(async {
        let listeners = match oci_upstream::app::Listeners::bind(&config).await {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %oci_upstream::telemetry::describe(&e), "cannot start");
                return ExitCode::FAILURE;
            }
        };
        match oci_upstream::app::run(config, listeners, oci_upstream::shutdown::signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %oci_upstream::telemetry::describe(&e), "server failed");
                ExitCode::FAILURE
            }
        }
    });
    // The spans of the last calls go out while the runtime, which carries
    // the collector connection, still runs.
    telemetry.shutdown();
    code
}

/// Keeps freed memory in glibc's heaps for reuse instead of returning it to
/// the kernel as soon as the top of a heap is free. A blob download allocates
/// a fresh receive buffer every few hundred KiB while earlier ones are still
/// being written and sent; with glibc's default (dynamic) trim threshold
/// those buffers land on pages the kernel has to fault in and zero again,
/// which cost about 8 % of a cold download's CPU. The heaps still shrink
/// once more than this much is free at their top.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_allocator() {
    const TRIM_THRESHOLD: libc::c_int = 8 << 20;
    const MMAP_THRESHOLD: libc::c_int = 1 << 20;
    // SAFETY: mallopt only sets allocator parameters; it is called before
    // the runtime starts, while this is the only thread.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_allocator() {}
