//! Tracing: a caller's W3C `traceparent` puts the RPC in the caller's trace
//! (its JSON log lines carry the `trace_id`), and with `otlp_endpoint` the
//! RPC's span reaches an OTLP collector as a child of the caller's span;
//! without a traceparent, or with an invalid one, the RPC starts a trace of
//! its own. Export never gets in the way of a call: a collector that is down
//! costs one warning, and the spans of the last calls are flushed at exit.

use std::time::Duration;

use crate::common;

use common::Spawned;
use common::config::{ServiceConfig, Upstream};
use common::content::{OCI_MANIFEST, image_manifest};
use common::fake::FakeRegistry;
use common::otlp::{Collector, Received};
use common::rpc::{head_manifest_request, manifest_request, unary};
use tonic::Code;

const REPO: &str = "team/app";
/// The caller's trace and span (the example of the W3C recommendation).
const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

/// A fake upstream holding `REPO:v1`.
async fn upstream() -> FakeRegistry {
    let fake = FakeRegistry::start().await;
    fake.put_manifest(REPO, Some("v1"), OCI_MANIFEST, &image_manifest("traces", 1));
    fake
}

/// The service over `fake`, logging JSON, exporting to `otlp_endpoint`
/// (`""`: no export) every `schedule_delay_ms`.
fn service(fake: &FakeRegistry, otlp_endpoint: &str, schedule_delay_ms: u64) -> Spawned {
    let config = ServiceConfig::with(Upstream::new("a", &fake.url()))
        .top("log_format = \"json\"")
        .top(&format!("otlp_endpoint = {otlp_endpoint:?}"))
        .toml();
    let delay = schedule_delay_ms.to_string();
    Spawned::start_with_env(&config, &[("OTEL_BSP_SCHEDULE_DELAY", &delay)])
}

/// HeadManifest of `REPO:v1` with request id `id` and, when given, this
/// `traceparent` (and a `tracestate`); it must succeed. A successful call
/// logs nothing.
async fn head(service: &Spawned, id: &str, traceparent: Option<&str>) {
    let request = traced(head_manifest_request(REPO, "v1"), id, traceparent);
    let mut client = service.client().await;
    let answer = unary(client.head_manifest(request)).await;
    answer.unwrap_or_else(|e| panic!("HeadManifest ({traceparent:?}): {e:?}"));
}

/// FetchManifest of a tag the upstream does not have, as [`head`]: it must
/// answer NOT_FOUND, which is logged, so the call has log lines.
async fn fetch_missing(service: &Spawned, id: &str, traceparent: Option<&str>) {
    let request = traced(manifest_request(REPO, "nope"), id, traceparent);
    let mut client = service.client().await;
    let answer = unary(client.fetch_manifest(request)).await;
    let code = answer.map(|_| ()).map_err(|e| e.code());
    assert_eq!(code, Err(Code::NotFound), "FetchManifest ({traceparent:?})");
}

fn traced<T>(message: T, id: &str, traceparent: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    let metadata = request.metadata_mut();
    metadata.insert("x-request-id", id.parse().expect("an ASCII id"));
    if let Some(traceparent) = traceparent {
        metadata.insert("traceparent", traceparent.parse().expect("ASCII"));
        metadata.insert("tracestate", "caller=1".parse().expect("ASCII"));
    }
    request
}

/// The `rpc` span objects of the JSON log lines of the call with request id
/// `id`, once one has arrived; every JSON line must parse.
async fn logged_rpc_spans(service: &Spawned, id: &str) -> Vec<serde_json::Value> {
    // The log is read from the process's stderr by a thread: the RPC's
    // lines may arrive a moment after its answer.
    let _ = common::eventually(|| service.logs().contains(id)).await;
    let logs = service.logs();
    let mut found = Vec::new();
    for line in logs.lines().filter(|l| l.trim_start().starts_with('{')) {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        let spans = value.get("spans").and_then(|s| s.as_array());
        let of_the_call = spans.into_iter().flatten().filter(|s| {
            s.get("name").and_then(|v| v.as_str()) == Some("rpc")
                && s.get("request_id").and_then(|v| v.as_str()) == Some(id)
        });
        found.extend(of_the_call.cloned());
    }
    assert!(!found.is_empty(), "no log line of the RPC {id}:\n{logs}");
    found
}

