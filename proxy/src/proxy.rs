//! The request path: from a downstream request to an upstream exchange and back.
//!
//! Order of work for each request: framing checks the parser lets through → canonical path →
//! route → `on-request-headers` → hop-by-hop removal and `X-Forwarded-*` → endpoint choice and
//! connection (connect failures try another endpoint: the request was never sent) → response
//! head within the timeout → hop-by-hop removal → `on-response-headers` (a retry sends the
//! kept request again, to another endpoint) → body streamed back, observed for the access log
//! and metrics. Bodies are buffered only for a filter that asks for it, and request bodies are
//! kept (reference-counted chunks, up to `filter_host.body_buffer`) only when a response
//! filter could ask for a retry.

use std::borrow::Cow;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use crate::body::{self, Body, Limited, Observed, OnComplete};
use crate::cluster::{describe, Cluster, Conn, Endpoint, PooledBody, SendFailed};
use crate::config::{Config, FilterEntry, ForwardedMode, ListenerLimits};
use crate::error::ProxyError;
use crate::filter::pipeline::{self, Pipeline, Stop};
use crate::filter::wasm::WasmEngine;
use crate::filter::{ChainEntry, FilterChain, Heads, LogSummary, Phase, RequestContext, Verdict};
use crate::h1::{RawHead, Reply};
use crate::limits;
use crate::metrics::{Metrics, RouteMetrics};
use crate::route::{Route, RouteTable};
use crate::tls::TlsInfo;

/// One configuration generation of the data plane: routes, chains and clusters. Requests load
/// it once and use the same snapshot for all their phases.
pub struct Gateway {
    /// Clusters by name.
    pub clusters: crate::cluster::Clusters,
    /// Listener state by name.
    pub listeners: std::collections::HashMap<Arc<str>, Arc<ListenerState>, foldhash::fast::RandomState>,
    /// Whether to write access-log lines.
    pub access_log: bool,
    /// Process metrics.
    pub metrics: Arc<Metrics>,
    /// Most bytes gathered for body filters and kept for retries.
    pub body_buffer: u64,
}

/// Per-listener request-path state.
pub struct ListenerState {
    /// The listener's name.
    pub name: Arc<str>,
    /// Its routes.
    pub routes: RouteTable,
    /// Its filter chain.
    pub chain: FilterChain,
    /// Its limits.
    pub limits: ListenerLimits,
    /// How `X-Forwarded-*` are written.
    pub forwarded: ForwardedMode,
    /// Series for requests that matched no route.
    pub unrouted: RouteMetrics,
    /// Whether to send `X-Forwarded-Client-Cert` upstream.
    pub forward_client_cert: bool,
}

impl Gateway {
    /// Assembles a generation from its parts: `clusters` built (or kept) by the caller, and
    /// every chain entry's filter in `filters` by entry name.
    pub fn assemble(
        config: &Config,
        metrics: &Arc<Metrics>,
        clusters: crate::cluster::Clusters,
        filters: &std::collections::HashMap<String, Arc<dyn crate::filter::Filter>>,
        native: &std::collections::HashMap<String, FilterChain>,
    ) -> Gateway {
        let entries = |list: &[FilterEntry]| -> Vec<ChainEntry> {
            list.iter()
                .map(|e| ChainEntry {
                    filter: filters[&e.name].clone(),
                    policy: e.failure_policy,
                })
                .collect()
        };
        let mut listeners = std::collections::HashMap::default();
        for l in &config.listeners {
            // The listener's chain: native filters handed in (embedders, tests), then Wasm.
            let native = native.get(&l.name).cloned().unwrap_or_default();
            let listener_chain = native.then(entries(&l.filters));
            let route_chains: Vec<FilterChain> = config
                .routes
                .iter()
                .map(|r| listener_chain.then(entries(&r.filters)))
                .collect();
            let state = ListenerState {
                name: l.name.as_str().into(),
                routes: RouteTable::build(config, &l.name, metrics, |i| route_chains[i].clone()),
                chain: listener_chain,
                limits: l.limits.clone(),
                forwarded: l.forwarded_headers,
                unrouted: metrics.route(&l.name, "", ""),
                forward_client_cert: l.forward_client_cert,
            };
            listeners.insert(Arc::from(l.name.as_str()), Arc::new(state));
        }
        Gateway {
            clusters,
            listeners,
            access_log: config.log.access_log,
            metrics: metrics.clone(),
            body_buffer: config.filter_host.body_buffer,
        }
    }
}

/// The process's one Wasm engine (one epoch ticker, one compile cache), made on first use.
pub fn wasm_engine() -> anyhow::Result<Arc<WasmEngine>> {
    static ENGINE: std::sync::OnceLock<Arc<WasmEngine>> = std::sync::OnceLock::new();
    if let Some(e) = ENGINE.get() {
        return Ok(e.clone());
    }
    let e = WasmEngine::new()?;
    Ok(ENGINE.get_or_init(|| e).clone())
}

/// State shared by every connection of the process.
pub struct Shared {
    /// The current data-plane generation: read by [`Shared::gateway`] or a connection's
    /// [`CurrentGateway`], replaced only by [`Shared::publish`] (a store that did not count
    /// would leave connections on the gateway they hold).
    gateway: ArcSwap<Gateway>,
    /// Counts the gateways published: a connection's [`CurrentGateway`] loads `gateway`
    /// again only when this moved.
    published: AtomicU64,
    /// Process metrics.
    pub metrics: Arc<Metrics>,
}

impl Shared {
    /// The shared state around the first gateway.
    pub fn new(gateway: Gateway, metrics: Arc<Metrics>) -> Shared {
        Shared {
            gateway: ArcSwap::from_pointee(gateway),
            published: AtomicU64::new(0),
            metrics,
        }
    }

    /// The current gateway.
    pub fn gateway(&self) -> Arc<Gateway> {
        self.gateway.load_full()
    }

    /// Makes `gateway` the one new requests take.
    pub fn publish(&self, gateway: Arc<Gateway>) {
        self.gateway.store(gateway);
        // After the store: a connection that sees the new count loads the new gateway.
        self.published.fetch_add(1, Ordering::Release);
    }
}

/// A connection's way to the current gateway: the one it last loaded, while that is still
/// the one published and alive. An `ArcSwap` load per request took four atomic
/// read-modify-writes (~20 cycles each, the debt list's and the count's); this takes one
/// when nothing changed. Held weakly: an idle connection does not keep a replaced gateway
/// (its filters, pools) alive.
pub struct CurrentGateway {
    shared: Arc<Shared>,
    seen: u64,
    last: std::sync::Weak<Gateway>,
}

impl CurrentGateway {
    /// Follows `shared`'s gateway.
    pub fn new(shared: Arc<Shared>) -> CurrentGateway {
        CurrentGateway {
            shared,
            seen: u64::MAX,
            last: std::sync::Weak::new(),
        }
    }

    /// The gateway a request starting now takes.
    pub fn get(&mut self) -> Arc<Gateway> {
        let now = self.shared.published.load(Ordering::Acquire);
        if now == self.seen {
            if let Some(gw) = self.last.upgrade() {
                return gw;
            }
        }
        let gw = self.shared.gateway();
        self.seen = now;
        self.last = Arc::downgrade(&gw);
        gw
    }
}

/// What a downstream connection knows about itself.
pub struct ConnInfo {
    /// The listener's name.
    pub listener: Arc<str>,
    /// The client's address.
    pub client: SocketAddr,
    /// The client's IP as a header value (`X-Forwarded-For`), made once per connection.
    pub client_ip: HeaderValue,
    /// TLS facts, for TLS listeners.
    pub tls: Option<Arc<TlsInfo>>,
    /// Requests in flight on this connection (idle timeout).
    pub active: AtomicUsize,
    /// Milliseconds since `opened` at the last request start or end (idle timeout).
    pub last_activity_ms: AtomicU64,
    /// When the connection was accepted.
    pub opened: Instant,
    /// HTTP/1 requests seen on this connection, in order (the HTTP/1.1 handoff to hyper).
    pub requests: AtomicU64,
    /// The 1-based index of the HTTP/1 request with which Weir's server handed the
    /// connection to hyper's (an upgrade or CONNECT: what follows may be a tunnel's bytes).
    pub handed_off_at: AtomicU64,
    /// What the connection holds while open (its place under the connection cap, its count
    /// on the gauge, the drain's wait): tunnels made from it hold it on.
    pub slot: Arc<dyn std::any::Any + Send + Sync>,
    /// The connection's clock: its watchdog's ticks.
    pub clock: Arc<AtomicU64>,
    /// HTTP/2: its response bodies in flight (see [`body::Handover`]).
    pub handovers: Mutex<Vec<std::sync::Weak<body::Handover>>>,
    /// The request timer its exchanges borrow in turn (see [`RequestTimer`]).
    timer: Mutex<RequestTimer>,
}

