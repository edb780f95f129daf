//! Integration tests of the cache against a real CNCF Distribution registry
//! (the restart test runs the binary, the others the service in process): repeated fetches are hits that make no upstream
//! request (counted by a reverse proxy between the service and the
//! registry), hits survive a restart and an upstream outage (stale tags
//! included), the disk store stays under `max_size` while an evicted blob is
//! still being streamed, a cached object is only served through a route whose
//! upstream holds it, and "not found" answers are remembered.

use crate::common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::config::{ServiceConfig, Upstream};
use common::content::{OCI_MANIFEST, pseudo_random_bytes};
use common::counting_proxy::CountingProxy;
use common::distribution::Distribution;
use common::faulty::{blob_path, manifest_path};
use common::rpc::{
    BlobRead, BlobStream, Client, blob_request, fetch_manifest, head_blob, head_manifest,
    read_blob, read_blob_discarded,
};
use common::{InProcess, Spawned, eventually};
use tonic::{Code, Status};

const MIB: u64 = 1024 * 1024;

// ---------------------------------------------------------------------------
// Helpers.
// ---------------------------------------------------------------------------

/// FetchBlob of a whole blob, to the end of the stream, whether it fails at
/// the call or in the stream; the data is kept when `keep`.
async fn fetch_blob(client: &mut Client, repository: &str, digest: &str, keep: bool) -> BlobRead {
    let request = blob_request(repository, digest);
    if keep {
        read_blob(client, request).await
    } else {
        read_blob_discarded(client, request).await
    }
}

/// `(upstream, cache_hit)` of a response's source.
fn source_of(source: Option<&oci_upstream::pb::Source>) -> (String, bool) {
    let source = source.expect("responses carry a source");
    (source.upstream.clone(), source.cache_hit)
}

/// The upstream `origin` at `url`, with the service's defaults.
fn origin(url: &str) -> Upstream {
    Upstream::new("origin", url)
}

// ---------------------------------------------------------------------------
// Disk store inspection (layout: objects/<alg>/<hex> + .meta, tmp/). A
// verified blob reaches its callers before it is synced and renamed into the
// store, so the store catches up a moment after a fetch returns: poll with
// `eventually`.

fn object_file(cache_dir: &Path, digest: &str) -> PathBuf {
    let (alg, hex) = digest.split_once(':').expect("digest is alg:hex");
    cache_dir.join("objects").join(alg).join(hex)
}

/// Sum of the sizes of the object files (not their `.meta`) in the store.
fn store_bytes(cache_dir: &Path) -> u64 {
    let mut total = 0;
    let Ok(algorithms) = std::fs::read_dir(cache_dir.join("objects")) else {
        return 0;
    };
    for algorithm in algorithms {
        let algorithm = algorithm.expect("list objects/");
        for file in std::fs::read_dir(algorithm.path()).expect("list objects/<alg>") {
            let file = file.expect("list objects/<alg>");
            if file.path().extension().is_none() {
                total += file.metadata().expect("object metadata").len();
            }
        }
    }
    total
}

