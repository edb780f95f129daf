//! TLS on the gRPC port: loads the certificate chain, key and (for mTLS)
//! client CA that `[tls]` names, keeps them current while the files rotate,
//! and turns the bound listener into the stream of established TLS
//! connections tonic serves. Also reads the identities a client certificate
//! names, for matching callers.
//!
//! - [`ServerTls::load`] reads the three files and builds a rustls
//!   configuration (ALPN `h2`; with `client_ca_file`, a client certificate
//!   signed by that CA is required). Every error names the `[tls]` key and
//!   the file.
//! - [`ServerTls::incoming`] accepts TCP connections and runs their
//!   handshakes concurrently, each bounded in time, at most
//!   [`MAX_HANDSHAKES`] at once. Each connection takes the configuration in
//!   use when it arrives; established connections keep theirs.
//! - While the stream lives, the files are read every [`RELOAD_INTERVAL`];
//!   when their contents change and make a usable configuration, it is used
//!   for new connections. Contents that do not (a key replaced before its
//!   certificate, a half-written file) leave the previous configuration in
//!   use and are reported once if they persist. Reading through the paths
//!   each time follows a Kubernetes Secret volume, whose `..data` symlink is
//!   swapped to a new directory.
//! - The stream yields `tokio_rustls::server::TlsStream<TcpStream>`, for
//!   which tonic (feature `tls-ring`) records the client's certificate
//!   chain: handlers read it with `Request::peer_certs`.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use sha2::{Digest as _, Sha256};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::Sleep;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::crypto::CryptoProvider;
use tokio_rustls::rustls::pki_types::pem::{self, PemObject as _};
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{VerifierBuilderError, WebPkiClientVerifier};
use tokio_rustls::rustls::sign::{CertifiedKey, SingleCertAndKey};
use tokio_rustls::rustls::{self, InconsistentKeys, RootCertStore, ServerConfig};
use tokio_rustls::server::TlsStream;
use tokio_stream::Stream;
use tokio_util::sync::{CancellationToken, DropGuard};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer as _;

use crate::config::TlsConfig;
use crate::telemetry::describe;

/// How often the files are read to see whether they changed.
pub(crate) const RELOAD_INTERVAL: Duration = Duration::from_secs(1);
/// Longest a client may take to complete its handshake.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; further connections wait in the
/// listener's backlog. Bounds the memory a flood of silent clients holds.
pub(crate) const MAX_HANDSHAKES: usize = 256;
/// Pause of the accept loop after an error that is not one connection's
/// (out of file descriptors, out of memory): retrying at once would spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_secs(1);

/// Why the TLS files cannot be used. Each message starts with the `[tls]`
/// key and the file; none holds key material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("tls.{field} {}: cannot read: {source}", path.display())]
    Read {
        /// The `[tls]` key naming the file.
        field: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A file is not PEM, or holds none of what it should.
    #[error("tls.{field} {}: {what}: {source}", path.display())]
    Pem {
        /// The `[tls]` key naming the file.
        field: &'static str,
        /// The file.
        path: PathBuf,
        /// What was looked for.
        what: &'static str,
        /// Why it was not found.
        #[source]
        source: pem::Error,
    },
    /// A certificate or key was found but cannot be used.
    #[error("tls.{field} {}: {source}", path.display())]
    Unusable {
        /// The `[tls]` key naming the file.
        field: &'static str,
        /// The file.
        path: PathBuf,
        /// What rustls found wrong.
        #[source]
        source: rustls::Error,
    },
    /// The key is not the one the leaf certificate was issued for (for
    /// instance, one of the two files was replaced and the other not yet).
    #[error(
        "tls.key_file {}: not the private key of the certificate in tls.cert_file {}",
        key.display(),
        cert.display()
    )]
    KeyMismatch {
        /// `cert_file`.
        cert: PathBuf,
        /// `key_file`.
        key: PathBuf,
    },
    /// No client verifier can be made of the client CA file.
    #[error("tls.client_ca_file {}: {source}", path.display())]
    ClientCa {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: VerifierBuilderError,
    },
}

