//! The body type that flows through the proxy, and the wrappers the core puts around bodies:
//! a size limit for request bodies and an observer that records response completion, and
//! the stream idle timeout on request and upstream response bodies (a body that yields
//! nothing for that long fails).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full};

/// Errors a body may yield.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Every body in the proxy: streamed, type-erased.
pub type Body = BoxBody<Bytes, BoxError>;

/// An empty body.
pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// A body from bytes in memory.
pub fn full(data: impl Into<Bytes>) -> Body {
    Full::new(data.into()).map_err(|never| match never {}).boxed()
}

/// The request body grew past the listener's `max_request_body`.
#[derive(Debug, thiserror::Error)]
#[error("request body exceeds the limit of {limit} bytes")]
pub struct BodyTooLarge {
    /// The limit.
    pub limit: u64,
}

/// A body went `idle` without yielding anything: its peer stalled.
#[derive(Debug, thiserror::Error)]
#[error("no body data for {0:?} (stream idle timeout)")]
pub struct BodyIdle(pub Duration);

/// The stream idle timer of a body. It costs nothing while the body has its frames ready
/// when polled (most bodies, read in one go); it is set when the body first has to wait,
/// and set again only when it waits after a frame came.
#[derive(Debug)]
pub struct IdleTimer {
    idle: Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    armed: bool,
}

impl IdleTimer {
    /// A timer for bodies that may stay silent at most `idle`.
    pub fn new(idle: Duration) -> IdleTimer {
        IdleTimer {
            idle,
            timer: None,
            armed: false,
        }
    }

    /// The body yielded something: the next wait starts a new idle period.
    fn frame(&mut self) {
        self.armed = false;
    }

    /// The body is waiting: `true` once it has waited `idle` since its last frame.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.armed {
            let deadline = tokio::time::Instant::now() + self.idle;
            match &mut self.timer {
                Some(t) => t.as_mut().reset(deadline),
                None => self.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
            self.armed = true;
        }
        self.timer
            .as_mut()
            .is_some_and(|t| t.as_mut().poll(cx).is_ready())
    }
}

/// What the request path learns of a client's request body as it streams to the upstream:
/// - why it failed, if it did: an HTTP/2 upstream connection only resets the stream when the
///   body it sends fails, so the error the exchange returns no longer says the body was the
///   client's fault;
/// - when it ended: the request timeout runs from there, as Envoy's does (a slow upload is
///   bounded by the stream idle timeout, not answered 504 and charged to the endpoint);
/// - how many frames passed: an upload that stops moving because the upstream stopped reading
///   is seen by the request timer, as nothing polls the body then.
#[derive(Debug, Default)]
pub struct BodyWatch {
    fault: std::sync::OnceLock<ClientBodyFault>,
    ended: std::sync::OnceLock<std::time::Instant>,
    frames: std::sync::atomic::AtomicU64,
    /// The upstream side has asked for the body at least once.
    polled: std::sync::atomic::AtomicBool,
    waiting: futures_util::task::AtomicWaker,
}

/// See [`BodyWatch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientBodyFault {
    /// Over the limit of this many bytes.
    TooLarge(u64),
    /// Nothing for this long.
    Idle(Duration),
}

impl BodyWatch {
    /// The fault recorded, if any.
    pub fn get(&self) -> Option<ClientBodyFault> {
        self.fault.get().copied()
    }

    /// When the body ended, if it has.
    pub fn ended_at(&self) -> Option<std::time::Instant> {
        self.ended.get().copied()
    }

    /// Whether the upstream side has asked for the body yet.
    pub fn polled(&self) -> bool {
        self.polled.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Frames passed so far.
    pub fn frames(&self) -> u64 {
        self.frames.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Resolves when the body has ended, with when.
    pub fn ended(&self) -> impl Future<Output = std::time::Instant> + '_ {
        std::future::poll_fn(move |cx| {
            if let Some(t) = self.ended_at() {
                return Poll::Ready(t);
            }
            self.waiting.register(cx.waker());
            match self.ended_at() {
                Some(t) => Poll::Ready(t),
                None => Poll::Pending,
            }
        })
    }

    fn end(&self) {
        if self.ended.set(std::time::Instant::now()).is_ok() {
            self.waiting.wake();
        }
    }
}

pin_project_lite::pin_project! {
    /// Streams a body through while counting its bytes; fails the stream past `limit`, or
    /// when it yields nothing for its idle timeout. Request bodies get the listener's size
    /// limit; upstream response bodies only the idle timeout (`u64::MAX` bytes), so a stalled
    /// upstream is cut whoever reads the body (the client, a buffering filter).
    pub struct Limited<B> {
        #[pin]
        inner: B,
        seen: u64,
        limit: u64,
        idle: IdleTimer,
        watch: Option<std::sync::Arc<BodyWatch>>,
    }
}

impl<B> Limited<B> {
    /// Wraps `inner`, allowing at most `limit` bytes of data and `idle` between frames.
    pub fn new(inner: B, limit: u64, idle: Duration) -> Self {
        Limited {
            inner,
            seen: 0,
            limit,
            idle: IdleTimer::new(idle),
            watch: None,
        }
    }

