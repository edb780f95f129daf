//! End-to-end benchmark: oci-upstream against the alternatives,
//! measured side by side in one run on one machine.
//!
//! It starts a real CNCF Distribution registry as the upstream and fills it
//! with generated content (incompressible layers of 1 MiB, 256 MiB and
//! 1 GiB, a config, an OCI image manifest naming them, and 1,000 tags of that
//! manifest); a second Distribution in proxy mode (`proxy: remoteurl:`) in
//! front of it, the pull-through cache platform teams would otherwise run;
//! oci-upstream (the release binary `cargo bench` builds) in front of it; and
//! in-process, a bare tonic server streaming the blob from memory, the
//! transport ceiling. Then it measures:
//!
//! 1. blob throughput (MB = 10^6 bytes/s): direct GET from the upstream,
//!    GET through the proxy registry cold (a fresh proxy on fresh storage
//!    each run) and warm, the bare gRPC stream, FetchBlob cold (a fresh
//!    service on a fresh cache dir each run) and warm; with the peak RSS of
//!    the serving process and the upstream GETs each pull caused;
//! 2. concurrent cold pulls of one blob (8 and 64 callers, each on its own
//!    connection): upstream GETs, time to last byte, peak RSS;
//! 3. manifest requests/s and p50/p99 latency by tag at 1, 32 and 128
//!    concurrent callers: direct, proxy registry (warm), FetchManifest and
//!    HeadManifest (warm; tonic clients over 4 channels); with the upstream
//!    manifest requests they caused;
//! 4. RSS growth of the serving process while 16 warm streams of one blob
//!    run at once.
//!
//! Upstream requests are counted from the upstream registry's access log.
//! Every Distribution runs with the in-memory blob descriptor cache of the
//! packaged config and its access log on (the default); the bare server runs
//! in this process on a runtime of its own; every process shares the machine,
//! so its load average is printed at the start and end.
//! Each figure is the median with min–max over `BENCH_RUNS` runs (default 5),
//! printed as one table with its ratio to the direct baseline of its group,
//! followed by the performance targets, and written as JSON to
//! `target/bench-e2e.json` (or `BENCH_OUT`).
//!
//! `cargo bench --bench e2e` runs it in full (several minutes);
//! `BENCH_QUICK=1 cargo bench --bench e2e` runs small sizes (1 MiB, 16 MiB),
//! one run, 50 tags, short manifest loads and 8 callers; so does a run by
//! `cargo test`, which is how CI keeps it from rotting.
//! Other knobs: `BENCH_GROUPS` (comma list of `blob,pulls,manifests,memory`),
//! `BENCH_MANIFEST_SECS`, `BENCH_GRPC_CHANNELS`, `BENCH_BARE_CHUNK_KIB`,
//! `BENCH_TAG_TTL` (the service's `cache.tag_ttl`, e.g. `1h`; by default the
//! service's own default, so tag entries primed at once go stale at once
//! during a long manifest group and are refreshed from the upstream), and
//! the tonic client windows `BENCH_H2_STREAM_WINDOW`, `BENCH_H2_CONN_WINDOW`,
//! `BENCH_H2_ADAPTIVE=1` (applied to the baseline and the service alike).

#![allow(
    clippy::disallowed_types,
    reason = "benchmarks measure wall-clock time with std::time::Instant"
)]

#[path = "../tests/common/mod.rs"]
mod common;

#[path = "common_bench/bare.rs"]
mod bare;
#[path = "common_bench/clients.rs"]
mod clients;
#[path = "common_bench/report.rs"]
mod report;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt as _;
use oci_upstream::pb::upstream_service_client::UpstreamServiceClient;
use oci_upstream::pb::{FetchManifestRequest, HeadManifestRequest};
use serde_json::json;
use tonic::transport::Channel;

use bare::BareServer;
use clients::{H2Settings, Pulled, bounded, grpc_fetch_blob, http_get_blob};
use common::Spawned;
use common::config::{ServiceConfig, Upstream};
use common::content::{Descriptor, OCI_CONFIG, OCI_LAYER, OCI_MANIFEST, manifest_json};
use common::distribution::{Counts, Distribution as Seeder, Mode, Process};
use report::{Better, Report, Target};

const MIB: u64 = 1 << 20;
/// The repository everything is pushed to.
const REPO: &str = "bench/image";
/// Upper bound on any single step (a transfer, a load run).
const STEP_LIMIT: Duration = Duration::from_secs(900);
/// How long the proxy registry may take to finish its background copy.
const PROXY_STORE_LIMIT: Duration = Duration::from_secs(600);
/// The service's log filter: its address line, and warnings.
const SERVICE_LOG: &str = "oci_upstream::app=info,warn";

/// What the run measures, from the environment.
struct Plan {
    quick: bool,
    runs: usize,
    sizes: Vec<u64>,
    pull_size: u64,
    callers: Vec<usize>,
    tags: usize,
    manifest_callers: Vec<usize>,
    manifest_time: Duration,
    streams: usize,
    channels: usize,
    bare_chunk: usize,
    groups: Vec<String>,
    tag_ttl: Option<String>,
    out: PathBuf,
    h2: H2Settings,
}