/// The contents of the `[tls]` files, read one after the other. Not
/// `Debug`: it holds the private key.
struct Files {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

/// A SHA-256 over the contents of the `[tls]` files: two polls that read
/// the same bytes have the same fingerprint (and no copy of the key needs
/// to be kept to compare).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fingerprint([u8; 32]);

impl Files {
    /// Reads the files `paths` names (blocking).
    fn read(paths: &TlsConfig) -> Result<Files, TlsError> {
        let read = |field: &'static str, path: &Path| {
            std::fs::read(path).map_err(|source| TlsError::Read {
                field,
                path: path.to_owned(),
                source,
            })
        };
        Ok(Files {
            cert: read("cert_file", &paths.cert_file)?,
            key: read("key_file", &paths.key_file)?,
            client_ca: paths
                .client_ca_file
                .as_deref()
                .map(|path| read("client_ca_file", path))
                .transpose()?,
        })
    }

    fn fingerprint(&self) -> Fingerprint {
        let mut hash = Sha256::new();
        let parts = [Some(&self.cert), Some(&self.key), self.client_ca.as_ref()];
        for part in parts {
            match part {
                Some(bytes) => {
                    hash.update([1]);
                    hash.update((bytes.len() as u64).to_be_bytes());
                    hash.update(bytes);
                }
                None => hash.update([0]),
            }
        }
        Fingerprint(hash.finalize().into())
    }

    /// Builds the server configuration these contents make.
    fn server_config(&self, paths: &TlsConfig) -> Result<Loaded, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain = CertificateDer::pem_slice_iter(&self.cert)
            .collect::<Result<Vec<_>, _>>()
            .and_then(|chain| match chain.is_empty() {
                true => Err(pem::Error::NoItemsFound),
                false => Ok(chain),
            })
            .map_err(|source| TlsError::Pem {
                field: "cert_file",
                path: paths.cert_file.clone(),
                what: "no PEM certificate chain",
                source,
            })?;
        let key = PrivateKeyDer::from_pem_slice(&self.key).map_err(|source| TlsError::Pem {
            field: "key_file",
            path: paths.key_file.clone(),
            what: "no PEM private key",
            source,
        })?;
        let certified = certified_key(chain, key, &provider, paths)?;
        let leaf = certified.cert[0].clone();
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|source| TlsError::Unusable {
                field: "cert_file",
                path: paths.cert_file.clone(),
                source,
            })?;
        let builder = match (&paths.client_ca_file, &self.client_ca) {
            (Some(path), Some(pem)) => {
                builder.with_client_cert_verifier(client_verifier(path, pem, provider)?)
            }
            _ => builder.with_no_client_auth(),
        };
        let mut config = builder.with_cert_resolver(Arc::new(SingleCertAndKey::from(certified)));
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Loaded {
            config: Arc::new(config),
            leaf,
        })
    }
}

/// The chain with its signing key, checked to belong together.
fn certified_key(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    provider: &CryptoProvider,
    paths: &TlsConfig,
) -> Result<CertifiedKey, TlsError> {
    let signing_key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|source| TlsError::Unusable {
            field: "key_file",
            path: paths.key_file.clone(),
            source,
        })?;
    let certified = CertifiedKey::new(chain, signing_key);
    match certified.keys_match() {
        // A key that cannot tell its public half is left to the handshake,
        // as rustls does.
        Ok(()) | Err(rustls::Error::InconsistentKeys(InconsistentKeys::Unknown)) => Ok(certified),
        Err(rustls::Error::InconsistentKeys(_)) => Err(TlsError::KeyMismatch {
            cert: paths.cert_file.clone(),
            key: paths.key_file.clone(),
        }),
        Err(source) => Err(TlsError::Unusable {
            field: "cert_file",
            path: paths.cert_file.clone(),
            source,
        }),
    }
}

