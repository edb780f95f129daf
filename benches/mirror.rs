//! Mirror benchmark: `skopeo copy` of one image into an OCI layout through
//! oci-upstream's OCI HTTP mirror (`mirror_listen`) against the same copy
//! through a CNCF Distribution registry in proxy mode (`proxy: remoteurl:`,
//! the pull-through cache platform teams would otherwise run) in front of
//! the same upstream registry, cold and warm, with a direct copy from the
//! upstream as the baseline, all measured in the same run on one machine.
//!
//! The upstream is a real Distribution registry holding one OCI image: a
//! config, a small layer and one large incompressible layer (256 MiB; the
//! quick mode's 8 MiB). Each run copies it five times, the systems taking
//! turns in a rotating order so the machine's other load falls on them
//! alike:
//!
//! - direct: from the upstream registry;
//! - proxy registry, cold (a fresh proxy on empty storage), then warm (the
//!   same proxy again, once its background copy of the layer has landed);
//! - mirror, cold (a fresh service, the release binary, on an empty cache
//!   dir), then warm (the same service again).
//!
//! Every copy is checked: the layout's manifest is the upstream's (its
//! digest preserved) and each blob's file in the layout has the size and
//! sha256 its descriptor names, so a broken path cannot post a figure; a
//! warm copy must cause no upstream GET of the large layer and a cold one
//! at least one. For each copy it records the wall time (as MB/s of the
//! image's bytes), the CPU seconds (user + system, `/proc/PID/stat`) of the
//! serving process (the upstream itself for direct), of skopeo (the change
//! in this process's waited-for children's time across the copy) and of
//! the upstream registry, and the upstream GETs of the large layer (from
//! the upstream's access log). The load average is printed at the start of
//! each run and kept in the JSON.
//!
//! Each figure is the median with min–max over `BENCH_RUNS` runs (default
//! 5), printed as one table with its ratio to the direct copy of the run,
//! followed by the goals (mirror against proxy registry, cold and warm),
//! and written as JSON to `target/bench-mirror.json` (or `BENCH_OUT`).
//!
//! `cargo bench --bench mirror` runs it in full (about 2 minutes);
//! `BENCH_QUICK=1`, or a run by `cargo test` (which, unlike `cargo bench`,
//! passes no `--bench` flag), copies an 8 MiB layer once, so CI runs it
//! every time and it cannot rot.

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
#[path = "common_bench/report.rs"]
#[allow(
    dead_code,
    reason = "the e2e benchmark's report; this one uses most of it"
)]
mod report;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use sha2::{Digest as _, Sha256};

use clients::bounded;
use common::Spawned;
use common::config::{ServiceConfig, Upstream};
use common::content::{
    Descriptor, OCI_CONFIG, OCI_LAYER, OCI_MANIFEST, config_json, manifest_json,
    pseudo_random_bytes,
};
use common::distribution::{Distribution as Seeder, Mode, Process};
use common::skopeo::copy_to_layout;
use report::{Better, Report, Target};

const MIB: u64 = 1 << 20;
/// The repository and tag of the image.
const REPO: &str = "bench/mirror";
const TAG: &str = "v1";
/// The small layer's size.
const SMALL_LAYER: usize = 512 * 1024;
/// Upper bound on one copy (skopeo's own `--command-timeout`).
const COPY_LIMIT: &str = "600s";
/// Upper bound on a setup step.
const STEP_LIMIT: Duration = Duration::from_secs(600);
/// How long the proxy registry may take to finish its background copy.
const PROXY_STORE_LIMIT: Duration = Duration::from_secs(600);
/// The service's log filter: its address lines, and warnings.
const SERVICE_LOG: &str = "oci_upstream::app=info,warn";

/// What the run measures, from the environment.
struct Plan {
    quick: bool,
    runs: usize,
    layer: u64,
    out: PathBuf,
}

impl Plan {
    fn from_env() -> Plan {
        let env = |key: &str| std::env::var(key).ok().filter(|v| !v.is_empty());
        // `cargo test` runs this binary without `--bench` (unlike `cargo
        // bench`): then the quick mode, so CI exercises it every time.
        let quick = common::bench_quick();
        let runs = env("BENCH_RUNS").map_or(if quick { 1 } else { 5 }, |v| {
            v.parse::<usize>()
                .unwrap_or_else(|_| panic!("BENCH_RUNS={v} is not a number"))
                .max(1)
        });
        Plan {
            quick,
            runs,
            layer: if quick { 8 * MIB } else { 256 * MIB },
            out: env("BENCH_OUT")
                .map_or_else(|| report::default_out("bench-mirror.json"), PathBuf::from),
        }
    }
}

