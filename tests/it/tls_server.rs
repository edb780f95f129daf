//! TLS on the service's gRPC port (`[tls]`), against real peers: the real
//! `grpcurl` and tonic clients with the test authority, without it and in
//! plaintext; mTLS with and without a client certificate; a Kubernetes
//! Secret volume rotated under an open FetchBlob stream; a certificate
//! replaced before its key; a bad pair at start.

use crate::common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::config::{ServiceConfig, Upstream};
use common::content::{OCI_MANIFEST, image_manifest, random_blob};
use common::fake::FakeRegistry;
use common::rpc::{BlobStream, blob_request, manifest_request, unary};
use common::tls::{Issued, SecretVolume, TestCa, served_certificate};
use common::{InProcess, Spawned};
use tokio_rustls::rustls::pki_types::CertificateDer;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// The identity the client certificates name.
const BUILDER: &str = "spiffe://cluster.local/ns/ci/sa/builder";
/// How long a rotated certificate may take to be served (the service
/// polls its files every second): a bound for polling loops, not a timing
/// assertion.
const ROTATION_BOUND: Duration = Duration::from_secs(10);

/// An authority, a server certificate it issued, and a fake upstream.
struct Setup {
    ca: TestCa,
    server: Issued,
    fake: FakeRegistry,
}

impl Setup {
    async fn new() -> Setup {
        let ca = TestCa::new();
        let server = ca.server_cert("grpc");
        Setup {
            ca,
            server,
            fake: FakeRegistry::start().await,
        }
    }

    /// A config serving `cert`/`key`, requiring client certificates from
    /// `client_ca` if given.
    fn config(&self, cert: &Path, key: &Path, client_ca: Option<&Path>) -> String {
        ServiceConfig::with(Upstream::new("fake", &self.fake.url()).retries(0))
            .tls(cert, key, client_ca)
            .toml()
    }

    /// The service in process, serving the server certificate.
    async fn start(&self, client_ca: Option<&Path>) -> InProcess {
        InProcess::start(&self.config(&self.server.cert, &self.server.key, client_ca)).await
    }
}

