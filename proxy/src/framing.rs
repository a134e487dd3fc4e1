//! A read-side guard on HTTP/1 connections that finds request heads carrying both
//! `Content-Length` and `Transfer-Encoding`.
//!
//! hyper handles such a request safely (chunked wins, keep-alive is turned off) but removes
//! `Content-Length` before the service sees it, so the service cannot refuse it as nginx does.
//! The guard follows HTTP/1 message framing on the bytes hyper reads (head, then a sized or
//! chunked body, then the next head) and records the index of any head with both headers; the
//! request path answers that request 400 and closes. It never changes a byte, and on anything
//! it does not understand it stops looking (hyper will refuse such input itself).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Marks the index in the flag of a head the guard stopped following after: unless the
/// request path tunnels that request, it must close the connection after answering it, since
/// nothing checks the heads that follow.
pub const UNFOLLOWED: u64 = 1 << 63;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    Size { seen_digit: bool, size: u64 },
    Ext { size: u64 },
    SizeLf { size: u64 },
    Data(u64),
    DataCr,
    DataLf,
    Trailer { empty: bool },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Head,
    Body(u64),
    Chunked(Chunk),
    /// Not HTTP/1 framing we follow (h2c, upgrade, CONNECT, garbage): stop looking.
    Off,
}

/// Follows HTTP/1 framing over the bytes read from a connection.
#[derive(Debug)]
pub struct Tracker {
    state: State,
    head: Vec<u8>,
    heads: u64,
    max_head: usize,
    flag: Arc<AtomicU64>,
}

impl Tracker {
    /// `flag` receives the 1-based index of a head with both framing headers, or that index
    /// with [`UNFOLLOWED`] set for a head after which the guard stops following the
    /// connection (an upgrade or `CONNECT`, whose later bytes may be a tunnel's).
    pub fn new(max_head: usize, flag: Arc<AtomicU64>, enabled: bool) -> Tracker {
        Tracker {
            state: if enabled { State::Head } else { State::Off },
            head: Vec::new(),
            heads: 0,
            max_head,
            flag,
        }
    }

    /// Feeds bytes just read.
    pub fn feed(&mut self, data: &[u8]) {
        let mut rest = self.step(data);
        while let Some(carry) = rest {
            rest = self.step(&carry);
        }
    }

    /// Consumes bytes until they end or a head completes; returns the bytes after that head.
    fn step(&mut self, mut data: &[u8]) -> Option<Vec<u8>> {
        while !data.is_empty() {
            match self.state {
                State::Off => return None,
                State::Head if self.head.is_empty() => {
                    // Blank lines before a request line are skipped (as hyper does) and never
                    // buffered: a buffered head starts with its request line, which the
                    // incremental search below relies on.
                    let lead = data.iter().position(|&b| b != b'\r' && b != b'\n');
                    data = &data[lead.unwrap_or(data.len())..];
                    if data.is_empty() {
                        return None;
                    }
                    // The common case: the whole head is in this read; one pass over its
                    // lines finds both its end and the framing headers.
                    match scan_head(data) {
                        Some((end, head)) => {
                            self.state = self.on_head(head);
                            data = &data[end..];
                        }
                        None => {
                            if data.len() > self.max_head {
                                self.state = State::Off;
                            } else {
                                self.head.extend_from_slice(data);
                            }
                            return None;
                        }
                    }
                }
                State::Head => {
                    let from = self.head.len().saturating_sub(3);
                    self.head.extend_from_slice(data);
                    match find_head_end(&self.head, from) {
                        Some(end) => {
                            let carry = self.head.split_off(end);
                            let head = std::mem::take(&mut self.head);
                            // The end was found incrementally (a head split across reads
                            // costs one search per read, not a rescan); now its lines.
                            self.state = match scan_head(&head) {
                                Some((_, h)) => self.on_head(h),
                                None => State::Off,
                            };
                            return (!carry.is_empty()).then_some(carry);
                        }
                        None => {
                            if self.head.len() > self.max_head {
                                self.state = State::Off;
                                self.head = Vec::new();
                            }
                            return None;
                        }
                    }
                }
                State::Body(n) => {
                    let k = (n as usize).min(data.len());
                    data = &data[k..];
                    let left = n - k as u64;
                    self.state = if left == 0 { State::Head } else { State::Body(left) };
                }
                State::Chunked(c) => {
                    if let Chunk::Data(n) = c {
                        let k = (n as usize).min(data.len());
                        data = &data[k..];
                        let left = n - k as u64;
                        self.state = State::Chunked(if left == 0 {
                            Chunk::DataCr
                        } else {
                            Chunk::Data(left)
                        });
                        continue;
                    }
                    let b = data[0];
                    data = &data[1..];
                    self.state = chunk_step(c, b);
                }
            }
        }
        None
    }

