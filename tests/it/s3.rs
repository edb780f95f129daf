//! The shared cache tier on S3-compatible storage, against a real
//! S3-compatible server (moto) and real Distribution registries, with
//! spawned service instances as replicas on one bucket and their own disk
//! stores: what one replica fetched, another serves with the upstream
//! gone; large blobs go up in parts with bounded memory; a replica killed
//! mid-upload leaves no object; two replicas missing at once both serve
//! correct bytes into one object; and a bucket that is down or wrong costs
//! the service nothing but a warning and a counted error.

use std::time::{Duration, Instant};

use bytes::Bytes;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::common;

use common::Spawned;
use common::config::{ServiceConfig, Upstream};
use common::content::{pseudo_random_bytes, sha256_digest};
use common::distribution::{Distribution, Image};
use common::metrics::Scrape;
use common::rpc::{blob_request, bounded, fetch_manifest, read_blob, read_blob_discarded};
use common::s3::{S3, StoredObject};
use common::slow::SlowBlobServer;

const PREFIX: &str = "replicas/";

/// A replica of the service on `upstream_url`, sharing `s3`'s bucket.
fn replica(upstream_url: &str, s3: &S3) -> Spawned {
    let config = ServiceConfig::with(Upstream::new("hub", upstream_url).retries(0))
        .shared_cache(&s3.table(PREFIX));
    Spawned::start_with_env(&config.toml(), &S3::ENV)
}

/// The key of `digest`'s bytes in the bucket.
fn data_key(digest: &str) -> String {
    format!(
        "{PREFIX}sha256/{}/data",
        digest.trim_start_matches("sha256:")
    )
}

/// The objects stored under `digest`'s key prefix.
async fn objects_of(s3: &S3, digest: &str) -> Vec<StoredObject> {
    let hex = digest.trim_start_matches("sha256:");
    s3.objects(&format!("{PREFIX}sha256/{hex}/")).await
}

