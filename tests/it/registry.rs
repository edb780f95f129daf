//! Integration tests against a real CNCF Distribution registry: every RPC's
//! success path, platform resolution, blob ranges, tag paging, failover and
//! priorities, scope rules (include/exclude globs), NOT_FOUND versus
//! UNAVAILABLE, and INVALID_ARGUMENT for bad input in every request field.
//! The service runs in process.

use crate::common;

use std::fmt::Debug;

use common::InProcess;
use common::config::{ServiceConfig, Upstream};
use common::content::{OCI_INDEX, OCI_MANIFEST, pseudo_random_bytes, sha256_digest};
use common::distribution::Distribution;
use common::rpc::{
    Client, blob_request, fetch_manifest, fetch_tags, head_blob, head_blob_request, head_manifest,
    head_manifest_request, manifest_request, read_blob, tags_request, unary,
};
use oci_upstream::pb::{
    BlobInfo, FetchBlobRequest, FetchManifestRequest, FetchManifestResponse, FetchTagsRequest,
    FetchTagsResponse, HeadBlobRequest, HeadManifestRequest, Platform,
};
use tonic::{Code, Status};

/// A whole FetchBlob stream; the common reader checks the framing the
/// contract promises (info on the first message only, at most 1 MiB of data
/// per message, each message's `offset` the position of its first byte).
#[derive(Debug)]
struct BlobRead {
    info: BlobInfo,
    data: Vec<u8>,
}

/// Runs FetchBlob to the end. The status is returned whether it came as the
/// call's answer or as the stream's terminating item.
async fn fetch_blob(client: &mut Client, req: FetchBlobRequest) -> Result<BlobRead, Status> {
    let mut read = read_blob(client, req).await;
    std::mem::replace(&mut read.end, Ok(()))?;
    Ok(BlobRead {
        info: read
            .info
            .expect("a FetchBlob stream has at least the info message"),
        data: read.data,
    })
}

/// FetchManifest of `repository` at `reference` for `platform`
/// (`(os, architecture, variant)`).
async fn fetch_for_platform(
    client: &mut Client,
    repository: &str,
    reference: &str,
    platform: (&str, &str, &str),
) -> Result<FetchManifestResponse, Status> {
    unary(client.fetch_manifest(FetchManifestRequest {
        platform: Some(Platform {
            os: platform.0.into(),
            architecture: platform.1.into(),
            variant: platform.2.into(),
        }),
        ..manifest_request(repository, reference)
    }))
    .await
}

fn range_req(repository: &str, digest: &str, offset: i64, length: i64) -> FetchBlobRequest {
    FetchBlobRequest {
        offset,
        length,
        ..blob_request(repository, digest)
    }
}

/// One page of FetchTags of `repository`: at most `n` tags (0: all), after
/// `last`.
async fn fetch_tags_page(
    client: &mut Client,
    repository: &str,
    n: i32,
    last: &str,
) -> Result<FetchTagsResponse, Status> {
    unary(client.fetch_tags(FetchTagsRequest {
        n,
        last: last.into(),
        ..tags_request(repository)
    }))
    .await
}

fn source_of(source: &Option<oci_upstream::pb::Source>) -> &str {
    source
        .as_ref()
        .map(|s| s.upstream.as_str())
        .unwrap_or("<no source>")
}

/// True when `message` contains `word` as a whole word (case-insensitive).
fn mentions(message: &str, word: &str) -> bool {
    message
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .any(|w| w.eq_ignore_ascii_case(word))
}

/// Asserts `result` failed with `code`; returns the message.
#[track_caller]
fn expect_code<T: Debug>(what: &str, result: Result<T, Status>, code: Code) -> String {
    match result {
        Err(status) if status.code() == code => status.message().to_string(),
        Err(status) => panic!(
            "{what}: expected {code:?}, got {:?}: {}",
            status.code(),
            status.message()
        ),
        Ok(resp) => panic!("{what}: expected {code:?}, got OK: {resp:?}"),
    }
}

/// For table tests: `None` when `result` is INVALID_ARGUMENT and its message
/// names one of `fields`, otherwise a line describing what came back.
fn invalid_argument_problem<T>(
    what: &str,
    result: Result<T, Status>,
    fields: &[&str],
) -> Option<String> {
    match result {
        Err(s)
            if s.code() == Code::InvalidArgument
                && fields.iter().any(|f| mentions(s.message(), f)) =>
        {
            None
        }
        Err(s) => Some(format!(
            "{what}: expected INVALID_ARGUMENT naming {fields:?}; got {:?}: {:?}",
            s.code(),
            s.message()
        )),
        Ok(_) => Some(format!(
            "{what}: expected INVALID_ARGUMENT naming {fields:?}; got OK"
        )),
    }
}

/// A registry and a service with that registry as its only upstream,
/// `primary`, admitting every repository.
struct Fixture {
    registry: Distribution,
    #[allow(dead_code)] // held so the service lives as long as the fixture
    service: InProcess,
    client: Client,
}