// ---------------------------------------------------------------------------
// Tests.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_fetch_is_a_hit_without_upstream_requests() {
    let registry = Distribution::start();
    let repo = "cache/hit";
    let image = registry.push_image(repo, "v1").await;
    let proxy = CountingProxy::start(&registry.url()).await;
    let service = InProcess::start(&ServiceConfig::with(origin(&proxy.url())).toml()).await;
    let mut client = service.client().await;
    let layer = &image.layers[0];

    // Blob: a miss, then a hit with the same bytes and no upstream request.
    let (info, first) = fetch_blob(&mut client, repo, &layer.digest, true)
        .await
        .succeeded();
    assert_eq!(first.data, layer.data, "first FetchBlob bytes");
    assert_eq!(
        source_of(info.source.as_ref()),
        ("origin".into(), false),
        "first FetchBlob source"
    );
    assert_eq!(proxy.count("GET", &blob_path(repo, &layer.digest)), 1);

    let before = proxy.total();
    let (info, second) = fetch_blob(&mut client, repo, &layer.digest, true)
        .await
        .succeeded();
    assert_eq!(
        source_of(info.source.as_ref()),
        ("origin".into(), true),
        "second FetchBlob must be a cache hit naming the upstream that filled it"
    );
    assert_eq!(info.size as u64, layer.data.len() as u64, "info.size");
    assert_eq!(second.data, first.data, "second FetchBlob bytes");
    let head = head_blob(&mut client, repo, &layer.digest)
        .await
        .expect("HeadBlob after a fetch");
    assert!(head.exists, "HeadBlob exists");
    assert_eq!(head.size as u64, layer.data.len() as u64, "HeadBlob size");
    assert_eq!(head.digest, layer.digest, "HeadBlob digest");
    assert_eq!(
        source_of(head.source.as_ref()),
        ("origin".into(), true),
        "HeadBlob after a fetch answers from cache"
    );
    assert_eq!(
        proxy.since(before),
        [],
        "a cached blob's FetchBlob and HeadBlob must not reach the upstream"
    );

    // Manifest by digest: a miss, then a hit with the same bytes.
    let manifest = &image.manifest;
    let first = fetch_manifest(&mut client, repo, &manifest.digest)
        .await
        .expect("first FetchManifest by digest");
    assert_eq!(first.manifest, manifest.bytes, "first manifest bytes");
    assert_eq!(source_of(first.source.as_ref()), ("origin".into(), false));
    let before = proxy.total();
    let second = fetch_manifest(&mut client, repo, &manifest.digest)
        .await
        .expect("second FetchManifest by digest");
    assert_eq!(
        source_of(second.source.as_ref()),
        ("origin".into(), true),
        "second FetchManifest by digest must be a cache hit"
    );
    assert_eq!(second.manifest, first.manifest, "second manifest bytes");
    assert_eq!(second.digest, manifest.digest, "second manifest digest");
    assert_eq!(
        second.media_type, OCI_MANIFEST,
        "second manifest media type"
    );
    let head = head_manifest(&mut client, repo, &manifest.digest)
        .await
        .expect("HeadManifest by digest after a fetch");
    assert!(head.exists, "HeadManifest exists");
    assert_eq!(head.digest, manifest.digest, "HeadManifest digest");
    assert_eq!(
        head.size as usize,
        manifest.bytes.len(),
        "HeadManifest size"
    );
    assert_eq!(head.media_type, OCI_MANIFEST, "HeadManifest media type");
    assert_eq!(
        source_of(head.source.as_ref()),
        ("origin".into(), true),
        "HeadManifest by digest after a fetch answers from cache"
    );
    assert_eq!(
        proxy.since(before),
        [],
        "a cached manifest's FetchManifest and HeadManifest by digest must not reach the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hit_survives_a_restart_on_the_same_cache_dir() {
    let registry = Distribution::start();
    let repo = "cache/restart";
    let image = registry.push_image(repo, "v1").await;
    let proxy = CountingProxy::start(&registry.url()).await;
    let cache = tempfile::tempdir().expect("temp dir for the cache");
    let cache_dir = cache.path().join("cache");
    let env = [(
        "OCI_UPSTREAM_CACHE_DIR",
        cache_dir.to_str().expect("temp paths are UTF-8"),
    )];
    let toml = ServiceConfig::with(origin(&proxy.url())).toml();
    let layer = &image.layers[1];

    // A process: the restart is a SIGTERM and a new process.
    let mut service = Spawned::start_with_env(&toml, &env);
    let mut client = service.client().await;
    let (info, read) = fetch_blob(&mut client, repo, &layer.digest, true)
        .await
        .succeeded();
    assert_eq!(read.data, layer.data, "first FetchBlob bytes");
    assert!(
        !source_of(info.source.as_ref()).1,
        "first FetchBlob is a miss"
    );
    let first = fetch_manifest(&mut client, repo, &image.manifest.digest)
        .await
        .expect("first FetchManifest by digest");
    assert!(
        !source_of(first.source.as_ref()).1,
        "first FetchManifest is a miss"
    );
    drop(client);
    // A graceful stop lets verified downloads land in the store first.
    service.terminate();
    let status = service
        .wait_exit(Duration::from_secs(30))
        .expect("the service exits after SIGTERM");
    assert!(status.success(), "exit status after SIGTERM: {status}");

    let before = proxy.total();
    let service = Spawned::start_with_env(&toml, &env);
    let mut client = service.client().await;
    let (info, read) = fetch_blob(&mut client, repo, &layer.digest, true)
        .await
        .succeeded();
    assert_eq!(
        source_of(info.source.as_ref()),
        ("origin".into(), true),
        "FetchBlob after a restart must be a cache hit"
    );
    assert_eq!(read.data, layer.data, "FetchBlob bytes after a restart");
    let second = fetch_manifest(&mut client, repo, &image.manifest.digest)
        .await
        .expect("FetchManifest by digest after a restart");
    assert_eq!(
        source_of(second.source.as_ref()),
        ("origin".into(), true),
        "FetchManifest by digest after a restart must be a cache hit"
    );
    assert_eq!(second.manifest, image.manifest.bytes, "manifest bytes");
    let head = head_blob(&mut client, repo, &layer.digest)
        .await
        .expect("HeadBlob after a restart");
    assert!(head.exists && source_of(head.source.as_ref()).1, "{head:?}");
    assert_eq!(
        proxy.since(before),
        [],
        "after a restart on the same cache dir, cached content must not reach the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_content_and_stale_tags_are_served_while_the_upstream_is_down() {
    const TAG_TTL: Duration = Duration::from_secs(1);
    let mut registry = Distribution::start();
    let repo = "cache/down";
    let image = registry.push_image(repo, "v1").await;
    let uncached = registry.push_image(repo, "v2").await;
    // Straight at the registry: once it is stopped, connections are refused.
    let service = InProcess::start(
        &ServiceConfig::with(origin(&registry.url()).retries(0))
            .cache("tag_ttl = \"1s\"")
            .cache("stale_if_error = \"24h\"")
            .toml(),
    )
    .await;
    let mut client = service.client().await;
    let layer = &image.layers[0];

    let (_, read) = fetch_blob(&mut client, repo, &layer.digest, true)
        .await
        .succeeded();
    assert_eq!(read.data, layer.data, "FetchBlob before the outage");
    fetch_manifest(&mut client, repo, &image.manifest.digest)
        .await
        .expect("FetchManifest by digest before the outage");
    let tagged = fetch_manifest(&mut client, repo, "v1")
        .await
        .expect("FetchManifest by tag before the outage");
    assert_eq!(tagged.digest, image.manifest.digest, "tag v1 digest");
    // Let the tag entry go stale (older than tag_ttl, well within
    // stale_if_error).
    tokio::time::sleep(TAG_TTL + Duration::from_millis(500)).await;

    registry.stop();

    let (info, read) = fetch_blob(&mut client, repo, &layer.digest, true)
        .await
        .succeeded();
    assert_eq!(read.data, layer.data, "cached blob during the outage");
    assert!(source_of(info.source.as_ref()).1, "cached blob is a hit");
    let by_digest = fetch_manifest(&mut client, repo, &image.manifest.digest)
        .await
        .expect("cached manifest by digest must be served while the upstream is down");
    assert_eq!(by_digest.manifest, image.manifest.bytes);
    assert!(source_of(by_digest.source.as_ref()).1, "manifest is a hit");
    let stale = fetch_manifest(&mut client, repo, "v1")
        .await
        .expect("a stale tag must be served while the upstream is down");
    assert_eq!(stale.digest, image.manifest.digest, "stale tag digest");
    assert_eq!(stale.manifest, image.manifest.bytes, "stale tag bytes");
    assert!(source_of(stale.source.as_ref()).1, "stale tag is a hit");
    let head = head_manifest(&mut client, repo, "v1")
        .await
        .expect("HeadManifest of a stale tag must answer while the upstream is down");
    assert!(head.exists, "stale tag exists");
    assert_eq!(
        head.digest, image.manifest.digest,
        "HeadManifest stale digest"
    );

    let code = |r: Result<(), Status>| r.err().map(|s| s.code());
    let blob = fetch_blob(&mut client, repo, &image.layers[1].digest, false).await;
    assert_eq!(
        code(blob.end),
        Some(Code::Unavailable),
        "uncached blob while the upstream is down"
    );
    assert_eq!(blob.len, 0, "no bytes of an uncached blob");
    let head = head_blob(&mut client, repo, &image.layers[1].digest).await;
    assert_eq!(
        code(head.map(drop)),
        Some(Code::Unavailable),
        "HeadBlob of an uncached blob while the upstream is down"
    );
    let manifest = fetch_manifest(&mut client, repo, &uncached.manifest.digest).await;
    assert_eq!(
        code(manifest.map(drop)),
        Some(Code::Unavailable),
        "uncached manifest by digest while the upstream is down"
    );
    let tag = fetch_manifest(&mut client, repo, "v2").await;
    assert_eq!(
        code(tag.map(drop)),
        Some(Code::Unavailable),
        "never-fetched tag while the upstream is down"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_keeps_the_store_under_max_size_while_an_evicted_blob_streams() {
    const MAX_SIZE: u64 = 100 * MIB;
    let registry = Distribution::start();
    let repo = "cache/evict";
    let big = registry.push_big_blob(repo, 0xB16, 64 * MIB + 321).await;
    let mut others = Vec::new();
    for seed in 1..=4u64 {
        others.push(registry.push_big_blob(repo, seed, 24 * MIB + seed).await);
    }
    let proxy = CountingProxy::start(&registry.url()).await;
    let cache = tempfile::tempdir().expect("temp dir for the cache");
    let cache_dir = cache.path().join("cache");
    let service = InProcess::start_with_cache(
        &ServiceConfig::with(origin(&proxy.url()))
            .cache("max_size = \"100MiB\"")
            .toml(),
        &cache_dir,
    )
    .await;
    let mut client = service.client().await;

    let (_, cold) = fetch_blob(&mut client, repo, &big.digest, false)
        .await
        .succeeded();
    assert_eq!(
        (cold.len, &cold.sha256),
        (big.size, &big.digest),
        "cold big blob"
    );
    assert!(
        eventually(|| object_file(&cache_dir, &big.digest).is_file()).await,
        "the big blob is in the store after its first fetch"
    );

    // Start reading the cached big blob on its own connection and stop after
    // the first data message: the service's reader now waits with the file
    // open.
    let mut reader = service.client().await;
    let mut stream = BlobStream::open(&mut reader, blob_request(repo, &big.digest))
        .await
        .expect("FetchBlob of the cached big blob")
        .discard();
    stream.first_data().await;
    let info = stream
        .read()
        .info
        .clone()
        .expect("first message carries info");
    assert!(
        source_of(info.source.as_ref()).1,
        "second read of the big blob is a hit"
    );

    // Fill the store well past max_size.
    for other in &others {
        let (_, read) = fetch_blob(&mut client, repo, &other.digest, false)
            .await
            .succeeded();
        assert_eq!((read.len, &read.sha256), (other.size, &other.digest));
        let stored = store_bytes(&cache_dir);
        assert!(
            stored <= MAX_SIZE,
            "the store holds {stored} bytes after fetching {}, more than max_size {MAX_SIZE}",
            other.digest
        );
    }
    assert!(
        eventually(|| !object_file(&cache_dir, &big.digest).exists()).await,
        "premise: fetching 96 MiB more into a 100 MiB store evicts the big blob (least recently used)"
    );
    let heads = proxy.count("HEAD", &blob_path(repo, &big.digest));
    let head = head_blob(&mut client, repo, &big.digest)
        .await
        .expect("HeadBlob of the evicted big blob");
    assert!(head.exists, "the evicted blob still exists upstream");
    assert!(
        !source_of(head.source.as_ref()).1
            && proxy.count("HEAD", &blob_path(repo, &big.digest)) == heads + 1,
        "an evicted blob is no longer answered from cache: {head:?}"
    );

    // The reader that started before the eviction still gets every byte.
    let read = stream.finish().await;
    read.end
        .as_ref()
        .expect("the stream of an evicted blob must end cleanly");
    assert_eq!(read.len, big.size, "bytes of the evicted blob's stream");
    assert_eq!(
        read.sha256, big.digest,
        "sha256 of the evicted blob's stream"
    );
    let stored = store_bytes(&cache_dir);
    assert!(stored <= MAX_SIZE, "store holds {stored} bytes at the end");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_blob_is_not_served_through_a_route_whose_upstream_lacks_it() {
    let private = Distribution::start();
    let public = Distribution::start();
    let secret = pseudo_random_bytes(0x5EC, 70_000);
    let digest = private.push_blob("private/x", &secret).await;
    public
        .push_blob("public/y", &pseudo_random_bytes(0x9B, 1_000))
        .await;
    let p = CountingProxy::start(&private.url()).await;
    let q = CountingProxy::start(&public.url()).await;
    let service = InProcess::start(
        &ServiceConfig::new()
            .cache("negative_ttl = \"0s\"")
            .upstream(Upstream::new("p", &p.url()).line("repositories = [\"private/**\"]"))
            .upstream(Upstream::new("q", &q.url()).line("repositories = [\"public/**\"]"))
            .toml(),
    )
    .await;
    let mut client = service.client().await;

    let (info, read) = fetch_blob(&mut client, "private/x", &digest, true)
        .await
        .succeeded();
    assert_eq!(read.data, secret, "blob via private/x");
    assert_eq!(source_of(info.source.as_ref()), ("p".into(), false));

    let on_q = blob_path("public/y", &digest);
    let asked = q.count_path(&on_q);
    let read = fetch_blob(&mut client, "public/y", &digest, true).await;
    assert_eq!(
        read.end.as_ref().err().map(Status::code),
        Some(Code::NotFound),
        "FetchBlob public/y@{digest} (cached via private/x, absent upstream q): {:?}",
        read.end
    );
    assert_eq!(read.len, 0, "no bytes of the private blob via public/y");
    assert!(
        q.count_path(&on_q) > asked,
        "upstream q must be asked about {on_q}; it saw {:?}",
        q.requests()
    );
    let asked = q.count_path(&on_q);
    let head = head_blob(&mut client, "public/y", &digest)
        .await
        .expect("HeadBlob public/y of a blob q lacks");
    assert!(
        !head.exists,
        "HeadBlob via public/y must say the blob does not exist: {head:?}"
    );
    assert!(
        q.count_path(&on_q) > asked,
        "upstream q must be asked again for HeadBlob; it saw {:?}",
        q.requests()
    );

    // Once q holds it too, the cached copy is served via public/y after q
    // confirms (HEAD), without q sending the bytes.
    public.push_blob("public/y", &secret).await;
    let p_before = p.total();
    let (info, read) = fetch_blob(&mut client, "public/y", &digest, true)
        .await
        .succeeded();
    assert_eq!(read.data, secret, "blob via public/y once q holds it");
    assert!(
        source_of(info.source.as_ref()).1,
        "served from cache after q confirmed: {info:?}"
    );
    assert!(q.count("HEAD", &on_q) >= 1, "q confirmed with a HEAD");
    assert_eq!(q.count("GET", &on_q), 0, "q was not asked for the bytes");
    assert_eq!(p.since(p_before), [], "p is not on public/y's route");
    let head = head_blob(&mut client, "public/y", &digest)
        .await
        .expect("HeadBlob public/y once q holds it");
    assert!(head.exists, "HeadBlob via public/y once q holds it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_manifest_is_not_served_through_a_route_whose_upstream_lacks_it() {
    let private = Distribution::start();
    let public = Distribution::start();
    let image = private.push_image("private/x", "v1").await;
    public.push_image("public/y", "v1").await;
    let p = CountingProxy::start(&private.url()).await;
    let q = CountingProxy::start(&public.url()).await;
    let service = InProcess::start(
        &ServiceConfig::new()
            .cache("negative_ttl = \"0s\"")
            .upstream(Upstream::new("p", &p.url()).line("repositories = [\"private/**\"]"))
            .upstream(Upstream::new("q", &q.url()).line("repositories = [\"public/**\"]"))
            .toml(),
    )
    .await;
    let mut client = service.client().await;
    let digest = &image.manifest.digest;

    let got = fetch_manifest(&mut client, "private/x", digest)
        .await
        .expect("manifest via private/x");
    assert_eq!(got.manifest, image.manifest.bytes);

    let on_q = manifest_path("public/y", digest);
    let asked = q.count_path(&on_q);
    let got = fetch_manifest(&mut client, "public/y", digest).await;
    assert_eq!(
        got.as_ref().err().map(Status::code),
        Some(Code::NotFound),
        "FetchManifest public/y@{digest} (cached via private/x, absent upstream q): {got:?}"
    );
    assert!(q.count_path(&on_q) > asked, "q must be asked about {on_q}");
    let head = head_manifest(&mut client, "public/y", digest)
        .await
        .expect("HeadManifest public/y of a manifest q lacks");
    assert!(!head.exists, "HeadManifest via public/y: {head:?}");

    // Push the same image to q: now it is served via public/y from cache.
    for blob in image.layers.iter().chain([&image.config]) {
        public.push_blob("public/y", &blob.data).await;
    }
    public
        .push_manifest(
            "public/y",
            digest,
            &image.manifest.media_type,
            image.manifest.bytes.clone(),
        )
        .await;
    let got = fetch_manifest(&mut client, "public/y", digest)
        .await
        .expect("manifest via public/y once q holds it");
    assert_eq!(got.manifest, image.manifest.bytes);
    assert!(
        source_of(got.source.as_ref()).1,
        "served from cache after q confirmed: {got:?}"
    );
    assert_eq!(q.count("GET", &on_q), 0, "q was not asked for the bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_found_is_remembered_for_negative_ttl() {
    let registry = Distribution::start();
    let repo = "cache/negative";
    registry.push_image(repo, "v1").await;
    let proxy = CountingProxy::start(&registry.url()).await;
    let service = InProcess::start(
        &ServiceConfig::with(origin(&proxy.url()))
            .cache("negative_ttl = \"30s\"")
            .toml(),
    )
    .await;
    let mut client = service.client().await;

    for attempt in 1..=2 {
        let got = fetch_manifest(&mut client, repo, "missing").await;
        assert_eq!(
            got.as_ref().err().map(Status::code),
            Some(Code::NotFound),
            "FetchManifest {repo}:missing, attempt {attempt}: {got:?}"
        );
    }
    assert_eq!(
        proxy.count_path(&manifest_path(repo, "missing")),
        1,
        "two FetchManifest calls for a missing tag within negative_ttl make one upstream request; saw {:?}",
        proxy.requests()
    );
}
