//! A real containerd (Debian's `containerd` 1.6) as a throw-away daemon:
//! its own root, state, sockets and config in a temp dir, no CRI plugin,
//! killed on drop. `ctr content fetch --hosts-dir` pulls through a
//! `hosts.toml` mirror the way a node's containerd does.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long containerd may take to answer on its socket.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A running containerd.
pub struct Containerd {
    child: Child,
    socket: PathBuf,
    ctr: PathBuf,
    dir: tempfile::TempDir,
}

impl Containerd {
    /// Starts containerd with everything under a fresh temp dir.
    pub fn start() -> Containerd {
        let install = "apt-get install containerd (scripts/test does)";
        let containerd = super::require_binary("containerd", &["/usr/bin/containerd"], install);
        let ctr = super::require_binary("ctr", &["/usr/bin/ctr"], install);
        let dir = tempfile::tempdir().expect("temp dir for containerd");
        let at = |name: &str| dir.path().join(name);
        let socket = at("containerd.sock");
        let config = format!(
            "version = 2\nroot = \"{}\"\nstate = \"{}\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\", \"io.containerd.snapshotter.v1.aufs\", \
             \"io.containerd.snapshotter.v1.btrfs\", \"io.containerd.snapshotter.v1.zfs\", \
             \"io.containerd.snapshotter.v1.devmapper\"]\n\
             [grpc]\naddress = \"{}\"\n[ttrpc]\naddress = \"{}\"\n[debug]\naddress = \"{}\"\n\
             [plugins.\"io.containerd.internal.v1.opt\"]\npath = \"{}\"\n",
            at("root").display(),
            at("state").display(),
            socket.display(),
            at("ttrpc.sock").display(),
            at("debug.sock").display(),
            at("opt").display(),
        );
        std::fs::write(at("config.toml"), config).expect("write containerd's config");
        let log = std::fs::File::create(at("containerd.log")).expect("containerd's log");
        let child = Command::new(containerd)
            .arg("--config")
            .arg(at("config.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .expect("spawn containerd");
        let mut daemon = Containerd {
            child,
            socket,
            ctr,
            dir,
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        while daemon.ctr(&["version"]).is_err() {
            if let Ok(Some(status)) = daemon.child.try_wait() {
                panic!("containerd exited ({status}); log:\n{}", daemon.logs());
            }
            assert!(
                Instant::now() < deadline,
                "containerd did not answer within {READY_TIMEOUT:?}; log:\n{}",
                daemon.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        daemon
    }

    /// Runs `ctr --address SOCKET ARGS`: its stdout, or its stderr.
    pub fn ctr(&self, args: &[&str]) -> Result<String, String> {
        let output = Command::new(&self.ctr)
            .arg("--address")
            .arg(&self.socket)
            .args(args)
            .output()
            .map_err(|e| format!("run ctr: {e}"))?;
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&output.stderr).into_owned())
        }
    }

    /// A hosts dir in which `registry` (`host:port`) is pulled through the
    /// plain-http `mirror` only (`pull` and `resolve`), as a node's
    /// `/etc/containerd/certs.d/<registry>/hosts.toml` says.
    pub fn hosts_dir(&self, registry: &str, mirror: &str) -> PathBuf {
        let dir = self.dir.path().join("certs.d");
        let host = dir.join(registry);
        std::fs::create_dir_all(&host).expect("create the hosts dir");
        std::fs::write(
            host.join("hosts.toml"),
            format!(
                "server = \"http://{registry}\"\n\n[host.\"http://{mirror}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
            ),
        )
        .expect("write hosts.toml");
        dir
    }

    /// `ctr content fetch --hosts-dir DIR REFERENCE` (every platform).
    pub fn fetch(&self, reference: &str, hosts_dir: &Path) -> Result<String, String> {
        let hosts = hosts_dir.to_string_lossy();
        self.ctr(&[
            "content",
            "fetch",
            "--all-platforms",
            "--hosts-dir",
            &hosts,
            reference,
        ])
    }

    /// The digests in the content store.
    pub fn content(&self) -> Vec<String> {
        let listing = self.ctr(&["content", "ls", "-q"]).expect("ctr content ls");
        let mut digests: Vec<String> = listing.lines().map(|l| l.trim().to_owned()).collect();
        digests.sort();
        digests
    }

    /// What containerd logged.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
