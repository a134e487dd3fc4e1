//! Bodies through filters, and request replay for retries.
//!
//! A body enters only the filters that asked for it ([`Filter::body_mode`]), in chain order:
//! a streamed stage sees each chunk as it arrives, a buffered stage gathers the whole body (up
//! to the filter host's buffer limit) and sees it once. A stage's output is the next stage's
//! input. When any stage buffers, the core gathers the body before it goes on (so a request
//! body filter can still answer before the upstream is contacted, and the length is known);
//! otherwise chunks stream through as they come.
//!
//! [`Filter::body_mode`]: super::Filter::body_mode

use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};

use bytes::{Bytes, BytesMut};
use futures_util::stream;
use http::{HeaderMap, Response};
use http_body::{Body as _, Frame};
use http_body_util::{BodyExt, StreamBody};

use super::{BodyAction, BodyMode, ChainEntry, FilterChain, FilterError, Heads, Phase, RequestContext};
use crate::body::{self, Body, BoxError};
use crate::error::ProxyError;

/// Why a body pipeline stopped.
#[derive(Debug)]
pub enum Stop {
    /// A request body filter answered the client.
    Respond(Response<Body>),
    /// A buffered stage's body grew past the buffer limit.
    TooLarge(usize),
    /// A fail-closed filter failed.
    Failed(ProxyError),
    /// The body itself failed (client gone, body limit).
    Body(BoxError),
}

struct Stage {
    entry: ChainEntry,
    mode: BodyMode,
    gathered: BytesMut,
    ended: bool,
}

/// The body stages of one request or response.
pub struct Pipeline {
    stages: Vec<Stage>,
    phase: Phase,
    heads: Arc<Heads>,
    ctx: RequestContext,
    limit: usize,
}

impl Pipeline {
    /// The stages of `chain` for `phase`; `None` when no filter wants this body.
    pub fn new(
        chain: &FilterChain,
        phase: Phase,
        heads: Arc<Heads>,
        ctx: &RequestContext,
        limit: usize,
    ) -> Option<Pipeline> {
        let stages: Vec<Stage> = chain
            .entries()
            .iter()
            .filter_map(|e| {
                let mode = e.filter.body_mode(phase);
                (mode != BodyMode::None).then(|| Stage {
                    entry: e.clone(),
                    mode,
                    gathered: BytesMut::new(),
                    ended: false,
                })
            })
            .collect();
        (!stages.is_empty()).then(|| Pipeline {
            stages,
            phase,
            heads,
            ctx: ctx.clone(),
            limit,
        })
    }

    /// Whether a stage gathers the whole body (the caller then gathers before going on).
    pub fn buffers(&self) -> bool {
        self.stages.iter().any(|s| s.mode == BodyMode::Buffered)
    }

    async fn call(&mut self, entry: &ChainEntry, chunk: Bytes, eos: bool) -> Result<BodyAction, FilterError> {
        match self.phase {
            Phase::RequestBody => {
                entry
                    .filter
                    .on_request_body(chunk, eos, &self.heads, &mut self.ctx)
                    .await
            }
            _ => {
                entry
                    .filter
                    .on_response_body(chunk, eos, &self.heads, &mut self.ctx)
                    .await
            }
        }
    }

    /// Passes one chunk through every stage; `None` while a buffered stage is still gathering.
    pub async fn push(&mut self, chunk: Bytes, eos: bool) -> Result<Option<Bytes>, Stop> {
        let mut chunk = chunk;
        for i in 0..self.stages.len() {
            let stage = &mut self.stages[i];
            if stage.ended {
                continue;
            }
            if stage.mode == BodyMode::Buffered {
                if stage.gathered.len() + chunk.len() > self.limit {
                    return Err(Stop::TooLarge(self.limit));
                }
                stage.gathered.extend_from_slice(&chunk);
                if !eos {
                    return Ok(None);
                }
                chunk = std::mem::take(&mut stage.gathered).freeze();
            }
            stage.ended = eos;
            let entry = stage.entry.clone();
            let answer = self.call(&entry, chunk.clone(), eos).await;
            match answer {
                Ok(BodyAction::Continue) => {}
                Ok(BodyAction::Replace(b)) => chunk = b,
                Ok(BodyAction::Respond(r)) if self.phase == Phase::RequestBody => {
                    return Err(Stop::Respond(r))
                }
                Ok(BodyAction::Respond(_)) => {
                    let e = FilterError {
                        kind: "invalid",
                        message: "respond is not an answer of on-response-body".into(),
                    };
                    entry.failed(self.phase, e).map_err(Stop::Failed)?;
                }
                Err(e) => entry.failed(self.phase, e).map_err(Stop::Failed)?,
            }
        }
        Ok(Some(chunk))
    }

