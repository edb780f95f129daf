//! Cache behaviour under faults, against fake and slow upstreams (the tests
//! that kill the service or show its log run the binary, the others the
//! service in process): concurrent cold fetches of one blob share one upstream
//! download whose bytes reach late joiners while it runs; a SIGKILL in the
//! middle of a download leaves nothing in the store and the blob is fetched
//! again after the restart; tag entries follow `tag_ttl`, are refreshed in the
//! background when stale and are served stale when the upstream fails, up to
//! `stale_if_error`.

use crate::common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::config::{ServiceConfig, Upstream};
use common::content::{OCI_MANIFEST, image_manifest, random_blob, sha256_digest};
use common::fake::{FakeRegistry, Reply};
use common::rpc::{BlobStream, Client, blob_request, fetch_manifest, head_manifest};
use common::slow::SlowBlobServer;
use common::{InProcess, POLL_BOUND, Spawned, eventually, eventually_within};
use oci_upstream::pb::BlobInfo;
use tokio::time::Instant;
use tonic::{Code, Status};

/// Pause between two polls of a loop that polls with RPCs.
const POLL_INTERVAL: Duration = Duration::from_millis(20);
const MIB: usize = 1024 * 1024;
/// The slow upstream's pace: this many bytes, then [`SLOW_DELAY`].
const SLOW_CHUNK: usize = 64 * 1024;
/// About 16 MiB/s: a 64 MiB download lasts a few seconds, well above the
/// service's default `min_rate`.
const SLOW_DELAY: Duration = Duration::from_millis(4);

/// Polls `done` until it holds, failing with `what` after the poll bound.
async fn wait_for(what: &str, done: impl FnMut() -> bool) {
    assert!(eventually(done).await, "gave up waiting for {what}");
}

/// Starts FetchBlob of blob `digest`, whose content is `expected`: every
/// data byte is compared as it arrives, so a stream read to its end with all
/// its bytes is byte-identical to the blob and thereby verified.
async fn start_reader(
    client: &mut Client,
    repository: &str,
    digest: &str,
    expected: Arc<Bytes>,
) -> BlobStream {
    BlobStream::open(client, blob_request(repository, digest))
        .await
        .expect("FetchBlob call")
        .expect(Bytes::clone(&expected))
}

/// Reads to an OK end; the info and the byte count. With the count equal to
/// the blob's size, the stream was the blob, byte for byte.
async fn finish_reader(reader: BlobStream) -> (BlobInfo, u64) {
    let (info, read) = reader.finish().await.succeeded();
    (info, read.len)
}

/// Whether a response's source says "from cache".
fn cache_hit(source: Option<&oci_upstream::pb::Source>) -> bool {
    source.expect("responses carry a source").cache_hit
}