/// The image in the upstream, as its descriptors.
struct Image {
    manifest_digest: String,
    /// The config and both layers.
    blobs: Vec<Descriptor>,
    /// The large layer's digest.
    layer_digest: String,
    /// Manifest, config and layers, in bytes.
    bytes: u64,
}

/// The systems, in table order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum System {
    Direct,
    ProxyCold,
    MirrorCold,
    ProxyWarm,
    MirrorWarm,
}

impl System {
    const ALL: [System; 5] = [
        System::Direct,
        System::ProxyCold,
        System::MirrorCold,
        System::ProxyWarm,
        System::MirrorWarm,
    ];

    fn key(self) -> &'static str {
        match self {
            System::Direct => "direct",
            System::ProxyCold => "proxy-cold",
            System::MirrorCold => "mirror-cold",
            System::ProxyWarm => "proxy-warm",
            System::MirrorWarm => "mirror-warm",
        }
    }

    fn name(self) -> &'static str {
        match self {
            System::Direct => "direct (upstream registry)",
            System::ProxyCold => "proxy registry, cold",
            System::MirrorCold => "oci-upstream mirror, cold",
            System::ProxyWarm => "proxy registry, warm",
            System::MirrorWarm => "oci-upstream mirror, warm",
        }
    }

    fn index(self) -> usize {
        System::ALL.iter().position(|s| *s == self).expect("listed")
    }
}

/// One figure of a copy, for the table.
type Pick = fn(System, &Measured) -> f64;

/// What one copy measured.
#[derive(Clone, Copy, Debug, Default)]
struct Measured {
    seconds: f64,
    /// CPU seconds of the serving process (the upstream for direct).
    serving_cpu: f64,
    skopeo_cpu: f64,
    upstream_cpu: f64,
    /// Upstream GETs of the large layer.
    layer_gets: u64,
}

/// Everything set up once.
struct World {
    upstream: Process,
    /// The seeding registry (stopped); keeps the upstream's storage dir.
    _seeded: Seeder,
    image: Image,
    config: String,
    work: tempfile::TempDir,
    next_dir: AtomicUsize,
}

impl World {
    fn fresh_dir(&self, kind: &str) -> PathBuf {
        let n = self.next_dir.fetch_add(1, Ordering::Relaxed);
        self.work.path().join(format!("{kind}-{n}"))
    }

    /// One copy of the image from `host` (`127.0.0.1:PORT`) by skopeo into
    /// a fresh layout, timed, checked and deleted; `serving` is the pid of
    /// the process that answers (the upstream for direct), and `done` waits
    /// for work it does after the copy (counted in its CPU).
    fn measure(&self, what: System, host: &str, serving: u32, done: impl FnOnce()) -> Measured {
        let me = std::process::id();
        let upstream = self.upstream.pid();
        let layout = self.fresh_dir("layout");
        self.upstream
            .settle(Duration::from_millis(50), Duration::from_secs(5));
        let before = self.upstream.counts();
        let (serving_before, upstream_before) = (
            clients::cpu_seconds(serving),
            clients::cpu_seconds(upstream),
        );
        let skopeo_before = clients::waited_children_cpu_seconds(me);
        let started = Instant::now();
        copy_to_layout(
            &format!("{host}/{REPO}:{TAG}"),
            &layout,
            TAG,
            &["--command-timeout", COPY_LIMIT],
        )
        .unwrap_or_else(|e| panic!("{}: skopeo copy: {e}", what.name()));
        let seconds = started.elapsed().as_secs_f64();
        // Skopeo has been waited for, and no other child since.
        let skopeo_cpu = clients::waited_children_cpu_seconds(me) - skopeo_before;
        done();
        self.upstream
            .settle(Duration::from_millis(150), Duration::from_secs(10));
        let m = Measured {
            seconds,
            serving_cpu: clients::cpu_seconds(serving) - serving_before,
            skopeo_cpu,
            upstream_cpu: clients::cpu_seconds(upstream) - upstream_before,
            layer_gets: self
                .upstream
                .counts()
                .since(&before)
                .matching("GET", &format!("/blobs/{}", self.image.layer_digest)),
        };
        check_layout(what, &layout, &self.image);
        let _ = std::fs::remove_dir_all(&layout);
        let cold = matches!(what, System::ProxyCold | System::MirrorCold);
        let warm = matches!(what, System::ProxyWarm | System::MirrorWarm);
        assert!(
            !cold || m.layer_gets >= 1,
            "{}: a cold copy made no upstream GET of the layer",
            what.name()
        );
        assert!(
            !warm || m.layer_gets == 0,
            "{}: a warm copy made {} upstream GET(s) of the layer",
            what.name(),
            m.layer_gets
        );
        m
    }

