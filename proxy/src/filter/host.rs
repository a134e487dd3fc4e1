//! The host side of the filter ABI: what a Wasm filter's imports do.
//!
//! Each store carries a [`HostState`]; while a phase runs, the request (or response) head and
//! the request context are moved into it, the guest reads and edits them through these calls,
//! and they are moved back afterwards. Every value from the guest is untrusted: names and
//! values are parsed, hop-by-hop, framing and `host` headers are refused, clusters must
//! exist, sizes are bounded; a bad value is an `error` answer to the guest, never a panic.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use http::{request, response};
use http_body_util::BodyExt;
use wasmtime::component::ResourceTable;
use wasmtime::StoreLimits;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::bindings::types::{Error, Header, LogLevel, PeerIdentity};
use super::bindings::weir::filter::{
    log, metrics, outbound, properties, request as wreq, response as wresp, state,
};
use super::state::SharedState;
use super::{Heads, Phase, RequestContext};
use crate::cluster::{Cluster, Conn};
use crate::limits;

/// Largest outbound response body a filter may receive.
pub const MAX_OUTBOUND_BODY: usize = 1024 * 1024;

/// Most metric series one filter may create.
pub const MAX_FILTER_SERIES: usize = 1000;
/// Most labels on one series (besides `filter`).
pub const MAX_SERIES_LABELS: usize = 8;

/// Headers a filter may not set or remove: hop-by-hop, framing, and the ones the proxy owns.
const REFUSED: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "host",
];

/// The bytes of an RFC 9110 token (a header name), as a table: one load per byte.
const TOKEN: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        t[b] = c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'!' | b'#'
                    | b'$'
                    | b'%'
                    | b'&'
                    | b'\''
                    | b'*'
                    | b'+'
                    | b'-'
                    | b'.'
                    | b'^'
                    | b'_'
                    | b'`'
                    | b'|'
                    | b'~'
            );
        b += 1;
    }
    t
};

/// Parses a header name from a guest and refuses the ones the proxy manages.
pub fn guest_header_name(name: &str) -> Result<HeaderName, Error> {
    check_guest_header_name(name)?;
    HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| Error::Invalid(format!("invalid header name {name:?}")))
}

/// What a guest's header name must be: a token, and not one of the headers the proxy owns.
/// Without making a `HeaderName` (which copies a name that is not a standard one), so
/// removals, which look names up by `&str`, check names exactly as setting does.
fn check_guest_header_name(name: &str) -> Result<(), Error> {
    if name.is_empty() || name.len() > u16::MAX as usize || !name.bytes().all(|b| TOKEN[b as usize]) {
        return Err(Error::Invalid(format!("invalid header name {name:?}")));
    }
    if let Some(r) = REFUSED.iter().find(|r| name.eq_ignore_ascii_case(r)) {
        return Err(Error::Invalid(format!("header {r:?} is managed by the proxy")));
    }
    Ok(())
}

/// Parses a header value from a guest. An owned value (what a guest's call lifted) becomes
/// the header's bytes without a second copy.
pub fn guest_header_value(v: impl Into<Vec<u8>>) -> Result<HeaderValue, Error> {
    HeaderValue::from_maybe_shared(bytes::Bytes::from(v.into()))
        .map_err(|_| Error::Invalid("invalid header value".into()))
}

/// What every instance of one filter shares.
pub struct FilterShared {
    /// The filter's name.
    pub name: Arc<str>,
    /// Its key-value state.
    pub state: SharedState,
    /// Its metrics.
    pub metrics: Arc<FilterMetrics>,
    /// Clusters it may route to and call.
    pub clusters: arc_swap::ArcSwap<crate::cluster::Clusters>,
    /// Fire-and-forget sends in flight (bounded).
    pub sends: std::sync::atomic::AtomicUsize,
}

impl FilterShared {
    /// A filter's shared parts: empty state, fresh metrics.
    pub fn new(name: Arc<str>, clusters: Arc<crate::cluster::Clusters>) -> FilterShared {
        FilterShared {
            name,
            state: SharedState::default(),
            metrics: Arc::new(FilterMetrics::default()),
            clusters: arc_swap::ArcSwap::new(clusters),
            sends: std::sync::atomic::AtomicUsize::new(0),
        }
    }
}

/// Most fire-and-forget sends one filter may have in flight; more are refused.
pub const MAX_SENDS_IN_FLIGHT: usize = 1000;

/// Most per-request values one filter may keep, and the largest value.
pub const MAX_REQUEST_VALUES: usize = 32;
/// See [`MAX_REQUEST_VALUES`].
pub const MAX_REQUEST_VALUE_BYTES: usize = 4096;

/// The request being processed, in the store for one phase call. The store keeps one
/// between calls, holding empty heads and context: a header phase swaps the request's in and
/// back out (two swaps of a few hundred bytes, no empty heads built and dropped per call).
pub struct CallState {
    /// The phase running.
    pub phase: Phase,
    /// The request head (editable in `on-request-headers`).
    pub req: request::Parts,
    /// The response head, in response phases (when `has_resp`).
    pub resp: response::Parts,
    /// `resp` holds the response head (a response phase).
    pub has_resp: bool,
    /// In body phases: the heads, read-only (`req` and `resp` are then empty).
    pub heads: Option<Arc<Heads>>,
    /// The request context.
    pub ctx: RequestContext,
}

impl CallState {
    /// What a store holds between calls.
    pub fn idle() -> CallState {
        CallState {
            phase: Phase::RequestHeaders,
            req: http::Request::new(()).into_parts().0,
            resp: http::Response::new(()).into_parts().0,
            has_resp: false,
            heads: None,
            ctx: RequestContext::empty(),
        }
    }

    /// The request head this call reads.
    pub fn req(&self) -> &request::Parts {
        self.heads.as_ref().map_or(&self.req, |h| &h.req)
    }

    /// The response head this call reads, in response phases.
    pub fn resp(&self) -> Option<&response::Parts> {
        match &self.heads {
            Some(h) => h.resp.as_ref(),
            None => self.has_resp.then_some(&self.resp),
        }
    }
}

