//! Soak of the real `oci-upstream` binary against two upstreams that fail at
//! random: for `SOAK_SECS` seconds (default 10; the test stops by itself),
//! 32 concurrent callers mix FetchManifest (by digest and by tag), FetchBlob
//! (whole and ranges) and HeadBlob over an ever-growing pool of distinct
//! contents, while both upstreams (the hand-written server of
//! `common::faulty`) answer each request with a random act: correct content
//! most of the time, otherwise 5xx, 429, connections closed or reset before
//! an answer, resets, short bodies and stalls mid-body, hangs,
//! slow-but-acceptable trickles, delayed headers and Range requests answered
//! with the whole body.
//!
//! Every OK answer must be byte-correct (compared with the content the
//! upstreams serve; the FetchBlob reader also checks each message's framing),
//! every error must carry an allowed code, no call may hang, both upstreams
//! must still be asked in the last quarter of the run (a circuit that opens
//! closes again), and the service's RSS and open file descriptors at the end
//! must stay within a small margin of their level after the warm-up (the
//! first quarter of the run).
//!
//! `cargo test` runs the short form. The long form, before a release or
//! after touching the engine's failure paths:
//!
//! ```sh
//! SOAK_SECS=600 cargo test --test it soak:: -- --nocapture
//! ```
//!
//! `SOAK_SEED` replays the random choices of an earlier run (each run prints
//! its seed).

use crate::common;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::Spawned;
use common::config::{ServiceConfig, Upstream};
use common::content::{OCI_MANIFEST, image_manifest, random_blob, sha256_digest};
use common::faulty::{Act, Cut, FaultyServer, Resource, blob_path, manifest_path};
use common::rpc::{BlobStream, Client};
use oci_upstream::pb::{FetchBlobRequest, FetchManifestRequest, HeadBlobRequest};
use tonic::Code;

const REPO: &str = "soak/app";
const CALLERS: usize = 32;
/// gRPC connections the callers share.
const CHANNELS: usize = 4;
/// The short form `cargo test` runs; `SOAK_SECS` sets another length.
const DEFAULT_SOAK_SECS: u64 = 10;
/// No single call may take longer than this (the slowest fault, a trickle,
/// ends within a few seconds; retries and resumes add a few timeouts).
const CALL_GUARD: Duration = Duration::from_secs(60);
/// Codes a caller may see when upstreams fail.
const ALLOWED: [Code; 5] = [
    Code::Unavailable,
    Code::DataLoss,
    Code::ResourceExhausted,
    Code::DeadlineExceeded,
    Code::NotFound,
];
/// Margins for the end-of-run resources against their warm-up level.
const RSS_FACTOR: f64 = 1.5;
const RSS_MARGIN_KIB: u64 = 16 * 1024;
const FD_MARGIN: usize = 16;

