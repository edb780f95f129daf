//! The gRPC edge under callers that misbehave: one connection cannot take
//! every admission permit (`max_streams_per_connection`), a FetchBlob
//! stream whose caller reads nothing is ended with DEADLINE_EXCEEDED and
//! gives its permit back (`stream_idle_timeout`), and `grpc.health.v1`
//! Watch follows the health checking protocol (SERVICE_UNKNOWN on an open
//! stream for an unknown service, NOT_SERVING at shutdown, then the end).
//! The service runs in process against the scripted fake registry.

use crate::common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::InProcess;
use common::config::{ServiceConfig, Upstream};
use common::content::{OCI_MANIFEST, image_manifest, pseudo_random_bytes};
use common::fake::FakeRegistry;
use common::rpc::{BlobStream, Client, blob_request, bounded, fetch_manifest, read_blob};
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const REPO: &str = "team/app";
const MIB: usize = 1024 * 1024;
/// Larger than what HTTP/2 flow control lets a server send to a caller that
/// reads nothing (tonic's client windows: 2 MiB per stream, 5 MiB per
/// connection), so an unread stream of it cannot finish by itself.
const BIG: usize = 8 * MIB;
/// How long a test waits for what the service does by itself (a permit
/// given back). A bound, not a speed claim.
const WAIT_BOUND: Duration = Duration::from_secs(30);

/// A fake registry holding a big blob and a manifest (by tag `v1`).
async fn registry() -> (FakeRegistry, String) {
    let fake = FakeRegistry::start().await;
    let blob = pseudo_random_bytes(14, BIG);
    let digest = fake.put_blob(REPO, &blob);
    fake.put_manifest(REPO, Some("v1"), OCI_MANIFEST, &image_manifest("edge", 1));
    (fake, digest)
}

fn config(fake: &FakeRegistry, top: &[&str]) -> String {
    top.iter()
        .fold(
            ServiceConfig::with(Upstream::new("a", &fake.url())),
            |c, line| c.top(line),
        )
        .toml()
}