    /// Runs a whole body through the stages and returns what comes out, with its trailers.
    pub async fn gather(mut self, mut body: Body) -> Result<(Bytes, Option<HeaderMap>), Stop> {
        let mut out = BytesMut::new();
        let mut trailers = None;
        let mut ended = false;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(Stop::Body)?;
            match frame.into_data() {
                Ok(data) => {
                    let eos = body.is_end_stream();
                    ended |= eos;
                    if let Some(b) = self.push(data, eos).await? {
                        out.extend_from_slice(&b);
                    }
                }
                Err(frame) => trailers = frame.into_trailers().ok(),
            }
        }
        if !ended {
            if let Some(b) = self.push(Bytes::new(), true).await? {
                out.extend_from_slice(&b);
            }
        }
        Ok((out.freeze(), trailers))
    }

    /// Streams `body` through the stages. When a stage stops the stream, the body fails and
    /// `stopped` holds why (the request path answers the client from it).
    pub fn stream(self, body: Body, stopped: Arc<Mutex<Option<Stop>>>) -> Body {
        struct St {
            pipe: Pipeline,
            body: Body,
            ended: bool,
            trailers: Option<HeaderMap>,
            done: bool,
            stopped: Arc<Mutex<Option<Stop>>>,
        }
        let st = St {
            pipe: self,
            body,
            ended: false,
            trailers: None,
            done: false,
            stopped,
        };
        let s = stream::unfold(st, |mut st| async move {
            loop {
                if st.done {
                    return None;
                }
                if st.ended {
                    st.done = true;
                    return st.trailers.take().map(|t| (Ok(Frame::trailers(t)), st));
                }
                let (chunk, eos) = match st.body.frame().await {
                    Some(Ok(frame)) => match frame.into_data() {
                        Ok(data) => {
                            let eos = st.body.is_end_stream();
                            (data, eos)
                        }
                        Err(frame) => {
                            st.trailers = frame.into_trailers().ok();
                            (Bytes::new(), true)
                        }
                    },
                    Some(Err(e)) => {
                        st.done = true;
                        return Some((Err(e), st));
                    }
                    None => (Bytes::new(), true),
                };
                st.ended = eos;
                match st.pipe.push(chunk, eos).await {
                    Ok(Some(b)) if !b.is_empty() => return Some((Ok(Frame::data(b)), st)),
                    Ok(_) => continue,
                    Err(stop) => {
                        let msg = stop_message(&stop);
                        *st.stopped.lock().expect("stop lock") = Some(stop);
                        st.done = true;
                        return Some((Err(msg.into()), st));
                    }
                }
            }
        });
        sync_body(StreamBody::new(s))
    }
}

fn stop_message(s: &Stop) -> String {
    match s {
        Stop::Respond(_) => "a body filter answered the request".into(),
        Stop::TooLarge(n) => format!("body larger than the filter buffer of {n} bytes"),
        Stop::Failed(e) => e.to_string(),
        Stop::Body(e) => e.to_string(),
    }
}

/// Makes a `Send` body `Sync` (what [`Body`] asks) at no cost: the body is only ever reached
/// through `&mut`, so the mutex is never locked.
struct SyncBody<B>(Mutex<Pin<Box<B>>>);

fn sync_body<B>(b: B) -> Body
where
    B: http_body::Body<Data = Bytes, Error = BoxError> + Send + 'static,
{
    Body::new(SyncBody(Mutex::new(Box::pin(b))))
}

impl<B: http_body::Body<Data = Bytes, Error = BoxError>> http_body::Body for SyncBody<B> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let inner = self.get_mut().0.get_mut().unwrap_or_else(PoisonError::into_inner);
        inner.as_mut().poll_frame(cx)
    }
}

/// Bytes and trailers as a body.
pub fn body_of(data: Bytes, trailers: Option<HeaderMap>) -> Body {
    match trailers {
        None => body::full(data),
        Some(t) => {
            let frames: Vec<Result<Frame<Bytes>, BoxError>> =
                vec![Ok(Frame::data(data)), Ok(Frame::trailers(t))];
            StreamBody::new(stream::iter(frames)).boxed()
        }
    }
}