/// A store's data.
pub struct HostState {
    pub(crate) wasi: WasiCtx,
    pub(crate) table: ResourceTable,
    pub(crate) limits: StoreLimits,
    pub(crate) shared: Arc<FilterShared>,
    /// The call's request; read by the host functions only while `active`.
    pub(crate) call: CallState,
    /// A phase call is running (host functions that read the request answer nothing
    /// otherwise: `init` has no request).
    pub(crate) active: bool,
    /// Epoch ticks the running call may still use (see `WasmFilter`'s deadline callback).
    pub(crate) ticks_left: u64,
    /// Log lines the running call may still write (see [`MAX_LOG_LINES_PER_CALL`]).
    pub(crate) logs_left: u32,
}

/// Log lines one call (a phase, or instantiation with `init`) may write. Each line is at most
/// 4 KiB, but a filter logging in a loop until its CPU budget runs out wrote tens of thousands
/// per request: enough to flood the log pipeline of every proxy running it. Past the bound
/// one line says so and the rest of the call's lines are dropped.
pub const MAX_LOG_LINES_PER_CALL: u32 = 100;

/// What a call starts with in `HostState::logs_left`: its lines, and the one saying the rest
/// were dropped.
pub const LOG_QUOTA: u32 = MAX_LOG_LINES_PER_CALL + 1;

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl HostState {
    fn call(&self) -> Option<&CallState> {
        self.active.then_some(&self.call)
    }

    fn call_mut(&mut self) -> Option<&mut CallState> {
        self.active.then_some(&mut self.call)
    }

    fn request_mut(&mut self) -> Result<&mut request::Parts, Error> {
        match self.call_mut() {
            Some(c) if c.phase == Phase::RequestHeaders => Ok(&mut c.req),
            _ => Err(Error::WrongPhase),
        }
    }

    fn response_mut(&mut self) -> Result<&mut response::Parts, Error> {
        match self.call_mut() {
            Some(CallState {
                phase: Phase::ResponseHeaders,
                resp,
                has_resp: true,
                ..
            }) => Ok(resp),
            _ => Err(Error::WrongPhase),
        }
    }
}

/// Sets (or appends) a header a guest named, after checking name and value.
fn put(h: &mut http::HeaderMap, name: &str, value: Vec<u8>, append: bool) -> Result<(), Error> {
    let (n, v) = (guest_header_name(name)?, guest_header_value(value)?);
    room_for(h, &v)?;
    let done = if append {
        h.try_append(n, v).map(|_| ())
    } else {
        h.try_insert(n, v).map(|_| ())
    };
    done.map_err(|_| Error::Limit("too many headers".into()))
}

/// Whether a head may take one more header of this value from a filter: at most
/// [`limits::MAX_FILTER_HEADERS`] fields and about [`limits::MAX_FILTER_HEADER_BYTES`] of values (a
/// hostile filter would otherwise grow host memory without bound, outside its own limit).
pub(crate) fn room_for(h: &http::HeaderMap, v: &HeaderValue) -> Result<(), Error> {
    if h.len() >= limits::MAX_FILTER_HEADERS {
        return Err(Error::Limit(format!(
            "more than {} headers",
            limits::MAX_FILTER_HEADERS
        )));
    }
    // The sum is only taken for a large value or a large head: every value over 1 KiB was
    // checked when added, so small values on a head of under 64 fields add at most 64 KiB
    // past the bound. A typical edit (a short value on a short head) sums nothing.
    if v.len() <= 1024 && h.len() < 64 {
        return Ok(());
    }
    let bytes: usize = h.values().map(|v| v.len()).sum::<usize>() + v.len();
    if bytes > limits::MAX_FILTER_HEADER_BYTES {
        return Err(Error::Limit(format!(
            "header values over {} bytes",
            limits::MAX_FILTER_HEADER_BYTES
        )));
    }
    Ok(())
}

/// A guest's log message on one line: control characters (a newline would start what reads
/// as another log record in the text format) are written as escapes.
fn one_line(message: &str) -> std::borrow::Cow<'_, str> {
    if !message.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(message);
    }
    std::borrow::Cow::Owned(
        message
            .chars()
            .map(|c| {
                if c.is_control() {
                    c.escape_default().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect(),
    )
}

/// What an outbound request may carry: the bounds of a filter's own response.
fn check_outbound(r: &outbound::OutboundRequest) -> Result<(), String> {
    if r.body.len() > MAX_OUTBOUND_BODY {
        return Err(format!("request body larger than {MAX_OUTBOUND_BODY} bytes"));
    }
    if r.headers.len() > limits::MAX_FILTER_HEADERS {
        return Err(format!("more than {} headers", limits::MAX_FILTER_HEADERS));
    }
    Ok(())
}

/// A path (and query) a guest set, in the canonical form the core routes on, so the upstream
/// sees what routing and the filters saw.
fn guest_path(path_and_query: &str) -> Result<http::uri::PathAndQuery, Error> {
    // A fragment never goes on the wire; cut by the URI parser after canonicalising, it would
    // turn `/a/..#` into a dot segment the core never saw.
    if path_and_query.contains('#') {
        return Err(Error::Invalid("path: '#' is not allowed".into()));
    }
    let (path, query) = match path_and_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path_and_query, None),
    };
    let canonical = crate::path::normalize(path).map_err(|e| Error::Invalid(format!("path: {e}")))?;
    let pq = match query {
        Some(q) => format!("{canonical}?{q}"),
        None => canonical.into_owned(),
    };
    pq.parse().map_err(|_| Error::Invalid("invalid path".into()))
}

/// Removes a header a guest named, after checking the name.
fn take(h: &mut http::HeaderMap, name: &str) -> Result<(), Error> {
    check_guest_header_name(name)?;
    h.remove(name);
    Ok(())
}

fn header_list(h: &http::HeaderMap) -> Vec<Header> {
    h.iter()
        .map(|(n, v)| Header {
            name: n.as_str().to_string(),
            value: v.as_bytes().to_vec(),
        })
        .collect()
}

impl super::bindings::weir::filter::types::Host for HostState {}

