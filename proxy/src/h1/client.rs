//! HTTP/1.1 toward upstreams: the client side of the pooled connections, written for the proxy
//! instead of going through hyper's client.
//!
//! A pooled connection has no task of its own: the request that uses it writes its head and
//! body and reads the response head ([`H1Conn::send`]), and the response body reads the rest
//! while it streams ([`PooledBody`]), still sending what is left of a request body (a full
//! duplex exchange, as an echo or a gRPC-style stream over HTTP/1.1 needs). Where hyper's
//! client costs some 12 000 instructions per exchange (a dispatcher, a request channel,
//! generic encoders), this one writes the head in one buffer and one `write`, parses the
//! response with `httparse` and hands out header values and body data as slices of the bytes
//! read, without copying them.
//!
//! Framing follows RFC 9112, section 6: a response to HEAD, a 1xx, 204 or 304 has no body; a
//! `Transfer-Encoding` must be `chunked` alone (anything else is refused, as nginx does: the
//! field is hop-by-hop, so the client would get a body in a coding nobody labelled), and wins
//! over `Content-Length`; a
//! `Content-Length` must be one number (repeated values must agree); without either, the body
//! ends when the upstream closes. Interim responses (100, 103) are read past. A connection goes
//! back to the pool only when both messages ended exactly, the upstream did not ask to close it
//! and nothing more arrived after the response.

use std::future::{poll_fn, Future};
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll, Waker};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode, Version};
use http_body::{Body as _, Frame, SizeHint};
use tokio::io::AsyncWrite;

use crate::body::{Body, BoxError};
use crate::cluster::{checkin, Endpoint, Stream};

use super::{
    is_hop_by_hop, is_name, parse_length, write_field, write_last_chunk, Chunk, Decoder, Framed, Outbox,
    RawHead, ReadRoom, Step, COPY_DATA, MAX_RESPONSE_HEAD, MAX_RESPONSE_HEADERS,
};

/// An HTTP/1.1 connection to an upstream, idle in its endpoint's pool or carrying one
/// exchange.
pub struct H1Conn {
    io: Stream,
    /// Bytes read and not consumed yet.
    rbuf: BytesMut,
    room: ReadRoom,
    out: Outbox,
    /// The request body still to send, and how it is framed.
    sending: Option<Sending>,
    /// Bytes were written since the last flush: a TLS stream may hold them in its buffer.
    unflushed: bool,
    /// This exchange got an interim response (100, 103): the upstream took the request.
    interim: bool,
    /// The connection carries no further exchange: the upstream asked to close it, a
    /// message's framing forbids reuse, or it failed.
    done: bool,
    /// Taken from the idle pool after resting there [`crate::limits::RESEND_AFTER_IDLE`]
    /// or longer: the upstream may have closed it as idle just as the request goes.
    pub(crate) rested: bool,
}

struct Sending {
    body: Body,
    framing: Framing,
}

#[derive(Clone, Copy)]
enum Framing {
    /// `Content-Length`: this many bytes still to send.
    Length(u64),
    Chunked,
}

