//! What a client connection's watchdog sees of its I/O: whether the client has sent anything
//! yet, and since when writes have been blocked.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A connection's I/O as its watchdog sees it: whether the client has sent anything yet (a
/// client that connects and stays silent sits before HTTP/1 vs HTTP/2 detection, where no
/// head timer runs), and since when writes have been blocked (the peer stopped reading and
/// the socket's buffers are full: such a client holds its connection, and the upstream one,
/// with no body ever polled, so no body timer can see it).
#[derive(Debug)]
pub struct IoWatch {
    opened: std::time::Instant,
    /// Milliseconds since `opened` when writing blocked; `u64::MAX` while writes go through.
    since_ms: AtomicU64,
    /// A read has returned bytes.
    heard: AtomicBool,
}

impl IoWatch {
    /// A watch for a connection opened at `opened`.
    pub fn new(opened: std::time::Instant) -> Arc<IoWatch> {
        Arc::new(IoWatch {
            opened,
            since_ms: AtomicU64::new(u64::MAX),
            heard: AtomicBool::new(false),
        })
    }

    /// How long writes have been blocked, if they are.
    pub fn stalled_for(&self, now: std::time::Instant) -> Option<std::time::Duration> {
        let since = self.since_ms.load(Ordering::Relaxed);
        (since != u64::MAX).then(|| {
            now.saturating_duration_since(self.opened)
                .saturating_sub(std::time::Duration::from_millis(since))
        })
    }

    /// Whether the client has sent a byte.
    pub fn heard(&self) -> bool {
        self.heard.load(Ordering::Relaxed)
    }

    fn note<T>(&self, r: &Poll<T>) {
        match r {
            // A clock read only when a write blocks, and only the first time.
            Poll::Pending => {
                if self.since_ms.load(Ordering::Relaxed) == u64::MAX {
                    let ms = self.opened.elapsed().as_millis() as u64;
                    self.since_ms.store(ms.min(u64::MAX - 1), Ordering::Relaxed);
                }
            }
            Poll::Ready(_) => {
                if self.since_ms.load(Ordering::Relaxed) != u64::MAX {
                    self.since_ms.store(u64::MAX, Ordering::Relaxed);
                }
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// An I/O stream watched by an [`IoWatch`].
    pub struct Watched<S> {
        #[pin]
        inner: S,
        watch: Arc<IoWatch>,
    }
}

impl<S> Watched<S> {
    /// Wraps a stream.
    pub fn new(inner: S, watch: Arc<IoWatch>) -> Self {
        Watched { inner, watch }
    }
}

impl<S: AsyncRead> AsyncRead for Watched<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let r = this.inner.poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &r {
            if buf.filled().len() > before && !this.watch.heard.load(Ordering::Relaxed) {
                this.watch.heard.store(true, Ordering::Relaxed);
            }
        }
        r
    }
}

impl<S: AsyncWrite> AsyncWrite for Watched<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.project();
        let r = this.inner.poll_write(cx, buf);
        this.watch.note(&r);
        r
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        let r = this.inner.poll_flush(cx);
        this.watch.note(&r);
        r
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let r = this.inner.poll_write_vectored(cx, bufs);
        this.watch.note(&r);
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
