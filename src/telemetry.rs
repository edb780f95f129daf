//! Logging: `tracing` to stderr, as text or JSON, filtered by `RUST_LOG`
//! (default `info`), and errors written with their source chain. With an
//! `otlp_endpoint`, this crate's spans at info and above are also exported
//! over OTLP/gRPC (`otlp`), whatever `RUST_LOG` says.

mod otlp;

use std::io::IsTerminal;

use tracing::Level;
use tracing_subscriber::filter::{EnvFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, fmt};
use url::Url;

use crate::config::LogFormat;

pub use otlp::ExportError;

/// What [`init`] started that must be stopped at exit: span export, whose
/// queued spans are flushed by [`Telemetry::shutdown`] (or on drop).
#[derive(Debug)]
#[must_use = "dropping it stops span export"]
pub struct Telemetry {
    export: Option<otlp::Export>,
}

impl Telemetry {
    /// Sends the spans still queued to the collector (waiting about a
    /// second at most) and stops export. Call it once serving has ended,
    /// while the runtime that [`init`] ran in still runs.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(export) = self.export.take() {
            export.stop();
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Installs the global subscriber: log lines in `format`, and span export
/// to `otlp_endpoint` when there is one. Call it once per process, inside
/// the tokio runtime that will serve (the collector connection runs on it),
/// and keep the returned [`Telemetry`] until serving has ended.
pub fn init(format: LogFormat, otlp_endpoint: Option<&Url>) -> Result<Telemetry, ExportError> {
    let export = otlp_endpoint.map(otlp::Export::start).transpose()?;
    let filter = log_filter(std::env::var(EnvFilter::DEFAULT_ENV).ok().as_deref());
    let stderr = fmt::layer().with_writer(std::io::stderr);
    let logs = match format {
        LogFormat::Text => stderr.with_ansi(std::io::stderr().is_terminal()).boxed(),
        LogFormat::Json => stderr.json().boxed(),
    };
    // Only this crate's spans (the RPC's and its children) are exported,
    // not those of the HTTP/2 and HTTP client crates. Each span costs on
    // every call, so it carries its fields and nothing more: no busy/idle
    // times (a clock read at every poll), no thread, source location or
    // target attributes.
    let spans = export.as_ref().map(|export| {
        tracing_opentelemetry::layer()
            .with_tracked_inactivity(false)
            .with_threads(false)
            .with_location(false)
            .with_target(false)
            .with_tracer(export.tracer())
            .with_filter(Targets::new().with_target(env!("CARGO_CRATE_NAME"), Level::INFO))
    });
    let installed = tracing_subscriber::registry()
        .with(logs.with_filter(filter))
        .with(spans)
        .try_init();
    if let Err(e) = installed {
        eprintln!("logging already initialised: {e}");
    }
    if let Some(endpoint) = otlp_endpoint {
        tracing::info!(%endpoint, "exporting spans over OTLP/gRPC");
    }
    Ok(Telemetry { export })
}

/// The OTLP exporter warns on every failed export; [`otlp`] reports
/// failures itself, at most once a minute. A `RUST_LOG` directive naming
/// the target still wins.
const QUIET_EXPORTER: &str = "opentelemetry-otlp=error";

/// The filter of log lines: `RUST_LOG` (`info` when unset, empty or
/// malformed) after [`QUIET_EXPORTER`].
fn log_filter(rust_log: Option<&str>) -> EnvFilter {
    let directives = rust_log.filter(|d| !d.trim().is_empty()).unwrap_or("info");
    EnvFilter::try_new(format!("{QUIET_EXPORTER},{directives}"))
        .unwrap_or_else(|_| EnvFilter::new(format!("{QUIET_EXPORTER},info")))
}

/// An error and its sources, on one line.
pub fn describe(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s = s.to_string();
        if !text.contains(&s) {
            text.push_str(": ");
            text.push_str(&s);
        }
        source = std::error::Error::source(source.expect("loop condition holds"));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `filter` lets a warning of `target` through.
    fn warns(filter: EnvFilter, target: &str) -> bool {
        let subscriber = tracing_subscriber::registry()
            .with(fmt::layer().with_writer(std::io::sink).with_filter(filter));
        tracing::subscriber::with_default(subscriber, || match target {
            "opentelemetry-otlp" => tracing::enabled!(target: "opentelemetry-otlp", Level::WARN),
            "oci_upstream" => tracing::enabled!(target: "oci_upstream", Level::WARN),
            _ => unreachable!("a target of the test"),
        })
    }

    #[test]
    fn the_exporters_own_warnings_are_off_unless_asked_for() {
        for rust_log in [
            None,
            Some(""),
            Some("debug"),
            Some("oci_upstream=debug,info"),
            Some("=bad="),
        ] {
            assert!(
                !warns(log_filter(rust_log), "opentelemetry-otlp"),
                "{rust_log:?}"
            );
            assert!(warns(log_filter(rust_log), "oci_upstream"), "{rust_log:?}");
        }
        assert!(warns(
            log_filter(Some("info,opentelemetry-otlp=debug")),
            "opentelemetry-otlp"
        ));
    }
}