/// A connection's request timer. Registering a tokio `Sleep` per exchange and removing it
/// after took ~900 instructions a request with the time driver's share; this one stays
/// registered across exchanges. Deadlines of sequential requests only grow: a timer armed for
/// an earlier exchange's deadline is early for this one, and when it fires early it is moved
/// on to the true deadline (once per timeout's length on a busy connection, not per request).
enum RequestTimer {
    /// Not made yet (a connection that never forwards anything makes none).
    Unmade,
    /// Between exchanges.
    Idle(Pin<Box<tokio::time::Sleep>>),
    /// An exchange has it: concurrent ones (HTTP/2 streams) use a timer of their own.
    Lent,
}

impl ConnInfo {
    /// A new connection's info; `slot` is what the connection holds while open (a tunnel
    /// made from it holds it on).
    pub fn new(
        listener: Arc<str>,
        client: SocketAddr,
        tls: Option<Arc<TlsInfo>>,
        slot: Arc<dyn std::any::Any + Send + Sync>,
    ) -> ConnInfo {
        ConnInfo {
            slot,
            listener,
            client,
            client_ip: HeaderValue::from_str(&client.ip().to_string())
                .expect("an IP is a valid header value"),
            tls,
            active: AtomicUsize::new(0),
            last_activity_ms: AtomicU64::new(0),
            opened: Instant::now(),
            requests: AtomicU64::new(0),
            handed_off_at: AtomicU64::new(0),
            clock: Arc::new(AtomicU64::new(0)),
            handovers: Mutex::new(Vec::new()),
            timer: Mutex::new(RequestTimer::Unmade),
        }
    }

    /// The connection's request timer for one exchange ending at `until`, unless another
    /// exchange has it.
    fn lend_timer(&self, until: tokio::time::Instant) -> Option<LentTimer<'_>> {
        let mut slot = self.timer.lock().unwrap_or_else(PoisonError::into_inner);
        let sleep = match std::mem::replace(&mut *slot, RequestTimer::Lent) {
            RequestTimer::Unmade => Box::pin(tokio::time::sleep_until(until)),
            RequestTimer::Idle(s) => s,
            RequestTimer::Lent => return None,
        };
        Some(LentTimer {
            sleep: Some(sleep),
            until,
            home: &self.timer,
        })
    }

    /// Advances the connection's clock by a tick; whether a response body has waited for its
    /// HTTP/2 client at least `ticks` ticks (the client grants no flow-control window).
    pub fn tick_and_find_stalled_handover(&self, ticks: u64) -> bool {
        let now = self.clock.fetch_add(1, Ordering::Relaxed) + 1;
        let mut list = self.handovers.lock().expect("handovers lock");
        list.retain(|w| w.strong_count() > 0);
        list.iter()
            .filter_map(std::sync::Weak::upgrade)
            .any(|h| h.waiting_since().is_some_and(|s| now.saturating_sub(s) >= ticks))
    }

    /// Records activity at `now` (a clock read the caller has: one per request start and end).
    pub(crate) fn touch(&self, now: Instant) {
        self.last_activity_ms.store(
            now.saturating_duration_since(self.opened).as_millis() as u64,
            Ordering::Relaxed,
        );
    }

    /// How long the connection has had no request in flight, if it has none now.
    pub fn idle_for(&self) -> Option<Duration> {
        if self.active.load(Ordering::Relaxed) > 0 {
            return None;
        }
        let last = Duration::from_millis(self.last_activity_ms.load(Ordering::Relaxed));
        Some(self.opened.elapsed().saturating_sub(last))
    }
}