/// The one `trace_id` of the logged lines of the call `id` (`None` when
/// they have none); they must agree.
async fn logged_trace_id(service: &Spawned, id: &str) -> Option<String> {
    let spans = logged_rpc_spans(service, id).await;
    let ids: Vec<Option<String>> = spans
        .iter()
        .map(|s| {
            s.get("trace_id")
                .and_then(|v| v.as_str())
                .map(str::to_owned)
        })
        .collect();
    assert!(ids.windows(2).all(|w| w[0] == w[1]), "{ids:?}");
    ids.into_iter().next().flatten()
}

/// The exported `rpc` span of the call with request id `id`.
async fn exported_rpc(collector: &Collector, service: &Spawned, id: &str) -> Received {
    let span = collector
        .wait_for(|s| s.name() == "rpc" && s.attribute("request_id") == Some(id))
        .await;
    span.unwrap_or_else(|| {
        panic!(
            "the collector got no rpc span of {id} within {:?}; it got {:?}\nlog:\n{}",
            common::otlp::SPAN_BOUND,
            collector.spans(),
            service.logs()
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rpc_span_is_exported_as_a_child_of_the_callers_span() {
    let fake = upstream().await;
    let collector = Collector::start().await;
    let service = service(&fake, &collector.url(), 100);
    let traceparent = format!("00-{TRACE}-{CALLER_SPAN}-01");
    head(&service, "traced-1", Some(&traceparent)).await;
    fetch_missing(&service, "traced-2", Some(&traceparent)).await;

    let rpc = exported_rpc(&collector, &service, "traced-1").await;
    assert_eq!(rpc.trace_id_hex(), TRACE);
    assert_eq!(rpc.parent_span_id_hex(), CALLER_SPAN);
    assert_eq!(rpc.attribute("method"), Some("HeadManifest"));
    // The one RPC span carries the upstream that answered.
    assert_eq!(rpc.attribute("upstream"), Some("a"));
    assert_eq!(rpc.attribute("repository"), Some(REPO));
    assert_eq!(rpc.attribute("trace_id"), Some(TRACE));
    assert_eq!(rpc.resource_attribute("service.name"), Some("oci-upstream"));
    assert_eq!(
        rpc.resource_attribute("service.version"),
        Some(env!("CARGO_PKG_VERSION"))
    );
    // Only the service's own span is exported (one per RPC, with its
    // request id), none of its HTTP/2 or HTTP client crates'.
    for span in collector.spans() {
        assert_eq!(span.name(), "rpc", "{span:?}");
        assert!(span.attribute("request_id").is_some(), "{span:?}");
    }

    let missing = exported_rpc(&collector, &service, "traced-2").await;
    assert_eq!(missing.trace_id_hex(), TRACE);
    assert_eq!(missing.parent_span_id_hex(), CALLER_SPAN);
    assert_eq!(
        logged_trace_id(&service, "traced-2").await.as_deref(),
        Some(TRACE)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rpc_without_a_traceparent_is_exported_as_a_root_span() {
    let fake = upstream().await;
    let collector = Collector::start().await;
    let service = service(&fake, &collector.url(), 100);
    fetch_missing(&service, "untraced-1", None).await;

    let rpc = exported_rpc(&collector, &service, "untraced-1").await;
    assert_eq!(rpc.parent_span_id_hex(), "", "a root span");
    assert_eq!(rpc.trace_id_hex().len(), 32);
    assert_eq!(rpc.attribute("method"), Some("FetchManifest"));
    assert_eq!(
        logged_trace_id(&service, "untraced-1").await,
        Some(rpc.trace_id_hex()),
        "the log names the trace the span was exported in"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_traceparent_is_ignored() {
    let fake = upstream().await;
    let collector = Collector::start().await;
    let service = service(&fake, &collector.url(), 100);
    let zeros = "0".repeat(32);
    let invalid = format!("00-{zeros}-{CALLER_SPAN}-01");
    // Answered as without it: found, or not found.
    head(&service, "zero-ok", Some(&invalid)).await;
    fetch_missing(&service, "zero-trace", Some(&invalid)).await;

    let logged = logged_trace_id(&service, "zero-trace").await;
    let logged = logged.expect("a trace of its own");
    assert_ne!(logged, zeros);
    let rpc = exported_rpc(&collector, &service, "zero-trace").await;
    assert_eq!(rpc.trace_id_hex(), logged);
    assert_eq!(
        rpc.parent_span_id_hex(),
        "",
        "a root span, not the caller's child"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_export_the_callers_trace_id_is_still_logged() {
    let fake = upstream().await;
    let service = service(&fake, "", 100);
    fetch_missing(
        &service,
        "logged-1",
        Some(&format!("00-{TRACE}-{CALLER_SPAN}-01")),
    )
    .await;
    assert_eq!(
        logged_trace_id(&service, "logged-1").await.as_deref(),
        Some(TRACE)
    );
    // No traceparent, or an invalid one (version ff is forbidden): no trace.
    fetch_missing(&service, "logged-2", None).await;
    assert_eq!(logged_trace_id(&service, "logged-2").await, None);
    fetch_missing(
        &service,
        "logged-3",
        Some(&format!("ff-{TRACE}-{CALLER_SPAN}-01")),
    )
    .await;
    assert_eq!(logged_trace_id(&service, "logged-3").await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_of_the_last_calls_are_flushed_at_exit() {
    let fake = upstream().await;
    let collector = Collector::start().await;
    // Nothing is exported on schedule before the process stops.
    let mut service = service(&fake, &collector.url(), 600_000);
    head(
        &service,
        "last-call",
        Some(&format!("00-{TRACE}-{CALLER_SPAN}-01")),
    )
    .await;
    assert!(collector.spans().is_empty(), "exported before the schedule");

    service.terminate();
    let status = service.wait_exit(Duration::from_secs(30));
    let status = status.unwrap_or_else(|| panic!("no exit after SIGTERM:\n{}", service.logs()));
    assert!(status.success(), "{status:?}\n{}", service.logs());
    let rpc = exported_rpc(&collector, &service, "last-call").await;
    assert_eq!(rpc.trace_id_hex(), TRACE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_is_down_costs_calls_nothing_and_warns_once() {
    let fake = upstream().await;
    // Nothing listens there.
    let down = format!("http://127.0.0.1:{}", common::free_port());
    let config = ServiceConfig::with(Upstream::new("a", &fake.url()))
        .top("log_format = \"json\"")
        .top(&format!("otlp_endpoint = {down:?}"))
        .toml();
    // The exporter's own line per failed export (off by default) shows
    // how many exports failed.
    let service = Spawned::start_with_env(
        &config,
        &[
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            (
                "RUST_LOG",
                "oci_upstream=debug,info,opentelemetry-otlp=warn",
            ),
        ],
    );
    let count = |what: &str| {
        let logs = service.logs();
        logs.lines().filter(|l| l.contains(what)).count()
    };
    let reported = || count("span export failed");
    let failed_exports = || count("Export.Failed");

    head(&service, "down-1", None).await;
    let warned = common::eventually(|| reported() >= 1).await;
    assert!(
        warned,
        "no report of the failed export:\n{}",
        service.logs()
    );
    // A second call, a second failed export (its span was not in the
    // first), within the minute: no second report.
    head(&service, "down-2", None).await;
    let failed_twice = common::eventually(|| failed_exports() >= 2).await;
    assert!(failed_twice, "no second failed export:\n{}", service.logs());
    head(&service, "down-3", None).await;

    let logs = service.logs();
    assert_eq!(reported(), 1, "at most one report a minute:\n{logs}");
    for line in logs.lines().filter(|l| l.trim_start().starts_with('{')) {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        let level = value.get("level").and_then(|v| v.as_str());
        let target = value.get("target").and_then(|v| v.as_str());
        assert_ne!(level, Some("ERROR"), "{line}");
        if level == Some("WARN") {
            assert!(
                line.contains("span export failed") || target == Some("opentelemetry-otlp"),
                "{line}"
            );
        }
    }
}
