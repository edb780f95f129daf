//! The `/metrics` endpoint against a real Distribution registry: a scripted
//! set of RPCs moves each series of the contract by exactly its amount, the
//! text parses with the Prometheus parser, label values stay bounded, and a
//! `metrics_listen` that cannot be bound stops the start.

use crate::common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::InProcess;
use common::config::{ServiceConfig, Upstream};
use common::distribution::Distribution;
use common::metrics::Scrape;
use common::rpc::{blob_request, fetch_manifest, read_blob};
use tonic::Code;

const UPSTREAM_SERVICE: &str = "oci.upstream.v1.UpstreamService";

/// The change of every series the script moves, between two scrapes.
struct Delta<'a> {
    before: &'a Scrape,
    after: &'a Scrape,
}

impl Delta<'_> {
    fn of(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.after.value(name, labels) - self.before.value(name, labels)
    }

    fn handled(&self, method: &str, code: &str) -> f64 {
        self.of(
            "grpc_server_handled_total",
            &[
                ("grpc_service", UPSTREAM_SERVICE),
                ("grpc_method", method),
                ("grpc_code", code),
            ],
        )
    }

    fn lookups(&self, kind: &str, result: &str) -> f64 {
        self.of(
            "oci_upstream_cache_lookups_total",
            &[("kind", kind), ("result", result)],
        )
    }

    fn registry(&self, operation: &str, status: &str) -> f64 {
        self.of(
            "oci_upstream_registry_requests_total",
            &[
                ("upstream", "reg"),
                ("operation", operation),
                ("status", status),
            ],
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripted_rpcs_move_the_counters_by_exactly_their_amounts() {
    let registry = Distribution::start();
    let image = registry.push_image("team/app", "v1").await;
    let layer = &image.layers[1];
    let service =
        InProcess::start(&ServiceConfig::with(Upstream::new("reg", &registry.url())).toml()).await;
    let metrics = service.metrics_addr.expect("metrics are on by default");
    let mut client = service.client().await;
    let before = Scrape::of(metrics).await;

    // A miss, a hit, a NOT_FOUND, an INVALID_ARGUMENT.
    let miss = fetch_manifest(&mut client, "team/app", "v1").await;
    assert!(!miss.expect("tag v1").source.expect("a source").cache_hit);
    let hit = fetch_manifest(&mut client, "team/app", "v1").await;
    assert!(hit.expect("tag v1").source.expect("a source").cache_hit);
    let absent = fetch_manifest(&mut client, "team/app", "nope").await;
    assert_eq!(absent.expect_err("no such tag").code(), Code::NotFound);
    let bad = fetch_manifest(&mut client, "Team//App", "v1").await;
    assert_eq!(bad.expect_err("bad name").code(), Code::InvalidArgument);
    // A FetchBlob from the upstream, then, once it is in the store (it
    // lands there after its caller is served), the same from the cache.
    let manifest_size = image.manifest.bytes.len() as f64;
    let stored = manifest_size + layer.data.len() as f64;
    let read = read_blob(&mut client, blob_request("team/app", &layer.digest)).await;
    read.assert_bytes(&layer.data, "the layer from the upstream");
    let mut after = Scrape::of(metrics).await;
    let until = Instant::now() + common::POLL_BOUND;
    while after.value("oci_upstream_cache_size_bytes", &[]) < stored && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
        after = Scrape::of(metrics).await;
    }
    let read = read_blob(&mut client, blob_request("team/app", &layer.digest)).await;
    read.assert_bytes(&layer.data, "the layer from the cache");
    let after = Scrape::of(metrics).await;
    let d = Delta {
        before: &before,
        after: &after,
    };
    let blob_size = layer.data.len() as f64;

    // The gRPC family, as go-grpc-prometheus names it.
    let started = |method, kind| {
        d.of(
            "grpc_server_started_total",
            &[
                ("grpc_type", kind),
                ("grpc_service", UPSTREAM_SERVICE),
                ("grpc_method", method),
            ],
        )
    };
    assert_eq!(started("FetchManifest", "unary"), 4.0);
    assert_eq!(started("FetchBlob", "server_stream"), 2.0);
    assert_eq!(d.handled("FetchManifest", "OK"), 2.0);
    assert_eq!(d.handled("FetchManifest", "NotFound"), 1.0);
    assert_eq!(d.handled("FetchManifest", "InvalidArgument"), 1.0);
    assert_eq!(d.handled("FetchBlob", "OK"), 2.0);
    assert_eq!(
        d.of(
            "grpc_server_handling_seconds_count",
            &[("grpc_method", "FetchManifest")]
        ),
        4.0
    );
    assert_eq!(
        d.of(
            "grpc_server_handling_seconds_bucket",
            &[("grpc_method", "FetchBlob"), ("le", "+Inf")]
        ),
        2.0
    );

    // The cache: the tag missed, then hit, then missed (absent); the
    // invalid request looked nothing up; the blob missed, then hit.
    assert_eq!(d.lookups("tag", "miss"), 2.0);
    assert_eq!(d.lookups("tag", "hit"), 1.0);
    assert_eq!(d.lookups("tag", "stale"), 0.0);
    assert_eq!(d.lookups("blob", "miss"), 1.0);
    assert_eq!(d.lookups("blob", "hit"), 1.0);
    assert_eq!(
        d.of("oci_upstream_bytes_served_total", &[("source", "upstream")]),
        blob_size
    );
    assert_eq!(
        d.of("oci_upstream_bytes_served_total", &[("source", "cache")]),
        blob_size
    );
    assert_eq!(d.of("oci_upstream_cache_stored_bytes_total", &[]), stored);
    assert_eq!(after.value("oci_upstream_cache_size_bytes", &[]), stored);
    assert_eq!(after.value("oci_upstream_cache_objects", &[]), 2.0);
    assert_eq!(after.value("oci_upstream_downloads_in_flight", &[]), 0.0);
    assert_eq!(d.of("oci_upstream_download_joins_total", &[]), 0.0);

    // The upstream: one manifest GET found, one not, one blob GET.
    assert_eq!(d.registry("manifest", "2xx"), 1.0);
    assert_eq!(d.registry("manifest", "4xx"), 1.0);
    assert_eq!(d.registry("blob", "2xx"), 1.0);
    assert_eq!(
        d.of(
            "oci_upstream_registry_request_duration_seconds_count",
            &[("upstream", "reg")]
        ),
        3.0
    );
    assert_eq!(
        after.value("oci_upstream_circuit_state", &[("upstream", "reg")]),
        0.0
    );
    assert_eq!(
        after.value(
            "oci_upstream_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    assert!(after.value("process_resident_memory_bytes", &[]) > 0.0);
    assert!(after.has("process_open_fds"));

    // No repository, tag or digest in any label.
    for value in after.label_values() {
        for request_data in ["team", "app", "nope", "sha256:", &layer.digest[7..19]] {
            assert!(
                !value.contains(request_data),
                "label value {value:?} names request data"
            );
        }
    }
}

#[tokio::test]
async fn other_paths_are_not_found() {
    let service =
        InProcess::start(&ServiceConfig::with(Upstream::new("a", "http://127.0.0.1:9")).toml())
            .await;
    let addr = service.metrics_addr.expect("metrics on by default");
    let answer = reqwest::get(format!("http://{addr}/v2/"))
        .await
        .expect("an answer");
    assert_eq!(answer.status(), 404);
}

#[test]
fn a_metrics_listen_that_cannot_bind_stops_the_start() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a port");
    let addr = taken.local_addr().expect("its address");
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("config.toml");
    let toml = ServiceConfig::with(Upstream::new("a", "http://127.0.0.1:9"))
        .top(&format!("metrics_listen = \"{addr}\""))
        .toml();
    std::fs::write(&config, toml).expect("write config");
    let mut child = Command::new(env!("CARGO_BIN_EXE_oci-upstream"))
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .env("OCI_UPSTREAM_LISTEN", "127.0.0.1:0")
        .env("OCI_UPSTREAM_CACHE_DIR", dir.path().join("cache"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn oci-upstream");
    let until = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > until {
            let _ = child.kill();
            panic!("the service kept running with metrics_listen taken");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = child.wait_with_output().expect("its output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!status.success(), "exit status {status}");
    assert!(
        stderr.contains(&format!("cannot listen on metrics_listen = {addr}")),
        "{stderr}"
    );
    drop(taken);
}

#[tokio::test]
async fn the_metrics_port_is_closed_when_the_service_has_stopped() {
    let service =
        InProcess::start(&ServiceConfig::with(Upstream::new("a", "http://127.0.0.1:9")).toml())
            .await;
    let addr = service.metrics_addr.expect("metrics on by default");
    Scrape::of(addr).await;
    service.stop().await.expect("a clean stop");
    let refused = tokio::net::TcpStream::connect(addr).await;
    assert!(refused.is_err(), "/metrics still accepts after the stop");
}
