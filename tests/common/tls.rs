//! TLS for in-process fakes and for the service's own gRPC port: a
//! throw-away certificate authority ([`TestCa`]) made with the `openssl`
//! CLI, which issues server certificates for `127.0.0.1` and client
//! certificates naming a URI; an axum listener that terminates TLS with its
//! first server certificate (the service trusts the authority through the
//! upstream's `ca_file`); a directory laid out as a Kubernetes Secret volume
//! ([`SecretVolume`]); and [`served_certificate`], the certificate a TLS
//! server presents to a new connection.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The `openssl` CLI; a test fails saying how to install it when missing.
pub fn openssl_binary() -> PathBuf {
    super::require_binary(
        "openssl",
        &["/usr/bin/openssl"],
        "apt-get install -y openssl",
    )
}

/// Runs `openssl ARGS...` and panics with its stderr when it fails.
pub fn openssl<I, S>(args: I)
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let out = Command::new(openssl_binary())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A certificate authority and a server certificate it signed for the IP
/// address `127.0.0.1`, in a temp dir removed on drop. It issues more
/// certificates on demand: for the service's own gRPC port, and for clients.
pub struct TestCa {
    dir: tempfile::TempDir,
    acceptor: TlsAcceptor,
    serial: AtomicU32,
}

/// A certificate the [`TestCa`] issued and its private key, as PEM files.
#[derive(Clone, Debug)]
pub struct Issued {
    /// The certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
}

impl Issued {
    /// The certificate file's bytes.
    pub fn cert_pem(&self) -> Vec<u8> {
        std::fs::read(&self.cert).expect("read an issued certificate")
    }

    /// The key file's bytes.
    pub fn key_pem(&self) -> Vec<u8> {
        std::fs::read(&self.key).expect("read an issued key")
    }

    /// The certificate, DER-encoded: what a TLS peer presents.
    pub fn cert_der(&self) -> CertificateDer<'static> {
        CertificateDer::from_pem_file(&self.cert).expect("parse an issued certificate")
    }

    /// The pair as a tonic client identity.
    pub fn identity(&self) -> tonic::transport::Identity {
        tonic::transport::Identity::from_pem(self.cert_pem(), self.key_pem())
    }
}

/// `openssl req` arguments for a new P-256 key, unencrypted.
const NEW_KEY: [&str; 5] = [
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:prime256v1",
    "-nodes",
];

impl TestCa {
    /// Makes the authority (P-256, one day) and the server certificate.
    pub fn new() -> TestCa {
        let dir = tempfile::tempdir().expect("temp dir for certificates");
        let ca_key = dir.path().join("ca.key");
        let ca_pem = dir.path().join("ca.pem");
        let subject = "/CN=oci-upstream test CA";
        openssl(
            [
                &["req", "-x509", "-days", "1", "-subj", subject][..],
                &NEW_KEY,
                &["-keyout", utf8(&ca_key), "-out", utf8(&ca_pem)],
            ]
            .concat(),
        );
        let server = issue(dir.path(), 2, "server", "/CN=127.0.0.1", SERVER_EXTENSIONS);
        let acceptor = acceptor(&server.cert, &server.key);
        TestCa {
            dir,
            acceptor,
            serial: AtomicU32::new(3),
        }
    }

    /// The authority's certificate (PEM), for an upstream's `ca_file`.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// The authority's certificate file's bytes.
    pub fn ca_pem(&self) -> Vec<u8> {
        std::fs::read(self.ca_file()).expect("read the CA certificate")
    }

    /// A new server certificate for the IP address `127.0.0.1` with a new
    /// key and the next serial, written as `NAME.pem` and `NAME.key`.
    pub fn server_cert(&self, name: &str) -> Issued {
        self.issue(name, "/CN=127.0.0.1", SERVER_EXTENSIONS)
    }

    /// A new client certificate whose only subject alternative name is the
    /// URI `uri` (a SPIFFE id, say), written as `NAME.pem` and `NAME.key`.
    pub fn client_cert(&self, name: &str, uri: &str) -> Issued {
        self.issue(
            name,
            &format!("/CN={name}"),
            &format!(
                "subjectAltName = URI:{uri}\nbasicConstraints = CA:FALSE\n\
                 extendedKeyUsage = clientAuth\n"
            ),
        )
    }

    fn issue(&self, name: &str, subject: &str, extensions: &str) -> Issued {
        let serial = self.serial.fetch_add(1, Ordering::Relaxed);
        issue(self.dir.path(), serial, name, subject, extensions)
    }

    /// Binds `127.0.0.1:0` and serves TLS with the server certificate.
    pub async fn listener(&self) -> TlsListener {
        let tcp = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a TLS fake");
        TlsListener {
            tcp,
            acceptor: self.acceptor.clone(),
        }
    }
}

