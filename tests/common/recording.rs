//! A recording HTTP server for policy tests: an axum server on `127.0.0.1:0`
//! (plain, or TLS with a [`TestCa`] certificate) that answers every request
//! with a handler the test supplies (and may replace while it runs), and
//! records each request's method, the host it asked for (absolute-form
//! target or `Host`), path, query and `Authorization`, and every accepted
//! connection. As an upstream's `proxy` it answers for every host, so "no
//! request reached host X" is observable. It stops when dropped.
//!
//! ```ignore
//! let server = RecordingServer::start(|seen| if seen.path == "/token" { token() } else { reply(404) }).await;
//! // ... drive the service ...
//! assert!(server.seen_for("auth.example.net").is_empty());
//! ```

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use axum::serve::{Listener, ListenerExt as _};

use super::tls::TestCa;

/// One request a fake received.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    /// The authority asked for: the absolute-form target's (proxy requests)
    /// or the `Host` header's, e.g. `auth.example.com` or `127.0.0.1:4000`.
    pub host: String,
    pub path: String,
    pub query: String,
    pub authorization: Option<String>,
}

impl Seen {
    /// The first value of query parameter `name`, decoded.
    pub fn param(&self, name: &str) -> Option<String> {
        url::form_urlencoded::parse(self.query.as_bytes())
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    }
}

type Handler = Arc<dyn Fn(&Seen) -> Response + Send + Sync>;

#[derive(Clone)]
struct FakeState {
    handler: Arc<Mutex<Handler>>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

/// An axum server on `127.0.0.1:0` that answers every request with a
/// scriptable handler and records requests and accepted connections.
pub struct RecordingServer {
    /// The bound address (`127.0.0.1:PORT`).
    pub addr: std::net::SocketAddr,
    scheme: &'static str,
    state: FakeState,
    connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl RecordingServer {
    /// Serves `handler` over plain http.
    pub async fn start(
        handler: impl Fn(&Seen) -> Response + Send + Sync + 'static,
    ) -> RecordingServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a fake");
        Self::serve(listener, "http", handler)
    }

    /// As [`RecordingServer::start`], over TLS with a certificate `ca` signed.
    pub async fn start_tls(
        ca: &TestCa,
        handler: impl Fn(&Seen) -> Response + Send + Sync + 'static,
    ) -> RecordingServer {
        Self::serve(ca.listener().await, "https", handler)
    }

    fn serve<L: Listener<Addr = std::net::SocketAddr>>(
        listener: L,
        scheme: &'static str,
        handler: impl Fn(&Seen) -> Response + Send + Sync + 'static,
    ) -> RecordingServer {
        let state = FakeState {
            handler: Arc::new(Mutex::new(Arc::new(handler))),
            seen: Arc::default(),
        };
        let connections = Arc::new(AtomicUsize::new(0));
        let addr = listener.local_addr().expect("fake address");
        let counter = connections.clone();
        let listener = listener.tap_io(move |_| {
            counter.fetch_add(1, Ordering::SeqCst);
        });
        let app = Router::new().fallback(record).with_state(state.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        RecordingServer {
            addr,
            scheme,
            state,
            connections,
            task,
        }
    }

    /// Replaces the handler.
    pub fn set(&self, handler: impl Fn(&Seen) -> Response + Send + Sync + 'static) {
        *self.state.handler.lock().expect("handler lock") = Arc::new(handler);
    }

    /// `http://127.0.0.1:PORT` (`https` over TLS).
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    /// Every request received so far, in order.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().expect("seen lock").clone()
    }

    /// The requests that asked for `host` (a host name, or `host:port`).
    pub fn seen_for(&self, host: &str) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|s| s.host == host || s.host.split(':').next() == Some(host))
            .collect()
    }

    /// Connections accepted so far (TLS: after the handshake).
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for RecordingServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn record(State(state): State<FakeState>, req: Request) -> Response {
    let uri = req.uri();
    let host = uri
        .authority()
        .map(|a| a.to_string())
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_default();
    let seen = Seen {
        method: req.method().to_string(),
        host,
        path: uri.path().to_string(),
        query: uri.query().unwrap_or_default().to_string(),
        authorization: req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
    };
    state.seen.lock().expect("seen lock").push(seen.clone());
    let handler = state.handler.lock().expect("handler lock").clone();
    handler(&seen)
}

/// An empty answer with this status.
pub fn reply(status: u16) -> Response {
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = StatusCode::from_u16(status).expect("valid status");
    resp
}

/// `resp` with one more header.
pub fn with_header(mut resp: Response, name: header::HeaderName, value: &str) -> Response {
    resp.headers_mut().append(
        name,
        HeaderValue::from_str(value).expect("valid header value"),
    );
    resp
}

/// `401` with one `WWW-Authenticate` line per challenge.
pub fn unauthorized(challenges: &[&str]) -> Response {
    challenges.iter().fold(reply(401), |resp, c| {
        with_header(resp, header::WWW_AUTHENTICATE, c)
    })
}

/// A `307` to `location`.
pub fn redirect(location: &str) -> Response {
    with_header(reply(307), header::LOCATION, location)
}