/// Fields written after a request head's own, not put in its map first (see [`H1Conn::send`]).
/// Borrowed where they can be (the connection's client address, the client's host): a
/// header value's clone and drop are two atomic read-modify-writes.
pub type Added<'a> = &'a [(HeaderName, std::borrow::Cow<'a, HeaderValue>)];

/// Why an exchange on a pooled HTTP/1.1 connection failed before its response head.
#[derive(Debug)]
pub struct SendFailed {
    /// What happened, for the log and the error response.
    pub reason: String,
    /// The connection closed, or was reset, before a byte of response: on a connection that
    /// sat in the pool, most likely the upstream closing it as idle while the request was on
    /// its way, not a failure of the request (see [`H1Conn::rested`]).
    pub closed: bool,
}

/// A failure while sending: of the request body (the client's side) or of the connection.
enum SendError {
    Body(BoxError),
    Io(io::Error),
}

/// Whether an I/O error says the peer went away (closed, reset), rather than anything else.
fn gone(e: &io::Error) -> bool {
    use io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionReset | BrokenPipe | ConnectionAborted | UnexpectedEof
    )
}

/// A response head read, with how its body is framed.
struct Head {
    parts: http::response::Parts,
    /// The head as it came, when kept so (see [`RawHead`]).
    raw: Option<RawHead>,
    decoder: Decoder,
}

impl H1Conn {
    /// A connection over a freshly established stream.
    pub fn new(io: Stream) -> Box<H1Conn> {
        Box::new(H1Conn {
            io,
            rbuf: BytesMut::new(),
            room: ReadRoom::new(),
            out: Outbox::default(),
            sending: None,
            unflushed: false,
            interim: false,
            done: false,
            rested: false,
        })
    }

    /// Whether the connection sat idle in the pool long enough before this exchange that the
    /// upstream may close it under the request (see [`crate::limits::RESEND_AFTER_IDLE`]).
    pub fn rested(&self) -> bool {
        self.rested
    }

    /// Whether the connection can take a request now: it carries no unfinished exchange and
    /// nothing arrived on it since (a close, or bytes no request asked for). Looks without a
    /// system call when the socket has no news: tokio remembers that the last read drained it.
    pub(crate) fn reusable(&mut self) -> bool {
        if self.done || self.sending() || !self.rbuf.is_empty() {
            return false;
        }
        // tokio charges a read to the task's cooperative budget first: with the budget spent
        // it answers Pending without looking at the socket, so look unconstrained. A small
        // room: anything that arrives now ends the connection anyway.
        let looked = {
            let mut look = std::pin::pin!(tokio::task::coop::unconstrained(poll_fn(
                |cx| self.poll_fill(cx, Some(64))
            )));
            look.as_mut().poll(&mut Context::from_waker(Waker::noop()))
        };
        match looked {
            Poll::Pending => true,
            Poll::Ready(_) => {
                self.done = true;
                false
            }
        }
    }

    /// Whether any of the request is still to be written or flushed.
    fn sending(&self) -> bool {
        self.sending.is_some() || !self.out.is_empty() || self.unflushed
    }

    /// Reads what the socket has into the read buffer: `Ok(0)` at the end of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>, want: Option<usize>) -> Poll<io::Result<usize>> {
        self.room.poll_fill(&mut self.io, &mut self.rbuf, cx, want)
    }

    /// Writes everything queued.
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.out.poll_write_to(&mut self.io, cx, &mut self.unflushed)
    }

    /// Sends the request head (queued by [`H1Conn::start`]) and as much of its body as there
    /// is: `Ready(Ok)` once all of it is written and flushed.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), SendError>> {
        loop {
            // Gather what the body has ready, so a head and a small body go in one write.
            let mut waiting = false;
            while let Some(s) = self.sending.as_mut() {
                if self.out.buf.len() >= COPY_DATA || !self.out.data.is_empty() {
                    break;
                }
                match Pin::new(&mut s.body).poll_frame(cx) {
                    Poll::Pending => {
                        waiting = true;
                        break;
                    }
                    Poll::Ready(Some(Err(e))) => {
                        self.sending = None;
                        self.done = true;
                        return Poll::Ready(Err(SendError::Body(e)));
                    }
                    Poll::Ready(Some(Ok(frame))) => {
                        if let Err(e) = self.encode(frame) {
                            self.sending = None;
                            self.done = true;
                            return Poll::Ready(Err(SendError::Body(e.into())));
                        }
                    }
                    Poll::Ready(None) => {
                        let framing = s.framing;
                        self.sending = None;
                        match framing {
                            Framing::Length(0) => {}
                            Framing::Length(n) => {
                                self.done = true;
                                return Poll::Ready(Err(SendError::Body(
                                    format!("request body ended {n} bytes short of its content-length")
                                        .into(),
                                )));
                            }
                            Framing::Chunked => self.out.buf.extend_from_slice(b"0\r\n\r\n"),
                        }
                    }
                }
            }
            if let Err(e) = ready!(self.poll_write_out(cx)) {
                return self.write_failed(e);
            }
            if self.sending.is_none() || waiting {
                if self.unflushed {
                    if let Err(e) = ready!(Pin::new(&mut self.io).poll_flush(cx)) {
                        return self.write_failed(e);
                    }
                    self.unflushed = false;
                }
                if self.sending.is_none() {
                    return Poll::Ready(Ok(()));
                }
                return Poll::Pending;
            }
        }
    }

    fn write_failed(&mut self, e: io::Error) -> Poll<Result<(), SendError>> {
        self.sending = None;
        self.out = Outbox::default();
        self.unflushed = false;
        self.done = true;
        Poll::Ready(Err(SendError::Io(e)))
    }

    /// Queues one frame of the request body in its framing.
    fn encode(&mut self, frame: Frame<Bytes>) -> Result<(), String> {
        let Some(s) = self.sending.as_mut() else {
            return Ok(());
        };
        match frame.into_data() {
            Ok(data) => match &mut s.framing {
                Framing::Length(left) => {
                    let n = data.len() as u64;
                    if n > *left {
                        return Err("request body longer than its content-length".into());
                    }
                    *left -= n;
                    let end = *left == 0;
                    self.out.data(data, false);
                    if end {
                        // The declared length is sent: the body is not read further.
                        self.sending = None;
                    }
                }
                Framing::Chunked => {
                    if !data.is_empty() {
                        use std::fmt::Write;
                        let _ = write!(self.out.buf, "{:x}\r\n", data.len());
                        self.out.data(data, true);
                    }
                }
            },
            Err(frame) => {
                let Ok(trailers) = frame.into_trailers() else {
                    return Ok(());
                };
                match s.framing {
                    Framing::Length(0) => {}
                    Framing::Length(n) => {
                        return Err(format!(
                            "request body ended {n} bytes short of its content-length"
                        ));
                    }
                    // Every trailer field goes (hyper's client sent only those the request
                    // declared in `Trailer`, which HTTP/2 clients such as gRPC's do not).
                    Framing::Chunked => write_last_chunk(&mut self.out.buf, Some(&trailers)),
                }
                self.sending = None;
            }
        }
        Ok(())
    }

    /// Queues the request head and decides how its body is framed: the request's own
    /// `Content-Length` if it has one; none for a body already at its end (`content-length: 0`
    /// for the methods that expect a body, as servers may answer 411 otherwise); its exact
    /// size if known; chunked otherwise, a GET's too (a search API's body, an HTTP/2 GET with
    /// DATA and no length), as Envoy sends it; not a HEAD's (RFC 9110 §9.3.2 warns a body there
    /// reads as a smuggling attempt). A `Transfer-Encoding` in the head (a filter's) is not
    /// sent: the framing is decided here.
    fn start(&mut self, parts: &http::request::Parts, added: Added<'_>, body: Body) -> Result<(), String> {
        self.interim = false;
        let buf = &mut self.out.buf;
        buf.reserve(512);
        buf.extend_from_slice(parts.method.as_str().as_bytes());
        buf.extend_from_slice(b" ");
        buf.extend_from_slice(parts.uri.path_and_query().map_or("/", |p| p.as_str()).as_bytes());
        buf.extend_from_slice(b" HTTP/1.1\r\n");
        let mut length = None;
        for (name, value) in &parts.headers {
            if name == header::TRANSFER_ENCODING {
                continue;
            }
            if name == header::CONTENT_LENGTH {
                let n = parse_length(value.as_bytes())
                    .filter(|n| length.is_none_or(|l| l == *n))
                    .ok_or("invalid content-length in the request")?;
                if length.is_some() {
                    continue;
                }
                length = Some(n);
            }
            write_field(buf, name, value);
        }
        for (name, value) in added {
            write_field(buf, name, value);
        }
        let framing = match length {
            Some(0) => None,
            Some(n) => Some(Framing::Length(n)),
            None if body.is_end_stream() => {
                if matches!(parts.method, Method::POST | Method::PUT | Method::PATCH) {
                    buf.extend_from_slice(b"content-length: 0\r\n");
                }
                None
            }
            None => match body.size_hint().exact() {
                Some(n) => {
                    use std::fmt::Write;
                    let _ = write!(buf, "content-length: {n}\r\n");
                    (n > 0).then_some(Framing::Length(n))
                }
                None if parts.method == Method::HEAD => None,
                None => {
                    buf.extend_from_slice(b"transfer-encoding: chunked\r\n");
                    Some(Framing::Chunked)
                }
            },
        };
        buf.extend_from_slice(b"\r\n");
        self.sending = framing.map(|framing| Sending { body, framing });
        Ok(())
    }

    /// Sends a request and reads until the response head, sending its body meanwhile. The
    /// response's body reads the rest and puts the connection back in `ep`'s pool (at most
    /// `max_idle` there) when the exchange is complete.
    ///
    /// `added`: fields the proxy adds to the head (`X-Forwarded-*`, `X-Request-Id`), written
    /// after the head's own; never among them (the caller removed any they replace).
    /// `keep_head`: a response head with nothing for the proxy to take out comes as a
    /// [`RawHead`] beside the response, whose `HeaderMap` is then empty (only for a caller
    /// that writes it with Weir's HTTP/1.1 server and reads none of it).
    ///
    /// The head by reference: it is written out before the first wait and not kept, so it is
    /// not moved into this future (a 224-byte copy or two per request).
    pub async fn send(
        mut self: Box<Self>,
        parts: &http::request::Parts,
        body: Body,
        added: Added<'_>,
        keep_head: bool,
        ep: &Arc<Endpoint>,
        max_idle: usize,
    ) -> Result<(Response<PooledBody>, Option<RawHead>), SendFailed> {
        self.start(parts, added, body).map_err(|reason| SendFailed {
            reason,
            closed: false,
        })?;
        let head_request = parts.method == Method::HEAD;
        let head = poll_fn(|cx| self.poll_head(cx, head_request, keep_head)).await?;
        let body = PooledBody {
            conn: Some(self),
            decoder: head.decoder,
            ep: ep.clone(),
            max_idle,
            chunk_ext: 0,
        };
        Ok((Response::from_parts(head.parts, body), head.raw))
    }

    fn poll_head(
        &mut self,
        cx: &mut Context<'_>,
        head_request: bool,
        keep_head: bool,
    ) -> Poll<Result<Head, SendFailed>> {
        let mut write_error = None;
        loop {
            if self.sending() {
                match self.poll_send(cx) {
                    Poll::Ready(Err(SendError::Body(e))) => {
                        return Poll::Ready(Err(SendFailed {
                            reason: format!("request body: {e}"),
                            closed: false,
                        }))
                    }
                    // The upstream stopped reading: it may still have answered (a 413 before
                    // closing); read on.
                    Poll::Ready(Err(SendError::Io(e))) => write_error = Some(e),
                    _ => {}
                }
            }
            match self.parse_head(head_request, keep_head) {
                Ok(Some(head)) => return Poll::Ready(Ok(head)),
                Ok(None) => {}
                Err(reason) => {
                    self.done = true;
                    return Poll::Ready(Err(SendFailed {
                        reason,
                        closed: false,
                    }));
                }
            }
            let failed = match ready!(self.poll_fill(cx, None)) {
                Ok(0) => {
                    let what = if self.rbuf.is_empty() {
                        "connection closed before the response"
                    } else {
                        "connection closed in the middle of the response head"
                    };
                    match &write_error {
                        Some(w) => format!("{what} (sending: {w})"),
                        None => what.to_string(),
                    }
                }
                Ok(_) => continue,
                Err(e) => {
                    if !gone(&e) {
                        self.done = true;
                        return Poll::Ready(Err(SendFailed {
                            reason: e.to_string(),
                            closed: false,
                        }));
                    }
                    e.to_string()
                }
            };
            self.done = true;
            return Poll::Ready(Err(SendFailed {
                closed: self.rbuf.is_empty() && !self.interim,
                reason: failed,
            }));
        }
    }

    /// The response head at the start of the read buffer, if all of it arrived; interim
    /// responses (1xx but 101) are skipped.
    fn parse_head(&mut self, head_request: bool, keep_head: bool) -> Result<Option<Head>, String> {
        loop {
            if self.rbuf.is_empty() {
                return Ok(None);
            }
            let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_RESPONSE_HEADERS];
            let mut resp = httparse::Response::new(&mut []);
            let n = match httparse::ParserConfig::default()
                .parse_response_with_uninit_headers(&mut resp, &self.rbuf, &mut slots)
            {
                Ok(httparse::Status::Complete(n)) if n <= MAX_RESPONSE_HEAD => n,
                Ok(httparse::Status::Partial) if self.rbuf.len() <= MAX_RESPONSE_HEAD => return Ok(None),
                Ok(_) => {
                    return Err(format!(
                        "response head larger than {} KiB",
                        MAX_RESPONSE_HEAD / 1024
                    ))
                }
                Err(httparse::Error::TooManyHeaders) => {
                    return Err(format!("more than {MAX_RESPONSE_HEADERS} response header fields"))
                }
                Err(e) => return Err(format!("invalid response head: {e}")),
            };
            let code = resp.code.unwrap_or_default();
            if (100..200).contains(&code) && code != 101 {
                self.interim = true;
                self.rbuf.advance(n);
                continue;
            }
            let status = StatusCode::from_u16(code).map_err(|_| format!("invalid status {code}"))?;
            let http10 = resp.version == Some(0);
            let canonical = status.canonical_reason() == resp.reason;
            let reason = (!canonical).then_some(resp.reason).flatten().map(|r| r.len());
            // Where each field lies in the head, to hand out its value without a copy once
            // the head is split off the buffer.
            let base = self.rbuf.as_ptr() as usize;
            let mut fields: smallvec::SmallVec<[(usize, usize, usize, usize); 24]> =
                smallvec::SmallVec::new();
            let mut f = Framed::default();
            // Whether the head can go on as it came (see `RawHead`): nothing to take out of it.
            let mut plain = keep_head && code >= 200 && code != 204 && n <= usize::from(u16::MAX);
            let mut date = false;
            for h in resp.headers.iter() {
                let (name, value) = (h.name.as_bytes(), h.value);
                f.note(name, value);
                plain &= !is_hop_by_hop(name);
                date |= name.len() == 4 && is_name(name, b"date");
                fields.push((
                    name.as_ptr() as usize - base,
                    name.len(),
                    value.as_ptr() as usize - base,
                    value.len(),
                ));
            }
            plain &= !f.transfer_encoding && !f.repeated_length && f.error.is_none();
            let reason_at = resp.reason.map(|r| r.as_ptr() as usize - base);
            let head = self.rbuf.split_to(n).freeze();
            let (mut headers, mut raw, mut phrase) = (HeaderMap::new(), None, None);
            if plain {
                // Offsets below `n`, which fits: checked above.
                let place = |(ns, nl, vs, vl): (usize, usize, usize, usize)| {
                    (ns as u16, nl as u16, vs as u16, vl as u16)
                };
                let reason = reason_at.zip(reason).map(|(at, len)| (at as u16, len as u16));
                raw = Some(RawHead::new(
                    head,
                    fields.iter().copied().map(place).collect(),
                    reason,
                    f.length,
                    date,
                ));
            } else {
                // Room for what the proxy adds (`x-request-id`) without growing the map.
                headers.reserve(fields.len() + 2);
                // By reference: moving the inline array into an iterator copied it (~800 bytes).
                for &(ns, nl, vs, vl) in fields.iter() {
                    let name = HeaderName::from_bytes(&head[ns..ns + nl])
                        .map_err(|_| "invalid response header name".to_string())?;
                    let value = HeaderValue::from_maybe_shared(head.slice(vs..vs + vl))
                        .map_err(|_| "invalid response header value".to_string())?;
                    headers.append(name, value);
                }
                if let (Some(at), Some(len)) = (reason_at, reason) {
                    phrase = hyper::ext::ReasonPhrase::try_from(head.slice(at..at + len)).ok();
                }
            }
            let mut keep_alive = if http10 {
                f.keep_alive && !f.close
            } else {
                !f.close
            };
            let decoder = if head_request || code == 204 || code == 304 || code == 101 {
                // No body, whatever the framing fields say (a HEAD's answer may name the
                // `gzip, chunked` its GET would use); fields that could not frame one still
                // leave the connection in doubt.
                if code == 101 || f.error.is_some() {
                    keep_alive = false;
                }
                Decoder::Done
            } else if let Some(e) = f.error {
                return Err(e);
            } else if f.transfer_encoding {
                if !f.chunked {
                    return Err("empty response transfer-encoding".into());
                }
                if http10 {
                    return Err("transfer-encoding in an HTTP/1.0 response".into());
                }
                if f.length.is_some() {
                    // RFC 9112 §6.3: chunked wins, and the connection is not reused.
                    headers.remove(header::CONTENT_LENGTH);
                    keep_alive = false;
                }
                Decoder::Chunked(Chunk::Size)
            } else {
                match f.length {
                    Some(0) => Decoder::Done,
                    Some(n) => Decoder::Length(n),
                    None => {
                        keep_alive = false;
                        Decoder::Eof
                    }
                }
            };
            self.done |= !keep_alive;
            let mut r = Response::new(());
            *r.status_mut() = status;
            *r.version_mut() = if http10 {
                Version::HTTP_10
            } else {
                Version::HTTP_11
            };
            *r.headers_mut() = headers;
            if let Some(p) = phrase {
                r.extensions_mut().insert(p);
            }
            return Ok(Some(Head {
                parts: r.into_parts().0,
                raw,
                decoder,
            }));
        }
    }
}