/// A verifier requiring a client certificate signed by one of the
/// certificates in `pem`.
fn client_verifier(
    path: &Path,
    pem: &[u8],
    provider: Arc<CryptoProvider>,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            field: "client_ca_file",
            path: path.to_owned(),
            what: "no PEM certificates",
            source,
        })?;
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots.add(cert).map_err(|source| TlsError::Unusable {
            field: "client_ca_file",
            path: path.to_owned(),
            source,
        })?;
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|source| TlsError::ClientCa {
            path: path.to_owned(),
            source,
        })
}

/// A server configuration and the leaf certificate it presents.
struct Loaded {
    config: Arc<ServerConfig>,
    leaf: CertificateDer<'static>,
}

/// TLS for the gRPC port: the configuration in use, and the `[tls]` paths
/// it is reloaded from.
pub(crate) struct ServerTls {
    paths: TlsConfig,
    current: Arc<ArcSwap<ServerConfig>>,
    fingerprint: Fingerprint,
    leaf: CertificateDer<'static>,
}

impl ServerTls {
    /// Reads the files `paths` names and builds the configuration: what
    /// start-up (and `check-config`) checks. Blocking.
    pub(crate) fn load(paths: &TlsConfig) -> Result<ServerTls, TlsError> {
        let files = Files::read(paths)?;
        let loaded = files.server_config(paths)?;
        Ok(ServerTls {
            paths: paths.clone(),
            current: Arc::new(ArcSwap::new(loaded.config)),
            fingerprint: files.fingerprint(),
            leaf: loaded.leaf,
        })
    }

    /// True when clients must present a certificate (`client_ca_file`).
    pub(crate) fn requires_client_certificate(&self) -> bool {
        self.paths.client_ca_file.is_some()
    }

    /// The established TLS connections of `listener`, for
    /// `serve_with_incoming_shutdown`. Starts the reload of the files,
    /// which stops when the stream is dropped. Needs a runtime.
    pub(crate) fn incoming(self, listener: TcpListener) -> TlsIncoming {
        log_in_use(&self.leaf, "TLS certificate in use");
        let stop = CancellationToken::new();
        tokio::spawn(reload(
            self.paths,
            self.current.clone(),
            self.fingerprint,
            stop.clone(),
        ));
        TlsIncoming {
            listener,
            current: self.current,
            handshakes: JoinSet::new(),
            pause: None,
            _reload: stop.drop_guard(),
        }
    }
}

/// What one poll of the files found, as far as deciding what to do goes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    /// The files were read; these are their contents.
    Contents(Fingerprint),
    /// A file could not be read, for this reason.
    Unreadable(String),
}

/// What to do after a poll.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// The files hold what is in use.
    Unchanged,
    /// Not tried yet: try to build a configuration of them.
    Try,
    /// The same unusable state as on the last poll, now reported.
    Warn(String),
    /// An unusable state already reported.
    Quiet,
}

/// The reload's memory between polls: what is in use, and the last state
/// that could not be used. An unusable state is reported when a second poll
/// finds it again (so a rotation read half-way, one file old and one new,
/// is not), and only once.
#[derive(Debug)]
struct Watch {
    in_use: Fingerprint,
    rejected: Option<Rejected>,
}

#[derive(Debug)]
struct Rejected {
    seen: Seen,
    why: String,
    reported: bool,
}

impl Watch {
    fn new(in_use: Fingerprint) -> Watch {
        Watch {
            in_use,
            rejected: None,
        }
    }

    fn verdict(&mut self, seen: &Seen) -> Verdict {
        if *seen == Seen::Contents(self.in_use) {
            self.rejected = None;
            return Verdict::Unchanged;
        }
        match &mut self.rejected {
            Some(rejected) if rejected.seen == *seen => match rejected.reported {
                true => Verdict::Quiet,
                false => {
                    rejected.reported = true;
                    Verdict::Warn(rejected.why.clone())
                }
            },
            _ => Verdict::Try,
        }
    }

