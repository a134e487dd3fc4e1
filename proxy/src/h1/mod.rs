//! HTTP/1.1 as the proxy speaks it on both sides: [`client`] toward upstreams, [`server`]
//! toward clients. Both read a head with `httparse` into slices of one buffer, write a head
//! in one buffer and one `write`, and share the message-body codec here (RFC 9112, sections 6
//! and 7): `Content-Length` and `chunked` framing, trailers, and the queue of bytes to write.

pub mod client;
pub mod server;

pub use client::{H1Conn, PooledBody, SendFailed};

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http_body::Frame;
use tokio::io::{AsyncRead, AsyncWrite};

/// The largest response head (status line and header fields) read from an upstream, as
/// Envoy's default `max_response_headers_kb` (60 KiB); also the largest trailer section.
pub const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// The most header fields in a response head (hyper's and Envoy's default: 100).
pub const MAX_RESPONSE_HEADERS: usize = 100;
/// A chunk-size line longer than this (its extensions) is refused.
pub(crate) const MAX_CHUNK_LINE: usize = 4096;
/// The most bytes of chunk extensions in one body (hyper's limit).
pub(crate) const MAX_CHUNK_EXT: usize = 16 * 1024;
/// Body data up to this size is copied next to its framing (one write); larger data is
/// written from its own buffer.
pub(crate) const COPY_DATA: usize = 16 * 1024;

/// The first read's room; doubled after a read that filled it, up to [`MAX_READ`].
pub(crate) const FIRST_READ: usize = 8 * 1024;
pub(crate) const MAX_READ: usize = 256 * 1024;
/// An idle connection's read buffer keeps at most this much room.
pub(crate) const IDLE_READ_ROOM: usize = 64 * 1024;

/// How much room a connection's reads ask for: [`FIRST_READ`], doubled after a read that
/// filled it (a large body arrives in fewer, larger reads), back to it when idle.
pub(crate) struct ReadRoom(usize);

impl ReadRoom {
    pub(crate) fn new() -> ReadRoom {
        ReadRoom(FIRST_READ)
    }

    /// Reads what `io` has into `rbuf`, with room for `want` bytes (the current room if
    /// `None`): `Ok(0)` at the end of the stream.
    pub(crate) fn poll_fill<R: AsyncRead + Unpin>(
        &mut self,
        io: &mut R,
        rbuf: &mut BytesMut,
        cx: &mut Context<'_>,
        want: Option<usize>,
    ) -> Poll<io::Result<usize>> {
        let want = want.unwrap_or(self.0);
        if rbuf.capacity() - rbuf.len() < want / 2 {
            rbuf.reserve(want);
        }
        let room = rbuf.capacity() - rbuf.len();
        let n = ready!(tokio_util::io::poll_read_buf(Pin::new(io), cx, rbuf))?;
        if n == room && n >= self.0 && self.0 < MAX_READ {
            self.0 *= 2;
        }
        Poll::Ready(Ok(n))
    }

    /// Between exchanges: an empty buffer does not keep the room a large body grew it to.
    pub(crate) fn rest(&mut self, rbuf: &mut BytesMut) {
        if rbuf.is_empty() && rbuf.capacity() > IDLE_READ_ROOM {
            *rbuf = BytesMut::new();
            self.0 = FIRST_READ;
        }
    }
}

/// What Weir's HTTP/1.1 server writes for a request: the response, and beside it, when the
/// response came from Weir's HTTP/1.1 client with nothing for the proxy to take out of its head,
/// that head as it came (the response then carries only the status and version). Beside, not in
/// the response's extensions: an extension costs a map allocated, hashed into and dropped per
/// request (~350 instructions and two allocations).
pub struct Reply {
    pub response: http::Response<crate::body::Body>,
    pub raw: Option<RawHead>,
}

impl From<http::Response<crate::body::Body>> for Reply {
    fn from(response: http::Response<crate::body::Body>) -> Reply {
        Reply { response, raw: None }
    }
}

