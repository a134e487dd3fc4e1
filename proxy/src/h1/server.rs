//! HTTP/1.1 toward clients: the server side of a downstream connection, written for the proxy
//! instead of going through hyper's server.
//!
//! One task per connection, no dispatcher: the connection reads a request head with
//! `httparse` into one buffer (header values and the target are slices of it), calls the
//! request path, and writes the response head and as much body as is ready in one `write`.
//! The request body is read off the same buffer only when whoever sends it upstream asks for
//! more ([`RequestBody`]), so a client is never read faster than its upstream takes the
//! bytes; meanwhile the response may already stream back (full duplex).
//!
//! What it refuses, as an edge proxy must (RFC 9112): a malformed head (400), a head over the
//! listener's `max_header_bytes` or `max_headers` (431), `Content-Length` together with
//! `Transfer-Encoding`, a repeated or listed `Content-Length`, any transfer coding but
//! `chunked` alone, a `Transfer-Encoding` from an HTTP/1.0 client (400); each closes the
//! connection, so nothing after a head it could not frame is ever read as a request. A
//! request that asks to leave HTTP/1.1 (`Upgrade`, `CONNECT`) and the HTTP/2 preface on a
//! plain listener are handed, with the bytes already read, to hyper's server, which serves
//! the rest of that connection ([`Ended::Handoff`]).