impl wreq::Host for HostState {
    fn method(&mut self) -> String {
        self.call()
            .map(|c| c.req().method.to_string())
            .unwrap_or_default()
    }
    fn path(&mut self) -> String {
        self.call()
            .map(|c| c.req().uri.path().to_string())
            .unwrap_or_default()
    }
    fn query(&mut self) -> Option<String> {
        self.call().and_then(|c| c.req().uri.query().map(str::to_string))
    }
    fn authority(&mut self) -> Option<String> {
        let c = self.call()?;
        c.req()
            .uri
            .authority()
            .map(|a| a.as_str().to_string())
            .or_else(|| {
                c.req()
                    .headers
                    .get(http::header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_string)
            })
    }
    fn scheme(&mut self) -> String {
        match self.call() {
            Some(c) if c.ctx.tls.is_some() => "https".into(),
            _ => "http".into(),
        }
    }
    fn get_header(&mut self, name: String) -> Option<Vec<u8>> {
        self.call()
            .and_then(|c| c.req().headers.get(name.as_str()).map(|v| v.as_bytes().to_vec()))
    }
    fn get_header_all(&mut self, name: String) -> Vec<Vec<u8>> {
        self.call()
            .map(|c| {
                c.req()
                    .headers
                    .get_all(name.as_str())
                    .iter()
                    .map(|v| v.as_bytes().to_vec())
                    .collect()
            })
            .unwrap_or_default()
    }
    fn get_headers(&mut self) -> Vec<Header> {
        self.call()
            .map(|c| header_list(&c.req().headers))
            .unwrap_or_default()
    }
    fn set_header(&mut self, name: String, value: Vec<u8>) -> Result<(), Error> {
        put(&mut self.request_mut()?.headers, &name, value, false)
    }
    fn append_header(&mut self, name: String, value: Vec<u8>) -> Result<(), Error> {
        put(&mut self.request_mut()?.headers, &name, value, true)
    }
    fn remove_header(&mut self, name: String) -> Result<(), Error> {
        take(&mut self.request_mut()?.headers, &name)
    }
    fn set_path(&mut self, path_and_query: String) -> Result<(), Error> {
        let pq = guest_path(&path_and_query)?;
        let req = self.request_mut()?;
        let mut parts = req.uri.clone().into_parts();
        parts.path_and_query = Some(pq);
        req.uri = http::Uri::from_parts(parts).map_err(|_| Error::Invalid("invalid path".into()))?;
        Ok(())
    }
    fn set_authority(&mut self, authority: String) -> Result<(), Error> {
        let a: http::uri::Authority = authority
            .parse()
            .map_err(|_| Error::Invalid(format!("invalid authority {authority:?}")))?;
        let v = guest_header_value(a.as_str().as_bytes())?;
        let req = self.request_mut()?;
        if req.uri.authority().is_some() {
            let mut parts = req.uri.clone().into_parts();
            parts.authority = Some(a);
            req.uri = http::Uri::from_parts(parts).map_err(|_| Error::Invalid("invalid authority".into()))?;
        }
        req.headers.insert(http::header::HOST, v);
        Ok(())
    }
}

impl wresp::Host for HostState {
    fn status(&mut self) -> u16 {
        self.call()
            .and_then(|c| c.resp())
            .map_or(0, |r| r.status.as_u16())
    }
    fn set_status(&mut self, status: u16) -> Result<(), Error> {
        let s = http::StatusCode::from_u16(status)
            .ok()
            .filter(|s| (200..=599).contains(&s.as_u16()))
            .ok_or_else(|| Error::Invalid(format!("invalid status {status}")))?;
        self.response_mut()?.status = s;
        Ok(())
    }
    fn get_header(&mut self, name: String) -> Option<Vec<u8>> {
        self.call()
            .and_then(|c| c.resp())
            .and_then(|r| r.headers.get(name.as_str()).map(|v| v.as_bytes().to_vec()))
    }
    fn get_headers(&mut self) -> Vec<Header> {
        self.call()
            .and_then(|c| c.resp())
            .map(|r| header_list(&r.headers))
            .unwrap_or_default()
    }
    fn set_header(&mut self, name: String, value: Vec<u8>) -> Result<(), Error> {
        put(&mut self.response_mut()?.headers, &name, value, false)
    }
    fn append_header(&mut self, name: String, value: Vec<u8>) -> Result<(), Error> {
        put(&mut self.response_mut()?.headers, &name, value, true)
    }
    fn remove_header(&mut self, name: String) -> Result<(), Error> {
        take(&mut self.response_mut()?.headers, &name)
    }
}

