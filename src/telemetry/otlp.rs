//! Span export over OTLP/gRPC: the tonic exporter behind the SDK's batch
//! processor (queue and schedule from the `OTEL_BSP_*` variables, headers
//! and timeout from `OTEL_EXPORTER_OTLP_*`), a resource naming the service,
//! and failures reported at warn, at most one line a minute, so a collector
//! that is down costs the RPCs nothing and the log little.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::tonic_types::transport::ClientTlsConfig;
use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider, SpanData, SpanExporter};
use tokio::time::Instant;
use url::Url;

/// The `service.name` of exported spans.
const SERVICE_NAME: &str = "oci-upstream";
/// Longest wait at exit for queued spans to reach the collector. The
/// service's own drain ends within `shutdown_grace` + 4 s, so the process
/// still exits within `shutdown_grace` + 5 s.
const FLUSH_LIMIT: Duration = Duration::from_secs(1);
/// The SDK's own bound on shutting export down; [`FLUSH_LIMIT`] ends the
/// wait first, this only bounds the flushing thread when the process lives on.
const SDK_SHUTDOWN_LIMIT: Duration = Duration::from_secs(30);
/// At most one warning about failed exports per this long.
const REPORT_EVERY: Duration = Duration::from_secs(60);

/// Span export could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("otlp_endpoint: cannot export spans to {endpoint}: {source}")]
pub struct ExportError {
    endpoint: Url,
    source: opentelemetry_otlp::ExporterBuildError,
}

/// The export pipeline to one collector.
#[derive(Debug)]
pub(super) struct Export {
    provider: SdkTracerProvider,
}

impl Export {
    /// Starts exporting to `endpoint`. Needs the tokio runtime that will
    /// serve: the collector connection runs on it.
    pub(super) fn start(endpoint: &Url) -> Result<Self, ExportError> {
        let mut builder = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.as_str());
        if endpoint.scheme() == "https" {
            builder = builder.with_tls_config(ClientTlsConfig::new().with_webpki_roots());
        }
        let exporter = builder.build().map_err(|source| ExportError {
            endpoint: endpoint.clone(),
            source,
        })?;
        // `Resource::builder` also reads OTEL_RESOURCE_ATTRIBUTES (pod,
        // namespace, ...); the name and version are ours.
        let resource = Resource::builder()
            .with_service_name(SERVICE_NAME)
            .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
            .build();
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(Reporting::new(exporter))
            .with_resource(resource)
            .build();
        Ok(Self { provider })
    }

    /// The tracer the `tracing` bridge creates spans with.
    pub(super) fn tracer(&self) -> SdkTracer {
        self.provider.tracer(env!("CARGO_PKG_NAME"))
    }

    /// Sends the spans still queued, waiting at most [`FLUSH_LIMIT`], and
    /// stops. Needs the runtime [`Export::start`] ran in to still be running.
    pub(super) fn stop(self) {
        let provider = self.provider;
        let (done, finished) = std::sync::mpsc::channel();
        // The SDK's shutdown blocks, and reports a timeout as an error: it
        // runs on a thread of its own, and the wait for it is bounded here.
        let flushing = std::thread::Builder::new()
            .name("span-flush".to_owned())
            .spawn(move || {
                let _ = done.send(provider.shutdown_with_timeout(SDK_SHUTDOWN_LIMIT));
            });
        if let Err(e) = flushing {
            tracing::warn!(error = %e, "cannot flush queued spans at exit");
            return;
        }
        match finished.recv_timeout(FLUSH_LIMIT) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "span export did not stop cleanly"),
            Err(_) => {
                tracing::warn!(limit = ?FLUSH_LIMIT, "spans still queued at exit are dropped")
            }
        }
    }
}

/// An exporter whose failures are reported here, at warn and at most once
/// per [`REPORT_EVERY`], instead of by the SDK (an error line per failed
/// batch). The batch of a failed export is dropped either way.
#[derive(Debug)]
struct Reporting<E> {
    inner: E,
    failures: Mutex<Failures>,
}

impl<E> Reporting<E> {
    fn new(inner: E) -> Self {
        Self {
            inner,
            failures: Mutex::new(Failures::default()),
        }
    }
}

impl<E: SpanExporter> SpanExporter for Reporting<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let spans = batch.len();
        if let Err(e) = self.inner.export(batch).await {
            let due = self
                .failures
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .failed(Instant::now());
            if let Some(failed_exports) = due {
                tracing::warn!(
                    error = %e,
                    spans,
                    failed_exports,
                    "span export failed, its spans are dropped (reported at most once a minute)"
                );
            }
        }
        Ok(())
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// When failed exports are reported: the first at once, later ones at most
/// once per [`REPORT_EVERY`], with the count since the last report.
#[derive(Debug, Default)]
struct Failures {
    last_report: Option<Instant>,
    unreported: u64,
}

impl Failures {
    /// One more failed export at `now`: when a report is due, the number of
    /// failures it covers (this one included).
    fn failed(&mut self, now: Instant) -> Option<u64> {
        self.unreported += 1;
        let due = self
            .last_report
            .is_none_or(|at| now.saturating_duration_since(at) >= REPORT_EVERY);
        due.then(|| {
            self.last_report = Some(now);
            std::mem::take(&mut self.unreported)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_reported_at_most_once_a_minute_with_their_count() {
        let start = Instant::now();
        let at = |secs| start + Duration::from_secs(secs);
        let mut failures = Failures::default();
        assert_eq!(failures.failed(at(0)), Some(1), "the first at once");
        assert_eq!(failures.failed(at(1)), None);
        assert_eq!(failures.failed(at(59)), None);
        assert_eq!(failures.failed(at(60)), Some(3), "with those in between");
        assert_eq!(failures.failed(at(61)), None);
        assert_eq!(failures.failed(at(200)), Some(2));
    }
}