use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll, Waker};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, StatusCode, Uri, Version};
use http_body::{Body as _, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{
    parse_length, write_field, write_last_chunk, Chunk, Decoder, Framed, Outbox, ReadRoom, Reply, Step,
    COPY_DATA,
};
use crate::body::{Body, BoxError};
use crate::proxy::ConnInfo;

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Header slots kept on the stack; a listener allowing more uses the heap.
const STACK_HEADERS: usize = 128;

/// How a connection ended.
pub enum Ended<I> {
    /// Closed (by either side, or for an error already answered or logged).
    Closed,
    /// The rest of the connection is for hyper's server: HTTP/2 (`h2`), or an HTTP/1.1
    /// request that may leave HTTP (an upgrade, CONNECT). `io` gives back the bytes already
    /// read first.
    Handoff {
        /// The connection, rewound.
        io: Rewind<I>,
        /// HTTP/2 prior knowledge.
        h2: bool,
    },
}

/// The listener's limits the server enforces itself.
#[derive(Clone, Copy)]
pub struct Limits {
    /// Most bytes in a request head.
    pub max_head: usize,
    /// Most header fields in a request head.
    pub max_headers: usize,
    /// How long a request head may take, from the end of the previous exchange.
    pub head_timeout: Duration,
}

/// A client connection served over HTTP/1.1. `S` is the request path.
pub struct ServerConn<I, S, F> {
    io: Option<I>,
    rbuf: BytesMut,
    room: ReadRoom,
    out: Outbox,
    unflushed: bool,
    conn: Arc<ConnInfo>,
    service: S,
    /// The request in flight, in one allocation for the life of the connection.
    in_flight: Pin<Box<Option<F>>>,
    limits: Limits,
    /// Fires the header read timeout; reset only when it fires early (see `poll_head`).
    head_timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// A plain listener's first bytes may be the HTTP/2 preface.
    detect_h2: bool,
    /// Close once the exchange in flight (if any) is over.
    shutdown: bool,
    /// Closing: nothing more is read as a request (sticky: a close that waits on the
    /// socket resumes here, not at the next head).
    closing: Option<Closing>,
    /// A write waited for the client during this exchange: the head timer then runs from
    /// the exchange's end, not from when its last byte was queued.
    wrote_late: bool,
    x: Option<Exchange>,
}

/// How far a close has got: queued bytes sent, then our FIN, then what the client still
/// sends is read and dropped for a while (a lingering close: closing with unread bytes makes
/// the kernel send a reset, which can destroy the answer before the client reads it).
struct Closing {
    shut: bool,
    linger: Option<Pin<Box<tokio::time::Sleep>>>,
    drained: usize,
}

/// How long, and how many bytes, a closing connection reads and drops.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 1024 * 1024;

/// One request and its response.
struct Exchange {
    /// The request body still being read, and how.
    body: Option<Arc<Chan>>,
    decoder: Decoder,
    chunk_ext: usize,
    /// `Expect: 100-continue` not answered yet.
    expect: bool,
    /// The response, once its head is queued.
    resp: Option<Sending>,
    keep_alive: bool,
    head_request: bool,
    http10: bool,
    /// The client accepts trailers (`TE: trailers`).
    trailers: bool,
}

struct Sending {
    body: Body,
    enc: Enc,
}

#[derive(Clone, Copy, PartialEq)]
enum Enc {
    /// `Content-Length`: this many bytes still to send.
    Length(u64),
    Chunked,
    /// Until the connection closes (an HTTP/1.0 client, length unknown).
    Eof,
    /// The message has no body (HEAD, 204, 304): what the source still yields is read to
    /// its end and dropped (an HTTP/2 upstream's END_STREAM may come in a frame of its own).
    Discard,
    /// Sent: the body has ended, or the message has none.
    Done,
}

impl<I, S, F> ServerConn<I, S, F>
where
    I: AsyncRead + AsyncWrite + Unpin,
    S: FnMut(Request<RequestBody>) -> F,
    F: Future<Output = Reply>,
{
    /// Serves `io`; `detect_h2` on a plain listener (prior-knowledge HTTP/2 is handed off).
    pub fn new(io: I, conn: Arc<ConnInfo>, service: S, limits: Limits, detect_h2: bool) -> Self {
        ServerConn {
            io: Some(io),
            rbuf: BytesMut::new(),
            room: ReadRoom::new(),
            out: Outbox::default(),
            unflushed: false,
            conn,
            service,
            in_flight: Box::pin(None),
            limits,
            head_timer: None,
            detect_h2,
            shutdown: false,
            closing: None,
            wrote_late: false,
            x: None,
        }
    }

    /// Closes after the exchange in flight, or at once between requests.
    pub fn graceful_shutdown(&mut self) {
        self.shutdown = true;
    }

    /// Reads what the socket has: `Ok(0)` at its end.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let io = self.io.as_mut().expect("io");
        self.room.poll_fill(io, &mut self.rbuf, cx, None)
    }

    /// Writes and flushes what is queued.
    fn poll_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let io = self.io.as_mut().expect("io");
        ready!(self.out.poll_write_to(io, cx, &mut self.unflushed))?;
        if self.unflushed {
            ready!(Pin::new(io).poll_flush(cx))?;
            self.unflushed = false;
        }
        Poll::Ready(Ok(()))
    }

    /// Drives the connection until it ends.
    pub fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Ended<I>> {
        loop {
            if self.closing.is_some() {
                return self.poll_close(cx);
            }
            if self.x.is_none() {
                match ready!(self.poll_head(cx)) {
                    Next::Exchange => {}
                    Next::Refuse(status, reason) => {
                        self.refuse(status, reason);
                        self.close();
                        continue;
                    }
                    Next::Close => {
                        self.close();
                        continue;
                    }
                    Next::Handoff(h2) => {
                        let io = self.io.take().expect("io");
                        let pre = std::mem::take(&mut self.rbuf).freeze();
                        return Poll::Ready(Ended::Handoff {
                            io: Rewind::new(io, pre),
                            h2,
                        });
                    }
                }
            }
            let r = ready!(self.poll_exchange(cx));
            // Dropping the exchange ends a request body still being read (its reader learns
            // the client is gone).
            self.x = None;
            self.in_flight.set(None);
            if std::mem::take(&mut self.wrote_late) {
                self.conn.touch(std::time::Instant::now());
            }
            match r {
                Ok(true) if !self.shutdown => {
                    self.room.rest(&mut self.rbuf);
                }
                Ok(_) => self.close(),
                Err(e) => {
                    tracing::debug!(listener = %self.conn.listener, client.addr = %self.conn.client, error = %e, "connection ended with error");
                    self.io = None;
                    return Poll::Ready(Ended::Closed);
                }
            }
        }
    }

    fn close(&mut self) {
        self.closing.get_or_insert(Closing {
            shut: false,
            linger: None,
            drained: 0,
        });
    }

    /// Sends what is queued (an answer to a bad request, the end of a response), then our
    /// FIN, then reads and drops what the client still sends, for a while; then ends.
    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<Ended<I>> {
        if self.io.is_none() {
            return Poll::Ready(Ended::Closed);
        }
        if !self.out.is_empty() || self.unflushed {
            if let Err(e) = ready!(self.poll_out(cx)) {
                tracing::debug!(client.addr = %self.conn.client, error = %e, "write failed while closing");
                self.io = None;
                return Poll::Ready(Ended::Closed);
            }
        }
        let closing = self.closing.as_mut().expect("closing");
        let io = self.io.as_mut().expect("io");
        if !closing.shut {
            if ready!(Pin::new(&mut *io).poll_shutdown(cx)).is_err() {
                self.io = None;
                return Poll::Ready(Ended::Closed);
            }
            closing.shut = true;
        }
        let linger = closing
            .linger
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(LINGER)));
        let mut scratch = [0u8; 8192];
        loop {
            let mut rb = ReadBuf::new(&mut scratch);
            match Pin::new(&mut *io).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) if !rb.filled().is_empty() => {
                    closing.drained += rb.filled().len();
                    if closing.drained > LINGER_BYTES {
                        break;
                    }
                }
                // The client closed too (or failed): done.
                Poll::Ready(_) => break,
                Poll::Pending => {
                    if linger.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    break;
                }
            }
        }
        self.io = None;
        Poll::Ready(Ended::Closed)
    }

    /// Queues the answer to a request head that cannot be served, closing the connection.
    fn refuse(&mut self, status: StatusCode, reason: &'static str) {
        tracing::debug!(listener = %self.conn.listener, client.addr = %self.conn.client, status = status.as_u16(), reason, "request refused");
        let text = format!("{} {}\n", status.as_u16(), reason);
        let b = &mut self.out.buf;
        write_status(b, status, None);
        b.extend_from_slice(b"content-type: text/plain; charset=utf-8\r\nx-weir-error: ");
        b.extend_from_slice(reason.as_bytes());
        b.extend_from_slice(b"\r\n");
        write_date(b);
        write_length(b, text.len() as u64);
        b.extend_from_slice(b"connection: close\r\n\r\n");
        b.extend_from_slice(text.as_bytes());
    }

    /// Reads the next request head and starts its exchange.
    fn poll_head(&mut self, cx: &mut Context<'_>) -> Poll<Next> {
        loop {
            if !self.rbuf.is_empty() {
                if self.detect_h2 {
                    let n = self.rbuf.len().min(H2_PREFACE.len());
                    if self.rbuf[..n] != H2_PREFACE[..n] {
                        self.detect_h2 = false;
                    } else if n == H2_PREFACE.len() {
                        return Poll::Ready(Next::Handoff(true));
                    }
                }
                if !self.detect_h2 {
                    match self.parse() {
                        Ok(Some(next)) => return Poll::Ready(next),
                        Ok(None) => {}
                        Err((status, reason)) => return Poll::Ready(Next::Refuse(status, reason)),
                    }
                }
            } else if self.shutdown {
                return Poll::Ready(Next::Close);
            }
            match self.poll_fill(cx) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Next::Close),
                Poll::Ready(Ok(_)) => continue,
                Poll::Ready(Err(e)) => {
                    tracing::debug!(client.addr = %self.conn.client, error = %e, "read failed");
                    return Poll::Ready(Next::Close);
                }
                Poll::Pending => {}
            }
            // The head timer runs from the end of the previous exchange (or the accept), as
            // hyper's did: the connection's last activity, which the request path records.
            // The timer is armed once and moved only when it fires before that deadline, not
            // reset on every request.
            let since = Duration::from_millis(self.conn.last_activity_ms.load(Ordering::Relaxed));
            let deadline =
                tokio::time::Instant::from_std(self.conn.opened + since + self.limits.head_timeout);
            let timer = self
                .head_timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
            loop {
                if timer.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                if tokio::time::Instant::now() >= deadline {
                    tracing::debug!(listener = %self.conn.listener, client.addr = %self.conn.client, "request head not received within the header read timeout");
                    return Poll::Ready(Next::Close);
                }
                timer.as_mut().reset(deadline);
            }
        }
    }

    /// Parses the head at the start of the read buffer: `None` while incomplete.
    fn parse(&mut self) -> Result<Option<Next>, (StatusCode, &'static str)> {
        const TOO_LARGE: (StatusCode, &str) = (
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "request-header-too-large",
        );
        const BAD: StatusCode = StatusCode::BAD_REQUEST;
        let max = self.limits.max_headers;
        let mut stack = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; STACK_HEADERS];
        let mut heap = Vec::new();
        let slots: &mut [MaybeUninit<httparse::Header<'_>>] = if max <= STACK_HEADERS {
            &mut stack[..max]
        } else {
            heap.resize_with(max, MaybeUninit::uninit);
            &mut heap
        };
        let mut req = httparse::Request::new(&mut []);
        let n = match httparse::ParserConfig::default()
            .parse_request_with_uninit_headers(&mut req, &self.rbuf, slots)
        {
            Ok(httparse::Status::Complete(n)) if n <= self.limits.max_head => n,
            Ok(httparse::Status::Partial) if self.rbuf.len() <= self.limits.max_head => return Ok(None),
            Ok(_) | Err(httparse::Error::TooManyHeaders) => return Err(TOO_LARGE),
            Err(httparse::Error::Version) => return Err((BAD, "invalid-version")),
            Err(_) => return Err((BAD, "malformed-request-head")),
        };
        let method = Method::from_bytes(req.method.unwrap_or_default().as_bytes())
            .map_err(|_| (BAD, "invalid-method"))?;
        let http10 = req.version == Some(0);
        let base = self.rbuf.as_ptr() as usize;
        let target = req.path.unwrap_or_default();
        let (target_at, target_len) = (target.as_ptr() as usize - base, target.len());
        let mut fields: smallvec::SmallVec<[(usize, usize, usize, usize); 24]> = smallvec::SmallVec::new();
        let mut f = Framed::default();
        let (mut expect, mut trailers, mut upgrade) = (false, false, false);
        for h in req.headers.iter() {
            let (name, value) = (h.name.as_bytes(), h.value);
            f.note(name, value);
            match name.len() {
                6 if name.eq_ignore_ascii_case(b"expect") => {
                    expect = value.trim_ascii().eq_ignore_ascii_case(b"100-continue");
                }
                2 if name.eq_ignore_ascii_case(b"te") => {
                    trailers |= value
                        .split(|b| *b == b',')
                        .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"trailers"));
                }
                7 if name.eq_ignore_ascii_case(b"upgrade") => upgrade = true,
                _ => {}
            }
            fields.push((
                name.as_ptr() as usize - base,
                name.len(),
                value.as_ptr() as usize - base,
                value.len(),
            ));
        }
        // Framing: what a smuggler would play on, refused outright (as nginx does).
        if f.transfer_encoding && f.length.is_some() {
            return Err((BAD, "content-length-and-transfer-encoding"));
        }
        if f.error.is_some() || f.repeated_length {
            return Err((BAD, "invalid-framing"));
        }
        if f.transfer_encoding && (!f.chunked || http10) {
            return Err((BAD, "unsupported-transfer-encoding"));
        }
        if upgrade || method == Method::CONNECT {
            // Nothing reads this connection's heads after this one: unless the request
            // becomes a tunnel, the connection closes after its answer (see `proxy::handle`).
            let index = self.conn.requests.load(Ordering::Relaxed) + 1;
            self.conn.handed_off_at.store(index, Ordering::Relaxed);
            return Ok(Some(Next::Handoff(false)));
        }
        let head = self.rbuf.split_to(n).freeze();
        let uri = Uri::from_maybe_shared(head.slice(target_at..target_at + target_len))
            .map_err(|_| (BAD, "invalid-target"))?;
        let mut headers = HeaderMap::with_capacity(fields.len() + 4);
        // By reference: moving the inline array into an iterator copied it (~800 bytes).
        for &(ns, nl, vs, vl) in fields.iter() {
            let name =
                HeaderName::from_bytes(&head[ns..ns + nl]).map_err(|_| (BAD, "invalid-header-name"))?;
            let value = HeaderValue::from_maybe_shared(head.slice(vs..vs + vl))
                .map_err(|_| (BAD, "invalid-header-value"))?;
            headers.append(name, value);
        }
        let keep_alive = if http10 {
            f.keep_alive && !f.close
        } else {
            !f.close
        };
        let decoder = if f.chunked {
            Decoder::Chunked(Chunk::Size)
        } else {
            match f.length {
                None | Some(0) => Decoder::Done,
                Some(n) => Decoder::Length(n),
            }
        };
        let (body, chan) = match decoder {
            Decoder::Done => (RequestBody::empty(), None),
            _ => {
                let chan = Arc::new(Chan::default());
                let remaining = match decoder {
                    Decoder::Length(n) => Some(n),
                    _ => None,
                };
                (
                    RequestBody {
                        chan: Some(chan.clone()),
                        remaining,
                        ended: false,
                    },
                    Some(chan),
                )
            }
        };
        let mut r = Request::new(body);
        *r.method_mut() = method;
        *r.uri_mut() = uri;
        *r.version_mut() = if http10 {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        };
        *r.headers_mut() = headers;
        let head_request = r.method() == Method::HEAD;
        self.x = Some(Exchange {
            body: chan,
            decoder,
            chunk_ext: 0,
            expect: expect && !http10,
            resp: None,
            keep_alive,
            head_request,
            http10,
            trailers,
        });
        let fut = (self.service)(r);
        self.in_flight.set(Some(fut));
        Ok(Some(Next::Exchange))
    }

    /// Drives the exchange in flight: `Ok(keep_alive)` once its response is written.
    fn poll_exchange(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        loop {
            let mut progress = false;
            let x = self.x.as_mut().expect("an exchange is in flight");
            if x.resp.is_none() {
                if let Some(fut) = self.in_flight.as_mut().as_pin_mut() {
                    if let Poll::Ready(reply) = fut.poll(cx) {
                        self.in_flight.set(None);
                        let x = self.x.as_mut().expect("exchange");
                        // A body nobody will read, not all here yet: the client learns from
                        // the head that the connection closes after this answer.
                        let abandoned = !matches!(x.decoder, Decoder::Done)
                            && x.body
                                .as_ref()
                                .is_none_or(|c| c.slot.lock().expect("chan lock").dropped);
                        if abandoned && discard_buffered(x, &mut self.rbuf) {
                            x.body = None;
                        }
                        let unread = abandoned && !matches!(x.decoder, Decoder::Done);
                        start_response(&mut self.out.buf, x, reply, self.shutdown || unread);
                        progress = true;
                    }
                }
            }
            // The request body: hand out what is read; read more only when asked.
            let x = self.x.as_mut().expect("exchange");
            let mut reading = false;
            if let Some(chan) = x.body.clone() {
                match self.feed(&chan, cx) {
                    Feed::Progress => progress = true,
                    Feed::Reading => reading = true,
                    Feed::Idle => {}
                }
            } else if x.resp.is_none() && self.rbuf.is_empty() {
                // Waiting for the response with the request read: a client that closes now
                // has gone away, and its exchange is dropped (hyper's server did the same).
                match self.poll_fill(cx) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into())),
                    Poll::Ready(Ok(_)) => progress = true,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {}
                }
            }
            // The response body: gather what is ready, so a head and a small body go in one
            // write; then write.
            let x = self.x.as_mut().expect("exchange");
            if let Some(s) = x.resp.as_mut() {
                while s.enc != Enc::Done && self.out.buf.len() < COPY_DATA && self.out.data.is_empty() {
                    match Pin::new(&mut s.body).poll_frame(cx) {
                        Poll::Pending => break,
                        Poll::Ready(Some(Ok(frame))) => {
                            progress = true;
                            if let Err(e) = encode(&mut self.out, s, frame, x.trailers) {
                                tracing::debug!(client.addr = %self.conn.client, error = %e, "response body does not match its framing");
                                x.keep_alive = false;
                                s.enc = Enc::Done;
                                return Poll::Ready(Ok(false));
                            }
                            if s.enc != Enc::Done && s.body.is_end_stream() {
                                finish(&mut self.out.buf, s)?;
                            }
                        }
                        Poll::Ready(None) => {
                            progress = true;
                            finish(&mut self.out.buf, s)?;
                        }
                        Poll::Ready(Some(Err(e))) => {
                            // The client cannot be told in HTTP/1.1: the response is cut
                            // short (no last chunk) and the connection closed.
                            tracing::debug!(client.addr = %self.conn.client, error = %e, "response body failed; closing the connection");
                            x.keep_alive = false;
                            s.enc = Enc::Done;
                            return Poll::Ready(Ok(false));
                        }
                    }
                }
            }
            if !self.out.is_empty() || self.unflushed {
                match self.poll_out(cx) {
                    Poll::Ready(Ok(())) => progress = true,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => self.wrote_late = true,
                }
            }
            let x = self.x.as_mut().expect("exchange");
            if let Some(s) = &x.resp {
                if s.enc == Enc::Done && self.out.is_empty() && !self.unflushed {
                    // A request body not read to its end leaves the connection in doubt,
                    // unless the rest of it is already here to be dropped.
                    let whole = matches!(x.decoder, Decoder::Done) || discard_buffered(x, &mut self.rbuf);
                    return Poll::Ready(Ok(x.keep_alive && whole && !self.shutdown));
                }
            }
            if !progress {
                // Asleep until the socket, the request path or the body's reader wakes it.
                if let Some(chan) = &x.body {
                    let mut s = chan.slot.lock().expect("chan lock");
                    // Asked for more after `feed` looked: look again.
                    if (s.want && s.frame.is_none() && !reading) || s.dropped {
                        continue;
                    }
                    s.server = Some(cx.waker().clone());
                }
                return Poll::Pending;
            }
        }
    }

    /// Hands the request body's next frame to its reader, reading the socket if the reader
    /// waits for one.
    fn feed(&mut self, chan: &Arc<Chan>, cx: &mut Context<'_>) -> Feed {
        let x = self.x.as_mut().expect("exchange");
        let s = chan.slot.lock().expect("chan lock");
        if s.dropped {
            // Nobody will read the rest (the upstream answered first, or the request
            // failed): the connection closes after the response.
            x.body = None;
            return Feed::Progress;
        }
        if s.frame.is_some() {
            return Feed::Idle;
        }
        let put = match x.decoder.step(&mut self.rbuf, &mut x.chunk_ext) {
            Ok(Step::Frame(frame)) => Some(Ok(frame)),
            Ok(Step::End) => None,
            Err(e) => Some(Err(e)),
            Ok(Step::More) => {
                if !s.want {
                    return Feed::Idle;
                }
                drop(s);
                if x.expect {
                    x.expect = false;
                    if x.resp.is_none() {
                        self.out.buf.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
                    }
                }
                return match self.poll_fill(cx) {
                    Poll::Ready(Ok(0)) => {
                        self.end_body(
                            chan,
                            Some("client closed the connection before the end of the request body".into()),
                            cx,
                        );
                        Feed::Progress
                    }
                    Poll::Ready(Ok(_)) => Feed::Progress,
                    Poll::Ready(Err(e)) => {
                        self.end_body(chan, Some(format!("reading the request body: {e}")), cx);
                        Feed::Progress
                    }
                    Poll::Pending => Feed::Reading,
                };
            }
        };
        drop(s);
        match put {
            Some(Ok(frame)) => {
                let done = matches!(x.decoder, Decoder::Done);
                if done {
                    x.body = None;
                }
                let mut s = chan.slot.lock().expect("chan lock");
                s.frame = Some(frame);
                s.want = false;
                if done {
                    s.end = Some(Ok(()));
                }
                let w = s.reader.take();
                drop(s);
                wake_other(w, cx);
            }
            Some(Err(e)) => self.end_body(chan, Some(format!("request body: {e}")), cx),
            None => self.end_body(chan, None, cx),
        }
        Feed::Progress
    }

    fn end_body(&mut self, chan: &Arc<Chan>, error: Option<String>, cx: &mut Context<'_>) {
        let x = self.x.as_mut().expect("exchange");
        x.body = None;
        if error.is_some() {
            x.keep_alive = false;
            x.decoder = Decoder::Eof;
        }
        let mut s = chan.slot.lock().expect("chan lock");
        s.end = Some(error.map_or(Ok(()), Err));
        let w = s.reader.take();
        drop(s);
        wake_other(w, cx);
    }
}

