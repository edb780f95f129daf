//! Resilience of the service (in process) against failing upstreams: refused and dropped connections, resets and breaks mid-body,
//! hangs, trickles, 5xx storms, 429 with `Retry-After`, short bodies,
//! upstreams ignoring Range, oversized manifests, invalid indexes, the
//! circuit breaker and overload shedding. Each fault comes from the
//! hand-written server in `common/faulty.rs` (or the axum fake for plain
//! status sequences); each test asserts what the caller got (status, or
//! bytes checked against their digest), how many connections or requests
//! the upstream saw, and an upper bound on the elapsed time derived from
//! the configured timeouts. The bounds add [`SLACK`] for a loaded CI
//! machine; they are limits, never speed claims.

use crate::common;

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::config::{ServiceConfig, Upstream};
use common::content::{OCI_INDEX, OCI_MANIFEST, image_manifest, random_blob, sha256_digest};
use common::fake::{FakeRegistry, Reply};
use common::faulty::{Act, Cut, FaultyServer, OnAccept, blob_path, dead_port_url, manifest_path};
use common::rpc::{
    BlobRead, Client, blob_request, bounded, expect_err, head_blob_request, manifest_request,
    read_blob,
};
use common::{InProcess, eventually_within};
use oci_upstream::pb::Platform;
use tonic::Code;
use tonic_types::StatusExt as _;

const REPO: &str = "team/app";
const MIB: usize = 1024 * 1024;
/// Added to every bound derived from the configuration: room for process
/// scheduling on a loaded 2-core CI machine. Never a speed claim.
const SLACK: Duration = Duration::from_secs(5);
/// The service's window for `min_rate` (`RATE_WINDOW` in the engine).
const RATE_WINDOW: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// Configuration

/// One upstream with small, CI-friendly timeouts; the bounds of the tests
/// are computed from these same values ([`Upstream::request_bound`]).
fn upstream(name: &str, url: &str) -> Upstream {
    Upstream::new(name, url)
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(1))
        .retries(2)
        .retry_max_delay(Duration::from_secs(2))
        // High unless a test is about the circuit, so it stays out of the
        // way of the other faults.
        .circuit(1000, Duration::from_secs(2))
}

/// A service config: `top` lines, no remembered 404s, then the upstreams in
/// priority order.
fn config(top: &str, upstreams: &[&Upstream]) -> String {
    let mut config = ServiceConfig::new().cache("negative_ttl = \"0s\"");
    if !top.is_empty() {
        config = config.top(top);
    }
    for (i, upstream) in upstreams.iter().enumerate() {
        config = config.upstream((*upstream).clone().priority(10 * (i as u32 + 1)));
    }
    config.toml()
}

// ---------------------------------------------------------------------------
// gRPC helpers

/// FetchBlob of the whole blob `digest` in the test repository, to the end
/// of its stream.
async fn fetch_blob(client: &mut Client, digest: &str) -> BlobRead {
    read_blob(client, blob_request(REPO, digest)).await
}

/// Polls `cond` until it holds, failing after `limit`.
async fn wait_until(what: &str, limit: Duration, cond: impl FnMut() -> bool) {
    assert!(
        eventually_within(limit, cond).await,
        "gave up after {limit:?} waiting for {what}"
    );
}