/// Waits (bounded) until the bucket holds `digest`'s bytes.
async fn published(s3: &S3, digest: &str) -> StoredObject {
    let key = data_key(digest);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(object) = objects_of(s3, digest)
            .await
            .into_iter()
            .find(|o| o.key == key)
        {
            return object;
        }
        assert!(
            Instant::now() < deadline,
            "{key} never appeared in the bucket"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// FetchBlob of every blob of `image` (bounded), each checked; how long
/// they took in all (printed, never asserted).
async fn fetch_every_blob(client: &mut common::rpc::Client, image: &Image, what: &str) -> Duration {
    let started = Instant::now();
    for blob in image.blobs() {
        let read = bounded(read_blob(client, blob_request("team/app", &blob.digest))).await;
        read.assert_bytes(&blob.data, what);
    }
    let took = started.elapsed();
    eprintln!("{} blobs {what} in {took:?}", image.blobs().count());
    took
}

fn s3_errors(scrape: &Scrape) -> f64 {
    scrape.value(
        "oci_upstream_cache_backend_errors_total",
        &[("backend", "s3")],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_replica_serves_what_the_first_fetched_with_the_upstream_gone() {
    let mut registry = Distribution::start();
    let image = registry.push_image("team/app", "v1").await;
    let layer = &image.layers[0];
    let mut s3 = S3::start("oci-cache").await;

    let a = replica(&registry.url(), &s3);
    let mut client = a.client().await;
    let manifest = fetch_manifest(&mut client, "team/app", &image.manifest.digest)
        .await
        .expect("A: FetchManifest by digest");
    assert!(!manifest.source.unwrap().cache_hit);
    let read = read_blob(&mut client, blob_request("team/app", &layer.digest)).await;
    read.assert_bytes(&layer.data, "A: the layer");
    assert!(!read.ok().source.as_ref().unwrap().cache_hit);
    // Both published, with their holder records.
    for (digest, size) in [
        (&image.manifest.digest, image.manifest.bytes.len()),
        (&layer.digest, layer.data.len()),
    ] {
        assert_eq!(published(&s3, digest).await.size, size as u64);
        let hex = digest.trim_start_matches("sha256:");
        let record = format!("{PREFIX}sha256/{hex}/holders/hub/team/app");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !objects_of(&s3, digest)
            .await
            .iter()
            .any(|o| o.key == record)
        {
            assert!(Instant::now() < deadline, "{record} never appeared");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert_eq!(s3.get(&data_key(&layer.digest)).await, layer.data);

    registry.stop();
    let b = replica(&registry.url(), &s3);
    let mut client = b.client().await;
    let manifest = fetch_manifest(&mut client, "team/app", &image.manifest.digest)
        .await
        .expect("B: FetchManifest from the bucket with the registry stopped");
    assert_eq!(manifest.manifest, image.manifest.bytes);
    assert_eq!(manifest.media_type, image.manifest.media_type);
    assert!(manifest.source.unwrap().cache_hit, "a cache hit");
    let read = read_blob(&mut client, blob_request("team/app", &layer.digest)).await;
    read.assert_bytes(&layer.data, "B: the layer from the bucket");
    assert!(read.ok().source.as_ref().unwrap().cache_hit, "a cache hit");
    let scrape = Scrape::of(b.metrics_addr.unwrap()).await;
    assert_eq!(s3_errors(&scrape), 0.0, "{}", b.logs());
    // Read into B's disk store on the way: a second read needs no bucket.
    s3.stop();
    let read = read_blob(&mut client, blob_request("team/app", &layer.digest)).await;
    read.assert_bytes(&layer.data, "B: the layer again, from its disk store");
    assert!(read.ok().source.as_ref().unwrap().cache_hit);

    // Isolation holds across replicas: another repository is not known to
    // hold the layer, and with the upstream down nobody can confirm it.
    let other = read_blob(&mut client, blob_request("elsewhere/app", &layer.digest)).await;
    assert_eq!(
        other.error().map(|s| s.code()),
        Some(Code::Unavailable),
        "another repository's route must not be served the layer: {:?}",
        other.end
    );
    let scrape = Scrape::of(b.metrics_addr.unwrap()).await;
    assert_eq!(
        s3_errors(&scrape),
        0.0,
        "the disk store's hits asked no S3: {}",
        b.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_256_mib_blob_goes_up_in_parts_in_bounded_memory() {
    const SIZE: u64 = 256 * 1024 * 1024;
    const PEAK_RSS_LIMIT_KIB: u64 = 96 * 1024;
    let registry = Distribution::start();
    let blob = registry.push_big_blob("big/blob", 0x5353, SIZE).await;
    let s3 = S3::start("oci-cache").await;
    let a = replica(&registry.url(), &s3);
    let mut client = a.client().await;
    let read = read_blob_discarded(&mut client, blob_request("big/blob", &blob.digest)).await;
    read.end.as_ref().expect("FetchBlob of 256 MiB");
    assert_eq!(
        (read.len, read.sha256.as_str()),
        (SIZE, blob.digest.as_str())
    );
    let stored = published(&s3, &blob.digest).await;
    assert_eq!(stored.size, SIZE);
    let parts: u32 = stored
        .etag
        .rsplit_once('-')
        .and_then(|(_, n)| n.parse().ok())
        .unwrap_or_else(|| panic!("not a multipart upload's ETag: {:?}", stored.etag));
    assert!(parts > 1, "uploaded in {parts} part(s)");
    assert_eq!(s3.open_uploads().await, 0, "no upload left open");
    let peak = a.peak_rss_kib();
    eprintln!("A peak RSS {peak} KiB, {parts} parts");
    assert!(peak < PEAK_RSS_LIMIT_KIB, "A's peak RSS {peak} KiB");

    // And read back from the bucket by a replica with an empty disk store,
    // in bounded memory too.
    let b = replica(&registry.url(), &s3);
    let mut client = b.client().await;
    let read = read_blob_discarded(&mut client, blob_request("big/blob", &blob.digest)).await;
    read.end
        .as_ref()
        .expect("B: FetchBlob of 256 MiB from the bucket");
    assert_eq!(
        (read.len, read.sha256.as_str()),
        (SIZE, blob.digest.as_str())
    );
    assert!(read.ok().source.as_ref().unwrap().cache_hit);
    let peak = b.peak_rss_kib();
    eprintln!("B peak RSS {peak} KiB");
    assert!(peak < PEAK_RSS_LIMIT_KIB, "B's peak RSS {peak} KiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_upload_leaves_no_object() {
    // 24 MiB at about 12 MiB/s: the kill lands while parts go up.
    let data = Bytes::from(pseudo_random_bytes(0x4B11, 24 * 1024 * 1024));
    let slow = SlowBlobServer::start(
        "team/big",
        data.clone(),
        256 * 1024,
        Duration::from_millis(20),
    );
    let s3 = S3::start("oci-cache").await;
    let mut a = replica(&slow.url(), &s3);
    let mut client = a.client().await;
    let digest = slow.digest();
    let stream = tokio::spawn(async move {
        read_blob_discarded(&mut client, blob_request("team/big", &digest)).await
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while s3.open_uploads().await == 0 || slow.sent_bytes() < 12 * 1024 * 1024 {
        assert!(Instant::now() < deadline, "the upload never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        slow.completed_gets(),
        0,
        "killed before the upstream finished"
    );
    a.kill();
    let _ = stream.await;
    assert!(
        objects_of(&s3, &slow.digest()).await.is_empty(),
        "nothing under the final key: {:?}",
        s3.objects("").await
    );

    slow.set_delay(Duration::ZERO);
    let b = replica(&slow.url(), &s3);
    let mut client = b.client().await;
    let read = read_blob(&mut client, blob_request("team/big", &slow.digest())).await;
    read.assert_bytes(&data, "B after A was killed");
    assert_eq!(published(&s3, &slow.digest()).await.size, data.len() as u64);
    assert_eq!(
        sha256_digest(&s3.get(&data_key(&slow.digest())).await),
        slow.digest()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_stopped_mid_upload_aborts_it() {
    // 32 MiB at about 3 MiB/s, and a 1 s grace: the stop lands mid-upload.
    let data = Bytes::from(pseudo_random_bytes(0x570B, 32 * 1024 * 1024));
    let slow = SlowBlobServer::start("team/big", data, 64 * 1024, Duration::from_millis(20));
    let s3 = S3::start("oci-cache").await;
    let config = ServiceConfig::with(Upstream::new("hub", &slow.url()).retries(0))
        .top("shutdown_grace = \"1s\"")
        .shared_cache(&s3.table(PREFIX));
    let mut a = Spawned::start_with_env(&config.toml(), &S3::ENV);
    let mut client = a.client().await;
    let digest = slow.digest();
    let stream = tokio::spawn(async move {
        read_blob_discarded(&mut client, blob_request("team/big", &digest)).await
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while s3.open_uploads().await == 0 || slow.sent_bytes() < 9 * 1024 * 1024 {
        assert!(Instant::now() < deadline, "the upload never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    a.terminate();
    let status = a
        .wait_exit(Duration::from_secs(15))
        .expect("exit after SIGTERM");
    assert!(status.success(), "exit status {status:?}");
    assert_eq!(
        slow.completed_gets(),
        0,
        "stopped before the upstream finished"
    );
    let _ = stream.await;
    assert_eq!(
        s3.open_uploads().await,
        0,
        "the upload was aborted; log:\n{}",
        a.logs()
    );
    assert!(objects_of(&s3, &slow.digest()).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_missing_at_once_serve_correct_bytes_into_one_object() {
    let registry = Distribution::start();
    let blob = registry
        .push_big_blob("team/cold", 0xC01D, 20 * 1024 * 1024 + 3)
        .await;
    let s3 = S3::start("oci-cache").await;
    let (a, b) = (replica(&registry.url(), &s3), replica(&registry.url(), &s3));
    let (mut client_a, mut client_b) = (a.client().await, b.client().await);
    let (read_a, read_b) = tokio::join!(
        read_blob_discarded(&mut client_a, blob_request("team/cold", &blob.digest)),
        read_blob_discarded(&mut client_b, blob_request("team/cold", &blob.digest)),
    );
    for (name, read) in [("A", &read_a), ("B", &read_b)] {
        read.end
            .as_ref()
            .unwrap_or_else(|e| panic!("{name}: {e:?}"));
        assert_eq!(
            (read.len, read.sha256.as_str()),
            (blob.size, blob.digest.as_str()),
            "{name}"
        );
    }
    published(&s3, &blob.digest).await;
    // Let a second upload finish too, if both replicas made one.
    let deadline = Instant::now() + Duration::from_secs(20);
    while s3.open_uploads().await > 0 {
        assert!(Instant::now() < deadline, "an upload stayed open");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let hex = blob.digest.trim_start_matches("sha256:");
    let keys: Vec<String> = objects_of(&s3, &blob.digest)
        .await
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert_eq!(
        keys,
        [
            data_key(&blob.digest),
            format!("{PREFIX}sha256/{hex}/holders/hub/team/cold")
        ],
        "one object and one holder record"
    );
    assert_eq!(
        sha256_digest(&s3.get(&data_key(&blob.digest)).await),
        blob.digest
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_bucket_down_blobs_come_from_the_upstream_and_the_errors_are_counted() {
    let registry = Distribution::start();
    let image = registry.push_image("team/app", "v1").await;
    let mut s3 = S3::start("oci-cache").await;
    let a = replica(&registry.url(), &s3);
    s3.stop();
    let mut client = a.client().await;
    fetch_every_blob(
        &mut client,
        &image,
        "from the upstream with the bucket down",
    )
    .await;
    let manifest = fetch_manifest(&mut client, "team/app", "v1")
        .await
        .expect("FetchManifest");
    assert_eq!(manifest.manifest, image.manifest.bytes);
    let mut health = HealthClient::new(a.channel().await);
    let status = bounded(health.check(HealthCheckRequest {
        service: String::new(),
    }))
    .await
    .expect("health check")
    .into_inner()
    .status;
    assert_eq!(status, ServingStatus::Serving as i32);
    let addr = a.metrics_addr.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while s3_errors(&Scrape::of(addr).await) == 0.0 {
        assert!(
            Instant::now() < deadline,
            "no S3 error counted; log:\n{}",
            a.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        a.logs().contains("the shared cache (S3) failed"),
        "a warning in the log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_endpoint_at_start_does_not_stop_the_service() {
    let registry = Distribution::start();
    let image = registry.push_image("team/app", "v1").await;
    let table = format!(
        "[cache.s3]\nbucket = \"b\"\nendpoint = \"http://127.0.0.1:{}\"\nallow_http = true\n",
        common::free_port()
    );
    let config = ServiceConfig::with(Upstream::new("hub", &registry.url())).shared_cache(&table);
    let a = Spawned::start_with_env(&config.toml(), &S3::ENV);
    let mut client = a.client().await;
    let layer = &image.layers[0];
    let read = bounded(read_blob(
        &mut client,
        blob_request("team/app", &layer.digest),
    ))
    .await;
    read.assert_bytes(&layer.data, "served with a wrong endpoint");
    let scrape = Scrape::of(a.metrics_addr.unwrap()).await;
    assert!(
        s3_errors(&scrape) > 0.0,
        "the failed probe or lookup is counted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_that_accepts_and_never_answers_costs_a_bounded_wait() {
    let registry = Distribution::start();
    let image = registry.push_image("team/app", "v1").await;
    // A black hole: connections are accepted, and nothing is ever answered.
    let hole = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = hole.local_addr().expect("address").port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for connection in hole.incoming().flatten() {
            held.push(connection);
        }
    });
    let table = format!(
        "[cache.s3]\nbucket = \"b\"\nendpoint = \"http://127.0.0.1:{port}\"\nallow_http = true\n"
    );
    let config = ServiceConfig::with(Upstream::new("hub", &registry.url())).shared_cache(&table);
    let a = Spawned::start_with_env(&config.toml(), &S3::ENV);
    let mut client = a.client().await;
    fetch_every_blob(&mut client, &image, "past a bucket that never answers").await;
    let scrape = Scrape::of(a.metrics_addr.unwrap()).await;
    assert!(s3_errors(&scrape) > 0.0, "the timeouts are counted");
}