    /// A proxy registry on empty storage.
    fn start_proxy(&self) -> Process {
        Process::start(&self.fresh_dir("proxy"), Mode::Proxy(self.upstream.url()))
    }

    /// oci-upstream with the mirror on, on an empty cache dir of its own.
    fn start_service(&self) -> Spawned {
        let service = Spawned::start_with_env(&self.config, &[("RUST_LOG", SERVICE_LOG)]);
        assert!(
            service.mirror_addr.is_some(),
            "the service did not log its mirror address; log:\n{}",
            service.logs()
        );
        service
    }
}

/// Checks the layout skopeo wrote: its one manifest is the image's, and
/// every blob is there with the size and sha256 its descriptor names.
fn check_layout(what: System, layout: &Path, image: &Image) {
    let name = what.name();
    let index: serde_json::Value = serde_json::from_slice(
        &std::fs::read(layout.join("index.json"))
            .unwrap_or_else(|e| panic!("{name}: read the layout's index.json: {e}")),
    )
    .unwrap_or_else(|e| panic!("{name}: index.json is not JSON: {e}"));
    let manifests = index["manifests"].as_array().cloned().unwrap_or_default();
    assert_eq!(manifests.len(), 1, "{name}: one manifest in {index}");
    assert_eq!(
        manifests[0]["digest"].as_str(),
        Some(image.manifest_digest.as_str()),
        "{name}: the manifest's digest in the layout"
    );
    let manifest = Descriptor {
        media_type: OCI_MANIFEST.into(),
        digest: image.manifest_digest.clone(),
        size: manifests[0]["size"].as_u64().unwrap_or(0) as usize,
        platform: None,
    };
    for blob in std::iter::once(&manifest).chain(&image.blobs) {
        let hex = blob.digest.strip_prefix("sha256:").expect("sha256 digests");
        let path = layout.join("blobs/sha256").join(hex);
        let (size, digest) = file_sha256(&path)
            .unwrap_or_else(|e| panic!("{name}: read {} from the layout: {e}", blob.digest));
        assert_eq!(size, blob.size as u64, "{name}: size of {}", blob.digest);
        assert_eq!(digest, blob.digest, "{name}: sha256 of the layout's file");
    }
}

/// Size and `sha256:` digest of a file, read in 1 MiB pieces.
fn file_sha256(path: &Path) -> std::io::Result<(u64, String)> {
    use std::io::Read as _;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; MIB as usize];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((size, format!("sha256:{}", hex::encode(hasher.finalize()))))
}

/// Pushes the image through the harness's registry, then serves the same
/// storage from a registry process of our own (for its pid and access log).
async fn setup(plan: &Plan) -> World {
    let seeded = Seeder::start();
    let layer = bounded(
        "pushing the large layer",
        STEP_LIMIT,
        seeded.push_big_blob(REPO, 0x313E, plan.layer),
    )
    .await;
    let small = pseudo_random_bytes(0x313F, SMALL_LAYER);
    seeded.push_blob(REPO, &small).await;
    let layers = vec![
        Descriptor {
            media_type: OCI_LAYER.into(),
            digest: layer.digest.clone(),
            size: usize::try_from(layer.size).expect("the layer's size fits in usize"),
            platform: None,
        },
        Descriptor::of(OCI_LAYER, &small),
    ];
    let diff_ids: Vec<String> = layers.iter().map(|l| l.digest.clone()).collect();
    let config = config_json(
        "linux",
        "amd64",
        None,
        &diff_ids,
        "oci-upstream mirror bench",
    );
    seeded.push_blob(REPO, &config).await;
    let config = Descriptor::of(OCI_CONFIG, &config);
    let manifest = manifest_json(OCI_MANIFEST, &config, &layers);
    let manifest = seeded
        .push_manifest(REPO, TAG, OCI_MANIFEST, manifest)
        .await;
    let mut blobs = vec![config];
    blobs.extend(layers);
    let bytes = manifest.bytes.len() as u64 + blobs.iter().map(|b| b.size as u64).sum::<u64>();

    let mut seeded = seeded;
    seeded.stop();
    let upstream = Process::start(&seeded.dir().join("data"), Mode::Plain);
    let config = ServiceConfig::with(Upstream::new("upstream", &upstream.url()))
        .top("mirror_listen = \"127.0.0.1:0\"")
        .toml();
    World {
        upstream,
        _seeded: seeded,
        image: Image {
            manifest_digest: manifest.digest,
            blobs,
            layer_digest: layer.digest,
            bytes,
        },
        config,
        work: tempfile::tempdir().expect("a work dir"),
        next_dir: AtomicUsize::new(0),
    }
}

