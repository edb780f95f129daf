//! A small programmable fake OCI registry for fault-injection tests: an axum
//! server on `127.0.0.1:0` that answers from a route table the test scripts
//! (status, headers, body, or a sequence of answers per route) and records
//! every request it receives. The same type serves as a token server, a
//! redirect target or a would-be HTTP proxy. It stops when dropped.
//!
//! ```ignore
//! let fake = FakeRegistry::start().await;
//! let digest = fake.put_manifest("team/app", Some("v1"), OCI_MANIFEST, &bytes);
//! fake.on_seq("/v2/team/app/blobs/sha256:...", [Reply::status(503), Reply::ok("...")]);
//! fake.require_authorization("Basic dTpw", Reply::status(401).header("WWW-Authenticate", "Basic realm=\"x\""));
//! // ... drive the service ...
//! assert_eq!(fake.count("/v2/team/app/manifests/v1"), 1);
//! ```

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::content::sha256_digest;
use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use futures::StreamExt as _;

/// One scripted answer.
#[derive(Clone, Debug)]
pub struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: ReplyBody,
}

#[derive(Clone, Debug)]
enum ReplyBody {
    /// Sent with a `Content-Length`.
    Full(Bytes),
    /// Sent as a stream of chunks (chunked encoding, no `Content-Length`).
    Chunks(Vec<Bytes>),
}

impl Reply {
    /// An answer with this status, no headers and an empty body.
    pub fn status(status: u16) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: ReplyBody::Full(Bytes::new()),
        }
    }

    /// `200 OK` with this body.
    pub fn ok(body: impl Into<Bytes>) -> Reply {
        Reply::status(200).body(body)
    }

    /// `200 OK` with a JSON body and `Content-Type: application/json`.
    pub fn json(value: &serde_json::Value) -> Reply {
        Reply::ok(serde_json::to_vec(value).expect("a JSON value always serializes"))
            .header("Content-Type", "application/json")
    }

    /// A `404` with the OCI error envelope `code` (e.g. `MANIFEST_UNKNOWN`).
    pub fn not_found(code: &str) -> Reply {
        let body = serde_json::json!({"errors": [{"code": code, "message": "not found"}]});
        Reply::json(&body).with_status(404)
    }

    /// A `3xx` redirect to `location`.
    pub fn redirect(status: u16, location: &str) -> Reply {
        Reply::status(status).header("Location", location)
    }

    /// Replaces the status.
    pub fn with_status(mut self, status: u16) -> Reply {
        self.status = status;
        self
    }

    /// Adds a header (repeat the call for repeated headers).
    pub fn header(mut self, name: &str, value: &str) -> Reply {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    /// Replaces the body; it is sent with its `Content-Length`.
    pub fn body(mut self, body: impl Into<Bytes>) -> Reply {
        self.body = ReplyBody::Full(body.into());
        self
    }

    /// Replaces the body with these chunks, streamed without `Content-Length`.
    pub fn chunks(mut self, chunks: Vec<Bytes>) -> Reply {
        self.body = ReplyBody::Chunks(chunks);
        self
    }
}

/// A request the fake received.
#[derive(Clone, Debug)]
pub struct Recorded {
    /// `GET`, `HEAD`, ...
    pub method: String,
    /// The request target as received (path and query; absolute for proxy requests).
    pub uri: String,
    /// The path alone.
    pub path: String,
    /// Headers in arrival order, names lowercased.
    pub headers: Vec<(String, String)>,
}

impl Recorded {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers_all(name).into_iter().next()
    }

    /// Every value of header `name` (case-insensitive), in order.
    pub fn headers_all(&self, name: &str) -> Vec<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .filter(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// Every value of query parameter `name`, decoded.
    pub fn query_all(&self, name: &str) -> Vec<String> {
        query_pairs(&self.uri)
            .into_iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v)
            .collect()
    }

    /// The first value of query parameter `name`, decoded.
    pub fn query(&self, name: &str) -> Option<String> {
        self.query_all(name).into_iter().next()
    }
}

/// One entry of the route table.
struct Route {
    /// `None` answers every method.
    method: Option<Method>,
    path: String,
    /// Query parameters that must all be present with these values.
    query: Vec<(String, String)>,
    /// Answers in order; the last one repeats forever.
    replies: VecDeque<Reply>,
}

impl Route {
    fn matches(&self, method: &Method, path: &str, uri: &str) -> bool {
        if self.method.as_ref().is_some_and(|m| m != method) || self.path != path {
            return false;
        }
        let got = query_pairs(uri);
        self.query.iter().all(|want| got.contains(want))
    }

    fn next_reply(&mut self) -> Reply {
        if self.replies.len() > 1 {
            self.replies.pop_front().expect("length checked above")
        } else {
            self.replies
                .front()
                .cloned()
                .expect("routes are created with at least one reply")
        }
    }
}

#[derive(Default)]
struct Shared {
    routes: Mutex<Vec<Route>>,
    requests: Mutex<Vec<Recorded>>,
    /// `(expected Authorization value, answer when it is missing or different)`.
    auth: Mutex<Option<(String, Reply)>>,
    /// Bytes handed to hyper from chunked bodies so far.
    streamed: Arc<AtomicU64>,
}