    fn on_head(&mut self, head: Head) -> State {
        self.heads += 1;
        let Head {
            follow,
            cl,
            te,
            chunked,
            upgrade,
        } = head;
        if te && cl.is_some() && follow {
            self.flag.store(self.heads, Ordering::Relaxed);
            // hyper closes after this request; nothing further to follow.
            return State::Off;
        }
        if !follow || upgrade {
            self.flag.store(self.heads | UNFOLLOWED, Ordering::Relaxed);
            return State::Off;
        }
        match (te, cl) {
            (true, _) if chunked => State::Chunked(Chunk::Size {
                seen_digit: false,
                size: 0,
            }),
            (true, _) => State::Off,
            (false, Some(u64::MAX)) => State::Off,
            (false, Some(0)) | (false, None) => State::Head,
            (false, Some(n)) => State::Body(n),
        }
    }
}

/// What the guard learns from a request head.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Head {
    /// A request line this guard follows (not the h2c preface, not `CONNECT`).
    follow: bool,
    /// `Content-Length`, `u64::MAX` when unparsable.
    cl: Option<u64>,
    /// `Transfer-Encoding` present.
    te: bool,
    /// ... with `chunked` last.
    chunked: bool,
    /// `Upgrade` present.
    upgrade: bool,
}

/// Finds the end of the head at the start of `buf` (the index after its blank line; CRLF or
/// bare LF line ends; blank lines before the request line skipped, as hyper does) and reads
/// the three framing headers on the way. `None`: the head is not complete in `buf`.
///
/// Only three header names matter here, so a line scan beats a full parse; hyper does the
/// real parsing (and refuses what is malformed) on the same bytes. Lines are found with
/// `memchr`, and a name is compared only when its length is one of the three.
fn scan_head(buf: &[u8]) -> Option<(usize, Head)> {
    let mut i = buf.iter().position(|&b| b != b'\r' && b != b'\n')?;
    let mut head = Head::default();
    let mut request_line = true;
    loop {
        let nl = i + memchr::memchr(b'\n', &buf[i..])?;
        let line = &buf[i..nl];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        i = nl + 1;
        if line.is_empty() {
            return Some((i, head));
        }
        if request_line {
            request_line = false;
            head.follow = !(line.starts_with(b"PRI ") || line.starts_with(b"CONNECT "));
            continue;
        }
        let Some(colon) = memchr::memchr(b':', line) else {
            continue;
        };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        match name.len() {
            14 if name.eq_ignore_ascii_case(b"content-length") => {
                head.cl = std::str::from_utf8(value.trim_ascii())
                    .ok()
                    .and_then(|v| v.parse::<u64>().ok())
                    .or(Some(u64::MAX));
            }
            17 if name.eq_ignore_ascii_case(b"transfer-encoding") => {
                head.te = true;
                head.chunked = value
                    .rsplit(|&b| b == b',')
                    .next()
                    .is_some_and(|t| t.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            }
            7 if name.eq_ignore_ascii_case(b"upgrade") => head.upgrade = true,
            _ => {}
        }
    }
}

fn chunk_step(c: Chunk, b: u8) -> State {
    let next = match c {
        Chunk::Size { seen_digit, size } => match b {
            b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                let d = (b as char).to_digit(16).unwrap_or(0) as u64;
                match size.checked_mul(16).and_then(|s| s.checked_add(d)) {
                    Some(s) => Chunk::Size {
                        seen_digit: true,
                        size: s,
                    },
                    None => return State::Off,
                }
            }
            b';' | b' ' | b'\t' if seen_digit => Chunk::Ext { size },
            b'\r' if seen_digit => Chunk::SizeLf { size },
            b'\n' if seen_digit => return after_size(size),
            _ => return State::Off,
        },
        // Extensions run to the end of the line; their size is covered by hyper's limits.
        Chunk::Ext { size } => match b {
            b'\r' => Chunk::SizeLf { size },
            b'\n' => return after_size(size),
            _ => Chunk::Ext { size },
        },
        Chunk::SizeLf { size } => match b {
            b'\n' => return after_size(size),
            _ => return State::Off,
        },
        Chunk::Data(_) => unreachable!("handled in bulk"),
        Chunk::DataCr => match b {
            b'\r' => Chunk::DataLf,
            b'\n' => Chunk::Size {
                seen_digit: false,
                size: 0,
            },
            _ => return State::Off,
        },
        Chunk::DataLf => match b {
            b'\n' => Chunk::Size {
                seen_digit: false,
                size: 0,
            },
            _ => return State::Off,
        },
        Chunk::Trailer { empty } => match b {
            b'\n' if empty => return State::Head,
            b'\n' => Chunk::Trailer { empty: true },
            b'\r' => Chunk::Trailer { empty },
            _ => Chunk::Trailer { empty: false },
        },
    };
    State::Chunked(next)
}

