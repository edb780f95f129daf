//! The idle rule of blob streams, for both fronts: a FetchBlob stream (or a
//! mirror blob body) whose caller reads nothing for `stream_idle_timeout`
//! ends with an error of the front's kind (DEADLINE_EXCEEDED on gRPC; on
//! the mirror the body is cut short), and what it held (the admission
//! permit, the engine's reader and its file) is released at that moment,
//! not when the caller finally reads or leaves.
//!
//! "Reads nothing" is seen through flow control (HTTP/2's window; on
//! HTTP/1.1 the socket's send buffer, which hyper must flush before it
//! pulls more of a body). The transport
//! pulls the next message from the response stream only while the caller's
//! window has room; once a caller stops reading, its window fills, hyper
//! holds one encoded message waiting for capacity and stops pulling. A
//! forwarding task therefore sits between the engine's stream and tonic: it
//! waits for room in a one-message channel before it takes the next item
//! from the engine, and when no room appears for `stream_idle_timeout` it
//! drops the engine's stream and what the call held, and leaves the
//! terminating status for the caller. The caller sees the messages already
//! buffered for it, then DEADLINE_EXCEEDED. A slow upstream is not an idle
//! caller: only waiting for room counts, never waiting for the engine.
//!
//! The window is released by the caller's HTTP/2 library in batches (h2
//! sends a WINDOW_UPDATE once half of the stream's window has been read), so
//! a caller that reads, but less than that per `stream_idle_timeout`, counts
//! as idle too: with the defaults (60 s, a 2 MiB client window), a caller
//! slower than about 17 KiB/s.

use std::time::Duration;

use futures::{Stream, StreamExt, stream};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tracing::{Instrument, Span};

/// Messages waiting between the forwarding task and the transport. One is
/// enough: the transport asks for the next only when it can send it.
const DEPTH: usize = 1;

/// `source` as a stream that ends with `timed_out(idle)` once its consumer
/// has taken nothing for `idle` while an item was ready for it. `held`
/// (the admission permit) lives as long as `source` is being read: until
/// it ends, the consumer goes away, or the idle rule ends it. The
/// forwarding task runs in `span`.
pub fn bounded<T, E, S, H>(
    source: S,
    idle: Duration,
    held: H,
    span: Span,
    timed_out: impl FnOnce(Duration) -> E + Send + 'static,
) -> impl Stream<Item = Result<T, E>> + Send + 'static
where
    T: Send + 'static,
    E: Send + 'static,
    S: Stream<Item = Result<T, E>> + Send + 'static,
    H: Send + 'static,
{
    let (tx, rx) = mpsc::channel(DEPTH);
    let (end_tx, end_rx) = oneshot::channel();
    tokio::spawn(forward(source, idle, held, tx, end_tx, timed_out).instrument(span));
    // After the forwarded items: the terminating status, if the idle rule
    // left one (the task sets it before it drops its sender).
    let end = stream::once(end_rx).filter_map(|end| async move { end.ok().map(Err) });
    ReceiverStream::new(rx).chain(end)
}

/// Moves items from `source` to `tx` while the consumer keeps taking them.
async fn forward<T, E, S, H>(
    source: S,
    idle: Duration,
    held: H,
    tx: mpsc::Sender<Result<T, E>>,
    end: oneshot::Sender<E>,
    timed_out: impl FnOnce(Duration) -> E,
) where
    S: Stream<Item = Result<T, E>>,
{
    let mut source = Box::pin(source);
    loop {
        // Room first, then the item: nothing is taken from the engine that
        // the consumer is not ready for.
        let room = match tokio::time::timeout(idle, tx.reserve()).await {
            Ok(Ok(room)) => room,
            // The consumer went away (the caller cancelled or disconnected).
            Ok(Err(_)) => return,
            Err(_) => break,
        };
        // A caller that leaves while the engine has nothing for it (a slow
        // upstream) must be noticed too: the engine's reader then stops, and
        // a download nobody waits for can be given up.
        let item = tokio::select! {
            item = source.next() => item,
            () = tx.closed() => return,
        };
        match item {
            Some(item) => room.send(item),
            None => return,
        }
    }
    // Idle: release what the call holds now, and leave the status for
    // whenever the caller reads again.
    drop(source);
    drop(held);
    tracing::info!(
        ?idle,
        "the caller read nothing for stream_idle_timeout: stream ended"
    );
    let _ = end.send(timed_out(idle));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// The error the idle rule leaves, in these tests.
    #[derive(Debug, PartialEq, Eq)]
    struct Idle(Duration);

    /// Sets its flag when dropped: stands for the admission permit.
    struct Held(Arc<AtomicBool>);

    impl Drop for Held {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    fn endless() -> impl Stream<Item = Result<u64, Idle>> + Send + 'static {
        stream::iter(0..).map(Ok)
    }

    #[tokio::test(start_paused = true)]
    async fn a_consumer_that_stops_gets_the_idle_error_and_the_hold_is_released() {
        let released = Arc::new(AtomicBool::new(false));
        let idle = Duration::from_secs(60);
        let s = bounded(endless(), idle, Held(released.clone()), Span::none(), Idle);
        let mut s = std::pin::pin!(s);
        for want in 0..3 {
            assert_eq!(s.next().await.unwrap().unwrap(), want);
        }
        tokio::time::sleep(idle - Duration::from_secs(1)).await;
        assert!(!released.load(Ordering::SeqCst), "not idle long enough");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(released.load(Ordering::SeqCst), "released while unread");
        // What was buffered, then the status, then the end.
        let mut rest = Vec::new();
        while let Some(item) = s.next().await {
            rest.push(item);
        }
        let (last, buffered) = rest.split_last().unwrap();
        assert!(buffered.iter().all(Result::is_ok));
        assert!(buffered.len() <= DEPTH);
        assert_eq!(last.as_ref().unwrap_err(), &Idle(idle));
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_source_is_not_an_idle_consumer() {
        let released = Arc::new(AtomicBool::new(false));
        let slow = stream::iter(0..3u64).then(|i| async move {
            tokio::time::sleep(Duration::from_secs(100)).await;
            Ok(i)
        });
        let s = bounded(
            slow,
            Duration::from_secs(1),
            Held(released.clone()),
            Span::none(),
            Idle,
        );
        let all: Vec<_> = s.collect().await;
        assert_eq!(all.len(), 3);
        assert!(all.iter().all(Result::is_ok), "{all:?}");
        assert!(released.load(Ordering::SeqCst), "released at the end");
    }

    #[tokio::test(start_paused = true)]
    async fn a_consumer_that_leaves_releases_the_hold() {
        let released = Arc::new(AtomicBool::new(false));
        let s = bounded(
            endless(),
            Duration::from_secs(60),
            Held(released.clone()),
            Span::none(),
            Idle,
        );
        drop(s);
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert!(released.load(Ordering::SeqCst));
    }
}
