//! Telemetry overhead benchmark: the service with its observability off
//! (`metrics_listen = ""`, `RUST_LOG=oci_upstream::app=info`, which keeps
//! only the start-up lines, no span export) against the same
//! service with all of it on (`/metrics` and the gRPC metrics layer, JSON
//! logs at `info`, every RPC span exported over OTLP to an in-process
//! collector), in front of one real Distribution registry, in the same run.
//! Measured, alternating the two services so drift of the machine hits both:
//!
//! 1. warm FetchManifest latency by tag: rounds of sequential calls, the
//!    sides alternating round by round; p50 and p99 are the medians of the
//!    rounds' own; and the service's CPU time per call over all its rounds
//!    (from `/proc`);
//! 2. warm FetchBlob throughput (MB = 10^6 bytes/s) of one blob, the median
//!    of alternating runs.
//!
//! The goal is both within 5 % (ratio on/off: latency at most 1.05,
//! throughput at least 0.95). The ratios go to stdout and
//! `target/bench-telemetry.json` (or `BENCH_OUT`). The "on" service must have
//! exported spans and counted its calls, so a run where telemetry silently
//! stayed off fails.
//!
//! `cargo bench --bench telemetry` runs 40 rounds of 500 manifest calls and
//! 5 fetches of a 256 MiB blob per side; `BENCH_QUICK=1`, or a run by
//! `cargo test`, a small round so CI keeps it from rotting. `BENCH_ROUNDS`
//! and `BENCH_RUNS` set the rounds and blob runs; `BENCH_ON` (comma list of
//! `metrics`, `logs`, `traces`; default all) what the "on" side turns on, to
//! tell the parts' costs apart.

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

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::config::{ServiceConfig, Upstream};
use common::distribution::Distribution;
use common::metrics::Scrape;
use common::otlp::Collector;
use common::{Spawned, median};
use oci_upstream::pb::FetchManifestRequest;
use oci_upstream::pb::upstream_service_client::UpstreamServiceClient;
use serde_json::json;
use tonic::transport::Channel;

const MIB: u64 = 1024 * 1024;
const REPO: &str = "bench/app";

struct Plan {
    /// Rounds of manifest calls, alternating the sides round by round.
    rounds: usize,
    /// Calls per side and round.
    calls: usize,
    /// Warm blob fetches per side, alternating.
    runs: usize,
    blob: u64,
}

impl Plan {
    fn from_env() -> Plan {
        let number = |key: &str| std::env::var(key).ok().and_then(|r| r.parse().ok());
        let mut plan = Plan::defaults();
        plan.runs = number("BENCH_RUNS").unwrap_or(plan.runs);
        plan.rounds = number("BENCH_ROUNDS").unwrap_or(plan.rounds);
        plan
    }

    fn defaults() -> Plan {
        if common::bench_quick() {
            Plan {
                rounds: 2,
                calls: 50,
                runs: 1,
                blob: 8 * MIB,
            }
        } else {
            Plan {
                rounds: 40,
                calls: 500,
                runs: 5,
                blob: 256 * MIB,
            }
        }
    }
}

/// One service and what it measured.
struct Side {
    name: &'static str,
    service: Spawned,
    client: UpstreamServiceClient<Channel>,
    p50: Vec<Duration>,
    p99: Vec<Duration>,
    /// Service CPU of all its FetchManifest rounds, seconds.
    cpu: f64,
    rate: Vec<f64>,
}