    /// Also records how the body goes in `watch`.
    pub fn recording(mut self, watch: std::sync::Arc<BodyWatch>) -> Self {
        self.watch = Some(watch);
        self
    }
}

impl<B> HttpBody for Limited<B>
where
    B: HttpBody<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        if let Some(w) = this.watch {
            if !w.polled.load(std::sync::atomic::Ordering::Relaxed) {
                w.polled.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
        match this.inner.as_mut().poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.idle.frame();
                if let Some(data) = frame.data_ref() {
                    *this.seen += data.len() as u64;
                    if *this.seen > *this.limit {
                        if let Some(w) = this.watch {
                            let _ = w.fault.set(ClientBodyFault::TooLarge(*this.limit));
                        }
                        return Poll::Ready(Some(Err(BodyTooLarge { limit: *this.limit }.into())));
                    }
                }
                if let Some(w) = this.watch {
                    w.frames.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    // The last frame: hyper's clients poll no further once they have sent
                    // the declared length or the trailers, so the final `None` never comes.
                    // (An HTTP/2 body with the length declared says it is at its end only by
                    // its size hint until END_STREAM is read; an HTTP/1 one after trailers,
                    // never.)
                    if frame.is_trailers()
                        || this.inner.is_end_stream()
                        || this.inner.size_hint().exact() == Some(0)
                    {
                        w.end();
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => {
                if let Some(w) = this.watch {
                    w.end();
                }
                Poll::Ready(None)
            }
            Poll::Pending if this.idle.expired(cx) => {
                if let Some(w) = this.watch {
                    let _ = w.fault.set(ClientBodyFault::Idle(this.idle.idle));
                }
                Poll::Ready(Some(Err(BodyIdle(this.idle.idle).into())))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Called once when an observed body ends, fails or is dropped, with the bytes it carried.
pub trait OnComplete: Send + 'static {
    /// `complete` is false when the stream failed or was dropped early.
    fn on_complete(self, bytes: u64, complete: bool);
}

/// How far a response body got toward an HTTP/2 client, for its connection's watchdog: the
/// connection clock's value when the body last handed over a frame and has not been asked
/// for the next one since, or `u64::MAX` while it waits on its own source (or has ended).
/// hyper's HTTP/2 server asks a body for more only when the client's flow-control window has
/// room: a client that grants none leaves it unpolled, so no body timer can see it.
#[derive(Debug)]
pub struct Handover {
    since: std::sync::atomic::AtomicU64,
    clock: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Handover {
    /// A body's handover, on the connection clock `clock`.
    pub fn new(clock: std::sync::Arc<std::sync::atomic::AtomicU64>) -> std::sync::Arc<Handover> {
        std::sync::Arc::new(Handover {
            since: std::sync::atomic::AtomicU64::new(u64::MAX),
            clock,
        })
    }

    /// The clock value since which the body has waited to be asked again, if it does.
    pub fn waiting_since(&self) -> Option<u64> {
        let s = self.since.load(std::sync::atomic::Ordering::Relaxed);
        (s != u64::MAX).then_some(s)
    }

    fn handed(&self, waiting: bool) {
        let v = if waiting {
            self.clock.load(std::sync::atomic::Ordering::Relaxed)
        } else {
            u64::MAX
        };
        if self.since.load(std::sync::atomic::Ordering::Relaxed) != v {
            self.since.store(v, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

pin_project_lite::pin_project! {
    /// Streams a body through and reports its size and outcome once at the end.
    pub struct Observed<B: HttpBody, F: OnComplete> {
        #[pin]
        inner: B,
        bytes: u64,
        done: Option<F>,
        handover: Option<std::sync::Arc<Handover>>,
    }

    impl<B: HttpBody, F: OnComplete> PinnedDrop for Observed<B, F> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(f) = this.done.take() {
                // hyper stops polling once `is_end_stream` is true (sized and empty bodies), so
                // a body dropped at its end is complete, not aborted.
                let complete = this.inner.is_end_stream();
                f.on_complete(*this.bytes, complete);
            }
        }
    }
}

impl<B: HttpBody, F: OnComplete> Observed<B, F> {
    /// Wraps `inner`; `done` runs once when it ends.
    pub fn new(inner: B, done: F) -> Self {
        Observed {
            inner,
            bytes: 0,
            done: Some(done),
            handover: None,
        }
    }

    /// Also notes in `h` when the body waits for its reader (see [`Handover`]).
    pub fn handing_over(mut self, h: std::sync::Arc<Handover>) -> Self {
        self.handover = Some(h);
        self
    }
}

impl<B, F> HttpBody for Observed<B, F>
where
    B: HttpBody<Data = Bytes>,
    F: OnComplete,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let mut this = self.project();
        let polled = this.inner.as_mut().poll_frame(cx);
        if let Some(h) = this.handover {
            // Handed a frame over and not at the end: the next step is the reader's.
            h.handed(matches!(&polled, Poll::Ready(Some(Ok(_)))) && !this.inner.is_end_stream());
        }
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    *this.bytes += d.len() as u64;
                }
                if this.inner.is_end_stream() {
                    if let Some(f) = this.done.take() {
                        f.on_complete(*this.bytes, true);
                    }
                }
            }
            Poll::Ready(None) => {
                if let Some(f) = this.done.take() {
                    f.on_complete(*this.bytes, true);
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(f) = this.done.take() {
                    f.on_complete(*this.bytes, false);
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
