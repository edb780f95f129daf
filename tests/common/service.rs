//! The service under test, run two ways.
//!
//! - [`InProcess`]: `oci_upstream::app::run` on a listener bound to
//!   `127.0.0.1:0` in the test's own runtime. The listener is bound before
//!   the service starts, so a client connects at once: no process, no log
//!   scraping, no readiness wait. For every test that does not need what
//!   only a process has.
//! - [`Spawned`]: the real `oci-upstream` binary, for tests of what only a
//!   process has: signals and exit status, resident memory and file
//!   descriptors, the log output, the process environment.
//!
//! Both stop when dropped and keep their cache in a fresh temp dir unless
//! given one.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use oci_upstream::config::Config;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use super::rpc::Client;

/// How long a spawned service may take to report its listening address.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A channel to `addr`; on failure the panic names `what` and `why`.
async fn connect(addr: SocketAddr, what: &str, why: impl FnOnce() -> String) -> Channel {
    match Channel::from_shared(format!("http://{addr}"))
        .expect("valid endpoint")
        .connect()
        .await
    {
        Ok(channel) => channel,
        Err(e) => panic!("connect to {what} at {addr}: {e}{}", why()),
    }
}

/// A channel over TLS to `addr` (`https://`), trusting the authority
/// `ca_pem` and presenting `identity` when given; the transport's error when
/// it cannot connect. A refused client certificate may only show on the
/// first call (TLS 1.3 ends the client's handshake before the server checks
/// it).
pub async fn tls_channel(
    addr: SocketAddr,
    ca_pem: &[u8],
    identity: Option<Identity>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem));
    if let Some(identity) = identity {
        tls = tls.identity(identity);
    }
    Channel::from_shared(format!("https://{addr}"))
        .expect("valid endpoint")
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
}

/// The service running inside the test process, stopped on drop (shutdown
/// signalled, task aborted).
pub struct InProcess {
    /// The address its gRPC listener is bound to.
    pub addr: SocketAddr,
    /// Its `/metrics` listener (the config's `metrics_listen` unless `""`),
    /// bound to an ephemeral port.
    pub metrics_addr: Option<SocketAddr>,
    /// Its plaintext health listener (when the config has `health_listen`),
    /// bound to an ephemeral port.
    pub health_addr: Option<SocketAddr>,
    /// Its OCI mirror (when the config has `mirror_listen`), bound to an
    /// ephemeral port.
    pub mirror_addr: Option<SocketAddr>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    failure: Arc<Mutex<Option<String>>>,
    dir: tempfile::TempDir,
}

impl InProcess {
    /// Parses and validates `config_toml` as the binary does (its cache in a
    /// fresh temp dir) and serves it on `127.0.0.1:0`.
    pub async fn start(config_toml: &str) -> InProcess {
        Self::start_inner(config_toml, None).await
    }

    /// As [`InProcess::start`], with the cache in `cache_dir`.
    pub async fn start_with_cache(config_toml: &str, cache_dir: &Path) -> InProcess {
        Self::start_inner(config_toml, Some(cache_dir)).await
    }

    async fn start_inner(config_toml: &str, cache_dir: Option<&Path>) -> InProcess {
        let dir = tempfile::tempdir().expect("temp dir for the service");
        let file = dir.path().join("config.toml");
        std::fs::write(&file, config_toml).expect("write service config");
        let cache = cache_dir.map_or_else(|| dir.path().join("cache"), Path::to_path_buf);
        let cache = cache.to_str().expect("temp paths are UTF-8").to_string();
        let config = Config::load(Some(&file), |key| {
            (key == "OCI_UPSTREAM_CACHE_DIR").then(|| cache.clone())
        })
        .unwrap_or_else(|e| panic!("the test's service config is invalid: {e}\n{config_toml}"));
        let ephemeral = || async {
            tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind an ephemeral port on loopback")
        };
        let address =
            |l: &tokio::net::TcpListener| l.local_addr().expect("a bound listener has an address");
        let listener = ephemeral().await;
        let addr = address(&listener);
        let metrics = match config.metrics_listen {
            Some(_) => Some(ephemeral().await),
            None => None,
        };
        let health = match config.health_listen {
            Some(_) => Some(ephemeral().await),
            None => None,
        };
        let mirror = match config.mirror_listen {
            Some(_) => Some(ephemeral().await),
            None => None,
        };
        let (metrics_addr, health_addr, mirror_addr) = (
            metrics.as_ref().map(address),
            health.as_ref().map(address),
            mirror.as_ref().map(address),
        );
        let listeners = oci_upstream::app::Listeners {
            grpc: listener,
            metrics,
            health,
            mirror,
        };
        let (shutdown, stop) = oneshot::channel::<()>();
        let failure = Arc::new(Mutex::new(None));
        let task = tokio::spawn({
            let failure = failure.clone();
            async move {
                let result = oci_upstream::app::run(config, listeners, async {
                    let _ = stop.await;
                })
                .await;
                if let Err(e) = result {
                    *failure.lock().expect("failure lock") = Some(e.to_string());
                }
            }
        });
        InProcess {
            addr,
            metrics_addr,
            health_addr,
            mirror_addr,
            shutdown: Some(shutdown),
            task: Some(task),
            failure,
            dir,
        }
    }

    /// A tonic client connected to the service.
    pub async fn client(&self) -> Client {
        Client::new(self.channel().await)
    }

    /// A plain channel to the service (for health and reflection clients).
    pub async fn channel(&self) -> Channel {
        connect(self.addr, "the in-process service", || {
            match self.failure.lock().expect("failure lock").as_ref() {
                Some(e) => format!("; app::run failed: {e}"),
                None => String::new(),
            }
        })
        .await
    }