/// What a retry needs of the request body: what has arrived of it so far (chunks are
/// reference-counted, not copied), while it fits the buffer, and the rest still to come.
///
/// An upstream may answer before it has read the whole body (a 503 to the head, say); a retry
/// asked then goes with what was recorded and goes on reading the client's body, as Envoy's
/// router does, rather than giving up because the first attempt had not sent it all.
struct Replay {
    /// The client's body, read by the current attempt's reader only.
    source: Body,
    chunks: Vec<Bytes>,
    trailers: Option<HeaderMap>,
    size: usize,
    limit: usize,
    /// The source ended: its end, its trailers, or `is_end_stream` after a frame.
    complete: bool,
    /// The source failed (client gone, body limit): nothing more is coming.
    failed: bool,
    /// More than `limit` bytes came: the body cannot be sent again.
    overflow: bool,
    /// The attempt whose reader reads `source`; readers of earlier attempts are cut off.
    current: u32,
    /// The task of the current attempt's reader while it waits for the source: woken when
    /// another attempt takes over, so that the earlier one fails and lets its connection go.
    waiting: Option<Waker>,
}

/// A shared handle on the replay record of one request; `None` for a request without a body
/// (most of them: nothing to record, no allocation).
#[derive(Clone)]
pub struct ReplayHandle(Option<Arc<Mutex<Replay>>>);

impl std::fmt::Debug for ReplayHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReplayHandle")
    }
}

impl ReplayHandle {
    /// The body for another attempt, if it can be sent again (it fit the buffer and did not
    /// fail): what was recorded, then the rest of the client's body as it arrives. The
    /// earlier attempt's reader is cut off from then on: polled again, it fails.
    pub fn body(&self) -> Option<Body> {
        let Some(shared) = &self.0 else {
            return Some(body::empty());
        };
        let mut r = shared.lock().unwrap_or_else(PoisonError::into_inner);
        if r.overflow || r.failed {
            return None;
        }
        r.current += 1;
        if let Some(w) = r.waiting.take() {
            w.wake();
        }
        Some(Body::new(Reader {
            shared: shared.clone(),
            attempt: r.current,
            next: 0,
            trailers_sent: false,
            done: false,
        }))
    }
}

/// One attempt's view of a recorded body: the record first, then the source.
struct Reader {
    shared: Arc<Mutex<Replay>>,
    attempt: u32,
    /// The next recorded chunk to hand out.
    next: usize,
    trailers_sent: bool,
    done: bool,
}

