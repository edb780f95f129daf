//! The service's Prometheus metrics: one [`Metrics`] registry per service
//! instance holding every series of the operations contract (DESIGN §5),
//! with the label values it allows (never a repository, tag, digest or
//! token), and its rendering in the text exposition format 0.0.4.
//!
//! Counters are bumped where the event happens (the engine, the cache, the
//! gRPC layer); gauges that mirror state (cache size, downloads in flight,
//! circuits) are set from that state just before each scrape, so they never
//! drift from it.

pub mod endpoint;

use prometheus::core::Collector;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// What an upstream request was for (`operation` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// A manifest GET or HEAD.
    Manifest,
    /// A blob GET or HEAD.
    Blob,
    /// A page of a tag list.
    Tags,
    /// A token request to a realm.
    Token,
}

impl Operation {
    fn label(self) -> &'static str {
        match self {
            Self::Manifest => "manifest",
            Self::Blob => "blob",
            Self::Tags => "tags",
            Self::Token => "token",
        }
    }
}

/// What a cache lookup was for (`kind` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LookupKind {
    /// A blob by digest.
    Blob,
    /// A manifest by digest.
    Manifest,
    /// A manifest by tag (the tag entry and the manifest it names).
    Tag,
}

/// How a cache lookup went (`result` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LookupResult {
    /// Answered from the cache.
    Hit,
    /// An upstream was asked.
    Miss,
    /// Answered from a stale tag entry.
    Stale,
}

/// Where blob bytes sent to callers came from (`source` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteSource {
    /// The store (or a download already verified).
    Cache,
    /// A download from an upstream under way.
    Upstream,
}

/// The gRPC server family, with go-grpc-prometheus names and labels.
#[derive(Debug, Clone)]
pub struct GrpcFamily {
    /// `grpc_server_started_total{grpc_type, grpc_service, grpc_method}`.
    pub started: IntCounterVec,
    /// `grpc_server_handled_total{grpc_type, grpc_service, grpc_method, grpc_code}`.
    pub handled: IntCounterVec,
    /// `grpc_server_handling_seconds{grpc_type, grpc_service, grpc_method}`.
    pub handling: HistogramVec,
}

/// The mirror front's family (`oci_upstream_http_*`).
#[derive(Debug, Clone)]
pub struct HttpFamily {
    /// `oci_upstream_http_requests_total{route, method, code}`.
    pub requests: IntCounterVec,
    /// `oci_upstream_http_request_duration_seconds{route}`.
    pub duration: HistogramVec,
}

/// Every metric of one service instance, in its own registry (so two
/// instances in one process, as in tests, count apart).
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// The gRPC server family.
    pub grpc: GrpcFamily,
    /// The mirror front's family.
    pub http: HttpFamily,
    registry_requests: IntCounterVec,
    registry_duration: HistogramVec,
    /// `[kind][result]`, resolved once: lookups are on every warm request.
    lookups: [[IntCounter; 3]; 3],
    bytes_served: [IntCounter; 2],
    stored_bytes: IntCounter,
    evictions: IntCounter,
    cache_size: IntGauge,
    cache_objects: IntGauge,
    downloads_in_flight: IntGauge,
    download_joins: IntCounter,
    circuit_state: IntGaugeVec,
    token_requests: IntCounterVec,
    backend_errors: IntCounterVec,
}

/// Builds and registers one family; the names are constants of this file,
/// so a failure is a bug caught by the unit tests.
fn register<C: Collector + Clone + 'static>(registry: &Registry, collector: C) -> C {
    registry
        .register(Box::new(collector.clone()))
        .expect("metric names and labels are valid and unique");
    collector
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(
        registry,
        IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter"),
    )
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    register(
        registry,
        IntCounter::new(name, help).expect("valid counter"),
    )
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    register(registry, IntGauge::new(name, help).expect("valid gauge"))
}