/// The entry point of both HTTP servers: never fails; every error becomes a response. `gw`:
/// the gateway current when the request came in (see [`CurrentGateway`]).
pub async fn handle(req: Request<ClientBody>, conn: Arc<ConnInfo>, gw: Arc<Gateway>) -> Reply {
    let start = Instant::now();
    let version = req.version();
    // The index compares with the HTTP/1 handoff's. An HTTP/1 connection's requests start
    // one after another (no read-modify-write needed, a locked instruction); HTTP/2's are
    // not counted.
    let index = if version <= Version::HTTP_11 {
        let i = conn.requests.load(Ordering::Relaxed) + 1;
        conn.requests.store(i, Ordering::Relaxed);
        i
    } else {
        0
    };
    // The connection's handle the request was given: each reference count taken and dropped
    // per request is an atomic instruction (~20 cycles).
    let in_flight = InFlight::new(conn);
    let conn: &ConnInfo = &in_flight;
    conn.touch(start);
    let Some(ls) = gw.listeners.get(&conn.listener) else {
        // The listener left the config while this connection was open: the connection is
        // being drained; a request that came in meanwhile is told to go elsewhere.
        return ProxyError::ListenerGone.to_response().into();
    };
    let request_id = request_id(req.headers());
    let mut ctx = RequestContext::new(conn.listener.clone(), conn.client, conn.tls.clone(), request_id);
    let method = req.method().clone();
    let mut x = Exchange {
        metrics: None,
        upstream: None,
        // The access log reads the target after the request moved on (and the log phase, if
        // the route's chain has one: kept once routed). Otherwise no copy.
        target: gw.access_log.then(|| req.uri().clone()),
        raw: None,
    };

    let result = forward(req, conn, &gw, ls, &mut ctx, &mut x).await;
    let mut resp = match result {
        Ok(r) => r,
        Err(e) => {
            let status = e.status();
            if status.is_server_error() {
                tracing::warn!(listener = %conn.listener, route = ctx.route_name(), cluster = ctx.cluster_name(), client.addr = %conn.client, request.id = show(&ctx.request_id), error = %e, status = status.as_u16(), "request failed");
            } else {
                tracing::debug!(listener = %conn.listener, client.addr = %conn.client, error = %e, status = status.as_u16(), "request refused");
            }
            e.to_response()
        }
    };
    // Set only with the response `forward` returned it with.
    let mut raw = x.raw.take();
    match &mut raw {
        Some(raw) => {
            if !raw.has(X_REQUEST_ID.as_str().as_bytes()) {
                raw.request_id = Some(ctx.request_id.clone());
            }
        }
        None => {
            resp.headers_mut()
                .entry(X_REQUEST_ID)
                .or_insert_with(|| ctx.request_id.clone());
        }
    }
    // Weir's HTTP/1.1 server handed this connection to hyper's at this request (an upgrade or
    // CONNECT, after which bytes may be a tunnel's). Unless it became a tunnel, the
    // connection closes after the answer: no head after it is read by Weir's stricter parser.
    if version <= Version::HTTP_11 && conn.handed_off_at.load(Ordering::Relaxed) == index {
        let tunnelled = resp.status() == StatusCode::SWITCHING_PROTOCOLS
            || (method == Method::CONNECT && resp.status().is_success());
        if !tunnelled {
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
    }
    let status = resp.status().as_u16();
    let done = Completion {
        conn: in_flight,
        access_log: gw.access_log,
        metrics: x
            .metrics
            .or_else(|| ctx.route.is_none().then(|| ls.unrouted.clone())),
        ctx,
        method,
        target: x.target,
        version,
        status,
        upstream: x.upstream,
        start,
    };
    if version == Version::HTTP_2 {
        // Watched by the connection: an HTTP/2 client may stall it by granting no window.
        let h = body::Handover::new(done.conn.clock.clone());
        let mut list = done.conn.handovers.lock().expect("handovers lock");
        // Ended ones go at each tick, and here too on a busy connection (a `Weak` keeps its
        // allocation).
        if list.len() >= 32 {
            list.retain(|w| w.strong_count() > 0);
        }
        list.push(Arc::downgrade(&h));
        drop(list);
        return Reply {
            response: resp.map(|b| Observed::new(b, done).handing_over(h).boxed()),
            raw,
        };
    }
    Reply {
        response: resp.map(|b| Observed::new(b, done).boxed()),
        raw,
    }
}

/// A request body from a client: read by Weir's own HTTP/1.1 server, or by hyper's (HTTP/2,
/// and HTTP/1.1 requests that leave HTTP: upgrades, CONNECT).
pub enum ClientBody {
    /// From [`crate::h1::server`].
    H1(crate::h1::server::RequestBody),
    /// From hyper's server.
    Hyper(Incoming),
}

impl http_body::Body for ClientBody {
    type Data = Bytes;
    type Error = body::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, body::BoxError>>> {
        match self.get_mut() {
            ClientBody::H1(b) => Pin::new(b).poll_frame(cx),
            ClientBody::Hyper(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::H1(b) => b.is_end_stream(),
            ClientBody::Hyper(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            ClientBody::H1(b) => b.size_hint(),
            ClientBody::Hyper(b) => b.size_hint(),
        }
    }
}

/// What the request path learned that the completion record needs.
struct Exchange {
    /// The series the request counts under when not its route's (`ctx.route`): a filter
    /// chose another cluster.
    metrics: Option<RouteMetrics>,
    upstream: Option<SocketAddr>,
    /// The request's target as the client sent it, for the access log and the log phase.
    target: Option<Uri>,
    /// The upstream's response head as it came (see `RawHead`): set only with the response
    /// `forward` returns it with, never for an answer of the proxy's or a filter's own.
    raw: Option<RawHead>,
}

/// A request in flight on its connection (the idle timer waits while any is): counted in when
/// made, out when dropped, also when the request is cancelled before its response (an
/// HTTP/2 stream reset drops the request's future: counted out by hand only on completion, it
/// stayed in flight forever and the connection was never closed as idle).
struct InFlight(Arc<ConnInfo>);

impl InFlight {
    fn new(conn: Arc<ConnInfo>) -> InFlight {
        conn.active.fetch_add(1, Ordering::Relaxed);
        InFlight(conn)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

impl std::ops::Deref for InFlight {
    type Target = ConnInfo;
    fn deref(&self) -> &ConnInfo {
        &self.0
    }
}

/// Runs once when the response body ended: metrics, access log, `on-log`, idle tracking.
struct Completion {
    conn: InFlight,
    access_log: bool,
    /// Holds the route: its chain runs the log phase.
    ctx: RequestContext,
    /// Set when the request does not count under its route's series (none, or a filter
    /// chose another cluster).
    metrics: Option<RouteMetrics>,
    method: Method,
    target: Option<Uri>,
    version: Version,
    status: u16,
    upstream: Option<SocketAddr>,
    start: Instant,
}

impl OnComplete for Completion {
    fn on_complete(self, bytes: u64, complete: bool) {
        let end = Instant::now();
        let duration = end.saturating_duration_since(self.start);
        if let Some(m) = self
            .metrics
            .as_ref()
            .or(self.ctx.route.as_deref().map(|r| &r.metrics))
        {
            m.record(self.status, duration);
        }
        // Counted out when `self` drops, at the end of this call.
        self.conn.touch(end);
        if self.access_log {
            tracing::info!(
                target: "weir::access",
                listener = %self.ctx.listener,
                client.addr = %self.conn.client,
                method = %self.method,
                path = self.target.as_ref().map_or("-", |u| u.path()),
                version = ?self.version,
                status = self.status,
                bytes,
                duration_us = duration.as_micros() as u64,
                route = self.ctx.route_name().unwrap_or("-"),
                cluster = self.ctx.cluster_name().unwrap_or("-"),
                upstream.addr = %self.upstream.map_or_else(|| "-".to_string(), |a| a.to_string()),
                request.id = show(&self.ctx.request_id),
                complete,
            );
        }
        let log_chain = self.ctx.route.as_deref().map(|r| &r.chain);
        if let Some(chain) = log_chain.filter(|c| !c.is_empty() && c.wants(crate::filter::Phase::Log)) {
            let chain = chain.clone();
            let summary = LogSummary {
                status: self.status,
                bytes,
                duration,
                upstream: self.upstream,
                method: self.method,
                target: self.target,
            };
            let ctx = self.ctx;
            // The response is sent: the log phase runs beside the connection, not in its way.
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move { chain.on_log(&ctx, &summary).await });
            }
        }
    }
}

// Header names the proxy sets on every request. As constants they cost nothing; a string
// literal given to `HeaderMap::insert` allocates a new name on every call.
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_WEIR_ATTEMPT_COUNT: HeaderName = HeaderName::from_static("x-weir-attempt-count");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_FORWARDED_CLIENT_CERT: HeaderName = HeaderName::from_static("x-forwarded-client-cert");

/// The client's `x-request-id` when it is sane, else a fresh random one (128 bits, hex).
fn request_id(headers: &HeaderMap) -> HeaderValue {
    if let Some(v) = has(headers, &X_REQUEST_ID)
        .then(|| headers.get(&X_REQUEST_ID))
        .flatten()
    {
        if !v.is_empty() && v.len() <= 128 && v.to_str().is_ok() {
            return v.clone();
        }
    }
    // Two digits per byte from a table: a nibble at a time took ~160 instructions.
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    const PAIRS: [[u8; 2]; 256] = {
        let mut t = [[0u8; 2]; 256];
        let mut i = 0;
        while i < 256 {
            t[i] = [DIGITS[i >> 4], DIGITS[i & 0xf]];
            i += 1;
        }
        t
    };
    let bytes = rand::random::<u128>().to_be_bytes();
    let mut hex = [0u8; 32];
    for (pair, b) in hex.chunks_exact_mut(2).zip(bytes) {
        pair.copy_from_slice(&PAIRS[b as usize]);
    }
    HeaderValue::from_bytes(&hex).expect("hex is a valid header value")
}

/// A header value for logs (ids and hosts are checked visible ASCII where they are made).
fn show(v: &HeaderValue) -> &str {
    v.to_str().unwrap_or("-")
}

#[allow(clippy::too_many_arguments)]
async fn forward(
    req: Request<ClientBody>,
    conn: &ConnInfo,
    gw: &Gateway,
    ls: &ListenerState,
    ctx: &mut RequestContext,
    x: &mut Exchange,
) -> Result<Response<Body>, ProxyError> {
    let limits = &ls.limits;
    // Answered by Weir's own HTTP/1.1 server (not hyper's): it writes a kept response head.
    let weir_h1 = matches!(req.body(), ClientBody::H1(_));
    check_framing(&req)?;
    if req.uri().path_and_query().map_or(0, |p| p.as_str().len()) > limits.max_uri_bytes {
        return Err(ProxyError::UriTooLong(limits.max_uri_bytes));
    }
    let client_host = client_host(&req)?;
    // CONNECT carries an authority, not a path: it routes by host alone.
    let raw_path = if req.method() == Method::CONNECT {
        "/"
    } else {
        req.uri().path()
    };
    let path = crate::path::normalize(raw_path).map_err(|_| ProxyError::BadRequest("invalid path"))?;
    let route_host = client_host.as_ref().map_or("", |h| strip_port(show(h)));
    let route = ls.routes.find(route_host, &path).ok_or(ProxyError::NoRoute)?;
    if x.target.is_none() && route.chain.wants(Phase::Log) {
        x.target = Some(req.uri().clone());
    }
    ctx.route = Some(route.clone());
    ctx.timeout = route.timeout;

    if let Some(len) = content_length(req.headers())? {
        if len > limits.max_request_body {
            return Err(ProxyError::BodyTooLarge(limits.max_request_body));
        }
    }

    let canonical = match path {
        std::borrow::Cow::Borrowed(_) => None,
        std::borrow::Cow::Owned(p) => Some(p),
    };
    let (mut parts, body) = req.into_parts();
    if let Some(p) = canonical.filter(|_| parts.method != Method::CONNECT) {
        parts.uri = with_path(&parts.uri, &p)?;
    }
    // RFC 9112 §3.2.2: with an absolute-form target the target's authority is the host, and
    // a proxy replaces `Host` with it: filters and the upstream see the host routing saw.
    if parts.version <= Version::HTTP_11 && parts.method != Method::CONNECT && parts.uri.authority().is_some()
    {
        if let Some(h) = &client_host {
            parts.headers.insert(header::HOST, h.clone());
        }
    }

    if let Some(resp) = route.chain.on_request_headers(&mut parts, ctx).await? {
        return Ok(resp);
    }
    // Borrowed from the gateway, which outlives the request: no reference count taken.
    let cluster_name = ctx.cluster_name().ok_or(ProxyError::NoRoute)?;
    let cluster = gw
        .clusters
        .get(cluster_name)
        .ok_or_else(|| ProxyError::UnknownCluster(cluster_name.to_string()))?;
    if cluster_name != &*route.cluster {
        // A filter chose another cluster: count the request under it.
        x.metrics = Some(ls_metrics_for(gw, ls, route, cluster_name));
    }

    if parts.method == Method::CONNECT {
        if !route.allow_connect {
            return Err(ProxyError::ConnectNotAllowed);
        }
        return connect_tunnel(parts, cluster.clone(), conn.slot.clone(), x).await;
    }

    // Only the protocols the route allows; another goes on as a plain request.
    let upgrade = if parts.version == Version::HTTP_11 {
        upgrade_protocol(&parts.headers).and_then(|p| route.allowed_upgrades(&p))
    } else {
        None
    };
    let on_upgrade = upgrade
        .as_ref()
        .and_then(|_| parts.extensions.remove::<hyper::upgrade::OnUpgrade>());
    strip_hop_by_hop(&mut parts.headers, true);
    if let Some(proto) = &upgrade {
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::UPGRADE, proto.clone());
    }
    // What the proxy adds goes beside the head, not into its map (four inserts into an
    // `http::HeaderMap`, ~230 instructions each): Weir's HTTP/1.1 client writes these fields
    // after the head's own; the other connections, and the copies filters read, get them put in.
    let mut added = Added::new();
    set_forwarded(
        &mut parts.headers,
        &mut added,
        ls.forwarded,
        conn,
        client_host.as_ref(),
    );
    set_client_cert(&mut parts.headers, ls.forward_client_cert, conn);
    if has(&parts.headers, &X_REQUEST_ID) {
        parts.headers.remove(&X_REQUEST_ID);
    }
    added.push((X_REQUEST_ID, Cow::Owned(ctx.request_id.clone())));

    let chain = &route.chain;
    let buffer = gw.body_buffer as usize;
    // A request with a body records why it failed, if it does (over HTTP/2 the upstream
    // exchange's error no longer says: the stream is just reset), and when it ended (the
    // request timeout runs from there).
    let watch = (!http_body::Body::is_end_stream(&body)).then(|| Arc::new(body::BodyWatch::default()));
    let limited = Limited::new(body, limits.max_request_body, limits.stream_idle_timeout);
    let mut body: Body = match &watch {
        Some(f) => limited.recording(f.clone()).boxed(),
        None => limited.boxed(),
    };
    // Request body filters: gathered first when one buffers, else streamed on the way.
    let mut body_stop = None;
    if !http_body::Body::is_end_stream(&body) && chain.wants_body(Phase::RequestBody) {
        let heads = Arc::new(Heads {
            req: with_added(crate::filter::copy_head(&parts), &added),
            resp: None,
        });
        if let Some(pipe) = Pipeline::new(chain, Phase::RequestBody, heads, ctx, buffer) {
            if pipe.buffers() {
                let (data, trailers) = match pipe.gather(body).await {
                    Ok(d) => d,
                    Err(stop) => return stopped(stop, Phase::RequestBody, None),
                };
                set_length(&mut parts.headers, &data, trailers.is_some());
                body = pipeline::body_of(data, trailers);
            } else {
                parts.headers.remove(header::CONTENT_LENGTH);
                let slot = Arc::new(Mutex::new(None));
                body = pipe.stream(body, slot.clone());
                body_stop = Some(slot);
            }
        }
    }

    // Response phases read the request head as it went upstream; copy it only if they run.
    let response_body_filters = chain.wants_body(Phase::ResponseBody);
    let response_filters = chain.wants(Phase::ResponseHeaders);
    let mut sent_head = (response_filters || response_body_filters).then(|| {
        // The copy is what goes upstream, then: the added fields go into the head itself
        // (cloning them with the map costs less than adding them to the copy too).
        put_in(&mut parts.headers, added.drain(..));
        crate::filter::copy_head(&parts)
    });
    // A response filter may ask for a retry: keep the body for a replay (up to the buffer).
    let replay = (response_filters && upgrade.is_none()).then(|| {
        let (b, h) = pipeline::recorded(std::mem::replace(&mut body, body::empty()), buffer);
        body = b;
        h
    });
    let timeout = ctx.timeout.unwrap_or(cluster.config.request_timeout);
    let mut tried: Vec<SocketAddr> = Vec::new();
    let mut attempt = 1u32;
    // Each attempt moves the head and body on; a retry sets them again. (Held in an `Option`
    // to take per attempt, the 224-byte head was copied three more times per request.)
    loop {
        let mut unsent = Some(body);
        let sent = send(
            cluster,
            route,
            parts,
            // Empty when response filters run: the head has them (and a retry's head, the
            // copy they read, too).
            &added,
            &mut unsent,
            client_host.as_ref(),
            upgrade.is_some(),
            // The response head may stay in the bytes it came in (see `RawHead`) on its way to
            // Weir's HTTP/1.1 server when no filter reads it.
            weir_h1 && !response_filters && !response_body_filters,
            Timing {
                timeout,
                body: watch.as_deref(),
                stream_idle: limits.stream_idle_timeout,
                conn,
            },
            &tried,
            x,
        )
        .await;
        // An exchange that failed because the client's body did is the client's fault.
        let sent = sent.map_err(|e| match (&e, watch.as_ref().and_then(|f| f.get())) {
            (ProxyError::Upstream { .. }, Some(body::ClientBodyFault::TooLarge(n))) => {
                ProxyError::BodyTooLarge(n)
            }
            (ProxyError::Upstream { .. }, Some(body::ClientBodyFault::Idle(d))) => ProxyError::BodyIdle(d),
            _ => e,
        });
        // A streamed request body filter that stopped the body decides the answer.
        if let Some(stop) = body_stop
            .as_ref()
            .and_then(|s| s.lock().expect("stop lock").take())
        {
            return stopped(stop, Phase::RequestBody, x.upstream);
        }
        let mut raw = None;
        let (mut rparts, rbody) = match sent {
            Ok((resp, ep, kept)) => {
                raw = kept;
                ctx.upstream = Some(ep.addr);
                let (mut rparts, rbody) = resp.into_parts();
                if rparts.status == StatusCode::SWITCHING_PROTOCOLS {
                    let (Some(offered), Some(down), UpstreamBody::Incoming(rbody)) =
                        (upgrade, on_upgrade, rbody)
                    else {
                        return Err(ProxyError::Upstream {
                            addr: ep.addr,
                            reason: "unrequested 101 response".into(),
                        });
                    };
                    // The upstream's choice, which must be one of those the proxy offered it
                    // (the route's): switching to another would open a tunnel the route
                    // does not allow.
                    let Some(chosen) = rparts
                        .headers
                        .get(header::UPGRADE)
                        .filter(|c| crate::route::upgrade_among(c, &offered))
                        .cloned()
                    else {
                        return Err(ProxyError::Upstream {
                            addr: ep.addr,
                            reason: "101 to a protocol that was not offered".into(),
                        });
                    };
                    let up = hyper::upgrade::on(Response::from_parts(rparts.clone(), rbody));
                    strip_hop_by_hop(&mut rparts.headers, false);
                    rparts
                        .headers
                        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                    rparts.headers.insert(header::UPGRADE, chosen);
                    tokio::spawn(tunnel(down, up, ep.addr, conn.slot.clone()));
                    return Ok(Response::from_parts(rparts, body::empty()));
                }
                strip_hop_by_hop(&mut rparts.headers, false);
                // A proxy sends its own HTTP version (RFC 9110 §6.2): an HTTP/1.0 upstream's
                // answer went out as "HTTP/1.0" and closed the client's connection.
                rparts.version = Version::HTTP_11;
                (rparts, rbody.boxed(limits.stream_idle_timeout))
            }
            // Response filters see the proxy's own answer to an upstream failure (502, 503,
            // 504 with its `x-weir-error` reason): resilience policy may retry it, replace it
            // or count it against a circuit breaker.
            Err(e) if response_filters && e.is_upstream_failure() => {
                tracing::warn!(listener = %ctx.listener, route = ctx.route_name(), cluster = ctx.cluster_name(), request.id = show(&ctx.request_id), attempt, error = %e, "upstream failed");
                ctx.upstream = e.upstream_addr();
                e.to_response().into_parts()
            }
            Err(e) => return Err(e),
        };
        if let (Some(req), true) = (sent_head.as_mut(), response_filters) {
            match chain.on_response_headers(req, &mut rparts, ctx).await? {
                Verdict::Continue => {}
                Verdict::Respond(resp) => return Ok(resp),
                // A body that never left (no endpoint could be reached) goes as it is;
                // otherwise what was recorded of it and the rest as it comes, if it fits the
                // buffer. Taking it cuts the last attempt off the body: only once retrying.
                Verdict::Retry => match (attempt < limits::MAX_ATTEMPTS)
                    .then(|| replay.as_ref().and_then(|r| unsent.take().or_else(|| r.body())))
                    .flatten()
                {
                    Some(again) => {
                        attempt += 1;
                        if let Some(a) = ctx.upstream.take() {
                            tried.push(a);
                        }
                        let delay = ctx
                            .retry_delay
                            .take()
                            .unwrap_or_default()
                            .min(limits::MAX_RETRY_DELAY);
                        tracing::debug!(attempt, delay = ?delay, request.id = show(&ctx.request_id), "retry asked by a filter");
                        drop(rbody);
                        if !delay.is_zero() {
                            tokio::time::sleep(delay).await;
                        }
                        // Like Envoy's x-envoy-attempt-count: the upstream and the response
                        // filters of the next attempt see which attempt it is.
                        req.headers
                            .insert(X_WEIR_ATTEMPT_COUNT, HeaderValue::from(attempt));
                        (parts, body) = (crate::filter::copy_head(req), again);
                        continue;
                    }
                    _ => {
                        tracing::debug!(
                            attempt,
                            request.id = show(&ctx.request_id),
                            "retry asked but not possible (attempts spent or body not kept)"
                        );
                    }
                },
            }
        }
        let mut rbody = rbody;
        if response_body_filters && !http_body::Body::is_end_stream(&rbody) {
            let heads = Arc::new(Heads {
                req: sent_head.take().expect("copied when response body filters run"),
                resp: Some(copy_response_head(&rparts)),
            });
            if let Some(pipe) = Pipeline::new(chain, Phase::ResponseBody, heads, ctx, buffer) {
                if pipe.buffers() {
                    let (data, trailers) = match pipe.gather(rbody).await {
                        Ok(d) => d,
                        Err(stop) => return stopped(stop, Phase::ResponseBody, ctx.upstream),
                    };
                    set_length(&mut rparts.headers, &data, trailers.is_some());
                    rbody = pipeline::body_of(data, trailers);
                } else {
                    rparts.headers.remove(header::CONTENT_LENGTH);
                    // A response stopped mid-stream can only be cut: the head has left.
                    rbody = pipe.stream(rbody, Arc::new(Mutex::new(None)));
                }
            }
        }
        x.raw = raw;
        return Ok(Response::from_parts(rparts, rbody));
    }
}

/// The length header of a body a filter pipeline gathered (and possibly rewrote).
fn set_length(h: &mut HeaderMap, data: &Bytes, trailers: bool) {
    if trailers {
        // HTTP/1.1 carries trailers only in chunked bodies.
        h.remove(header::CONTENT_LENGTH);
    } else {
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(data.len()));
    }
}

fn copy_response_head(p: &http::response::Parts) -> http::response::Parts {
    let mut r = Response::new(());
    *r.status_mut() = p.status;
    *r.version_mut() = p.version;
    *r.headers_mut() = p.headers.clone();
    r.into_parts().0
}

/// The answer when a body pipeline stopped.
fn stopped(stop: Stop, phase: Phase, upstream: Option<SocketAddr>) -> Result<Response<Body>, ProxyError> {
    let unspecified = || SocketAddr::from(([0, 0, 0, 0], 0));
    match (stop, phase) {
        (Stop::Respond(r), _) => Ok(r),
        (Stop::Failed(e), _) => Err(e),
        (Stop::TooLarge(n), Phase::RequestBody) => Err(ProxyError::BodyTooLarge(n as u64)),
        (Stop::TooLarge(n), _) => Err(ProxyError::Upstream {
            addr: upstream.unwrap_or_else(unspecified),
            reason: format!("response body larger than the filter buffer of {n} bytes"),
        }),
        (Stop::Body(e), Phase::RequestBody) => {
            if let Some(t) = e.downcast_ref::<body::BodyTooLarge>() {
                Err(ProxyError::BodyTooLarge(t.limit))
            } else if let Some(t) = e.downcast_ref::<body::BodyIdle>() {
                Err(ProxyError::BodyIdle(t.0))
            } else {
                Err(ProxyError::BadRequest("request body failed"))
            }
        }
        (Stop::Body(e), _) => Err(ProxyError::Upstream {
            addr: upstream.unwrap_or_else(unspecified),
            reason: format!("response body failed: {e}"),
        }),
    }
}

fn ls_metrics_for(gw: &Gateway, ls: &ListenerState, route: &Route, cluster: &str) -> RouteMetrics {
    // Only reached when a filter re-targets a request; the family lookup allocates, the
    // default path does not.
    gw.metrics.route(&ls.name, &route.name, cluster)
}

/// Sends the request to an endpoint of the cluster. Connect failures try other endpoints
/// (the request has not left yet). A request that may safely go twice (see [`replayable`])
/// and lost a pooled connection that had rested (see [`limits::RESEND_AFTER_IDLE`]) before any
/// response goes again once, on a new connection to the same endpoint; nothing else is retried
/// here.
#[allow(clippy::too_many_arguments)]
async fn send(
    cluster: &Cluster,
    route: &Route,
    mut parts: http::request::Parts,
    added: crate::h1::client::Added<'_>,
    body: &mut Option<Body>,
    client_host: Option<&HeaderValue>,
    upgrade: bool,
    keep_head: bool,
    timing: Timing<'_>,
    avoid: &[SocketAddr],
    x: &mut Exchange,
) -> Result<(Response<UpstreamBody>, Arc<Endpoint>, Option<RawHead>), ProxyError> {
    let timeout = timing.timeout;
    // A retry goes to an endpoint not tried yet when the cluster has one.
    // Inline: one endpoint is tried per request almost always, and this runs on every one.
    let mut tried: smallvec::SmallVec<[SocketAddr; 4]> = avoid.iter().copied().collect();
    let mut connects = 0;
    let mut last_err = None;
    let (ep, mut conn, connecting) = loop {
        if connects >= limits::CONNECT_ATTEMPTS {
            break Err(last_err.expect("set after a failed attempt"));
        }
        let picked = match cluster.pick(&tried) {
            None if connects == 0 && !avoid.is_empty() => {
                // Every endpoint was tried: at least not the one that just failed.
                tried = avoid[avoid.len() - 1..].iter().copied().collect();
                cluster.pick(&tried).or_else(|| {
                    tried.clear();
                    cluster.pick(&tried)
                })
            }
            p => p,
        };
        let Some(ep) = picked else {
            break Err(last_err.unwrap_or_else(|| ProxyError::NoHealthyEndpoint(cluster.name.to_string())));
        };
        connects += 1;
        tried.push(ep.addr);
        // The endpoint's load from now: a request waiting on a connect (to a slow or
        // blackholed endpoint) weighs on its peak-EWMA cost as one waiting on a response, or
        // the balancer keeps sending it requests until the connect timeout ejects it.
        let connecting = ep.load.start();
        match cluster.checkout(&ep, upgrade).await {
            Ok(c) => break Ok((ep, c, connecting)),
            Err(e) => {
                last_err = Some(ProxyError::Connect {
                    addr: ep.addr,
                    reason: e.0,
                })
            }
        }
    }?;
    x.upstream = Some(ep.addr);

    // Host / :authority per route config; by default the client's, which an HTTP/1.1 request
    // already carries in its Host header.
    let host: Option<HeaderValue> = if let Some(h) = &route.host_rewrite {
        Some(h.clone())
    } else if route.auto_host_rewrite {
        HeaderValue::from_str(&ep.authority).ok()
    } else if parts.headers.contains_key(header::HOST) {
        None
    } else {
        // HTTP/1.0 and HTTP/2 clients may name no host; an HTTP/1.1 request must carry one
        // (RFC 9112 §3.2): the endpoint's, as for HTTP/2 upstreams below.
        client_host
            .cloned()
            .or_else(|| HeaderValue::from_str(&ep.authority).ok())
    };
    let pq = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    if let Conn::Http2(_) = &conn {
        let scheme = if cluster.config.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let authority = match host
            .as_ref()
            .or(parts.headers.get(header::HOST))
            .and_then(|h| h.to_str().ok())
        {
            Some(a) => a.to_string(),
            None => ep.authority.to_string(),
        };
        parts.uri = Uri::builder()
            .scheme(scheme)
            .authority(authority)
            .path_and_query(pq)
            .build()
            .map_err(|_| ProxyError::BadRequest("invalid authority"))?;
        parts.version = Version::HTTP_2;
        parts.headers.remove(header::HOST);
    } else {
        parts.uri = Uri::from(pq);
        if parts.version == Version::HTTP_2 {
            join_cookies(&mut parts.headers);
        }
        parts.version = Version::HTTP_11;
        if let Some(h) = host {
            parts.headers.insert(header::HOST, h);
        }
    }
    // Only Weir's own HTTP/1.1 client writes the added fields beside the head.
    if !matches!(conn, Conn::Http1(_)) {
        put_in(&mut parts.headers, added.iter().cloned());
    }
    // A head to send again if the pooled connection turns out closed under the request.
    let mut again = match &conn {
        Conn::Http1(c) if c.rested() && replayable(&parts, body.as_ref()) => {
            Some(crate::filter::copy_head(&parts))
        }
        _ => None,
    };
    // Taken only now: when no endpoint could be reached the body stays with the caller,
    // unread, for a retry to send.
    let mut req_body = body.take().expect("a body for every attempt");
    // When the exchange began: a request sent again has what is left of the timeout.
    let mut began = None;
    let mut connecting = Some(connecting);
    loop {
        let pending = connecting.take().unwrap_or_else(|| ep.load.start());
        let sent = Instant::now();
        let began = *began.get_or_insert(sent);
        let deadline = match timing.body.filter(|b| b.ended_at().is_none()) {
            // The deadline from the clock read that times the exchange (`timeout` would read it
            // again).
            None => {
                let until = tokio::time::Instant::from_std(far(began, timeout));
                match timing.conn.lend_timer(until) {
                    Some(timer) => Deadline::Lent { timer },
                    None => Deadline::At {
                        sleep: tokio::time::sleep_until(until),
                    },
                }
            }
            // Boxed: only requests whose body is still on its way pay for it.
            Some(body) => Deadline::AfterUpload {
                timer: Box::pin(timing.after_upload(body, began)),
            },
        };
        let result = match conn {
            Conn::Http1(c) => (Timed {
                fut: c.send(
                    &parts,
                    req_body,
                    added,
                    keep_head,
                    &ep,
                    cluster.config.max_idle_per_endpoint,
                ),
                deadline,
            })
            .await
            .map(|r| r.map(|(resp, raw)| (resp.map(UpstreamBody::Pooled), raw))),
            // Two hyper types, one outcome: a response whose body has its own connection task.
            Conn::Http1Upgradable(mut s) => incoming(
                Timed {
                    fut: s.send_request(Request::from_parts(parts, req_body)),
                    deadline,
                }
                .await,
            ),
            Conn::Http2(mut s) => incoming(
                Timed {
                    fut: s.send_request(Request::from_parts(parts, req_body)),
                    deadline,
                }
                .await,
            ),
        };
        drop(pending);
        if let Ok(Err(f)) = &result {
            if let Some(head) = again
                .take()
                .filter(|_| f.closed && ep.is_available(Instant::now()))
            {
                // Not the endpoint's failure nor its latency: the connection's. Like Go's HTTP
                // client and nginx with a cached upstream connection, send the request again,
                // within the request's timeout.
                tracing::debug!(upstream.addr = %ep.addr, error = %f.reason, "pooled connection closed under the request; sending it again on a new one");
                let until = tokio::time::Instant::from_std(far(began, timeout));
                conn = match tokio::time::timeout_at(until, cluster.reconnect(&ep)).await {
                    Ok(Ok(c)) => Conn::Http1(c),
                    // The request did reach the endpoint: not a connect failure (which would
                    // tell filters it never left).
                    Ok(Err(e)) => {
                        return Err(ProxyError::Upstream {
                            addr: ep.addr,
                            reason: format!("{}; a new connection failed: {e}", f.reason),
                        })
                    }
                    Err(_) => {
                        return Err(ProxyError::Timeout {
                            addr: ep.addr,
                            timeout,
                        })
                    }
                };
                (parts, req_body) = (head, body::empty());
                continue;
            }
        }
        // Every outcome is a latency observation: peak-EWMA must see slow and failing endpoints,
        // not slow clients: from the end of the request body.
        let done = Instant::now();
        let from = timing
            .body
            .and_then(|b| b.ended_at())
            .map_or(sent, |e| e.max(sent));
        ep.load.observe_at(done, done.saturating_duration_since(from));
        return match result {
            Ok(Ok((resp, raw))) => Ok((resp, ep, raw)),
            Ok(Err(f)) => Err(ProxyError::Upstream {
                addr: ep.addr,
                reason: f.reason,
            }),
            Err(_) => Err(ProxyError::Timeout {
                addr: ep.addr,
                timeout,
            }),
        };
    }
}

/// HTTP/2 clients may split `Cookie` into several fields, for HPACK (browsers send one per
/// cookie); HTTP/1.1 allows one. RFC 9113, section 8.2.3: join them with "; " before the
/// request goes on over HTTP/1.1 (an HTTP/1.1 server reads only one, or joins them with ",").
fn join_cookies(headers: &mut HeaderMap) {
    let mut all = headers.get_all(header::COOKIE).iter();
    let (Some(_), Some(_)) = (all.next(), all.next()) else {
        return;
    };
    let mut joined = Vec::new();
    for v in headers.get_all(header::COOKIE) {
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(v.as_bytes());
    }
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, v);
    }
}

