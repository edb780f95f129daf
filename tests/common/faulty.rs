//! A hand-written HTTP/1.1 upstream for the faults axum cannot produce: a
//! tokio TCP server on `127.0.0.1:0` that reads each request itself and
//! answers it as the test scripted, byte by byte. Besides ordinary answers
//! (with `Range: bytes=N-` honoured by `206` and `Content-Range`) it can
//! close or reset a connection as soon as it is accepted, close or reset it
//! after reading the request, hang before the headers, send part of a body
//! and then reset, close (a body shorter than its `Content-Length`) or
//! stall, trickle a body at a fixed pace, delay the headers, and answer a
//! Range request with `200` and the whole body.
//!
//! It counts accepted connections, records every request (method, path,
//! `Range` start, the act applied) and counts connections the client closed
//! while held (by a hang, a stall or a trickle), and bodies sent to the end. Every loop is bounded (by the
//! body, by [`MAX_HOLD`], or by the client going away), and everything
//! stops when the server is dropped.
//!
//! ```ignore
//! let up = FaultyServer::start().await;
//! let digest = up.put_blob("team/app", data);
//! let path = blob_path("team/app", &digest);
//! up.script(&path, [Act::ShortAfter(Cut::Percent(40)), Act::Serve]);
//! // ... fetch through the service ...
//! assert_eq!(up.requests_to(&path)[1].range, Some(40 * len / 100));
//! ```

#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::content::sha256_digest;
use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// Longest a connection is held open by a hang, a stall or a trickle.
pub const MAX_HOLD: Duration = Duration::from_secs(120);
/// Largest request head read.
const MAX_HEAD: usize = 64 * 1024;
/// Most requests served on one connection.
const MAX_REQUESTS_PER_CONNECTION: usize = 100_000;
/// Body bytes written at once.
const WRITE_PIECE: usize = 64 * 1024;
/// Pause between the last bytes sent and an abortive close, so that the bytes
/// reach the client before the reset does (a reset discards unsent data).
const RESET_PAUSE: Duration = Duration::from_millis(200);

/// `/v2/<repo>/blobs/<digest>`.
pub fn blob_path(repo: &str, digest: &str) -> String {
    format!("/v2/{repo}/blobs/{digest}")
}

/// `/v2/<repo>/manifests/<reference>`.
pub fn manifest_path(repo: &str, reference: &str) -> String {
    format!("/v2/{repo}/manifests/{reference}")
}

/// `http://127.0.0.1:PORT` of a port nothing listens on: bound, then
/// released, so connecting to it is refused.
pub fn dead_port_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    let addr = listener
        .local_addr()
        .expect("a bound listener has an address");
    drop(listener);
    format!("http://{addr}")
}

/// Where a partial body stops, within the body of this one answer (for a
/// Range answer, counted from the range's first byte).
#[derive(Clone, Copy, Debug)]
pub enum Cut {
    /// After this many bytes (at most the whole body).
    Bytes(u64),
    /// After this percentage of the body, rounded down.
    Percent(u64),
}

impl Cut {
    fn of(self, len: u64) -> u64 {
        match self {
            Cut::Bytes(n) => n.min(len),
            Cut::Percent(p) => len * p.min(100) / 100,
        }
    }
}

/// What the server does with one request.
#[derive(Clone, Debug)]
pub enum Act {
    /// Answers with the resource: `200`, or `206` with `Content-Range` for
    /// `Range: bytes=N-`; `404` when there is none. Keeps the connection.
    Serve,
    /// `200` with the whole body even when a Range was asked.
    IgnoreRange,
    /// This status with these headers and an empty body.
    Status(u16, Vec<(String, String)>),
    /// Reads the request and closes the connection (FIN) without answering.
    Close,
    /// Reads the request and resets the connection (RST) without answering.
    Reset,
    /// Reads the request and never answers; holds the connection until the
    /// client closes it (or [`MAX_HOLD`]).
    Hang,
    /// Headers and the first bytes of the body, then a reset.
    ResetAfter(Cut),
    /// Headers and the first bytes of the body, then a clean close: a body
    /// shorter than its `Content-Length`.
    ShortAfter(Cut),
    /// Headers and the first bytes of the body, then nothing: the
    /// connection stays open until the client closes it (or [`MAX_HOLD`]).
    StallAfter(Cut),
    /// Headers and the first `fast` bytes of the body at once, then `bytes`
    /// of body every `every` (the first piece after one `every`), to the end
    /// unless the client goes away (or [`MAX_HOLD`] passes).
    Trickle {
        /// The part sent at once.
        fast: Cut,
        /// Bytes per piece.
        bytes: usize,
        /// Pause before each piece.
        every: Duration,
    },
    /// As [`Act::Serve`], after this pause before the headers.
    Delay(Duration),
}

