//! AdminService against a real Distribution registry: reflection lists it
//! and `grpcurl` calls it; ListUpstreams shows a circuit opening when its
//! registry goes away; GetCacheStats counts; EvictObject makes the next
//! fetch an upstream fetch, drops the tag entries naming a manifest, lets a
//! stream reading the object finish, and checks its digest argument.

use crate::common;

use common::InProcess;
use common::config::{ServiceConfig, Upstream};
use common::distribution::Distribution;
use common::rpc::{BlobStream, blob_request, fetch_manifest, read_blob, unary};
use oci_upstream::pb::admin_service_client::AdminServiceClient;
use oci_upstream::pb::{
    CircuitState, EvictObjectRequest, GetCacheStatsRequest, ListUpstreamsRequest,
};
use std::time::Duration;
use tonic::Code;
use tonic::transport::Channel;

async fn admin(service: &InProcess) -> AdminServiceClient<Channel> {
    AdminServiceClient::new(service.channel().await)
}

async fn evict(client: &mut AdminServiceClient<Channel>, digest: &str) -> bool {
    unary(client.evict_object(EvictObjectRequest {
        digest: digest.to_owned(),
    }))
    .await
    .expect("EvictObject")
    .found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_lists_and_calls_the_admin_service_and_sees_a_circuit_open() {
    let mut registry = Distribution::start();
    registry.push_image("team/app", "v1").await;
    let service = InProcess::start(
        &ServiceConfig::with(
            Upstream::new("reg", &registry.url())
                .retries(0)
                .circuit(2, Duration::from_secs(300))
                .line("exclude = [\"secret/**\"]"),
        )
        .toml(),
    )
    .await;
    let target = service.target();
    let listed = common::grpcurl::ok(&["-plaintext", &target, "list"]).await;
    assert!(
        listed
            .lines()
            .any(|l| l.trim() == "oci.upstream.v1.AdminService"),
        "{listed}"
    );
    let described = common::grpcurl::ok(&[
        "-plaintext",
        &target,
        "describe",
        "oci.upstream.v1.AdminService",
    ])
    .await;
    for rpc in ["ListUpstreams", "GetCacheStats", "EvictObject"] {
        assert!(described.contains(rpc), "{described}");
    }

    let mut client = service.client().await;
    fetch_manifest(&mut client, "team/app", "v1")
        .await
        .expect("the registry is up");
    let list = |target: String| async move {
        let out = common::grpcurl::ok(&[
            "-plaintext",
            "-d",
            "{}",
            &target,
            "oci.upstream.v1.AdminService/ListUpstreams",
        ])
        .await;
        serde_json::from_str::<serde_json::Value>(&out).expect("grpcurl prints JSON")
    };
    let up = list(target.clone()).await;
    let reg = &up["upstreams"][0];
    assert_eq!(reg["name"], "reg", "{up}");
    assert_eq!(reg["url"], format!("{}/", registry.url()), "{up}");
    assert_eq!(reg["circuit"], "CIRCUIT_STATE_CLOSED", "{up}");
    assert_eq!(reg["authType"], "anonymous", "{up}");
    assert_eq!(reg["exclude"][0], "secret/**", "{up}");
    assert_eq!(reg["repositories"][0], "**", "{up}");

    registry.stop();
    for tag in ["v2", "v3"] {
        let failed = fetch_manifest(&mut client, "team/app", tag).await;
        assert_eq!(failed.expect_err("registry down").code(), Code::Unavailable);
    }
    let down = list(target).await;
    let reg = &down["upstreams"][0];
    assert_eq!(reg["circuit"], "CIRCUIT_STATE_OPEN", "{down}");
    // int64 fields are strings in proto3 JSON.
    assert_eq!(reg["consecutiveFailures"], "2", "{down}");
    assert_eq!(reg["failures"], "2", "{down}");
    assert_eq!(reg["requests"], "3", "{down}");
    assert!(
        reg["lastError"].as_str().is_some_and(|e| e.contains("reg")),
        "{down}"
    );
    assert!(reg["lastErrorTime"].is_string(), "{down}");

    // The same through a tonic client, typed.
    let typed = unary(
        admin(&service)
            .await
            .list_upstreams(ListUpstreamsRequest {}),
    )
    .await
    .expect("ListUpstreams");
    assert_eq!(typed.upstreams[0].circuit, CircuitState::Open as i32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evict_object_makes_the_next_fetch_an_upstream_fetch() {
    let registry = Distribution::start();
    let image = registry.push_image("team/app", "v1").await;
    let layer = &image.layers[0];
    let service =
        InProcess::start(&ServiceConfig::with(Upstream::new("reg", &registry.url())).toml()).await;
    let mut client = service.client().await;
    let mut admin = admin(&service).await;
    let stats = |mut admin: AdminServiceClient<Channel>| async move {
        unary(admin.get_cache_stats(GetCacheStatsRequest {}))
            .await
            .expect("GetCacheStats")
    };
    let empty = stats(admin.clone()).await;
    assert_eq!((empty.objects, empty.bytes, empty.tags), (0, 0, 0));
    assert!(empty.max_bytes > 0);

    let first = read_blob(&mut client, blob_request("team/app", &layer.digest)).await;
    assert!(!first.ok().source.as_ref().expect("a source").cache_hit);
    let manifest = fetch_manifest(&mut client, "team/app", "v1")
        .await
        .expect("v1");
    assert!(
        common::eventually_async(|| {
            let stats = stats(admin.clone());
            async move { stats.await.objects == 2 }
        })
        .await
    );
    let cached = read_blob(&mut client, blob_request("team/app", &layer.digest)).await;
    assert!(cached.ok().source.as_ref().expect("a source").cache_hit);
    let held = stats(admin.clone()).await;
    assert_eq!(held.tags, 1);
    assert_eq!(
        held.bytes,
        (layer.data.len() + image.manifest.bytes.len()) as i64
    );
    assert_eq!(held.downloads_in_flight, 0);
    // Misses: the blob, the tag; hits: the blob.
    assert_eq!((held.hits, held.misses), (1, 2));

    assert!(evict(&mut admin, &layer.digest).await);
    assert!(!evict(&mut admin, &layer.digest).await, "gone already");
    let refetched = read_blob(&mut client, blob_request("team/app", &layer.digest)).await;
    refetched.assert_bytes(&layer.data, "the layer");
    assert!(
        !refetched.ok().source.as_ref().expect("a source").cache_hit,
        "after EvictObject the blob comes from the upstream"
    );

    // Evicting a manifest drops the tag entry naming it.
    assert!(evict(&mut admin, &manifest.digest).await);
    let after = stats(admin.clone()).await;
    assert_eq!(after.tags, 0);
    let again = fetch_manifest(&mut client, "team/app", "v1")
        .await
        .expect("v1");
    assert!(!again.source.expect("a source").cache_hit);

    let unknown = format!("sha256:{}", "0".repeat(64));
    assert!(!evict(&mut admin, &unknown).await);
    let bad = admin
        .evict_object(EvictObjectRequest {
            digest: "sha256:nothex".into(),
        })
        .await
        .expect_err("malformed digest");
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().contains("digest"), "{}", bad.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_reading_an_evicted_object_finishes() {
    let registry = Distribution::start();
    let big = registry.push_big_blob("team/big", 7, 8 << 20).await;
    let service =
        InProcess::start(&ServiceConfig::with(Upstream::new("reg", &registry.url())).toml()).await;
    let mut client = service.client().await;
    let mut admin = admin(&service).await;
    read_blob(&mut client, blob_request("team/big", &big.digest)).await;
    assert!(
        common::eventually_async(|| {
            let mut admin = admin.clone();
            async move {
                unary(admin.get_cache_stats(GetCacheStatsRequest {}))
                    .await
                    .is_ok_and(|s| s.objects == 1)
            }
        })
        .await
    );
    let mut stream = BlobStream::open(&mut client, blob_request("team/big", &big.digest))
        .await
        .expect("FetchBlob from the cache");
    stream.first_data().await;
    assert!(evict(&mut admin, &big.digest).await);
    let read = stream.finish().await;
    assert!(read.end.is_ok(), "{:?}", read.end);
    assert_eq!(read.len, big.size);
    assert_eq!(read.sha256, big.digest);
}