/// Whether a request may be sent a second time after its connection failed under it: it may
/// ([`crate::cluster::may_resend`]) and has no body to send again (the body streamed,
/// nothing kept it).
fn replayable(parts: &http::request::Parts, body: Option<&Body>) -> bool {
    crate::cluster::may_resend(&parts.method, &parts.headers)
        && body.is_some_and(http_body::Body::is_end_stream)
}

/// An upstream's response, and its head as it came when Weir's HTTP/1.1 client kept it so.
type Upstream = (Response<UpstreamBody>, Option<RawHead>);

/// A timed exchange's outcome on a connection with its own task (HTTP/2, upgrades).
fn incoming(r: Result<hyper::Result<Response<Incoming>>, ()>) -> Result<Result<Upstream, SendFailed>, ()> {
    r.map(|r| {
        r.map(|resp| (resp.map(UpstreamBody::Incoming), None))
            .map_err(|e| SendFailed {
                reason: describe(&e),
                closed: false,
            })
    })
}

/// `at + d`, or 30 years on when that overflows.
fn far(at: Instant, d: Duration) -> Instant {
    at.checked_add(d)
        .unwrap_or_else(|| at + Duration::from_secs(86_400 * 365 * 30))
}

pin_project_lite::pin_project! {
    /// An exchange under its deadline; `Err` once the deadline passed. The exchange is polled
    /// first, as `tokio::time::Timeout` does.
    struct Timed<'a, F> {
        #[pin]
        fut: F,
        #[pin]
        deadline: Deadline<'a>,
    }
}

