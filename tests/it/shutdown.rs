//! Graceful shutdown of the real `oci-upstream` binary: SIGTERM
//! while slow FetchBlob streams are in flight. Health must turn NOT_SERVING
//! at once while the streams still run, new calls must be refused with
//! UNAVAILABLE, the streams must finish with correct bytes within the grace
//! period, and the process must exit 0. With a grace period shorter than the
//! streams, they are cut (never ended as if complete) and the process still
//! exits 0, within the grace period plus a bounded margin. The slow streams
//! come from the trickling upstream of `common::faulty`, paced above the
//! service's `min_rate` so that only the shutdown can end them early. A
//! stream its caller never reads and a download still running do not hold
//! the exit past `shutdown_grace` + 5 s (Kubernetes' default 30 s grace fits
//! the default 20 s).

use crate::common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::Spawned;
use common::config::{ServiceConfig, Upstream};
use common::content::{OCI_MANIFEST, image_manifest, random_blob, sha256_digest};
use common::faulty::{Act, Cut, FaultyServer, blob_path, manifest_path};
use common::rpc::{BlobStream, Client, blob_request, bounded, manifest_request};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const REPO: &str = "team/app";
const SERVICE_NAME: &str = "oci.upstream.v1.UpstreamService";
const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;
/// Added to every bound derived from the configuration: room for process
/// scheduling on a loaded 2-core CI machine. Never a speed claim.
const SLACK: Duration = Duration::from_secs(5);
/// After the grace period, the service gives connections this long to close
/// (`CLOSE_MARGIN` in `src/app.rs`).
const CLOSE_MARGIN: Duration = Duration::from_secs(2);
fn config(shutdown_grace: &str, upstream_url: &str) -> String {
    ServiceConfig::with(
        Upstream::new("slow", upstream_url)
            .connect_timeout(Duration::from_secs(1))
            .timeout(Duration::from_secs(2))
            .retries(1)
            .retry_max_delay(Duration::from_secs(1)),
    )
    .top(&format!("shutdown_grace = \"{shutdown_grace}\""))
    .cache("negative_ttl = \"0s\"")
    .toml()
}

/// What a FetchBlob stream delivered before it ended.
#[derive(Debug, Default)]
struct Outcome {
    data: Vec<u8>,
    /// The terminating status; `None` when the stream ended OK.
    error: Option<tonic::Status>,
}

/// Starts a FetchBlob stream in a task; the receiver fires once the first
/// data has arrived (the stream is active).
fn start_stream(client: &Client, digest: &str) -> (JoinHandle<Outcome>, oneshot::Receiver<()>) {
    let mut client = client.clone();
    let request = blob_request(REPO, digest);
    let (active, is_active) = oneshot::channel();
    let task = tokio::spawn(async move {
        let mut active = Some(active);
        let mut stream = match BlobStream::open(&mut client, request).await {
            Ok(stream) => stream,
            Err(status) => {
                return Outcome {
                    data: Vec::new(),
                    error: Some(status),
                };
            }
        };
        let end = loop {
            match stream.step().await {
                Ok(true) if stream.read().len > 0 => {
                    if let Some(active) = active.take() {
                        let _ = active.send(());
                    }
                }
                Ok(true) => {}
                Ok(false) => break Ok(()),
                Err(status) => break Err(status),
            }
        };
        Outcome {
            data: stream.into_read().data,
            error: end.err(),
        }
    });
    (task, is_active)
}

