//! A slow upstream for cache tests: an HTTP server on `127.0.0.1:0` that
//! holds one blob and serves it at a bounded pace (`chunk` bytes, then a
//! pause), so a download of it lasts long enough for callers to join it or
//! for the service to be killed in the middle. It records every request and
//! counts the blob bytes it has handed to the connection, and how many GETs
//! of the blob it served to the end, so a test can tell "the upstream has
//! not finished sending" by ordering rather than by the clock. It stops when
//! dropped.
//!
//! It runs on a thread of its own (with its own single-threaded runtime), so
//! its pace holds however busy the test's runtime is.
//!
//! ```ignore
//! let slow = SlowBlobServer::start("team/big", data, 64 * 1024, Duration::from_millis(4));
//! // ... point the service at slow.url(), fetch slow.digest() ...
//! assert_eq!(slow.blob_gets(), 1);
//! assert_eq!(slow.completed_gets(), 0, "still sending");
//! ```

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::response::Response;
use bytes::Bytes;

use super::content::sha256_digest;

struct Shared {
    /// `/v2/<repo>/blobs/<digest>`.
    blob_path: String,
    digest: String,
    data: Bytes,
    chunk: usize,
    /// Pause before each chunk, in microseconds (changeable while running).
    delay_us: AtomicU64,
    /// Blob bytes handed to connections so far, over all GETs.
    sent: AtomicU64,
    /// GETs of the blob whose last byte was handed to the connection.
    completed: AtomicU64,
    /// `(method, path)` of every request, in arrival order.
    requests: Mutex<Vec<(String, String)>>,
}

/// A running slow blob server, stopped on drop.
pub struct SlowBlobServer {
    /// The bound address (`127.0.0.1:PORT`).
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SlowBlobServer {
    /// Serves `data` as blob `sha256(data)` of `repo`: `GET` sends it with its
    /// `Content-Length`, `chunk` bytes at a time with `delay` before each
    /// chunk; `HEAD` answers its size at once; `/v2/` answers 200; anything
    /// else is a 404 with the OCI error envelope.
    pub fn start(repo: &str, data: Bytes, chunk: usize, delay: Duration) -> SlowBlobServer {
        assert!(chunk > 0, "a chunk holds at least one byte");
        let digest = sha256_digest(&data);
        let shared = Arc::new(Shared {
            blob_path: format!("/v2/{repo}/blobs/{digest}"),
            digest,
            data,
            chunk,
            delay_us: AtomicU64::new(delay_micros(delay)),
            sent: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            requests: Mutex::new(Vec::new()),
        });
        let listener =
            std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port on loopback");
        listener
            .set_nonblocking(true)
            .expect("a listener can be made non-blocking");
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        let app = Router::new().fallback(handle).with_state(shared.clone());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a single-threaded runtime builds");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener)
                    .expect("a non-blocking std listener converts");
                tokio::select! {
                    _ = axum::serve(listener, app) => {}
                    _ = stopped => {}
                }
            });
            // Dropping the runtime ends the connections still being served.
        });
        SlowBlobServer {
            addr,
            shared,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The blob's digest (`sha256:...`).
    pub fn digest(&self) -> String {
        self.shared.digest.clone()
    }

    /// The blob's size in bytes.
    pub fn size(&self) -> u64 {
        self.shared.data.len() as u64
    }

    /// Changes the pause before each chunk, for bodies sent from now on
    /// (including the rest of those being sent).
    pub fn set_delay(&self, delay: Duration) {
        self.shared
            .delay_us
            .store(delay_micros(delay), Ordering::SeqCst);
    }

    /// How many `GET`s of the blob were received.
    pub fn blob_gets(&self) -> usize {
        self.count("GET", &self.shared.blob_path)
    }

    /// How many requests with this method and path were received.
    pub fn count(&self, method: &str, path: &str) -> usize {
        self.requests()
            .iter()
            .filter(|(m, p)| m == method && p == path)
            .count()
    }

    /// `(method, path)` of every request so far.
    pub fn requests(&self) -> Vec<(String, String)> {
        self.shared.requests.lock().expect("requests lock").clone()
    }

    /// Blob bytes handed to connections so far (all GETs together).
    pub fn sent_bytes(&self) -> u64 {
        self.shared.sent.load(Ordering::SeqCst)
    }

    /// How many GETs of the blob had their last byte handed to the
    /// connection. Zero while the first download is still being sent.
    pub fn completed_gets(&self) -> u64 {
        self.shared.completed.load(Ordering::SeqCst)
    }
}

impl Drop for SlowBlobServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn delay_micros(delay: Duration) -> u64 {
    u64::try_from(delay.as_micros()).unwrap_or(u64::MAX)
}

async fn handle(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    shared
        .requests
        .lock()
        .expect("requests lock")
        .push((method.to_string(), path.clone()));
    if path == "/v2/" {
        return builder(StatusCode::OK)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from("{}"))
            .expect("a static response is valid");
    }
    if path != shared.blob_path || (method != Method::GET && method != Method::HEAD) {
        let body = r#"{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown"}]}"#;
        return builder(StatusCode::NOT_FOUND)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body))
            .expect("a static response is valid");
    }
    let ok = builder(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, shared.data.len())
        .header("Docker-Content-Digest", &shared.digest);
    let body = if method == Method::HEAD {
        Body::empty()
    } else {
        Body::from_stream(paced(shared.clone()))
    };
    ok.body(body).expect("blob response is valid")
}

/// A response with `status` and the registry's API version header.
fn builder(status: StatusCode) -> axum::http::response::Builder {
    Response::builder()
        .status(status)
        .header("Docker-Distribution-API-Version", "registry/2.0")
}

/// The blob as a stream of chunks, each after the current delay. Progress is
/// counted when a chunk is handed over; the GET counts as completed when the
/// last one is.
fn paced(
    shared: Arc<Shared>,
) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    futures::stream::unfold(0usize, move |offset| {
        let shared = shared.clone();
        async move {
            let total = shared.data.len();
            if offset >= total {
                return None;
            }
            let delay = shared.delay_us.load(Ordering::SeqCst);
            if delay > 0 {
                tokio::time::sleep(Duration::from_micros(delay)).await;
            }
            let end = (offset + shared.chunk).min(total);
            let chunk = shared.data.slice(offset..end);
            shared
                .sent
                .fetch_add((end - offset) as u64, Ordering::SeqCst);
            if end == total {
                shared.completed.fetch_add(1, Ordering::SeqCst);
            }
            Some((Ok(chunk), end))
        }
    })
}
