//! Scale benchmark: the service (the release binary `cargo bench` builds)
//! with a large store and many callers, all measured in one run.
//!
//! 1. Start-up with `OBJECTS` small manifests and `TAGS` tag entries
//!    already in the store (written straight into the store's layout):
//!    time from spawning the process until it serves, and the resident set
//!    the index adds (against the same service on an empty store, in the
//!    same run).
//! 2. Warm FetchManifest by tag at `CALLERS` concurrent callers (closed
//!    loop over 8 connections): requests/s and p50/p99 latency.
//! 3. Warm FetchBlob: one stream alone, then `STREAMS` concurrent streams of
//!    the same blob: aggregate MB/s and its ratio to the single stream.
//!
//! The upstream is an in-process fake registry (content from memory), so
//! what is measured is the service. `cargo bench --bench scale` runs the
//! full sizes (100,000 objects, 10,000 tags, 256 callers, 64 streams of a
//! 64 MiB blob); `BENCH_QUICK=1`, or a run by `cargo test`, small ones, so
//! CI keeps it working. Figures are printed and written as JSON to
//! `target/bench-scale.json` (or `BENCH_OUT`).

#![allow(
    clippy::disallowed_types,
    reason = "benchmarks measure wall-clock time with std::time::Instant"
)]

#[path = "../tests/common/mod.rs"]
mod common;

#[path = "common_bench/clients.rs"]
#[allow(
    dead_code,
    reason = "the e2e benchmark's client helpers; this one uses a few"
)]
mod clients;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Spawned;
use common::config::{ServiceConfig, Upstream};
use common::content::{OCI_MANIFEST, image_manifest, pseudo_random_bytes, sha256_digest};
use common::fake::FakeRegistry;
use oci_upstream::pb::FetchManifestRequest;
use oci_upstream::pb::upstream_service_client::UpstreamServiceClient;
use serde_json::json;
use tonic::transport::Channel;

const REPO: &str = "bench/scale";
const MIB: usize = 1024 * 1024;

/// What a run does.
struct Plan {
    quick: bool,
    objects: usize,
    tags: usize,
    callers: usize,
    load: Duration,
    streams: usize,
    blob: usize,
}

impl Plan {
    fn from_env() -> Plan {
        let quick = common::bench_quick();
        if quick {
            Plan {
                quick,
                objects: 5_000,
                tags: 500,
                callers: 32,
                load: Duration::from_secs(1),
                streams: 8,
                blob: 4 * MIB,
            }
        } else {
            Plan {
                quick,
                objects: 100_000,
                tags: 10_000,
                callers: 256,
                load: Duration::from_secs(10),
                streams: 64,
                blob: 64 * MIB,
            }
        }
    }
}

#[tokio::main]
async fn main() {
    let plan = Plan::from_env();
    let mut figures = Vec::new();
    let mut figure = |name: &str, value: f64, unit: &str| {
        println!("  {name:<58} {value:>12.3} {unit}");
        figures.push(json!({"name": name, "value": value, "unit": unit}));
    };
    println!(
        "scale benchmark{}: {} objects, {} tags, {} callers, {} streams of {} MiB",
        if plan.quick { " (quick)" } else { "" },
        plan.objects,
        plan.tags,
        plan.callers,
        plan.streams,
        plan.blob / MIB
    );
    let upstream = FakeRegistry::start().await;
    let config = ServiceConfig::with(Upstream::new("fake", &upstream.url()))
        .cache("tag_ttl = \"1h\"")
        .toml();
    let quiet = ("RUST_LOG", "oci_upstream::app=info,warn");

    // 1. Start-up and index memory.
    let empty = tempfile::tempdir().expect("temp dir");
    let (empty_start, empty_rss) = start_up(&config, empty.path(), quiet);
    let full = tempfile::tempdir().expect("temp dir");
    let written = Instant::now();
    fill_store(full.path(), plan.objects, plan.tags);
    println!(
        "  (store of {} objects written in {:.1?})",
        plan.objects,
        written.elapsed()
    );
    let (full_start, full_rss) = start_up(&config, full.path(), quiet);
    figure("start-up, empty store [s]", empty_start.as_secs_f64(), "s");
    figure(
        &format!(
            "start-up, {} objects + {} tags [s]",
            plan.objects, plan.tags
        ),
        full_start.as_secs_f64(),
        "s",
    );
    figure("resident set, empty store [MiB]", empty_rss, "MiB");
    figure("resident set, full store [MiB]", full_rss, "MiB");
    figure(
        "index memory (full - empty) [MiB]",
        full_rss - empty_rss,
        "MiB",
    );

    // 2 and 3 on one service.
    let service = Spawned::start_with_env(&config, &[quiet]);
    let channels = connect(&service, 8).await;
    let manifest = image_manifest("scale", 2);
    let digest = upstream.put_manifest(REPO, Some("v1"), OCI_MANIFEST, &manifest);
    let blob = pseudo_random_bytes(7, plan.blob);
    let blob_digest = upstream.put_blob(REPO, &blob);
    let mut client = UpstreamServiceClient::new(channels[0].clone());
    let primed = fetch_manifest(&mut client).await;
    assert_eq!(primed, digest, "the manifest the fake serves");
    let pulled = clients::grpc_fetch_blob(&mut client, REPO, &blob_digest, true).await;
    assert_eq!(
        pulled.digest.as_deref(),
        Some(sha256_digest(&blob).as_str())
    );

    let clients: Vec<_> = channels
        .iter()
        .cloned()
        .map(UpstreamServiceClient::new)
        .collect();
    let request = Arc::new(move |i: u64| {
        let mut client = clients[i as usize % clients.len()].clone();
        async move {
            fetch_manifest(&mut client).await;
        }
    });
    let load = clients::closed_loop(plan.callers, plan.load, request).await;
    let percentile = |p: f64| {
        let i = ((load.latencies_ms.len() as f64 * p) as usize).min(load.latencies_ms.len() - 1);
        load.latencies_ms[i]
    };
    let callers = plan.callers;
    figure(
        &format!("warm FetchManifest, {callers} callers [req/s]"),
        load.rate(),
        "req/s",
    );
    figure(
        &format!("warm FetchManifest, {callers} callers, p50 [ms]"),
        percentile(0.50),
        "ms",
    );
    figure(
        &format!("warm FetchManifest, {callers} callers, p99 [ms]"),
        percentile(0.99),
        "ms",
    );
    let upstream_gets = upstream.count(&format!("/v2/{REPO}/manifests/v1"));
    figure(
        "upstream manifest GETs during the load",
        upstream_gets as f64 - 1.0,
        "GETs",
    );

    let one = {
        let started = Instant::now();
        let pulled = clients::grpc_fetch_blob(&mut client, REPO, &blob_digest, false).await;
        assert_eq!(pulled.cache_hit, Some(true), "warm");
        pulled.bytes as f64 / started.elapsed().as_secs_f64() / 1e6
    };
    let many = {
        let started = Instant::now();
        let mut tasks = Vec::new();
        for i in 0..plan.streams {
            let mut client = UpstreamServiceClient::new(channels[i % channels.len()].clone());
            let digest = blob_digest.clone();
            tasks.push(tokio::spawn(async move {
                clients::grpc_fetch_blob(&mut client, REPO, &digest, false)
                    .await
                    .bytes
            }));
        }
        let mut bytes = 0;
        for task in tasks {
            bytes += task.await.expect("a stream task");
        }
        assert_eq!(
            bytes,
            (plan.streams * plan.blob) as u64,
            "every stream whole"
        );
        bytes as f64 / started.elapsed().as_secs_f64() / 1e6
    };
    figure("warm FetchBlob, one stream [MB/s]", one, "MB/s");
    figure(
        &format!(
            "warm FetchBlob, {} streams at once, aggregate [MB/s]",
            plan.streams
        ),
        many,
        "MB/s",
    );
    figure("aggregate / one stream [x]", many / one, "x");
    println!(
        "goals: start-up < 2 s and index memory < 64 MiB at 100k objects; p99 < 5 ms at 256 callers"
    );
    let out = std::env::var("BENCH_OUT").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/target/bench-scale.json").to_string()
    });
    let report = json!({"quick": plan.quick, "figures": figures});
    std::fs::write(&out, serde_json::to_string_pretty(&report).expect("json"))
        .unwrap_or_else(|e| panic!("write {out}: {e}"));
    println!("wrote {out}");
}