/// A health Check over `channel` (or the error that kept it from being
/// made): the serving status, or the failure as text.
async fn check(channel: Result<Channel, tonic::transport::Error>) -> Result<ServingStatus, String> {
    let channel = channel.map_err(|e| format!("connect: {}", error_chain(&e)))?;
    let answer = tokio::time::timeout(
        Duration::from_secs(30),
        HealthClient::new(channel).check(HealthCheckRequest::default()),
    )
    .await
    .map_err(|_| "the Check call hung".to_owned())?
    .map_err(|status| format!("Check: {status:?}"))?;
    Ok(answer.into_inner().status())
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// A plaintext (`http://`) channel to `addr`.
async fn plaintext_channel(addr: SocketAddr) -> Result<Channel, tonic::transport::Error> {
    Channel::from_shared(format!("http://{addr}"))
        .expect("valid endpoint")
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
}

/// Runs `grpcurl ARGS...` on a blocking thread.
async fn grpcurl(args: &[&str]) -> Output {
    common::grpcurl::run(args).await.0
}

fn text(out: &Output) -> String {
    format!(
        "{}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn utf8(path: &Path) -> &str {
    path.to_str().expect("temp paths are UTF-8")
}

/// Polls the certificate served to new connections until it is `want`;
/// false if it still is not after [`ROTATION_BOUND`].
async fn eventually_served(addr: SocketAddr, ca_pem: &[u8], want: &CertificateDer<'_>) -> bool {
    let until = Instant::now() + ROTATION_BOUND;
    loop {
        if served_certificate(addr, ca_pem).await.as_ref() == Ok(want) {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_with_the_ca_lists_services_and_checks_health() {
    let setup = Setup::new().await;
    let service = setup.start(None).await;
    let (ca, target) = (setup.ca.ca_file(), service.target());

    let out = grpcurl(&["-cacert", utf8(&ca), &target, "list"]).await;
    assert!(
        out.status.success(),
        "grpcurl list over TLS: {}",
        text(&out)
    );
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(
        listed
            .lines()
            .any(|l| l.trim() == "oci.upstream.v1.UpstreamService"),
        "{listed}"
    );

    let out = grpcurl(&[
        "-cacert",
        utf8(&ca),
        "-d",
        "{}",
        &target,
        "grpc.health.v1.Health/Check",
    ])
    .await;
    assert!(
        out.status.success(),
        "health Check over TLS: {}",
        text(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("\"SERVING\""),
        "{}",
        text(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_without_the_ca_or_in_plaintext_fails() {
    let setup = Setup::new().await;
    let service = setup.start(None).await;
    let target = service.target();

    let out = grpcurl(&[&target, "list"]).await;
    assert!(!out.status.success(), "no CA: {}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("certificate") || stderr.contains("x509"),
        "the failure is the unknown authority: {}",
        text(&out)
    );

    let out = grpcurl(&["-plaintext", &target, "list"]).await;
    assert!(!out.status.success(), "plaintext: {}", text(&out));

    // The service is up all along: with the CA it answers.
    let ca = setup.ca.ca_file();
    let out = grpcurl(&["-cacert", utf8(&ca), &target, "list"]).await;
    assert!(out.status.success(), "{}", text(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tonic_client_with_the_ca_checks_health_and_fetches_a_manifest() {
    let setup = Setup::new().await;
    let manifest = image_manifest("tls", 1);
    let digest = setup
        .fake
        .put_manifest("team/app", Some("v1"), OCI_MANIFEST, &manifest);
    let service = setup.start(None).await;
    let ca_pem = setup.ca.ca_pem();

    let status = check(service.tls_channel(&ca_pem, None).await).await;
    assert_eq!(status, Ok(ServingStatus::Serving));

    let channel = service
        .tls_channel(&ca_pem, None)
        .await
        .expect("a TLS channel with the CA");
    let mut client = common::rpc::Client::new(channel);
    let answer = unary(client.fetch_manifest(manifest_request("team/app", "v1")))
        .await
        .expect("FetchManifest over TLS");
    assert_eq!(answer.digest, digest);
    assert_eq!(&answer.manifest[..], &manifest[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tonic_clients_without_the_ca_or_in_plaintext_fail() {
    let setup = Setup::new().await;
    let service = setup.start(None).await;

    let stranger = TestCa::new();
    let wrong_ca = check(service.tls_channel(&stranger.ca_pem(), None).await).await;
    assert!(
        wrong_ca.is_err(),
        "a client trusting another CA: {wrong_ca:?}"
    );

    let plaintext = check(plaintext_channel(service.addr).await).await;
    assert!(plaintext.is_err(), "a plaintext client: {plaintext:?}");

    let trusted = check(service.tls_channel(&setup.ca.ca_pem(), None).await).await;
    assert_eq!(
        trusted,
        Ok(ServingStatus::Serving),
        "and with the CA it works"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_refuses_clients_without_a_certificate_from_the_ca() {
    let setup = Setup::new().await;
    let ca_file = setup.ca.ca_file();
    let service = setup.start(Some(&ca_file)).await;
    let ca_pem = setup.ca.ca_pem();
    let client = setup.ca.client_cert("builder", BUILDER);
    let other_ca = TestCa::new();
    let stranger = other_ca.client_cert("stranger", BUILDER);

    let none = check(service.tls_channel(&ca_pem, None).await).await;
    assert!(none.is_err(), "no client certificate: {none:?}");
    let foreign = check(
        service
            .tls_channel(&ca_pem, Some(stranger.identity()))
            .await,
    )
    .await;
    assert!(foreign.is_err(), "a certificate of another CA: {foreign:?}");
    let accepted = check(service.tls_channel(&ca_pem, Some(client.identity())).await).await;
    assert_eq!(accepted, Ok(ServingStatus::Serving));

    let target = service.target();
    let out = grpcurl(&["-cacert", utf8(&ca_file), &target, "list"]).await;
    assert!(
        !out.status.success(),
        "grpcurl without -cert: {}",
        text(&out)
    );
    let out = grpcurl(&[
        "-cacert",
        utf8(&ca_file),
        "-cert",
        utf8(&client.cert),
        "-key",
        utf8(&client.key),
        &target,
        "list",
    ])
    .await;
    assert!(out.status.success(), "grpcurl with -cert: {}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("oci.upstream.v1.UpstreamService"),
        "{}",
        text(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_secret_volume_is_served_to_new_connections_while_a_stream_goes_on() {
    let setup = Setup::new().await;
    // Larger than what the client's HTTP/2 windows and the service's queue
    // hold, so most of it crosses the connection after the rotation.
    let blob = random_blob(7, 32 << 20);
    let digest = setup.fake.put_blob("team/app", &blob);
    let before = setup.server.clone();
    let after = setup.ca.server_cert("rotated");
    let mut volume = SecretVolume::new(&[
        ("tls.crt", &before.cert_pem()),
        ("tls.key", &before.key_pem()),
    ]);
    let service =
        InProcess::start(&setup.config(&volume.path("tls.crt"), &volume.path("tls.key"), None))
            .await;
    let ca_pem = setup.ca.ca_pem();
    assert_eq!(
        served_certificate(service.addr, &ca_pem).await,
        Ok(before.cert_der())
    );

    let channel = service.tls_channel(&ca_pem, None).await.expect("connect");
    let mut client = common::rpc::Client::new(channel);
    let mut stream = BlobStream::open(&mut client, blob_request("team/app", &digest))
        .await
        .expect("FetchBlob")
        .expect(blob.clone());
    while stream.read().len < (1 << 20) {
        assert!(
            stream.step().await.expect("FetchBlob stream"),
            "ended early"
        );
    }
    let read_before = stream.read().len;

    volume.update(&[
        ("tls.crt", &after.cert_pem()),
        ("tls.key", &after.key_pem()),
    ]);
    assert!(
        eventually_served(service.addr, &ca_pem, &after.cert_der()).await,
        "the rotated certificate is served to new connections within {ROTATION_BOUND:?}"
    );
    assert_eq!(
        check(service.tls_channel(&ca_pem, None).await).await,
        Ok(ServingStatus::Serving),
        "a new client connects with the rotated certificate"
    );

    let read = stream.finish().await;
    read.assert_bytes(&blob, "the stream opened before the rotation");
    assert!(
        read.len - read_before > (16 << 20),
        "most of the blob was read after the rotation, more than the client's HTTP/2 windows \
         could have held: {read_before} bytes before"
    );
}

/// Replaces `path` in one rename, as a writer that does not want readers
/// to see half a file does.
fn replace(path: &Path, contents: &[u8]) {
    let staged = path.with_extension("new");
    std::fs::write(&staged, contents).expect("write the new file");
    std::fs::rename(&staged, path).expect("rename over the old file");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_replaced_before_its_key_waits_for_the_key() {
    let setup = Setup::new().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert, setup.server.cert_pem()).expect("write the certificate");
    std::fs::write(&key, setup.server.key_pem()).expect("write the key");
    let service = Spawned::start(&setup.config(&cert, &key, None));
    let ca_pem = setup.ca.ca_pem();
    let before = setup.server.cert_der();
    assert_eq!(
        served_certificate(service.addr, &ca_pem).await,
        Ok(before.clone())
    );
    assert!(
        service.logs().contains("tls=true"),
        "the start-up line says TLS:\n{}",
        service.logs()
    );

    let next = setup.ca.server_cert("next");
    replace(&cert, &next.cert_pem());
    let warning = "TLS files changed but cannot be used; the previous certificate stays in use";
    assert!(
        common::eventually(|| service.logs().contains(warning)).await,
        "the mismatch is reported:\n{}",
        service.logs()
    );
    let line = service
        .logs()
        .lines()
        .find(|l| l.contains(warning))
        .map(str::to_owned)
        .expect("the warning line");
    assert!(
        line.contains("tls.key_file") && line.contains("not the private key"),
        "the warning names the field: {line}"
    );
    assert!(!line.contains("PRIVATE KEY"), "no key material: {line}");
    assert_eq!(
        served_certificate(service.addr, &ca_pem).await,
        Ok(before.clone()),
        "the previous pair stays in use"
    );
    assert_eq!(
        check(service.tls_channel(&ca_pem, None).await).await,
        Ok(ServingStatus::Serving)
    );
    // Let a few more polls find the same state (not a timing assertion: on a
    // slow machine fewer polls happen and the count holds all the same).
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        service.logs().matches(warning).count(),
        1,
        "reported once:\n{}",
        service.logs()
    );

    replace(&key, &next.key_pem());
    assert!(
        eventually_served(service.addr, &ca_pem, &next.cert_der()).await,
        "the new pair is used once the key follows:\n{}",
        service.logs()
    );
    assert!(
        service
            .logs()
            .contains("TLS files changed: new certificate in use"),
        "{}",
        service.logs()
    );
    assert_eq!(
        check(service.tls_channel(&ca_pem, None).await).await,
        Ok(ServingStatus::Serving)
    );
}

/// Runs `oci-upstream ARGS...` with its cache in `dir`, waiting at most 30 s.
fn run_binary(dir: &Path, args: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_oci-upstream"))
        .args(args)
        .env("OCI_UPSTREAM_CACHE_DIR", dir.join("cache"))
        .env("OCI_UPSTREAM_LISTEN", "127.0.0.1:0")
        .env_remove("OCI_UPSTREAM_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn oci-upstream");
    let until = Instant::now() + Duration::from_secs(30);
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() >= until {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("collect the output")
}

#[test]
fn a_bad_pair_fails_check_config_and_serve_naming_the_field() {
    let ca = TestCa::new();
    let (one, other) = (ca.server_cert("one"), ca.server_cert("other"));
    let dir = tempfile::tempdir().expect("temp dir");
    let write = |name: &str, cert: &Path, key: &Path| {
        let path = dir.path().join(name);
        let toml = ServiceConfig::with(Upstream::new("a", "http://127.0.0.1:9"))
            .tls(cert, key, None)
            .toml();
        std::fs::write(&path, toml).expect("write config");
        path
    };

    let mismatched = write("mismatched.toml", &one.cert, &other.key);
    let out = run_binary(dir.path(), &["check-config", utf8(&mismatched)]);
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("tls.key_file {}", other.key.display()))
            && stderr.contains("not the private key of the certificate in tls.cert_file"),
        "{stderr}"
    );
    let out = run_binary(dir.path(), &["serve", "--config", utf8(&mismatched)]);
    assert_eq!(
        out.status.code(),
        Some(64),
        "serve refuses it too: {}",
        text(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("tls.key_file"),
        "{}",
        text(&out)
    );

    let missing = write("missing.toml", &dir.path().join("absent.crt"), &one.key);
    let out = run_binary(dir.path(), &["check-config", utf8(&missing)]);
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("tls.cert_file") && stderr.contains("absent.crt"),
        "{stderr}"
    );

    let good = write("good.toml", &one.cert, &one.key);
    let out = run_binary(dir.path(), &["check-config", utf8(&good)]);
    assert!(
        out.status.success(),
        "a matching pair passes: {}",
        text(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_listen_answers_probes_in_plaintext_while_grpc_is_tls_only() {
    let setup = Setup::new().await;
    let toml = ServiceConfig::with(Upstream::new("fake", &setup.fake.url()))
        .top("health_listen = \"127.0.0.1:0\"")
        .tls(&setup.server.cert, &setup.server.key, None)
        .toml();
    let service = InProcess::start(&toml).await;
    let health = service.health_addr.expect("health_listen is set");
    assert_eq!(
        check(plaintext_channel(health).await).await,
        Ok(ServingStatus::Serving)
    );
    // Health only: no reflection either (what kubelet's probe needs is
    // Check, nothing more).
    let (listed, _) = common::grpcurl::run(&["-plaintext", &health.to_string(), "list"]).await;
    assert!(!listed.status.success(), "no reflection on the health port");
    assert!(
        check(plaintext_channel(service.addr).await).await.is_err(),
        "the main port is TLS only"
    );
    // The health port serves nothing else.
    let channel = plaintext_channel(health).await.expect("connect");
    let refused = common::rpc::Client::new(channel)
        .fetch_manifest(manifest_request("team/app", "v1"))
        .await
        .expect_err("not on the health port");
    assert_eq!(refused.code(), tonic::Code::Unimplemented);
}
