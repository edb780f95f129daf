//! A Distribution process over a storage root the caller owns, for the
//! benchmarks: it exposes what [`super::Distribution`] (the harness's
//! registry, which pushes content) does not: the process id (for VmHWM,
//! VmRSS and CPU time), the access log (to count the requests it answered),
//! and proxy mode (`proxy: remoteurl:`), which makes a pull-through cache of
//! another registry. A benchmark pushes through the harness's registry,
//! stops it, and serves the same storage from a [`Process`].
//!
//! The access log is parsed as it arrives and only counted (per request line,
//! query string dropped), so a long run does not accumulate log text.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Spawn attempts (a port from `free_port()` can be taken in between).
const START_ATTEMPTS: usize = 3;
/// Lines of non-access-log output kept for error messages.
const KEPT_LINES: usize = 50;

/// How a registry serves.
#[derive(Clone, Debug)]
pub enum Mode {
    /// An ordinary registry over its storage.
    Plain,
    /// A pull-through cache of the registry at this URL (`proxy: remoteurl`).
    Proxy(String),
}

/// Request counts from the access log, keyed by `METHOD /path`.
#[derive(Clone, Debug, Default)]
pub struct Counts(HashMap<String, u64>);

impl Counts {
    /// Requests counted here and not in `before`, per key.
    pub fn since(&self, before: &Counts) -> Counts {
        Counts(
            self.0
                .iter()
                .filter_map(|(k, n)| {
                    let d = n.saturating_sub(before.0.get(k).copied().unwrap_or(0));
                    (d > 0).then(|| (k.clone(), d))
                })
                .collect(),
        )
    }

    /// Adds `other`'s counts to these.
    pub fn add(&mut self, other: &Counts) {
        for (k, n) in &other.0 {
            *self.0.entry(k.clone()).or_default() += n;
        }
    }

    /// All requests counted.
    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }

    /// The counts by method and kind of path (`/v2/` ping, manifest, blob,
    /// other), `scale` times each, as `HEAD manifest 1, GET /v2/ 2`.
    pub fn summary(&self, scale: f64) -> String {
        let mut kinds: std::collections::BTreeMap<String, u64> = Default::default();
        for (k, n) in &self.0 {
            let (method, path) = k.split_once(' ').unwrap_or((k, ""));
            let kind = if path == "/v2/" {
                "/v2/"
            } else if path.contains("/manifests/") {
                "manifest"
            } else if path.contains("/blobs/") {
                "blob"
            } else {
                "other"
            };
            *kinds.entry(format!("{method} {kind}")).or_default() += n;
        }
        if kinds.is_empty() {
            return "none".into();
        }
        kinds
            .iter()
            .map(|(k, n)| format!("{k} {}", super::super::num(*n as f64 * scale)))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Requests with this method whose path contains `fragment`.
    pub fn matching(&self, method: &str, fragment: &str) -> u64 {
        self.0
            .iter()
            .filter(|(k, _)| {
                k.split_once(' ')
                    .is_some_and(|(m, p)| m == method && p.contains(fragment))
            })
            .map(|(_, n)| n)
            .sum()
    }

    /// All requests whose path contains `fragment`, any method.
    pub fn any_method(&self, fragment: &str) -> u64 {
        self.0
            .iter()
            .filter(|(k, _)| k.contains(fragment))
            .map(|(_, n)| n)
            .sum()
    }
}

/// A running `docker-registry serve CONFIG`, killed on drop.
pub struct Process {
    child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its storage root.
    pub root: PathBuf,
    counts: Arc<Mutex<Counts>>,
    lines: Arc<AtomicU64>,
    kept: Arc<Mutex<Vec<String>>>,
    _config_dir: tempfile::TempDir,
}