/// Drops what of an unread request body is already in `rbuf`: whether that was all of it (the
/// connection can then read the next request).
fn discard_buffered(x: &mut Exchange, rbuf: &mut BytesMut) -> bool {
    loop {
        match x.decoder.step(rbuf, &mut x.chunk_ext) {
            Ok(Step::Frame(_)) => {}
            Ok(Step::End) => {
                x.decoder = Decoder::Done;
                return true;
            }
            Ok(Step::More) | Err(_) => return false,
        }
    }
}

impl Drop for Exchange {
    /// A request body still being read when its exchange ends (the client went, the response
    /// ended first, the connection was dropped) fails for its reader, which may be another
    /// task (an HTTP/2 upstream's): left pending, it would hold that stream open for ever.
    fn drop(&mut self) {
        if let Some(chan) = self.body.take() {
            let mut s = chan.slot.lock().expect("chan lock");
            if s.end.is_none() {
                s.end = Some(Err("the client connection ended before the request body".into()));
            }
            let w = s.reader.take();
            drop(s);
            if let Some(w) = w {
                w.wake();
            }
        }
    }
}

/// Wakes `w` unless it is the task polling now (which goes round again anyway).
fn wake_other(w: Option<Waker>, cx: &Context<'_>) {
    if let Some(w) = w {
        if !w.will_wake(cx.waker()) {
            w.wake();
        }
    }
}