fn after_size(size: u64) -> State {
    if size == 0 {
        State::Chunked(Chunk::Trailer { empty: true })
    } else {
        State::Chunked(Chunk::Data(size))
    }
}

/// End of the head (index after the blank line), accepting CRLF or bare LF line ends.
fn find_head_end(buf: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    // Skip leading blank lines before a request line (RFC 9112 §2.2), as hyper does.
    if from == 0 {
        while i < buf.len() && (buf[i] == b'\r' || buf[i] == b'\n') {
            i += 1;
        }
    }
    while i < buf.len() {
        if buf[i] == b'\n' {
            match (buf.get(i + 1), buf.get(i + 2)) {
                (Some(b'\n'), _) => return Some(i + 2),
                (Some(b'\r'), Some(b'\n')) => return Some(i + 3),
                _ => {}
            }
        }
        i += 1;
    }
    None
}

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
    /// An I/O stream whose reads feed a [`Tracker`], watched by an [`IoWatch`].
    pub struct Guarded<S> {
        #[pin]
        inner: S,
        tracker: Tracker,
        watch: Arc<IoWatch>,
    }
}

impl<S> Guarded<S> {
    /// Wraps a stream.
    pub fn new(inner: S, tracker: Tracker, watch: Arc<IoWatch>) -> Self {
        Guarded {
            inner,
            tracker,
            watch,
        }
    }
}

impl<S: AsyncRead> AsyncRead for Guarded<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let r = this.inner.poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &r {
            if this.tracker.state != State::Off {
                this.tracker.feed(&buf.filled()[before..]);
            }
            if buf.filled().len() > before && !this.watch.heard.load(Ordering::Relaxed) {
                this.watch.heard.store(true, Ordering::Relaxed);
            }
        }
        r
    }
}