/// Starts the service on `cache`: the time until it serves, and its
/// resident set then, in MiB.
fn start_up(config: &str, cache: &Path, log: (&str, &str)) -> (Duration, f64) {
    let dir = cache.to_str().expect("utf-8 temp path");
    let started = Instant::now();
    let service = Spawned::start_with_env(config, &[("OCI_UPSTREAM_CACHE_DIR", dir), log]);
    let took = started.elapsed();
    let rss = clients::rss_kib(service.pid()) as f64 / 1024.0;
    (took, rss)
}

/// Writes `objects` small manifests and `tags` tag entries straight into
/// the store's layout under `dir` (what the service would have written).
fn fill_store(dir: &Path, objects: usize, tags: usize) {
    let sha = dir.join("objects/sha256");
    std::fs::create_dir_all(&sha).expect("create objects/sha256");
    let tag_dir = dir.join("tags");
    std::fs::create_dir_all(&tag_dir).expect("create tags");
    let mut digests = Vec::with_capacity(objects);
    for i in 0..objects {
        let body = format!(
            "{{\"schemaVersion\":2,\"seed\":{i},\"pad\":\"{}\"}}",
            "x".repeat(300)
        );
        let digest = sha256_digest(body.as_bytes());
        let hex = digest.trim_start_matches("sha256:");
        let meta = json!({
            "size": body.len(),
            "media_type": OCI_MANIFEST,
            "holders": [{"upstream": "fake", "repository": REPO}],
        });
        std::fs::write(sha.join(format!("{hex}.meta")), meta.to_string()).expect("write .meta");
        std::fs::write(sha.join(hex), &body).expect("write object");
        digests.push(digest);
    }
    for i in 0..tags {
        let key = format!("{REPO}:t{i} upstream=* accept=");
        let stored = json!({
            "key": key,
            "entry": {
                "digest": digests[i % digests.len()],
                "media_type": OCI_MANIFEST,
                "upstream": "fake",
                "fetched_at_ms": 0,
            }
        });
        let name = sha256_digest(key.as_bytes());
        let name = name.trim_start_matches("sha256:");
        std::fs::write(tag_dir.join(format!("{name}.json")), stored.to_string())
            .expect("write a tag entry");
    }
}

/// `n` connections to the service.
async fn connect(service: &Spawned, n: usize) -> Vec<Channel> {
    let mut channels = Vec::with_capacity(n);
    for _ in 0..n {
        channels.push(service.channel().await);
    }
    channels
}

/// FetchManifest of the tag; its digest.
async fn fetch_manifest(client: &mut UpstreamServiceClient<Channel>) -> String {
    client
        .fetch_manifest(FetchManifestRequest {
            repository: REPO.into(),
            reference: "v1".into(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|s| panic!("FetchManifest: {s}"))
        .into_inner()
        .digest
}
