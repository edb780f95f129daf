//! Hardening against hostile answers and a damaged cache, and a first run
//! that works: tags that vanish upstream stop resolving, a stored object of
//! the wrong size is fetched again, a skipped upstream says why its circuit
//! opened, and `check-config` runs the checks `serve` runs.

use crate::common;

use std::process::Command;
use std::time::Duration;

use common::config::{ServiceConfig, Upstream};
use common::content::{OCI_MANIFEST, image_manifest, pseudo_random_bytes};
use common::fake::{FakeRegistry, Reply};
use common::faulty::{Act, Cut, FaultyServer, blob_path};
use common::rpc::{blob_request, fetch_manifest, read_blob};
use common::{InProcess, eventually};
use tonic::Code;

const REPO: &str = "team/app";

fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_oci-upstream")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_gone_upstream_is_not_found_not_its_old_digest() {
    let fake = FakeRegistry::start().await;
    let manifest = image_manifest("gone", 1);
    let digest = fake.put_manifest(REPO, Some("v1"), OCI_MANIFEST, &manifest);
    // Stale at once, and servable stale for a day: only the upstream's "not
    // found" may stop the old digest from being served.
    let config = ServiceConfig::with(Upstream::new("a", &fake.url()))
        .cache("tag_ttl = \"1ms\"")
        .cache("stale_if_error = \"24h\"")
        .cache("negative_ttl = \"0s\"");
    let service = InProcess::start(&config.toml()).await;
    let mut client = service.client().await;
    let first = fetch_manifest(&mut client, REPO, "v1")
        .await
        .expect("v1 resolves");
    assert_eq!(first.digest, digest);

    fake.on(
        &format!("/v2/{REPO}/manifests/v1"),
        Reply::not_found("MANIFEST_UNKNOWN"),
    );
    // The stale entry may be answered once more while its refresh learns
    // that the tag is gone; from then on the answer is NOT_FOUND.
    let mut answers = Vec::new();
    for _ in 0..100 {
        let answer = fetch_manifest(&mut client, REPO, "v1").await;
        let gone = matches!(&answer, Err(status) if status.code() == Code::NotFound);
        answers.push(answer.map(|r| r.digest));
        if gone {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        matches!(answers.last(), Some(Err(s)) if s.code() == Code::NotFound),
        "the vanished tag must end up NOT_FOUND: {answers:?}"
    );
    assert!(
        answers.len() <= 3,
        "the stale digest outlived its refresh: {answers:?}"
    );
    let again = fetch_manifest(&mut client, REPO, "v1")
        .await
        .expect_err("still gone");
    assert_eq!(again.code(), Code::NotFound, "{again:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_blob_of_the_wrong_size_is_fetched_again() {
    let fake = FakeRegistry::start().await;
    let blob = pseudo_random_bytes(7, 300_000);
    let digest = fake.put_blob(REPO, &blob);
    let service =
        InProcess::start(&ServiceConfig::with(Upstream::new("a", &fake.url())).toml()).await;
    let mut client = service.client().await;
    let first = read_blob(&mut client, blob_request(REPO, &digest)).await;
    first.assert_bytes(&blob, "first fetch");
    let (alg, hex) = digest.split_once(':').expect("alg:hex");
    let file = service.dir().join("cache/objects").join(alg).join(hex);
    assert!(
        eventually(|| file.exists()).await,
        "the blob was never stored"
    );
    let gets = || fake.count(&format!("/v2/{REPO}/blobs/{digest}"));
    let before = gets();

    // Damaged behind the service's back: cut short.
    let file_bytes = std::fs::read(&file).expect("read the stored blob");
    std::fs::write(&file, &file_bytes[..1000]).expect("truncate the stored blob");
    let second = read_blob(&mut client, blob_request(REPO, &digest)).await;
    second.assert_bytes(&blob, "fetch after the stored copy was truncated");
    let source = second.ok().source.clone().expect("a source");
    assert!(!source.cache_hit, "the damaged copy must not be served");
    assert_eq!(gets(), before + 1, "fetched from the upstream again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_skipped_upstream_says_what_opened_its_circuit() {
    // Nothing listens on this port: every request is refused at connect.
    let closed = common::free_port();
    let upstream = Upstream::new("down", &format!("http://127.0.0.1:{closed}"))
        .retries(0)
        .circuit(1, Duration::from_secs(300));
    let service = InProcess::start(&ServiceConfig::with(upstream).toml()).await;
    let mut client = service.client().await;
    let first = fetch_manifest(&mut client, REPO, "v1")
        .await
        .expect_err("nothing answers");
    assert_eq!(first.code(), Code::Unavailable);
    assert!(
        first.message().contains("could not be reached"),
        "{first:?}"
    );
    let skipped = fetch_manifest(&mut client, REPO, "v1")
        .await
        .expect_err("the circuit is open");
    assert_eq!(skipped.code(), Code::Unavailable);
    assert!(skipped.message().contains("circuit is open"), "{skipped:?}");
    assert!(
        skipped.message().contains("could not be reached"),
        "the skip names the failure that opened the circuit: {skipped:?}"
    );
}

#[test]
fn check_config_runs_the_checks_serve_runs_and_names_what_it_would_use() {
    let dir = tempfile::tempdir().expect("temp dir");
    let missing_ca = dir.path().join("missing-ca.pem");
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        format!(
            "[[upstreams]]\nname = \"a\"\nurl = \"https://r.example\"\nca_file = \"{}\"\n",
            missing_ca.display()
        ),
    )
    .expect("write config");
    let out = Command::new(binary())
        .args(["check-config", bad.to_str().expect("utf-8 path")])
        .output()
        .expect("run check-config");
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("upstream `a`: ca_file") && stderr.contains("missing-ca.pem"),
        "{stderr}"
    );

    let good = dir.path().join("good.toml");
    let cache = dir.path().join("cache");
    std::fs::write(
        &good,
        format!(
            "listen = \"127.0.0.1:7001\"\nmirror_listen = \"127.0.0.1:7005\"\n[cache]\ndir = \"{}\"\n[[upstreams]]\nname = \"a\"\nurl = \"http://127.0.0.1:5000\"\n",
            cache.display()
        ),
    )
    .expect("write config");
    let out = Command::new(binary())
        .args(["check-config", good.to_str().expect("utf-8 path")])
        .output()
        .expect("run check-config");
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("127.0.0.1:7001"), "{stdout}");
    assert!(stdout.contains("mirror on 127.0.0.1:7005"), "{stdout}");
    assert!(stdout.contains(&cache.display().to_string()), "{stdout}");
}