/// A connection's request timer lent to one exchange, back home when the exchange ends.
struct LentTimer<'a> {
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    until: tokio::time::Instant,
    home: &'a Mutex<RequestTimer>,
}

impl LentTimer<'_> {
    fn poll(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        let sleep = self.sleep.as_mut().expect("held until dropped");
        // Armed later than this exchange's deadline (a route with a shorter timeout): pulled in.
        if sleep.deadline() > self.until {
            sleep.as_mut().reset(self.until);
        }
        loop {
            std::task::ready!(sleep.as_mut().poll(cx));
            if sleep.deadline() >= self.until {
                return std::task::Poll::Ready(());
            }
            // Fired for an earlier exchange's deadline: on to this one's.
            sleep.as_mut().reset(self.until);
        }
    }
}

impl Drop for LentTimer<'_> {
    fn drop(&mut self) {
        if let Some(s) = self.sleep.take() {
            *self.home.lock().unwrap_or_else(PoisonError::into_inner) = RequestTimer::Idle(s);
        }
    }
}

pin_project_lite::pin_project! {
    /// When an exchange times out: at an instant, or per [`Timing::after_upload`].
    #[project = DeadlineProj]
    enum Deadline<'a> {
        At {
            #[pin]
            sleep: tokio::time::Sleep,
        },
        Lent {
            timer: LentTimer<'a>,
        },
        AfterUpload {
            timer: Pin<Box<dyn Future<Output = ()> + Send + 'a>>,
        },
    }
}