impl Plan {
    fn from_env() -> Plan {
        let env = |key: &str| std::env::var(key).ok().filter(|v| !v.is_empty());
        let parse = |key: &str, default: f64| -> f64 {
            env(key).map_or(default, |v| {
                v.parse()
                    .unwrap_or_else(|_| panic!("{key}={v} is not a number"))
            })
        };
        // `cargo test` runs this binary without `--bench` (unlike `cargo
        // bench`): then the quick mode, so CI exercises it every time.
        let quick = common::bench_quick();
        let runs = parse("BENCH_RUNS", if quick { 1.0 } else { 5.0 }).max(1.0) as usize;
        let groups = env("BENCH_GROUPS")
            .unwrap_or_else(|| "blob,pulls,manifests,memory".into())
            .split(',')
            .map(|g| g.trim().to_string())
            .collect();
        let out =
            env("BENCH_OUT").map_or_else(|| report::default_out("bench-e2e.json"), PathBuf::from);
        Plan {
            quick,
            runs,
            sizes: if quick {
                vec![MIB, 16 * MIB]
            } else {
                vec![MIB, 256 * MIB, 1024 * MIB]
            },
            pull_size: if quick { 16 * MIB } else { 256 * MIB },
            callers: if quick { vec![8] } else { vec![8, 64] },
            tags: if quick { 50 } else { 1000 },
            manifest_callers: vec![1, 32, 128],
            manifest_time: Duration::from_secs_f64(parse(
                "BENCH_MANIFEST_SECS",
                if quick { 0.3 } else { 2.0 },
            )),
            streams: 16,
            channels: parse("BENCH_GRPC_CHANNELS", 4.0).max(1.0) as usize,
            bare_chunk: parse("BENCH_BARE_CHUNK_KIB", 256.0).max(1.0) as usize * 1024,
            groups,
            tag_ttl: env("BENCH_TAG_TTL"),
            out,
            h2: H2Settings::from_env(),
        }
    }

    fn runs(&self, group: &str) -> bool {
        self.groups.iter().any(|g| g == group)
    }

    fn to_json(&self) -> serde_json::Value {
        json!({
            "quick": self.quick,
            "runs": self.runs,
            "blob_sizes": self.sizes,
            "pull_blob_size": self.pull_size,
            "concurrent_callers": self.callers,
            "tags": self.tags,
            "manifest_callers": self.manifest_callers,
            "manifest_seconds_per_run": self.manifest_time.as_secs_f64(),
            "memory_streams": self.streams,
            "grpc_channels_for_manifests": self.channels,
            "bare_chunk_bytes": self.bare_chunk,
            "groups": self.groups,
            "service_tag_ttl": self.tag_ttl.as_deref().unwrap_or("default"),
            "grpc_client": self.h2.to_json(),
        })
    }
}

/// `1 MiB`, `256 MiB`, `1 GiB`.
fn size_label(size: u64) -> String {
    if size >= 1024 * MIB && size % (1024 * MIB) == 0 {
        format!("{} GiB", size / (1024 * MIB))
    } else if size % MIB == 0 {
        format!("{} MiB", size / MIB)
    } else {
        format!("{size} B")
    }
}

/// A blob in the upstream.
#[derive(Clone, Debug)]
struct BlobSpec {
    size: u64,
    seed: u64,
    digest: String,
}

/// Everything set up once and shared by the groups.
struct World {
    upstream: Process,
    /// The seeding registry (stopped); keeps the upstream's storage dir.
    _seeded: Seeder,
    work: tempfile::TempDir,
    blobs: Vec<BlobSpec>,
    manifest_digest: String,
    tags: Vec<String>,
    http: reqwest::Client,
    config: String,
    next_dir: AtomicUsize,
}

impl World {
    fn blob(&self, size: u64) -> &BlobSpec {
        self.blobs
            .iter()
            .find(|b| b.size == size)
            .expect("a blob of that size was pushed")
    }

    fn upstream_blob_url(&self, blob: &BlobSpec) -> String {
        format!("{}/v2/{REPO}/blobs/{}", self.upstream.url(), blob.digest)
    }

    fn fresh_dir(&self, kind: &str) -> PathBuf {
        let n = self.next_dir.fetch_add(1, Ordering::Relaxed);
        self.work.path().join(format!("{kind}-{n}"))
    }

    /// A proxy registry on fresh storage.
    fn start_proxy(&self) -> Process {
        Process::start(&self.fresh_dir("proxy"), Mode::Proxy(self.upstream.url()))
    }

    /// oci-upstream on a fresh cache dir.
    fn start_service(&self) -> (Spawned, PathBuf) {
        let cache = self.fresh_dir("cache");
        let service = Spawned::start_with_env(
            &self.config,
            &[
                ("RUST_LOG", SERVICE_LOG),
                (
                    "OCI_UPSTREAM_CACHE_DIR",
                    cache.to_str().expect("UTF-8 path"),
                ),
            ],
        );
        (service, cache)
    }

    /// Upstream GETs of `blob` since `before`, once the log has settled.
    fn blob_gets_since(&self, before: &Counts, blob: &BlobSpec) -> u64 {
        self.upstream
            .settle(Duration::from_millis(150), Duration::from_secs(10));
        self.upstream
            .counts()
            .since(before)
            .matching("GET", &format!("/blobs/{}", blob.digest))
    }
}

/// Stops a proxy registry and deletes its storage.
fn discard_proxy(proxy: Process) {
    let root = proxy.root.clone();
    drop(proxy);
    let _ = std::fs::remove_dir_all(root);
}

/// Stops a service and deletes its cache.
fn discard_service(service: Spawned, cache: PathBuf) {
    drop(service);
    let _ = std::fs::remove_dir_all(cache);
}

#[tokio::main]
async fn main() {
    run(Plan::from_env()).await;
}