impl http_body::Body for Reader {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        let mut guard = this.shared.lock().unwrap_or_else(PoisonError::into_inner);
        let r = &mut *guard;
        if r.current != this.attempt {
            this.done = true;
            return Poll::Ready(Some(Err(
                "the request went again: the body went to the next attempt".into(),
            )));
        }
        if !r.overflow && this.next < r.chunks.len() {
            this.next += 1;
            return Poll::Ready(Some(Ok(Frame::data(r.chunks[this.next - 1].clone()))));
        }
        if r.complete || r.failed {
            this.done = true;
            return match r.trailers.as_ref().filter(|_| !this.trailers_sent) {
                Some(t) => {
                    this.trailers_sent = true;
                    Poll::Ready(Some(Ok(Frame::trailers(t.clone()))))
                }
                None => Poll::Ready(None),
            };
        }
        let Poll::Ready(polled) = Pin::new(&mut r.source).poll_frame(cx) else {
            r.waiting = Some(cx.waker().clone());
            return Poll::Pending;
        };
        r.waiting = None;
        match polled {
            Some(Ok(frame)) => {
                if let Some(d) = frame.data_ref() {
                    r.size += d.len();
                    if r.size > r.limit {
                        r.overflow = true;
                        r.chunks = Vec::new();
                    } else if !r.overflow {
                        r.chunks.push(d.clone());
                        this.next += 1;
                    }
                } else if let Some(t) = frame.trailers_ref() {
                    // Trailers end a body, whatever the body reports after them (hyper's
                    // clients stop reading at the trailers).
                    r.trailers = Some(t.clone());
                    r.complete = true;
                    this.trailers_sent = true;
                }
                if r.source.is_end_stream() {
                    r.complete = true;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => {
                r.failed = true;
                this.done = true;
                Poll::Ready(Some(Err(e)))
            }
            None => {
                r.complete = true;
                this.done = true;
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        if self.done {
            return true;
        }
        let r = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
        r.current == self.attempt
            && r.complete
            && (r.overflow || self.next >= r.chunks.len())
            && (self.trailers_sent || r.trailers.is_none())
    }
}

/// Sends `body` on while recording up to `limit` bytes of it for another attempt.
pub fn recorded(body: Body, limit: usize) -> (Body, ReplayHandle) {
    if http_body::Body::is_end_stream(&body) {
        return (body, ReplayHandle(None));
    }
    let handle = ReplayHandle(Some(Arc::new(Mutex::new(Replay {
        source: body,
        chunks: Vec::new(),
        trailers: None,
        size: 0,
        limit,
        complete: false,
        failed: false,
        overflow: false,
        current: 0,
        waiting: None,
    }))));
    let first = handle.body().expect("a new record can be read");
    (first, handle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_body_that_ends_with_trailers_is_kept_whole_for_a_replay() {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
            Ok(Frame::data(Bytes::from_static(b"abc"))),
            Ok(Frame::data(Bytes::from_static(b"def"))),
            Ok(Frame::trailers(trailers.clone())),
        ];
        // A stream body never reports its end on its own, like a chunked HTTP/1 body.
        let (mut sent, handle) = recorded(StreamBody::new(stream::iter(frames)).boxed(), 1024);
        // Read as hyper's clients read a request body: up to the trailers, no further.
        for _ in 0..3 {
            sent.frame().await.expect("a frame").expect("no error");
        }
        let again = handle
            .body()
            .expect("a body that ended with trailers is replayable");
        let again = again.collect().await.expect("the replay reads");
        assert_eq!(again.trailers(), Some(&trailers));
        assert_eq!(again.to_bytes(), Bytes::from_static(b"abcdef"));
    }

    /// A body fed by the test, one frame at a time, that waits in between.
    fn fed() -> (tokio::sync::mpsc::Sender<Bytes>, Body) {
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
        let s = stream::unfold(rx, |mut rx| async move {
            let d = rx.recv().await?;
            Some((Ok::<_, BoxError>(Frame::data(d)), rx))
        });
        (tx, sync_body(StreamBody::new(s)))
    }

    #[tokio::test]
    async fn a_retry_asked_before_the_body_arrived_whole_gets_all_of_it() {
        let (tx, source) = fed();
        let (mut first, handle) = recorded(source, 1024);
        tx.send(Bytes::from_static(b"abc")).await.unwrap();
        let f = first.frame().await.unwrap().unwrap();
        assert_eq!(f.into_data().unwrap(), Bytes::from_static(b"abc"));
        // The upstream answered (a 503 to the head, say) before the rest came.
        let second = handle.body().expect("a body not whole yet can still go again");
        tx.send(Bytes::from_static(b"def")).await.unwrap();
        drop(tx);
        assert!(
            first.frame().await.unwrap().is_err(),
            "the first attempt no longer reads the client's body"
        );
        let again = second.collect().await.unwrap().to_bytes();
        assert_eq!(again, Bytes::from_static(b"abcdef"));
        // And once more, now that it is complete.
        let third = handle.body().unwrap().collect().await.unwrap().to_bytes();
        assert_eq!(third, Bytes::from_static(b"abcdef"));
    }

    #[tokio::test]
    async fn an_attempt_waiting_for_the_body_is_woken_and_cut_off_by_the_next() {
        let (tx, source) = fed();
        let (mut first, handle) = recorded(source, 1024);
        // The first attempt's connection waits for the client's next bytes...
        let waiting = tokio::spawn(async move { first.frame().await });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        // ...when a retry takes the body over: the wait ends with an error, at once.
        let second = handle.body().unwrap();
        let ended = tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("the earlier attempt was woken")
            .unwrap();
        assert!(matches!(ended, Some(Err(_))), "the earlier attempt failed");
        tx.send(Bytes::from_static(b"xyz")).await.unwrap();
        drop(tx);
        assert_eq!(
            second.collect().await.unwrap().to_bytes(),
            Bytes::from_static(b"xyz")
        );
    }

    #[tokio::test]
    async fn a_body_larger_than_the_buffer_is_sent_once_and_not_again() {
        let (tx, source) = fed();
        let (first, handle) = recorded(source, 4);
        tx.send(Bytes::from_static(b"abc")).await.unwrap();
        tx.send(Bytes::from_static(b"def")).await.unwrap();
        drop(tx);
        let sent = first.collect().await.unwrap().to_bytes();
        assert_eq!(
            sent,
            Bytes::from_static(b"abcdef"),
            "the first attempt gets it all"
        );
        assert!(handle.body().is_none(), "too large to keep for another attempt");
    }
}