impl<F: Future> Future for Timed<'_, F> {
    type Output = Result<F::Output, ()>;

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        let this = self.project();
        if let std::task::Poll::Ready(v) = this.fut.poll(cx) {
            return std::task::Poll::Ready(Ok(v));
        }
        let expired = match this.deadline.project() {
            DeadlineProj::At { sleep } => sleep.poll(cx),
            DeadlineProj::Lent { timer } => timer.poll(cx),
            DeadlineProj::AfterUpload { timer } => timer.as_mut().poll(cx),
        };
        expired.map(|()| Err(()))
    }
}

/// When an exchange times out.
#[derive(Clone, Copy)]
struct Timing<'a> {
    /// The request timeout: from the end of the request (its body's, if it has one) to the
    /// response head, as Envoy's route timeout.
    timeout: Duration,
    /// The request body, for requests with one.
    body: Option<&'a body::BodyWatch>,
    /// How long an upload may stand still before the exchange gives up on it.
    stream_idle: Duration,
    /// The client connection, whose request timer an exchange borrows.
    conn: &'a ConnInfo,
}

impl Timing<'_> {
    /// Resolves when the exchange has timed out, for a request whose body is still on its
    /// way: `timeout` after the body ended (or after `sent`, for a retry of a body that had
    /// ended before); `timeout` after `sent` if the upstream side never asked for the body
    /// (an HTTP/2 connection at its stream limit, say); or once the upload has not moved for
    /// the stream idle timeout (checked in windows of it: 1 to 2 times it after the last
    /// frame). A client that stops sending gets 408 from the body's own idle timer first;
    /// this sees an upstream that stopped reading (then nothing polls the body).
    async fn after_upload(self, body: &body::BodyWatch, sent: Instant) {
        let mut frames = body.frames();
        let first = tokio::time::sleep_until(tokio::time::Instant::from_std(far(sent, self.timeout)));
        tokio::pin!(first);
        let mut asked = false;
        let ended = loop {
            tokio::select! {
                t = body.ended() => break t,
                _ = &mut first, if !asked => {
                    if !body.polled() {
                        return;
                    }
                    asked = true;
                }
                _ = tokio::time::sleep(self.stream_idle) => {
                    let now = body.frames();
                    if now == frames {
                        return;
                    }
                    frames = now;
                }
            }
        };
        tokio::time::sleep_until(tokio::time::Instant::from_std(far(ended.max(sent), self.timeout))).await;
    }
}

/// An upstream response body: from a pooled HTTP/1.1 connection the request drives, or from a
/// connection with its own task (HTTP/2, upgrades).
pub enum UpstreamBody {
    /// Driven by its own connection task.
    Incoming(Incoming),
    /// Drives its pooled connection.
    Pooled(PooledBody),
}

impl UpstreamBody {
    /// The body as the proxy passes it on, failing when the upstream sends nothing for
    /// `idle` (whether the client, a buffering filter or nobody reads it).
    fn boxed(self, idle: Duration) -> Body {
        match self {
            UpstreamBody::Incoming(b) => Limited::new(b, u64::MAX, idle).boxed(),
            UpstreamBody::Pooled(b) => Limited::new(b, u64::MAX, idle).boxed(),
        }
    }
}

/// `_slot`: the client connection's place (cap, gauge, drain), held while the tunnel lives.
async fn tunnel(
    down: hyper::upgrade::OnUpgrade,
    up: hyper::upgrade::OnUpgrade,
    addr: SocketAddr,
    _slot: Arc<dyn std::any::Any + Send + Sync>,
) {
    let (down, up) = match tokio::join!(down, up) {
        (Ok(d), Ok(u)) => (d, u),
        (d, u) => {
            tracing::debug!(upstream.addr = %addr, downstream_ok = d.is_ok(), upstream_ok = u.is_ok(), "upgrade failed");
            return;
        }
    };
    let (mut d, mut u) = (TokioIo::new(down), TokioIo::new(up));
    match tokio::io::copy_bidirectional(&mut d, &mut u).await {
        Ok((to_up, to_down)) => {
            tracing::debug!(upstream.addr = %addr, to_up, to_down, "tunnel closed")
        }
        Err(e) => tracing::debug!(upstream.addr = %addr, error = %e, "tunnel ended with error"),
    }
}