/// Retries FetchManifest while the service refuses it for overload, until
/// it succeeds or [`WAIT_BOUND`] passes; any other failure fails the test.
async fn manifest_once_admitted(client: &mut Client) -> bool {
    let until = tokio::time::Instant::now() + WAIT_BOUND;
    loop {
        match fetch_manifest(client, REPO, "v1").await {
            Ok(_) => return true,
            Err(status) if status.code() == Code::ResourceExhausted => {}
            Err(status) => panic!("FetchManifest failed: {status:?}"),
        }
        if tokio::time::Instant::now() >= until {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_reading_nothing_cannot_starve_another() {
    let (fake, digest) = registry().await;
    let small = fake.put_blob(REPO, &pseudo_random_bytes(15, 64 * 1024));
    // More permits than one connection may hold streams (the default 256),
    // fewer than the 300 streams it opens: without the per-connection cap
    // that connection takes them all.
    let service = InProcess::start(&config(&fake, &["max_concurrent_rpcs = 280"])).await;
    let greedy = service.client().await;
    let opened = Arc::new(AtomicUsize::new(0));
    let refused = Arc::new(AtomicUsize::new(0));
    let (hold, held) = tokio::sync::watch::channel(());
    let mut streams = Vec::new();
    for _ in 0..300 {
        let mut client = greedy.clone();
        let (opened, refused, mut held) = (opened.clone(), refused.clone(), held.clone());
        let request = blob_request(REPO, &digest);
        streams.push(tokio::spawn(async move {
            match client.fetch_blob(request).await {
                Ok(stream) => {
                    opened.fetch_add(1, Ordering::SeqCst);
                    // Reads nothing, and keeps the stream open.
                    let _ = held.changed().await;
                    drop(stream);
                }
                Err(_) => {
                    refused.fetch_add(1, Ordering::SeqCst);
                }
            }
        }));
    }
    let established = common::eventually(|| {
        opened.load(Ordering::SeqCst) + refused.load(Ordering::SeqCst) >= 256
    })
    .await;
    assert!(
        established,
        "the streams of the first connection did not open"
    );
    // Let the rest of the 300 reach the service, if it lets them: without
    // the cap they would be admitted or refused by now. With it they stay
    // queued in the client, and this wait runs out.
    let all = || opened.load(Ordering::SeqCst) + refused.load(Ordering::SeqCst) == 300;
    common::eventually_within(Duration::from_secs(2), all).await;

    // A second caller, on its own connection, is served.
    let mut other = service.client().await;
    assert!(
        manifest_once_admitted(&mut other).await,
        "the second connection was refused for {WAIT_BOUND:?} while the first held its streams"
    );
    let blob = read_blob(&mut other, blob_request(REPO, &small)).await;
    assert!(blob.error().is_none(), "FetchBlob: {:?}", blob.end);
    assert_eq!(
        refused.load(Ordering::SeqCst),
        0,
        "the first caller's streams queue, not fail"
    );
    assert!(
        opened.load(Ordering::SeqCst) <= 256,
        "{} streams open on one connection",
        opened.load(Ordering::SeqCst)
    );
    drop(hold);
    for stream in streams {
        stream.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_whose_caller_reads_nothing_ends_with_deadline_exceeded() {
    let (fake, digest) = registry().await;
    let toml = config(
        &fake,
        &["stream_idle_timeout = \"2s\"", "max_concurrent_rpcs = 1"],
    );
    let service = InProcess::start(&toml).await;
    let mut stalled_client = service.client().await;
    let stalled = BlobStream::open(&mut stalled_client, blob_request(REPO, &digest))
        .await
        .expect("FetchBlob opens")
        .discard();

    // The one permit comes back while the stream is still unread.
    let mut other = service.client().await;
    assert!(
        manifest_once_admitted(&mut other).await,
        "the unread stream still held its permit after {WAIT_BOUND:?}"
    );

    // Its caller, reading at last, gets what was buffered, then the status.
    let read = stalled.finish().await;
    let status = read.error().expect("the unread stream was ended");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        read.len < BIG as u64,
        "{} of {BIG} bytes: not ended early",
        read.len
    );
}

async fn health(service: &InProcess) -> HealthClient<Channel> {
    HealthClient::new(service.channel().await)
}

fn watch_request(service: &str) -> HealthCheckRequest {
    HealthCheckRequest {
        service: service.to_string(),
    }
}

async fn next_status(
    stream: &mut tonic::Streaming<tonic_health::pb::HealthCheckResponse>,
) -> ServingStatus {
    let message = bounded(stream.message())
        .await
        .expect("the watch delivers a message")
        .expect("the watch is still open");
    ServingStatus::try_from(message.status).expect("a known serving status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_watch_of_an_unknown_service_says_so_and_stays_open() {
    let (fake, _) = registry().await;
    let service = InProcess::start(&config(&fake, &[])).await;
    let mut client = health(&service).await;
    let mut watch = bounded(client.watch(watch_request("no.such.Service")))
        .await
        .expect("Watch of an unknown service is not refused")
        .into_inner();
    assert_eq!(next_status(&mut watch).await, ServingStatus::ServiceUnknown);
    // The protocol keeps the call open for a later status.
    let more = tokio::time::timeout(Duration::from_secs(1), watch.message()).await;
    assert!(more.is_err(), "the watch ended or sent more: {more:?}");
    // Check of the unknown service is NOT_FOUND, as the protocol says.
    let check = bounded(client.check(watch_request("no.such.Service")))
        .await
        .expect_err("Check of an unknown service");
    assert_eq!(check.code(), Code::NotFound, "{check:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_watch_follows_the_server_to_not_serving_and_ends_at_shutdown() {
    let (fake, _) = registry().await;
    // A grace period no test waits out: the watches must end by themselves.
    let service = InProcess::start(&config(&fake, &["shutdown_grace = \"600s\""])).await;
    let mut client = health(&service).await;
    let mut overall = bounded(client.watch(watch_request("")))
        .await
        .expect("Watch of the server")
        .into_inner();
    let mut ours = bounded(client.watch(watch_request("oci.upstream.v1.UpstreamService")))
        .await
        .expect("Watch of the service")
        .into_inner();
    let mut unknown = bounded(client.watch(watch_request("no.such.Service")))
        .await
        .expect("Watch of an unknown service")
        .into_inner();
    assert_eq!(next_status(&mut overall).await, ServingStatus::Serving);
    assert_eq!(next_status(&mut ours).await, ServingStatus::Serving);
    assert_eq!(
        next_status(&mut unknown).await,
        ServingStatus::ServiceUnknown
    );

    let stopping = tokio::spawn(service.stop());
    assert_eq!(next_status(&mut overall).await, ServingStatus::NotServing);
    assert_eq!(next_status(&mut ours).await, ServingStatus::NotServing);
    for watch in [&mut overall, &mut ours, &mut unknown] {
        let end = tokio::time::timeout(WAIT_BOUND, watch.message())
            .await
            .expect("the watch ends at shutdown, not after the grace period");
        let status = end.expect_err("a watch ends with a status");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    }
    let stopped = tokio::time::timeout(WAIT_BOUND, stopping)
        .await
        .expect("the server stops once its watches ended")
        .expect("the stop task did not panic");
    assert!(stopped.is_ok(), "{stopped:?}");
}