/// A unary call sent as raw HTTP/2 (prior knowledge) with a `grpc-timeout`
/// header, so that no client-side timer races the service's answer (tonic's
/// own client reports an expired local timer as CANCELLED). The request
/// message follows the headers after `body_delay`, as it does from a caller
/// on a slow link. Returns the `grpc-status` and `grpc-message` of the
/// service's trailers-only answer.
async fn raw_unary(
    addr: SocketAddr,
    method: &str,
    message: &impl prost::Message,
    grpc_timeout: &str,
    body_delay: Duration,
) -> (Option<i32>, String) {
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .expect("an HTTP/2 client builds");
    let payload = message.encode_to_vec();
    let mut body = Vec::with_capacity(payload.len() + 5);
    body.push(0);
    body.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    body.extend_from_slice(&payload);
    let response = client
        .post(format!(
            "http://{addr}/oci.upstream.v1.UpstreamService/{method}"
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", grpc_timeout)
        .body(reqwest::Body::wrap_stream(futures::stream::once(
            async move {
                tokio::time::sleep(body_delay).await;
                Ok::<_, std::io::Error>(Bytes::from(body))
            },
        )))
        .send()
        .await
        .expect("the service answers over HTTP/2");
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let status = header("grpc-status").and_then(|s| s.parse().ok());
    let message = header("grpc-message").unwrap_or_default();
    (status, message)
}

// ---------------------------------------------------------------------------
// 1. Refused and dropped connections

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_dropped_at_accept_are_retried_then_unavailable() {
    for mode in [OnAccept::Close, OnAccept::Reset] {
        let up = FaultyServer::start().await;
        up.on_accept(mode);
        let a = upstream("a", &up.url()).retries(2);
        let service = InProcess::start(&config("", &[&a])).await;
        let mut client = service.client().await;

        let started = Instant::now();
        let status = expect_err(bounded(client.fetch_manifest(manifest_request(REPO, "v1"))).await);
        let elapsed = started.elapsed();

        assert_eq!(status.code(), Code::Unavailable, "{mode:?}: {status:?}");
        assert_eq!(
            up.connections(),
            a.retries_value() as usize + 1,
            "{mode:?}: one connection for the first attempt and one per retry"
        );
        let bound = a.request_bound() + SLACK;
        assert!(
            elapsed <= bound,
            "{mode:?}: took {elapsed:?}, bound {bound:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_dropped_at_accept_fall_over_to_the_next_upstream() {
    let bad = FaultyServer::start().await;
    bad.on_accept(OnAccept::Reset);
    let good = FaultyServer::start().await;
    let body = image_manifest("fallover", 1);
    let digest = good.put_manifest(REPO, Some("v1"), OCI_MANIFEST, body.clone());
    let a = upstream("bad", &bad.url()).retries(2);
    let b = upstream("good", &good.url());
    let service = InProcess::start(&config("", &[&a, &b])).await;
    let mut client = service.client().await;

    let started = Instant::now();
    let response = bounded(client.fetch_manifest(manifest_request(REPO, "v1")))
        .await
        .expect("served by the healthy upstream")
        .into_inner();
    let elapsed = started.elapsed();

    assert_eq!(response.manifest, body);
    assert_eq!(response.digest, digest);
    assert_eq!(response.source.expect("source").upstream, "good");
    assert_eq!(
        bad.connections(),
        a.retries_value() as usize + 1,
        "the failing upstream gets its retries before the next one is asked"
    );
    assert_eq!(good.count(&manifest_path(REPO, "v1")), 1);
    let bound = a.request_bound() + b.request_bound() + SLACK;
    assert!(elapsed <= bound, "took {elapsed:?}, bound {bound:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connection_on_a_dead_port_is_unavailable_or_served_by_the_next() {
    let dead = upstream("dead", &dead_port_url()).retries(2);
    let good = FaultyServer::start().await;
    let body = image_manifest("dead-port", 1);
    good.put_manifest(REPO, Some("v1"), OCI_MANIFEST, body.clone());
    let b = upstream("good", &good.url());

    // Alone: UNAVAILABLE once the retries are spent.
    let service = InProcess::start(&config("", &[&dead])).await;
    let mut client = service.client().await;
    let started = Instant::now();
    let status = expect_err(bounded(client.fetch_manifest(manifest_request(REPO, "v1"))).await);
    let elapsed = started.elapsed();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("`dead`"),
        "the message names the upstream: {status:?}"
    );
    let bound = dead.request_bound() + SLACK;
    assert!(elapsed <= bound, "took {elapsed:?}, bound {bound:?}");

    // With a healthy second upstream: served by it.
    let service = InProcess::start(&config("", &[&dead, &b])).await;
    let mut client = service.client().await;
    let started = Instant::now();
    let response = bounded(client.fetch_manifest(manifest_request(REPO, "v1")))
        .await
        .expect("served by the healthy upstream")
        .into_inner();
    let elapsed = started.elapsed();
    assert_eq!(response.manifest, body);
    assert_eq!(response.source.expect("source").upstream, "good");
    let bound = dead.request_bound() + b.request_bound() + SLACK;
    assert!(elapsed <= bound, "took {elapsed:?}, bound {bound:?}");
}

// ---------------------------------------------------------------------------
// 2. Reset mid-body

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_mid_blob_resumes_with_a_range_from_the_byte_reached() {
    let up = FaultyServer::start().await;
    let data = random_blob(2, 4 * MIB);
    let digest = up.put_blob(REPO, data.clone());
    let path = blob_path(REPO, &digest);
    let cut = (3 * MIB / 2) as u64;
    up.script(&path, [Act::ResetAfter(Cut::Bytes(cut)), Act::Serve]);
    let a = upstream("a", &up.url());
    let service = InProcess::start(&config("", &[&a])).await;
    let mut client = service.client().await;

    let started = Instant::now();
    let outcome = fetch_blob(&mut client, &digest).await;
    let elapsed = started.elapsed();

    outcome.assert_bytes(&data, "blob reset mid-body");
    let seen = up.requests_to(&path);
    assert_eq!(seen.len(), 2, "the first GET and one resume: {seen:?}");
    assert_eq!(seen[0].range, None, "the first GET asks for the whole blob");
    let start = seen[1]
        .range
        .unwrap_or_else(|| panic!("the resume asks for a Range: {:?}", seen[1]));
    // The reset may discard bytes still in flight, so the byte reached is at
    // most the cut; it is never past it.
    assert!(
        start > 0 && start <= cut,
        "resume from {start}, but the reset came after {cut} bytes"
    );
    let bound = a.request_bound() * 2 + SLACK;
    assert!(elapsed <= bound, "took {elapsed:?}, bound {bound:?}");
}

// ---------------------------------------------------------------------------
// 3. Hang before headers

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hang_before_headers_is_cut_by_the_timeout() {
    let up = FaultyServer::start().await;
    let path = manifest_path(REPO, "v1");
    up.put_manifest(REPO, Some("v1"), OCI_MANIFEST, image_manifest("hang", 1));
    up.script(&path, [Act::Hang]);
    let a = upstream("a", &up.url()).retries(2);
    let service = InProcess::start(&config("", &[&a])).await;
    let mut client = service.client().await;

    let started = Instant::now();
    let status = expect_err(bounded(client.fetch_manifest(manifest_request(REPO, "v1"))).await);
    let elapsed = started.elapsed();

    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let attempts = up.count(&path);
    assert!(
        (1..=a.retries_value() as usize + 1).contains(&attempts),
        "between one attempt and one per retry: {attempts}"
    );
    let bound = a.request_bound() + SLACK;
    assert!(elapsed <= bound, "took {elapsed:?}, bound {bound:?}");
    // The hung connections are given up, not kept.
    wait_until("the hung connections to be closed", SLACK, || {
        up.peer_closed() >= attempts
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hang_before_headers_is_bounded_by_the_callers_deadline() {
    let up = FaultyServer::start().await;
    let path = manifest_path(REPO, "v1");
    up.put_manifest(
        REPO,
        Some("v1"),
        OCI_MANIFEST,
        image_manifest("deadline", 1),
    );
    up.script(&path, [Act::Hang]);
    // The upstream's own timeout is far beyond the caller's deadline.
    let a = upstream("a", &up.url())
        .timeout(Duration::from_secs(60))
        .retries(0);
    let service = InProcess::start(&config("", &[&a])).await;
    let deadline = Duration::from_millis(1500);

    let started = Instant::now();
    let (status, message) = bounded(raw_unary(
        service.addr,
        "FetchManifest",
        &manifest_request(REPO, "v1"),
        "1500m",
        Duration::from_millis(100),
    ))
    .await;
    let elapsed = started.elapsed();

    let bound = deadline + SLACK;
    assert!(elapsed <= bound, "took {elapsed:?}, bound {bound:?}");
    assert_eq!(up.count(&path), 1);
    // The upstream request is dropped with the call.
    wait_until("the hung upstream connection to be closed", SLACK, || {
        up.peer_closed() >= 1
    })
    .await;

    // A tonic caller with the same deadline is answered within it too (its
    // own timer may end the call first, which tonic reports as CANCELLED).
    let mut client = service.client().await;
    let mut request = tonic::Request::new(manifest_request(REPO, "v1"));
    request.set_timeout(deadline);
    let started_tonic = Instant::now();
    let tonic_status = expect_err(bounded(client.fetch_manifest(request)).await);
    let elapsed_tonic = started_tonic.elapsed();
    assert!(
        matches!(
            tonic_status.code(),
            Code::DeadlineExceeded | Code::Cancelled
        ),
        "{tonic_status:?}"
    );
    assert!(
        elapsed_tonic <= bound,
        "took {elapsed_tonic:?}, bound {bound:?}"
    );

    // What the service itself answered: the contract's DEADLINE_EXCEEDED.
    // (CANCELLED "Timeout expired" here is tonic's server-side grpc-timeout
    // layer, whose timer starts before the handler's and so fires first.)
    assert_eq!(
        status,
        Some(Code::DeadlineExceeded as i32),
        "grpc-status the service sent for a passed deadline (grpc-message: {message:?})"
    );
}

// ---------------------------------------------------------------------------
// 4. Trickles

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_byte_per_second_trickle_is_cut_by_the_idle_timeout_and_resumed() {
    let up = FaultyServer::start().await;
    let data = random_blob(4, MIB);
    let digest = up.put_blob(REPO, data.clone());
    let path = blob_path(REPO, &digest);
    let fast = data.len() as u64 / 4;
    up.script(
        &path,
        [
            Act::Trickle {
                fast: Cut::Bytes(fast),
                bytes: 1,
                every: Duration::from_secs(1),
            },
            Act::Serve,
        ],
    );
    // Idle timeout shorter than the trickle's gaps.
    let a = upstream("a", &up.url())
        .timeout(Duration::from_millis(500))
        .retries(0);
    let service = InProcess::start(&config("", &[&a])).await;
    let mut client = service.client().await;

    let started = Instant::now();
    let outcome = fetch_blob(&mut client, &digest).await;
    let elapsed = started.elapsed();

    outcome.assert_bytes(&data, "trickled blob");
    let seen = up.requests_to(&path);
    assert_eq!(seen.len(), 2, "the trickled GET and one resume: {seen:?}");
    let start = seen[1].range.expect("the resume asks for a Range");
    assert!(
        (fast..=fast + 2).contains(&start),
        "resume from {start}, the trickle stalled after {fast} bytes"
    );
    // Cut by the idle timeout, well before the min_rate window could.
    let bound = a.timeout_value() + a.request_bound() * 2 + SLACK;
    assert!(bound < RATE_WINDOW, "the bound must tell the two apart");
    assert!(elapsed <= bound, "took {elapsed:?}, bound {bound:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickle_below_min_rate_is_cut_and_resumed_on_the_next_upstream() {
    let slow = FaultyServer::start().await;
    let good = FaultyServer::start().await;
    let data = random_blob(5, MIB);
    let digest = slow.put_blob(REPO, data.clone());
    good.put_blob(REPO, data.clone());
    let path = blob_path(REPO, &digest);
    let fast = data.len() as u64 / 10;
    // 1 byte/s after a fast tenth: never idle for the 2 s timeout, but far
    // below min_rate (64 KiB/s). A slow upstream stays slow, so the resume
    // goes to the next upstream first; the slow one is not asked again.
    slow.script(
        &path,
        [
            Act::Trickle {
                fast: Cut::Bytes(fast),
                bytes: 1,
                every: Duration::from_secs(1),
            },
            Act::status(503),
        ],
    );
    let a = upstream("slow", &slow.url())
        .timeout(Duration::from_secs(2))
        .retries(0);
    let b = upstream("good", &good.url()).retries(0);
    let service = InProcess::start(&config("", &[&a, &b])).await;
    let mut client = service.client().await;

    let started = Instant::now();
    let outcome = fetch_blob(&mut client, &digest).await;
    let elapsed = started.elapsed();

    outcome.assert_bytes(&data, "blob below min_rate");
    assert_eq!(
        outcome
            .info
            .as_ref()
            .and_then(|i| i.source.as_ref())
            .map(|s| s.upstream.as_str()),
        Some("slow"),
        "the stream started from the slow upstream"
    );
    let slow_seen = slow.requests_to(&path);
    assert_eq!(
        slow_seen.len(),
        1,
        "only the GET: the resume goes elsewhere first: {slow_seen:?}"
    );
    let good_seen = good.requests_to(&path);
    assert_eq!(
        good_seen.len(),
        1,
        "one resume on the next upstream: {good_seen:?}"
    );
    let start = good_seen[0].range.expect("the resume asks for a Range");
    // At 1 byte/s, the one sliding window of 10 s adds about 10 bytes to
    // the fast part.
    assert!(
        start >= fast && start <= fast + RATE_WINDOW.as_secs() + 2,
        "resume from {start}, the fast part was {fast} bytes"
    );
    // About one window after the trickle began, not two.
    let bound =
        RATE_WINDOW + Duration::from_secs(1) + a.request_bound() + b.request_bound() + SLACK;
    assert!(elapsed <= bound, "took {elapsed:?}, bound {bound:?}");
}

// ---------------------------------------------------------------------------
// 5. 503 storms

fn manifest_reply(body: &Bytes) -> Reply {
    Reply::ok(body.clone())
        .header("Content-Type", OCI_MANIFEST)
        .header("Docker-Content-Digest", &sha256_digest(body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_503s_then_success_is_ok_after_three_retries() {
    let fake = FakeRegistry::start().await;
    let body = image_manifest("three-503s", 1);
    let digest = sha256_digest(&body);
    let path = manifest_path(REPO, &digest);
    fake.on_seq(
        &path,
        [
            Reply::status(503),
            Reply::status(503),
            Reply::status(503),
            manifest_reply(&body),
        ],
    );
    let a = upstream("a", &fake.url()).retries(3);
    let service = InProcess::start(&config("", &[&a])).await;
    let mut client = service.client().await;

    let started = Instant::now();
    let response = bounded(client.fetch_manifest(manifest_request(REPO, &digest)))
        .await
        .expect("OK on the fourth attempt")
        .into_inner();
    let elapsed = started.elapsed();

    assert_eq!(response.manifest, body);
    assert_eq!(fake.count(&path), 4, "first attempt and three retries");
    let bound = a.request_bound() + SLACK;
    assert!(elapsed <= bound, "took {elapsed:?}, bound {bound:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_threes_beyond_the_retries_are_unavailable() {
    let fake = FakeRegistry::start().await;
    let body = image_manifest("503s-beyond", 1);
    let digest = sha256_digest(&body);
    let path = manifest_path(REPO, &digest);
    fake.on_seq(
        &path,
        [
            Reply::status(503),
            Reply::status(503),
            Reply::status(503),
            manifest_reply(&body),
        ],
    );
    let a = upstream("a", &fake.url()).retries(2);
    let service = InProcess::start(&config("", &[&a])).await;
    let mut client = service.client().await;

    let started = Instant::now();
    let status = expect_err(bounded(client.fetch_manifest(manifest_request(REPO, &digest))).await);
    let elapsed = started.elapsed();

    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(fake.count(&path), 3, "first attempt and two retries");
    let bound = a.request_bound() + SLACK;
    assert!(elapsed <= bound, "took {elapsed:?}, bound {bound:?}");
}

// ---------------------------------------------------------------------------
// 6. 429 and Retry-After; other 4xx

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_requests_with_retry_after_is_retried() {
    let fake = FakeRegistry::start().await;
    let body = image_manifest("429-once", 1);
    let digest = sha256_digest(&body);
    let path = manifest_path(REPO, &digest);
    fake.on_seq(
        &path,
        [
            Reply::status(429).header("Retry-After", "1"),
            manifest_reply(&body),
        ],
    );
    let a = upstream("a", &fake.url()).retries(2);
    let service = InProcess::start(&config("", &[&a])).await;
    let mut client = service.client().await;

    let started = Instant::now();
    let response = bounded(client.fetch_manifest(manifest_request(REPO, &digest)))
        .await
        .expect("OK after the rate limit")
        .into_inner();
    let elapsed = started.elapsed();

    assert_eq!(response.manifest, body);
    assert_eq!(fake.count(&path), 2);
    let bound = a.request_bound() + SLACK;
    assert!(elapsed <= bound, "took {elapsed:?}, bound {bound:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_requests_forever_is_resource_exhausted_with_retry_info() {
    let fake = FakeRegistry::start().await;
    let body = image_manifest("429-forever", 1);
    let digest = sha256_digest(&body);
    let path = manifest_path(REPO, &digest);
    fake.on(&path, Reply::status(429).header("Retry-After", "1"));
    let a = upstream("a", &fake.url()).retries(1);
    let service = InProcess::start(&config("", &[&a])).await;
    let mut client = service.client().await;

    let started = Instant::now();
    let status = expect_err(bounded(client.fetch_manifest(manifest_request(REPO, &digest))).await);
    let elapsed = started.elapsed();

    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(fake.count(&path), 2, "first attempt and one retry");
    let details = status.get_error_details();
    assert_eq!(
        details.retry_info().and_then(|r| r.retry_delay),
        Some(Duration::from_secs(1)),
        "RetryInfo carries the upstream's Retry-After: {status:?}"
    );
    let bound = a.request_bound() + SLACK;
    assert!(elapsed <= bound, "took {elapsed:?}, bound {bound:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_capped_by_retry_max_delay() {
    let fake = FakeRegistry::start().await;
    let body = image_manifest("429-capped", 1);
    let digest = sha256_digest(&body);
    let path = manifest_path(REPO, &digest);
    fake.on_seq(
        &path,
        [
            Reply::status(429).header("Retry-After", "3600"),
            manifest_reply(&body),
        ],
    );
    let a = upstream("a", &fake.url())
        .retries(1)
        .retry_max_delay(Duration::from_secs(1));
    let service = InProcess::start(&config("", &[&a])).await;
    let mut client = service.client().await;

    let started = Instant::now();
    let response = bounded(client.fetch_manifest(manifest_request(REPO, &digest)))
        .await
        .expect("OK after a capped wait")
        .into_inner();
    let elapsed = started.elapsed();

    assert_eq!(response.manifest, body);
    assert_eq!(fake.count(&path), 2);
    let bound = a.request_bound() + SLACK;
    assert!(
        elapsed <= bound,
        "took {elapsed:?}; an hour's Retry-After must be capped at {:?} (bound {bound:?})",
        a.retry_max_delay_value()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_4xx_are_not_retried() {
    let fake = FakeRegistry::start().await;
    let a = upstream("a", &fake.url()).retries(3);
    let service = InProcess::start(&config("", &[&a])).await;
    let mut client = service.client().await;
    for (status, tag) in [
        (400, "bad-request"),
        (403, "forbidden"),
        (405, "not-allowed"),
    ] {
        let path = manifest_path(REPO, tag);
        fake.on(&path, Reply::status(status));
        let answer = expect_err(bounded(client.fetch_manifest(manifest_request(REPO, tag))).await);
        assert_ne!(answer.code(), Code::Internal, "{status}: {answer:?}");
        if status == 403 {
            assert_eq!(answer.code(), Code::PermissionDenied, "{answer:?}");
        }
        assert_eq!(fake.count(&path), 1, "HTTP {status} is not retried");
    }
}

// ---------------------------------------------------------------------------
// 7. Body shorter than its Content-Length

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_body_is_resumed_from_the_byte_reached() {
    let up = FaultyServer::start().await;
    let data = random_blob(7, 3 * MIB);
    let digest = up.put_blob(REPO, data.clone());
    let path = blob_path(REPO, &digest);
    let cut = MIB as u64 + 12_345;
    up.script(&path, [Act::ShortAfter(Cut::Bytes(cut)), Act::Serve]);
    let a = upstream("a", &up.url());
    let service = InProcess::start(&config("", &[&a])).await;
    let mut client = service.client().await;

    let started = Instant::now();
    let outcome = fetch_blob(&mut client, &digest).await;
    let elapsed = started.elapsed();

    outcome.assert_bytes(&data, "short body");
    let seen = up.requests_to(&path);
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(
        seen[1].range,
        Some(cut),
        "a clean close delivers every byte sent, so the resume starts exactly there"
    );
    let bound = a.request_bound() * 2 + SLACK;
    assert!(elapsed <= bound, "took {elapsed:?}, bound {bound:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_bodies_every_time_end_unavailable_never_ok() {
    let up = FaultyServer::start().await;
    let data = random_blob(8, 2 * MIB);
    let digest = up.put_blob(REPO, data.clone());
    let path = blob_path(REPO, &digest);
    // Every answer, resumes included, stops halfway through its body.
    up.script(&path, [Act::ShortAfter(Cut::Percent(50))]);
    let a = upstream("a", &up.url());
    let service = InProcess::start(&config("", &[&a])).await;
    let mut client = service.client().await;

    let started = Instant::now();
    let outcome = fetch_blob(&mut client, &digest).await;
    let elapsed = started.elapsed();

    let error = outcome
        .error()
        .unwrap_or_else(|| panic!("never OK: got {} bytes and a clean end", outcome.data.len()));
    assert_eq!(error.code(), Code::Unavailable, "{error:?}");
    assert!(
        outcome.data.len() < data.len(),
        "the whole blob never arrives"
    );
    let seen = up.requests_to(&path);
    assert_eq!(seen.len(), 4, "the first GET and three resumes: {seen:?}");
    let ranges: Vec<_> = seen.iter().map(|s| s.range).collect();
    assert_eq!(ranges[0], None);
    assert!(
        ranges
            .windows(2)
            .all(|w| w[0].unwrap_or(0) < w[1].unwrap_or(0)),
        "each resume starts further on: {ranges:?}"
    );
    let bound = a.request_bound() * 4 + SLACK;
    assert!(elapsed <= bound, "took {elapsed:?}, bound {bound:?}");

    // Nothing half-written was kept: a second fetch asks the upstream again
    // and fails the same way.
    let again = fetch_blob(&mut client, &digest).await;
    assert_eq!(
        again.error().map(|e| e.code()),
        Some(Code::Unavailable),
        "second fetch: {:?}",
        again.end
    );
    assert_eq!(up.count(&path), 8, "the second fetch went upstream again");
}

// ---------------------------------------------------------------------------
// 8. A body that breaks at 40%, then Range requests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_stalling_at_40_percent_resumes_with_a_range_at_40_percent() {
    let up = FaultyServer::start().await;
    let data = random_blob(9, 5 * MIB);
    let digest = up.put_blob(REPO, data.clone());
    let path = blob_path(REPO, &digest);
    up.script(&path, [Act::StallAfter(Cut::Percent(40)), Act::Serve]);
    let a = upstream("a", &up.url());
    let service = InProcess::start(&config("", &[&a])).await;
    let mut client = service.client().await;

    let started = Instant::now();
    let outcome = fetch_blob(&mut client, &digest).await;
    let elapsed = started.elapsed();

    outcome.assert_bytes(&data, "blob broken at 40%");
    let seen = up.requests_to(&path);
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[1].range, Some(data.len() as u64 * 40 / 100));
    assert_eq!(
        seen[1].range_header.as_deref(),
        Some(format!("bytes={}-", data.len() * 40 / 100).as_str())
    );
    let bound = a.timeout_value() + a.request_bound() * 2 + SLACK;
    assert!(elapsed <= bound, "took {elapsed:?}, bound {bound:?}");
    wait_until("the stalled connection to be closed", SLACK, || {
        up.peer_closed() >= 1
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_breaking_at_40_percent_resumes_on_the_next_upstream() {
    let first = FaultyServer::start().await;
    let second = FaultyServer::start().await;
    let data = random_blob(10, 5 * MIB);
    let digest = first.put_blob(REPO, data.clone());
    second.put_blob(REPO, data.clone());
    let path = blob_path(REPO, &digest);
    first.script(&path, [Act::ShortAfter(Cut::Percent(40)), Act::status(503)]);
    let a = upstream("first", &first.url()).retries(0);
    let b = upstream("second", &second.url()).retries(0);
    let service = InProcess::start(&config("", &[&a, &b])).await;
    let mut client = service.client().await;

    let started = Instant::now();
    let outcome = fetch_blob(&mut client, &digest).await;
    let elapsed = started.elapsed();

    outcome.assert_bytes(&data, "blob resumed elsewhere");
    assert_eq!(
        first.count(&path),
        2,
        "GET, then the resume tried there first"
    );
    let seen = second.requests_to(&path);
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].range, Some(data.len() as u64 * 40 / 100));
    let bound = a.request_bound() * 2 + b.request_bound() + SLACK;
    assert!(elapsed <= bound, "took {elapsed:?}, bound {bound:?}");
}

// ---------------------------------------------------------------------------
// 9. A Range request answered with 200 and the whole body

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_answered_with_200_and_the_whole_body_is_still_correct() {
    let up = FaultyServer::start().await;
    let data = random_blob(11, 3 * MIB);
    let digest = up.put_blob(REPO, data.clone());
    let path = blob_path(REPO, &digest);
    up.script(&path, [Act::ShortAfter(Cut::Percent(40)), Act::IgnoreRange]);
    let a = upstream("a", &up.url());
    let service = InProcess::start(&config("", &[&a])).await;
    let mut client = service.client().await;

    let started = Instant::now();
    let outcome = fetch_blob(&mut client, &digest).await;
    let elapsed = started.elapsed();

    outcome.assert_bytes(&data, "resume answered with the whole blob");
    let seen = up.requests_to(&path);
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[1].range, Some(data.len() as u64 * 40 / 100));
    assert_eq!(seen[1].act, "ignore-range");
    let bound = a.request_bound() * 2 + SLACK;
    assert!(elapsed <= bound, "took {elapsed:?}, bound {bound:?}");
}

// ---------------------------------------------------------------------------
// 10. Manifest over the size cap

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifest_over_the_size_cap_is_refused_without_retries() {
    let fake = FakeRegistry::start().await;
    let big = image_manifest("too-big", 40);
    assert!(big.len() > 4 * 1024, "the manifest is well over 1 KiB");
    let with_length = manifest_path(REPO, "big");
    fake.on(&with_length, manifest_reply(&big));
    let chunked = manifest_path(REPO, "big-chunked");
    fake.on(
        &chunked,
        Reply::ok(Bytes::new())
            .header("Content-Type", OCI_MANIFEST)
            .chunks(big.chunks(512).map(Bytes::copy_from_slice).collect()),
    );
    let a = upstream("a", &fake.url()).retries(3);
    let service = InProcess::start(&config("max_manifest_size = \"1KiB\"", &[&a])).await;
    let mut client = service.client().await;

    for (tag, path) in [("big", &with_length), ("big-chunked", &chunked)] {
        let started = Instant::now();
        let status = expect_err(bounded(client.fetch_manifest(manifest_request(REPO, tag))).await);
        let elapsed = started.elapsed();
        assert_eq!(status.code(), Code::Unavailable, "{tag}: {status:?}");
        assert_eq!(fake.count(path), 1, "{tag}: a 200 is not retried");
        let bound = a.request_bound() + SLACK;
        assert!(elapsed <= bound, "{tag}: took {elapsed:?}, bound {bound:?}");
    }
}

// ---------------------------------------------------------------------------
// 11. Invalid JSON where an index is needed

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_json_where_an_index_is_needed_is_not_ok() {
    let fake = FakeRegistry::start().await;
    let bodies: [(&str, &[u8]); 3] = [
        (
            "truncated",
            br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"#,
        ),
        ("not-json", b"<html>502 Bad Gateway</html>"),
        (
            "wrong-shape",
            br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":"none"}"#,
        ),
    ];
    for (tag, body) in bodies {
        fake.on(
            &manifest_path(REPO, tag),
            Reply::ok(Bytes::from_static(body)).header("Content-Type", OCI_INDEX),
        );
    }
    let a = upstream("a", &fake.url()).retries(3);
    let service = InProcess::start(&config("", &[&a])).await;
    let mut client = service.client().await;

    for (tag, _) in bodies {
        let mut request = manifest_request(REPO, tag);
        request.platform = Some(Platform {
            os: "linux".into(),
            architecture: "amd64".into(),
            variant: String::new(),
        });
        let started = Instant::now();
        let status = expect_err(bounded(client.fetch_manifest(request)).await);
        let elapsed = started.elapsed();
        assert_eq!(status.code(), Code::Unavailable, "{tag}: {status:?}");
        assert_eq!(
            fake.count(&manifest_path(REPO, tag)),
            1,
            "{tag}: a 200 is not retried"
        );
        let bound = a.request_bound() + SLACK;
        assert!(elapsed <= bound, "{tag}: took {elapsed:?}, bound {bound:?}");
    }
}

// ---------------------------------------------------------------------------
// 12. Circuit breaker

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn circuit_opens_skips_the_upstream_probes_after_cooldown_and_closes() {
    let flaky = FaultyServer::start().await;
    let backup = FaultyServer::start().await;
    let manifests: Vec<(Bytes, String)> = (0..8)
        .map(|i| {
            let body = image_manifest(&format!("circuit-{i}"), 1);
            let digest = flaky.put_manifest(REPO, None, OCI_MANIFEST, body.clone());
            backup.put_manifest(REPO, None, OCI_MANIFEST, body.clone());
            (body, digest)
        })
        .collect();
    flaky.script_all([Act::status(503)]);
    let cooldown = Duration::from_secs(2);
    let a = upstream("flaky", &flaky.url())
        .retries(0)
        .circuit(2, cooldown);
    let b = upstream("backup", &backup.url()).retries(0);
    let service = InProcess::start(&config("", &[&a, &b])).await;
    let mut client = service.client().await;
    let fetch = |client: &mut Client, i: usize, only: Option<&str>| {
        let mut request = manifest_request(REPO, &manifests[i].1);
        request.upstream = only.unwrap_or_default().to_string();
        let mut client = client.clone();
        async move { bounded(client.fetch_manifest(request)).await }
    };

    // Two failures (each served by the backup) open the circuit.
    for (i, (body, _)) in manifests.iter().enumerate().take(2) {
        let response = fetch(&mut client, i, None)
            .await
            .expect("served by the backup")
            .into_inner();
        assert_eq!(response.manifest, body);
        assert_eq!(response.source.expect("source").upstream, "backup");
        assert_eq!(flaky.request_count(), i + 1);
    }
    let opened = Instant::now();
    let (connections, requests) = (flaky.connections(), flaky.request_count());

    // Open: the flaky upstream is skipped without a connection or request.
    let response = fetch(&mut client, 2, None)
        .await
        .expect("served by the backup")
        .into_inner();
    assert_eq!(response.source.expect("source").upstream, "backup");
    let status = expect_err(fetch(&mut client, 3, Some("flaky")).await);
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("circuit"),
        "the message says the circuit is open: {status:?}"
    );
    assert_eq!(flaky.request_count(), requests, "no request while open");
    assert_eq!(flaky.connections(), connections, "no connection while open");

    // After the cooldown one probe goes through; it fails, so the circuit
    // opens again at once.
    let probe = wait_until_probe(&flaky, &mut client, &fetch, 3, requests, cooldown).await;
    let status = probe.expect_err("the probe meets a 503");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        opened.elapsed() <= cooldown + SLACK,
        "probed {:?} after opening, cooldown {cooldown:?}",
        opened.elapsed()
    );
    let requests = flaky.request_count();
    let status = expect_err(fetch(&mut client, 3, Some("flaky")).await);
    assert!(status.message().contains("circuit"), "reopened: {status:?}");
    assert_eq!(
        flaky.request_count(),
        requests,
        "no request after a failed probe"
    );
    let reopened = Instant::now();

    // The upstream recovers: the next probe succeeds and closes the circuit.
    flaky.script_all([Act::Serve]);
    let response = wait_until_probe(&flaky, &mut client, &fetch, 4, requests, cooldown)
        .await
        .expect("the probe succeeds");
    assert_eq!(response.manifest, manifests[4].0);
    assert_eq!(response.source.expect("source").upstream, "flaky");
    assert!(
        reopened.elapsed() <= cooldown + SLACK,
        "probed {:?} after reopening, cooldown {cooldown:?}",
        reopened.elapsed()
    );
    for (i, (body, _)) in manifests.iter().enumerate().skip(5) {
        let before = flaky.request_count();
        let response = fetch(&mut client, i, None)
            .await
            .expect("closed: served by the first upstream")
            .into_inner();
        assert_eq!(response.manifest, body);
        assert_eq!(response.source.expect("source").upstream, "flaky");
        assert_eq!(flaky.request_count(), before + 1);
    }
    assert_eq!(backup.count(&manifest_path(REPO, &manifests[4].1)), 0);
}

/// Calls manifest `i` on the flaky upstream alone until a request reaches
/// it (the half-open probe); every call before that must be refused at once
/// by the open circuit. Returns the probe call's result.
async fn wait_until_probe<F, Fut>(
    flaky: &FaultyServer,
    client: &mut Client,
    fetch: &F,
    i: usize,
    requests_before: usize,
    cooldown: Duration,
) -> Result<oci_upstream::pb::FetchManifestResponse, tonic::Status>
where
    F: Fn(&mut Client, usize, Option<&str>) -> Fut,
    Fut: Future<
        Output = Result<tonic::Response<oci_upstream::pb::FetchManifestResponse>, tonic::Status>,
    >,
{
    let start = Instant::now();
    loop {
        let result = fetch(client, i, Some("flaky")).await;
        let requests = flaky.request_count();
        if requests > requests_before {
            assert_eq!(requests, requests_before + 1, "exactly one probe");
            return result.map(tonic::Response::into_inner);
        }
        let status = expect_err(result);
        assert!(
            status.message().contains("circuit"),
            "refused by the open circuit: {status:?}"
        );
        assert!(
            start.elapsed() <= cooldown + SLACK,
            "no probe within {:?} of a {cooldown:?} cooldown",
            start.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls FetchManifest of `digest` on upstream `only` until it is OK, for at
/// most `limit`; every refusal before that must come from the open circuit.
async fn wait_until_ok_through_circuit(
    client: &mut Client,
    digest: &str,
    only: &str,
    limit: Duration,
) -> oci_upstream::pb::FetchManifestResponse {
    let start = Instant::now();
    loop {
        let mut request = manifest_request(REPO, digest);
        request.upstream = only.to_string();
        match bounded(client.fetch_manifest(request)).await {
            Ok(response) => return response.into_inner(),
            Err(status) => {
                assert!(
                    start.elapsed() <= limit,
                    "the healthy upstream is still refused {:?} later: {status:?}",
                    start.elapsed()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn circuit_probe_abandoned_by_its_caller_does_not_keep_the_circuit_open() {
    let up = FaultyServer::start().await;
    let manifests: Vec<(Bytes, String)> = (0..3)
        .map(|i| {
            let body = image_manifest(&format!("abandoned-probe-{i}"), 1);
            let digest = up.put_manifest(REPO, None, OCI_MANIFEST, body.clone());
            (body, digest)
        })
        .collect();
    up.script_all([Act::status(503)]);
    let cooldown = Duration::from_secs(1);
    let a = upstream("a", &up.url())
        .retries(0)
        .timeout(Duration::from_secs(30))
        .circuit(1, cooldown);
    let service = InProcess::start(&config("", &[&a])).await;
    let mut client = service.client().await;

    // One failure opens the circuit.
    let status =
        expect_err(bounded(client.fetch_manifest(manifest_request(REPO, &manifests[0].1))).await);
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(up.request_count(), 1);

    // After the cooldown, the probe meets a hanging upstream and its caller
    // goes away (the call is dropped after 300 ms).
    up.script_all([Act::Hang]);
    let start = Instant::now();
    while up.request_count() < 2 {
        assert!(
            start.elapsed() <= cooldown + SLACK,
            "no probe within {:?}",
            start.elapsed()
        );
        let call = client.fetch_manifest(manifest_request(REPO, &manifests[1].1));
        let _ = tokio::time::timeout(Duration::from_millis(300), call).await;
    }
    assert_eq!(up.request_count(), 2, "one probe");

    // The upstream recovers. An abandoned probe must not leave the circuit
    // half-open for ever: another probe goes through after the cooldown.
    up.script_all([Act::Serve]);
    let response =
        wait_until_ok_through_circuit(&mut client, &manifests[2].1, "a", cooldown + SLACK).await;
    assert_eq!(response.manifest, manifests[2].0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn circuit_probe_made_by_a_blob_resume_is_counted() {
    let up = FaultyServer::start().await;
    let data = random_blob(30, 2 * MIB);
    let digest = up.put_blob(REPO, data.clone());
    let blob_at = blob_path(REPO, &digest);
    up.script(&blob_at, [Act::StallAfter(Cut::Percent(50)), Act::Serve]);
    let failing = image_manifest("resume-probe-failing", 1);
    let failing_digest = up.put_manifest(REPO, None, OCI_MANIFEST, failing);
    up.script(&manifest_path(REPO, &failing_digest), [Act::status(503)]);
    let healthy = image_manifest("resume-probe-healthy", 1);
    let healthy_digest = up.put_manifest(REPO, None, OCI_MANIFEST, healthy.clone());
    let cooldown = Duration::from_secs(1);
    // The stall is noticed after 3 s, past the cooldown of the circuit that
    // the failing manifest opens meanwhile: the resume is the half-open probe.
    let a = upstream("a", &up.url())
        .retries(0)
        .timeout(Duration::from_secs(3))
        .circuit(1, cooldown);
    let service = InProcess::start(&config("", &[&a])).await;
    let mut client = service.client().await;

    let blob = tokio::spawn({
        let mut client = client.clone();
        let digest = digest.clone();
        async move { fetch_blob(&mut client, &digest).await }
    });
    wait_until("the blob download to start", SLACK, || {
        up.count(&blob_at) == 1
    })
    .await;
    let status =
        expect_err(bounded(client.fetch_manifest(manifest_request(REPO, &failing_digest))).await);
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");

    let outcome = bounded(blob).await.expect("blob task");
    outcome.assert_bytes(&data, "blob resumed through the circuit");
    assert_eq!(up.count(&blob_at), 2, "resumed on the same upstream");

    // The resume succeeded on the upstream: the circuit must not stay
    // half-open (refusing everything) for ever.
    let response =
        wait_until_ok_through_circuit(&mut client, &healthy_digest, "a", cooldown + SLACK).await;
    assert_eq!(response.manifest, healthy);
}

// ---------------------------------------------------------------------------
// 13. Overload

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_shed_with_resource_exhausted_at_once() {
    let up = FaultyServer::start().await;
    let slow: Vec<(Bytes, String)> = (0..2)
        .map(|i| {
            let data = random_blob(20 + i, 4 * MIB);
            let digest = up.put_blob(REPO, data.clone());
            (data, digest)
        })
        .collect();
    // 160 KiB/s: above min_rate, and much longer than the test.
    up.script_all([Act::Trickle {
        fast: Cut::Bytes(0),
        bytes: 16 * 1024,
        every: Duration::from_millis(100),
    }]);
    let quick = image_manifest("overload", 1);
    let quick_digest = up.put_manifest(REPO, None, OCI_MANIFEST, quick.clone());
    up.script(&manifest_path(REPO, &quick_digest), [Act::Serve]);
    let a = upstream("a", &up.url());
    let service = InProcess::start(&config("max_concurrent_rpcs = 2", &[&a])).await;
    let client = service.client().await;

    // Two slow streams in flight, each past its first data message.
    let mut streams = Vec::new();
    for (_, digest) in &slow {
        let request = blob_request(REPO, digest);
        let mut stream = bounded(client.clone().fetch_blob(request))
            .await
            .expect("admitted")
            .into_inner();
        let mut got = 0;
        while got == 0 {
            let message = bounded(stream.message())
                .await
                .expect("stream runs")
                .expect("stream has messages");
            got += message.data.len();
        }
        streams.push(stream);
    }

    let requests = up.request_count();
    let started = Instant::now();
    let status = expect_err(
        bounded(
            client
                .clone()
                .head_blob(head_blob_request(REPO, &slow[0].1)),
        )
        .await,
    );
    let elapsed = started.elapsed();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(
        up.request_count(),
        requests,
        "shed before any upstream work"
    );
    // "At once": well within a single upstream timeout.
    assert!(
        elapsed <= a.timeout_value() + SLACK,
        "shedding took {elapsed:?}"
    );

    // When the streams' callers leave, their slots are free again.
    drop(streams);
    let start = Instant::now();
    loop {
        match bounded(
            client
                .clone()
                .fetch_manifest(manifest_request(REPO, &quick_digest)),
        )
        .await
        {
            Ok(response) => {
                assert_eq!(response.into_inner().manifest, quick);
                break;
            }
            Err(status) if status.code() == Code::ResourceExhausted => {
                assert!(
                    start.elapsed() <= SLACK,
                    "slots not released {:?} after the callers left",
                    start.elapsed()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(status) => panic!("unexpected {status:?}"),
        }
    }
}

/// `max_connections` bounds the requests open to one upstream: a blob
/// download holds a slot for its whole body, so with a limit of 1 another
/// request waits at most the upstream's `timeout` for a slot and then fails
/// without reaching the upstream; with a limit of 2 it goes through.
#[tokio::test(flavor = "multi_thread")]
async fn connections_per_upstream_are_bounded() {
    let up = FaultyServer::start().await;
    let data = random_blob(40, 4 * MIB);
    let digest = up.put_blob(REPO, data);
    // 160 KiB/s: above min_rate, and much longer than the test.
    let trickle = || Act::Trickle {
        fast: Cut::Bytes(0),
        bytes: 16 * 1024,
        every: Duration::from_millis(100),
    };
    up.script(&blob_path(REPO, &digest), [trickle(), trickle()]);
    let quick = image_manifest("bounded", 1);
    let quick_digest = up.put_manifest(REPO, None, OCI_MANIFEST, quick.clone());

    for limit in [1, 2] {
        let a = upstream("a", &up.url()).retries(0).max_connections(limit);
        let service = InProcess::start(&config("", &[&a])).await;
        let client = service.client().await;
        let request = blob_request(REPO, &digest);
        let mut stream = bounded(client.clone().fetch_blob(request))
            .await
            .expect("the download starts")
            .into_inner();
        let mut got = 0;
        while got == 0 {
            let message = bounded(stream.message())
                .await
                .expect("stream runs")
                .expect("stream has messages");
            got += message.data.len();
        }

        let requests = up.request_count();
        let started = Instant::now();
        let result = bounded(
            client
                .clone()
                .fetch_manifest(manifest_request(REPO, &quick_digest)),
        )
        .await;
        let elapsed = started.elapsed();
        if limit == 1 {
            let status = expect_err(result);
            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
            assert!(
                status.message().contains("max_connections"),
                "the message names the limit: {status:?}"
            );
            assert_eq!(
                up.request_count(),
                requests,
                "no request beyond the limit reached the upstream"
            );
            assert!(
                elapsed <= a.timeout_value() + SLACK,
                "waited {elapsed:?} for a slot, bound {:?}",
                a.timeout_value() + SLACK
            );
        } else {
            let response = result.expect("a second slot serves the manifest");
            assert_eq!(response.into_inner().manifest, quick);
            assert_eq!(up.request_count(), requests + 1);
        }
        drop(stream);
    }
}
