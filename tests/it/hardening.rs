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
            "listen = \"127.0.0.1:7001\"\n[cache]\ndir = \"{}\"\n[[upstreams]]\nname = \"a\"\nurl = \"http://127.0.0.1:5000\"\n",
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