impl Act {
    /// A status with no headers.
    pub fn status(code: u16) -> Act {
        Act::Status(code, Vec::new())
    }

    /// A status with headers.
    pub fn status_with(code: u16, headers: &[(&str, &str)]) -> Act {
        Act::Status(
            code,
            headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    /// A short name, as recorded in [`Seen::act`].
    pub fn name(&self) -> &'static str {
        match self {
            Act::Serve => "serve",
            Act::IgnoreRange => "ignore-range",
            Act::Status(..) => "status",
            Act::Close => "close",
            Act::Reset => "reset",
            Act::Hang => "hang",
            Act::ResetAfter(_) => "reset-after",
            Act::ShortAfter(_) => "short-after",
            Act::StallAfter(_) => "stall-after",
            Act::Trickle { .. } => "trickle",
            Act::Delay(_) => "delay",
        }
    }
}

/// What to do with a freshly accepted connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnAccept {
    /// Read requests and answer them as scripted.
    Serve,
    /// Close it at once (FIN), before reading anything.
    Close,
    /// Reset it at once (RST), before reading anything.
    Reset,
}

/// Content served at a path.
#[derive(Clone, Debug)]
pub struct Resource {
    /// The whole body.
    pub body: Bytes,
    /// Headers sent with it (`Content-Length` is added by the server).
    pub headers: Vec<(String, String)>,
}

impl Resource {
    /// A blob: `application/octet-stream` with its `Docker-Content-Digest`.
    pub fn blob(body: impl Into<Bytes>) -> Resource {
        let body = body.into();
        let digest = sha256_digest(&body);
        Resource {
            body,
            headers: vec![
                ("Content-Type".into(), "application/octet-stream".into()),
                ("Docker-Content-Digest".into(), digest),
            ],
        }
    }

    /// A manifest of `media_type` with its `Docker-Content-Digest`.
    pub fn manifest(media_type: &str, body: impl Into<Bytes>) -> Resource {
        let body = body.into();
        let digest = sha256_digest(&body);
        Resource {
            body,
            headers: vec![
                ("Content-Type".into(), media_type.into()),
                ("Docker-Content-Digest".into(), digest),
            ],
        }
    }
}

/// A request the server received.
#[derive(Clone, Debug)]
pub struct Seen {
    /// `GET`, `HEAD`, ...
    pub method: String,
    /// The path, without query.
    pub path: String,
    /// `N` of a `Range: bytes=N-` header.
    pub range: Option<u64>,
    /// The `Range` header as received.
    pub range_header: Option<String>,
    /// Number of the connection it came on (1 for the first accepted).
    pub connection: usize,
    /// Name of the act applied ([`Act::name`]); empty until chosen.
    pub act: &'static str,
    /// When it arrived, since the server started (for diagnostics).
    pub at: Duration,
}

type Pick = Arc<dyn Fn(&Seen) -> Act + Send + Sync>;
type Resolver = Arc<dyn Fn(&str) -> Option<Resource> + Send + Sync>;

/// A script: acts in turn, the last one repeating; or a function choosing.
#[derive(Clone)]
enum Script {
    Seq(VecDeque<Act>),
    Pick(Pick),
}

impl Script {
    fn next(&mut self, seen: &Seen) -> Act {
        match self {
            Script::Seq(acts) if acts.len() > 1 => acts.pop_front().expect("length checked"),
            Script::Seq(acts) => acts.front().cloned().unwrap_or(Act::Serve),
            Script::Pick(pick) => pick(seen),
        }
    }
}