    fn accepted(&mut self, fingerprint: Fingerprint) {
        self.in_use = fingerprint;
        self.rejected = None;
    }

    fn rejected(&mut self, seen: Seen, why: String) {
        self.rejected = Some(Rejected {
            seen,
            why,
            reported: false,
        });
    }
}

/// Reads the files every [`RELOAD_INTERVAL`] and swaps a new configuration
/// into `current` when they change and are usable, until `stop`.
async fn reload(
    paths: TlsConfig,
    current: Arc<ArcSwap<ServerConfig>>,
    in_use: Fingerprint,
    stop: CancellationToken,
) {
    let paths = Arc::new(paths);
    let mut watch = Watch::new(in_use);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(RELOAD_INTERVAL) => {}
        }
        let read = {
            let paths = paths.clone();
            tokio::task::spawn_blocking(move || Files::read(&paths)).await
        };
        let Ok(read) = read else {
            // The blocking pool is shutting down with the runtime.
            return;
        };
        let seen = match &read {
            Ok(files) => Seen::Contents(files.fingerprint()),
            Err(e) => Seen::Unreadable(describe(e)),
        };
        match watch.verdict(&seen) {
            Verdict::Unchanged | Verdict::Quiet => {}
            Verdict::Warn(why) => tracing::warn!(
                error = %why,
                "TLS files changed but cannot be used; the previous certificate stays in use"
            ),
            Verdict::Try => match read.and_then(|files| {
                let loaded = files.server_config(&paths)?;
                Ok((files.fingerprint(), loaded))
            }) {
                Ok((fingerprint, loaded)) => {
                    current.store(loaded.config);
                    watch.accepted(fingerprint);
                    log_in_use(&loaded.leaf, "TLS files changed: new certificate in use");
                }
                Err(e) => {
                    let why = describe(&e);
                    tracing::debug!(error = %why, "TLS files changed but cannot be used yet");
                    watch.rejected(seen, why);
                }
            },
        }
    }
}

/// Logs which certificate the server presents.
fn log_in_use(leaf: &CertificateDer<'_>, message: &str) {
    let names = certificate_identities(leaf);
    match X509Certificate::from_der(leaf.as_ref()) {
        Ok((_, cert)) => {
            let not_after = cert.validity().not_after.timestamp();
            let not_after = u64::try_from(not_after)
                .map(|secs| std::time::UNIX_EPOCH + Duration::from_secs(secs))
                .map(|t| humantime::format_rfc3339_seconds(t).to_string())
                .unwrap_or_else(|_| cert.validity().not_after.to_string());
            tracing::info!(
                subject = %cert.subject(),
                serial = %cert.raw_serial_as_string(),
                %not_after,
                ?names,
                "{message}"
            );
        }
        // rustls accepted it; a certificate x509-parser cannot read is
        // still served.
        Err(_) => tracing::info!(?names, "{message}"),
    }
}

/// The URI and DNS subject alternative names of `cert`, in the order it
/// lists them (empty if it names none or cannot be parsed): what a
/// `[[callers]] certificate_san` is matched against.
pub(crate) fn certificate_identities(cert: &CertificateDer<'_>) -> Vec<String> {
    let Ok((_, cert)) = X509Certificate::from_der(cert.as_ref()) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some((*uri).to_owned()),
            GeneralName::DNSName(dns) => Some((*dns).to_owned()),
            _ => None,
        })
        .collect()
}

/// The established TLS connections of a listener (see
/// [`ServerTls::incoming`]). Failed handshakes are logged at debug and
/// dropped; the stream never yields an error.
pub(crate) struct TlsIncoming {
    listener: TcpListener,
    current: Arc<ArcSwap<ServerConfig>>,
    handshakes: JoinSet<Option<TlsStream<TcpStream>>>,
    pause: Option<Pin<Box<Sleep>>>,
    /// Stops the reload when the stream is dropped.
    _reload: DropGuard,
}

