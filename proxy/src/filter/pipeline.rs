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
use std::task::{Context, Poll};

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

/// What a retry needs of the request body: a copy of what was sent, while it fits.
#[derive(Debug, Default)]
pub struct Replay {
    chunks: Vec<Bytes>,
    trailers: Option<HeaderMap>,
    size: usize,
    complete: bool,
    overflow: bool,
}

/// A shared handle on the replay copy of one request; `None` for a request without a body
/// (most of them: nothing to record, no allocation).
#[derive(Debug, Clone)]
pub struct ReplayHandle(Option<Arc<Mutex<Replay>>>);

impl ReplayHandle {
    /// The body again, if it was sent whole and fit the buffer.
    pub fn body(&self) -> Option<Body> {
        let Some(r) = &self.0 else {
            return Some(body::empty());
        };
        let r = r.lock().expect("replay lock");
        if !r.complete || r.overflow {
            return None;
        }
        let mut frames: Vec<Result<Frame<Bytes>, BoxError>> =
            r.chunks.iter().map(|c| Ok(Frame::data(c.clone()))).collect();
        if let Some(t) = &r.trailers {
            frames.push(Ok(Frame::trailers(t.clone())));
        }
        Some(StreamBody::new(stream::iter(frames)).boxed())
    }
}

/// Sends `body` on while keeping a copy (chunks are reference-counted, not copied) of up to
/// `limit` bytes for a replay.
pub fn recorded(body: Body, limit: usize) -> (Body, ReplayHandle) {
    if http_body::Body::is_end_stream(&body) {
        return (body, ReplayHandle(None));
    }
    let shared = Arc::new(Mutex::new(Replay::default()));
    let (handle, h) = (ReplayHandle(Some(shared.clone())), shared);
    let s = stream::unfold((body, h, false), move |(mut body, h, done)| async move {
        if done {
            return None;
        }
        match body.frame().await {
            Some(Ok(frame)) => {
                {
                    let mut r = h.lock().expect("replay lock");
                    if let Some(d) = frame.data_ref() {
                        r.size += d.len();
                        if r.size > limit {
                            r.overflow = true;
                            r.chunks.clear();
                        } else if !r.overflow {
                            r.chunks.push(d.clone());
                        }
                    } else if let Some(t) = frame.trailers_ref() {
                        // Trailers end a body, whatever the body reports after them (hyper's
                        // clients stop reading at the trailers).
                        r.trailers = Some(t.clone());
                        r.complete = true;
                    }
                    if body.is_end_stream() {
                        r.complete = true;
                    }
                }
                Some((Ok(frame), (body, h, false)))
            }
            Some(Err(e)) => Some((Err(e), (body, h, true))),
            None => {
                h.lock().expect("replay lock").complete = true;
                None
            }
        }
    });
    (sync_body(StreamBody::new(s)), handle)
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
}