async fn health(client: &mut HealthClient<Channel>, service: &str) -> ServingStatus {
    let response = bounded(client.check(HealthCheckRequest {
        service: service.to_string(),
    }))
    .await
    .expect("health answers")
    .into_inner();
    ServingStatus::try_from(response.status).expect("a known serving status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_active_streams_then_exits_zero() {
    let up = FaultyServer::start().await;
    let blobs: Vec<(Bytes, String)> = (0..4)
        .map(|i| {
            let data = random_blob(100 + i, 3 * MIB);
            let digest = up.put_blob(REPO, data.clone());
            (data, digest)
        })
        .collect();
    // 512 KiB/s per stream: eight times min_rate, six seconds per blob.
    up.script_all([Act::Trickle {
        fast: Cut::Bytes(0),
        bytes: 64 * KIB,
        every: Duration::from_millis(125),
    }]);
    let manifest = image_manifest("shutdown", 0);
    let manifest_digest = up.put_manifest(REPO, None, OCI_MANIFEST, manifest.clone());
    let manifest_at = manifest_path(REPO, &manifest_digest);
    up.script(&manifest_at, [Act::Serve]);
    let grace = Duration::from_secs(20);
    let mut service = Spawned::start(&config("20s", &up.url()));
    let client = service.client().await;
    let mut health_client = HealthClient::new(service.channel().await);
    assert_eq!(health(&mut health_client, "").await, ServingStatus::Serving);

    let mut streams = Vec::new();
    for (_, digest) in &blobs {
        let (task, active) = start_stream(&client, digest);
        bounded(active).await.expect("the stream delivers data");
        streams.push(task);
    }

    service.terminate();
    let terminated = Instant::now();

    // Health turns NOT_SERVING at once, while every stream still runs.
    loop {
        if health(&mut health_client, "").await == ServingStatus::NotServing {
            break;
        }
        assert!(
            terminated.elapsed() <= SLACK,
            "health still SERVING {:?} after SIGTERM",
            terminated.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        health(&mut health_client, SERVICE_NAME).await,
        ServingStatus::NotServing,
        "per-service health"
    );
    assert_eq!(
        up.bodies_completed(),
        0,
        "NOT_SERVING was observed while the upstream was still sending"
    );
    assert!(
        streams.iter().all(|s| !s.is_finished()),
        "NOT_SERVING was observed while every stream still ran"
    );

    // A new call is refused, without any upstream work.
    let status = bounded(
        client
            .clone()
            .fetch_manifest(manifest_request(REPO, &manifest_digest)),
    )
    .await
    .expect_err("a new call during the drain is refused");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(
        up.count(&manifest_at),
        0,
        "refused before any upstream work"
    );
    assert!(
        streams.iter().all(|s| !s.is_finished()),
        "the refusal was observed while every stream still ran"
    );

    // Every stream completes with the right bytes.
    for (task, (data, digest)) in streams.into_iter().zip(&blobs) {
        let outcome = bounded(task).await.expect("stream task");
        assert!(
            outcome.error.is_none(),
            "stream of {digest} failed during the drain: {:?}",
            outcome.error
        );
        assert_eq!(outcome.data.len(), data.len(), "length of {digest}");
        assert_eq!(sha256_digest(&outcome.data), *digest, "bytes of {digest}");
    }
    let drained = Instant::now();
    assert!(
        drained - terminated <= grace,
        "the streams took {:?}, longer than the grace period",
        drained - terminated
    );

    // Then the process exits 0, without waiting out the grace period.
    let status = tokio::task::block_in_place(|| service.wait_exit(grace + CLOSE_MARGIN + SLACK))
        .unwrap_or_else(|| {
            panic!(
                "still running {:?} after SIGTERM; log:\n{}",
                terminated.elapsed(),
                service.logs()
            )
        });
    assert!(status.success(), "exit status {status:?}");
    assert!(
        drained.elapsed() <= SLACK,
        "exited {:?} after the last stream ended",
        drained.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_outlasting_a_short_grace_are_cut_and_the_process_exits_zero() {
    let up = FaultyServer::start().await;
    let blobs: Vec<(Bytes, String)> = (0..2)
        .map(|i| {
            let data = random_blob(200 + i, 8 * MIB);
            let digest = up.put_blob(REPO, data.clone());
            (data, digest)
        })
        .collect();
    // 256 KiB/s: four times min_rate, 32 s per blob.
    up.script_all([Act::Trickle {
        fast: Cut::Bytes(0),
        bytes: 64 * KIB,
        every: Duration::from_millis(250),
    }]);
    let grace = Duration::from_secs(1);
    let mut service = Spawned::start(&config("1s", &up.url()));
    let client = service.client().await;

    let mut streams = Vec::new();
    for (_, digest) in &blobs {
        let (task, active) = start_stream(&client, digest);
        bounded(active).await.expect("the stream delivers data");
        streams.push(task);
    }

    service.terminate();
    let terminated = Instant::now();
    let limit = grace + CLOSE_MARGIN + SLACK;
    let status = tokio::task::block_in_place(|| service.wait_exit(limit)).unwrap_or_else(|| {
        panic!(
            "still running {limit:?} after SIGTERM with a {grace:?} grace; log:\n{}",
            service.logs()
        )
    });
    let exited = terminated.elapsed();
    assert!(status.success(), "exit status {status:?}");
    assert!(exited <= limit, "exited after {exited:?}, bound {limit:?}");

    for (task, (data, digest)) in streams.into_iter().zip(&blobs) {
        let outcome = bounded(task).await.expect("stream task");
        assert!(
            outcome.data.len() < data.len(),
            "the stream of {digest} cannot have finished in {exited:?}"
        );
        assert!(
            outcome.error.is_some(),
            "a cut stream must end with an error, not as if complete ({} of {} bytes)",
            outcome.data.len(),
            data.len()
        );
    }
    assert_eq!(up.bodies_completed(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_a_stalled_stream_and_a_running_download_exits_within_grace_plus_5s() {
    let up = FaultyServer::start().await;
    // The stalled stream: served at once, more than HTTP/2 flow control
    // lets the service send to a caller that reads nothing (2 MiB per
    // stream, 5 MiB per connection in tonic's client), so it never ends
    // by itself.
    let stalled_digest = up.put_blob(REPO, random_blob(300, 8 * MIB));
    up.script(&blob_path(REPO, &stalled_digest), [Act::Serve]);
    // The running download: 256 KiB/s, four times min_rate, 32 s per blob.
    // (Seeds 300 and 301 would give the same bytes: XorShift::new sets bit 0.)
    let running_digest = up.put_blob(REPO, random_blob(302, 8 * MIB));
    assert_ne!(stalled_digest, running_digest, "two different blobs");
    up.script_all([Act::Trickle {
        fast: Cut::Bytes(0),
        bytes: 64 * KIB,
        every: Duration::from_millis(250),
    }]);
    let grace = Duration::from_secs(3);
    let mut service = Spawned::start(&config("3s", &up.url()));

    // Opened and never read: the caller holds the stream.
    let mut stalled_client = service.client().await;
    let stalled = BlobStream::open(&mut stalled_client, blob_request(REPO, &stalled_digest))
        .await
        .expect("the stalled FetchBlob opens");
    let (running, active) = start_stream(&service.client().await, &running_digest);
    bounded(active)
        .await
        .expect("the running stream delivers data");

    service.terminate();
    let terminated = Instant::now();
    let limit = grace + SLACK;
    let status = tokio::task::block_in_place(|| service.wait_exit(limit)).unwrap_or_else(|| {
        panic!(
            "still running {limit:?} after SIGTERM with a {grace:?} grace; log:\n{}",
            service.logs()
        )
    });
    let exited = terminated.elapsed();
    eprintln!("exited {exited:?} after SIGTERM (grace {grace:?})");
    assert!(
        status.success(),
        "exit status {status:?}; log:\n{}",
        service.logs()
    );
    assert!(exited <= limit, "exited after {exited:?}, bound {limit:?}");

    // The download was still running: its stream was cut, not completed.
    let outcome = bounded(running).await.expect("stream task");
    assert!(
        outcome.error.is_some(),
        "the cut stream ends with an error ({} bytes); upstream requests {:?}; log:\n{}",
        outcome.data.len(),
        up.requests(),
        service.logs()
    );
    assert_eq!(
        up.bodies_completed(),
        1,
        "only the stalled blob's body was sent whole"
    );
    drop(stalled);
}