/// An upstream response body that reads its HTTP/1.1 connection while it streams (and sends
/// what is left of the request body), and puts the connection back in the pool when the
/// exchange is complete. Dropped early, it closes the connection: a half-read response never
/// serves another request.
pub struct PooledBody {
    conn: Option<Box<H1Conn>>,
    decoder: Decoder,
    ep: Arc<Endpoint>,
    max_idle: usize,
    /// Bytes of chunk extensions read so far.
    chunk_ext: usize,
}

impl PooledBody {
    /// Both messages are over (as far as the response goes): the connection goes back to the
    /// pool if it can carry another exchange.
    fn finish(&mut self) {
        let Some(mut conn) = self.conn.take() else { return };
        // Bytes after the end of the response were never asked for; a request body the
        // upstream answered before it was all sent would cost a task to finish off, for a
        // client that may never end it (Envoy resets such a stream too): either way the
        // connection closes.
        if conn.done || !conn.rbuf.is_empty() || conn.sending() {
            return;
        }
        // An idle connection does not keep the room a large response grew its reads to.
        conn.room.rest(&mut conn.rbuf);
        checkin(&self.ep, conn, self.max_idle);
    }

    fn fail(&mut self, e: impl Into<BoxError>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.conn = None;
        self.decoder = Decoder::Done;
        Poll::Ready(Some(Err(e.into())))
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        // A response without a body (to HEAD, a 204 or 304, `Content-Length: 0`) is complete
        // before anyone reads it, and the client side may never poll it: the exchange is over, so
        // the connection goes back to the pool instead of closing.
        if matches!(self.decoder, Decoder::Done) {
            self.finish();
        }
    }
}