impl TlsIncoming {
    /// Starts the handshake of a new connection with the configuration in
    /// use now.
    fn handshake(&mut self, tcp: TcpStream, peer: SocketAddr) {
        // Nagle's algorithm would hold small answers for the peer's
        // delayed ACK.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(%peer, error = %e, "cannot set TCP_NODELAY");
        }
        let acceptor = TlsAcceptor::from(self.current.load_full());
        self.handshakes.spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => Some(tls),
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    None
                }
                Err(_) => {
                    tracing::debug!(%peer, timeout = ?HANDSHAKE_TIMEOUT, "TLS handshake timed out");
                    None
                }
            }
        });
    }
}

impl Stream for TlsIncoming {
    type Item = Result<TlsStream<TcpStream>, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            // Polled after each new handshake too, so that its end wakes
            // this stream.
            match this.handshakes.poll_join_next(cx) {
                Poll::Ready(Some(Ok(Some(tls)))) => return Poll::Ready(Some(Ok(tls))),
                // A failed handshake (logged), or a task cancelled as the
                // runtime stops.
                Poll::Ready(Some(Ok(None) | Err(_))) => continue,
                Poll::Ready(None) | Poll::Pending => {}
            }
            if this.handshakes.len() >= MAX_HANDSHAKES {
                return Poll::Pending;
            }
            if let Some(pause) = this.pause.as_mut() {
                if pause.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                this.pause = None;
            }
            match this.listener.poll_accept(cx) {
                Poll::Ready(Ok((tcp, peer))) => this.handshake(tcp, peer),
                Poll::Ready(Err(e)) if is_connection_error(&e) => {
                    tracing::debug!(error = %e, "connection failed before accept");
                }
                Poll::Ready(Err(e)) => {
                    tracing::warn!(error = %e, pause = ?ACCEPT_ERROR_PAUSE, "cannot accept connections");
                    this.pause = Some(Box::pin(tokio::time::sleep(ACCEPT_ERROR_PAUSE)));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// Errors of one connection, not of the listener.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::net::{IpAddr, Ipv4Addr};
    use std::sync::Mutex;

    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, SanType,
    };
    use tokio::io::AsyncReadExt as _;
    use tokio_stream::StreamExt as _;
    use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity, Server};
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;

    const SPIFFE: &str = "spiffe://cluster.local/ns/ci/sa/builder";

