//! Blob cache benchmark: throughput of a direct HTTP GET of a blob from a
//! real Distribution registry, of a cold FetchBlob through the service (a
//! fresh cache each run, so the blob crosses from the registry, is hashed,
//! written and committed), and of a warm FetchBlob (served from the disk
//! store), all measured in the same run against the same registry, with the
//! medians and their ratios printed.
//!
//! `cargo bench --bench cache` moves a 256 MiB blob, 5 runs of each;
//! `BENCH_QUICK=1`, or a run by `cargo test` (which, unlike `cargo bench`,
//! passes no `--bench` flag), moves 16 MiB once, so CI runs it every time and
//! it cannot rot.
//! Every transfer is checked for its length (and the first warm one for its
//! sha256) so a broken service cannot post a good figure.

#![allow(
    clippy::disallowed_types,
    reason = "benchmarks measure wall-clock time with std::time::Instant"
)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::config::{ServiceConfig, Upstream};
use common::distribution::Distribution;
use common::{Spawned, median};
use oci_upstream::pb::FetchBlobRequest;
use oci_upstream::pb::upstream_service_client::UpstreamServiceClient;
use sha2::{Digest as _, Sha256};
use tonic::transport::Channel;

const MIB: u64 = 1024 * 1024;
const REPO: &str = "bench/blob";

/// What one benchmark run moves, and how often.
struct Plan {
    size: u64,
    runs: usize,
}

impl Plan {
    fn from_env() -> Plan {
        let quick = common::bench_quick();
        if quick {
            Plan {
                size: 16 * MIB,
                runs: 1,
            }
        } else {
            Plan {
                size: 256 * MIB,
                runs: 5,
            }
        }
    }
}

#[tokio::main]
async fn main() {
    run(Plan::from_env()).await;
}

async fn run(plan: Plan) {
    let registry = Distribution::start();
    let blob = registry.push_big_blob(REPO, 0xBE9C, plan.size).await;
    let url = format!("{}/v2/{REPO}/blobs/{}", registry.url(), blob.digest);
    let config = ServiceConfig::with(Upstream::new("registry", &registry.url())).toml();
    // Less logging than the test default, which logs every call at debug.
    let env = [("RUST_LOG", "oci_upstream::app=info,warn")];
    let http = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("a plain reqwest client builds");

    // Warm the registry's side (its file in the page cache, connections) so
    // every measured transfer starts from the same state.
    direct_get(&http, &url, plan.size).await;

    let warm_service = Spawned::start_with_env(&config, &env);
    let mut warm_client = warm_service.client().await;
    let (bytes, digest) = fetch_blob(&mut warm_client, &blob.digest, true).await;
    assert_eq!(bytes, plan.size, "priming FetchBlob length");
    assert_eq!(digest, blob.digest, "priming FetchBlob sha256");

    let (mut direct, mut cold, mut warm) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..plan.runs {
        direct.push(direct_get(&http, &url, plan.size).await);

        let cold_service = Spawned::start_with_env(&config, &env);
        let mut client = cold_service.client().await;
        let started = Instant::now();
        let (bytes, _) = fetch_blob(&mut client, &blob.digest, false).await;
        cold.push(started.elapsed());
        assert_eq!(bytes, plan.size, "cold FetchBlob length");
        drop(client);
        drop(cold_service);

        let started = Instant::now();
        let (bytes, _) = fetch_blob(&mut warm_client, &blob.digest, false).await;
        warm.push(started.elapsed());
        assert_eq!(bytes, plan.size, "warm FetchBlob length");
    }

    let size_mb = plan.size as f64 / 1e6;
    let rate = |d: Duration| size_mb / d.as_secs_f64();
    println!(
        "cache benchmark: one {} MiB blob, {} run(s) each, medians (MB = 10^6 bytes)",
        plan.size / MIB,
        plan.runs
    );
    let (direct_m, cold_m, warm_m) = (median(&direct), median(&cold), median(&warm));
    for (name, runs, m) in [
        ("direct HTTP GET (registry)", &direct, direct_m),
        ("cold FetchBlob (fresh cache)", &cold, cold_m),
        ("warm FetchBlob (cache hit)", &warm, warm_m),
    ] {
        let all: Vec<String> = runs.iter().map(|d| format!("{:.0}", rate(*d))).collect();
        println!(
            "  {name:<30} {:>8.1} MB/s  median {:>7.3} s  runs MB/s [{}]",
            rate(m),
            m.as_secs_f64(),
            all.join(", ")
        );
    }
    println!(
        "  throughput ratios: cold/direct {:.2}, warm/direct {:.2}, warm/cold {:.2}",
        rate(cold_m) / rate(direct_m),
        rate(warm_m) / rate(direct_m),
        rate(warm_m) / rate(cold_m),
    );
}

/// GETs the blob straight from the registry, streaming and discarding it;
/// returns how long it took to the last byte.
async fn direct_get(http: &reqwest::Client, url: &str, size: u64) -> Duration {
    let started = Instant::now();
    let mut response = http.get(url).send().await.expect("GET the blob");
    assert!(
        response.status().is_success(),
        "GET {url}: {}",
        response.status()
    );
    let mut bytes = 0u64;
    while let Some(chunk) = response.chunk().await.expect("read the blob body") {
        bytes += chunk.len() as u64;
    }
    let elapsed = started.elapsed();
    assert_eq!(bytes, size, "direct GET length");
    elapsed
}

/// FetchBlob of the whole blob, discarding the bytes (hashing them when
/// `hash`); returns the byte count and, when hashed, the sha256 digest.
async fn fetch_blob(
    client: &mut UpstreamServiceClient<Channel>,
    digest: &str,
    hash: bool,
) -> (u64, String) {
    let mut stream = client
        .fetch_blob(FetchBlobRequest {
            repository: REPO.into(),
            digest: digest.into(),
            ..Default::default()
        })
        .await
        .expect("FetchBlob")
        .into_inner();
    let mut hasher = Sha256::new();
    let mut bytes = 0u64;
    while let Some(msg) = stream.message().await.expect("FetchBlob stream") {
        bytes += msg.data.len() as u64;
        if hash {
            hasher.update(&msg.data);
        }
    }
    (bytes, format!("sha256:{}", hex::encode(hasher.finalize())))
}