/// `CONNECT` on a route that allows it: a raw byte tunnel to an endpoint of the cluster,
/// opened before answering 200, so the client only gets 200 for a tunnel that exists.
async fn connect_tunnel(
    mut parts: http::request::Parts,
    cluster: Arc<Cluster>,
    slot: Arc<dyn std::any::Any + Send + Sync>,
    x: &mut Exchange,
) -> Result<Response<Body>, ProxyError> {
    let down = parts
        .extensions
        .remove::<hyper::upgrade::OnUpgrade>()
        .ok_or(ProxyError::UpgradeUnsupported("connection cannot be upgraded"))?;
    let mut tried = Vec::new();
    let mut last_err = None;
    let (stream, addr) = loop {
        if tried.len() >= limits::CONNECT_ATTEMPTS {
            return Err(last_err.expect("set after a failed attempt"));
        }
        let Some(ep) = cluster.pick(&tried) else {
            return Err(last_err.unwrap_or_else(|| ProxyError::NoHealthyEndpoint(cluster.name.to_string())));
        };
        tried.push(ep.addr);
        match cluster.connect(&ep, false).await {
            Ok(s) => break (s, ep.addr),
            Err(e) => {
                last_err = Some(ProxyError::Connect {
                    addr: ep.addr,
                    reason: e.0,
                })
            }
        }
    };
    x.upstream = Some(addr);
    tokio::spawn(async move {
        // The client connection's place (cap, gauge, drain) is held while the tunnel lives.
        let _slot = slot;
        match down.await {
            Ok(up) => {
                let (mut d, mut u) = (TokioIo::new(up), stream);
                let _ = tokio::io::copy_bidirectional(&mut d, &mut u).await;
            }
            Err(e) => tracing::debug!(upstream.addr = %addr, error = %e, "CONNECT upgrade failed"),
        }
    });
    Ok(Response::new(body::empty()))
}

/// Framing an edge proxy must refuse (request smuggling); Weir's HTTP/1.1 server refuses it
/// before the request path, this is for the requests hyper reads (after a handoff).
/// Whether `h` has a field `name`. A small map (most requests and responses carry a handful of
/// fields) is scanned: cheaper than hashing the name, which `HeaderMap` does a byte at a time,
/// to look for a field that is usually absent (~100 instructions a lookup, six per request).
fn has(h: &HeaderMap, name: &HeaderName) -> bool {
    if h.keys_len() <= 16 {
        h.keys().any(|k| k == name)
    } else {
        h.contains_key(name)
    }
}

fn check_framing(req: &Request<ClientBody>) -> Result<(), ProxyError> {
    if req.version() > Version::HTTP_11 {
        return Ok(());
    }
    if !has(req.headers(), &header::TRANSFER_ENCODING) {
        return Ok(());
    }
    let mut te = req.headers().get_all(header::TRANSFER_ENCODING).iter();
    if let Some(v) = te.next() {
        // hyper insists that chunked is last; we also refuse lists and repeats, as nginx does.
        if te.next().is_some() || !v.as_bytes().eq_ignore_ascii_case(b"chunked") {
            return Err(ProxyError::BadRequest("unsupported transfer-encoding"));
        }
    }
    Ok(())
}

/// The host the client addressed: the absolute-form/`:authority` authority, else `Host`.
/// The value is checked to be a valid authority, so it is visible ASCII.
fn client_host(req: &Request<ClientBody>) -> Result<Option<HeaderValue>, ProxyError> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(ProxyError::BadRequest("more than one host header"));
    }
    if let Some(auth) = req.uri().authority() {
        if req.version() == Version::HTTP_2 {
            if let Some(h) = host {
                if !h.as_bytes().eq_ignore_ascii_case(auth.as_str().as_bytes()) {
                    return Err(ProxyError::BadRequest(":authority and host disagree"));
                }
            }
        }
        // No userinfo (RFC 9113 §8.3.1, RFC 9110 §4.2.4): `user@a` is not host `a` to every
        // upstream, and routing would see neither.
        if auth.as_str().contains('@') {
            return Err(ProxyError::BadRequest("userinfo in the authority"));
        }
        // RFC 9112 §3.2.2: an absolute-form target wins over Host.
        let v =
            HeaderValue::from_str(auth.as_str()).map_err(|_| ProxyError::BadRequest("invalid authority"))?;
        return Ok(Some(v));
    }
    match host {
        None if req.version() == Version::HTTP_11 => Err(ProxyError::BadRequest("missing host header")),
        None => Ok(None),
        Some(h) => {
            if !valid_host(h) {
                return Err(ProxyError::BadRequest("invalid host header"));
            }
            Ok(Some(h.clone()))
        }
    }
}

/// Whether an authority's port, if it names one, is a port: digits up to 65535 (`http`'s
/// authority parser takes `a.example:80x`; nginx answers it 400, as Weir does).
fn port_ok(authority: &str) -> bool {
    let rest = if authority.starts_with('[') {
        authority.find(']').map_or("", |i| &authority[i + 1..])
    } else {
        authority.rfind(':').map_or("", |i| &authority[i..])
    };
    match rest.strip_prefix(':') {
        None => rest.is_empty(),
        Some(p) => {
            p.len() <= 5
                && p.bytes().all(|c| c.is_ascii_digit())
                && p.parse::<u32>().map_or(p.is_empty(), |n| n <= 65535)
        }
    }
}

/// Whether a `Host` value is a valid authority without userinfo (RFC 9112 §3.2: host and
/// port). The last valid one is remembered per thread: keep-alive clients send the same
/// `Host` on every request, and parsing it as an authority took ~500 instructions.
fn valid_host(h: &HeaderValue) -> bool {
    const KEPT: usize = 64;
    thread_local! {
        static LAST: std::cell::RefCell<([u8; KEPT], usize)> = const { std::cell::RefCell::new(([0; KEPT], 0)) };
    }
    let b = h.as_bytes();
    let cacheable = !b.is_empty() && b.len() <= KEPT;
    if cacheable && LAST.with_borrow(|(last, n)| &last[..*n] == b) {
        return true;
    }
    let valid = h
        .to_str()
        .ok()
        .is_some_and(|s| !s.contains('@') && http::uri::Authority::try_from(s).is_ok() && port_ok(s));
    if valid && cacheable {
        LAST.with_borrow_mut(|(last, n)| {
            last[..b.len()].copy_from_slice(b);
            *n = b.len();
        });
    }
    valid
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.split_once(']').map_or(host, |(h, _)| &h[1..]);
    }
    host.rsplit_once(':').map_or(host, |(h, p)| {
        if p.bytes().all(|b| b.is_ascii_digit()) {
            h
        } else {
            host
        }
    })
}

fn content_length(h: &HeaderMap) -> Result<Option<u64>, ProxyError> {
    if !has(h, &header::CONTENT_LENGTH) {
        return Ok(None);
    }
    match h.get(header::CONTENT_LENGTH) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .map(Some)
            .ok_or(ProxyError::BadRequest("invalid content-length")),
    }
}

fn with_path(uri: &Uri, path: &str) -> Result<Uri, ProxyError> {
    let pq = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(pq.parse().map_err(|_| ProxyError::BadRequest("invalid path"))?);
    Uri::from_parts(parts).map_err(|_| ProxyError::BadRequest("invalid path"))
}

/// The protocol a client asks to upgrade to, when the request is a valid HTTP/1.1 upgrade.
fn upgrade_protocol(h: &HeaderMap) -> Option<HeaderValue> {
    if !has(h, &header::CONNECTION) {
        return None;
    }
    let wants = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if wants {
        h.get(header::UPGRADE).cloned()
    } else {
        None
    }
}

/// Hop-by-hop headers of RFC 9110 §7.6.1 plus the legacy ones every proxy strips. Not
/// `Trailer`: RFC 9110 §6.6.2 makes it end to end (RFC 2616 listed it), and an HTTP/1.1 hop
/// sends only the trailer fields it names.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRANSFER_ENCODING,
];