    /// A throw-away certificate authority.
    struct Ca(CertifiedIssuer<'static, KeyPair>);

    /// A certificate and its key, as PEM.
    struct Leaf {
        cert: String,
        key: String,
        der: CertificateDer<'static>,
    }

    impl Ca {
        fn new() -> Ca {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params
                .distinguished_name
                .push(DnType::CommonName, "oci-upstream test CA");
            Ca(CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap())
        }

        fn issue(&self, sans: Vec<SanType>) -> Leaf {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.subject_alt_names = sans;
            let key = KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, &self.0).unwrap();
            Leaf {
                cert: cert.pem(),
                key: key.serialize_pem(),
                der: cert.der().clone(),
            }
        }

        fn server(&self) -> Leaf {
            self.issue(vec![SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST))])
        }

        fn client(&self) -> Leaf {
            self.issue(vec![SanType::URI(SPIFFE.try_into().unwrap())])
        }
    }

    /// `[tls]` files written to a temp dir.
    struct Layout {
        dir: tempfile::TempDir,
        paths: TlsConfig,
    }

    impl Layout {
        fn new(cert: &str, key: &str, client_ca: Option<&str>) -> Layout {
            let dir = tempfile::tempdir().unwrap();
            let write = |name: &str, text: &str| {
                let path = dir.path().join(name);
                std::fs::write(&path, text).unwrap();
                path
            };
            let paths = TlsConfig {
                cert_file: write("tls.crt", cert),
                key_file: write("tls.key", key),
                client_ca_file: client_ca.map(|pem| write("ca.crt", pem)),
            };
            Layout { dir, paths }
        }

        fn error(&self) -> String {
            match ServerTls::load(&self.paths) {
                Ok(_) => panic!("the files should be refused"),
                Err(e) => describe(&e),
            }
        }
    }

    #[test]
    fn certificate_identities_are_the_uri_and_dns_names_in_order() {
        let ca = Ca::new();
        let leaf = ca.issue(vec![
            SanType::DnsName("builder.ci.svc".try_into().unwrap()),
            SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            SanType::Rfc822Name("ci@example.com".try_into().unwrap()),
            SanType::URI(SPIFFE.try_into().unwrap()),
        ]);
        assert_eq!(
            certificate_identities(&leaf.der),
            vec!["builder.ci.svc".to_owned(), SPIFFE.to_owned()]
        );
        assert!(certificate_identities(&ca.server().der).is_empty());
        assert!(
            certificate_identities(&CertificateDer::from(vec![0x30, 0x03, 1, 2, 3])).is_empty()
        );
    }

    #[test]
    fn a_matching_pair_loads_and_a_client_ca_requires_client_certificates() {
        let ca = Ca::new();
        let server = ca.server();
        let plain = Layout::new(&server.cert, &server.key, None);
        let tls = ServerTls::load(&plain.paths).unwrap();
        assert!(!tls.requires_client_certificate());
        assert_eq!(tls.leaf, server.der);
        assert_eq!(tls.current.load().alpn_protocols, vec![b"h2".to_vec()]);

        let mutual = Layout::new(&server.cert, &server.key, Some(&ca.0.pem()));
        assert!(
            ServerTls::load(&mutual.paths)
                .unwrap()
                .requires_client_certificate()
        );
    }

    #[test]
    fn errors_name_the_key_and_the_file() {
        let ca = Ca::new();
        let (one, other) = (ca.server(), ca.server());

        let missing = Layout::new(&one.cert, &one.key, None);
        std::fs::remove_file(&missing.paths.key_file).unwrap();
        let e = missing.error();
        assert!(e.starts_with("tls.key_file "), "{e}");
        assert!(e.contains("tls.key") && e.contains("cannot read"), "{e}");

        let e = Layout::new("not pem", &one.key, None).error();
        assert!(
            e.starts_with("tls.cert_file ") && e.contains("no PEM certificate"),
            "{e}"
        );

        let e = Layout::new(&one.cert, &one.cert, None).error();
        assert!(
            e.starts_with("tls.key_file ") && e.contains("no PEM private key"),
            "{e}"
        );

        let mismatched = Layout::new(&one.cert, &other.key, None);
        let e = mismatched.error();
        assert!(
            e.starts_with("tls.key_file ") && e.contains("not the private key of the certificate"),
            "{e}"
        );
        assert!(
            e.contains(&mismatched.paths.cert_file.display().to_string()),
            "{e}"
        );
        assert!(!e.contains("PRIVATE KEY"), "no key material: {e}");

        let e = Layout::new(&one.cert, &one.key, Some("")).error();
        assert!(e.starts_with("tls.client_ca_file "), "{e}");
        let _ = missing.dir;
    }

    #[test]
    fn an_unusable_state_is_reported_once_when_a_second_poll_finds_it() {
        let fp = |b: u8| Fingerprint([b; 32]);
        let mut watch = Watch::new(fp(1));
        assert_eq!(watch.verdict(&Seen::Contents(fp(1))), Verdict::Unchanged);

        // A new state is tried; a failure is not reported yet.
        let half = Seen::Contents(fp(2));
        assert_eq!(watch.verdict(&half), Verdict::Try);
        watch.rejected(half.clone(), "mismatch".into());
        // Found again: reported, once.
        assert_eq!(watch.verdict(&half), Verdict::Warn("mismatch".into()));
        assert_eq!(watch.verdict(&half), Verdict::Quiet);
        assert_eq!(watch.verdict(&half), Verdict::Quiet);

        // A different bad state is tried, then reported on its own.
        let gone = Seen::Unreadable("tls.cert_file: cannot read".into());
        assert_eq!(watch.verdict(&gone), Verdict::Try);
        watch.rejected(gone.clone(), "gone".into());
        assert_eq!(watch.verdict(&gone), Verdict::Warn("gone".into()));

        // A usable state ends it; the same bad state later is new again.
        assert_eq!(watch.verdict(&Seen::Contents(fp(3))), Verdict::Try);
        watch.accepted(fp(3));
        assert_eq!(watch.verdict(&Seen::Contents(fp(3))), Verdict::Unchanged);
        assert_eq!(watch.verdict(&half), Verdict::Try);

        // Back to what is in use after a bad state: nothing to do, and the
        // bad state is forgotten.
        watch.rejected(half.clone(), "mismatch".into());
        assert_eq!(watch.verdict(&Seen::Contents(fp(3))), Verdict::Unchanged);
        assert_eq!(watch.verdict(&half), Verdict::Try);
    }

    async fn bind() -> (TcpListener, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        (listener, addr)
    }

    #[tokio::test]
    async fn a_client_chain_reaches_handlers_and_a_silent_client_blocks_no_one() {
        let ca = Ca::new();
        let (server, client) = (ca.server(), ca.client());
        let layout = Layout::new(&server.cert, &server.key, Some(&ca.0.pem()));
        let tls = ServerTls::load(&layout.paths).unwrap();
        let (listener, addr) = bind().await;

        let seen = Arc::new(Mutex::new(None));
        let record = {
            let seen = seen.clone();
            move |request: tonic::Request<()>| {
                let chain = request.peer_certs();
                *seen.lock().unwrap() = Some((chain, request.remote_addr()));
                Ok(request)
            }
        };
        let (_health, health) = crate::grpc::health_reporter();
        let serving = tokio::spawn(
            Server::builder()
                .add_service(tonic::service::interceptor::InterceptedService::new(
                    health, record,
                ))
                .serve_with_incoming(tls.incoming(listener)),
        );

        // A client that connects and says nothing holds one handshake slot
        // only.
        let mut silent = TcpStream::connect(addr).await.unwrap();

        let channel = Channel::from_shared(format!("https://{addr}"))
            .unwrap()
            .tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(ca.0.pem()))
                    .identity(Identity::from_pem(&client.cert, &client.key)),
            )
            .unwrap()
            .connect()
            .await
            .unwrap();
        HealthClient::new(channel)
            .check(HealthCheckRequest::default())
            .await
            .unwrap();

        let (chain, remote) = seen.lock().unwrap().take().expect("the call was seen");
        let chain = chain.expect("the client's certificate chain is in the request");
        assert_eq!(chain[0], client.der);
        assert_eq!(certificate_identities(&chain[0]), vec![SPIFFE.to_owned()]);
        assert!(remote.is_some(), "the peer address is there too");

        // The silent client's handshake is still waiting for it: had the
        // handshakes run one after the other, the call above would have
        // waited for this one to time out, and it would be closed by now.
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_millis(50), silent.read(&mut byte)).await;
        assert!(
            read.is_err(),
            "the silent connection is still open: {read:?}"
        );
        serving.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_handshake_that_does_not_finish_in_time_is_dropped() {
        let ca = Ca::new();
        let server = ca.server();
        let layout = Layout::new(&server.cert, &server.key, None);
        let (listener, addr) = bind().await;
        let mut incoming = ServerTls::load(&layout.paths).unwrap().incoming(listener);
        let accepting = tokio::spawn(async move { incoming.next().await.map(|r| r.is_ok()) });

        let start = tokio::time::Instant::now();
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 16];
        let n = silent.read(&mut buf).await.unwrap_or(0);
        assert_eq!(n, 0, "the server closed the connection without a word");
        assert!(
            start.elapsed() >= HANDSHAKE_TIMEOUT,
            "closed at the timeout (paused clock), not before: {:?}",
            start.elapsed()
        );
        assert!(!accepting.is_finished(), "nothing was yielded");
        accepting.abort();
    }
}