impl properties::Host for HostState {
    fn client_address(&mut self) -> String {
        self.call()
            .map(|c| addr_text(&c.ctx.client_addr))
            .unwrap_or_default()
    }
    fn peer(&mut self) -> Option<PeerIdentity> {
        let p = self.call()?.ctx.tls.as_ref()?.peer.as_ref()?;
        Some(PeerIdentity {
            subject: p.subject.clone(),
            uri_sans: p.uri_sans.clone(),
            dns_sans: p.dns_sans.clone(),
        })
    }
    fn sni(&mut self) -> Option<String> {
        self.call()?.ctx.tls.as_ref()?.sni.clone()
    }
    fn listener(&mut self) -> String {
        self.call()
            .map(|c| c.ctx.listener.to_string())
            .unwrap_or_default()
    }
    fn route(&mut self) -> Option<String> {
        self.call()?.ctx.route_name().map(str::to_string)
    }
    fn request_id(&mut self) -> String {
        self.call()
            .and_then(|c| c.ctx.request_id.to_str().ok())
            .unwrap_or_default()
            .to_string()
    }
    fn cluster(&mut self) -> Option<String> {
        self.call()?.ctx.cluster_name().map(str::to_string)
    }
    fn set_cluster(&mut self, name: String) -> Result<(), Error> {
        let Some((key, _)) = self
            .shared
            .clusters
            .load()
            .get_key_value(name.as_str())
            .map(|(k, v)| (k.clone(), v.clone()))
        else {
            return Err(Error::Invalid(format!("unknown cluster {name:?}")));
        };
        let key = key.clone();
        match self.call_mut() {
            Some(c) if c.phase == Phase::RequestHeaders => {
                c.ctx.cluster = Some(key);
                Ok(())
            }
            _ => Err(Error::WrongPhase),
        }
    }
    fn set_timeout(&mut self, ms: u32) -> Result<(), Error> {
        if ms == 0 {
            return Err(Error::Invalid("timeout must be greater than zero".into()));
        }
        match self.call_mut() {
            Some(c) if c.phase == Phase::RequestHeaders => {
                c.ctx.timeout = Some(Duration::from_millis(ms.into()));
                Ok(())
            }
            _ => Err(Error::WrongPhase),
        }
    }
    fn filter_name(&mut self) -> String {
        self.shared.name.to_string()
    }
    fn upstream(&mut self) -> Option<String> {
        self.call()?.ctx.upstream.map(|a| a.to_string())
    }
    fn eject_upstream(&mut self, ms: u32) -> Result<(), Error> {
        let c = match self.call() {
            Some(c) if c.phase == Phase::ResponseHeaders => c,
            _ => return Err(Error::WrongPhase),
        };
        let (Some(addr), Some(cluster)) = (c.ctx.upstream, c.ctx.cluster_name()) else {
            return Err(Error::Invalid("this response has no upstream endpoint".into()));
        };
        let Some(cluster) = self.shared.clusters.load().get(cluster).cloned() else {
            return Err(Error::Invalid(format!("unknown cluster {cluster:?}")));
        };
        let d = Duration::from_millis(ms.into()).min(crate::limits::MAX_FILTER_EJECTION);
        match cluster.eject_unless_last(addr, d) {
            crate::cluster::Ejection::Ejected => {}
            crate::cluster::Ejection::NoSuchEndpoint => return Ok(()),
            crate::cluster::Ejection::LastAvailable => {
                return Err(Error::Limit(
                    "would eject the cluster's last available endpoint".into(),
                ))
            }
        }
        tracing::warn!(filter = %self.shared.name, cluster = %cluster.name, upstream.addr = %addr, ejected_for = ?d, "endpoint ejected by a filter (outlier)");
        Ok(())
    }
    fn set_retry_delay(&mut self, ms: u32) -> Result<(), Error> {
        match self.call_mut() {
            Some(c) if c.phase == Phase::ResponseHeaders => {
                c.ctx.retry_delay =
                    Some(Duration::from_millis(ms.into()).min(crate::limits::MAX_RETRY_DELAY));
                Ok(())
            }
            _ => Err(Error::WrongPhase),
        }
    }
    fn get_request_value(&mut self, key: String) -> Option<Vec<u8>> {
        let name = self.shared.name.clone();
        self.call()?.ctx.values.as_ref()?.get(&(name, key)).cloned()
    }
    fn set_request_value(&mut self, key: String, value: Vec<u8>) -> Result<(), Error> {
        let name = self.shared.name.clone();
        let c = match self.call_mut() {
            Some(c) if matches!(c.phase, Phase::RequestHeaders | Phase::ResponseHeaders) => c,
            _ => return Err(Error::WrongPhase),
        };
        if value.len() > MAX_REQUEST_VALUE_BYTES || key.len() > 256 {
            return Err(Error::Limit(format!(
                "request values are at most {MAX_REQUEST_VALUE_BYTES} bytes, keys 256"
            )));
        }
        let values = c.ctx.values.get_or_insert_with(Default::default);
        let k = (name, key);
        let mine = values.keys().filter(|(f, _)| *f == k.0).count();
        if !values.contains_key(&k) && mine >= MAX_REQUEST_VALUES {
            return Err(Error::Limit(format!(
                "at most {MAX_REQUEST_VALUES} request values"
            )));
        }
        values.insert(k, value);
        Ok(())
    }
}

impl log::Host for HostState {
    fn enabled(&mut self, level: LogLevel) -> bool {
        match level {
            LogLevel::Trace => tracing::enabled!(tracing::Level::TRACE),
            LogLevel::Debug => tracing::enabled!(tracing::Level::DEBUG),
            LogLevel::Info => tracing::enabled!(tracing::Level::INFO),
            LogLevel::Warn => tracing::enabled!(tracing::Level::WARN),
            LogLevel::Error => tracing::enabled!(tracing::Level::ERROR),
        }
    }
    fn write(&mut self, level: LogLevel, message: String) {
        // Lines at a level that is off are not written, so they use up nothing.
        if self.logs_left == 0 || !self.enabled(level) {
            return;
        }
        self.logs_left -= 1;
        if self.logs_left == 0 {
            let request_id = self
                .call()
                .and_then(|c| c.ctx.request_id.to_str().ok())
                .unwrap_or("-");
            tracing::warn!(target: "weir::filter", filter = &*self.shared.name, request.id = request_id, "more than {MAX_LOG_LINES_PER_CALL} log lines in one call: the rest of this call's lines are dropped");
            return;
        }
        // Bounded so a filter cannot flood the log with one call.
        let mut message = message;
        message.truncate(message.floor_char_boundary(4096));
        let message = one_line(&message);
        let filter = &*self.shared.name;
        let request_id = self
            .call()
            .and_then(|c| c.ctx.request_id.to_str().ok())
            .unwrap_or("-");
        match level {
            LogLevel::Trace => {
                tracing::trace!(target: "weir::filter", filter, request.id = request_id, "{message}")
            }
            LogLevel::Debug => {
                tracing::debug!(target: "weir::filter", filter, request.id = request_id, "{message}")
            }
            LogLevel::Info => {
                tracing::info!(target: "weir::filter", filter, request.id = request_id, "{message}")
            }
            LogLevel::Warn => {
                tracing::warn!(target: "weir::filter", filter, request.id = request_id, "{message}")
            }
            LogLevel::Error => {
                tracing::error!(target: "weir::filter", filter, request.id = request_id, "{message}")
            }
        }
    }
}