#[test]
fn a_normal_user_without_a_config_gets_a_cache_dir_it_can_write() {
    // As uid/gid 65534 (nobody), whose HOME is a directory it owns: the
    // system cache dir is not writable, so the user's cache dir is used.
    let home = tempfile::tempdir().expect("temp home");
    std::os::unix::fs::chown(home.path(), Some(65534), Some(65534)).expect("chown the home");
    let config = home.path().join("config.toml");
    std::fs::write(&config, "").expect("write an empty config");
    let setpriv = common::require_binary("setpriv", &[], "apt-get install util-linux");
    let out = Command::new(setpriv)
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", binary()])
        .args(["check-config", config.to_str().expect("utf-8 path")])
        .env_clear()
        .env("HOME", home.path())
        .output()
        .expect("run check-config as nobody");
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let expected = home.path().join(".cache/oci-upstream");
    assert!(
        stdout.contains(&expected.display().to_string()),
        "the user's cache dir is named: {stdout}"
    );
    assert!(expected.is_dir(), "and it was created");
}

// ---------------------------------------------------------------------------
// Slow, hung and lying upstreams.

/// FetchBlob of `digest` with a deadline of `limit`, read to the end.
async fn fetch_blob_within(
    client: &mut common::rpc::Client,
    digest: &str,
    limit: Duration,
) -> common::rpc::BlobRead {
    let mut request = tonic::Request::new(blob_request(REPO, digest));
    request.set_timeout(limit);
    common::rpc::read_blob_call(client, request).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickling_upstream_does_not_win_over_a_healthy_one() {
    // 256 MiB; the first upstream sends a tenth at once and then 1 byte/s,
    // on every response (resumes included); the second is healthy.
    let data = pseudo_random_bytes(11, 256 << 20);
    let slow = FaultyServer::start().await;
    let good = FaultyServer::start().await;
    let digest = slow.put_blob(REPO, data.clone());
    good.put_blob(REPO, data.clone());
    slow.pick_all(|_| Act::Trickle {
        fast: Cut::Percent(10),
        bytes: 1,
        every: Duration::from_secs(1),
    });
    let config = ServiceConfig::new()
        .upstream(Upstream::new("slow", &slow.url()).priority(1))
        .upstream(Upstream::new("good", &good.url()).priority(2));
    let service = InProcess::start(&config.toml()).await;
    let mut client = service.client().await;
    let read = fetch_blob_within(&mut client, &digest, Duration::from_secs(60)).await;
    assert!(read.end.is_ok(), "within the caller's 60 s: {:?}", read.end);
    assert!(read.data == data, "the exact bytes");
    let resumes: Vec<_> = good.requests_to(&blob_path(REPO, &digest));
    assert_eq!(
        resumes.len(),
        1,
        "one resume, on the healthy upstream: {resumes:?}"
    );
    assert!(resumes[0].range.is_some(), "a Range resume: {resumes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_upstream_is_hedged_and_its_circuit_opens() {
    // The first upstream accepts and never answers; callers give up after
    // 5 s, long before its 30 s timeout.
    let hung = FaultyServer::start().await;
    hung.pick_all(|_| Act::Hang);
    let good = FakeRegistry::start().await;
    let manifest = image_manifest("hedged", 1);
    let calls = 6;
    let mut digest = String::new();
    for call in 0..calls {
        // A tag per call, so that every call asks the upstreams.
        digest = good.put_manifest(REPO, Some(&format!("v{call}")), OCI_MANIFEST, &manifest);
    }
    let config = ServiceConfig::new()
        .upstream(
            Upstream::new("hung", &hung.url())
                .priority(1)
                .timeout(Duration::from_secs(30))
                .circuit(3, Duration::from_secs(300)),
        )
        .upstream(Upstream::new("good", &good.url()).priority(2));
    let service = InProcess::start(&config.toml()).await;
    let mut client = service.client().await;
    for call in 0..calls {
        let mut request =
            tonic::Request::new(common::rpc::manifest_request(REPO, &format!("v{call}")));
        request.set_timeout(Duration::from_secs(5));
        let answer = client
            .fetch_manifest(request)
            .await
            .unwrap_or_else(|s| panic!("call {call}: {s:?}"))
            .into_inner();
        assert_eq!(answer.digest, digest, "call {call}");
        let source = answer.source.expect("a source");
        assert_eq!(source.upstream, "good", "call {call}");
    }
    // The hung upstream was asked until its circuit opened (3 attempts
    // given up unanswered), then skipped.
    assert!(
        hung.request_count() <= 3,
        "the hung upstream kept being asked: {} requests for {calls} calls",
        hung.request_count()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_with_wrong_bytes_is_taken_from_the_next_upstream_on_retry() {
    let good_bytes = pseudo_random_bytes(3, 400_000);
    let digest = common::content::sha256_digest(&good_bytes);
    let mut bad_bytes = good_bytes.clone();
    bad_bytes[1000] ^= 0xff;
    let liar = FakeRegistry::start().await;
    liar.on(
        &blob_path(REPO, &digest),
        Reply::ok(bad_bytes).header("Content-Type", "application/octet-stream"),
    );
    let honest = FakeRegistry::start().await;
    honest.put_blob(REPO, &good_bytes);
    let config = ServiceConfig::new()
        .upstream(Upstream::new("liar", &liar.url()).priority(1))
        .upstream(Upstream::new("honest", &honest.url()).priority(2));
    let service = InProcess::start(&config.toml()).await;
    let mut client = service.client().await;
    let first = read_blob(&mut client, blob_request(REPO, &digest)).await;
    assert_eq!(
        first.error().map(tonic::Status::code),
        Some(Code::DataLoss),
        "the liar's bytes fail: {:?}",
        first.end
    );
    let retry = read_blob(&mut client, blob_request(REPO, &digest)).await;
    retry.assert_bytes(&good_bytes, "the retry");
    let source = retry.ok().source.clone().expect("a source");
    assert_eq!(source.upstream, "honest", "the retry skips the liar");
    assert_eq!(liar.count(&blob_path(REPO, &digest)), 1, "asked once only");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_nobody_waits_for_is_dropped_when_it_is_slow() {
    let data = pseudo_random_bytes(5, 4 << 20);
    let trickle = FaultyServer::start().await;
    let digest = trickle.put_blob(REPO, data);
    trickle.pick_all(|_| Act::Trickle {
        fast: Cut::Percent(10),
        bytes: 1,
        every: Duration::from_secs(1),
    });
    let service = InProcess::start(
        &ServiceConfig::with(
            Upstream::new("slow", &trickle.url()).timeout(Duration::from_secs(30)),
        )
        .toml(),
    )
    .await;
    let mut client = service.client().await;
    let started = std::time::Instant::now();
    // The caller reads for 3 s, then gives up (its deadline).
    let gave_up = tokio::time::timeout(
        Duration::from_secs(3),
        read_blob(&mut client, blob_request(REPO, &digest)),
    )
    .await;
    assert!(gave_up.is_err(), "the trickled blob cannot have arrived");
    let left_at = started.elapsed();
    assert!(
        common::eventually_within(Duration::from_secs(15), || trickle.peer_closed() >= 1).await,
        "the upstream GET was not closed within 15 s of the caller leaving"
    );
    // Never resumed for nobody: wait past the point where a stalled
    // download would have been resumed (one rate window after the
    // trickle began), then count.
    let resume_point = Duration::from_secs(12);
    if let Some(rest) = resume_point.checked_sub(started.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    assert_eq!(
        trickle.requests_to(&blob_path(REPO, &digest)).len(),
        1,
        "no resume for a download nobody waits for (caller left at {left_at:?})"
    );
    let tmp = service.dir().join("cache/tmp");
    assert!(
        common::eventually(|| std::fs::read_dir(&tmp)
            .map(|d| d.count() == 0)
            .unwrap_or(true))
        .await,
        "its temp file is removed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scrubber_evicts_a_blob_whose_bytes_changed_on_disk() {
    let fake = FakeRegistry::start().await;
    let blob = pseudo_random_bytes(9, 200_000);
    let digest = fake.put_blob(REPO, &blob);
    let config =
        ServiceConfig::with(Upstream::new("a", &fake.url())).cache("scrub_rate = \"16MiB/s\"");
    let service = InProcess::start(&config.toml()).await;
    let mut client = service.client().await;
    read_blob(&mut client, blob_request(REPO, &digest))
        .await
        .assert_bytes(&blob, "first fetch");
    let (alg, hex) = digest.split_once(':').expect("alg:hex");
    let file = service.dir().join("cache/objects").join(alg).join(hex);
    assert!(common::eventually(|| file.exists()).await, "stored");
    // One bit flipped: same size, so only re-hashing can tell.
    let mut stored = std::fs::read(&file).expect("read the stored blob");
    stored[12_345] ^= 0x01;
    std::fs::write(&file, &stored).expect("flip a bit");
    assert!(
        common::eventually_within(Duration::from_secs(25), || !file.exists()).await,
        "the scrubber did not evict the damaged blob"
    );
    let gets = fake.count(&blob_path(REPO, &digest));
    let again = read_blob(&mut client, blob_request(REPO, &digest)).await;
    again.assert_bytes(&blob, "fetch after the scrub");
    assert!(!again.ok().source.clone().expect("a source").cache_hit);
    assert_eq!(
        fake.count(&blob_path(REPO, &digest)),
        gets + 1,
        "from the upstream"
    );
}
