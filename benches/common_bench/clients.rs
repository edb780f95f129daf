//! The client side of the benchmark: HTTP GETs of blobs and manifests from a
//! registry (reqwest, HTTP/1.1 as registries serve it), FetchBlob over tonic
//! with one set of channel settings shared by the baseline and the service,
//! a closed-loop load generator that records per-request latency, and
//! readers of a process's resident set.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use oci_upstream::pb::FetchBlobRequest;
use oci_upstream::pb::upstream_service_client::UpstreamServiceClient;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use tonic::transport::{Channel, Endpoint};

/// Every manifest type Distribution 2.8 needs to be told it may answer with
/// (it 404s an OCI manifest unless asked for it).
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
     application/vnd.oci.image.index.v1+json, \
     application/vnd.docker.distribution.manifest.v2+json, \
     application/vnd.docker.distribution.manifest.list.v2+json";

/// The tonic client settings used for every gRPC connection of the run (the
/// bare baseline and the service alike). Unset means tonic's default.
#[derive(Clone, Debug, Default)]
pub struct H2Settings {
    /// `BENCH_H2_STREAM_WINDOW`: initial HTTP/2 stream window, bytes.
    pub stream_window: Option<u32>,
    /// `BENCH_H2_CONN_WINDOW`: initial HTTP/2 connection window, bytes.
    pub conn_window: Option<u32>,
    /// `BENCH_H2_ADAPTIVE=1`: BDP-based adaptive windows.
    pub adaptive: bool,
}

impl H2Settings {
    /// From the environment.
    pub fn from_env() -> H2Settings {
        let num = |key: &str| {
            std::env::var(key).ok().map(|v| {
                v.parse::<u32>()
                    .unwrap_or_else(|_| panic!("{key}={v} is not a byte count"))
            })
        };
        H2Settings {
            stream_window: num("BENCH_H2_STREAM_WINDOW"),
            conn_window: num("BENCH_H2_CONN_WINDOW"),
            adaptive: std::env::var("BENCH_H2_ADAPTIVE").is_ok_and(|v| v == "1"),
        }
    }

    /// As text for the report.
    pub fn describe(&self) -> String {
        let window = |w: Option<u32>| w.map_or("default".to_string(), |w| w.to_string());
        format!(
            "stream window {}, connection window {}, adaptive window {}",
            window(self.stream_window),
            window(self.conn_window),
            if self.adaptive { "on" } else { "off" }
        )
    }

    /// As JSON for the report.
    pub fn to_json(&self) -> Value {
        json!({
            "stream_window": self.stream_window,
            "connection_window": self.conn_window,
            "adaptive_window": self.adaptive,
        })
    }
}

/// A connected channel to `addr` with `settings`.
pub async fn channel(addr: SocketAddr, settings: &H2Settings) -> Channel {
    let mut endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .expect("a valid endpoint")
        .tcp_nodelay(true);
    if let Some(w) = settings.stream_window {
        endpoint = endpoint.initial_stream_window_size(w);
    }
    if let Some(w) = settings.conn_window {
        endpoint = endpoint.initial_connection_window_size(w);
    }
    if settings.adaptive {
        endpoint = endpoint.http2_adaptive_window(true);
    }
    endpoint.connect().await.expect("connect a gRPC channel")
}

/// `n` separately connected clients (one connection each, as `n` callers in
/// different processes would have).
pub async fn clients(
    addr: SocketAddr,
    settings: &H2Settings,
    n: usize,
) -> Vec<UpstreamServiceClient<Channel>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(UpstreamServiceClient::new(channel(addr, settings).await));
    }
    out
}

/// A plain HTTP client (environment proxies ignored).
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("a reqwest client builds")
}

/// What a blob pull delivered.
#[derive(Debug)]
pub struct Pulled {
    /// Bytes received.
    pub bytes: u64,
    /// `sha256:` of the bytes, when hashing was asked for.
    pub digest: Option<String>,
    /// `Source.cache_hit` of a FetchBlob.
    pub cache_hit: Option<bool>,
}

/// GETs a blob, streaming and discarding it (hashing when `hash`).
pub async fn http_get_blob(http: &reqwest::Client, url: &str, hash: bool) -> Pulled {
    let mut response = http.get(url).send().await.expect("GET a blob");
    assert!(
        response.status().is_success(),
        "GET {url}: {}",
        response.status()
    );
    let mut hasher = hash.then(Sha256::new);
    let mut bytes = 0u64;
    while let Some(chunk) = response.chunk().await.expect("read a blob body") {
        bytes += chunk.len() as u64;
        if let Some(h) = hasher.as_mut() {
            h.update(&chunk);
        }
    }
    Pulled {
        bytes,
        digest: hasher.map(|h| format!("sha256:{}", hex::encode(h.finalize()))),
        cache_hit: None,
    }
}