/// A response head as the upstream sent it: its bytes and where its fields lie. A response
/// going from Weir's client to Weir's server with no filter to read its head is written from
/// these bytes, with no `HeaderMap` built, hashed and dropped on the way; every other caller
/// of the client gets the map. Only heads with nothing for the proxy to take out or reframe
/// are kept so: no hop-by-hop field, at most one valid length, a status that may have a body.
#[derive(Clone)]
pub struct RawHead {
    head: Bytes,
    /// (name start, name length, value start, value length) in `head`.
    fields: smallvec::SmallVec<[(u16, u16, u16, u16); 12]>,
    /// The reason phrase, if not the status code's canonical one: (start, length).
    reason: Option<(u16, u16)>,
    /// The `x-request-id` the proxy adds, when the upstream sent none.
    pub request_id: Option<HeaderValue>,
    /// Its `Content-Length` (one valid number, or none: see `RawHead`), as the client read it.
    length: Option<u64>,
    /// Whether it has a `Date`.
    date: bool,
}

/// Whether the field name `name` (a token, as the parsers let through) is `lower` (in
/// lowercase, of letters, digits and `-`), in any case: eight bytes at a time, where
/// `eq_ignore_ascii_case` folds each byte (~5 instructions a byte).
pub(crate) fn is_name(name: &[u8], lower: &[u8]) -> bool {
    // Setting bit 5 lowercases a letter and leaves digits and `-` as they are; of the bytes
    // it turns into one of those, none is a token character (CR, controls).
    const FOLD: u64 = 0x2020_2020_2020_2020;
    debug_assert!(lower
        .iter()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-'));
    if name.len() != lower.len() {
        return false;
    }
    let (mut a, mut b) = (name.chunks_exact(8), lower.chunks_exact(8));
    for (x, y) in (&mut a).zip(&mut b) {
        let word = |c: &[u8]| u64::from_le_bytes(c.try_into().expect("eight bytes"));
        if word(x) | FOLD != word(y) {
            return false;
        }
    }
    a.remainder()
        .iter()
        .zip(b.remainder())
        .all(|(x, y)| x | 0x20 == *y)
}

/// Whether a field of this name is the proxy's to remove (hop-by-hop, RFC 9110 §7.6.1): the
/// names of `proxy::strip_hop_by_hop`, without a map.
pub(crate) fn is_hop_by_hop(name: &[u8]) -> bool {
    let is = |n: &[u8]| is_name(name, n);
    match name.len() {
        2 => is(b"te"),
        7 => is(b"upgrade"),
        10 => is(b"connection") || is(b"keep-alive"),
        16 => is(b"proxy-connection"),
        17 => is(b"transfer-encoding"),
        18 => is(b"proxy-authenticate"),
        19 => is(b"proxy-authorization"),
        _ => false,
    }
}

impl RawHead {
    /// A head of `head`'s bytes; `fields` and `reason` are places in them.
    pub(crate) fn new(
        head: Bytes,
        fields: smallvec::SmallVec<[(u16, u16, u16, u16); 12]>,
        reason: Option<(u16, u16)>,
        length: Option<u64>,
        date: bool,
    ) -> RawHead {
        RawHead {
            head,
            fields,
            reason,
            request_id: None,
            length,
            date,
        }
    }

    /// Each field's name and value, as sent.
    pub fn fields(&self) -> impl Iterator<Item = (&[u8], &[u8])> + '_ {
        self.fields.iter().map(|&(ns, nl, vs, vl)| {
            let (ns, nl, vs, vl) = (ns as usize, nl as usize, vs as usize, vl as usize);
            (&self.head[ns..ns + nl], &self.head[vs..vs + vl])
        })
    }

    /// Whether it has a field `name` (in lowercase: letters, digits and `-`).
    pub fn has(&self, name: &[u8]) -> bool {
        self.fields().any(|(n, _)| is_name(n, name))
    }

    /// The reason phrase the upstream sent, if not the canonical one.
    pub fn reason(&self) -> Option<&[u8]> {
        self.reason
            .map(|(at, len)| &self.head[at as usize..at as usize + len as usize])
    }

    /// Queues its fields (names in lowercase, as `HeaderMap` writes them) and the added
    /// `x-request-id`. Returns the length field's value, and whether it had a `date`.
    pub(crate) fn write_fields(&self, buf: &mut BytesMut) -> (Option<u64>, bool) {
        for (name, value) in self.fields() {
            let at = buf.len();
            buf.extend_from_slice(name);
            buf[at..].make_ascii_lowercase();
            buf.extend_from_slice(b": ");
            buf.extend_from_slice(value);
            buf.extend_from_slice(b"\r\n");
        }
        if let Some(id) = &self.request_id {
            buf.extend_from_slice(b"x-request-id: ");
            buf.extend_from_slice(id.as_bytes());
            buf.extend_from_slice(b"\r\n");
        }
        (self.length, self.date)
    }
}