impl Fixture {
    async fn start() -> Fixture {
        Self::start_with(r#"repositories = ["**"]"#).await
    }

    /// As [`Fixture::start`], with extra lines for the upstream block.
    async fn start_with(upstream_extra: &str) -> Fixture {
        let registry = Distribution::start();
        let service = InProcess::start(
            &ServiceConfig::with(
                Upstream::new("primary", &registry.url())
                    .priority(10)
                    .line(upstream_extra),
            )
            .toml(),
        )
        .await;
        let client = service.client().await;
        Fixture {
            registry,
            service,
            client,
        }
    }
}

/// Config lines that keep retries against a stopped registry short.
const FAST_FAILURE: &str = "retries = 1\nretry_max_delay = \"100ms\"\nconnect_timeout = \"2s\"";

// ---------------------------------------------------------------------------
// Success paths

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_manifest_by_tag_and_by_digest() {
    let mut f = Fixture::start().await;
    let image = f.registry.push_image("team/app", "v1").await;

    for reference in ["v1", image.manifest.digest.as_str()] {
        let resp = fetch_manifest(&mut f.client, "team/app", reference)
            .await
            .unwrap_or_else(|s| panic!("FetchManifest team/app {reference}: {s:?}"));
        assert_eq!(
            resp.manifest, image.manifest.bytes,
            "manifest bytes for {reference}"
        );
        assert_eq!(resp.digest, image.manifest.digest, "digest for {reference}");
        assert_eq!(
            resp.digest,
            sha256_digest(&resp.manifest),
            "digest is sha256 of the bytes"
        );
        assert_eq!(resp.media_type, OCI_MANIFEST, "media type for {reference}");
        assert_eq!(
            resp.size,
            image.manifest.bytes.len() as i64,
            "size for {reference}"
        );
        assert_eq!(source_of(&resp.source), "primary", "source for {reference}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_manifest_of_index_without_platform_returns_the_index() {
    let mut f = Fixture::start().await;
    let index = f.registry.push_index("multi/app", "latest").await;
    let resp = fetch_manifest(&mut f.client, "multi/app", "latest")
        .await
        .expect("FetchManifest of an index");
    assert_eq!(resp.manifest, index.index.bytes);
    assert_eq!(resp.digest, index.index.digest);
    assert_eq!(resp.media_type, OCI_INDEX);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_manifest_reports_existing_and_missing() {
    let mut f = Fixture::start().await;
    let image = f.registry.push_image("team/app", "v1").await;

    for reference in ["v1", image.manifest.digest.as_str()] {
        let resp = head_manifest(&mut f.client, "team/app", reference)
            .await
            .unwrap_or_else(|s| panic!("HeadManifest team/app {reference}: {s:?}"));
        assert!(resp.exists, "{reference} exists");
        assert_eq!(resp.digest, image.manifest.digest);
        assert_eq!(resp.size, image.manifest.bytes.len() as i64);
        assert_eq!(resp.media_type, OCI_MANIFEST);
        assert_eq!(source_of(&resp.source), "primary");
    }

    let missing = head_manifest(&mut f.client, "team/app", "no-such-tag")
        .await
        .expect("HeadManifest of a missing tag is OK");
    assert!(!missing.exists, "a missing tag does not exist: {missing:?}");
    assert!(
        missing.digest.is_empty(),
        "no digest for a missing tag: {missing:?}"
    );

    let missing_repo = head_manifest(&mut f.client, "no/such/repo", "v1")
        .await
        .expect("HeadManifest in a missing repository is OK");
    assert!(!missing_repo.exists, "{missing_repo:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_blob_whole_streams_bounded_messages() {
    let mut f = Fixture::start().await;
    // Not a multiple of 1 MiB, so the last message is partial.
    let blob = pseudo_random_bytes(11, 3 * (1 << 20) + 12345);
    let digest = f.registry.push_blob("team/app", &blob).await;

    let read = fetch_blob(&mut f.client, blob_request("team/app", &digest))
        .await
        .expect("FetchBlob whole");
    assert_eq!(read.info.digest, digest);
    assert_eq!(read.info.size, blob.len() as i64);
    assert_eq!(source_of(&read.info.source), "primary");
    assert_eq!(read.data.len(), blob.len(), "received length");
    assert!(read.data == blob, "received bytes equal the blob");

    // A second read (possibly from cache) gives the same bytes.
    let again = fetch_blob(&mut f.client, blob_request("team/app", &digest))
        .await
        .expect("FetchBlob again");
    assert!(again.data == blob, "second read equals the blob");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_blob_of_image_layers_and_config() {
    let mut f = Fixture::start().await;
    let image = f.registry.push_image("team/app", "v1").await;
    for blob in image.layers.iter().chain([&image.config]) {
        let read = fetch_blob(&mut f.client, blob_request("team/app", &blob.digest))
            .await
            .unwrap_or_else(|s| panic!("FetchBlob {}: {s:?}", blob.digest));
        assert_eq!(read.data, blob.data.as_ref());
        assert_eq!(read.info.size, blob.data.len() as i64);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_blob_reports_size_and_missing() {
    let mut f = Fixture::start().await;
    let blob = pseudo_random_bytes(12, 50_000);
    let digest = f.registry.push_blob("team/app", &blob).await;

    let resp = head_blob(&mut f.client, "team/app", &digest)
        .await
        .expect("HeadBlob");
    assert!(resp.exists);
    assert_eq!(resp.digest, digest);
    assert_eq!(resp.size, blob.len() as i64);
    assert_eq!(source_of(&resp.source), "primary");

    let absent = sha256_digest(b"never pushed");
    let resp = head_blob(&mut f.client, "team/app", &absent)
        .await
        .expect("HeadBlob of a missing digest is OK");
    assert!(!resp.exists, "{resp:?}");
    assert_eq!(resp.size, 0, "{resp:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_missing_manifest_and_blob_is_not_found() {
    let mut f = Fixture::start().await;
    f.registry.push_image("team/app", "v1").await;
    let msg = expect_code(
        "FetchManifest missing tag",
        fetch_manifest(&mut f.client, "team/app", "no-such-tag").await,
        Code::NotFound,
    );
    assert!(
        msg.contains("no-such-tag") || msg.contains("team/app"),
        "message names what was missing: {msg}"
    );
    expect_code(
        "FetchBlob missing digest",
        fetch_blob(
            &mut f.client,
            blob_request("team/app", &sha256_digest(b"never pushed")),
        )
        .await,
        Code::NotFound,
    );
    expect_code(
        "FetchTags missing repository",
        fetch_tags(&mut f.client, "no/such/repo").await,
        Code::NotFound,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_tags_lists_pushed_tags() {
    let mut f = Fixture::start().await;
    let image = f.registry.push_image("team/app", "v2").await;
    f.registry.tag("team/app", "v1", &image.manifest).await;
    f.registry.tag("team/app", "latest", &image.manifest).await;

    let resp = fetch_tags(&mut f.client, "team/app")
        .await
        .expect("FetchTags");
    assert_eq!(resp.name, "team/app");
    assert_eq!(resp.tags, ["latest", "v1", "v2"]);
    assert!(resp.next_last.is_empty(), "{resp:?}");
    assert_eq!(source_of(&resp.source), "primary");
}

// ---------------------------------------------------------------------------
// Platform resolution

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn platform_resolves_index_to_child_manifest() {
    let mut f = Fixture::start().await;
    let index = f.registry.push_index("multi/app", "latest").await;

    let cases = [
        (("linux", "arm64", "v8"), &index.arm64),
        (("linux", "arm64", ""), &index.arm64),
        (("linux", "amd64", ""), &index.amd64),
    ];
    for (platform, child) in cases {
        let resp = fetch_for_platform(&mut f.client, "multi/app", "latest", platform)
            .await
            .unwrap_or_else(|s| panic!("FetchManifest with platform {platform:?}: {s:?}"));
        assert_eq!(
            resp.manifest, child.manifest.bytes,
            "bytes for {platform:?}"
        );
        assert_eq!(
            resp.digest, child.manifest.digest,
            "digest for {platform:?}"
        );
        assert_eq!(resp.media_type, OCI_MANIFEST, "media type for {platform:?}");
        assert_eq!(resp.size, child.manifest.bytes.len() as i64);
        assert_eq!(source_of(&resp.source), "primary");
    }

    // By the index's digest, too.
    let resp = fetch_for_platform(
        &mut f.client,
        "multi/app",
        &index.index.digest,
        ("linux", "arm64", "v8"),
    )
    .await
    .expect("FetchManifest of the index digest with a platform");
    assert_eq!(resp.digest, index.arm64.manifest.digest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn platform_arm64_without_variant_in_index_counts_as_v8() {
    let mut f = Fixture::start().await;
    let index = f
        .registry
        .push_index_without_arm64_variant("multi/app", "novariant")
        .await;
    for variant in ["v8", ""] {
        let resp = fetch_for_platform(
            &mut f.client,
            "multi/app",
            "novariant",
            ("linux", "arm64", variant),
        )
        .await
        .unwrap_or_else(|s| {
            panic!("linux/arm64/{variant} against an index without variant: {s:?}")
        });
        assert_eq!(
            resp.digest, index.arm64.manifest.digest,
            "variant {variant:?}"
        );
    }
    expect_code(
        "linux/arm64/v7 against arm64 without variant",
        fetch_for_platform(
            &mut f.client,
            "multi/app",
            "novariant",
            ("linux", "arm64", "v7"),
        )
        .await,
        Code::NotFound,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn platform_not_in_index_is_not_found_naming_it() {
    let mut f = Fixture::start().await;
    f.registry.push_index("multi/app", "latest").await;

    let msg = expect_code(
        "linux/s390x",
        fetch_for_platform(&mut f.client, "multi/app", "latest", ("linux", "s390x", "")).await,
        Code::NotFound,
    );
    assert!(
        msg.contains("s390x"),
        "NOT_FOUND message names the platform: {msg}"
    );

    let msg = expect_code(
        "linux/arm64/v7",
        fetch_for_platform(
            &mut f.client,
            "multi/app",
            "latest",
            ("linux", "arm64", "v7"),
        )
        .await,
        Code::NotFound,
    );
    assert!(
        msg.contains("arm64"),
        "NOT_FOUND message names the platform: {msg}"
    );

    let msg = expect_code(
        "windows/amd64",
        fetch_for_platform(
            &mut f.client,
            "multi/app",
            "latest",
            ("windows", "amd64", ""),
        )
        .await,
        Code::NotFound,
    );
    assert!(
        msg.contains("windows"),
        "NOT_FOUND message names the platform: {msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn platform_on_single_manifest_returns_it_unchanged() {
    let mut f = Fixture::start().await;
    let image = f.registry.push_image("team/app", "v1").await;
    // The image is linux/amd64, but a platform on a non-index is ignored.
    for platform in [("linux", "arm64", "v8"), ("linux", "amd64", "")] {
        let resp = fetch_for_platform(&mut f.client, "team/app", "v1", platform)
            .await
            .unwrap_or_else(|s| panic!("platform {platform:?} on a single manifest: {s:?}"));
        assert_eq!(resp.manifest, image.manifest.bytes, "{platform:?}");
        assert_eq!(resp.digest, image.manifest.digest, "{platform:?}");
    }
}

// ---------------------------------------------------------------------------
// Blob ranges

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_blob_ranges() {
    let mut f = Fixture::start().await;
    let blob = pseudo_random_bytes(13, 3 * (1 << 20) + 999);
    let size = blob.len() as i64;
    let digest = f.registry.push_blob("team/app", &blob).await;

    let cases: [(&str, i64, i64, std::ops::Range<usize>); 6] = [
        ("middle", 100_000, 5_000, 100_000..105_000),
        (
            "across message boundaries",
            (1 << 20) - 10,
            2 * (1 << 20) + 20,
            (1 << 20) - 10..3 * (1 << 20) + 10,
        ),
        (
            "offset to the end (length 0)",
            size - 777,
            0,
            blob.len() - 777..blob.len(),
        ),
        (
            "past the end is clamped",
            size - 100,
            1_000,
            blob.len() - 100..blob.len(),
        ),
        ("huge length is clamped", 5, i64::MAX, 5..blob.len()),
        ("offset == size: info only", size, 0, blob.len()..blob.len()),
    ];
    for (what, offset, length, expected) in cases {
        let read = fetch_blob(
            &mut f.client,
            range_req("team/app", &digest, offset, length),
        )
        .await
        .unwrap_or_else(|s| panic!("{what} (offset {offset}, length {length}): {s:?}"));
        assert_eq!(read.info.digest, digest, "{what}");
        assert_eq!(
            read.info.size, size,
            "{what}: info.size is the whole blob's"
        );
        assert_eq!(read.data.len(), expected.len(), "{what}: range length");
        assert!(read.data == blob[expected], "{what}: range bytes");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_blob_offset_past_end_is_out_of_range() {
    let mut f = Fixture::start().await;
    let blob = pseudo_random_bytes(14, 10_000);
    let digest = f.registry.push_blob("team/app", &blob).await;
    expect_code(
        "offset = size + 1",
        fetch_blob(&mut f.client, range_req("team/app", &digest, 10_001, 0)).await,
        Code::OutOfRange,
    );
    expect_code(
        "offset far past the end",
        fetch_blob(&mut f.client, range_req("team/app", &digest, 1 << 40, 10)).await,
        Code::OutOfRange,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_blob_negative_offset_or_length_is_invalid() {
    let mut f = Fixture::start().await;
    let blob = pseudo_random_bytes(15, 10_000);
    let digest = f.registry.push_blob("team/app", &blob).await;
    let mut problems = Vec::new();
    problems.extend(invalid_argument_problem(
        "offset -1",
        fetch_blob(&mut f.client, range_req("team/app", &digest, -1, 0)).await,
        &["offset"],
    ));
    problems.extend(invalid_argument_problem(
        "length -1",
        fetch_blob(&mut f.client, range_req("team/app", &digest, 0, -1)).await,
        &["length"],
    ));
    problems.extend(invalid_argument_problem(
        "offset i64::MIN",
        fetch_blob(&mut f.client, range_req("team/app", &digest, i64::MIN, 10)).await,
        &["offset"],
    ));
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

// ---------------------------------------------------------------------------
// Tag paging

/// Tags in an order that is neither lexical nor push-stable; byte order puts
/// `Z9` first (uppercase sorts before lowercase) and `v10` before `v2`.
const TAGS: [&str; 7] = ["v2", "latest", "v10", "Z9", "v2.1_rc", "a-tag", "v1.0"];

async fn push_tags(registry: &Distribution, repo: &str) -> Vec<String> {
    let image = registry.push_image(repo, TAGS[0]).await;
    for tag in &TAGS[1..] {
        registry.tag(repo, tag, &image.manifest).await;
    }
    let mut sorted: Vec<String> = TAGS.iter().map(|t| t.to_string()).collect();
    sorted.sort();
    sorted
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_pages_visit_every_tag_once_in_lexical_order() {
    let mut f = Fixture::start().await;
    let expected = push_tags(&f.registry, "team/app").await;

    let mut seen = Vec::new();
    let mut last = String::new();
    let mut pages = 0;
    loop {
        pages += 1;
        assert!(
            pages <= 2 * TAGS.len(),
            "paging does not end; seen so far {seen:?}"
        );
        let page = fetch_tags_page(&mut f.client, "team/app", 2, &last)
            .await
            .unwrap_or_else(|s| panic!("FetchTags n=2 last={last:?}: {s:?}"));
        assert_eq!(page.name, "team/app");
        assert!(
            page.tags.len() <= 2,
            "page {pages} has more than n tags: {:?}",
            page.tags
        );
        seen.extend(page.tags.iter().cloned());
        if page.next_last.is_empty() {
            break;
        }
        assert!(
            !page.tags.is_empty(),
            "page {pages} is empty but has next_last {:?}",
            page.next_last
        );
        last = page.next_last;
    }
    assert_eq!(seen, expected, "every tag exactly once, in lexical order");
    // Seven tags, two per page: the fourth page holds the last tag alone and
    // must already say there is nothing more.
    assert_eq!(pages, 4, "pages for 7 tags with n=2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_with_n_zero_are_all_sorted() {
    let mut f = Fixture::start().await;
    let expected = push_tags(&f.registry, "team/app").await;
    let resp = fetch_tags(&mut f.client, "team/app")
        .await
        .expect("FetchTags n=0");
    assert_eq!(resp.tags, expected);
    assert!(resp.next_last.is_empty(), "{resp:?}");
    assert_eq!(resp.name, "team/app");

    // `last` alone (n = 0) returns everything after it.
    let resp = fetch_tags_page(&mut f.client, "team/app", 0, "latest")
        .await
        .expect("FetchTags n=0 last=latest");
    let after: Vec<String> = expected
        .iter()
        .filter(|t| t.as_str() > "latest")
        .cloned()
        .collect();
    assert_eq!(resp.tags, after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_name_is_the_repository_as_written() {
    // With library_prefix, `app` is `library/app` upstream; the answer still
    // says `app`. Two-component names are not prefixed.
    let mut f = Fixture::start_with("repositories = [\"**\"]\nlibrary_prefix = true").await;
    let image = f.registry.push_image("library/app", "1").await;
    f.registry.push_image("team/app", "2").await;

    let resp = fetch_tags(&mut f.client, "app")
        .await
        .expect("FetchTags app (library/app upstream)");
    assert_eq!(resp.name, "app", "name as the caller wrote it");
    assert_eq!(resp.tags, ["1"]);

    let resp = fetch_manifest(&mut f.client, "app", "1")
        .await
        .expect("FetchManifest app:1 (library/app upstream)");
    assert_eq!(resp.digest, image.manifest.digest);

    let resp = fetch_tags(&mut f.client, "team/app")
        .await
        .expect("FetchTags team/app is not prefixed");
    assert_eq!(resp.name, "team/app");
    assert_eq!(resp.tags, ["2"]);
}

// ---------------------------------------------------------------------------
// Failover, priorities and the `upstream` request field

/// Registry `a` (priority 10, empty) and `b` (priority 20), in that order.
struct TwoRegistries {
    a: Distribution,
    b: Distribution,
    #[allow(dead_code)] // held so the service lives as long as the fixture
    service: InProcess,
    client: Client,
}

impl TwoRegistries {
    async fn start(extra: &str) -> TwoRegistries {
        let a = Distribution::start();
        let b = Distribution::start();
        let config = ServiceConfig::new()
            .upstream(Upstream::new("a", &a.url()).priority(10).line(extra))
            .upstream(Upstream::new("b", &b.url()).priority(20).line(extra))
            .toml();
        let service = InProcess::start(&config).await;
        let client = service.client().await;
        TwoRegistries {
            a,
            b,
            service,
            client,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_to_lower_priority_upstream() {
    let mut t = TwoRegistries::start("").await;
    let image = t.b.push_image("team/app", "v1").await;

    let resp = fetch_manifest(&mut t.client, "team/app", "v1")
        .await
        .expect("FetchManifest falls over to b");
    assert_eq!(resp.manifest, image.manifest.bytes);
    assert_eq!(source_of(&resp.source), "b");

    let resp = head_manifest(&mut t.client, "team/app", "v1")
        .await
        .expect("HeadManifest falls over to b");
    assert!(resp.exists);
    assert_eq!(source_of(&resp.source), "b");

    let layer = &image.layers[0];
    let read = fetch_blob(&mut t.client, blob_request("team/app", &layer.digest))
        .await
        .expect("FetchBlob falls over to b");
    assert_eq!(read.data, layer.data.as_ref());
    assert_eq!(source_of(&read.info.source), "b");

    let resp = head_blob(&mut t.client, "team/app", &layer.digest)
        .await
        .expect("HeadBlob falls over to b");
    assert!(resp.exists);
    assert_eq!(source_of(&resp.source), "b");

    let resp = fetch_tags(&mut t.client, "team/app")
        .await
        .expect("FetchTags falls over to b");
    assert_eq!(resp.tags, ["v1"]);
    assert_eq!(source_of(&resp.source), "b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priority_number_orders_upstreams_not_file_order() {
    // `first` is listed first but has the higher number, so `second` wins.
    let first = Distribution::start();
    let second = Distribution::start();
    // Same repository and tag on both, different content.
    let from_first = first.push_image("team/app", "from-first").await;
    first.tag("team/app", "v1", &from_first.manifest).await;
    let from_second = second.push_image("team/app", "from-second").await;
    second.tag("team/app", "v1", &from_second.manifest).await;
    assert_ne!(from_first.manifest.digest, from_second.manifest.digest);

    let config = ServiceConfig::new()
        .upstream(Upstream::new("first", &first.url()).priority(20))
        .upstream(Upstream::new("second", &second.url()).priority(10))
        .toml();
    let service = InProcess::start(&config).await;
    let mut client = service.client().await;
    let resp = fetch_manifest(&mut client, "team/app", "v1")
        .await
        .expect("FetchManifest");
    assert_eq!(
        source_of(&resp.source),
        "second",
        "lower priority number is tried first"
    );
    assert_eq!(resp.digest, from_second.manifest.digest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_field_restricts_candidates() {
    let mut t = TwoRegistries::start("").await;
    let image = t.b.push_image("team/app", "v1").await;

    let only_a = FetchManifestRequest {
        upstream: "a".into(),
        ..manifest_request("team/app", "v1")
    };
    expect_code(
        "FetchManifest with upstream = a (image only on b)",
        unary(t.client.fetch_manifest(only_a)).await,
        Code::NotFound,
    );

    let head_only_a = HeadManifestRequest {
        upstream: "a".into(),
        ..head_manifest_request("team/app", "v1")
    };
    let resp = unary(t.client.head_manifest(head_only_a))
        .await
        .expect("HeadManifest with upstream = a");
    assert!(!resp.exists, "only a is asked, and a lacks it: {resp:?}");

    let blob_only_a = FetchBlobRequest {
        upstream: "a".into(),
        ..blob_request("team/app", &image.layers[0].digest)
    };
    expect_code(
        "FetchBlob with upstream = a",
        fetch_blob(&mut t.client, blob_only_a).await,
        Code::NotFound,
    );

    let only_b = FetchManifestRequest {
        upstream: "b".into(),
        ..manifest_request("team/app", "v1")
    };
    let resp = unary(t.client.fetch_manifest(only_b))
        .await
        .expect("FetchManifest with upstream = b");
    assert_eq!(resp.digest, image.manifest.digest);
    assert_eq!(source_of(&resp.source), "b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_upstream_name_is_invalid_argument() {
    let mut t = TwoRegistries::start("").await;
    let image = t.b.push_image("team/app", "v1").await;
    let digest = image.layers[0].digest.clone();
    let mut problems = Vec::new();
    problems.extend(invalid_argument_problem(
        "FetchManifest upstream=nope",
        unary(t.client.fetch_manifest(FetchManifestRequest {
            upstream: "nope".into(),
            ..manifest_request("team/app", "v1")
        }))
        .await,
        &["upstream"],
    ));
    problems.extend(invalid_argument_problem(
        "HeadManifest upstream=nope",
        unary(t.client.head_manifest(HeadManifestRequest {
            upstream: "nope".into(),
            ..head_manifest_request("team/app", "v1")
        }))
        .await,
        &["upstream"],
    ));
    problems.extend(invalid_argument_problem(
        "FetchBlob upstream=nope",
        fetch_blob(
            &mut t.client,
            FetchBlobRequest {
                upstream: "nope".into(),
                ..blob_request("team/app", &digest)
            },
        )
        .await,
        &["upstream"],
    ));
    problems.extend(invalid_argument_problem(
        "HeadBlob upstream=nope",
        unary(t.client.head_blob(HeadBlobRequest {
            upstream: "nope".into(),
            ..head_blob_request("team/app", &digest)
        }))
        .await,
        &["upstream"],
    ));
    problems.extend(invalid_argument_problem(
        "FetchTags upstream=nope",
        unary(t.client.fetch_tags(FetchTagsRequest {
            upstream: "nope".into(),
            ..tags_request("team/app")
        }))
        .await,
        &["upstream"],
    ));
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

// ---------------------------------------------------------------------------
// Scope rules

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn excluded_repository_is_not_found() {
    let mut f =
        Fixture::start_with("repositories = [\"**\"]\nexclude = [\"secret/**\", \"private/*\"]")
            .await;
    let repos = [
        ("secret/app", false),
        ("secret/a/b", false),
        ("private/app", false),
        ("private/app/sub", true), // `*` is one segment only
        ("secret", true),          // `secret/**` needs at least one more segment
        ("secretive/app", true),
        ("public/app", true),
    ];
    for (repo, _) in repos {
        f.registry.push_image(repo, "v1").await;
    }
    let mut problems = Vec::new();
    for (repo, admitted) in repos {
        let result = fetch_manifest(&mut f.client, repo, "v1").await;
        match (admitted, result) {
            (true, Ok(_)) => {}
            (false, Err(s)) if s.code() == Code::NotFound => {}
            (admitted, result) => problems.push(format!(
                "{repo}: expected {}, got {:?}",
                if admitted { "OK" } else { "NOT_FOUND" },
                result.map(|r| r.digest)
            )),
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    // The message says that no upstream admits the repository.
    let msg = expect_code(
        "excluded secret/app",
        fetch_manifest(&mut f.client, "secret/app", "v1").await,
        Code::NotFound,
    );
    let lower = msg.to_lowercase();
    assert!(
        lower.contains("upstream")
            && [
                "admit",
                "scope",
                "rule",
                "exclude",
                "match",
                "configured",
                "allow"
            ]
            .iter()
            .any(|w| lower.contains(w)),
        "NOT_FOUND for an excluded repository says no upstream admits it: {msg}"
    );

    // Naming the upstream explicitly does not bypass its rules.
    expect_code(
        "excluded secret/app with upstream = primary",
        unary(f.client.fetch_manifest(FetchManifestRequest {
            upstream: "primary".into(),
            ..manifest_request("secret/app", "v1")
        }))
        .await,
        Code::NotFound,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn include_globs_star_is_one_segment_double_star_one_or_more() {
    let mut f = Fixture::start_with("repositories = [\"team/*\", \"deep/**\"]").await;
    let repos = [
        ("team/app", true),
        ("team/sub/app", false),
        ("team", false),
        ("deep/a", true),
        ("deep/a/b", true),
        ("deep/a/b/c", true),
        ("deep", false),
        ("other/app", false),
    ];
    for (repo, _) in repos {
        f.registry.push_image(repo, "v1").await;
    }
    let mut problems = Vec::new();
    for (repo, admitted) in repos {
        let result = fetch_manifest(&mut f.client, repo, "v1").await;
        match (admitted, result) {
            (true, Ok(_)) => {}
            (false, Err(s)) if s.code() == Code::NotFound => {}
            (admitted, result) => problems.push(format!(
                "{repo}: expected {}, got {:?}",
                if admitted { "OK" } else { "NOT_FOUND" },
                result.map(|r| r.digest)
            )),
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

// ---------------------------------------------------------------------------
// NOT_FOUND versus UNAVAILABLE

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_everywhere_is_not_found_but_one_upstream_down_is_unavailable() {
    let mut t = TwoRegistries::start(FAST_FAILURE).await;
    let image = t.a.push_image("team/app", "v1").await;
    let absent_blob = sha256_digest(b"absent blob");

    // Both upstreams answer 404.
    expect_code(
        "FetchManifest missing on both",
        fetch_manifest(&mut t.client, "team/app", "missing-1").await,
        Code::NotFound,
    );
    let resp = head_manifest(&mut t.client, "team/app", "missing-2")
        .await
        .expect("HeadManifest missing on both");
    assert!(!resp.exists);
    expect_code(
        "FetchBlob missing on both",
        fetch_blob(&mut t.client, blob_request("team/app", &absent_blob)).await,
        Code::NotFound,
    );
    expect_code(
        "FetchTags of a repository on neither",
        fetch_tags(&mut t.client, "team/nothing").await,
        Code::NotFound,
    );

    // `b` goes down: `a`'s 404 is no longer authoritative. Fresh references
    // so that no remembered 404 answers for them.
    t.b.stop();
    let msg = expect_code(
        "FetchManifest missing on a, b down",
        fetch_manifest(&mut t.client, "team/app", "missing-3").await,
        Code::Unavailable,
    );
    assert!(!msg.is_empty(), "UNAVAILABLE carries a message");
    expect_code(
        "HeadManifest missing on a, b down (not exists=false)",
        head_manifest(&mut t.client, "team/app", "missing-4").await,
        Code::Unavailable,
    );
    let other_absent = sha256_digest(b"another absent blob");
    expect_code(
        "FetchBlob missing on a, b down",
        fetch_blob(&mut t.client, blob_request("team/app", &other_absent)).await,
        Code::Unavailable,
    );
    expect_code(
        "HeadBlob missing on a, b down (not exists=false)",
        head_blob(&mut t.client, "team/app", &other_absent).await,
        Code::Unavailable,
    );
    expect_code(
        "FetchTags of a repository on neither, b down",
        fetch_tags(&mut t.client, "team/void").await,
        Code::Unavailable,
    );

    // What `a` (tried first) has is still served.
    let resp = fetch_manifest(&mut t.client, "team/app", "v1")
        .await
        .expect("FetchManifest of an image on a while b is down");
    assert_eq!(resp.digest, image.manifest.digest);
    assert_eq!(source_of(&resp.source), "a");
}

// ---------------------------------------------------------------------------
// Bad input in every field

const GOOD_DIGEST: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000000";

fn bad_repositories() -> Vec<String> {
    vec![
        "Team/App".into(),
        "UPPER".into(),
        "a/../b".into(),
        "..".into(),
        "a//b".into(),
        "/a".into(),
        "a/".into(),
        "a%2Fb".into(),
        "a?b".into(),
        "a#b".into(),
        "a b".into(),
        "a\u{1}b".into(),
        "a\nb".into(),
        "a".repeat(256),
        String::new(),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_repository_is_invalid_argument_in_every_rpc() {
    let mut f = Fixture::start().await;
    f.registry.push_image("team/app", "v1").await;
    let mut problems = Vec::new();
    for repo in bad_repositories() {
        problems.extend(invalid_argument_problem(
            &format!("FetchManifest repository {repo:?}"),
            fetch_manifest(&mut f.client, &repo, "v1").await,
            &["repository"],
        ));
    }
    // One representative per other RPC.
    for repo in ["Team/App", "a//b", ""] {
        problems.extend(invalid_argument_problem(
            &format!("HeadManifest repository {repo:?}"),
            head_manifest(&mut f.client, repo, "v1").await,
            &["repository"],
        ));
        problems.extend(invalid_argument_problem(
            &format!("FetchBlob repository {repo:?}"),
            fetch_blob(&mut f.client, blob_request(repo, GOOD_DIGEST)).await,
            &["repository"],
        ));
        problems.extend(invalid_argument_problem(
            &format!("HeadBlob repository {repo:?}"),
            head_blob(&mut f.client, repo, GOOD_DIGEST).await,
            &["repository"],
        ));
        problems.extend(invalid_argument_problem(
            &format!("FetchTags repository {repo:?}"),
            fetch_tags(&mut f.client, repo).await,
            &["repository"],
        ));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_reference_is_invalid_argument() {
    let mut f = Fixture::start().await;
    f.registry.push_image("team/app", "v1").await;
    let references = vec![
        "bad tag".to_string(),
        "tag!".into(),
        "-leading-dash".into(),
        ".leading-dot".into(),
        "a/b".into(),
        "a".repeat(129),
        "sha256:abc".into(),
        format!("sha256:{}", "A".repeat(64)),
        format!("sha256:{}g", "0".repeat(63)),
        format!("sha512:{}", "0".repeat(64)),
        format!("md5:{}", "0".repeat(32)),
        "sha256:".into(),
        String::new(),
    ];
    let mut problems = Vec::new();
    for reference in &references {
        problems.extend(invalid_argument_problem(
            &format!("FetchManifest reference {reference:?}"),
            fetch_manifest(&mut f.client, "team/app", reference).await,
            &["reference"],
        ));
        problems.extend(invalid_argument_problem(
            &format!("HeadManifest reference {reference:?}"),
            head_manifest(&mut f.client, "team/app", reference).await,
            &["reference"],
        ));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_blob_digest_is_invalid_argument() {
    let mut f = Fixture::start().await;
    f.registry.push_image("team/app", "v1").await;
    let digests = vec![
        String::new(),
        "latest".to_string(),
        "sha256:abc".into(),
        format!("sha256:{}", "A".repeat(64)),
        format!("sha256:{}g", "0".repeat(63)),
        format!("sha512:{}", "0".repeat(64)),
        format!("md5:{}", "0".repeat(32)),
        format!("sha256{}", "0".repeat(64)),
    ];
    let mut problems = Vec::new();
    for digest in &digests {
        problems.extend(invalid_argument_problem(
            &format!("FetchBlob digest {digest:?}"),
            fetch_blob(&mut f.client, blob_request("team/app", digest)).await,
            &["digest"],
        ));
        problems.extend(invalid_argument_problem(
            &format!("HeadBlob digest {digest:?}"),
            head_blob(&mut f.client, "team/app", digest).await,
            &["digest"],
        ));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_accept_is_invalid_argument() {
    let mut f = Fixture::start().await;
    f.registry.push_image("team/app", "v1").await;
    let accepts = [
        format!("{OCI_MANIFEST}\r\nX-Injected: 1"),
        format!("{OCI_MANIFEST}\n"),
        format!("{OCI_MANIFEST}\rX"),
        format!("{OCI_MANIFEST}, {OCI_INDEX}"),
        format!("{OCI_MANIFEST},{OCI_INDEX}"),
    ];
    let mut problems = Vec::new();
    for accept in &accepts {
        problems.extend(invalid_argument_problem(
            &format!("FetchManifest accept {accept:?}"),
            unary(f.client.fetch_manifest(FetchManifestRequest {
                accept: vec![OCI_INDEX.into(), accept.clone()],
                ..manifest_request("team/app", "v1")
            }))
            .await,
            &["accept"],
        ));
        problems.extend(invalid_argument_problem(
            &format!("HeadManifest accept {accept:?}"),
            unary(f.client.head_manifest(HeadManifestRequest {
                accept: vec![accept.clone()],
                ..head_manifest_request("team/app", "v1")
            }))
            .await,
            &["accept"],
        ));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_platform_is_invalid_argument() {
    let mut f = Fixture::start().await;
    f.registry.push_index("multi/app", "latest").await;
    let mut problems = Vec::new();
    for platform in [("linux", "", ""), ("", "amd64", ""), ("linux", "", "v8")] {
        problems.extend(invalid_argument_problem(
            &format!("FetchManifest platform {platform:?}"),
            fetch_for_platform(&mut f.client, "multi/app", "latest", platform).await,
            &["platform", "os", "architecture"],
        ));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tag_paging_is_invalid_argument() {
    let mut f = Fixture::start().await;
    f.registry.push_image("team/app", "v1").await;
    let mut problems = Vec::new();
    for n in [-1, i32::MIN] {
        problems.extend(invalid_argument_problem(
            &format!("FetchTags n = {n}"),
            fetch_tags_page(&mut f.client, "team/app", n, "").await,
            &["n"],
        ));
    }
    for last in [
        "bad tag".to_string(),
        "tag!".into(),
        "-x".into(),
        "a".repeat(129),
    ] {
        problems.extend(invalid_argument_problem(
            &format!("FetchTags last = {last:?}"),
            fetch_tags_page(&mut f.client, "team/app", 2, &last).await,
            &["last"],
        ));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