/// Removes hop-by-hop headers and every header named in `Connection`. On requests, `te:
/// trailers` survives: gRPC needs it end to end and it is the one TE value h2 allows.
/// `Content-Length` is left to hyper, which derives framing from the body it sends.
pub fn strip_hop_by_hop(h: &mut HeaderMap, request: bool) {
    // Most messages carry none of them: one pass over the names present (standard names
    // compare as small integers) costs less than a hashed lookup per hop-by-hop name.
    if !h.keys().any(|n| n == header::UPGRADE || HOP_BY_HOP.contains(n)) {
        return;
    }
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    let te_trailers = request
        && h.get_all(header::TE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("trailers"));
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        h.remove(name);
    }
    h.remove(header::UPGRADE);
    if te_trailers {
        h.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// `X-Forwarded-Client-Cert` as Envoy writes it; a client-sent one is never trusted.
fn set_client_cert(h: &mut HeaderMap, enabled: bool, conn: &ConnInfo) {
    if has(h, &X_FORWARDED_CLIENT_CERT) {
        h.remove(&X_FORWARDED_CLIENT_CERT);
    }
    let Some(peer) = conn.tls.as_ref().and_then(|t| t.peer.as_ref()) else {
        return;
    };
    if !enabled {
        return;
    }
    let mut v = format!("Subject=\"{}\"", peer.subject.replace('"', "\\\""));
    for uri in &peer.uri_sans {
        v.push_str(";URI=");
        v.push_str(uri);
    }
    for dns in &peer.dns_sans {
        v.push_str(";DNS=");
        v.push_str(dns);
    }
    if let Ok(v) = HeaderValue::from_str(&v) {
        h.insert(X_FORWARDED_CLIENT_CERT, v);
    }
}

fn set_forwarded<'a>(
    h: &mut HeaderMap,
    added: &mut Added<'a>,
    mode: ForwardedMode,
    conn: &'a ConnInfo,
    host: Option<&'a HeaderValue>,
) {
    let proto = HeaderValue::from_static(if conn.tls.is_some() { "https" } else { "http" });
    match mode {
        ForwardedMode::Off => {}
        ForwardedMode::Overwrite => {
            for name in [&X_FORWARDED_FOR, &X_FORWARDED_PROTO, &X_FORWARDED_HOST] {
                if has(h, name) {
                    h.remove(name);
                }
            }
            added.push((X_FORWARDED_FOR, Cow::Borrowed(&conn.client_ip)));
            added.push((X_FORWARDED_PROTO, Cow::Owned(proto)));
            if let Some(v) = host {
                added.push((X_FORWARDED_HOST, Cow::Borrowed(v)));
            }
        }
        ForwardedMode::Append => {
            // Every field line, in order (RFC 9110 §5.3): the hops a CDN appended in a line
            // of its own count as much as the first line's.
            let xff = if has(h, &X_FORWARDED_FOR) {
                let mut v = Vec::new();
                for prev in h.get_all(&X_FORWARDED_FOR) {
                    v.extend_from_slice(prev.as_bytes());
                    v.extend_from_slice(b", ");
                }
                v.extend_from_slice(conn.client_ip.as_bytes());
                h.remove(&X_FORWARDED_FOR);
                HeaderValue::from_bytes(&v).map_or(Cow::Borrowed(&conn.client_ip), Cow::Owned)
            } else {
                Cow::Borrowed(&conn.client_ip)
            };
            added.push((X_FORWARDED_FOR, xff));
            if !has(h, &X_FORWARDED_PROTO) {
                added.push((X_FORWARDED_PROTO, Cow::Owned(proto)));
            }
            if let Some(v) = host.filter(|_| !has(h, &X_FORWARDED_HOST)) {
                added.push((X_FORWARDED_HOST, Cow::Borrowed(v)));
            }
        }
    }
}

/// Fields the proxy adds to a request on its way upstream, kept beside its head (see
/// `forward`).
type Added<'a> = smallvec::SmallVec<[(HeaderName, Cow<'a, HeaderValue>); 4]>;

/// Appends `fields` after one reservation for all of them (`HeaderMap::extend` reserves room
/// for half of them in a map that is not empty, and then grows again).
fn put_in<'a>(h: &mut HeaderMap, fields: impl ExactSizeIterator<Item = (HeaderName, Cow<'a, HeaderValue>)>) {
    h.reserve(fields.len());
    for (name, value) in fields {
        h.append(name, value.into_owned());
    }
}

/// A head copy with the added fields put in, for filters that read the head as it went.
fn with_added(mut head: http::request::Parts, added: &Added<'_>) -> http::request::Parts {
    put_in(&mut head.headers, added.iter().cloned());
    head
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A gateway of one listener with no routes, clusters or filters.
    fn empty_gateway(metrics: &Arc<Metrics>) -> Gateway {
        let toml = "[[listeners]]\nname = \"web\"\naddress = \"127.0.0.1:0\"\n";
        let config = Config::from_toml(toml, "weir.toml", std::path::Path::new(".")).expect("a config");
        Gateway::assemble(
            &config,
            metrics,
            Default::default(),
            &Default::default(),
            &Default::default(),
        )
    }

    #[test]
    fn a_connection_takes_the_gateway_published_last_and_holds_no_replaced_one() {
        let metrics = Arc::new(Metrics::new());
        let shared = Arc::new(Shared::new(empty_gateway(&metrics), metrics.clone()));
        let mut current = CurrentGateway::new(shared.clone());
        let first = current.get();
        assert!(Arc::ptr_eq(&first, &shared.gateway()));
        assert!(
            Arc::ptr_eq(&first, &current.get()),
            "nothing published: the same one"
        );

        let second = Arc::new(empty_gateway(&metrics));
        shared.publish(second.clone());
        // Only the test's own handle keeps the first alive now: the connection's is weak.
        let (first, first_held) = (Arc::downgrade(&first), first);
        drop(first_held);
        assert!(
            first.upgrade().is_none(),
            "a replaced gateway is not kept by an idle connection"
        );
        assert!(
            Arc::ptr_eq(&current.get(), &second),
            "the next request takes the new one"
        );

        // A gateway published again after one was dropped: the count moved, it is loaded.
        let third = Arc::new(empty_gateway(&metrics));
        shared.publish(third.clone());
        drop(second);
        assert!(Arc::ptr_eq(&current.get(), &third));
    }

    #[test]
    fn a_kept_response_head_has_none_of_the_fields_the_map_path_strips() {
        // `RawHead` is kept only without these: the two lists must name the same fields.
        for name in HOP_BY_HOP.iter().chain([&header::UPGRADE]) {
            let n = name.as_str();
            assert!(crate::h1::is_hop_by_hop(n.as_bytes()), "{n}");
            assert!(crate::h1::is_hop_by_hop(n.to_ascii_uppercase().as_bytes()), "{n}");
        }
        for n in ["host", "content-length", "x-te", "tea", "connections", "date"] {
            assert!(!crate::h1::is_hop_by_hop(n.as_bytes()), "{n}");
        }
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("close, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers, deflate"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.len(), 2, "{h:?}");
        assert_eq!(h["te"], "trailers");
        assert_eq!(h["x-kept"], "1");
        let mut r = HeaderMap::new();
        r.insert(header::TE, HeaderValue::from_static("trailers"));
        strip_hop_by_hop(&mut r, false);
        assert!(r.is_empty());
    }

    #[test]
    fn end_to_end_headers_stay_and_a_lone_hop_by_hop_header_goes() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("a.example"));
        h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        let before = h.clone();
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h, before);
        for name in HOP_BY_HOP.iter().chain([&header::UPGRADE]) {
            let mut one = before.clone();
            one.insert(name.clone(), HeaderValue::from_static("x"));
            strip_hop_by_hop(&mut one, false);
            assert_eq!(one, before, "{name} is stripped");
        }
    }

    #[test]
    fn a_fresh_request_id_is_128_random_bits_in_hex_and_a_sane_one_is_kept() {
        let (a, b) = (request_id(&HeaderMap::new()), request_id(&HeaderMap::new()));
        for id in [&a, &b] {
            assert_eq!(id.len(), 32, "{id:?}");
            assert!(id
                .as_bytes()
                .iter()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c)));
        }
        assert_ne!(a, b);
        let mut h = HeaderMap::new();
        h.insert(X_REQUEST_ID, HeaderValue::from_static("trace-1"));
        assert_eq!(request_id(&h), "trace-1");
    }

    #[test]
    fn a_field_is_found_by_scan_in_a_small_map_and_by_hash_in_a_large_one() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("a.example"));
        h.insert(X_FORWARDED_FOR, HeaderValue::from_static("10.0.0.1"));
        assert!(has(&h, &X_FORWARDED_FOR) && has(&h, &header::HOST));
        assert!(!has(&h, &X_FORWARDED_PROTO) && !has(&h, &header::CONTENT_LENGTH));
        for i in 0..20 {
            h.insert(
                HeaderName::try_from(format!("x-f{i}")).unwrap(),
                HeaderValue::from_static("1"),
            );
        }
        assert!(h.keys_len() > 16);
        assert!(has(&h, &X_FORWARDED_FOR) && !has(&h, &X_FORWARDED_PROTO));
    }

    #[test]
    fn a_host_is_checked_whatever_was_checked_before_it() {
        let v = |s: &'static str| valid_host(&HeaderValue::from_static(s));
        for _ in 0..2 {
            assert!(v("a.example:8080"));
            assert!(!v("a.example:80x") && !v("a.example:+80") && !v("a.example:65536"));
            assert!(v("a.example:65535") && v("[::1]:8080") && v("[::1]") && v("a.example:"));
            assert!(!v("[::1]:x"));
            assert!(!v("user@a.example"));
            assert!(v("a.example"));
            assert!(!v(""));
            assert!(!v("a.example:8080/"));
        }
    }

    #[test]
    fn ports_are_stripped_for_routing() {
        assert_eq!(strip_port("a.example:8080"), "a.example");
        assert_eq!(strip_port("a.example"), "a.example");
        assert_eq!(strip_port("[::1]:80"), "::1");
    }
}