/// Queues one header field line.
pub(crate) fn write_field(buf: &mut BytesMut, name: &HeaderName, value: &HeaderValue) {
    buf.extend_from_slice(name.as_str().as_bytes());
    buf.extend_from_slice(b": ");
    buf.extend_from_slice(value.as_bytes());
    buf.extend_from_slice(b"\r\n");
}

/// Queues the last chunk of a chunked body with the trailer fields of `trailers` that may be
/// trailers (none if `None`).
pub(crate) fn write_last_chunk(buf: &mut BytesMut, trailers: Option<&HeaderMap>) {
    buf.extend_from_slice(b"0\r\n");
    for (name, value) in trailers.into_iter().flatten() {
        if allowed_in_trailers(name) {
            write_field(buf, name, value);
        }
    }
    buf.extend_from_slice(b"\r\n");
}

/// What is to be written, in order: `buf` from `pos`, then `data`, then a CRLF if `crlf`.
#[derive(Default)]
pub(crate) struct Outbox {
    pub(crate) buf: BytesMut,
    pub(crate) pos: usize,
    pub(crate) data: Bytes,
    pub(crate) crlf: bool,
}

impl Outbox {
    pub(crate) fn is_empty(&self) -> bool {
        self.pos == self.buf.len() && self.data.is_empty() && !self.crlf
    }

    /// Queues body data, with a CRLF after it (a chunk's end) if `crlf`.
    pub(crate) fn data(&mut self, data: Bytes, crlf: bool) {
        if data.len() <= COPY_DATA {
            self.buf.extend_from_slice(&data);
            if crlf {
                self.buf.extend_from_slice(b"\r\n");
            }
        } else {
            self.data = data;
            self.crlf = crlf;
        }
    }
}

impl Outbox {
    /// Writes everything queued to `io`; `wrote` is set once a byte went (a TLS stream may
    /// hold it until flushed).
    pub(crate) fn poll_write_to<W: AsyncWrite + Unpin>(
        &mut self,
        io: &mut W,
        cx: &mut Context<'_>,
        wrote: &mut bool,
    ) -> Poll<io::Result<()>> {
        loop {
            while self.pos < self.buf.len() {
                let n = if self.data.is_empty() || !io.is_write_vectored() {
                    ready!(Pin::new(&mut *io).poll_write(cx, &self.buf[self.pos..]))?
                } else {
                    let bufs = [
                        io::IoSlice::new(&self.buf[self.pos..]),
                        io::IoSlice::new(&self.data),
                    ];
                    ready!(Pin::new(&mut *io).poll_write_vectored(cx, &bufs))?
                };
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                *wrote = true;
                let in_buf = n.min(self.buf.len() - self.pos);
                self.pos += in_buf;
                self.data.advance(n - in_buf);
            }
            self.buf.clear();
            self.pos = 0;
            while !self.data.is_empty() {
                let n = ready!(Pin::new(&mut *io).poll_write(cx, &self.data))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                *wrote = true;
                self.data.advance(n);
            }
            if !std::mem::take(&mut self.crlf) {
                return Poll::Ready(Ok(()));
            }
            self.buf.extend_from_slice(b"\r\n");
        }
    }
}