/// `ip:port` (`[v6]:port`), as `SocketAddr`'s `Display` writes it; IPv4 without the
/// formatting machinery (rate limits by client read it on every request).
fn addr_text(a: &std::net::SocketAddr) -> String {
    // Digits written into a stack buffer, then one allocation: ratelimit-by-IP asks on
    // every request (`to_string` goes through the formatting machinery, pushing char by
    // char cost ~400 instructions).
    fn put_u16(buf: &mut [u8; 21], at: &mut usize, n: u16) {
        let mut digits = [0u8; 5];
        let (mut i, mut n) = (digits.len(), n);
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        let d = &digits[i..];
        buf[*at..*at + d.len()].copy_from_slice(d);
        *at += d.len();
    }
    match a {
        std::net::SocketAddr::V4(v4) => {
            // "255.255.255.255:65535" is 21 bytes.
            let (mut buf, mut n) = ([0u8; 21], 0);
            for (i, o) in v4.ip().octets().into_iter().enumerate() {
                if i > 0 {
                    buf[n] = b'.';
                    n += 1;
                }
                put_u16(&mut buf, &mut n, o.into());
            }
            buf[n] = b':';
            n += 1;
            put_u16(&mut buf, &mut n, v4.port());
            String::from_utf8_lossy(&buf[..n]).into_owned()
        }
        v6 => v6.to_string(),
    }
}

/// Metrics a filter records, exported on `/metrics` as `weir_filter_<name>`.
#[derive(Default)]
pub struct FilterMetrics {
    series: Mutex<SeriesTable>,
}

/// Series by identity (in export order) and by handle (the index the guest holds).
#[derive(Default)]
struct SeriesTable {
    by_key: BTreeMap<SeriesKey, u32>,
    values: Vec<Series>,
}

enum Series {
    Counter(u64),
    Gauge(i64),
    Histogram { count: u64, sum: f64 },
}

impl Series {
    fn kind(&self) -> &'static str {
        match self {
            Series::Counter(_) => "counter",
            Series::Gauge(_) => "gauge",
            Series::Histogram { .. } => "histogram",
        }
    }
}

/// A name-based counter update: adds to the counter, or makes one (replacing a series of
/// another kind, as the name-based calls always have).
fn counter_plus(value: u64) -> impl FnOnce(Option<&mut Series>) -> Option<Series> {
    move |s| match s {
        Some(Series::Counter(v)) => {
            // Saturating: a filter's huge increments must not wrap (a false counter reset)
            // or overflow-panic while the metrics lock is held.
            *v = v.saturating_add(value);
            None
        }
        _ => Some(Series::Counter(value)),
    }
}

impl SeriesTable {
    fn insert(&mut self, key: SeriesKey, s: Series) -> Result<u32, Error> {
        if self.values.len() >= MAX_FILTER_SERIES {
            return Err(Error::Limit(format!("more than {MAX_FILTER_SERIES} series")));
        }
        let i = self.values.len() as u32;
        self.values.push(s);
        self.by_key.insert(key, i);
        Ok(i)
    }
}

fn valid_metric_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// A series' identity as the guest gave it: validated, not formatted. The Prometheus text is
/// made at scrape time, so an update on the request path allocates nothing for a known series.
type SeriesKey = (String, Vec<(String, String)>);

fn series_key(name: String, labels: Vec<(String, String)>) -> Result<SeriesKey, Error> {
    if !valid_metric_name(&name) {
        return Err(Error::Invalid(format!(
            "metric name {name:?}: use [a-z0-9_], at most 64"
        )));
    }
    if labels.len() > MAX_SERIES_LABELS {
        return Err(Error::Invalid(format!("more than {MAX_SERIES_LABELS} labels")));
    }
    for (i, (k, v)) in labels.iter().enumerate() {
        // A name twice makes a line Prometheus rejects, failing the whole scrape.
        if !valid_metric_name(k) || k == "filter" || v.len() > 128 || labels[..i].iter().any(|(o, _)| o == k)
        {
            return Err(Error::Invalid(format!("label {k:?}")));
        }
    }
    Ok((name, labels))
}

/// `filter="f",k="v",...` with values escaped for the text format.
fn label_text(filter: &str, labels: &[(String, String)]) -> String {
    let mut out = format!("filter=\"{filter}\"");
    for (k, v) in labels {
        out.push(',');
        out.push_str(k);
        out.push_str("=\"");
        for c in v.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '"' => out.push_str("\\\""),
                '\n' => out.push_str("\\n"),
                c => out.push(c),
            }
        }
        out.push('"');
    }
    out
}

impl FilterMetrics {
    /// Updates the series `key` names (made by `f(None)` when new): the name-based calls.
    fn update(
        &self,
        key: SeriesKey,
        f: impl FnOnce(Option<&mut Series>) -> Option<Series>,
    ) -> Result<(), Error> {
        let mut g = self.series.lock().expect("metrics lock");
        if let Some(&i) = g.by_key.get(&key) {
            let s = &mut g.values[i as usize];
            if let Some(new) = f(Some(s)) {
                *s = new;
            }
            return Ok(());
        }
        if let Some(new) = f(None) {
            g.insert(key, new)?;
        }
        Ok(())
    }

    /// The handle of the series `key` names, made (at zero) when new.
    fn handle(&self, key: SeriesKey, zero: Series) -> Result<u32, Error> {
        let mut g = self.series.lock().expect("metrics lock");
        match g.by_key.get(&key) {
            Some(&i) if g.values[i as usize].kind() == zero.kind() => Ok(i),
            Some(&i) => Err(Error::Invalid(format!(
                "{} is a {}, not a {}",
                key.0,
                g.values[i as usize].kind(),
                zero.kind()
            ))),
            None => g.insert(key, zero),
        }
    }

    /// Updates the series behind a handle; `f` answers false when it is of another kind.
    fn update_handle(&self, handle: u32, f: impl FnOnce(&mut Series) -> bool) -> Result<(), Error> {
        let mut g = self.series.lock().expect("metrics lock");
        let s = g
            .values
            .get_mut(handle as usize)
            .ok_or_else(|| Error::Invalid(format!("no series {handle}")))?;
        let kind = s.kind();
        if f(s) {
            Ok(())
        } else {
            Err(Error::Invalid(format!("series {handle} is a {kind}")))
        }
    }