fn soak_duration() -> Duration {
    let secs = std::env::var("SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_SOAK_SECS);
    Duration::from_secs(secs)
}

// ---------------------------------------------------------------------------
// Content: generated from a seed, so the pool can grow without holding bytes.

#[derive(Clone, Copy, Debug)]
enum Kind {
    Blob,
    Manifest,
}

#[derive(Clone, Copy, Debug)]
struct Item {
    kind: Kind,
    seed: u64,
    len: usize,
}

/// An OCI image manifest unique to `seed`.
fn manifest_content(seed: u64) -> Bytes {
    image_manifest(&format!("soak {seed}"), 1)
}

fn content(item: Item) -> Bytes {
    match item.kind {
        Kind::Blob => random_blob(item.seed, item.len),
        Kind::Manifest => manifest_content(item.seed),
    }
}

/// Everything both upstreams serve: request path → item; plus the lists
/// callers draw known items from.
#[derive(Default)]
struct Catalog {
    by_path: HashMap<String, Item>,
    blobs: Vec<(String, Item)>,
    manifests: Vec<(String, Item)>,
}

type SharedCatalog = Arc<Mutex<Catalog>>;

/// Adds a new item; returns its digest.
fn register(catalog: &SharedCatalog, item: Item) -> String {
    let digest = sha256_digest(&content(item));
    let mut catalog = catalog.lock().expect("catalog lock");
    match item.kind {
        Kind::Blob => {
            catalog.by_path.insert(blob_path(REPO, &digest), item);
            catalog.blobs.push((digest.clone(), item));
        }
        Kind::Manifest => {
            catalog.by_path.insert(manifest_path(REPO, &digest), item);
            catalog
                .by_path
                .insert(manifest_path(REPO, &tag_of(item.seed)), item);
            catalog.manifests.push((digest.clone(), item));
        }
    }
    digest
}

fn tag_of(seed: u64) -> String {
    format!("t{seed}")
}

fn resource_for(catalog: &SharedCatalog, path: &str) -> Option<Resource> {
    let item = *catalog.lock().expect("catalog lock").by_path.get(path)?;
    Some(match item.kind {
        Kind::Blob => Resource::blob(content(item)),
        Kind::Manifest => Resource::manifest(OCI_MANIFEST, content(item)),
    })
}

// ---------------------------------------------------------------------------
// Random upstream behaviour

/// One act at random: mostly correct content, otherwise a fault. Weights
/// are percentages.
fn random_act(rng: &mut fastrand::Rng) -> Act {
    let cut = Cut::Percent(rng.u64(1..100));
    match rng.u32(0..100) {
        0..=54 => Act::Serve,
        55..=62 => Act::status(503),
        63..=66 => Act::status(502),
        67..=69 => Act::status(504),
        70..=71 => Act::status(429),
        72 => Act::status_with(429, &[("Retry-After", "1")]),
        73..=76 => Act::Reset,
        77..=79 => Act::Close,
        80..=85 => Act::ResetAfter(cut),
        86..=89 => Act::ShortAfter(cut),
        90..=92 => Act::StallAfter(cut),
        93 => Act::Hang,
        // Slow but above min_rate (64 KiB/s).
        94..=96 => Act::Trickle {
            fast: Cut::Bytes(0),
            bytes: 16 * 1024,
            every: Duration::from_millis(50),
        },
        97..=98 => Act::IgnoreRange,
        _ => Act::Delay(Duration::from_millis(300)),
    }
}

async fn upstream(catalog: &SharedCatalog, seed: u64) -> FaultyServer {
    let server = FaultyServer::start().await;
    let resolve = catalog.clone();
    server.resolve_with(move |path| resource_for(&resolve, path));
    let rng = Mutex::new(fastrand::Rng::with_seed(seed));
    server.pick_all(move |_| random_act(&mut rng.lock().expect("rng lock")));
    server
}

fn upstream_config(name: &str, url: &str, priority: u32) -> Upstream {
    Upstream::new(name, url)
        .priority(priority)
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(1))
        .retries(2)
        .retry_max_delay(Duration::from_secs(1))
        .circuit(5, Duration::from_secs(2))
}

// ---------------------------------------------------------------------------
// Callers

#[derive(Default)]
struct Tally {
    /// (operation, outcome) → count; outcome is "OK" or a code name.
    outcomes: BTreeMap<(&'static str, String), usize>,
    /// What went wrong, for the failure message.
    failures: Vec<String>,
}

impl Tally {
    fn ok(&mut self, op: &'static str) {
        *self.outcomes.entry((op, "OK".to_string())).or_insert(0) += 1;
    }

    fn error(&mut self, op: &'static str, status: &tonic::Status, what: &str) {
        *self
            .outcomes
            .entry((op, format!("{:?}", status.code())))
            .or_insert(0) += 1;
        if !ALLOWED.contains(&status.code()) {
            self.fail(format!("{op} {what}: code not allowed: {status:?}"));
        }
    }

    fn fail(&mut self, failure: String) {
        if self.failures.len() < 50 {
            self.failures.push(failure);
        } else if self.failures.len() == 50 {
            self.failures.push("(more failures left out)".to_string());
        }
    }

    fn merge(&mut self, other: Tally) {
        for (key, n) in other.outcomes {
            *self.outcomes.entry(key).or_insert(0) += n;
        }
        for failure in other.failures {
            self.fail(failure);
        }
    }