/// How a message body is read off the connection.
pub(crate) enum Decoder {
    /// `Content-Length`: this many bytes still to read.
    Length(u64),
    Chunked(Chunk),
    /// Until the peer closes the connection (responses only).
    Eof,
    /// The body has ended (or there is none).
    Done,
}

#[derive(Clone, Copy)]
pub(crate) enum Chunk {
    Size,
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    Trailers,
}

/// What the next step of decoding a body gives.
pub(crate) enum Step {
    Frame(Frame<Bytes>),
    /// More bytes must be read first.
    More,
    /// The body has ended.
    End,
}

impl Decoder {
    /// Decodes the next frame from the start of `rbuf`, consuming what it uses; `ext` counts
    /// the body's chunk-extension bytes. Data frames are slices of `rbuf`, never copies.
    pub(crate) fn step(&mut self, rbuf: &mut BytesMut, ext: &mut usize) -> Result<Step, String> {
        loop {
            return Ok(match self {
                Decoder::Done => Step::End,
                Decoder::Length(left) => {
                    if rbuf.is_empty() {
                        Step::More
                    } else {
                        let n = (*left).min(rbuf.len() as u64);
                        *left -= n;
                        let data = rbuf.split_to(n as usize).freeze();
                        if *left == 0 {
                            *self = Decoder::Done;
                        }
                        Step::Frame(Frame::data(data))
                    }
                }
                Decoder::Eof if rbuf.is_empty() => Step::More,
                Decoder::Eof => Step::Frame(Frame::data(rbuf.split().freeze())),
                Decoder::Chunked(state) => match *state {
                    Chunk::Size => match httparse::parse_chunk_size(rbuf) {
                        Ok(httparse::Status::Complete((used, size))) if rbuf[0].is_ascii_hexdigit() => {
                            // httparse takes any byte in an extension, a bare LF too, where
                            // a strict peer sees the line end: refuse controls (as hyper
                            // does), and bound the extensions of a whole body.
                            let line = &rbuf[..used - 2];
                            let e = line.iter().position(|b| *b == b';').map_or(0, |i| line.len() - i);
                            *ext += e;
                            if used > MAX_CHUNK_LINE
                                || *ext > MAX_CHUNK_EXT
                                || line.iter().any(|b| b.is_ascii_control() && *b != b'\t')
                            {
                                return Err("invalid chunk size line".into());
                            }
                            rbuf.advance(used);
                            *state = if size == 0 {
                                Chunk::Trailers
                            } else {
                                Chunk::Data(size)
                            };
                            continue;
                        }
                        Ok(httparse::Status::Partial) if rbuf.len() <= MAX_CHUNK_LINE => Step::More,
                        _ => return Err("invalid chunk size".into()),
                    },
                    Chunk::Data(left) => {
                        if rbuf.is_empty() {
                            Step::More
                        } else {
                            let n = left.min(rbuf.len() as u64);
                            let data = rbuf.split_to(n as usize).freeze();
                            *state = if left == n {
                                Chunk::DataEnd
                            } else {
                                Chunk::Data(left - n)
                            };
                            Step::Frame(Frame::data(data))
                        }
                    }
                    Chunk::DataEnd => {
                        if rbuf.len() < 2 {
                            Step::More
                        } else if &rbuf[..2] == b"\r\n" {
                            rbuf.advance(2);
                            *state = Chunk::Size;
                            continue;
                        } else {
                            return Err("chunk data not followed by CRLF".into());
                        }
                    }
                    Chunk::Trailers => match trailers(rbuf) {
                        Ok(Some(t)) => {
                            *self = Decoder::Done;
                            match t {
                                Some(map) => Step::Frame(Frame::trailers(map)),
                                None => Step::End,
                            }
                        }
                        Ok(None) => Step::More,
                        Err(e) => return Err(e),
                    },
                },
            });
        }
    }
}

