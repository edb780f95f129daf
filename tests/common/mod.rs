//! The test-support layer shared by the integration tests (`tests/it`) and
//! the benchmarks (`benches/`, which include it with `#[path]`). Everything
//! it starts listens on 127.0.0.1 on an ephemeral port and stops when its
//! handle is dropped.
//!
//! - [`service`]: the service under test, in process ([`InProcess`]) or as
//!   the real binary ([`Spawned`]).
//! - [`config`]: the one builder of service configs.
//! - [`content`]: media types, an independent sha256, deterministic bytes,
//!   manifest and index builders.
//! - [`rpc`]: request builders and bounded calls, the one FetchBlob reader,
//!   the one bound ([`rpc::RPC_BOUND`]).
//! - Peers: [`distribution`] (a real CNCF Distribution registry: anonymous,
//!   htpasswd or token auth; for the benchmarks, one over a given storage
//!   root, plain or in proxy mode, with its pid and access log counts), [`token_issuer`] (a Docker token issuer),
//!   [`fake`] (a scripted axum registry), [`recording`] (a handler-driven
//!   axum server that records hosts and connections, over http or TLS),
//!   [`faulty`] (a hand-written HTTP/1.1 server for faults axum cannot
//!   produce), [`slow`] (one blob served at a bounded pace on its own thread),
//!   [`counting_proxy`] (a reverse proxy that counts what passes), [`tls`]
//!   (a throw-away CA for the TLS fakes), [`otlp`] (an OTLP trace collector
//!   that records the spans it receives), [`s3`] (a real S3-compatible
//!   server, moto, for the shared cache tier), [`skopeo`] (real skopeo
//!   copying images into OCI layouts), [`containerd`] (a throw-away
//!   containerd daemon and `ctr`).
//! - Here: [`eventually`], [`require_binary`], [`free_port`],
//!   [`capture_output`]; for the benchmarks [`bench_quick`], [`median`],
//!   [`num`].

#![allow(dead_code)]

pub mod config;
pub mod containerd;
pub mod content;
pub mod counting_proxy;
pub mod distribution;
pub mod fake;
pub mod faulty;
pub mod grpcurl;
pub mod metrics;
pub mod otlp;
pub mod recording;
pub mod rpc;
pub mod s3;
pub mod service;
pub mod skopeo;
pub mod slow;
pub mod tls;
pub mod token_issuer;

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[allow(unused_imports, reason = "the benchmarks spawn the binary only")]
pub use service::{InProcess, Spawned};

/// How long [`eventually`] polls.
pub const POLL_BOUND: Duration = Duration::from_secs(20);
/// Pause between two polls.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Polls `check` every 20 ms until it holds; false if it still does not
/// after [`POLL_BOUND`]. For what the service finishes in the background
/// (a store write, a refresh, a closed connection).
pub async fn eventually(check: impl FnMut() -> bool) -> bool {
    eventually_within(POLL_BOUND, check).await
}

/// As [`eventually`], giving up after `limit`.
pub async fn eventually_within(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let until = tokio::time::Instant::now() + limit;
    while !check() {
        if tokio::time::Instant::now() >= until {
            return false;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
    true
}

/// As [`eventually`], for a check that is itself asynchronous (an RPC).
pub async fn eventually_async<F, Fut>(mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let until = tokio::time::Instant::now() + POLL_BOUND;
    while !check().await {
        if tokio::time::Instant::now() >= until {
            return false;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
    true
}

/// Finds `name` on PATH (or at one of `extra` paths), or panics with `install`
/// as the way to get it: a missing peer fails the test, it never skips it.
pub fn require_binary(name: &str, extra: &[&str], install: &str) -> PathBuf {
    for p in extra {
        let p = PathBuf::from(p);
        if p.is_file() {
            return p;
        }
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let p = dir.join(name);
            if p.is_file() {
                return p;
            }
        }
    }
    panic!("`{name}` is required for this test but was not found; install it with: {install}");
}

/// Returns a free TCP port on 127.0.0.1 (for peers that cannot bind port 0
/// and report it).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind an ephemeral port")
        .port()
}

/// True when a benchmark should run its quick mode: `BENCH_QUICK` is set
/// (and not `0`), or it runs under `cargo test`, which, unlike `cargo
/// bench`, passes no `--bench` flag (so CI runs every benchmark quickly).
#[allow(dead_code, reason = "used by the benchmarks, not the tests")]
pub fn bench_quick() -> bool {
    std::env::var("BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0")
        || !std::env::args().any(|a| a == "--bench")
}

/// The median of `values` (the lower middle for an even count), for the
/// benchmarks' figures.
#[allow(dead_code, reason = "used by the benchmarks, not the tests")]
pub fn median<T: Copy + PartialOrd>(values: &[T]) -> T {
    let mut sorted = values.to_vec();
    sorted.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    sorted[(sorted.len() - 1) / 2]
}

/// A number with as many decimals as its size deserves, for the
/// benchmarks' tables.
#[allow(dead_code, reason = "used by the benchmarks, not the tests")]
pub fn num(v: f64) -> String {
    let a = v.abs();
    if !v.is_finite() {
        "n/a".into()
    } else if a >= 100.0 || a == 0.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// Appends a child's stdout and stderr, line by line, to `log`.
pub fn capture_output(child: &mut Child, log: &Arc<Mutex<String>>) {
    drop(capture_output_lines(child, log));
}

/// As [`capture_output`], also sending each line to the returned receiver
/// (lines are dropped once it is gone).
pub fn capture_output_lines(
    child: &mut Child,
    log: &Arc<Mutex<String>>,
) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    let streams: [Box<dyn Read + Send>; 2] = [
        Box::new(child.stdout.take().expect("piped stdout")),
        Box::new(child.stderr.take().expect("piped stderr")),
    ];
    for stream in streams {
        let (log, tx) = (log.clone(), tx.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                {
                    let mut log = log.lock().expect("log lock");
                    log.push_str(&line);
                    log.push('\n');
                }
                let _ = tx.send(line);
            }
        });
    }
    rx
}