struct Shared {
    started: Instant,
    on_accept: Mutex<OnAccept>,
    resources: Mutex<HashMap<String, Resource>>,
    resolver: Mutex<Option<Resolver>>,
    scripts: Mutex<HashMap<String, Script>>,
    default_script: Mutex<Script>,
    connections: AtomicUsize,
    requests: Mutex<Vec<Seen>>,
    peer_closed: AtomicUsize,
    bodies_completed: AtomicUsize,
    body_bytes: AtomicU64,
}

impl Shared {
    fn resource(&self, path: &str) -> Option<Resource> {
        if let Some(r) = self.resources.lock().expect("resources lock").get(path) {
            return Some(r.clone());
        }
        let resolver = self.resolver.lock().expect("resolver lock").clone();
        resolver.and_then(|resolve| resolve(path))
    }

    /// Chooses the act for `seen` and records the request.
    fn choose(&self, mut seen: Seen) -> Act {
        let act = {
            let mut scripts = self.scripts.lock().expect("scripts lock");
            match scripts.get_mut(&seen.path) {
                Some(script) => script.next(&seen),
                None => {
                    drop(scripts);
                    self.default_script
                        .lock()
                        .expect("default script lock")
                        .next(&seen)
                }
            }
        };
        seen.act = act.name();
        self.requests.lock().expect("requests lock").push(seen);
        act
    }
}