/// FetchBlob of a whole blob, streaming and discarding it (hashing when
/// `hash`).
pub async fn grpc_fetch_blob(
    client: &mut UpstreamServiceClient<Channel>,
    repository: &str,
    digest: &str,
    hash: bool,
) -> Pulled {
    let mut stream = client
        .fetch_blob(FetchBlobRequest {
            repository: repository.into(),
            digest: digest.into(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|s| panic!("FetchBlob {digest}: {s}"))
        .into_inner();
    let mut hasher = hash.then(Sha256::new);
    let mut bytes = 0u64;
    let mut cache_hit = None;
    while let Some(msg) = stream
        .message()
        .await
        .unwrap_or_else(|s| panic!("FetchBlob {digest} stream: {s}"))
    {
        if let Some(info) = &msg.info {
            cache_hit = info.source.as_ref().map(|s| s.cache_hit);
        }
        bytes += msg.data.len() as u64;
        if let Some(h) = hasher.as_mut() {
            h.update(&msg.data);
        }
    }
    Pulled {
        bytes,
        digest: hasher.map(|h| format!("sha256:{}", hex::encode(h.finalize()))),
        cache_hit,
    }
}

/// Bounds a step so a hung peer fails the benchmark instead of stalling it.
pub async fn bounded<T>(what: &str, limit: Duration, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, fut)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {limit:?}"))
}

/// Result of a closed-loop load run.
#[derive(Debug)]
pub struct Load {
    /// Requests completed.
    pub requests: u64,
    /// From start until the last request finished.
    pub elapsed: Duration,
    /// Latencies in ms, sorted.
    pub latencies_ms: Vec<f64>,
}

impl Load {
    /// Requests per second.
    pub fn rate(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }
}

/// Runs `callers` loops, each issuing `request(i)` (i counts requests across
/// all callers) back to back until `duration` has passed; every request's
/// latency is recorded.
pub async fn closed_loop<F, Fut>(callers: usize, duration: Duration, request: Arc<F>) -> Load
where
    F: Fn(u64) -> Fut + Send + Sync + ?Sized + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let counter = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::with_capacity(callers);
    for _ in 0..callers {
        let (request, counter) = (request.clone(), counter.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while Instant::now() < deadline {
                let i = counter.fetch_add(1, Ordering::Relaxed);
                let t = Instant::now();
                request(i).await;
                latencies.push(t.elapsed().as_secs_f64() * 1e3);
            }
            latencies
        }));
    }
    let mut latencies_ms = Vec::new();
    for task in tasks {
        latencies_ms.extend(task.await.expect("a load caller"));
    }
    let elapsed = started.elapsed();
    latencies_ms.sort_by(f64::total_cmp);
    Load {
        requests: latencies_ms.len() as u64,
        elapsed,
        latencies_ms,
    }
}

/// Current resident set (VmRSS) of `pid`, KiB.
pub fn rss_kib(pid: u32) -> u64 {
    crate::common::service::proc_status_kib(pid, "VmRSS:")
}

/// Peak resident set (VmHWM) of `pid`, KiB.
pub fn peak_rss_kib(pid: u32) -> u64 {
    crate::common::service::proc_status_kib(pid, "VmHWM:")
}

/// CPU time (user + system) `pid` has used so far, in seconds, from
/// `/proc/PID/stat` (clock ticks of 10 ms).
pub fn cpu_seconds(pid: u32) -> f64 {
    stat_seconds(pid, 14, 15)
}

/// CPU time (user + system) of the children `pid` has waited for, in
/// seconds (`cutime` and `cstime` of `/proc/PID/stat`): the cost of a
/// short-lived child such as `skopeo` is the change across its run, when
/// no other child is reaped meanwhile.
#[allow(dead_code, reason = "the mirror benchmark's; e2e has no such child")]
pub fn waited_children_cpu_seconds(pid: u32) -> f64 {
    stat_seconds(pid, 16, 17)
}

/// Fields `user` and `system` (1-based, as in proc(5)) of `/proc/PID/stat`,
/// clock ticks of 10 ms, summed in seconds.
fn stat_seconds(pid: u32, user: usize, system: usize) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/stat: {e}"));
    // Fields after the command name (which is in parentheses and may hold
    // spaces): state is field 3.
    let rest = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> f64 {
        fields
            .get(i - 3)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("/proc/{pid}/stat has no field {i}: {stat}")) as f64
    };
    (ticks(user) + ticks(system)) / 100.0
}

/// Resets the peak resident set of `pid` to its current RSS (writing `5` to
/// `/proc/PID/clear_refs`), so VmHWM afterwards is the peak of what follows.
pub fn reset_peak_rss(pid: u32) {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5")
        .unwrap_or_else(|e| panic!("reset the peak RSS of process {pid}: {e}"));
}

/// Samples a process's VmRSS every few milliseconds on a thread, keeping the
/// largest value seen.
pub struct RssSampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl RssSampler {
    /// Starts sampling `pid`.
    pub fn start(pid: u32) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut max = 0;
                while !stop.load(Ordering::Relaxed) {
                    max = max.max(rss_kib(pid));
                    std::thread::sleep(Duration::from_millis(5));
                }
                max.max(rss_kib(pid))
            })
        };
        RssSampler { stop, thread }
    }

    /// Stops; the largest VmRSS seen, KiB.
    pub fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("the RSS sampler")
    }
}