/// The extensions of a server certificate for `127.0.0.1`.
const SERVER_EXTENSIONS: &str = "subjectAltName = IP:127.0.0.1\nbasicConstraints = CA:FALSE\n\
                                 extendedKeyUsage = serverAuth\n";

/// Issues `NAME.pem` (serial `serial`) and `NAME.key` in `dir`, signed by
/// the authority there (`ca.pem`, `ca.key`).
fn issue(dir: &Path, serial: u32, name: &str, subject: &str, extensions: &str) -> Issued {
    let path = |suffix: &str| dir.join(format!("{name}.{suffix}"));
    let (key, csr, pem, ext) = (path("key"), path("csr"), path("pem"), path("ext"));
    openssl(
        [
            &["req", "-subj", subject][..],
            &NEW_KEY,
            &["-keyout", utf8(&key), "-out", utf8(&csr)],
        ]
        .concat(),
    );
    std::fs::write(&ext, extensions).expect("write the extensions file");
    let serial = serial.to_string();
    openssl([
        "x509",
        "-req",
        "-days",
        "1",
        "-set_serial",
        &serial,
        "-in",
        utf8(&csr),
        "-CA",
        utf8(&dir.join("ca.pem")),
        "-CAkey",
        utf8(&dir.join("ca.key")),
        "-extfile",
        utf8(&ext),
        "-out",
        utf8(&pem),
    ]);
    Issued { cert: pem, key }
}

fn utf8(path: &Path) -> &str {
    path.to_str().expect("temp paths are UTF-8")
}

fn acceptor(cert: &Path, key: &Path) -> TlsAcceptor {
    let chain = CertificateDer::pem_file_iter(cert)
        .expect("open the server certificate")
        .collect::<Result<Vec<_>, _>>()
        .expect("parse the server certificate");
    let key = PrivateKeyDer::from_pem_file(key).expect("parse the server key");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("server certificate and key match");
    TlsAcceptor::from(Arc::new(config))
}

/// An [`axum::serve::Listener`] that hands out connections after a
/// successful TLS handshake (failed handshakes are dropped).
pub struct TlsListener {
    tcp: TcpListener,
    acceptor: TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((tcp, addr)) = self.tcp.accept().await else {
                continue;
            };
            if let Ok(tls) = self.acceptor.accept(tcp).await {
                return (tls, addr);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

/// A directory laid out as the kubelet lays out a Secret volume: the files
/// live in a timestamped directory, `..data` is a symlink to it, and each
/// `NAME` is a symlink to `..data/NAME`. [`SecretVolume::update`] swaps
/// `..data` to a new directory in one rename, as the kubelet does.
pub struct SecretVolume {
    dir: tempfile::TempDir,
    generation: u32,
}

impl SecretVolume {
    /// A volume holding `files` (name, contents).
    pub fn new(files: &[(&str, &[u8])]) -> SecretVolume {
        let mut volume = SecretVolume {
            dir: tempfile::tempdir().expect("temp dir for a Secret volume"),
            generation: 0,
        };
        volume.update(files);
        for (name, _) in files {
            std::os::unix::fs::symlink(format!("..data/{name}"), volume.path(name))
                .expect("link a Secret file through ..data");
        }
        volume
    }

    /// The path the service is configured with for `name`.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes `files` to a new timestamped directory, points `..data` at it
    /// in one atomic rename, and removes the previous directory.
    pub fn update(&mut self, files: &[(&str, &[u8])]) {
        self.generation += 1;
        let previous = std::fs::read_link(self.dir.path().join("..data")).ok();
        let name = format!("..2030_01_01_00_00_00.{:09}", self.generation);
        let target = self.dir.path().join(&name);
        std::fs::create_dir(&target).expect("create the Secret's new directory");
        for (file, contents) in files {
            std::fs::write(target.join(file), contents).expect("write a Secret file");
        }
        let staged = self.dir.path().join("..data_tmp");
        std::os::unix::fs::symlink(&name, &staged).expect("stage the new ..data link");
        std::fs::rename(&staged, self.dir.path().join("..data")).expect("swap ..data");
        if let Some(previous) = previous {
            std::fs::remove_dir_all(self.dir.path().join(previous))
                .expect("remove the Secret's previous directory");
        }
    }
}

/// The leaf certificate the TLS server at `addr` presents to a new
/// connection (ALPN `h2`), verified against the authority `ca_pem`; the
/// error as text if the handshake fails.
pub async fn served_certificate(
    addr: SocketAddr,
    ca_pem: &[u8],
) -> Result<CertificateDer<'static>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        roots
            .add(cert.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let (_, session) = tls.get_ref();
    session
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|leaf| leaf.clone().into_owned())
        .ok_or_else(|| "the server presented no certificate".to_owned())
}