#[tokio::main]
async fn main() {
    let plan = Plan::from_env();
    let registry = Distribution::start();
    registry.push_image(REPO, "v1").await;
    let blob = registry.push_big_blob(REPO, 0x7E1E, plan.blob).await;
    let collector = Collector::start().await;
    let upstream = || Upstream::new("registry", &registry.url());
    // The tag stays fresh for the whole run: every call is a cache hit.
    let off = ServiceConfig::with(upstream())
        .top("metrics_listen = \"\"")
        .cache("tag_ttl = \"1h\"")
        .toml();
    // BENCH_ON (a comma list of metrics, logs, traces; default all) picks
    // what the "on" side turns on, to tell the parts' costs apart.
    let parts = std::env::var("BENCH_ON").unwrap_or_else(|_| "metrics,logs,traces".into());
    let part = |name: &str| parts.split(',').any(|p| p.trim() == name);
    let mut on = ServiceConfig::with(upstream()).cache("tag_ttl = \"1h\"");
    if !part("metrics") {
        on = on.top("metrics_listen = \"\"");
    }
    if part("traces") {
        on = on.top(&format!("otlp_endpoint = \"{}\"", collector.url()));
    }
    let on_log = if part("logs") {
        on = on.top("log_format = \"json\"");
        "info"
    } else {
        "oci_upstream::app=info"
    };
    let on = on.toml();
    let mut sides = Vec::new();
    for (name, toml, env) in [
        // Only the start-up lines (the harness reads the address from them).
        (
            "off",
            off,
            [
                ("RUST_LOG", "oci_upstream::app=info"),
                ("OTEL_BSP_SCHEDULE_DELAY", "1000"),
            ],
        ),
        (
            "on",
            on,
            [("RUST_LOG", on_log), ("OTEL_BSP_SCHEDULE_DELAY", "1000")],
        ),
    ] {
        let service = Spawned::start_with_env(&toml, &env);
        let mut client = service.client().await;
        // Prime: the manifest and the blob in the cache.
        fetch_manifest(&mut client).await;
        assert_eq!(
            clients::grpc_fetch_blob(&mut client, REPO, &blob.digest, false)
                .await
                .bytes,
            plan.blob
        );
        sides.push(Side {
            name,
            service,
            client,
            p50: Vec::new(),
            p99: Vec::new(),
            cpu: 0.0,
            rate: Vec::new(),
        });
    }

    // Fine-grained alternation: drift of the machine (other load, clock
    // speed) falls on both sides alike.
    for round in 0..plan.rounds {
        for i in if round % 2 == 0 { [0, 1] } else { [1, 0] } {
            let side = &mut sides[i];
            let mut latencies = Vec::with_capacity(plan.calls);
            let cpu = clients::cpu_seconds(side.service.pid());
            for _ in 0..plan.calls {
                let started = Instant::now();
                fetch_manifest(&mut side.client).await;
                latencies.push(started.elapsed());
            }
            side.cpu += clients::cpu_seconds(side.service.pid()) - cpu;
            latencies.sort();
            side.p50.push(latencies[latencies.len() / 2]);
            side.p99.push(latencies[latencies.len() * 99 / 100]);
        }
    }
    for run in 0..plan.runs {
        for i in if run % 2 == 0 { [0, 1] } else { [1, 0] } {
            let side = &mut sides[i];
            let started = Instant::now();
            let bytes = clients::grpc_fetch_blob(&mut side.client, REPO, &blob.digest, false)
                .await
                .bytes;
            assert_eq!(bytes, plan.blob, "warm FetchBlob length ({})", side.name);
            side.rate
                .push(bytes as f64 / 1e6 / started.elapsed().as_secs_f64());
        }
    }

    // The "on" side really had its telemetry on.
    let on_side = &sides[1];
    if part("metrics") {
        let scrape = Scrape::of(on_side.service.metrics_addr.expect("metrics on")).await;
        let counted = scrape.value(
            "grpc_server_handled_total",
            &[("grpc_method", "FetchManifest"), ("grpc_code", "OK")],
        );
        assert!(
            counted >= (plan.rounds * plan.calls) as f64,
            "the gRPC metrics counted {counted} FetchManifest calls"
        );
    }
    if part("traces") {
        assert!(
            collector.wait_for(|s| s.name() == "rpc").await.is_some(),
            "no RPC span reached the collector"
        );
    }
    assert!(sides[0].service.metrics_addr.is_none());

    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let (off_side, on_side) = (&sides[0], &sides[1]);
    let p50 = (ms(median(&off_side.p50)), ms(median(&on_side.p50)));
    let p99 = (ms(median(&off_side.p99)), ms(median(&on_side.p99)));
    let rate = (median(&off_side.rate), median(&on_side.rate));
    let per_call = |cpu: f64| cpu * 1e6 / (plan.rounds * plan.calls) as f64;
    let cpu = (per_call(off_side.cpu), per_call(on_side.cpu));
    println!(
        "telemetry benchmark: {} round(s) of {} warm FetchManifest calls (p50, p99: medians of the rounds'; CPU: per call over all) and {} warm {} MiB FetchBlob(s) (median), per side",
        plan.rounds,
        plan.calls,
        plan.runs,
        plan.blob / MIB
    );
    println!(
        "  FetchManifest p50   off {:>7.3} ms   on {:>7.3} ms   on/off {:.3}",
        p50.0,
        p50.1,
        p50.1 / p50.0
    );
    println!(
        "  FetchManifest p99   off {:>7.3} ms   on {:>7.3} ms   on/off {:.3}",
        p99.0,
        p99.1,
        p99.1 / p99.0
    );
    println!(
        "  FetchManifest CPU   off {:>7.1} µs   on {:>7.1} µs   on/off {:.3}  (service CPU per call)",
        cpu.0,
        cpu.1,
        cpu.1 / cpu.0
    );
    println!(
        "  FetchBlob           off {:>7.1} MB/s on {:>7.1} MB/s on/off {:.3}",
        rate.0,
        rate.1,
        rate.1 / rate.0
    );
    let met = p50.1 / p50.0 <= 1.05 && rate.1 / rate.0 >= 0.95;
    println!(
        "  goal (p50 ratio <= 1.05, throughput ratio >= 0.95): {}",
        if met { "met" } else { "NOT met" }
    );
    let report = json!({
        "quick": common::bench_quick(),
        "on": parts,
        "rounds": plan.rounds,
        "calls_per_round": plan.calls,
        "blob_runs": plan.runs,
        "blob_bytes": plan.blob,
        "fetch_manifest_p50_ms": {"off": p50.0, "on": p50.1, "ratio": p50.1 / p50.0},
        "fetch_manifest_p99_ms": {"off": p99.0, "on": p99.1, "ratio": p99.1 / p99.0},
        "fetch_manifest_cpu_us": {"off": cpu.0, "on": cpu.1, "ratio": cpu.1 / cpu.0},
        "fetch_blob_mb_s": {"off": rate.0, "on": rate.1, "ratio": rate.1 / rate.0},
        "goal_met": met,
    });
    let out = std::env::var("BENCH_OUT").map_or_else(|_| default_out(), PathBuf::from);
    std::fs::write(&out, serde_json::to_vec_pretty(&report).expect("JSON"))
        .unwrap_or_else(|e| panic!("write {}: {e}", out.display()));
    println!("wrote {}", out.display());
}

/// `target/bench-telemetry.json` beside the target directory of this
/// executable.
fn default_out() -> PathBuf {
    let exe = std::env::current_exe().expect("the benchmark's path");
    exe.ancestors()
        .nth(3)
        .map_or_else(|| PathBuf::from("."), PathBuf::from)
        .join("bench-telemetry.json")
}

async fn fetch_manifest(client: &mut UpstreamServiceClient<Channel>) {
    let answer = client
        .fetch_manifest(FetchManifestRequest {
            repository: REPO.into(),
            reference: "v1".into(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|s| panic!("FetchManifest: {s}"))
        .into_inner();
    assert!(!answer.manifest.is_empty(), "a manifest");
}
