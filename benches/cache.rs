//! Blob cache benchmark: throughput of a direct HTTP GET of a blob from a
//! real Distribution registry, of a cold FetchBlob through the service (a
//! fresh cache each run, so the blob crosses from the registry, is hashed,
//! written and committed), of a warm FetchBlob (served from the disk
//! store), and of a FetchBlob from the shared tier (a fresh replica with an
//! empty disk store on a bucket that holds the blob, on a real
//! S3-compatible server, moto), all measured in the same run against the
//! same registry, with the medians and their ratios printed.
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
use common::s3::S3;
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

    // The shared tier: a bucket filled by one replica, read by fresh ones.
    let s3 = S3::start("bench").await;
    let shared_config = ServiceConfig::with(Upstream::new("registry", &registry.url()))
        .shared_cache(&s3.table("bench/"))
        .toml();
    let shared_env = [env[0], S3::ENV[0], S3::ENV[1]];
    let key = format!(
        "bench/sha256/{}/data",
        blob.digest.trim_start_matches("sha256:")
    );
    {
        let filler = Spawned::start_with_env(&shared_config, &shared_env);
        let mut client = filler.client().await;
        fetch_blob(&mut client, &blob.digest, false).await;
        let deadline = Instant::now() + Duration::from_secs(120);
        while !s3
            .objects("bench/")
            .await
            .iter()
            .any(|o| o.key == key && o.size == plan.size)
        {
            assert!(
                Instant::now() < deadline,
                "the blob never reached the bucket"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    let (mut direct, mut cold, mut warm, mut shared, mut bucket) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for run in 0..plan.runs {
        direct.push(direct_get(&http, &url, plan.size).await);
        bucket.push(timed_get(s3.get_request(&key), plan.size).await);

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

        let replica = Spawned::start_with_env(&shared_config, &shared_env);
        let mut client = replica.client().await;
        let started = Instant::now();
        let (bytes, digest) = fetch_blob(&mut client, &blob.digest, run == 0).await;
        shared.push(started.elapsed());
        assert_eq!(bytes, plan.size, "shared-tier FetchBlob length");
        assert!(
            run > 0 || digest == blob.digest,
            "shared-tier FetchBlob sha256"
        );
        let scrape = common::metrics::Scrape::of(replica.metrics_addr.expect("metrics")).await;
        assert_eq!(
            scrape.value(
                "oci_upstream_registry_requests_total",
                &[("operation", "blob")]
            ),
            0.0,
            "a shared-tier read asks no upstream"
        );
    }

    let size_mb = plan.size as f64 / 1e6;
    let rate = |d: Duration| size_mb / d.as_secs_f64();
    println!(
        "cache benchmark: one {} MiB blob, {} run(s) each, medians (MB = 10^6 bytes)",
        plan.size / MIB,
        plan.runs
    );
    let (direct_m, cold_m, warm_m, shared_m, bucket_m) = (
        median(&direct),
        median(&cold),
        median(&warm),
        median(&shared),
        median(&bucket),
    );
    for (name, runs, m) in [
        ("direct HTTP GET (registry)", &direct, direct_m),
        ("direct HTTP GET (bucket, moto)", &bucket, bucket_m),
        ("cold FetchBlob (fresh cache)", &cold, cold_m),
        ("warm FetchBlob (cache hit)", &warm, warm_m),
        ("FetchBlob from S3 tier (moto)", &shared, shared_m),
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
    println!(
        "  shared tier (empty disk store, blob in the bucket): s3/direct {:.2}, s3/warm-disk {:.2}, s3/bucket-GET {:.2}",
        rate(shared_m) / rate(direct_m),
        rate(shared_m) / rate(warm_m),
        rate(shared_m) / rate(bucket_m),
    );
}

/// GETs the blob straight from the registry, streaming and discarding it;
/// returns how long it took to the last byte.
async fn direct_get(http: &reqwest::Client, url: &str, size: u64) -> Duration {
    timed_get(http.get(url), size).await
}

/// Sends `request`, streaming and discarding the body; returns how long it
/// took to the last byte.
async fn timed_get(request: reqwest::RequestBuilder, size: u64) -> Duration {
    let started = Instant::now();
    let mut response = request.send().await.expect("GET the blob");
    assert!(
        response.status().is_success(),
        "GET {}: {}",
        response.url(),
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