    fn count(&self, op: &str, outcome: &str) -> usize {
        self.outcomes
            .iter()
            .filter(|((o, c), _)| *o == op && c == outcome)
            .map(|(_, n)| n)
            .sum()
    }
}

/// A known item of `kind`, or a new one (30% of the time, or when none).
fn pick_item(catalog: &SharedCatalog, rng: &mut fastrand::Rng, kind: Kind) -> (String, Item) {
    {
        let catalog = catalog.lock().expect("catalog lock");
        let known = match kind {
            Kind::Blob => &catalog.blobs,
            Kind::Manifest => &catalog.manifests,
        };
        if !known.is_empty() && rng.u32(0..100) >= 30 {
            return known[rng.usize(0..known.len())].clone();
        }
    }
    let item = Item {
        kind,
        seed: rng.u64(..),
        len: match rng.u32(0..100) {
            0..=4 => rng.usize(256 * 1024..=768 * 1024),
            5..=29 => rng.usize(64 * 1024..256 * 1024),
            _ => rng.usize(1..64 * 1024),
        },
    };
    (register(catalog, item), item)
}

async fn one_call(
    client: &mut Client,
    catalog: &SharedCatalog,
    rng: &mut fastrand::Rng,
    tally: &mut Tally,
) {
    match rng.u32(0..100) {
        0..=44 => {
            let (digest, item) = pick_item(catalog, rng, Kind::Blob);
            let whole = content(item);
            let (offset, length) = if rng.u32(0..100) < 20 {
                let offset = rng.usize(0..=item.len);
                (offset, rng.usize(0..=item.len - offset))
            } else {
                (0, 0)
            };
            let end = if length == 0 {
                item.len
            } else {
                offset + length
            };
            let what = format!("{digest} [{offset}, {end}) of {}", item.len);
            let request = FetchBlobRequest {
                repository: REPO.to_string(),
                digest: digest.clone(),
                offset: offset as i64,
                length: length as i64,
                ..Default::default()
            };
            // The reader asserts the framing (each message's offset the
            // position of its first byte) as it reads.
            let read = match BlobStream::open(client, request).await {
                Ok(stream) => stream.finish().await,
                Err(status) => return tally.error("FetchBlob", &status, &what),
            };
            if let Err(status) = &read.end {
                return tally.error("FetchBlob", status, &what);
            }
            let (info, data) = (read.info, read.data);
            let info_ok = info
                .as_ref()
                .is_some_and(|i| i.digest == digest && i.size == item.len as i64);
            if !info_ok {
                tally.fail(format!("FetchBlob {what}: wrong info {info:?}"));
            } else if data[..] != whole[offset..end] {
                tally.fail(format!(
                    "FetchBlob {what}: OK with wrong bytes ({} bytes, digest {})",
                    data.len(),
                    sha256_digest(&data)
                ));
            } else {
                tally.ok("FetchBlob");
            }
        }
        45..=74 => {
            let (digest, item) = pick_item(catalog, rng, Kind::Manifest);
            let by_tag = rng.bool();
            let reference = if by_tag {
                tag_of(item.seed)
            } else {
                digest.clone()
            };
            let request = FetchManifestRequest {
                repository: REPO.to_string(),
                reference: reference.clone(),
                ..Default::default()
            };
            match client.fetch_manifest(request).await {
                Ok(response) => {
                    let response = response.into_inner();
                    if response.manifest != content(item) || response.digest != digest {
                        tally.fail(format!(
                            "FetchManifest {reference}: OK with wrong bytes or digest {}",
                            response.digest
                        ));
                    } else {
                        tally.ok("FetchManifest");
                    }
                }
                Err(status) => tally.error("FetchManifest", &status, &reference),
            }
        }
        _ => {
            let (digest, item) = pick_item(catalog, rng, Kind::Blob);
            let request = HeadBlobRequest {
                repository: REPO.to_string(),
                digest: digest.clone(),
                ..Default::default()
            };
            match client.head_blob(request).await {
                Ok(response) => {
                    let response = response.into_inner();
                    if !response.exists
                        || response.size != item.len as i64
                        || response.digest != digest
                    {
                        tally.fail(format!("HeadBlob {digest}: wrong answer {response:?}"));
                    } else {
                        tally.ok("HeadBlob");
                    }
                }
                Err(status) => tally.error("HeadBlob", &status, &digest),
            }
        }
    }
}

async fn caller(mut client: Client, catalog: SharedCatalog, seed: u64, until: Instant) -> Tally {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut tally = Tally::default();
    while Instant::now() < until {
        let call = one_call(&mut client, &catalog, &mut rng, &mut tally);
        if tokio::time::timeout(CALL_GUARD, call).await.is_err() {
            tally.fail(format!("a call hung for more than {CALL_GUARD:?}"));
        }
    }
    tally
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_with_randomly_failing_upstreams() {
    let total = soak_duration();
    let warmup = total / 4;
    let seed = std::env::var("SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    eprintln!("soak: {total:?}, {CALLERS} callers, SOAK_SEED={seed}");

    let catalog: SharedCatalog = Arc::default();
    let first = upstream(&catalog, seed ^ 1).await;
    let second = upstream(&catalog, seed ^ 2).await;
    let config = ServiceConfig::new()
        .cache("negative_ttl = \"0s\"")
        .upstream(upstream_config("first", &first.url(), 10))
        .upstream(upstream_config("second", &second.url(), 20))
        .toml();
    // A process: its RSS and open descriptors are measured.
    let service = Spawned::start_with_env(&config, &[("RUST_LOG", "oci_upstream=info")]);
    let mut channels = Vec::new();
    for _ in 0..CHANNELS {
        channels.push(service.client().await);
    }

    let started = Instant::now();
    let until = started + total;
    let callers: Vec<_> = (0..CALLERS)
        .map(|i| {
            let client = channels[i % CHANNELS].clone();
            tokio::spawn(caller(
                client,
                catalog.clone(),
                seed.wrapping_add(1000 + i as u64),
                until,
            ))
        })
        .collect();

    // The warm-up level, read at the end of the first quarter, under load.
    tokio::time::sleep_until((started + warmup).into()).await;
    let warm_rss = service.rss_kib();
    let warm_fds = service.open_fds();

    // How far each upstream had got when the last quarter began: both must
    // still be asked after that (an upstream whose circuit never closes
    // again would not be).
    tokio::time::sleep_until((started + total - warmup).into()).await;
    let late = [first.request_count(), second.request_count()];

    let mut tally = Tally::default();
    for task in callers {
        // Callers stop starting calls at `until`; their last call is bounded
        // by CALL_GUARD.
        let caller_tally = tokio::time::timeout(total + CALL_GUARD * 2, task)
            .await
            .expect("callers stop by themselves")
            .expect("caller task");
        tally.merge(caller_tally);
    }
    let ran = started.elapsed();
    let end_rss = service.rss_kib();
    let end_fds = service.open_fds();

    let mut acts: BTreeMap<&str, usize> = BTreeMap::new();
    for server in [&first, &second] {
        for (act, n) in server.act_counts() {
            *acts.entry(act).or_insert(0) += n;
        }
    }
    let upstream_requests: usize = acts.values().sum();
    eprintln!("soak ran {ran:?}; outcomes:");
    for ((op, outcome), n) in &tally.outcomes {
        eprintln!("  {op:14} {outcome:18} {n}");
    }
    eprintln!("upstream acts ({upstream_requests} requests): {acts:?}");
    let end_counts = [first.request_count(), second.request_count()];
    eprintln!("upstream requests at the last quarter {late:?}, at the end {end_counts:?}");
    eprintln!(
        "RSS {warm_rss} KiB after warm-up, {end_rss} KiB at the end (peak {} KiB); fds {warm_fds} -> {end_fds}",
        service.peak_rss_kib()
    );

    assert!(
        tally.failures.is_empty(),
        "{} failures:\n{}",
        tally.failures.len(),
        tally.failures.join("\n")
    );
    for op in ["FetchBlob", "FetchManifest", "HeadBlob"] {
        assert!(tally.count(op, "OK") > 0, "no {op} succeeded");
    }
    if upstream_requests >= 1000 {
        for act in [
            "serve",
            "status",
            "reset",
            "close",
            "reset-after",
            "short-after",
            "stall-after",
            "trickle",
        ] {
            assert!(
                acts.get(act).copied().unwrap_or(0) > 0,
                "the soak never injected `{act}`: {acts:?}"
            );
        }
    }
    for ((name, at_late), at_end) in ["first", "second"].iter().zip(late).zip(end_counts) {
        assert!(
            at_end > at_late,
            "upstream `{name}` got no request in the last quarter of the run ({at_late} before, \
             {at_end} at the end): its circuit never closed again"
        );
    }
    let rss_limit = (warm_rss as f64 * RSS_FACTOR) as u64 + RSS_MARGIN_KIB;
    assert!(
        end_rss <= rss_limit,
        "RSS grew from {warm_rss} KiB after warm-up to {end_rss} KiB (limit {rss_limit} KiB)"
    );
    assert!(
        end_fds <= warm_fds + FD_MARGIN,
        "open fds grew from {warm_fds} after warm-up to {end_fds}"
    );
}