impl http_body::Body for PooledBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            if conn.sending() {
                match conn.poll_send(cx) {
                    Poll::Ready(Err(SendError::Body(e))) => {
                        return this.fail(format!("request body: {e}"));
                    }
                    // The upstream stopped reading the request: its response may still be
                    // complete; the connection is not reused.
                    Poll::Ready(Err(SendError::Io(_))) | Poll::Ready(Ok(())) | Poll::Pending => {}
                }
            }
            match this.decoder.step(&mut conn.rbuf, &mut this.chunk_ext) {
                Ok(Step::Frame(frame)) => {
                    if matches!(this.decoder, Decoder::Done) {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(frame)));
                }
                Ok(Step::End) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(Step::More) => {}
                Err(e) => return this.fail(format!("response body: {e}")),
            }
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match ready!(conn.poll_fill(cx, None)) {
                Ok(0) if matches!(this.decoder, Decoder::Eof) => {
                    conn.done = true;
                    this.decoder = Decoder::Done;
                }
                Ok(0) => {
                    return this.fail("upstream closed the connection before the end of the response body")
                }
                Ok(_) => {}
                Err(e) => return this.fail(e),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.decoder, Decoder::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.decoder {
            Decoder::Length(n) => SizeHint::with_exact(n),
            Decoder::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}