    /// Appends the OpenMetrics text of every series, for `filter`.
    pub fn encode(&self, filter: &str, out: &mut String) {
        use std::fmt::Write;
        let g = self.series.lock().expect("metrics lock");
        let mut last = String::new();
        for ((name, labels), &i) in g.by_key.iter() {
            let s = &g.values[i as usize];
            let full = format!(
                "weir_filter_{}_{name}",
                filter.replace(|c: char| !c.is_ascii_alphanumeric(), "_")
            );
            let kind = match s {
                Series::Histogram { .. } => "summary",
                s => s.kind(),
            };
            if full != last {
                let _ = writeln!(out, "# TYPE {full} {kind}");
                last.clone_from(&full);
            }
            let labels = label_text(filter, labels);
            let _ = match s {
                Series::Counter(v) => writeln!(out, "{full}_total{{{labels}}} {v}"),
                Series::Gauge(v) => writeln!(out, "{full}{{{labels}}} {v}"),
                Series::Histogram { count, sum } => {
                    writeln!(
                        out,
                        "{full}_count{{{labels}}} {count}\n{full}_sum{{{labels}}} {sum}"
                    )
                }
            };
        }
    }
}

impl metrics::Host for HostState {
    fn counter_add(&mut self, name: String, labels: Vec<(String, String)>, value: u64) -> Result<(), Error> {
        self.shared
            .metrics
            .update(series_key(name, labels)?, counter_plus(value))
    }
    fn gauge_set(&mut self, name: String, labels: Vec<(String, String)>, value: i64) -> Result<(), Error> {
        self.shared
            .metrics
            .update(series_key(name, labels)?, |_| Some(Series::Gauge(value)))
    }
    fn histogram_observe(
        &mut self,
        name: String,
        labels: Vec<(String, String)>,
        value: f64,
    ) -> Result<(), Error> {
        let key = series_key(name, labels)?;
        if !value.is_finite() {
            return Err(Error::Invalid("value must be finite".into()));
        }
        self.shared.metrics.update(key, |s| match s {
            Some(Series::Histogram { count, sum }) => {
                *count += 1;
                *sum += value;
                None
            }
            _ => Some(Series::Histogram { count: 1, sum: value }),
        })
    }
    fn series(
        &mut self,
        kind: metrics::MetricKind,
        name: String,
        labels: Vec<(String, String)>,
    ) -> Result<u32, Error> {
        let zero = match kind {
            metrics::MetricKind::Counter => Series::Counter(0),
            metrics::MetricKind::Gauge => Series::Gauge(0),
            metrics::MetricKind::Histogram => Series::Histogram { count: 0, sum: 0.0 },
        };
        self.shared.metrics.handle(series_key(name, labels)?, zero)
    }
    fn add(&mut self, series: u32, value: u64) -> Result<(), Error> {
        self.shared.metrics.update_handle(series, |s| match s {
            Series::Counter(v) => {
                *v = v.saturating_add(value);
                true
            }
            _ => false,
        })
    }
    fn set(&mut self, series: u32, value: i64) -> Result<(), Error> {
        self.shared.metrics.update_handle(series, |s| match s {
            Series::Gauge(v) => {
                *v = value;
                true
            }
            _ => false,
        })
    }
    fn observe(&mut self, series: u32, value: f64) -> Result<(), Error> {
        if !value.is_finite() {
            return Err(Error::Invalid("value must be finite".into()));
        }
        self.shared.metrics.update_handle(series, |s| match s {
            Series::Histogram { count, sum } => {
                *count += 1;
                *sum += value;
                true
            }
            _ => false,
        })
    }
}

impl state::Host for HostState {
    fn get(&mut self, key: String) -> Option<state::Entry> {
        self.shared
            .state
            .get(&key)
            .map(|(value, version)| state::Entry { value, version })
    }
    fn set(&mut self, key: String, value: Vec<u8>, ttl_ms: Option<u64>) -> Result<(), Error> {
        self.shared
            .state
            .set(key, value, ttl_ms.map(Duration::from_millis))
            .map_err(|e| Error::Limit(e.to_string()))
    }
    fn compare_and_swap(
        &mut self,
        key: String,
        expected: Option<u64>,
        value: Vec<u8>,
        ttl_ms: Option<u64>,
    ) -> Result<bool, Error> {
        self.shared
            .state
            .compare_and_swap(key, expected, value, ttl_ms.map(Duration::from_millis))
            .map_err(|e| Error::Limit(e.to_string()))
    }
    fn swap(
        &mut self,
        key: String,
        expected: Option<u64>,
        value: Vec<u8>,
        ttl_ms: Option<u64>,
    ) -> Result<state::Swapped, Error> {
        use super::state::Swap;
        match self
            .shared
            .state
            .swap(key, expected, value, ttl_ms.map(Duration::from_millis))
        {
            Ok(Swap::Written(version)) => Ok(state::Swapped::Written(version)),
            Ok(Swap::Conflict(current)) => Ok(state::Swapped::Conflict(
                current.map(|(value, version)| state::Entry { value, version }),
            )),
            Err(e) => Err(Error::Limit(e.to_string())),
        }
    }
    fn delete(&mut self, key: String) {
        self.shared.state.delete(&key)
    }
}

impl outbound::Host for HostState {
    async fn call(
        &mut self,
        cluster: String,
        request: outbound::OutboundRequest,
    ) -> Result<outbound::OutboundResponse, String> {
        let Some(c) = self.shared.clusters.load().get(cluster.as_str()).cloned() else {
            return Err(format!("unknown cluster {cluster:?}"));
        };
        let timeout = Duration::from_millis(u64::from(request.timeout_ms.clamp(1, 60_000)));
        match tokio::time::timeout(timeout, outbound_call(&c, request)).await {
            Ok(r) => r,
            Err(_) => Err(format!("timed out after {timeout:?}")),
        }
    }

