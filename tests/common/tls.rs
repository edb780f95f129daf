//! TLS for in-process fakes: a throw-away certificate authority and a server
//! certificate for `127.0.0.1` made with the `openssl` CLI, and an axum
//! listener that terminates TLS with it. The service trusts the authority
//! through the upstream's `ca_file`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

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
/// address `127.0.0.1`, in a temp dir removed on drop.
pub struct TestCa {
    dir: tempfile::TempDir,
    acceptor: TlsAcceptor,
}

impl TestCa {
    /// Makes the authority (P-256, one day) and the server certificate.
    pub fn new() -> TestCa {
        let dir = tempfile::tempdir().expect("temp dir for certificates");
        let path = |name: &str| {
            let p = dir.path().join(name);
            p.to_str().expect("temp paths are UTF-8").to_owned()
        };
        let (ca_key, ca_pem) = (path("ca.key"), path("ca.pem"));
        let (key, csr, pem, ext) = (
            path("server.key"),
            path("server.csr"),
            path("server.pem"),
            path("server.ext"),
        );
        let new_key = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let subject = "/CN=oci-upstream test CA";
        openssl(
            [
                &["req", "-x509", "-days", "1", "-subj", subject][..],
                &new_key,
                &["-keyout", &ca_key, "-out", &ca_pem],
            ]
            .concat(),
        );
        openssl(
            [
                &["req", "-subj", "/CN=127.0.0.1"][..],
                &new_key,
                &["-keyout", &key, "-out", &csr],
            ]
            .concat(),
        );
        std::fs::write(
            &ext,
            "subjectAltName = IP:127.0.0.1\nbasicConstraints = CA:FALSE\n\
             extendedKeyUsage = serverAuth\n",
        )
        .expect("write the extensions file");
        openssl([
            "x509",
            "-req",
            "-days",
            "1",
            "-set_serial",
            "2",
            "-in",
            &csr,
            "-CA",
            &ca_pem,
            "-CAkey",
            &ca_key,
            "-extfile",
            &ext,
            "-out",
            &pem,
        ]);
        let acceptor = acceptor(Path::new(&pem), Path::new(&key));
        TestCa { dir, acceptor }
    }

    /// The authority's certificate (PEM), for an upstream's `ca_file`.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
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