async fn run(plan: Plan) {
    let started = Instant::now();
    let machine = report::machine();
    report::print_machine(&machine);
    println!(
        "plan: {} run(s) per figure{}; blobs {}; concurrent pulls of {} by {:?} callers; \
         {} tags; manifests {:?} callers × {:.1} s; gRPC client: {}",
        plan.runs,
        if plan.quick { " (quick)" } else { "" },
        plan.sizes
            .iter()
            .map(|s| size_label(*s))
            .collect::<Vec<_>>()
            .join(", "),
        size_label(plan.pull_size),
        plan.callers,
        plan.tags,
        plan.manifest_callers,
        plan.manifest_time.as_secs_f64(),
        plan.h2.describe(),
    );

    let setup_started = Instant::now();
    let world = setup(&plan).await;
    let mut timings = vec![("setup", setup_started.elapsed())];
    eprintln!("setup took {:.1} s", setup_started.elapsed().as_secs_f64());

    let mut report = Report::default();
    // The warm service of groups 1, 3 and 4: filled on first use, then hit.
    let (warm, _warm_cache) = world.start_service();
    let mut warm_client = UpstreamServiceClient::new(clients::channel(warm.addr, &plan.h2).await);

    if plan.runs("blob") {
        let t = Instant::now();
        for &size in &plan.sizes {
            blob_throughput(&plan, &world, &warm, &mut warm_client, size, &mut report).await;
        }
        timings.push(("1. blob throughput", t.elapsed()));
    }
    if plan.runs("pulls") {
        let t = Instant::now();
        for &callers in &plan.callers {
            concurrent_pulls(&plan, &world, callers, &mut report).await;
        }
        timings.push(("2. concurrent cold pulls", t.elapsed()));
    }
    if plan.runs("manifests") {
        let t = Instant::now();
        manifests(&plan, &world, &warm, &mut report).await;
        timings.push(("3. manifests", t.elapsed()));
    }
    if plan.runs("memory") {
        let t = Instant::now();
        memory_per_stream(&plan, &world, &warm, &mut warm_client, &mut report).await;
        timings.push(("4. memory per stream", t.elapsed()));
    }

    report.print_table();
    let targets = targets(&plan, &report);
    let targets_json = report::print_targets(&targets);
    let total = started.elapsed();
    println!();
    for (name, d) in &timings {
        println!("time: {name}: {:.1} s", d.as_secs_f64());
    }
    println!("time: total {:.1} s", total.as_secs_f64());
    let load_at_end = report::loadavg();
    println!("load average at end: {load_at_end}");

    let mut out = report.to_json();
    out["machine"] = machine;
    out["machine"]["loadavg_at_end"] = json!(load_at_end);
    out["plan"] = plan.to_json();
    out["targets"] = targets_json;
    out["seconds"] = json!({
        "total": total.as_secs_f64(),
        "steps": timings
            .iter()
            .map(|(name, d)| json!({ "step": name, "seconds": d.as_secs_f64() }))
            .collect::<Vec<_>>(),
    });
    if let Some(dir) = plan.out.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    std::fs::write(
        &plan.out,
        serde_json::to_string_pretty(&out).expect("report JSON"),
    )
    .unwrap_or_else(|e| panic!("write {}: {e}", plan.out.display()));
    println!("wrote {}", plan.out.display());
}

/// Pushes the content through the harness's registry, then serves the same
/// storage from a registry process of our own (for its pid and access log).
async fn setup(plan: &Plan) -> World {
    let seeded = Seeder::start();
    let mut blobs = Vec::new();
    for (i, &size) in plan.sizes.iter().enumerate() {
        let seed = 0xE2E0 + i as u64;
        let pushed = bounded(
            "pushing a big blob",
            STEP_LIMIT,
            seeded.push_big_blob(REPO, seed, size),
        )
        .await;
        blobs.push(BlobSpec {
            size,
            seed,
            digest: pushed.digest,
        });
    }
    let config_blob = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": { "Labels": { "purpose": "oci-upstream e2e benchmark" } },
        "rootfs": { "type": "layers", "diff_ids": blobs.iter().map(|b| &b.digest).collect::<Vec<_>>() },
    }))
    .expect("config JSON");
    seeded.push_blob(REPO, &config_blob).await;
    let layers: Vec<Descriptor> = blobs
        .iter()
        .map(|b| Descriptor {
            media_type: OCI_LAYER.into(),
            digest: b.digest.clone(),
            size: usize::try_from(b.size).expect("blob sizes fit in usize"),
            platform: None,
        })
        .collect();
    let manifest = manifest_json(
        OCI_MANIFEST,
        &Descriptor::of(OCI_CONFIG, &config_blob),
        &layers,
    );
    let tags: Vec<String> = (0..plan.tags).map(|i| format!("t{i:04}")).collect();
    let manifest = seeded
        .push_manifest(REPO, &tags[0], OCI_MANIFEST, manifest)
        .await;
    futures::stream::iter(tags.iter().skip(1))
        .map(|tag| seeded.tag(REPO, tag, &manifest))
        .buffer_unordered(16)
        .collect::<Vec<()>>()
        .await;

    let mut seeded = seeded;
    seeded.stop();
    let upstream = Process::start(&seeded.dir().join("data"), Mode::Plain);
    let mut config = ServiceConfig::with(Upstream::new("upstream", &upstream.url()));
    if let Some(ttl) = &plan.tag_ttl {
        config = config.cache(&format!("tag_ttl = \"{ttl}\""));
    }
    let config = config.toml();
    World {
        upstream,
        _seeded: seeded,
        work: tempfile::tempdir().expect("a work dir"),
        blobs,
        manifest_digest: manifest.digest,
        tags,
        http: clients::http_client(),
        config,
        next_dir: AtomicUsize::new(0),
    }
}

fn check_pull(what: &str, pulled: &Pulled, blob: &BlobSpec) {
    assert_eq!(pulled.bytes, blob.size, "{what}: bytes received");
    if let Some(digest) = &pulled.digest {
        assert_eq!(digest, &blob.digest, "{what}: sha256 of the bytes received");
    }
}