/// One run: every system once (cold then warm on one instance), the three
/// kinds taking turns by `turn` so none always goes first.
fn run_once(world: &World, turn: usize) -> [Measured; 5] {
    let mut out = [Measured::default(); 5];
    let direct = |out: &mut [Measured; 5]| {
        let host = world.upstream.addr.to_string();
        out[System::Direct.index()] =
            world.measure(System::Direct, &host, world.upstream.pid(), || {});
    };
    let proxy = |out: &mut [Measured; 5]| {
        let proxy = world.start_proxy();
        let host = proxy.addr.to_string();
        let layer = world.image.layer_digest.clone();
        out[System::ProxyCold.index()] =
            world.measure(System::ProxyCold, &host, proxy.pid(), || {
                // Its store of the layer runs on after the copy.
                assert!(
                    proxy.wait_for_blob(&layer, PROXY_STORE_LIMIT),
                    "the proxy registry did not store the layer; output:\n{}",
                    proxy.other_output()
                );
            });
        out[System::ProxyWarm.index()] =
            world.measure(System::ProxyWarm, &host, proxy.pid(), || {});
        let root = proxy.root.clone();
        drop(proxy);
        let _ = std::fs::remove_dir_all(root);
    };
    let mirror = |out: &mut [Measured; 5]| {
        let service = world.start_service();
        let host = service.mirror_addr.expect("the mirror is on").to_string();
        out[System::MirrorCold.index()] =
            world.measure(System::MirrorCold, &host, service.pid(), || {});
        out[System::MirrorWarm.index()] =
            world.measure(System::MirrorWarm, &host, service.pid(), || {});
    };
    for i in 0..3 {
        match (i + turn) % 3 {
            0 => direct(&mut out),
            1 => proxy(&mut out),
            _ => mirror(&mut out),
        }
    }
    out
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
        "plan: {} run(s){}; skopeo copy of one image: config, a {} KiB layer and a {} MiB \
         incompressible layer",
        plan.runs,
        if plan.quick { " (quick)" } else { "" },
        SMALL_LAYER / 1024,
        plan.layer / MIB,
    );
    let world = setup(&plan).await;
    let size_label = format!("{} MiB layer", plan.layer / MIB);
    eprintln!("setup took {:.1} s", started.elapsed().as_secs_f64());

    // Skopeo copies and waits on this thread; the runtime's other workers
    // are idle meanwhile.
    let (runs, loads) = tokio::task::block_in_place(|| {
        if !plan.quick {
            // One untimed round: page caches, binaries, connections.
            eprintln!("warm-up round");
            run_once(&world, 0);
        }
        let mut runs = Vec::new();
        let mut loads = Vec::new();
        for run in 0..plan.runs {
            eprintln!("run {}/{}", run + 1, plan.runs);
            loads.push(report::loadavg());
            runs.push(run_once(&world, run));
        }
        (runs, loads)
    });

    let mut report = Report::default();
    let mb = world.image.bytes as f64 / 1e6;
    let all = &System::ALL[..];
    let cold = &[System::Direct, System::ProxyCold, System::MirrorCold][..];
    for (title, id, unit, better, systems, pick) in [
        (
            "copy throughput (image bytes / wall time of the skopeo copy)",
            "rate",
            "MB/s",
            Better::Higher,
            all,
            (|_, m| m.seconds) as Pick,
        ),
        (
            "wall time of the skopeo copy",
            "seconds",
            "s",
            Better::Lower,
            all,
            |_, m| m.seconds,
        ),
        (
            "CPU seconds, serving process (the upstream registry for direct)",
            "cpu-serving",
            "CPU s",
            Better::Lower,
            all,
            |_, m| m.serving_cpu,
        ),
        (
            "CPU seconds, skopeo",
            "cpu-skopeo",
            "CPU s",
            Better::Lower,
            all,
            |_, m| m.skopeo_cpu,
        ),
        (
            "CPU seconds, upstream registry",
            "cpu-upstream",
            "CPU s",
            Better::Lower,
            cold,
            |_, m| m.upstream_cpu,
        ),
        (
            // The upstream counted once for direct, where it serves.
            "CPU seconds, all processes (serving + skopeo + upstream)",
            "cpu-all",
            "CPU s",
            Better::Lower,
            all,
            |s, m| {
                let upstream = if s == System::Direct {
                    0.0
                } else {
                    m.upstream_cpu
                };
                m.serving_cpu + m.skopeo_cpu + upstream
            },
        ),
        (
            "upstream GETs of the large layer per copy",
            "gets",
            "GETs",
            Better::Lower,
            all,
            |_, m| m.layer_gets as f64,
        ),
    ] {
        let rows = systems.iter().map(|&s| {
            let values = runs.iter().map(|r| {
                let v = pick(s, &r[s.index()]);
                if id == "rate" { mb / v } else { v }
            });
            (s.key(), s.name(), values.collect())
        });
        report.add_group(
            &format!("{title}, {size_label}"),
            id,
            unit,
            better,
            Some("direct"),
            rows.collect::<Vec<_>>(),
        );
    }
    // Per-run ratios: the two sides of a pair ran back to back under the
    // same load.
    let paired = |a: System, b: System| -> Vec<f64> {
        runs.iter()
            .map(|r| r[b.index()].seconds / r[a.index()].seconds)
            .collect()
    };
    report.add_group(
        &format!(
            "speed ratio within each run (the first's copy speed / the second's), {size_label}"
        ),
        "paired",
        "x",
        Better::Higher,
        None,
        [
            (
                "mirror-vs-proxy-cold",
                "mirror / proxy registry, cold",
                paired(System::MirrorCold, System::ProxyCold),
            ),
            (
                "mirror-vs-proxy-warm",
                "mirror / proxy registry, warm",
                paired(System::MirrorWarm, System::ProxyWarm),
            ),
            (
                "mirror-cold-vs-direct",
                "mirror cold / direct",
                paired(System::MirrorCold, System::Direct),
            ),
            (
                "proxy-cold-vs-direct",
                "proxy registry cold / direct",
                paired(System::ProxyCold, System::Direct),
            ),
            (
                "mirror-warm-vs-direct",
                "mirror warm / direct",
                paired(System::MirrorWarm, System::Direct),
            ),
            (
                "proxy-warm-vs-direct",
                "proxy registry warm / direct",
                paired(System::ProxyWarm, System::Direct),
            ),
        ],
    );
    for (i, load) in loads.iter().enumerate() {
        report.note(format!("run {}: load average at its start {load}", i + 1));
    }
    report.print_table();

    let mut targets = vec![
        Target {
            name: "warm: mirror copy speed / proxy registry copy speed (medians)".into(),
            goal: ">= 1.0".into(),
            value: report.ratio_of("rate/mirror-warm", "rate/proxy-warm"),
            met: None,
        },
        Target {
            name: "cold: mirror copy speed / proxy registry copy speed (medians)".into(),
            goal: ">= 1.3".into(),
            value: report.ratio_of("rate/mirror-cold", "rate/proxy-cold"),
            met: None,
        },
    ];
    for (t, goal) in targets.iter_mut().zip([1.0, 1.3]) {
        t.met = t.value.map(|v| v >= goal);
    }
    // What a mirror costing nothing would reach: the direct copy, which the
    // cold mirror copy includes.
    targets.push(Target {
        name: "cold ceiling: direct copy speed / proxy registry cold copy speed".into(),
        goal: "(bound)".into(),
        value: report.ratio_of("rate/direct", "rate/proxy-cold"),
        met: None,
    });
    if plan.quick {
        for t in &mut targets {
            t.name.push_str(" [quick size]");
        }
    }
    let targets_json = report::print_targets(&targets);
    let total = started.elapsed();
    println!();
    println!("time: total {:.1} s", total.as_secs_f64());
    let load_at_end = report::loadavg();
    println!("load average at end: {load_at_end}");

    let mut out = report.to_json();
    out["machine"] = machine;
    out["machine"]["loadavg_at_end"] = json!(load_at_end);
    out["machine"]["loadavg_per_run"] = json!(loads);
    out["plan"] = json!({
        "quick": plan.quick,
        "runs": plan.runs,
        "large_layer_bytes": plan.layer,
        "small_layer_bytes": SMALL_LAYER,
        "image_bytes": world.image.bytes,
    });
    out["targets"] = targets_json;
    out["seconds"] = json!({ "total": total.as_secs_f64() });
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