    fn send(&mut self, cluster: String, request: outbound::OutboundRequest) -> Result<(), String> {
        use std::sync::atomic::Ordering;
        let Some(c) = self.shared.clusters.load().get(cluster.as_str()).cloned() else {
            return Err(format!("unknown cluster {cluster:?}"));
        };
        // What the exchange would refuse is the filter's error now, not a log line later.
        check_outbound(&request)?;
        http::Method::from_bytes(request.method.as_bytes())
            .map_err(|_| format!("invalid method {:?}", request.method))?;
        request
            .path
            .parse::<http::uri::PathAndQuery>()
            .map_err(|_| format!("invalid path {:?}", request.path))?;
        for h in &request.headers {
            guest_header_name(&h.name).map_err(|e| format!("{e:?}"))?;
            guest_header_value(h.value.as_slice()).map_err(|e| format!("{e:?}"))?;
        }
        let shared = self.shared.clone();
        if shared.sends.fetch_add(1, Ordering::Relaxed) >= MAX_SENDS_IN_FLIGHT {
            shared.sends.fetch_sub(1, Ordering::Relaxed);
            return Err(format!("{MAX_SENDS_IN_FLIGHT} sends already in flight"));
        }
        let timeout = Duration::from_millis(u64::from(request.timeout_ms.clamp(1, 60_000)));
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            shared.sends.fetch_sub(1, Ordering::Relaxed);
            return Err("no runtime to send from".into());
        };
        rt.spawn(async move {
            let r = tokio::time::timeout(timeout, outbound_call(&c, request)).await;
            shared.sends.fetch_sub(1, Ordering::Relaxed);
            match r {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::debug!(filter = %shared.name, cluster = %c.name, error = %e, "send failed")
                }
                Err(_) => tracing::debug!(filter = %shared.name, cluster = %c.name, "send timed out"),
            }
        });
        Ok(())
    }
}