/// A running fake registry, stopped on drop.
pub struct FakeRegistry {
    /// The bound address (`127.0.0.1:PORT`).
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeRegistry {
    /// Binds `127.0.0.1:0` and starts serving. Unscripted paths answer 404
    /// with an OCI error body, except `/v2/` which answers 200 `{}`.
    pub async fn start() -> FakeRegistry {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind an ephemeral port on loopback");
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        let shared = Arc::new(Shared::default());
        let app = Router::new().fallback(handle).with_state(shared.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let fake = FakeRegistry { addr, shared, task };
        fake.on("/v2/", Reply::json(&serde_json::json!({})));
        fake
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Answers `path` (any method) with `reply`. A path may carry a
    /// `?query`: the route then matches only requests holding those
    /// parameters. The latest matching route wins.
    pub fn on(&self, path: &str, reply: Reply) {
        self.on_seq(path, [reply]);
    }

    /// Answers `path` with `replies` in turn; the last one repeats.
    pub fn on_seq(&self, path: &str, replies: impl IntoIterator<Item = Reply>) {
        self.add_route(None, path, replies);
    }

    /// As [`FakeRegistry::on`], for one method only.
    pub fn on_method(&self, method: Method, path: &str, reply: Reply) {
        self.add_route(Some(method), path, [reply]);
    }

    fn add_route(
        &self,
        method: Option<Method>,
        path: &str,
        replies: impl IntoIterator<Item = Reply>,
    ) {
        let replies: VecDeque<Reply> = replies.into_iter().collect();
        assert!(!replies.is_empty(), "a route needs at least one reply");
        let (path, query) = match path.split_once('?') {
            Some((p, _)) => (p.to_string(), query_pairs(path)),
            None => (path.to_string(), Vec::new()),
        };
        let route = Route {
            method,
            path,
            query,
            replies,
        };
        self.shared.routes.lock().expect("routes lock").push(route);
    }

    /// From now on, every request whose `Authorization` is not exactly
    /// `expected` gets `challenge` instead of its route's answer.
    pub fn require_authorization(&self, expected: &str, challenge: Reply) {
        *self.shared.auth.lock().expect("auth lock") = Some((expected.to_string(), challenge));
    }

    /// Serves `body` as a manifest of `media_type` under its digest and, when
    /// given, under `tag` (with `Content-Type` and `Docker-Content-Digest`).
    /// Returns the digest.
    pub fn put_manifest(
        &self,
        repo: &str,
        tag: Option<&str>,
        media_type: &str,
        body: &[u8],
    ) -> String {
        let digest = sha256_digest(body);
        let reply = Reply::ok(Bytes::copy_from_slice(body))
            .header("Content-Type", media_type)
            .header("Docker-Content-Digest", &digest);
        for reference in tag.into_iter().chain([digest.as_str()]) {
            self.on(&format!("/v2/{repo}/manifests/{reference}"), reply.clone());
        }
        digest
    }

    /// Serves `body` as a blob under its digest. Returns the digest.
    pub fn put_blob(&self, repo: &str, body: &[u8]) -> String {
        let digest = sha256_digest(body);
        let reply = Reply::ok(Bytes::copy_from_slice(body))
            .header("Content-Type", "application/octet-stream")
            .header("Docker-Content-Digest", &digest);
        self.on(&format!("/v2/{repo}/blobs/{digest}"), reply);
        digest
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.requests.lock().expect("requests lock").clone()
    }

    /// Requests received for `path` (query ignored).
    pub fn requests_to(&self, path: &str) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.path == path)
            .collect()
    }

    /// How many requests were received for `path` (query ignored).
    pub fn count(&self, path: &str) -> usize {
        self.requests_to(path).len()
    }

    /// Bytes of chunked ([`Reply::chunks`]) bodies handed to the connection
    /// so far; a client that stops reading stops this from growing.
    pub fn streamed_bytes(&self) -> u64 {
        self.shared.streamed.load(Ordering::SeqCst)
    }
}

impl Drop for FakeRegistry {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    let method = req.method().clone();
    let uri = req.uri().to_string();
    let path = req.uri().path().to_string();
    let headers = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let recorded = Recorded {
        method: method.to_string(),
        uri: uri.clone(),
        path: path.clone(),
        headers,
    };
    shared
        .requests
        .lock()
        .expect("requests lock")
        .push(recorded);

    let challenge =
        shared
            .auth
            .lock()
            .expect("auth lock")
            .as_ref()
            .and_then(|(want, challenge)| {
                let got = req.headers().get("authorization").map(|v| v.as_bytes());
                (got != Some(want.as_bytes())).then(|| challenge.clone())
            });
    let reply = challenge.unwrap_or_else(|| {
        let mut routes = shared.routes.lock().expect("routes lock");
        match routes
            .iter_mut()
            .rev()
            .find(|r| r.matches(&method, &path, &uri))
        {
            Some(route) => route.next_reply(),
            None => Reply::not_found("NAME_UNKNOWN"),
        }
    });
    respond(reply, &shared.streamed)
}

fn respond(reply: Reply, streamed: &Arc<AtomicU64>) -> Response {
    let body = match reply.body {
        ReplyBody::Full(bytes) => Body::from(bytes),
        ReplyBody::Chunks(chunks) => {
            let streamed = streamed.clone();
            Body::from_stream(futures::stream::iter(chunks).map(move |chunk| {
                streamed.fetch_add(chunk.len() as u64, Ordering::SeqCst);
                Ok::<_, std::io::Error>(chunk)
            }))
        }
    };
    let mut response = Response::new(body);
    *response.status_mut() = StatusCode::from_u16(reply.status).expect("scripted status is valid");
    for (name, value) in &reply.headers {
        response.headers_mut().append(
            HeaderName::from_bytes(name.as_bytes()).expect("scripted header name is valid"),
            HeaderValue::from_str(value).expect("scripted header value is valid"),
        );
    }
    response
}

/// Decoded query pairs of a URI or path (empty without a `?`).
fn query_pairs(uri: &str) -> Vec<(String, String)> {
    let query = uri.split_once('?').map_or("", |(_, q)| q);
    url::form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect()
}