fn histogram_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    register(
        registry,
        HistogramVec::new(HistogramOpts::new(name, help), labels).expect("valid histogram"),
    )
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every family, `oci_upstream_build_info` set, and the
    /// standard process collector (`process_*`) where the platform has one.
    pub fn new() -> Self {
        let r = Registry::new();
        let grpc_labels = ["grpc_type", "grpc_service", "grpc_method"];
        let grpc = GrpcFamily {
            started: counter_vec(
                &r,
                "grpc_server_started_total",
                "Total number of RPCs started on the server.",
                &grpc_labels,
            ),
            handled: counter_vec(
                &r,
                "grpc_server_handled_total",
                "Total number of RPCs completed on the server, regardless of success or failure.",
                &["grpc_type", "grpc_service", "grpc_method", "grpc_code"],
            ),
            handling: histogram_vec(
                &r,
                "grpc_server_handling_seconds",
                "Histogram of response latency (seconds) of gRPC that had been application-level handled by the server.",
                &grpc_labels,
            ),
        };
        let http = HttpFamily {
            requests: counter_vec(
                &r,
                "oci_upstream_http_requests_total",
                "Requests to the OCI HTTP mirror, by route, method and HTTP status.",
                &["route", "method", "code"],
            ),
            duration: histogram_vec(
                &r,
                "oci_upstream_http_request_duration_seconds",
                "Time the OCI HTTP mirror took to answer, by route.",
                &["route"],
            ),
        };
        let lookup_family = counter_vec(
            &r,
            "oci_upstream_cache_lookups_total",
            "Cache lookups by kind and result.",
            &["kind", "result"],
        );
        let lookups = ["blob", "manifest", "tag"].map(|kind| {
            ["hit", "miss", "stale"].map(|result| lookup_family.with_label_values(&[kind, result]))
        });
        let served = counter_vec(
            &r,
            "oci_upstream_bytes_served_total",
            "Blob bytes sent to callers, by where they came from.",
            &["source"],
        );
        let bytes_served = ["cache", "upstream"].map(|s| served.with_label_values(&[s]));
        let build = register(
            &r,
            IntGaugeVec::new(
                Opts::new("oci_upstream_build_info", "The running build; always 1."),
                &["version"],
            )
            .expect("valid gauge"),
        );
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        #[cfg(target_os = "linux")]
        r.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))
        .expect("the process collector registers once");
        Self {
            registry_requests: counter_vec(
                &r,
                "oci_upstream_registry_requests_total",
                "HTTP requests to upstream registries, by upstream, operation and status class.",
                &["upstream", "operation", "status"],
            ),
            registry_duration: histogram_vec(
                &r,
                "oci_upstream_registry_request_duration_seconds",
                "Time to response headers of upstream requests.",
                &["upstream", "operation"],
            ),
            lookups,
            bytes_served,
            stored_bytes: counter(
                &r,
                "oci_upstream_cache_stored_bytes_total",
                "Bytes of verified objects written into the cache.",
            ),
            evictions: counter(
                &r,
                "oci_upstream_cache_evictions_total",
                "Objects removed from the cache (room for new ones, damage, admin evictions).",
            ),
            cache_size: gauge(
                &r,
                "oci_upstream_cache_size_bytes",
                "Bytes of objects in the cache.",
            ),
            cache_objects: gauge(&r, "oci_upstream_cache_objects", "Objects in the cache."),
            downloads_in_flight: gauge(
                &r,
                "oci_upstream_downloads_in_flight",
                "Blob downloads from upstreams under way.",
            ),
            download_joins: counter(
                &r,
                "oci_upstream_download_joins_total",
                "Callers that joined a download already under way.",
            ),
            circuit_state: register(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "oci_upstream_circuit_state",
                        "Circuit breaker of each upstream: 0 closed, 1 half-open, 2 open.",
                    ),
                    &["upstream"],
                )
                .expect("valid gauge"),
            ),
            token_requests: counter_vec(
                &r,
                "oci_upstream_token_requests_total",
                "Token requests to upstream realms, by upstream and result.",
                &["upstream", "result"],
            ),
            backend_errors: counter_vec(
                &r,
                "oci_upstream_cache_backend_errors_total",
                "Failed operations of the cache's storage backend.",
                &["backend", "operation"],
            ),
            grpc,
            http,
            registry: r,
        }
    }

    /// A request to `upstream` got an answer with `status` (or none, when
    /// `status` is `None`) after `seconds` to its headers.
    pub fn registry_request(
        &self,
        upstream: &str,
        operation: Operation,
        status: Option<u16>,
        seconds: f64,
    ) {
        let class = match status {
            Some(200..=299) => "2xx",
            Some(300..=399) => "3xx",
            Some(400..=499) => "4xx",
            Some(500..=599) => "5xx",
            _ => "error",
        };
        self.registry_requests
            .with_label_values(&[upstream, operation.label(), class])
            .inc();
        self.registry_duration
            .with_label_values(&[upstream, operation.label()])
            .observe(seconds);
    }

    /// A token request to `upstream`'s realm ended.
    pub fn token_request(&self, upstream: &str, ok: bool) {
        self.token_requests
            .with_label_values(&[upstream, if ok { "ok" } else { "error" }])
            .inc();
    }

    /// One cache lookup.
    pub fn lookup(&self, kind: LookupKind, result: LookupResult) {
        self.lookups[kind as usize][result as usize].inc();
    }

    /// Lookups since start: answered from the cache (stale tag entries
    /// included), and those that asked an upstream.
    pub fn lookup_totals(&self) -> (u64, u64) {
        let (mut hits, mut misses) = (0, 0);
        for kind in &self.lookups {
            hits +=
                kind[LookupResult::Hit as usize].get() + kind[LookupResult::Stale as usize].get();
            misses += kind[LookupResult::Miss as usize].get();
        }
        (hits, misses)
    }

    /// The counter of blob bytes served from `source`, to bump as they go.
    pub fn bytes_served(&self, source: ByteSource) -> IntCounter {
        self.bytes_served[source as usize].clone()
    }

    /// A caller joined a download under way.
    pub fn download_joined(&self) {
        self.download_joins.inc();
    }

    /// `bytes` of a verified object were written into the cache.
    pub fn stored(&self, bytes: u64) {
        self.stored_bytes.inc_by(bytes);
    }

    /// `count` objects left the cache.
    pub fn evicted(&self, count: u64) {
        self.evictions.inc_by(count);
    }

    /// An operation of the cache backend `backend` failed.
    pub fn backend_error(&self, backend: &str, operation: &str) {
        self.backend_errors
            .with_label_values(&[backend, operation])
            .inc();
    }

    /// Sets the gauges that mirror the cache's state.
    pub fn cache_state(&self, bytes: u64, objects: u64, downloads: usize) {
        self.cache_size
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        self.cache_objects
            .set(i64::try_from(objects).unwrap_or(i64::MAX));
        self.downloads_in_flight
            .set(i64::try_from(downloads).unwrap_or(i64::MAX));
    }

    /// Sets the circuit gauge of `upstream` (0 closed, 1 half-open, 2 open).
    pub fn circuit(&self, upstream: &str, state: i64) {
        self.circuit_state.with_label_values(&[upstream]).set(state);
    }

    /// Every series in the text exposition format 0.0.4, and its content
    /// type.
    pub fn render(&self) -> (&'static str, Vec<u8>) {
        let encoder = TextEncoder::new();
        let mut text = Vec::with_capacity(16 * 1024);
        if let Err(e) = encoder.encode(&self.registry.gather(), &mut text) {
            tracing::warn!(error = %e, "metrics could not be rendered");
        }
        (prometheus::TEXT_FORMAT, text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(m: &Metrics) -> String {
        String::from_utf8(m.render().1).unwrap()
    }

    #[test]
    fn renders_the_text_format_with_build_info() {
        let m = Metrics::new();
        let (content_type, _) = m.render();
        assert_eq!(content_type, "text/plain; version=0.0.4");
        let out = text(&m);
        assert!(
            out.contains(&format!(
                "oci_upstream_build_info{{version=\"{}\"}} 1",
                env!("CARGO_PKG_VERSION")
            )),
            "{out}"
        );
        #[cfg(target_os = "linux")]
        assert!(out.contains("process_resident_memory_bytes"), "{out}");
    }

    #[test]
    fn labels_are_the_contract_values() {
        let m = Metrics::new();
        m.registry_request("hub", Operation::Manifest, Some(404), 0.01);
        m.registry_request("hub", Operation::Blob, None, 0.01);
        m.token_request("hub", true);
        m.lookup(LookupKind::Tag, LookupResult::Stale);
        m.bytes_served(ByteSource::Upstream).inc_by(7);
        m.circuit("hub", 2);
        let out = text(&m);
        for line in [
            "oci_upstream_registry_requests_total{operation=\"manifest\",status=\"4xx\",upstream=\"hub\"} 1",
            "oci_upstream_registry_requests_total{operation=\"blob\",status=\"error\",upstream=\"hub\"} 1",
            "oci_upstream_token_requests_total{result=\"ok\",upstream=\"hub\"} 1",
            "oci_upstream_cache_lookups_total{kind=\"tag\",result=\"stale\"} 1",
            "oci_upstream_cache_lookups_total{kind=\"blob\",result=\"hit\"} 0",
            "oci_upstream_bytes_served_total{source=\"upstream\"} 7",
            "oci_upstream_circuit_state{upstream=\"hub\"} 2",
        ] {
            assert!(out.contains(line), "missing {line} in\n{out}");
        }
    }

    #[test]
    fn two_instances_count_apart() {
        let (a, b) = (Metrics::new(), Metrics::new());
        a.download_joined();
        assert!(text(&a).contains("oci_upstream_download_joins_total 1"));
        assert!(text(&b).contains("oci_upstream_download_joins_total 0"));
    }
}