/// What a message head says of its framing and of its connection.
#[derive(Default)]
pub(crate) struct Framed {
    pub(crate) length: Option<u64>,
    /// `Content-Length` came as a list or in more than one field (valid only if the values
    /// agree; a request with it is refused, as nginx does).
    pub(crate) repeated_length: bool,
    pub(crate) transfer_encoding: bool,
    /// The transfer coding is `chunked` (no other is accepted).
    pub(crate) chunked: bool,
    pub(crate) close: bool,
    pub(crate) keep_alive: bool,
    /// The first field that cannot frame a body.
    pub(crate) error: Option<String>,
}

impl Framed {
    pub(crate) fn note(&mut self, name: &[u8], value: &[u8]) {
        if let Err(e) = self.framing(name, value) {
            self.error.get_or_insert(e);
        }
    }

    pub(crate) fn framing(&mut self, name: &[u8], value: &[u8]) -> Result<(), String> {
        // Most fields are none of the three: their length says so without a comparison.
        if !matches!(name.len(), 10 | 14 | 17) {
            return Ok(());
        }
        if is_name(name, b"content-length") {
            let n = parse_length(value).ok_or("invalid content-length")?;
            if self.length.is_some_and(|l| l != n) {
                return Err("conflicting content-length values".into());
            }
            self.repeated_length |= self.length.is_some() || value.contains(&b',');
            self.length = Some(n);
        } else if is_name(name, b"transfer-encoding") {
            self.transfer_encoding = true;
            for coding in value.split(|b| *b == b',').map(<[u8]>::trim_ascii) {
                if coding.is_empty() {
                    continue;
                }
                // Only chunked, once: the proxy removes the field (hop-by-hop), so another
                // coding would reach the client unlabelled.
                if self.chunked || !coding.eq_ignore_ascii_case(b"chunked") {
                    return Err(format!(
                        "unsupported transfer-encoding {:?}",
                        String::from_utf8_lossy(value)
                    ));
                }
                self.chunked = true;
            }
        } else if is_name(name, b"connection") {
            for t in value.split(|b| *b == b',').map(<[u8]>::trim_ascii) {
                self.close |= t.eq_ignore_ascii_case(b"close");
                self.keep_alive |= t.eq_ignore_ascii_case(b"keep-alive");
            }
        }
        Ok(())
    }
}

/// A `Content-Length` value: digits, or a list of equal numbers (RFC 9110 §8.6).
pub(crate) fn parse_length(v: &[u8]) -> Option<u64> {
    // The usual value, one number, without the list's splitting and trimming.
    if let Some(n) = number(v) {
        return Some(n);
    }
    let mut found: Option<u64> = None;
    for part in v.split(|b| *b == b',').map(<[u8]>::trim_ascii) {
        let n = number(part)?;
        if found.is_some_and(|f| f != n) {
            return None;
        }
        found = Some(n);
    }
    found
}