/// One HTTP exchange with an endpoint of `cluster`, the body read whole (bounded).
async fn outbound_call(
    cluster: &Cluster,
    r: outbound::OutboundRequest,
) -> Result<outbound::OutboundResponse, String> {
    check_outbound(&r)?;
    let method = http::Method::from_bytes(r.method.as_bytes())
        .map_err(|_| format!("invalid method {:?}", r.method))?;
    let ep = cluster
        .pick(&[])
        .ok_or_else(|| format!("no healthy endpoint in cluster {:?}", &*cluster.name))?;
    let conn = cluster
        .checkout(&ep, false)
        .await
        .map_err(|e| format!("connect to {}: {e}", ep.addr))?;
    let mut b = http::Request::builder().method(method);
    for h in &r.headers {
        let n = guest_header_name(&h.name).map_err(|e| format!("{e:?}"))?;
        let v = guest_header_value(h.value.as_slice()).map_err(|e| format!("{e:?}"))?;
        b = b.header(n, v);
    }
    let path: http::uri::PathAndQuery = r.path.parse().map_err(|_| format!("invalid path {:?}", r.path))?;
    let data = bytes::Bytes::from(r.body);
    let body = crate::body::full(data.clone());
    let resp = match conn {
        Conn::Http1(c) => {
            let (head, ()) = b
                .uri(http::Uri::from(path))
                .header(http::header::HOST, &*ep.authority)
                .body(())
                .map_err(|e| e.to_string())?
                .into_parts();
            // As the proxy does for requests (`proxy::send`): a pooled connection the
            // upstream closed under the call gets a second try on a new one, if the call may
            // go twice; the body is all here.
            let again = (c.rested() && crate::cluster::may_resend(&head.method, &head.headers))
                .then(|| crate::filter::copy_head(&head));
            let max = cluster.config.max_idle_per_endpoint;
            let resp = match c.send(&head, body, &[], false, &ep, max).await {
                Ok(r) => r,
                Err(f) => match again.filter(|_| f.closed) {
                    Some(head) => cluster
                        .reconnect(&ep)
                        .await
                        .map_err(|e| format!("connect to {}: {e}", ep.addr))?
                        .send(&head, crate::body::full(data), &[], false, &ep, max)
                        .await
                        .map_err(|f| f.reason)?,
                    None => return Err(f.reason),
                },
            };
            // `keep_head` false: no `RawHead`, the map has the fields.
            let (parts, body) = resp.0.into_parts();
            (
                parts,
                http_body_util::Limited::new(body, MAX_OUTBOUND_BODY)
                    .collect()
                    .await
                    .map_err(|e| e.to_string())?
                    .to_bytes(),
            )
        }
        Conn::Http1Upgradable(mut s) => {
            let req = b
                .uri(http::Uri::from(path))
                .header(http::header::HOST, &*ep.authority)
                .body(body)
                .map_err(|e| e.to_string())?;
            let (parts, body) = s.send_request(req).await.map_err(|e| e.to_string())?.into_parts();
            (
                parts,
                http_body_util::Limited::new(body, MAX_OUTBOUND_BODY)
                    .collect()
                    .await
                    .map_err(|e| e.to_string())?
                    .to_bytes(),
            )
        }
        Conn::Http2(mut s) => {
            let scheme = if cluster.config.tls.is_some() {
                "https"
            } else {
                "http"
            };
            let uri = http::Uri::builder()
                .scheme(scheme)
                .authority(&*ep.authority)
                .path_and_query(path)
                .build()
                .map_err(|e| e.to_string())?;
            let req = b
                .uri(uri)
                .version(http::Version::HTTP_2)
                .body(body)
                .map_err(|e| e.to_string())?;
            let (parts, body) = s.send_request(req).await.map_err(|e| e.to_string())?.into_parts();
            (
                parts,
                http_body_util::Limited::new(body, MAX_OUTBOUND_BODY)
                    .collect()
                    .await
                    .map_err(|e| e.to_string())?
                    .to_bytes(),
            )
        }
    };
    let (parts, bytes) = resp;
    Ok(outbound::OutboundResponse {
        status: parts.status.as_u16(),
        headers: header_list(&parts.headers),
        body: bytes.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_are_validated_on_update_and_escaped_at_scrape() {
        let m = FilterMetrics::default();
        let l = |k: &str, v: &str| vec![(k.to_string(), v.to_string())];
        for _ in 0..2 {
            m.update(
                series_key("hits".into(), l("path", "a\"b\\c\nd")).unwrap(),
                counter_plus(1),
            )
            .unwrap();
        }
        let mut out = String::new();
        m.encode("my-filter", &mut out);
        assert_eq!(
            out,
            "# TYPE weir_filter_my_filter_hits counter\n\
             weir_filter_my_filter_hits_total{filter=\"my-filter\",path=\"a\\\"b\\\\c\\nd\"} 2\n"
        );
        assert!(series_key("Hits".into(), vec![]).is_err());
        assert!(
            series_key("hits".into(), l("filter", "x")).is_err(),
            "the host owns `filter`"
        );
        assert!(series_key("hits".into(), l("k", &"v".repeat(129))).is_err());
    }

    #[test]
    fn guest_values_that_would_panic_or_grow_the_host_are_refused() {
        // Counters saturate: two huge increments neither wrap nor panic under the lock.
        let m = FilterMetrics::default();
        for _ in 0..2 {
            m.update(series_key("big".into(), vec![]).unwrap(), counter_plus(u64::MAX))
                .unwrap();
        }
        let mut out = String::new();
        m.encode("f", &mut out);
        assert!(
            out.contains(&format!("weir_filter_f_big_total{{filter=\"f\"}} {}", u64::MAX)),
            "{out}"
        );
        // Labels: a name twice (Prometheus rejects the line, and the whole scrape) or too many.
        let l = |n: usize| {
            (0..n)
                .map(|i| (format!("k{i}"), "v".to_string()))
                .collect::<Vec<_>>()
        };
        assert!(series_key("x".into(), l(MAX_SERIES_LABELS)).is_ok());
        assert!(series_key("x".into(), l(MAX_SERIES_LABELS + 1)).is_err());
        let twice = vec![
            ("k".to_string(), "a".to_string()),
            ("k".to_string(), "b".to_string()),
        ];
        assert!(series_key("x".into(), twice).is_err());
        // Headers: a bounded count and size on any head a filter edits.
        let mut h = http::HeaderMap::new();
        for i in 0..limits::MAX_FILTER_HEADERS {
            put(&mut h, &format!("x-{i}"), b"v".to_vec(), true).unwrap();
        }
        assert!(matches!(
            put(&mut h, "x-more", b"v".to_vec(), true),
            Err(Error::Limit(_))
        ));
        let mut h = http::HeaderMap::new();
        let big = vec![b'a'; 64 * 1024];
        for _ in 0..limits::MAX_FILTER_HEADER_BYTES / big.len() {
            put(&mut h, "x-big", big.clone(), true).unwrap();
        }
        assert!(matches!(put(&mut h, "x-big", big, true), Err(Error::Limit(_))));
        // Log messages stay on one line; outbound requests are bounded like responses.
        assert_eq!(one_line("ok \u{e9}"), "ok \u{e9}");
        assert_eq!(
            one_line("a\nfake=record\r\u{1b}[31m"),
            "a\\nfake=record\\r\\u{1b}[31m"
        );
        let req = |body: usize| outbound::OutboundRequest {
            method: "POST".into(),
            path: "/".into(),
            headers: vec![],
            body: vec![0; body],
            timeout_ms: 100,
        };
        assert!(check_outbound(&req(MAX_OUTBOUND_BODY)).is_ok());
        assert!(check_outbound(&req(MAX_OUTBOUND_BODY + 1)).is_err());
        // Paths: a fragment would hide a dot segment from canonicalisation.
        assert!(guest_path("/public/..#").is_err());
        assert_eq!(guest_path("/a/../b?q=1").unwrap().as_str(), "/b?q=1");
    }

    #[test]
    fn removal_checks_names_as_setting_does() {
        let mut h = http::HeaderMap::new();
        h.insert("x-api-key", HeaderValue::from_static("k"));
        h.insert("x-other", HeaderValue::from_static("o"));
        take(&mut h, "X-Api-Key").unwrap();
        assert!(h.get("x-api-key").is_none(), "names match case-insensitively");
        take(&mut h, "x-absent").unwrap();
        assert_eq!(h.len(), 1);
        for name in ["", "bad name", "x\u{e9}", "a:b"] {
            assert!(take(&mut h, name).is_err(), "{name:?}");
            assert!(guest_header_name(name).is_err(), "{name:?}");
        }
        for name in ["Host", "content-length", "Transfer-Encoding"] {
            let e = take(&mut h, name).unwrap_err();
            assert!(
                matches!(&e, Error::Invalid(m) if m.contains("managed by the proxy")),
                "{e:?}"
            );
            assert!(guest_header_name(name).is_err(), "{name:?}");
        }
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn client_addresses_read_as_display_writes_them() {
        for a in [
            "127.0.0.1:5000",
            "0.0.0.0:0",
            "255.255.255.255:65535",
            "10.0.20.3:80",
            "[::1]:8080",
        ] {
            let a: std::net::SocketAddr = a.parse().unwrap();
            assert_eq!(addr_text(&a), a.to_string());
        }
    }

    #[test]
    fn a_handle_updates_the_series_its_name_does_and_holds_its_kind() {
        let m = FilterMetrics::default();
        let key = || series_key("decisions".into(), vec![("result".into(), "allowed".into())]).unwrap();
        let h = m.handle(key(), Series::Counter(0)).unwrap();
        assert_eq!(
            m.handle(key(), Series::Counter(0)).unwrap(),
            h,
            "one series, one handle"
        );
        let counter = |s: &mut Series| match s {
            Series::Counter(v) => {
                *v += 2;
                true
            }
            _ => false,
        };
        m.update_handle(h, counter).unwrap();
        // The name-based call reaches the same series.
        m.update(key(), counter_plus(1)).unwrap();
        let mut out = String::new();
        m.encode("auth", &mut out);
        assert!(
            out.contains("weir_filter_auth_decisions_total{filter=\"auth\",result=\"allowed\"} 3\n"),
            "{out}"
        );
        let e = m.handle(key(), Series::Gauge(0)).unwrap_err();
        assert!(
            matches!(&e, Error::Invalid(m) if m.contains("is a counter")),
            "{e:?}"
        );
        let gauge = |s: &mut Series| matches!(s, Series::Gauge(_));
        assert!(
            m.update_handle(h, gauge).is_err(),
            "a counter's handle sets no gauge"
        );
        assert!(
            m.update_handle(h + 1, counter).is_err(),
            "an unknown handle is an error"
        );
    }
}
