//! The body type that flows through the proxy, and the wrappers the core puts around bodies:
//! a size limit for request bodies and an observer that records response completion.

use std::pin::Pin;
use std::task::{Context, Poll};

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

pin_project_lite::pin_project! {
    /// Streams a body through while counting its bytes; fails the stream past `limit`.
    pub struct Limited<B> {
        #[pin]
        inner: B,
        seen: u64,
        limit: u64,
    }
}

impl<B> Limited<B> {
    /// Wraps `inner`, allowing at most `limit` bytes of data.
    pub fn new(inner: B, limit: u64) -> Self {
        Limited {
            inner,
            seen: 0,
            limit,
        }
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
        let this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    *this.seen += data.len() as u64;
                    if *this.seen > *this.limit {
                        return Poll::Ready(Some(Err(BodyTooLarge { limit: *this.limit }.into())));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
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

pin_project_lite::pin_project! {
    /// Streams a body through and reports its size and outcome once at the end.
    pub struct Observed<B: HttpBody, F: OnComplete> {
        #[pin]
        inner: B,
        bytes: u64,
        done: Option<F>,
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
        }
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