/// What feeding the request body did.
enum Feed {
    Progress,
    /// Waiting for the socket.
    Reading,
    /// Nothing asked for, or the frame handed out not taken yet.
    Idle,
}

enum Next {
    Exchange,
    Refuse(StatusCode, &'static str),
    Close,
    Handoff(bool),
}

/// Queues the response head and decides how its body is framed.
fn start_response(buf: &mut BytesMut, x: &mut Exchange, reply: Reply, shutdown: bool) {
    let (parts, body) = reply.response.into_parts();
    let status = parts.status;
    let mut close = !x.keep_alive || shutdown;
    let raw = reply.raw.as_ref();
    buf.reserve(256 + parts.headers.len() * 32);
    let reason = match raw {
        Some(r) => r.reason(),
        None => parts
            .extensions
            .get::<hyper::ext::ReasonPhrase>()
            .map(|p| p.as_bytes()),
    };
    write_status(buf, status, reason);
    let bodiless = x.head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    // A head kept as it came has nothing to take out (see `RawHead`): its fields go first.
    let (mut length, mut date) = match raw {
        Some(r) => r.write_fields(buf),
        None => (None, false),
    };
    for (name, value) in &parts.headers {
        if *name == header::CONNECTION {
            close |= value
                .as_bytes()
                .split(|b| *b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
            continue;
        }
        if *name == header::TRANSFER_ENCODING {
            continue;
        }
        if *name == header::CONTENT_LENGTH {
            // One valid number, or the field is not sent (and the body framed below).
            let n = parse_length(value.as_bytes());
            if n.is_none()
                || length.is_some()
                || status == StatusCode::NO_CONTENT
                || status.is_informational()
            {
                continue;
            }
            length = n;
        }
        date |= *name == header::DATE;
        write_field(buf, name, value);
    }
    if !date {
        write_date(buf);
    }
    let enc = if bodiless {
        if body.is_end_stream() {
            Enc::Done
        } else {
            Enc::Discard
        }
    } else if let Some(n) = length {
        if n == 0 {
            Enc::Done
        } else {
            Enc::Length(n)
        }
    } else if body.is_end_stream() {
        write_length(buf, 0);
        Enc::Done
    } else if let Some(n) = body.size_hint().exact() {
        write_length(buf, n);
        if n == 0 {
            Enc::Done
        } else {
            Enc::Length(n)
        }
    } else if !x.http10 {
        buf.extend_from_slice(b"transfer-encoding: chunked\r\n");
        Enc::Chunked
    } else {
        close = true;
        Enc::Eof
    };
    if close {
        buf.extend_from_slice(b"connection: close\r\n");
    } else if x.http10 {
        buf.extend_from_slice(b"connection: keep-alive\r\n");
    }
    buf.extend_from_slice(b"\r\n");
    x.keep_alive = !close;
    // A body with nothing to send still runs to its end (the access log, metrics and the
    // upstream connection's return to its pool follow it).
    x.resp = Some(Sending { body, enc });
}

/// Queues one frame of the response body in its framing.
fn encode(out: &mut Outbox, s: &mut Sending, frame: Frame<Bytes>, trailers_ok: bool) -> Result<(), String> {
    match frame.into_data() {
        Ok(data) => match &mut s.enc {
            Enc::Length(left) => {
                let n = data.len() as u64;
                if n > *left {
                    return Err("response body longer than its content-length".into());
                }
                *left -= n;
                out.data(data, false);
                if *left == 0 {
                    s.enc = Enc::Done;
                }
            }
            Enc::Chunked => {
                if !data.is_empty() {
                    use std::fmt::Write;
                    let _ = write!(out.buf, "{:x}\r\n", data.len());
                    out.data(data, true);
                }
            }
            Enc::Eof => out.data(data, false),
            Enc::Discard | Enc::Done => {}
        },
        Err(frame) => {
            let Ok(trailers) = frame.into_trailers() else {
                return Ok(());
            };
            if s.enc == Enc::Chunked {
                // Sent to a client that said it takes them (`TE: trailers`), as hyper did.
                write_last_chunk(&mut out.buf, trailers_ok.then_some(&trailers));
                s.enc = Enc::Done;
            } else if let Enc::Length(n) = s.enc {
                return Err(format!(
                    "response body ended {n} bytes short of its content-length"
                ));
            }
            s.enc = Enc::Done;
        }
    }
    Ok(())
}

/// The response body has ended: the last chunk, or a check that the length was all sent.
fn finish(buf: &mut BytesMut, s: &mut Sending) -> io::Result<()> {
    match s.enc {
        Enc::Chunked => write_last_chunk(buf, None),
        Enc::Length(n) if n > 0 => {
            return Err(io::Error::other(format!(
                "response body ended {n} bytes short of its content-length"
            )))
        }
        _ => {}
    }
    s.enc = Enc::Done;
    Ok(())
}

fn write_status(buf: &mut BytesMut, status: StatusCode, reason: Option<&[u8]>) {
    buf.extend_from_slice(b"HTTP/1.1 ");
    buf.extend_from_slice(status.as_str().as_bytes());
    buf.extend_from_slice(b" ");
    match reason {
        Some(r) => buf.extend_from_slice(r),
        None => buf.extend_from_slice(status.canonical_reason().unwrap_or("Unknown").as_bytes()),
    }
    buf.extend_from_slice(b"\r\n");
}

fn write_length(buf: &mut BytesMut, n: u64) {
    buf.extend_from_slice(b"content-length: ");
    buf.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
    buf.extend_from_slice(b"\r\n");
}

/// `date: <IMF-fixdate>`, formatted once a second per thread.
fn write_date(buf: &mut BytesMut) {
    thread_local! {
        static DATE: std::cell::RefCell<(u64, [u8; 29])> = const { std::cell::RefCell::new((0, [0; 29])) };
    }
    let now = std::time::SystemTime::now();
    let secs = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    DATE.with(|d| {
        let mut d = d.borrow_mut();
        if d.0 != secs {
            let s = httpdate::fmt_http_date(now);
            if s.len() == 29 {
                d.1.copy_from_slice(s.as_bytes());
                d.0 = secs;
            }
        }
        buf.extend_from_slice(b"date: ");
        buf.extend_from_slice(&d.1);
        buf.extend_from_slice(b"\r\n");
    });
}

/// Where the connection and a request body's reader meet: one frame at a time.
#[derive(Default)]
struct Chan {
    slot: Mutex<Slot>,
}

#[derive(Default)]
struct Slot {
    frame: Option<Frame<Bytes>>,
    /// The body ended: `Ok`, or why it failed.
    end: Option<Result<(), String>>,
    /// The reader waits for a frame.
    want: bool,
    reader: Option<Waker>,
    server: Option<Waker>,
    /// The reader is gone.
    dropped: bool,
}

/// A request body read off an HTTP/1.1 client connection as its reader asks for it.
pub struct RequestBody {
    chan: Option<Arc<Chan>>,
    /// `Content-Length` bodies: bytes not handed out yet.
    remaining: Option<u64>,
    ended: bool,
}

impl RequestBody {
    fn empty() -> RequestBody {
        RequestBody {
            chan: None,
            remaining: Some(0),
            ended: true,
        }
    }
}

impl http_body::Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let Some(chan) = this.chan.as_ref() else {
            return Poll::Ready(None);
        };
        let mut s = chan.slot.lock().expect("chan lock");
        if let Some(frame) = s.frame.take() {
            drop(s);
            if let (Some(r), Some(d)) = (this.remaining.as_mut(), frame.data_ref()) {
                *r = r.saturating_sub(d.len() as u64);
            }
            if frame.is_trailers() {
                this.ended = true;
            }
            return Poll::Ready(Some(Ok(frame)));
        }
        match &s.end {
            Some(Ok(())) => {
                drop(s);
                this.ended = true;
                this.chan = None;
                return Poll::Ready(None);
            }
            Some(Err(e)) => {
                let e = e.clone();
                drop(s);
                this.chan = None;
                this.ended = true;
                return Poll::Ready(Some(Err(e.into())));
            }
            None => {}
        }
        s.want = true;
        if !s.reader.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            s.reader = Some(cx.waker().clone());
        }
        let server = s.server.take();
        drop(s);
        // Not the server's own task: it looks at `want` after polling the request path.
        wake_other(server, cx);
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.remaining == Some(0)
    }

    fn size_hint(&self) -> SizeHint {
        match self.remaining {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        if let Some(chan) = self.chan.take() {
            let mut s = chan.slot.lock().expect("chan lock");
            s.dropped = true;
            let server = s.server.take();
            drop(s);
            if let Some(w) = server {
                w.wake();
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// A stream that first gives back bytes already read from it.
    pub struct Rewind<I> {
        pre: Bytes,
        #[pin]
        inner: I,
    }
}

impl<I> Rewind<I> {
    /// `inner`, with `pre` read first.
    pub fn new(inner: I, pre: Bytes) -> Rewind<I> {
        Rewind { pre, inner }
    }
}

impl<I: AsyncRead> AsyncRead for Rewind<I> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        if !this.pre.is_empty() {
            let n = this.pre.len().min(buf.remaining());
            buf.put_slice(&this.pre[..n]);
            bytes::Buf::advance(this.pre, n);
            return Poll::Ready(Ok(()));
        }
        this.inner.poll_read(cx, buf)
    }
}

impl<I: AsyncWrite> AsyncWrite for Rewind<I> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}