    /// A TLS channel to the service (see [`tls_channel`]).
    pub async fn tls_channel(
        &self,
        ca_pem: &[u8],
        identity: Option<Identity>,
    ) -> Result<Channel, tonic::transport::Error> {
        tls_channel(self.addr, ca_pem, identity).await
    }

    /// `127.0.0.1:PORT`, as grpcurl wants it.
    pub fn target(&self) -> String {
        self.addr.to_string()
    }

    /// The temp dir holding the config (and the cache, unless given one).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Signals shutdown and waits for `app::run` to return (drain included);
    /// its error, if it failed.
    pub async fn stop(mut self) -> Result<(), String> {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        let task = self.task.take().expect("the task runs until stopped");
        task.await.expect("the service task did not panic");
        match self.failure.lock().expect("failure lock").take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// A running `oci-upstream serve` process, killed on drop.
pub struct Spawned {
    child: Child,
    /// The address the service's gRPC listener is bound to.
    pub addr: SocketAddr,
    /// Its `/metrics` listener, unless the config turned it off.
    pub metrics_addr: Option<SocketAddr>,
    /// Its OCI mirror, when the config has `mirror_listen` (give it
    /// `127.0.0.1:0`: the address is read from the log).
    pub mirror_addr: Option<SocketAddr>,
    log: Arc<Mutex<String>>,
    dir: tempfile::TempDir,
}

impl Spawned {
    /// Writes `config_toml` to a file and starts `oci-upstream serve --config
    /// FILE` listening on `127.0.0.1:0` (and `/metrics` on another ephemeral
    /// port unless the config sets `metrics_listen`), with its cache in a
    /// fresh temp dir and `RUST_LOG=oci_upstream=debug,info`.
    pub fn start(config_toml: &str) -> Spawned {
        Self::start_with_env(config_toml, &[])
    }

    /// As [`Spawned::start`], with extra environment variables for the
    /// process (they override the defaults above).
    pub fn start_with_env(config_toml: &str, env: &[(&str, &str)]) -> Spawned {
        let dir = tempfile::tempdir().expect("temp dir for the service");
        let config = dir.path().join("config.toml");
        let config_toml = if config_toml.contains("metrics_listen") {
            config_toml.to_owned()
        } else {
            // The root table comes first, so a line on top belongs to it.
            format!("metrics_listen = \"127.0.0.1:0\"\n{config_toml}")
        };
        let metrics_off = config_toml.contains("metrics_listen = \"\"");
        std::fs::write(&config, &config_toml).expect("write service config");
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
        let lines = super::capture_output_lines(&mut child, &log);
        let deadline = Instant::now() + START_TIMEOUT;
        let mut metrics_addr = None;
        let mut mirror_addr = None;
        let addr = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                // Logged before `serving gRPC`.
                Ok(line) if line.contains("serving metrics") => {
                    metrics_addr = field(&line, "addr")
                        .map(|a| a.parse::<SocketAddr>().expect("metrics address in the log"));
                }
                Ok(line) if line.contains("serving the OCI mirror") => {
                    mirror_addr = field(&line, "addr")
                        .map(|a| a.parse::<SocketAddr>().expect("mirror address in the log"));
                }
                Ok(line) if line.contains("serving gRPC") => {
                    if let Some(addr) = field(&line, "addr") {
                        break addr.parse().expect("listening address in the log");
                    }
                }
                Ok(_) => {}
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    std::thread::sleep(Duration::from_millis(200));
                    panic!(
                        "oci-upstream did not report `serving gRPC addr=...` within {START_TIMEOUT:?}; log:\n{}",
                        log.lock().expect("log lock")
                    );
                }
            }
        };
        assert!(
            metrics_off || metrics_addr.is_some(),
            "oci-upstream did not log `serving metrics addr=...` before `serving gRPC`; log:\n{}",
            log.lock().expect("log lock")
        );
        Spawned {
            child,
            addr,
            metrics_addr,
            mirror_addr,
            log,
            dir,
        }
    }

    /// A tonic client connected to the service.
    pub async fn client(&self) -> Client {
        Client::new(self.channel().await)
    }

    /// A plain channel to the service (for health and reflection clients).
    pub async fn channel(&self) -> Channel {
        connect(self.addr, "oci-upstream", || {
            format!("; log:\n{}", self.logs())
        })
        .await
    }

    /// A TLS channel to the service (see [`tls_channel`]).
    pub async fn tls_channel(
        &self,
        ca_pem: &[u8],
        identity: Option<Identity>,
    ) -> Result<Channel, tonic::transport::Error> {
        tls_channel(self.addr, ca_pem, identity).await
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

    /// Current resident set size (VmRSS) in KiB.
    pub fn rss_kib(&self) -> u64 {
        proc_status_kib(self.child.id(), "VmRSS:")
    }

    /// Number of open file descriptors of the process.
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .map(|d| d.count())
            .unwrap_or(0)
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
        let start = Instant::now();
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

    /// Sends SIGKILL and waits for the process to exit.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Spawned {
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

/// Extracts `name=value` from a text log line (value up to whitespace), or
/// the field `name` of a JSON log line.
fn field(line: &str, name: &str) -> Option<String> {
    // A JSON line (`log_format = "json"`): the field of the event.
    if let Ok(event) = serde_json::from_str::<serde_json::Value>(line) {
        return event
            .pointer(&format!("/fields/{name}"))
            .and_then(|v| v.as_str())
            .map(str::to_owned);
    }
    let start = line.find(&format!("{name}="))? + name.len() + 1;
    let rest = &line[start..];
    Some(
        rest.split_whitespace()
            .next()?
            .trim_matches('"')
            .to_string(),
    )
}