fn mb_per_s(size: u64, elapsed: Duration) -> f64 {
    size as f64 / 1e6 / elapsed.as_secs_f64()
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Group 1 for one blob size.
async fn blob_throughput(
    plan: &Plan,
    world: &World,
    warm: &Spawned,
    warm_client: &mut UpstreamServiceClient<Channel>,
    size: u64,
    report: &mut Report,
) {
    let blob = world.blob(size).clone();
    let label = size_label(size);
    eprintln!("1. blob throughput, {label}");
    let url = world.upstream_blob_url(&blob);
    let http = &world.http;
    let upstream_pid = world.upstream.pid();

    // Verify every path once (hashing, untimed); this also warms the
    // upstream's page cache and connections.
    let pulled = bounded("direct GET", STEP_LIMIT, http_get_blob(http, &url, true)).await;
    check_pull("direct GET", &pulled, &blob);
    let data = Bytes::from(common::content::pseudo_random_bytes(
        blob.seed,
        usize::try_from(blob.size).expect("blob fits in memory"),
    ));
    let bare = BareServer::start(
        HashMap::from([(blob.digest.clone(), data)]),
        plan.bare_chunk,
    );
    let mut bare_client = UpstreamServiceClient::new(clients::channel(bare.addr, &plan.h2).await);
    let pulled = bounded(
        "bare FetchBlob",
        STEP_LIMIT,
        grpc_fetch_blob(&mut bare_client, REPO, &blob.digest, true),
    )
    .await;
    check_pull("bare gRPC FetchBlob", &pulled, &blob);
    {
        let proxy = world.start_proxy();
        let proxy_url = format!("{}/v2/{REPO}/blobs/{}", proxy.url(), blob.digest);
        let pulled = bounded(
            "proxy GET",
            STEP_LIMIT,
            http_get_blob(http, &proxy_url, true),
        )
        .await;
        check_pull("proxy registry GET (cold)", &pulled, &blob);
        assert!(
            proxy.wait_for_blob(&blob.digest, PROXY_STORE_LIMIT),
            "the proxy registry did not store the blob; output:\n{}",
            proxy.other_output()
        );
        discard_proxy(proxy);
    }
    let pulled = bounded(
        "FetchBlob",
        STEP_LIMIT,
        grpc_fetch_blob(warm_client, REPO, &blob.digest, true),
    )
    .await;
    check_pull(
        "oci-upstream FetchBlob (filling the warm cache)",
        &pulled,
        &blob,
    );
    let pulled = bounded(
        "FetchBlob",
        STEP_LIMIT,
        grpc_fetch_blob(warm_client, REPO, &blob.digest, true),
    )
    .await;
    check_pull("oci-upstream FetchBlob (warm)", &pulled, &blob);
    if pulled.cache_hit != Some(true) {
        report.note(format!(
            "oci-upstream's second FetchBlob of the {label} blob was not a cache hit \
             (Source.cache_hit = {:?}): its \"warm\" figures are not served from cache",
            pulled.cache_hit
        ));
    }

    let systems = [
        "direct GET (upstream registry)",
        "proxy registry GET, cold",
        "proxy registry GET, warm",
        "bare gRPC stream (in-memory)",
        "oci-upstream FetchBlob, cold",
        "oci-upstream FetchBlob, warm",
    ];
    let keys = [
        "direct",
        "proxy-cold",
        "proxy-warm",
        "bare",
        "oci-cold",
        "oci-warm",
    ];
    let mut rate: Vec<Vec<f64>> = vec![Vec::new(); systems.len()];
    let mut rss: Vec<Vec<f64>> = vec![Vec::new(); systems.len()];
    let mut gets: Vec<Vec<f64>> = vec![Vec::new(); systems.len()];
    // CPU seconds per GB: of the serving process, and of the upstream.
    let mut cpu: Vec<Vec<f64>> = vec![Vec::new(); systems.len()];
    let mut upstream_cpu: Vec<Vec<f64>> = vec![Vec::new(); systems.len()];
    let mut client_cpu: Vec<Vec<f64>> = vec![Vec::new(); systems.len()];
    let me = std::process::id();
    let per_gb = |seconds: f64| seconds / (size as f64 / 1e9);
    let mut cold_hits = 0;
    let mut warm_misses = 0;
    for run in 0..plan.runs {
        eprintln!("  run {}/{}", run + 1, plan.runs);
        // Direct.
        let before = world.upstream.counts();
        clients::reset_peak_rss(upstream_pid);
        let upstream_cpu_before = clients::cpu_seconds(upstream_pid);
        let client_before = clients::cpu_seconds(me);
        let t = Instant::now();
        let pulled = bounded("direct GET", STEP_LIMIT, http_get_blob(http, &url, false)).await;
        rate[0].push(mb_per_s(size, t.elapsed()));
        client_cpu[0].push(per_gb(clients::cpu_seconds(me) - client_before));
        let used = per_gb(clients::cpu_seconds(upstream_pid) - upstream_cpu_before);
        cpu[0].push(used);
        upstream_cpu[0].push(used);
        check_pull("direct GET", &pulled, &blob);
        rss[0].push(mib(clients::peak_rss_kib(upstream_pid)));
        gets[0].push(world.blob_gets_since(&before, &blob) as f64);

        // Bare gRPC.
        let client_before = clients::cpu_seconds(me);
        let t = Instant::now();
        let pulled = bounded(
            "bare FetchBlob",
            STEP_LIMIT,
            grpc_fetch_blob(&mut bare_client, REPO, &blob.digest, false),
        )
        .await;
        rate[3].push(mb_per_s(size, t.elapsed()));
        client_cpu[3].push(per_gb(clients::cpu_seconds(me) - client_before));
        check_pull("bare gRPC FetchBlob", &pulled, &blob);

        // Proxy registry: cold on fresh storage, then warm once its
        // background copy has landed.
        let proxy = world.start_proxy();
        let proxy_url = format!("{}/v2/{REPO}/blobs/{}", proxy.url(), blob.digest);
        let before = world.upstream.counts();
        let cpu_before = (
            clients::cpu_seconds(proxy.pid()),
            clients::cpu_seconds(upstream_pid),
        );
        let client_before = clients::cpu_seconds(me);
        let t = Instant::now();
        let pulled = bounded(
            "proxy GET",
            STEP_LIMIT,
            http_get_blob(http, &proxy_url, false),
        )
        .await;
        rate[1].push(mb_per_s(size, t.elapsed()));
        client_cpu[1].push(per_gb(clients::cpu_seconds(me) - client_before));
        check_pull("proxy registry GET (cold)", &pulled, &blob);
        assert!(
            proxy.wait_for_blob(&blob.digest, PROXY_STORE_LIMIT),
            "the proxy registry did not store the blob"
        );
        cpu[1].push(per_gb(clients::cpu_seconds(proxy.pid()) - cpu_before.0));
        upstream_cpu[1].push(per_gb(clients::cpu_seconds(upstream_pid) - cpu_before.1));
        gets[1].push(world.blob_gets_since(&before, &blob) as f64);
        if run == 0 {
            report.note(format!(
                "upstream requests for one cold GET of the {label} blob through the proxy \
                 registry: {}",
                world.upstream.counts().since(&before).summary(1.0)
            ));
        }
        rss[1].push(mib(clients::peak_rss_kib(proxy.pid())));
        let before = world.upstream.counts();
        clients::reset_peak_rss(proxy.pid());
        let cpu_before = clients::cpu_seconds(proxy.pid());
        let client_before = clients::cpu_seconds(me);
        let t = Instant::now();
        let pulled = bounded(
            "proxy GET",
            STEP_LIMIT,
            http_get_blob(http, &proxy_url, false),
        )
        .await;
        rate[2].push(mb_per_s(size, t.elapsed()));
        client_cpu[2].push(per_gb(clients::cpu_seconds(me) - client_before));
        cpu[2].push(per_gb(clients::cpu_seconds(proxy.pid()) - cpu_before));
        check_pull("proxy registry GET (warm)", &pulled, &blob);
        rss[2].push(mib(clients::peak_rss_kib(proxy.pid())));
        gets[2].push(world.blob_gets_since(&before, &blob) as f64);
        discard_proxy(proxy);

        // oci-upstream cold: a fresh service on a fresh cache.
        let (service, cache) = world.start_service();
        let mut client = UpstreamServiceClient::new(clients::channel(service.addr, &plan.h2).await);
        let before = world.upstream.counts();
        let cpu_before = (
            clients::cpu_seconds(service.pid()),
            clients::cpu_seconds(upstream_pid),
        );
        let client_before = clients::cpu_seconds(me);
        let t = Instant::now();
        let pulled = bounded(
            "FetchBlob",
            STEP_LIMIT,
            grpc_fetch_blob(&mut client, REPO, &blob.digest, false),
        )
        .await;
        rate[4].push(mb_per_s(size, t.elapsed()));
        client_cpu[4].push(per_gb(clients::cpu_seconds(me) - client_before));
        cpu[4].push(per_gb(clients::cpu_seconds(service.pid()) - cpu_before.0));
        upstream_cpu[4].push(per_gb(clients::cpu_seconds(upstream_pid) - cpu_before.1));
        check_pull("oci-upstream FetchBlob (cold)", &pulled, &blob);
        if pulled.cache_hit == Some(true) {
            cold_hits += 1;
        }
        gets[4].push(world.blob_gets_since(&before, &blob) as f64);
        if run == 0 {
            report.note(format!(
                "upstream requests for one cold FetchBlob of the {label} blob: {}",
                world.upstream.counts().since(&before).summary(1.0)
            ));
        }
        rss[4].push(mib(service.peak_rss_kib()));
        drop(client);
        discard_service(service, cache);

        // oci-upstream warm.
        let before = world.upstream.counts();
        clients::reset_peak_rss(warm.pid());
        let cpu_before = clients::cpu_seconds(warm.pid());
        let client_before = clients::cpu_seconds(me);
        let t = Instant::now();
        let pulled = bounded(
            "FetchBlob",
            STEP_LIMIT,
            grpc_fetch_blob(warm_client, REPO, &blob.digest, false),
        )
        .await;
        rate[5].push(mb_per_s(size, t.elapsed()));
        client_cpu[5].push(per_gb(clients::cpu_seconds(me) - client_before));
        cpu[5].push(per_gb(clients::cpu_seconds(warm.pid()) - cpu_before));
        check_pull("oci-upstream FetchBlob (warm)", &pulled, &blob);
        if pulled.cache_hit != Some(true) {
            warm_misses += 1;
        }
        rss[5].push(mib(warm.peak_rss_kib()));
        gets[5].push(world.blob_gets_since(&before, &blob) as f64);
    }
    drop(bare_client);
    drop(bare);
    if cold_hits > 0 {
        report.note(format!(
            "{cold_hits} cold FetchBlob(s) of the {label} blob said cache_hit = true"
        ));
    }
    if warm_misses > 0 {
        report.note(format!(
            "{warm_misses} warm FetchBlob(s) of the {label} blob said cache_hit = false"
        ));
    }

    // Rows of a group: the systems at `which`, with their samples.
    let rows = |mut values: Vec<Vec<f64>>, which: &[usize]| {
        which
            .iter()
            .map(|&i| (keys[i], systems[i], std::mem::take(&mut values[i])))
            .collect::<Vec<_>>()
    };
    let all = [0, 1, 2, 3, 4, 5];
    // The bare stream runs in this process: no RSS, CPU or upstream of its own.
    let served = [0, 1, 2, 4, 5];
    let blob_figure = |what: &str| format!("blob/{label}/{what}");
    report.add_group(
        &format!("1. blob throughput, {label} blob"),
        &blob_figure("rate"),
        "MB/s",
        Better::Higher,
        Some("direct"),
        rows(rate, &all),
    );
    report.add_group(
        &format!("1. peak RSS of the serving process during one pull, {label} blob"),
        &blob_figure("rss"),
        "MiB",
        Better::Lower,
        Some("direct"),
        rows(rss, &served),
    );
    // CPU time is counted in 10 ms ticks, too coarse for small blobs.
    if size >= CPU_MIN_SIZE {
        report.add_group(
            &format!(
                "1. CPU seconds per GB moved, serving process (upstream registry for direct), \
                 {label} blob"
            ),
            &blob_figure("cpu"),
            "CPU s/GB",
            Better::Lower,
            Some("direct"),
            rows(cpu, &served),
        );
        report.add_group(
            &format!(
                "1. CPU seconds per GB moved, the client (this process; for the bare stream \
                 also its server), {label} blob"
            ),
            &blob_figure("client-cpu"),
            "CPU s/GB",
            Better::Lower,
            Some("direct"),
            rows(client_cpu, &all),
        );
        report.add_group(
            &format!("1. CPU seconds per GB moved, upstream registry, {label} blob"),
            &blob_figure("upstream-cpu"),
            "CPU s/GB",
            Better::Lower,
            Some("direct"),
            rows(upstream_cpu, &[0, 1, 4]),
        );
    }
    report.add_group(
        &format!("1. upstream GETs of the blob per pull, {label} blob"),
        &blob_figure("gets"),
        "GETs",
        Better::Lower,
        Some("direct"),
        rows(gets, &served),
    );
}

/// Smallest blob whose pulls get CPU figures: CPU time is counted in 10 ms
/// ticks, too coarse for a pull of a few milliseconds.
const CPU_MIN_SIZE: u64 = 64 << 20;

/// Group 2 for one number of callers.
async fn concurrent_pulls(plan: &Plan, world: &World, callers: usize, report: &mut Report) {
    let blob = world.blob(plan.pull_size).clone();
    let label = size_label(blob.size);
    eprintln!("2. {callers} concurrent cold pulls of the {label} blob");
    let mut gets: [Vec<f64>; 3] = Default::default();
    let mut ttlb: [Vec<f64>; 3] = Default::default();
    let mut rss: [Vec<f64>; 3] = Default::default();
    for run in 0..plan.runs {
        eprintln!("  run {}/{}", run + 1, plan.runs);
        // Direct: every caller GETs from the upstream.
        let url = world.upstream_blob_url(&blob);
        let before = world.upstream.counts();
        clients::reset_peak_rss(world.upstream.pid());
        let elapsed = http_pulls(&url, callers, &blob).await;
        ttlb[0].push(elapsed.as_secs_f64());
        gets[0].push(world.blob_gets_since(&before, &blob) as f64);
        rss[0].push(mib(clients::peak_rss_kib(world.upstream.pid())));

        // Proxy registry on fresh storage.
        let proxy = world.start_proxy();
        let url = format!("{}/v2/{REPO}/blobs/{}", proxy.url(), blob.digest);
        let before = world.upstream.counts();
        let elapsed = http_pulls(&url, callers, &blob).await;
        ttlb[1].push(elapsed.as_secs_f64());
        assert!(
            proxy.wait_for_blob(&blob.digest, PROXY_STORE_LIMIT),
            "the proxy registry did not store the blob"
        );
        gets[1].push(world.blob_gets_since(&before, &blob) as f64);
        if run == 0 {
            report.note(format!(
                "upstream requests for {callers} concurrent cold GETs of the {label} blob \
                 through the proxy registry: {}",
                world.upstream.counts().since(&before).summary(1.0)
            ));
        }
        rss[1].push(mib(clients::peak_rss_kib(proxy.pid())));
        discard_proxy(proxy);

        // oci-upstream on a fresh cache.
        let (service, cache) = world.start_service();
        let clients = clients::clients(service.addr, &plan.h2, callers).await;
        let before = world.upstream.counts();
        let started = Instant::now();
        let pulls: Vec<_> = clients
            .into_iter()
            .map(|mut client| {
                let digest = blob.digest.clone();
                tokio::spawn(
                    async move { grpc_fetch_blob(&mut client, REPO, &digest, false).await },
                )
            })
            .collect();
        for pull in pulls {
            let pulled = bounded("concurrent FetchBlob", STEP_LIMIT, pull)
                .await
                .expect("a FetchBlob caller");
            check_pull("concurrent FetchBlob", &pulled, &blob);
        }
        ttlb[2].push(started.elapsed().as_secs_f64());
        gets[2].push(world.blob_gets_since(&before, &blob) as f64);
        if run == 0 {
            report.note(format!(
                "upstream requests for {callers} concurrent cold FetchBlobs of the {label} blob: {}",
                world.upstream.counts().since(&before).summary(1.0)
            ));
        }
        rss[2].push(mib(service.peak_rss_kib()));
        discard_service(service, cache);
    }

    let systems = [
        ("direct", "direct GETs (upstream registry)"),
        ("proxy", "proxy registry GETs, cold"),
        ("oci", "oci-upstream FetchBlob, cold"),
    ];
    for (what, unit, better, samples) in [
        ("upstream GETs", "GETs", Better::Lower, &mut gets),
        ("time to last byte", "s", Better::Lower, &mut ttlb),
        ("peak RSS", "MiB", Better::Lower, &mut rss),
    ] {
        report.add_group(
            &format!("2. {callers} concurrent cold pulls of the {label} blob: {what}"),
            &format!("pulls/{callers}/{}", what.replace(' ', "-")),
            unit,
            better,
            Some("direct"),
            systems
                .iter()
                .zip(samples.iter_mut())
                .map(|((key, name), samples)| (*key, *name, std::mem::take(samples))),
        );
    }
}

/// `callers` concurrent GETs of a blob, each on its own connection; the time
/// until the last one has its last byte.
async fn http_pulls(url: &str, callers: usize, blob: &BlobSpec) -> Duration {
    let https: Vec<reqwest::Client> = (0..callers).map(|_| clients::http_client()).collect();
    let started = Instant::now();
    let pulls: Vec<_> = https
        .into_iter()
        .map(|http| {
            let url = url.to_string();
            tokio::spawn(async move { http_get_blob(&http, &url, false).await })
        })
        .collect();
    for pull in pulls {
        let pulled = bounded("concurrent GET", STEP_LIMIT, pull)
            .await
            .expect("a GET caller");
        check_pull("concurrent GET", &pulled, blob);
    }
    started.elapsed()
}

/// One manifest request of a load run.
type Request = Arc<
    dyn Fn(u64) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> + Send + Sync,
>;

/// A registry GET of the manifest by tag.
fn http_manifest_request(base: String, tags: Arc<Vec<String>>, expect: String) -> Request {
    let http = clients::http_client();
    Arc::new(move |i| {
        let url = format!(
            "{base}/v2/{REPO}/manifests/{}",
            tags[i as usize % tags.len()]
        );
        let http = http.clone();
        let expect = expect.clone();
        Box::pin(async move {
            let response = http
                .get(&url)
                .header(reqwest::header::ACCEPT, clients::MANIFEST_ACCEPT)
                .send()
                .await
                .unwrap_or_else(|e| panic!("GET {url}: {e}"));
            assert!(
                response.status().is_success(),
                "GET {url}: {}",
                response.status()
            );
            let digest = response
                .headers()
                .get("docker-content-digest")
                .map(|v| v.to_str().unwrap_or_default().to_string());
            let body = response.bytes().await.expect("a manifest body");
            assert!(!body.is_empty(), "GET {url}: empty manifest");
            if let Some(digest) = digest {
                assert_eq!(digest, expect, "GET {url}: Docker-Content-Digest");
            }
        })
    })
}

/// FetchManifest (or HeadManifest) by tag, round-robin over `clients`.
fn grpc_manifest_request(
    clients: Vec<UpstreamServiceClient<Channel>>,
    tags: Arc<Vec<String>>,
    expect: String,
    head: bool,
) -> Request {
    Arc::new(move |i| {
        let mut client = clients[i as usize % clients.len()].clone();
        let reference = tags[i as usize % tags.len()].clone();
        let expect = expect.clone();
        Box::pin(async move {
            let digest = if head {
                let r = client
                    .head_manifest(HeadManifestRequest {
                        repository: REPO.into(),
                        reference,
                        ..Default::default()
                    })
                    .await
                    .unwrap_or_else(|s| panic!("HeadManifest: {s}"))
                    .into_inner();
                assert!(r.exists, "HeadManifest: exists");
                r.digest
            } else {
                client
                    .fetch_manifest(FetchManifestRequest {
                        repository: REPO.into(),
                        reference,
                        ..Default::default()
                    })
                    .await
                    .unwrap_or_else(|s| panic!("FetchManifest: {s}"))
                    .into_inner()
                    .digest
            };
            assert_eq!(digest, expect, "manifest digest");
        })
    })
}

/// Issues `request` once per tag, 32 at a time (to fill caches).
async fn prime(request: &Request, tags: usize) {
    futures::stream::iter(0..tags as u64)
        .map(|i| request(i))
        .buffer_unordered(32)
        .collect::<Vec<()>>()
        .await;
}

/// Group 3.
async fn manifests(plan: &Plan, world: &World, warm: &Spawned, report: &mut Report) {
    eprintln!("3. manifests by tag");
    let tags = Arc::new(world.tags.clone());
    let expect = world.manifest_digest.clone();
    let proxy = world.start_proxy();
    let mut channels = Vec::new();
    for _ in 0..plan.channels {
        channels.push(UpstreamServiceClient::new(
            clients::channel(warm.addr, &plan.h2).await,
        ));
    }
    let systems: Vec<(&str, &str, Request)> = vec![
        (
            "direct",
            "direct GET by tag (upstream registry)",
            http_manifest_request(world.upstream.url(), tags.clone(), expect.clone()),
        ),
        (
            "proxy",
            "proxy registry GET by tag, warm",
            http_manifest_request(proxy.url(), tags.clone(), expect.clone()),
        ),
        (
            "fetch",
            "oci-upstream FetchManifest by tag, warm",
            grpc_manifest_request(channels.clone(), tags.clone(), expect.clone(), false),
        ),
        (
            "head",
            "oci-upstream HeadManifest by tag, warm",
            grpc_manifest_request(channels.clone(), tags.clone(), expect.clone(), true),
        ),
    ];
    for (_, name, request) in &systems {
        bounded(name, STEP_LIMIT, prime(request, tags.len())).await;
    }
    let warmup = plan.manifest_time.min(Duration::from_millis(250));
    let mut upstream_per_1k: Vec<Vec<f64>> = vec![Vec::new(); systems.len()];
    let mut upstream_all = vec![Counts::default(); systems.len()];
    let mut calls = vec![0u64; systems.len()];
    for &callers in &plan.manifest_callers {
        eprintln!("  {callers} caller(s)");
        let mut rps: Vec<Vec<f64>> = vec![Vec::new(); systems.len()];
        let mut p50: Vec<Vec<f64>> = vec![Vec::new(); systems.len()];
        let mut p99: Vec<Vec<f64>> = vec![Vec::new(); systems.len()];
        for (_, name, request) in &systems {
            bounded(
                name,
                STEP_LIMIT,
                clients::closed_loop(callers, warmup, request.clone()),
            )
            .await;
        }
        for _ in 0..plan.runs {
            for (i, (_, name, request)) in systems.iter().enumerate() {
                world
                    .upstream
                    .settle(Duration::from_millis(50), Duration::from_secs(5));
                let before = world.upstream.counts();
                let load = bounded(
                    name,
                    STEP_LIMIT,
                    clients::closed_loop(callers, plan.manifest_time, request.clone()),
                )
                .await;
                world
                    .upstream
                    .settle(Duration::from_millis(50), Duration::from_secs(5));
                let during = world.upstream.counts().since(&before);
                let upstream = during.any_method("/manifests/");
                upstream_all[i].add(&during);
                calls[i] += load.requests;
                rps[i].push(load.rate());
                p50[i].push(report::quantile(&load.latencies_ms, 0.50));
                p99[i].push(report::quantile(&load.latencies_ms, 0.99));
                upstream_per_1k[i].push(upstream as f64 * 1000.0 / load.requests as f64);
            }
        }
        for (what, unit, better, samples) in [
            ("requests/s", "req/s", Better::Higher, &mut rps),
            ("p50 latency", "ms", Better::Lower, &mut p50),
            ("p99 latency", "ms", Better::Lower, &mut p99),
        ] {
            report.add_group(
                &format!("3. manifests by tag, {callers} concurrent caller(s): {what}"),
                &format!("manifests/{callers}/{}", what.replace(' ', "-")),
                unit,
                better,
                Some("direct"),
                systems
                    .iter()
                    .zip(samples.iter_mut())
                    .map(|((key, name, _), samples)| (*key, *name, std::mem::take(samples))),
            );
        }
    }
    for (i, (_, name, _)) in systems.iter().enumerate() {
        if upstream_all[i].total() > 0 {
            report.note(format!(
                "upstream requests per 1,000 calls of {name}: {}",
                upstream_all[i].summary(1000.0 / calls[i].max(1) as f64)
            ));
        }
    }
    report.add_group(
        "3. upstream manifest requests per 1,000 calls (every run and concurrency)",
        "manifests/upstream-per-1k",
        "req",
        Better::Lower,
        None,
        systems
            .iter()
            .zip(upstream_per_1k.iter_mut())
            .map(|((key, name, _), samples)| (*key, *name, std::mem::take(samples))),
    );
    discard_proxy(proxy);
}

/// Group 4.
async fn memory_per_stream(
    plan: &Plan,
    world: &World,
    warm: &Spawned,
    warm_client: &mut UpstreamServiceClient<Channel>,
    report: &mut Report,
) {
    let blob = world.blob(plan.pull_size).clone();
    let label = size_label(blob.size);
    let streams = plan.streams;
    eprintln!("4. RSS growth with {streams} concurrent warm streams of the {label} blob");
    // Fill the caches (a no-op when group 1 ran).
    let pulled = bounded(
        "FetchBlob",
        STEP_LIMIT,
        grpc_fetch_blob(warm_client, REPO, &blob.digest, false),
    )
    .await;
    check_pull("FetchBlob (filling the warm cache)", &pulled, &blob);
    let proxy = world.start_proxy();
    let proxy_url = format!("{}/v2/{REPO}/blobs/{}", proxy.url(), blob.digest);
    let pulled = bounded(
        "proxy GET",
        STEP_LIMIT,
        http_get_blob(&world.http, &proxy_url, false),
    )
    .await;
    check_pull("proxy registry GET", &pulled, &blob);
    assert!(
        proxy.wait_for_blob(&blob.digest, PROXY_STORE_LIMIT),
        "the proxy registry did not store the blob"
    );
    let direct_url = world.upstream_blob_url(&blob);

    let mut growth: [Vec<f64>; 3] = Default::default();
    for run in 0..plan.runs {
        eprintln!("  run {}/{}", run + 1, plan.runs);
        for (i, pid) in [world.upstream.pid(), proxy.pid(), warm.pid()]
            .into_iter()
            .enumerate()
        {
            let clients = if i == 2 {
                clients::clients(warm.addr, &plan.h2, streams).await
            } else {
                Vec::new()
            };
            let before = clients::rss_kib(pid);
            clients::reset_peak_rss(pid);
            let sampler = clients::RssSampler::start(pid);
            match i {
                0 => {
                    http_pulls(&direct_url, streams, &blob).await;
                }
                1 => {
                    http_pulls(&proxy_url, streams, &blob).await;
                }
                _ => {
                    let pulls: Vec<_> = clients
                        .into_iter()
                        .map(|mut client| {
                            let digest = blob.digest.clone();
                            tokio::spawn(async move {
                                grpc_fetch_blob(&mut client, REPO, &digest, false).await
                            })
                        })
                        .collect();
                    for pull in pulls {
                        let pulled = bounded("concurrent FetchBlob", STEP_LIMIT, pull)
                            .await
                            .expect("a FetchBlob caller");
                        check_pull("concurrent warm FetchBlob", &pulled, &blob);
                    }
                }
            }
            let peak = sampler.stop().max(clients::peak_rss_kib(pid));
            growth[i].push(mib(peak.saturating_sub(before)));
        }
    }
    discard_proxy(proxy);
    let [direct, proxy, oci] = growth;
    report.add_group(
        &format!(
            "4. RSS growth of the serving process with {streams} concurrent warm streams of the \
             {label} blob"
        ),
        "memory",
        "MiB",
        Better::Lower,
        Some("direct"),
        [
            ("direct", "direct GETs (upstream registry)", direct),
            ("proxy", "proxy registry GETs, warm", proxy),
            ("oci", "oci-upstream FetchBlob, warm", oci),
        ],
    );
}

/// The performance targets, checked against this run's figures.
fn targets(plan: &Plan, report: &Report) -> Vec<Target> {
    let largest = size_label(*plan.sizes.iter().max().expect("a blob size"));
    let most = plan.callers.iter().copied().max().unwrap_or(0);
    let check = |name: String, goal: &str, value: Option<f64>, ok: fn(f64) -> bool| Target {
        name,
        goal: goal.into(),
        value,
        met: value.map(ok),
    };
    let mut out = vec![
        check(
            format!("warm FetchBlob / bare gRPC stream ({largest})"),
            ">= 0.9",
            report.ratio_of(
                &format!("blob/{largest}/rate/oci-warm"),
                &format!("blob/{largest}/rate/bare"),
            ),
            |v| v >= 0.9,
        ),
        check(
            format!("cold FetchBlob / bare gRPC stream ({largest})"),
            ">= 0.8",
            report.ratio_of(
                &format!("blob/{largest}/rate/oci-cold"),
                &format!("blob/{largest}/rate/bare"),
            ),
            |v| v >= 0.8,
        ),
        check(
            format!("cold FetchBlob / proxy registry cold GET ({largest})"),
            ">= 1.3",
            report.ratio_of(
                &format!("blob/{largest}/rate/oci-cold"),
                &format!("blob/{largest}/rate/proxy-cold"),
            ),
            |v| v >= 1.3,
        ),
        check(
            format!("upstream GETs for {most} concurrent cold FetchBlob callers"),
            "= 1",
            report.median(&format!("pulls/{most}/upstream-GETs/oci")),
            |v| v <= 1.0,
        ),
        check(
            format!("peak RSS (MiB), one cold FetchBlob of the {largest} blob"),
            "<= 32",
            report.median(&format!("blob/{largest}/rss/oci-cold")),
            |v| v <= 32.0,
        ),
        check(
            format!("peak RSS (MiB), {most} concurrent cold FetchBlob streams"),
            "<= 128",
            report.median(&format!("pulls/{most}/peak-RSS/oci")),
            |v| v <= 128.0,
        ),
        check(
            "warm FetchManifest by tag, p50 (ms) at 1 caller".into(),
            "<= 0.2",
            report.median("manifests/1/p50-latency/fetch"),
            |v| v <= 0.2,
        ),
        check(
            "warm FetchManifest req/s at 32 callers / direct".into(),
            ">= 10",
            report.ratio_of(
                "manifests/32/requests/s/fetch",
                "manifests/32/requests/s/direct",
            ),
            |v| v >= 10.0,
        ),
        check(
            "upstream manifest requests per 1k warm FetchManifest calls".into(),
            "= 0 while fresh",
            report.median("manifests/upstream-per-1k/fetch"),
            |v| v == 0.0,
        ),
    ];
    if plan.quick {
        for t in &mut out {
            t.name.push_str(" [quick sizes]");
        }
    }
    out
}