/// The lines of the service's log that mention `word`.
fn log_lines(service: &Spawned, word: &str) -> String {
    service
        .logs()
        .lines()
        .filter(|l| l.contains(word))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The files in `dir` (none if it does not exist).
fn files_in(dir: &Path) -> Vec<(String, u64)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .map(|e| {
            let e = e.expect("list a cache directory");
            let len = e.metadata().expect("cache file metadata").len();
            (e.file_name().to_string_lossy().into_owned(), len)
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Tests.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_cold_fetches_share_one_download_and_joiners_get_bytes_early() {
    const CALLERS: usize = 32;
    const SIZE: usize = 64 * MIB + 12_345;
    let repo = "team/big";
    let data = Arc::new(random_blob(0xC0A1E5CE, SIZE));
    let digest = sha256_digest(&data);
    let slow = Arc::new(SlowBlobServer::start(
        repo,
        Bytes::clone(&data),
        SLOW_CHUNK,
        SLOW_DELAY,
    ));
    assert_eq!(slow.digest(), digest, "the slow upstream serves this blob");
    // A process: a failure shows the service's log about the blob.
    let service = Arc::new(Spawned::start(
        &ServiceConfig::with(Upstream::new("slow", &slow.url())).toml(),
    ));

    // The first caller starts the download; the others join once the
    // upstream has begun sending, so every one of them joins a running
    // download. Each notes whether the upstream had already sent its last
    // byte when the caller's first data arrived.
    async fn read_noting_upstream(
        mut reader: BlobStream,
        slow: Arc<SlowBlobServer>,
    ) -> (bool, (BlobInfo, u64)) {
        reader.first_data().await;
        let upstream_done_at_first_data = slow.completed_gets() > 0;
        (upstream_done_at_first_data, finish_reader(reader).await)
    }
    let mut client = service.client().await;
    let first = start_reader(&mut client, repo, &digest, data.clone()).await;
    wait_for("the upstream to start sending the blob", || {
        slow.sent_bytes() > 0
    })
    .await;
    assert_eq!(
        slow.completed_gets(),
        0,
        "premise: the slow upstream must still be sending when the joiners start"
    );
    let mut tasks = vec![tokio::spawn({
        let slow = slow.clone();
        async move {
            let _client = client;
            read_noting_upstream(first, slow).await
        }
    })];
    for _ in 1..CALLERS {
        let (service, slow, data, digest) =
            (service.clone(), slow.clone(), data.clone(), digest.clone());
        tasks.push(tokio::spawn(async move {
            let mut client = service.client().await;
            let reader = start_reader(&mut client, repo, &digest, data).await;
            read_noting_upstream(reader, slow).await
        }));
    }
    let mut late = Vec::new();
    for (i, task) in tasks.into_iter().enumerate() {
        let (upstream_done, (info, len)) = task.await.expect("a caller task panicked");
        assert_eq!(len, SIZE as u64, "caller {i}: bytes received");
        assert_eq!(info.size, SIZE as i64, "caller {i}: info.size");
        assert_eq!(info.digest, digest, "caller {i}: info.digest");
        if upstream_done {
            late.push(i);
        }
    }
    assert_eq!(
        slow.blob_gets(),
        1,
        "{CALLERS} concurrent FetchBlob calls of one cold blob must make exactly one upstream GET; \
         requests: {:?}; service log about the blob:\n{}",
        slow.requests(),
        log_lines(&service, "blob")
    );
    assert_eq!(
        late,
        Vec::<usize>::new(),
        "these callers (0 started the download, the others joined it) got their first data \
         only after the upstream had sent the whole blob; callers must get bytes as they \
         arrive, not after the download"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_download_leaves_no_object_and_the_blob_is_fetched_again() {
    const SIZE: usize = 32 * MIB + 7;
    let repo = "team/crash";
    let data = Arc::new(random_blob(0xDEAD, SIZE));
    let digest = sha256_digest(&data);
    let slow = SlowBlobServer::start(repo, Bytes::clone(&data), SLOW_CHUNK, SLOW_DELAY);
    let cache = tempfile::tempdir().expect("temp dir for the cache");
    let cache_dir = cache.path().join("cache");
    let env = [(
        "OCI_UPSTREAM_CACHE_DIR",
        cache_dir.to_str().expect("temp paths are UTF-8"),
    )];
    let toml = ServiceConfig::with(Upstream::new("slow", &slow.url())).toml();
    let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
    let object = cache_dir.join("objects/sha256").join(hex);
    let meta = cache_dir.join(format!("objects/sha256/{hex}.meta"));
    let tmp = cache_dir.join("tmp");

    // A process, to be killed mid-download.
    let mut service = Spawned::start_with_env(&toml, &env);
    let mut client = service.client().await;
    let mut reader = start_reader(&mut client, repo, &digest, data.clone()).await;
    reader.first_data().await;
    // Callers get bytes before they reach the file; wait for the file too.
    eventually_within(Duration::from_secs(10), || {
        files_in(&tmp).iter().any(|(_, len)| *len > 0)
    })
    .await;
    service.kill();
    assert_eq!(
        slow.completed_gets(),
        0,
        "the kill must land in the middle of the download"
    );
    drop(reader);
    assert!(
        !object.exists() && !meta.exists(),
        "no object for a blob whose download was cut"
    );
    let partial = files_in(&tmp);
    assert!(
        partial
            .iter()
            .any(|(_, len)| *len > 0 && *len < SIZE as u64),
        "premise: a partial download is in {} at the kill: {partial:?}",
        tmp.display()
    );

    // Restart on the same cache: the leftover is gone and the blob is not
    // served from cache, but fetched again (at full speed now).
    slow.set_delay(Duration::ZERO);
    let service = Spawned::start_with_env(&toml, &env);
    assert_eq!(
        files_in(&tmp),
        Vec::<(String, u64)>::new(),
        "tmp must be emptied at start"
    );
    assert!(
        !object.exists() && !meta.exists(),
        "no object for the interrupted blob after the restart"
    );
    let mut client = service.client().await;
    let reader = start_reader(&mut client, repo, &digest, data.clone()).await;
    let (info, len) = finish_reader(reader).await;
    assert_eq!(len, SIZE as u64, "bytes of the refetched blob");
    assert!(
        !cache_hit(info.source.as_ref()),
        "the interrupted blob must not be a cache hit after the restart"
    );
    assert_eq!(
        slow.blob_gets(),
        2,
        "the blob is fetched from the upstream again after the restart"
    );
    let reader = start_reader(&mut client, repo, &digest, data).await;
    let (info, len) = finish_reader(reader).await;
    assert_eq!(len, SIZE as u64, "bytes of the cached blob");
    assert!(
        cache_hit(info.source.as_ref()),
        "once fully fetched the blob is cached"
    );
    assert_eq!(slow.blob_gets(), 2, "a hit makes no upstream GET");
    // The store is written after the caller has its verified bytes (the
    // sync into the store is not on the caller's path): poll, bounded.
    assert!(
        eventually(|| object.is_file()).await,
        "the refetched blob is in the store"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_ttl_stale_while_revalidate_and_stale_if_error() {
    const TAG_TTL: Duration = Duration::from_secs(2);
    /// Margin past the TTL so the entry is surely older than it.
    const PAST: Duration = Duration::from_millis(300);
    let repo = "team/app";
    let tag_path = format!("/v2/{repo}/manifests/v1");
    let fake = FakeRegistry::start().await;
    let old = fake.put_manifest(repo, Some("v1"), OCI_MANIFEST, &image_manifest("one", 1));
    let service = InProcess::start(
        &ServiceConfig::with(Upstream::new("fake", &fake.url()).retries(0))
            .cache("tag_ttl = \"2s\"")
            .cache("stale_if_error = \"24h\"")
            .toml(),
    )
    .await;
    let mut client = service.client().await;

    let got = fetch_manifest(&mut client, repo, "v1")
        .await
        .expect("first FetchManifest of the tag");
    let fetched = Instant::now();
    assert_eq!(got.digest, old, "first answer");
    assert!(!cache_hit(got.source.as_ref()), "first answer is a miss");
    assert_eq!(fake.count(&tag_path), 1);

    // The tag moves upstream; within tag_ttl the cached answer stands and the
    // upstream is not asked.
    let new = fake.put_manifest(repo, Some("v1"), OCI_MANIFEST, &image_manifest("two", 1));
    let got = fetch_manifest(&mut client, repo, "v1")
        .await
        .expect("FetchManifest within tag_ttl");
    assert_eq!(
        got.digest, old,
        "within tag_ttl the cached digest is served"
    );
    assert!(cache_hit(got.source.as_ref()), "within tag_ttl: a hit");
    assert_eq!(
        fake.count(&tag_path),
        1,
        "within tag_ttl the upstream is not asked"
    );

    // Past tag_ttl: the stale digest is answered at once and a background
    // refresh asks the upstream.
    tokio::time::sleep_until(fetched + TAG_TTL + PAST).await;
    let got = fetch_manifest(&mut client, repo, "v1")
        .await
        .expect("FetchManifest of a stale tag");
    assert_eq!(
        got.digest, old,
        "a stale tag is answered from cache (stale-while-revalidate)"
    );
    assert!(cache_hit(got.source.as_ref()), "stale answer is a hit");
    wait_for("the background refresh to ask the upstream", || {
        fake.count(&tag_path) >= 2
    })
    .await;
    let deadline = Instant::now() + POLL_BOUND;
    let refreshed = loop {
        let got = fetch_manifest(&mut client, repo, "v1")
            .await
            .expect("FetchManifest after the refresh");
        if got.digest == new {
            assert!(
                cache_hit(got.source.as_ref()),
                "refreshed answer from cache"
            );
            break Instant::now();
        }
        assert_eq!(
            got.digest, old,
            "the tag is either the old or the new digest"
        );
        assert!(
            Instant::now() < deadline,
            "the refreshed digest was never served"
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    };

    // The upstream now fails everything; once the entry is stale again, the
    // last digest is still served.
    for path in [
        "/v2/".to_string(),
        tag_path.clone(),
        format!("/v2/{repo}/manifests/{old}"),
        format!("/v2/{repo}/manifests/{new}"),
    ] {
        fake.on(&path, Reply::status(503));
    }
    tokio::time::sleep_until(refreshed + TAG_TTL + PAST).await;
    let asked = fake.count(&tag_path);
    let got = fetch_manifest(&mut client, repo, "v1")
        .await
        .expect("FetchManifest of a stale tag while the upstream answers 503");
    assert_eq!(got.digest, new, "stale-if-error serves the last digest");
    let head = head_manifest(&mut client, repo, "v1")
        .await
        .expect("HeadManifest of a stale tag while the upstream answers 503");
    assert!(head.exists, "stale-if-error HeadManifest exists");
    assert_eq!(head.digest, new, "stale-if-error HeadManifest digest");
    assert!(
        fake.count(&tag_path) > asked,
        "the upstream was asked (and failed) for the stale tag"
    );
    let got = fetch_manifest(&mut client, repo, "v1")
        .await
        .expect("FetchManifest after a failed refresh");
    assert_eq!(got.digest, new, "a failed refresh keeps the entry");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_tag_is_not_served_past_stale_if_error() {
    const TAG_TTL: Duration = Duration::from_secs(1);
    const STALE_IF_ERROR: Duration = Duration::from_secs(3);
    const PAST: Duration = Duration::from_millis(300);
    let repo = "team/old";
    let tag_path = format!("/v2/{repo}/manifests/v1");
    let fake = FakeRegistry::start().await;
    let digest = fake.put_manifest(repo, Some("v1"), OCI_MANIFEST, &image_manifest("old", 1));
    let service = InProcess::start(
        &ServiceConfig::with(Upstream::new("fake", &fake.url()).retries(0))
            .cache("tag_ttl = \"1s\"")
            .cache("stale_if_error = \"3s\"")
            .toml(),
    )
    .await;
    let mut client = service.client().await;
    let got = fetch_manifest(&mut client, repo, "v1")
        .await
        .expect("first FetchManifest of the tag");
    // The entry was written before this instant.
    let fetched = Instant::now();
    assert_eq!(got.digest, digest);
    for path in [
        "/v2/".to_string(),
        tag_path,
        format!("/v2/{repo}/manifests/{digest}"),
    ] {
        fake.on(&path, Reply::status(503));
    }

    // Stale, within stale_if_error: served.
    tokio::time::sleep_until(fetched + TAG_TTL + PAST).await;
    let got = fetch_manifest(&mut client, repo, "v1")
        .await
        .expect("a stale tag within stale_if_error is served while the upstream fails");
    assert_eq!(got.digest, digest);

    // Older than stale_if_error: the upstream's failure shows.
    tokio::time::sleep_until(fetched + STALE_IF_ERROR + PAST).await;
    let got = fetch_manifest(&mut client, repo, "v1").await;
    assert_eq!(
        got.as_ref().err().map(Status::code),
        Some(Code::Unavailable),
        "a tag entry older than stale_if_error must not be served: {got:?}"
    );
}