impl<S: AsyncWrite> AsyncWrite for Guarded<S> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn run(chunks: &[&[u8]]) -> (u64, State) {
        let flag = Arc::new(AtomicU64::new(0));
        let mut t = Tracker::new(65536, flag.clone(), true);
        for c in chunks {
            t.feed(c);
        }
        (flag.load(Ordering::Relaxed), t.state)
    }

    #[test]
    fn flags_cl_and_te_in_either_order() {
        let a = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n";
        let b = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n";
        assert_eq!(run(&[a]).0, 1);
        assert_eq!(run(&[b]).0, 1);
    }

    #[test]
    fn bodies_are_skipped_not_parsed() {
        // The body of request 1 contains what looks like a bad head; request 2 is the bad one.
        let body = b"\r\nTransfer-Encoding: chunked\r\nContent-Length: 1\r\n\r\n";
        let first = format!(
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let chunked = b"GET /2 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;x\r\nhello\r\n0\r\nT: v\r\n\r\n";
        let third = b"GET /3 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n";
        let (flag, _) = run(&[
            first.as_bytes(),
            body,
            b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n",
            &chunked[..20],
            &chunked[20..],
            third,
        ]);
        assert_eq!(flag, 4);
        let chunked = b"GET /2 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nT: v\r\n\r\n";
        let (flag, _) = run(&[
            first.as_bytes(),
            body,
            b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n",
            &chunked[..33],
            &chunked[33..],
            third,
        ]);
        assert_eq!(flag, 4);
    }

    #[test]
    fn byte_at_a_time_is_the_same() {
        let input = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nokGET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let chunks: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(run(&chunks).0, 2);
    }

    #[test]
    fn bare_lf_ends_leading_blank_lines_and_any_case_are_read() {
        let a = b"\r\n\nPOST / HTTP/1.1\nHost: a\nCONTENT-LENGTH: 5\ntransfer-ENCODING: chunked\n\n";
        assert_eq!(run(&[a]).0, 1);
        // Split anywhere (the incremental search, then the line scan), also inside the CRLFs
        // before the request line: a split there used to end the search at those blank
        // lines and turn the guard off for the connection.
        for at in 1..a.len() {
            assert_eq!(run(&[&a[..at], &a[at..]]).0, 1, "split at {at}");
        }
    }

    #[test]
    fn only_the_three_names_count() {
        // Same lengths, other names; and a value that merely mentions the header.
        let a = b"POST / HTTP/1.1\r\nContent-Lengtx: 5\r\nTransfer-Encodinx: chunked\r\nX: Content-Length: 5\r\nContent-Length: 2\r\n\r\nokGET / HTTP/1.1\r\n\r\n";
        assert_eq!(run(&[a]), (0, State::Head));
        // A sized body is skipped, and the next head is read.
        let b = b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcGET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 1\r\n\r\n";
        assert_eq!(run(&[b]).0, 2);
    }

    #[test]
    fn upgrade_connect_and_unreadable_lengths_stop_it() {
        // After an upgrade or CONNECT the bytes may be a tunnel's: the guard stops, and says
        // at which head, so the request path closes the connection unless it tunnels.
        for head in [
            &b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n"[..],
            b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n",
        ] {
            assert_eq!(
                run(&[head]),
                (1 | UNFOLLOWED, State::Off),
                "{}",
                String::from_utf8_lossy(head)
            );
        }
        // Lengths hyper cannot read: it refuses the request and closes by itself.
        for head in [
            &b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
        ] {
            assert_eq!(run(&[head]), (0, State::Off), "{}", String::from_utf8_lossy(head));
        }
    }

    #[test]
    fn how_the_bytes_are_split_never_matters() {
        // Streams of several requests (sized, chunked with extensions and trailers, bare LF,
        // blank lines between requests); the answer for one read of the whole stream must be
        // the answer for any split of it into reads.
        let streams: [&[u8]; 4] = [
            b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\nabcd\r\n\r\nGET /b HTTP/1.1\r\nHost: a\r\n\r\nPOST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n0\r\n\r\n",
            b"POST / HTTP/1.1\nTransfer-Encoding: chunked\n\n3;ext=1\nabc\n0\nX-T: 1\n\nGET / HTTP/1.1\nContent-Length: 1\nTransfer-Encoding: chunked\n\n",
            b"\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET /x HTTP/1.1\r\nUpgrade: websocket\r\n\r\nPOST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        ];
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        for stream in streams {
            let whole = run(&[stream]);
            for _ in 0..300 {
                let mut chunks = Vec::new();
                let mut rest = stream;
                while !rest.is_empty() {
                    let k = 1 + next(rest.len().min(24));
                    chunks.push(&rest[..k]);
                    rest = &rest[k..];
                }
                assert_eq!(run(&chunks), whole, "{chunks:?}");
            }
        }
    }

    #[test]
    fn h2c_preface_turns_it_off() {
        let (flag, state) = run(&[b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"]);
        assert_eq!((flag, state), (1 | UNFOLLOWED, State::Off));
    }
}