impl Process {
    /// Starts a registry over `root` (created if missing) and waits until it
    /// answers `GET /v2/`. A proxy needs its remote up: Distribution 2.8
    /// pings the remote's `/v2/` at start and panics if it cannot connect.
    pub fn start(root: &Path, mode: Mode) -> Process {
        let bin = super::super::require_binary(
            "docker-registry",
            &["/usr/bin/docker-registry"],
            "apt-get install -y docker-registry",
        );
        std::fs::create_dir_all(root).expect("create registry storage root");
        let config_dir = tempfile::tempdir().expect("temp dir for a registry config");
        let mut last = String::new();
        for _ in 0..START_ATTEMPTS {
            let addr: SocketAddr = ([127, 0, 0, 1], super::super::free_port()).into();
            let config = config_dir.path().join("config.yml");
            std::fs::write(&config, config_yaml(root, addr, &mode)).expect("write registry config");
            let mut child = Command::new(&bin)
                .arg("serve")
                .arg(&config)
                .env_remove("HTTP_PROXY")
                .env_remove("HTTPS_PROXY")
                .env_remove("http_proxy")
                .env_remove("https_proxy")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn docker-registry");
            let counts = Arc::new(Mutex::new(Counts::default()));
            let lines = Arc::new(AtomicU64::new(0));
            let kept = Arc::new(Mutex::new(Vec::new()));
            let streams: [Box<dyn Read + Send>; 2] = [
                Box::new(child.stdout.take().expect("piped stdout")),
                Box::new(child.stderr.take().expect("piped stderr")),
            ];
            for stream in streams {
                let (counts, lines, kept) = (counts.clone(), lines.clone(), kept.clone());
                std::thread::spawn(move || {
                    for line in BufReader::new(stream).lines() {
                        let Ok(line) = line else { break };
                        match request_key(&line) {
                            Some(key) => {
                                *counts
                                    .lock()
                                    .expect("counts lock")
                                    .0
                                    .entry(key)
                                    .or_default() += 1;
                            }
                            None => {
                                let mut kept = kept.lock().expect("kept lock");
                                if kept.len() < KEPT_LINES {
                                    kept.push(line);
                                }
                            }
                        }
                        lines.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
            match super::wait_ready(&mut child, addr) {
                Ok(()) => {
                    return Process {
                        child,
                        addr,
                        root: root.to_path_buf(),
                        counts,
                        lines,
                        kept,
                        _config_dir: config_dir,
                    };
                }
                Err(why) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    std::thread::sleep(Duration::from_millis(100));
                    last = format!("{why}; output:\n{}", kept.lock().expect("kept").join("\n"));
                }
            }
        }
        panic!("docker-registry ({mode:?}) did not start after {START_ATTEMPTS} attempts: {last}");
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The requests counted so far.
    pub fn counts(&self) -> Counts {
        self.counts.lock().expect("counts lock").clone()
    }

    /// Waits until the log has been quiet for `quiet` (at most `limit`), so
    /// requests that just finished are counted. Access-log lines are written
    /// when a request completes.
    pub fn settle(&self, quiet: Duration, limit: Duration) {
        let started = Instant::now();
        let mut seen = self.lines.load(Ordering::Relaxed);
        let mut since = Instant::now();
        while started.elapsed() < limit {
            std::thread::sleep(Duration::from_millis(20));
            let now = self.lines.load(Ordering::Relaxed);
            if now != seen {
                seen = now;
                since = Instant::now();
            } else if since.elapsed() >= quiet {
                return;
            }
        }
    }

    /// Whether the blob with this `sha256:` digest is committed in this
    /// registry's storage (a proxy's background copy has finished).
    pub fn holds_blob(&self, digest: &str) -> bool {
        let hex = digest.strip_prefix("sha256:").expect("a sha256 digest");
        self.root
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
            .is_file()
    }

    /// Waits (up to `limit`) until [`Process::holds_blob`]; whether it
    /// does.
    pub fn wait_for_blob(&self, digest: &str, limit: Duration) -> bool {
        let started = Instant::now();
        while started.elapsed() < limit {
            if self.holds_blob(digest) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Output lines that were not access-log lines (first few).
    pub fn other_output(&self) -> String {
        self.kept.lock().expect("kept lock").join("\n")
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The config: filesystem storage with the in-memory blob descriptor cache
/// (as the packaged `/etc/docker/registry/config.yml` and Distribution's own
/// sample config have), access log on (the default), loopback listener,
/// upload purging off, and the proxy section in proxy mode.
fn config_yaml(root: &Path, addr: SocketAddr, mode: &Mode) -> String {
    let mut config = format!(
        "version: 0.1\n\
         log:\n  level: warn\n\
         storage:\n  cache:\n    blobdescriptor: inmemory\n  \
         filesystem:\n    rootdirectory: {root}\n  \
         maintenance:\n    uploadpurging:\n      enabled: false\n\
         http:\n  addr: {addr}\n  secret: e2e-bench-secret\n",
        root = root.display(),
    );
    if let Mode::Proxy(remote) = mode {
        config.push_str(&format!("proxy:\n  remoteurl: {remote}\n"));
    }
    config
}

/// `METHOD /path` of a combined-log-format access line
/// (`127.0.0.1 - - [date] "GET /v2/... HTTP/1.1" 200 ...`), query dropped.
fn request_key(line: &str) -> Option<String> {
    let start = line.find("] \"")? + 3;
    let rest = &line[start..];
    let request = &rest[..rest.find('"')?];
    let mut parts = request.split(' ');
    let method = parts.next()?;
    let target = parts.next()?;
    parts.next().filter(|v| v.starts_with("HTTP/"))?;
    let path = target.split('?').next()?;
    Some(format!("{method} {path}"))
}
