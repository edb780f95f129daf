//! A counting reverse proxy between the service and a real registry: an
//! axum server on `127.0.0.1:0` that forwards every request (method, path,
//! query, headers; the service's upstream requests have no body) to the
//! registry, streams the answer back, and records `(method, path)` of each,
//! so a test can tell whether a call reached the upstream. It stops when
//! dropped.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderName, StatusCode};
use axum::response::Response;

struct ProxyShared {
    target: String,
    http: reqwest::Client,
    seen: Mutex<Vec<(String, String)>>,
}

/// Forwards every request (method, path, query, headers; these upstream
/// requests have no body) to a registry and streams the answer back,
/// recording `(method, path)` of each. Stops when dropped.
pub struct CountingProxy {
    /// The bound address (`127.0.0.1:PORT`).
    pub addr: SocketAddr,
    shared: Arc<ProxyShared>,
    task: tokio::task::JoinHandle<()>,
}

impl CountingProxy {
    /// Forwards to the registry at `target` (`http://HOST:PORT`).
    pub async fn start(target: &str) -> CountingProxy {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .build()
            .expect("a plain reqwest client builds");
        let shared = Arc::new(ProxyShared {
            target: target.trim_end_matches('/').to_string(),
            http,
            seen: Mutex::new(Vec::new()),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind an ephemeral port on loopback");
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        let app = Router::new().fallback(forward).with_state(shared.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        CountingProxy { addr, shared, task }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every `(method, path)` forwarded so far.
    pub fn requests(&self) -> Vec<(String, String)> {
        self.shared.seen.lock().expect("proxy log lock").clone()
    }

    /// Requests forwarded so far.
    pub fn total(&self) -> usize {
        self.requests().len()
    }

    /// Requests after the first `n`.
    pub fn since(&self, n: usize) -> Vec<(String, String)> {
        self.requests().into_iter().skip(n).collect()
    }

    /// Requests with this method and path.
    pub fn count(&self, method: &str, path: &str) -> usize {
        self.requests()
            .iter()
            .filter(|(m, p)| m == method && p == path)
            .count()
    }

    /// Requests with this path, any method.
    pub fn count_path(&self, path: &str) -> usize {
        self.requests().iter().filter(|(_, p)| p == path).count()
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Hop-by-hop headers a proxy must not forward.
fn hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "transfer-encoding"
            | "te"
            | "trailer"
            | "upgrade"
            | "host"
    )
}

async fn forward(State(shared): State<Arc<ProxyShared>>, req: Request) -> Response {
    let path = req.uri().path().to_string();
    shared
        .seen
        .lock()
        .expect("proxy log lock")
        .push((req.method().to_string(), path));
    let target = format!(
        "{}{}",
        shared.target,
        req.uri().path_and_query().map_or("/", |p| p.as_str())
    );
    let mut upstream = shared.http.request(req.method().clone(), target);
    for (name, value) in req.headers() {
        if !hop_by_hop(name) {
            upstream = upstream.header(name, value);
        }
    }
    let answer = match upstream.send().await {
        Ok(answer) => answer,
        Err(e) => {
            let mut response = Response::new(Body::from(format!("proxy: {e}")));
            *response.status_mut() = StatusCode::BAD_GATEWAY;
            return response;
        }
    };
    let mut response = Response::builder().status(answer.status());
    for (name, value) in answer.headers() {
        if !hop_by_hop(name) {
            response = response.header(name, value);
        }
    }
    response
        .body(Body::from_stream(answer.bytes_stream()))
        .expect("headers copied from a valid response are valid")
}