/// A decimal number of 1 to 19 digits (no sign, no space): what fits a `u64` unchecked.
fn number(v: &[u8]) -> Option<u64> {
    (!v.is_empty() && v.len() <= 19 && v.iter().all(u8::is_ascii_digit))
        .then(|| v.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')))
}

/// Fields a trailer section must not carry (RFC 9110 §6.5.1): framing, routing, connection.
pub(crate) fn allowed_in_trailers(name: &HeaderName) -> bool {
    !matches!(
        name.as_str(),
        "content-length"
            | "transfer-encoding"
            | "host"
            | "connection"
            | "keep-alive"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "upgrade"
    )
}

/// The trailer section at the start of `buf` (after the last chunk), consumed: `Ok(None)`
/// while incomplete, `Ok(Some(None))` when empty.
#[allow(clippy::option_option)]
pub(crate) fn trailers(buf: &mut BytesMut) -> Result<Option<Option<HeaderMap>>, String> {
    if buf.len() < 2 {
        return Ok(None);
    }
    if &buf[..2] == b"\r\n" {
        buf.advance(2);
        return Ok(Some(None));
    }
    let mut slots = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
    match httparse::parse_headers(buf, &mut slots) {
        Ok(httparse::Status::Complete((n, _))) if n > MAX_RESPONSE_HEAD => Err("trailers too large".into()),
        // httparse ends lines at a bare LF too, where chunk lines need CRLF: a peer that
        // reads strictly would see another end of the message (`0\r\n\nGET ...`).
        Ok(httparse::Status::Complete((n, _)))
            if buf[..n]
                .iter()
                .enumerate()
                .any(|(i, b)| *b == b'\n' && (i == 0 || buf[i - 1] != b'\r')) =>
        {
            Err("trailer section with a bare LF".into())
        }
        Ok(httparse::Status::Complete((n, fields))) => {
            let mut map = HeaderMap::with_capacity(fields.len());
            for h in fields {
                let (Ok(name), Ok(value)) = (
                    HeaderName::from_bytes(h.name.as_bytes()),
                    HeaderValue::from_bytes(h.value),
                ) else {
                    return Err("invalid trailer field".into());
                };
                if allowed_in_trailers(&name) {
                    map.append(name, value);
                }
            }
            buf.advance(n);
            Ok(Some((!map.is_empty()).then_some(map)))
        }
        Ok(httparse::Status::Partial) if buf.len() <= MAX_RESPONSE_HEAD => Ok(None),
        Ok(httparse::Status::Partial) => Err("trailers too large".into()),
        Err(e) => Err(format!("invalid trailers: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_length_values() {
        assert_eq!(parse_length(b"42"), Some(42));
        assert_eq!(parse_length(b"42, 42"), Some(42));
        assert_eq!(parse_length(b"42, 43"), None);
        assert_eq!(parse_length(b"-1"), None);
        assert_eq!(parse_length(b"+1"), None);
        assert_eq!(parse_length(b""), None);
        assert_eq!(parse_length(b"99999999999999999999"), None);
    }

    #[test]
    fn field_names_match_in_any_case_and_only_themselves() {
        for (name, yes) in [
            (&b"content-length"[..], true),
            (b"Content-Length", true),
            (b"CONTENT-LENGTH", true),
            (b"content-lengtH", true),
            (b"content_length", false),
            (b"content-lengt", false),
            (b"content-lengths", false),
            (b"kontent-length", false),
            (b"content-lengTi", false),
        ] {
            assert_eq!(
                is_name(name, b"content-length"),
                yes,
                "{}",
                String::from_utf8_lossy(name)
            );
            assert_eq!(name.eq_ignore_ascii_case(b"content-length"), yes);
        }
        // Shorter than a word, and exactly two words.
        assert!(is_name(b"TE", b"te") && !is_name(b"tf", b"te"));
        assert!(is_name(b"X-Forwarded-Prot", b"x-forwarded-prot"));
        // `@` to `_` fold to no letter; CR folds to `-`, but no parser lets one into a name.
        assert!(!is_name(b"content-lengt@", b"content-length"));
        assert!(!is_name(b"content-lengt_", b"content-length"));
    }

    #[test]
    fn trailer_sections_end_at_crlf_only() {
        let mut ok = BytesMut::from(&b"x-sum: 1\r\n\r\nNEXT"[..]);
        let t = trailers(&mut ok).unwrap().unwrap().unwrap();
        assert_eq!(t["x-sum"], "1");
        assert_eq!(&ok[..], b"NEXT");
        for bad in [
            &b"\nGET / HTTP/1.1\r\n\r\n"[..],
            b"x-sum: 1\n\r\n",
            b"x-sum: 1\r\n\n",
        ] {
            assert!(
                trailers(&mut BytesMut::from(bad)).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn transfer_codings() {
        let mut f = Framed::default();
        f.framing(b"Transfer-Encoding", b" Chunked ").unwrap();
        assert!(f.transfer_encoding && f.chunked);
        assert!(
            f.framing(b"transfer-encoding", b"chunked").is_err(),
            "chunked twice"
        );
        assert!(Framed::default()
            .framing(b"transfer-encoding", b"gzip, chunked")
            .is_err());
        assert!(Framed::default().framing(b"transfer-encoding", b"gzip").is_err());
    }
}
