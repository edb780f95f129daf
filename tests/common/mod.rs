//! Shared harness for integration tests: spawns the real `oci-upstream`
//! binary with a config file on an ephemeral port, connects tonic clients to
//! it, and starts peers (a real Distribution registry in [`registry`], an
//! in-process fault-injecting upstream in [`fake`]). Everything started here
//! stops when its handle is dropped.

#![allow(dead_code)]

pub mod fake;
pub mod faulty;
pub mod registry;
pub mod rpc;
pub mod slow;
pub mod tls;
pub mod token_issuer;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use oci_upstream::pb::upstream_service_client::UpstreamServiceClient;
use tonic::transport::Channel;

/// How long a spawned service may take to report its listening address.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A running `oci-upstream` process, killed on drop.
pub struct Service {
    child: Child,
    /// The address the service's gRPC listener is bound to.
    pub addr: SocketAddr,
    log: Arc<Mutex<String>>,
    dir: tempfile::TempDir,
}

impl Service {
    /// Writes `config_toml` to a file and starts `oci-upstream serve --config
    /// FILE` listening on `127.0.0.1:0`, with its cache in a fresh temp dir.
    pub fn start(config_toml: &str) -> Service {
        Self::start_with_env(config_toml, &[])
    }

    /// As [`Service::start`], with extra environment variables for the process.
    pub fn start_with_env(config_toml: &str, env: &[(&str, &str)]) -> Service {
        let dir = tempfile::tempdir().expect("temp dir for the service");
        let config = dir.path().join("config.toml");
        std::fs::write(&config, config_toml).expect("write service config");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_oci-upstream"));
        cmd.arg("serve")
            .arg("--config")
            .arg(&config)
            .env("OCI_UPSTREAM_LISTEN", "127.0.0.1:0")
            .env("OCI_UPSTREAM_CACHE_DIR", dir.path().join("cache"))
            .env("RUST_LOG", "oci_upstream=debug,info")
            .env_remove("OCI_UPSTREAM_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn oci-upstream binary");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        for stream in [
            Box::new(child.stdout.take().expect("piped stdout")) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().expect("piped stderr")),
        ] {
            let log = log.clone();
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    if line.contains("serving gRPC") {
                        if let Some(addr) = field(&line, "addr") {
                            let _ = tx.send(addr);
                        }
                    }
                    let mut log = log.lock().expect("log lock");
                    log.push_str(&line);
                    log.push('\n');
                }
            });
        }
        let addr = match rx.recv_timeout(START_TIMEOUT) {
            Ok(addr) => addr.parse().expect("listening address in the log"),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                std::thread::sleep(Duration::from_millis(200));
                panic!(
                    "oci-upstream did not report `serving gRPC addr=...` within {START_TIMEOUT:?}; log:\n{}",
                    log.lock().expect("log lock")
                );
            }
        };
        Service {
            child,
            addr,
            log,
            dir,
        }
    }

    /// A tonic client connected to the service.
    pub async fn client(&self) -> UpstreamServiceClient<Channel> {
        UpstreamServiceClient::new(self.channel().await)
    }

    /// A plain channel to the service (for health and reflection clients).
    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .expect("valid endpoint")
            .connect()
            .await
            .expect("connect to oci-upstream")
    }

    /// `127.0.0.1:PORT`, as grpcurl wants it.
    pub fn target(&self) -> String {
        self.addr.to_string()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Peak resident set size (VmHWM) of the process so far, in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        proc_status_kib(self.child.id(), "VmHWM:")
    }

    /// Everything the process has logged so far (stdout and stderr).
    pub fn logs(&self) -> String {
        self.log.lock().expect("log lock").clone()
    }

    /// The temp dir holding the config and cache.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Sends SIGTERM (graceful shutdown) without waiting.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill -TERM");
        assert!(status.success(), "kill -TERM failed");
    }

    /// Waits up to `limit` for the process to exit; its status, or `None` if
    /// it is still running.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let start = std::time::Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait on the service") {
                return Some(status);
            }
            if start.elapsed() >= limit {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Number of open file descriptors of the process.
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// Current resident set size (VmRSS) in KiB.
    pub fn rss_kib(&self) -> u64 {
        proc_status_kib(self.child.id(), "VmRSS:")
    }

    /// Sends SIGKILL and waits for the process to exit.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Reads a `/proc/PID/status` line such as `VmHWM:` in KiB.
pub fn proc_status_kib(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
}

/// Extracts `name=value` from a text log line (value up to whitespace).
fn field(line: &str, name: &str) -> Option<String> {
    let start = line.find(&format!("{name}="))? + name.len() + 1;
    let rest = &line[start..];
    Some(
        rest.split_whitespace()
            .next()?
            .trim_matches('"')
            .to_string(),
    )
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