/// A running fault-injecting upstream, stopped (with every connection) on drop.
pub struct FaultyServer {
    /// The bound address (`127.0.0.1:PORT`).
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultyServer {
    /// Binds `127.0.0.1:0` and starts answering: every path [`Act::Serve`]
    /// until scripted; `/v2/` answers `200 {}`; paths without a resource 404.
    pub async fn start() -> FaultyServer {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind an ephemeral port on loopback");
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        let shared = Arc::new(Shared {
            started: Instant::now(),
            on_accept: Mutex::new(OnAccept::Serve),
            resources: Mutex::default(),
            resolver: Mutex::default(),
            scripts: Mutex::default(),
            default_script: Mutex::new(Script::Seq(VecDeque::from([Act::Serve]))),
            connections: AtomicUsize::new(0),
            requests: Mutex::default(),
            peer_closed: AtomicUsize::new(0),
            bodies_completed: AtomicUsize::new(0),
            body_bytes: AtomicU64::new(0),
        });
        let task = tokio::spawn(accept_loop(listener, shared.clone()));
        FaultyServer { addr, shared, task }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// What to do with connections accepted from now on.
    pub fn on_accept(&self, mode: OnAccept) {
        *self.shared.on_accept.lock().expect("on_accept lock") = mode;
    }

    /// Serves `resource` at `path`.
    pub fn put(&self, path: &str, resource: Resource) {
        self.shared
            .resources
            .lock()
            .expect("resources lock")
            .insert(path.to_string(), resource);
    }

    /// Serves `data` as a blob of `repo`; returns its digest.
    pub fn put_blob(&self, repo: &str, data: impl Into<Bytes>) -> String {
        let resource = Resource::blob(data);
        let digest = sha256_digest(&resource.body);
        self.put(&blob_path(repo, &digest), resource);
        digest
    }

    /// Serves `body` as a manifest of `repo` under its digest and, when
    /// given, under `tag`; returns its digest.
    pub fn put_manifest(
        &self,
        repo: &str,
        tag: Option<&str>,
        media_type: &str,
        body: impl Into<Bytes>,
    ) -> String {
        let resource = Resource::manifest(media_type, body);
        let digest = sha256_digest(&resource.body);
        for reference in tag.into_iter().chain([digest.as_str()]) {
            self.put(&manifest_path(repo, reference), resource.clone());
        }
        digest
    }

    /// Resources for paths not [`put`](Self::put): `resolve(path)`.
    pub fn resolve_with(&self, resolve: impl Fn(&str) -> Option<Resource> + Send + Sync + 'static) {
        *self.shared.resolver.lock().expect("resolver lock") = Some(Arc::new(resolve));
    }

    /// Requests for `path` get `acts` in turn; the last one repeats.
    pub fn script(&self, path: &str, acts: impl IntoIterator<Item = Act>) {
        let acts: VecDeque<Act> = acts.into_iter().collect();
        assert!(!acts.is_empty(), "a script needs at least one act");
        self.shared
            .scripts
            .lock()
            .expect("scripts lock")
            .insert(path.to_string(), Script::Seq(acts));
    }

    /// Requests for paths without their own script get `acts` in turn; the
    /// last one repeats.
    pub fn script_all(&self, acts: impl IntoIterator<Item = Act>) {
        let acts: VecDeque<Act> = acts.into_iter().collect();
        assert!(!acts.is_empty(), "a script needs at least one act");
        *self
            .shared
            .default_script
            .lock()
            .expect("default script lock") = Script::Seq(acts);
    }

    /// Requests for paths without their own script get `pick(request)`.
    pub fn pick_all(&self, pick: impl Fn(&Seen) -> Act + Send + Sync + 'static) {
        *self
            .shared
            .default_script
            .lock()
            .expect("default script lock") = Script::Pick(Arc::new(pick));
    }

    /// Connections accepted so far (whatever [`OnAccept`] did with them).
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<Seen> {
        self.shared.requests.lock().expect("requests lock").clone()
    }

    /// Number of requests received so far.
    pub fn request_count(&self) -> usize {
        self.shared.requests.lock().expect("requests lock").len()
    }

    /// Requests received for `path`.
    pub fn requests_to(&self, path: &str) -> Vec<Seen> {
        self.shared
            .requests
            .lock()
            .expect("requests lock")
            .iter()
            .filter(|r| r.path == path)
            .cloned()
            .collect()
    }

    /// How many requests were received for `path`.
    pub fn count(&self, path: &str) -> usize {
        self.requests_to(path).len()
    }

    /// How often each act was applied.
    pub fn act_counts(&self) -> HashMap<&'static str, usize> {
        let mut counts = HashMap::new();
        for seen in self.shared.requests.lock().expect("requests lock").iter() {
            *counts.entry(seen.act).or_insert(0) += 1;
        }
        counts
    }

    /// Held connections (hang, stall) that the client closed.
    pub fn peer_closed(&self) -> usize {
        self.shared.peer_closed.load(Ordering::SeqCst)
    }

    /// Bodies (of 200/206 answers to GET) written to the end.
    pub fn bodies_completed(&self) -> usize {
        self.shared.bodies_completed.load(Ordering::SeqCst)
    }

    /// Body bytes written so far, over all answers.
    pub fn body_bytes(&self) -> u64 {
        self.shared.body_bytes.load(Ordering::SeqCst)
    }
}

impl Drop for FaultyServer {
    fn drop(&mut self) {
        // Dropping the accept task drops its JoinSet, which aborts every
        // connection task.
        self.task.abort();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(_) => {
                        // Out of descriptors or similar: back off, do not spin.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let number = shared.connections.fetch_add(1, Ordering::SeqCst) + 1;
                let mode = *shared.on_accept.lock().expect("on_accept lock");
                match mode {
                    OnAccept::Serve => {
                        connections.spawn(serve_connection(stream, shared.clone(), number));
                    }
                    OnAccept::Close => drop(stream),
                    OnAccept::Reset => {
                        let _ = stream.set_zero_linger();
                        drop(stream);
                    }
                }
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// A parsed request head.
struct Head {
    method: String,
    path: String,
    range_header: Option<String>,
}

/// Reads one request head (up to the blank line) from `stream`, keeping
/// what follows in `buf`. `None` when the client closed or sent garbage.
async fn read_head(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Head> {
    let mut chunk = [0u8; 8192];
    let end = loop {
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos + 4;
        }
        if buf.len() > MAX_HEAD {
            return None;
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let raw: Vec<u8> = buf.drain(..end).collect();
    let text = String::from_utf8_lossy(&raw);
    let mut lines = text.split("\r\n");
    let mut request_line = lines.next()?.split(' ');
    let method = request_line.next()?.to_string();
    let target = request_line.next()?;
    let path = target.split('?').next().unwrap_or(target).to_string();
    let range_header = lines.find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("range")
            .then(|| value.trim().to_string())
    });
    Some(Head {
        method,
        path,
        range_header,
    })
}

/// `N` of `bytes=N-` (or `bytes=N-M`, whose end is ignored).
fn range_start(header: &str) -> Option<u64> {
    let spec = header.trim().strip_prefix("bytes=")?;
    let (first, _) = spec.split_once('-')?;
    first.trim().parse().ok()
}

async fn serve_connection(mut stream: TcpStream, shared: Arc<Shared>, number: usize) {
    let _ = stream.set_nodelay(true);
    let mut buf = Vec::new();
    for _ in 0..MAX_REQUESTS_PER_CONNECTION {
        let Some(head) = read_head(&mut stream, &mut buf).await else {
            return;
        };
        let seen = Seen {
            method: head.method.clone(),
            path: head.path.clone(),
            range: head.range_header.as_deref().and_then(range_start),
            range_header: head.range_header.clone(),
            connection: number,
            act: "",
            at: shared.started.elapsed(),
        };
        let range = seen.range;
        let act = shared.choose(seen);
        let keep = answer(&mut stream, &shared, &head, range, act).await;
        if !keep {
            return;
        }
    }
}

/// The answer [`Act::Serve`] gives: status, headers, body.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Bytes,
    /// A 200/206 with the resource's bytes (body acts apply to it).
    content: bool,
}

fn plain_answer(shared: &Shared, head: &Head, range: Option<u64>, honour_range: bool) -> Answer {
    if head.path == "/v2/" || head.path == "/v2" {
        return Answer {
            status: 200,
            headers: vec![("Content-Type".into(), "application/json".into())],
            body: Bytes::from_static(b"{}"),
            content: false,
        };
    }
    let Some(resource) = shared.resource(&head.path) else {
        let code = if head.path.contains("/blobs/") {
            "BLOB_UNKNOWN"
        } else if head.path.contains("/manifests/") {
            "MANIFEST_UNKNOWN"
        } else {
            "NAME_UNKNOWN"
        };
        let body = format!(r#"{{"errors":[{{"code":"{code}","message":"not found"}}]}}"#);
        return Answer {
            status: 404,
            headers: vec![("Content-Type".into(), "application/json".into())],
            body: Bytes::from(body),
            content: false,
        };
    };
    let size = resource.body.len() as u64;
    match range.filter(|_| honour_range) {
        Some(start) if start >= size && size > 0 => Answer {
            status: 416,
            headers: vec![("Content-Range".into(), format!("bytes */{size}"))],
            body: Bytes::new(),
            content: false,
        },
        Some(start) if size > 0 => {
            let mut headers = resource.headers.clone();
            headers.push((
                "Content-Range".into(),
                format!("bytes {start}-{}/{size}", size - 1),
            ));
            Answer {
                status: 206,
                headers,
                body: resource.body.slice(start as usize..),
                content: true,
            }
        }
        _ => Answer {
            status: 200,
            headers: resource.headers.clone(),
            body: resource.body.clone(),
            content: true,
        },
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        416 => "Range Not Satisfiable",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Whatever",
    }
}

fn head_bytes(status: u16, headers: &[(String, String)], length: u64, close: bool) -> Vec<u8> {
    let mut text = format!("HTTP/1.1 {status} {}\r\n", reason(status));
    for (name, value) in headers {
        text.push_str(&format!("{name}: {value}\r\n"));
    }
    text.push_str(&format!("Content-Length: {length}\r\n"));
    if close {
        text.push_str("Connection: close\r\n");
    }
    text.push_str("\r\n");
    text.into_bytes()
}

/// Writes `body` in pieces, counting bytes; false when the client left.
async fn write_body(stream: &mut TcpStream, shared: &Shared, body: &[u8]) -> bool {
    for piece in body.chunks(WRITE_PIECE) {
        if stream.write_all(piece).await.is_err() {
            return false;
        }
        shared
            .body_bytes
            .fetch_add(piece.len() as u64, Ordering::SeqCst);
    }
    stream.flush().await.is_ok()
}

/// Holds the connection until the client closes it (counted) or
/// [`MAX_HOLD`] passes; whatever the client sends is discarded.
async fn hold(stream: &mut TcpStream, shared: &Shared) {
    let mut sink = [0u8; 4096];
    let closed = tokio::time::timeout(MAX_HOLD, async {
        loop {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    if closed.is_ok() {
        shared.peer_closed.fetch_add(1, Ordering::SeqCst);
    }
}

/// Answers one request as `act` says; true to keep the connection for the
/// next request.
async fn answer(
    stream: &mut TcpStream,
    shared: &Shared,
    head: &Head,
    range: Option<u64>,
    act: Act,
) -> bool {
    let is_head = head.method.eq_ignore_ascii_case("HEAD");
    // Body faults mean nothing to a HEAD: it gets a plain answer.
    let act = match act {
        Act::IgnoreRange
        | Act::ResetAfter(_)
        | Act::ShortAfter(_)
        | Act::StallAfter(_)
        | Act::Trickle { .. }
            if is_head =>
        {
            Act::Serve
        }
        act => act,
    };
    match act {
        Act::Close => {
            let _ = stream.shutdown().await;
            false
        }
        Act::Reset => {
            let _ = stream.set_zero_linger();
            false
        }
        Act::Hang => {
            hold(stream, shared).await;
            false
        }
        Act::Status(status, headers) => {
            let bytes = head_bytes(status, &headers, 0, false);
            stream.write_all(&bytes).await.is_ok()
        }
        Act::Delay(pause) => {
            tokio::time::sleep(pause).await;
            serve_plain(stream, shared, head, range, true, is_head).await
        }
        Act::Serve => serve_plain(stream, shared, head, range, true, is_head).await,
        Act::IgnoreRange => serve_plain(stream, shared, head, range, false, is_head).await,
        Act::ResetAfter(cut) | Act::ShortAfter(cut) | Act::StallAfter(cut) => {
            let plain = plain_answer(shared, head, range, true);
            if !plain.content {
                return serve_plain(stream, shared, head, range, true, is_head).await;
            }
            let len = plain.body.len() as u64;
            let bytes = head_bytes(plain.status, &plain.headers, len, true);
            if stream.write_all(&bytes).await.is_err() {
                return false;
            }
            let part = cut.of(len) as usize;
            if !write_body(stream, shared, &plain.body[..part]).await {
                return false;
            }
            match act {
                Act::ResetAfter(_) => {
                    tokio::time::sleep(RESET_PAUSE).await;
                    let _ = stream.set_zero_linger();
                }
                Act::ShortAfter(_) => {
                    let _ = stream.shutdown().await;
                }
                _ => hold(stream, shared).await,
            }
            false
        }
        Act::Trickle { fast, bytes, every } => {
            let plain = plain_answer(shared, head, range, true);
            if !plain.content {
                return serve_plain(stream, shared, head, range, true, is_head).await;
            }
            let len = plain.body.len() as u64;
            let head = head_bytes(plain.status, &plain.headers, len, false);
            if stream.write_all(&head).await.is_err() {
                return false;
            }
            let fast = fast.of(len) as usize;
            if !write_body(stream, shared, &plain.body[..fast]).await {
                return false;
            }
            let started = Instant::now();
            for piece in plain.body[fast..].chunks(bytes.max(1)) {
                if started.elapsed() > MAX_HOLD {
                    return false;
                }
                tokio::time::sleep(every).await;
                if !write_body(stream, shared, piece).await {
                    // The client went away during the trickle.
                    shared.peer_closed.fetch_add(1, Ordering::SeqCst);
                    return false;
                }
            }
            shared.bodies_completed.fetch_add(1, Ordering::SeqCst);
            true
        }
    }
}

async fn serve_plain(
    stream: &mut TcpStream,
    shared: &Shared,
    head: &Head,
    range: Option<u64>,
    honour_range: bool,
    is_head: bool,
) -> bool {
    let plain = plain_answer(shared, head, range, honour_range);
    let bytes = head_bytes(plain.status, &plain.headers, plain.body.len() as u64, false);
    if stream.write_all(&bytes).await.is_err() {
        return false;
    }
    if is_head {
        return true;
    }
    if !write_body(stream, shared, &plain.body).await {
        return false;
    }
    if plain.content {
        shared.bodies_completed.fetch_add(1, Ordering::SeqCst);
    }
    true
}
