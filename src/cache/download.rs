//! A blob download in flight, shared by every caller that wants the blob.
//! The downloader appends verified-so-far bytes to a temp file and publishes
//! how many are written; readers open the same file and follow the progress,
//! so a caller that joins late gets the bytes already written and then the
//! live ones. The final state tells readers whether the digest passed.

use std::path::PathBuf;

use tokio::sync::watch;

use super::Holder;

/// Where a download stands.
#[derive(Debug, Clone)]
pub enum State<E> {
    /// Bytes are still arriving.
    Running,
    /// All bytes arrived and matched the digest.
    Verified,
    /// The download failed; readers must end with this error.
    Failed(E),
}

/// Bytes written so far and the state.
#[derive(Debug, Clone)]
pub struct Progress<E> {
    /// Bytes of the blob in the file.
    pub written: u64,
    /// The state.
    pub state: State<E>,
}

/// A download in flight.
#[derive(Debug)]
pub struct Download<E> {
    /// The temp file the bytes go to (renamed into the store once verified).
    pub path: PathBuf,
    /// Size of the whole blob.
    pub size: u64,
    /// The upstream and repository it comes from.
    pub holder: Holder,
    progress: watch::Sender<Progress<E>>,
}

impl<E: Clone> Download<E> {
    /// A download of `size` bytes into `path` from `holder`.
    pub fn new(path: PathBuf, size: u64, holder: Holder) -> Self {
        let (progress, _) = watch::channel(Progress {
            written: 0,
            state: State::Running,
        });
        Self {
            path,
            size,
            holder,
            progress,
        }
    }

    /// Follows the progress.
    pub fn subscribe(&self) -> watch::Receiver<Progress<E>> {
        self.progress.subscribe()
    }

    /// Publishes that `written` bytes are in the file.
    pub fn advance(&self, written: u64) {
        self.progress.send_modify(|p| p.written = written);
    }

    /// Publishes the final state.
    pub fn finish(&self, state: State<E>) {
        self.progress.send_modify(|p| p.state = state);
    }

    /// True while no reader follows the download.
    pub fn unwatched(&self) -> bool {
        self.progress.receiver_count() == 0
    }
}

/// A progress that is already complete, for reading a committed object with
/// the same code that follows a download.
pub fn complete<E: Clone>(size: u64) -> watch::Receiver<Progress<E>> {
    let (tx, rx) = watch::channel(Progress {
        written: size,
        state: State::Verified,
    });
    drop(tx);
    rx
}
