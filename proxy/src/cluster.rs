//! Upstream clusters: endpoints (static or from DNS, re-resolved periodically), their health
//! (ejection with exponential back-off after connect failures), and a connection pool per
//! endpoint: idle HTTP/1.1 connections kept alive and evicted when idle too long, or one
//! multiplexed HTTP/2 connection.
//!
//! The pool takes a connection back only after its exchange fully finished in both directions
//! (see [`crate::h1`]): a connection whose upstream still expects body bytes never serves
//! another request.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::balance::{Balancer, Load};
use crate::body::Body;
use crate::config::{ClusterConfig, Config, UpstreamProtocol};
use crate::limits;
use crate::metrics::Metrics;

pub use crate::h1::{H1Conn, PooledBody, SendFailed};

/// Splits `host:port` (IPv6 in brackets) into its parts.
pub fn parse_endpoint(s: &str) -> Result<(String, u16), String> {
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("endpoint {s:?} must be host:port"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("endpoint {s:?}: invalid port {port:?}"))?;
    if port == 0 {
        return Err(format!("endpoint {s:?}: port must not be 0"));
    }
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() || host.contains(['/', ' ']) {
        return Err(format!("endpoint {s:?}: invalid host"));
    }
    Ok((host.to_string(), port))
}

/// Clusters by name, as every request looks them up (routes, filters' `set-cluster`): keys
/// from the config, hashed with foldhash (randomly seeded; lookups only, so nothing for a
/// client to flood), which costs a fraction of SipHash on every request.
pub type Clusters = std::collections::HashMap<Arc<str>, Arc<Cluster>, foldhash::fast::RandomState>;

/// One upstream address of a cluster with its load, health and pooled connections.
pub struct Endpoint {
    /// The resolved address.
    pub addr: SocketAddr,
    /// `host:port` as configured (used for SNI and `auto_host_rewrite`).
    pub authority: Arc<str>,
    host: String,
    /// Latency estimate and requests in flight.
    pub load: Arc<Load>,
    health: Mutex<Health>,
    /// Whether `health` may hold an ejection: the balancer's check of a healthy endpoint is a
    /// plain load, where taking the lock was two atomic read-modify-writes. Set under the
    /// lock with an ejection, cleared under it once none is left.
    may_be_ejected: AtomicBool,
    idle: Mutex<Vec<IdleConn>>,
    h2: tokio::sync::Mutex<Option<http2::SendRequest<Body>>>,
}

struct IdleConn {
    conn: Box<H1Conn>,
    /// When it came back, on the coarse clock: idle times are compared with 100 ms and more.
    since_ms: u64,
}

/// Whether a request may go a second time, its body aside: its method is idempotent (RFC
/// 9110, section 9.2.2) or it carries an `Idempotency-Key` (as Go's HTTP client honours it).
pub fn may_resend(method: &http::Method, headers: &http::HeaderMap) -> bool {
    use http::Method;
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    ) || headers.contains_key("idempotency-key")
}

/// A hyper error with its cause, for logs.
pub fn describe(e: &hyper::Error) -> String {
    match std::error::Error::source(e) {
        Some(src) => format!("{e}: {src}"),
        None => e.to_string(),
    }
}

/// Puts a connection whose exchange is complete in `ep`'s idle pool (at most `max` there).
pub(crate) fn checkin(ep: &Endpoint, conn: Box<H1Conn>, max: usize) {
    let mut idle = ep.idle.lock().expect("idle lock");
    if idle.len() < max {
        idle.push(IdleConn {
            conn,
            since_ms: crate::clock::coarse_ms(),
        });
    }
}

/// Two kinds of ejection, kept apart: a connection to the endpoint succeeding ends the
/// first, not the second (it says nothing of the 5xx a filter ejected it for).
#[derive(Default)]
struct Health {
    /// Connect failures in a row, and the back-off they earned.
    consecutive_failures: u32,
    ejected_until: Option<Instant>,
    /// An outlier signal from a filter (`eject-upstream`), for its own duration.
    outlier_until: Option<Instant>,
}

impl Endpoint {
    fn new(addr: SocketAddr, authority: Arc<str>, host: String) -> Endpoint {
        Endpoint {
            addr,
            authority,
            host,
            load: Arc::new(Load::new(limits::DEFAULT_EWMA_RTT, limits::DEFAULT_EWMA_DECAY)),
            health: Mutex::new(Health::default()),
            may_be_ejected: AtomicBool::new(false),
            idle: Mutex::new(Vec::new()),
            h2: tokio::sync::Mutex::new(None),
        }
    }

    /// Whether the endpoint may receive traffic now.
    pub fn is_available(&self, now: Instant) -> bool {
        self.is_available_then(|| now)
    }

    /// Whether the endpoint may receive traffic, reading the clock (`now`) only if it has an
    /// ejection to compare with: a healthy endpoint costs no clock read. `now` is a clock
    /// read (not a time to come): ejections that ran out by then are removed.
    fn is_available_then(&self, now: impl FnOnce() -> Instant) -> bool {
        if !self.may_be_ejected.load(Ordering::Acquire) {
            return true;
        }
        let mut h = self.health.lock().expect("health lock");
        if h.ejected_until.is_some() || h.outlier_until.is_some() {
            // Ejections that ran out go: an endpoint back in service is checked lock-free
            // again (an expired `ejected_until` counts as none everywhere it is read).
            let now = now();
            h.ejected_until = h.ejected_until.filter(|&u| now < u);
            h.outlier_until = h.outlier_until.filter(|&u| now < u);
            if h.ejected_until.is_some() || h.outlier_until.is_some() {
                return false;
            }
        }
        self.may_be_ejected.store(false, Ordering::Release);
        true
    }

    /// Takes the endpoint out of balancing for `d` (an outlier signal from a filter); a
    /// longer ejection under way stays.
    pub fn eject_for(&self, d: Duration) {
        let mut h = self.health.lock().expect("health lock");
        let until = later(Instant::now(), d);
        h.outlier_until = Some(h.outlier_until.map_or(until, |u| u.max(until)));
        self.may_be_ejected.store(true, Ordering::Release);
    }

    fn record_failure(&self, base: Duration, max: Duration) -> Duration {
        self.record_failure_at(Instant::now(), base, max)
    }

    fn record_failure_at(&self, now: Instant, base: Duration, max: Duration) -> Duration {
        let mut h = self.health.lock().expect("health lock");
        if let Some(until) = h.ejected_until.filter(|&u| u > now) {
            // Connects under way when the endpoint was ejected fail in their turn: one outage,
            // one step of back-off (Envoy's multiplier grows once per ejection). Counting
            // each went straight to the maximum when several requests were connecting.
            return until - now;
        }
        h.consecutive_failures = h.consecutive_failures.saturating_add(1);
        let exp = h.consecutive_failures.saturating_sub(1).min(16);
        let backoff = base.saturating_mul(1u32 << exp).min(max);
        h.ejected_until = Some(later(now, backoff));
        self.may_be_ejected.store(true, Ordering::Release);
        backoff
    }

    fn record_success(&self) {
        let mut h = self.health.lock().expect("health lock");
        if h.consecutive_failures != 0 || h.ejected_until.is_some() {
            h.consecutive_failures = 0;
            h.ejected_until = None;
        }
    }
}

/// How long from `since_ms` to `now_ms`, both on the coarse clock.
fn idle_since(since_ms: u64, now_ms: u64) -> Duration {
    Duration::from_millis(now_ms.saturating_sub(since_ms))
}

/// `at + d`, or a year on when that overflows (a configured `ejection_backoff_max` of
/// centuries panicked here, with the health lock held, poisoning it for every later pick).
fn later(at: Instant, d: Duration) -> Instant {
    at.checked_add(d)
        .unwrap_or_else(|| at + Duration::from_secs(86_400 * 365))
}

/// What the admin API's `/clusters` shows of a cluster, as Envoy's `/clusters`.
#[derive(Debug, serde::Serialize)]
pub struct ClusterStatus {
    /// The cluster's name.
    pub name: String,
    /// Protocol to its endpoints.
    pub protocol: UpstreamProtocol,
    /// Load-balancing algorithm.
    pub balance: crate::config::BalanceAlgorithm,
    /// Every endpoint, in balancing order.
    pub endpoints: Vec<EndpointStatus>,
}

/// One endpoint in [`ClusterStatus`].
#[derive(Debug, serde::Serialize)]
pub struct EndpointStatus {
    /// The resolved address.
    pub address: String,
    /// The endpoint as configured (`host:port`).
    pub name: String,
    /// Whether the balancer may pick it now.
    pub available: bool,
    /// Connect failures in a row.
    pub connect_failures: u32,
    /// What is left of the ejection after a failed connect, in milliseconds (0: none).
    pub connect_ejection_ms: u64,
    /// What is left of a filter's ejection (`eject-upstream`), in milliseconds (0: none).
    pub outlier_ejection_ms: u64,
    /// Requests in flight to it.
    pub in_flight: usize,
    /// The peak-EWMA latency estimate, in milliseconds.
    pub latency_estimate_ms: f64,
    /// HTTP/1.1 connections idle in its pool.
    pub idle_connections: usize,
}

impl Endpoint {
    fn status(&self, now: Instant) -> EndpointStatus {
        let left =
            |until: Option<Instant>| until.map_or(0, |u| u.saturating_duration_since(now).as_millis() as u64);
        let (connect_failures, connect_ejection_ms, outlier_ejection_ms) = {
            let h = self.health.lock().expect("health lock");
            (
                h.consecutive_failures,
                left(h.ejected_until),
                left(h.outlier_until),
            )
        };
        EndpointStatus {
            address: self.addr.to_string(),
            name: self.authority.to_string(),
            available: self.is_available(now),
            connect_failures,
            connect_ejection_ms,
            outlier_ejection_ms,
            in_flight: self.load.pending(),
            latency_estimate_ms: self.load.estimate(now).as_secs_f64() * 1000.0,
            idle_connections: self.idle.lock().expect("idle lock").len(),
        }
    }
}

/// What [`Cluster::eject_unless_last`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ejection {
    /// The endpoint is out of balancing for the time asked.
    Ejected,
    /// The cluster has no endpoint at that address (any more).
    NoSuchEndpoint,
    /// Not ejected: no other endpoint is available.
    LastAvailable,
}

/// An established upstream connection, ready for one request.
pub enum Conn {
    /// A pooled HTTP/1.1 connection, driven by the request that uses it. Boxed once for its
    /// life: the request path moves it (out of the pool, into the exchange, into the
    /// response body, back) as a pointer, not as some 200 bytes at every step.
    Http1(Box<H1Conn>),
    /// An HTTP/1.1 connection with its own task, able to upgrade (WebSocket); never pooled.
    Http1Upgradable(http1::SendRequest<Body>),
    /// A handle on the endpoint's multiplexed HTTP/2 connection.
    Http2(http2::SendRequest<Body>),
}

/// Why a connection could not be established.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConnectError(pub String);

/// A TCP or TLS stream to an upstream.
pub enum Stream {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }
}

struct UpstreamTls {
    connector: tokio_rustls::TlsConnector,
    /// For an HTTP/2 cluster, the connector of its HTTP/1.1 connections (upgrades such as
    /// WebSocket): ALPN `http/1.1`, so the server does not commit the connection to h2.
    h1_connector: Option<tokio_rustls::TlsConnector>,
    config: crate::config::ClusterTls,
}

/// A named set of endpoints with a balancer and a pool per endpoint.
pub struct Cluster {
    /// The cluster's name.
    pub name: Arc<str>,
    /// Its configuration.
    pub config: ClusterConfig,
    endpoints: ArcSwap<Vec<Arc<Endpoint>>>,
    balancer: Balancer,
    tls: Option<UpstreamTls>,
    metrics: Arc<Metrics>,
    /// Held while a filter's ejection checks and ejects (see [`Cluster::eject_unless_last`]).
    ejecting: Mutex<()>,
}

impl Cluster {
    /// Builds a cluster; IP endpoints are ready at once, names are resolved by
    /// [`Cluster::refresh_dns`] (call it, then spawn [`Cluster::maintain`]).
    pub fn new(
        name: &str,
        config: &ClusterConfig,
        root: &Config,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Cluster> {
        let tls = match &config.tls {
            Some(t) => {
                let h2 = config.protocol == UpstreamProtocol::Http2;
                let cc = crate::tls::client_config(t, root, h2)?;
                let h1_connector = if h2 {
                    let h1 = crate::tls::client_config(t, root, false)?;
                    Some(tokio_rustls::TlsConnector::from(h1))
                } else {
                    None
                };
                Some(UpstreamTls {
                    connector: tokio_rustls::TlsConnector::from(cc),
                    h1_connector,
                    config: t.clone(),
                })
            }
            None => None,
        };
        let mut eps = Vec::new();
        for spec in &config.endpoints {
            let (host, port) = parse_endpoint(spec).map_err(anyhow::Error::msg)?;
            if let Ok(ip) = host.parse::<std::net::IpAddr>() {
                eps.push(Arc::new(Endpoint::new(
                    SocketAddr::new(ip, port),
                    spec.as_str().into(),
                    host,
                )));
            }
        }
        Ok(Cluster {
            name: name.into(),
            config: config.clone(),
            endpoints: ArcSwap::from_pointee(eps),
            balancer: Balancer::new(config.balance),
            tls,
            metrics,
            ejecting: Mutex::new(()),
        })
    }

    /// Ejects the endpoint at `addr` for `d` (an outlier signal from a filter) unless no
    /// other endpoint is available. The check and the ejection happen under one lock: two
    /// filters ejecting the two endpoints of a pair at once each saw the other still
    /// available, and both went.
    pub fn eject_unless_last(&self, addr: SocketAddr, d: Duration) -> Ejection {
        let _one = self.ejecting.lock().expect("ejecting lock");
        let now = Instant::now();
        let endpoints = self.endpoints();
        let Some(ep) = endpoints.iter().find(|e| e.addr == addr) else {
            return Ejection::NoSuchEndpoint;
        };
        if !endpoints.iter().any(|e| e.addr != addr && e.is_available(now)) {
            return Ejection::LastAvailable;
        }
        ep.eject_for(d);
        Ejection::Ejected
    }

    /// The cluster and each endpoint's state now, for the admin API.
    pub fn status(&self) -> ClusterStatus {
        let now = Instant::now();
        ClusterStatus {
            name: self.name.to_string(),
            protocol: self.config.protocol,
            balance: self.config.balance,
            endpoints: self.endpoints().iter().map(|e| e.status(now)).collect(),
        }
    }

    /// The current endpoints.
    pub fn endpoints(&self) -> arc_swap::Guard<Arc<Vec<Arc<Endpoint>>>> {
        self.endpoints.load()
    }

    fn has_names(&self) -> bool {
        self.config
            .endpoints
            .iter()
            .any(|s| parse_endpoint(s).is_ok_and(|(h, _)| h.parse::<std::net::IpAddr>().is_err()))
    }

    /// Resolves DNS names again and swaps in the new endpoint set, keeping the state (pool,
    /// load, health) of addresses that stay. A name that fails to resolve keeps its old
    /// addresses: a DNS outage must not empty a cluster.
    pub async fn refresh_dns(&self) {
        if !self.has_names() {
            return;
        }
        let old = self.endpoints.load_full();
        let mut next: Vec<Arc<Endpoint>> = Vec::new();
        for spec in &self.config.endpoints {
            let Ok((host, port)) = parse_endpoint(spec) else {
                continue;
            };
            let authority: Arc<str> = spec.as_str().into();
            let addrs: Vec<SocketAddr> = if let Ok(ip) = host.parse::<std::net::IpAddr>() {
                vec![SocketAddr::new(ip, port)]
            } else {
                match tokio::net::lookup_host((host.as_str(), port)).await {
                    Ok(a) => a.collect(),
                    Err(e) => {
                        tracing::warn!(cluster = %self.name, endpoint = %spec, error = %e, "dns resolution failed; keeping previous addresses");
                        old.iter()
                            .filter(|e| e.authority == authority)
                            .map(|e| e.addr)
                            .collect()
                    }
                }
            };
            for addr in addrs {
                if next.iter().any(|e| e.addr == addr) {
                    continue;
                }
                let kept = old
                    .iter()
                    .find(|e| e.addr == addr && e.authority == authority)
                    .cloned();
                next.push(
                    kept.unwrap_or_else(|| Arc::new(Endpoint::new(addr, authority.clone(), host.clone()))),
                );
            }
        }
        let changed = next.len() != old.len() || next.iter().zip(old.iter()).any(|(a, b)| !Arc::ptr_eq(a, b));
        if changed {
            tracing::info!(cluster = %self.name, endpoints = next.len(), "endpoints updated");
            self.endpoints.store(Arc::new(next));
        }
    }

    /// Seeds the endpoints of this (new) cluster's names with the addresses `previous` had for
    /// them, as fresh endpoints (TLS or protocol may have changed): a reload that changes a
    /// cluster while its names fail to resolve keeps their last addresses instead of an empty
    /// cluster until the next refresh, as Envoy keeps the last resolved hosts.
    pub fn inherit_addresses(&self, previous: &Cluster) {
        let prev = previous.endpoints.load();
        let mut next: Vec<Arc<Endpoint>> = self.endpoints.load().iter().cloned().collect();
        for spec in &self.config.endpoints {
            let Ok((host, _)) = parse_endpoint(spec) else {
                continue;
            };
            if host.parse::<std::net::IpAddr>().is_ok() {
                continue;
            }
            let authority: Arc<str> = spec.as_str().into();
            for e in prev.iter().filter(|e| e.authority == authority) {
                if !next.iter().any(|n| n.addr == e.addr) {
                    next.push(Arc::new(Endpoint::new(e.addr, authority.clone(), host.clone())));
                }
            }
        }
        self.endpoints.store(Arc::new(next));
    }

    /// Background upkeep while the cluster lives: DNS refresh and idle-connection eviction.
    pub async fn maintain(this: Weak<Cluster>) {
        let (dns_every, idle) = match this.upgrade() {
            Some(c) => (c.config.dns_refresh, c.config.idle_timeout),
            None => return,
        };
        let tick = (idle / 2)
            .clamp(Duration::from_millis(100), Duration::from_secs(5))
            .min(dns_every);
        let mut last_dns = Instant::now();
        loop {
            tokio::time::sleep(tick).await;
            let Some(c) = this.upgrade() else { return };
            if last_dns.elapsed() >= dns_every {
                c.refresh_dns().await;
                last_dns = Instant::now();
            }
            c.evict_idle();
        }
    }

    fn evict_idle(&self) {
        let max_idle = self.config.idle_timeout;
        // One clock read for the sweep, not one per connection under the pool's lock.
        let now_ms = crate::clock::coarse_ms();
        for ep in self.endpoints.load().iter() {
            ep.idle
                .lock()
                .expect("idle lock")
                .retain_mut(|c| idle_since(c.since_ms, now_ms) < max_idle && c.conn.reusable());
        }
    }

    /// Picks an available endpoint not in `tried`.
    pub fn pick(&self, tried: &[SocketAddr]) -> Option<Arc<Endpoint>> {
        let eps = self.endpoints.load();
        // One clock read for the candidates, if one of them has an ejection.
        let now = std::cell::OnceCell::new();
        let i = self.balancer.pick(
            eps.len(),
            |i| !tried.contains(&eps[i].addr) && eps[i].is_available_then(|| *now.get_or_init(Instant::now)),
            |i| &eps[i].load,
        )?;
        Some(eps[i].clone())
    }

    /// Takes a pooled connection to `ep` or opens a new one. `http1` forces HTTP/1.1 (upgrades).
    pub async fn checkout(&self, ep: &Arc<Endpoint>, force_http1: bool) -> Result<Conn, ConnectError> {
        let h2 = self.config.protocol == UpstreamProtocol::Http2 && !force_http1;
        if h2 {
            let mut slot = ep.h2.lock().await;
            if let Some(s) = slot.as_ref() {
                if !s.is_closed() {
                    return Ok(Conn::Http2(s.clone()));
                }
            }
            // Requests that queued here behind a connect that failed do not each try again in
            // turn, every one up to a connect timeout long: that failure ejected the endpoint,
            // so they fail now, as the balancer would have sent them elsewhere.
            if !ep.is_available(Instant::now()) {
                return Err(ConnectError("ejected after a failed connect".into()));
            }
            let io = self.connect(ep, false).await?;
            let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .keep_alive_interval(Some(Duration::from_secs(20)))
                .handshake(TokioIo::new(io))
                .await
                .map_err(|e| self.connect_failed(ep, format!("http/2 handshake: {e}")))?;
            let addr = ep.addr;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(upstream.addr = %addr, error = %e, "upstream h2 connection ended");
                }
            });
            ep.record_success();
            *slot = Some(sender.clone());
            return Ok(Conn::Http2(sender));
        }
        if !force_http1 {
            let mut idle = ep.idle.lock().expect("idle lock");
            while let Some(mut c) = idle.pop() {
                let rested = idle_since(c.since_ms, crate::clock::coarse_ms());
                if rested < self.config.idle_timeout && c.conn.reusable() {
                    c.conn.rested = rested >= limits::RESEND_AFTER_IDLE;
                    return Ok(Conn::Http1(c.conn));
                }
            }
        }
        if !force_http1 {
            return self.connect_h1(ep).await.map(Conn::Http1);
        }
        let io = self.connect(ep, true).await?;
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| self.connect_failed(ep, format!("http/1 handshake: {e}")))?;
        ep.record_success();
        let addr = ep.addr;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(upstream.addr = %addr, error = %e, "upstream connection ended");
            }
        });
        Ok(Conn::Http1Upgradable(sender))
    }

    /// A new HTTP/1.1 connection to `ep` for a request whose pooled connection closed under
    /// it before any response (see [`SendFailed::closed`]); counted in the metrics.
    pub async fn reconnect(&self, ep: &Endpoint) -> Result<Box<H1Conn>, ConnectError> {
        let c = self.connect_h1(ep).await?;
        self.metrics.upstream_resend(&self.name);
        Ok(c)
    }

    async fn connect_h1(&self, ep: &Endpoint) -> Result<Box<H1Conn>, ConnectError> {
        let io = self.connect(ep, true).await?;
        ep.record_success();
        Ok(H1Conn::new(io))
    }

    /// Opens a raw stream (TCP, then TLS if configured) to an endpoint, within the connect
    /// timeout. Failures eject the endpoint for a back-off.
    /// `http1`: the connection will speak HTTP/1.1 whatever the cluster's protocol (an
    /// upgrade), so TLS offers `http/1.1` by ALPN.
    pub async fn connect(&self, ep: &Endpoint, http1: bool) -> Result<Stream, ConnectError> {
        let timeout = self.config.connect_timeout;
        let tcp = match tokio::time::timeout(timeout, TcpStream::connect(ep.addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(self.connect_failed(ep, e.to_string())),
            Err(_) => return Err(self.connect_failed(ep, format!("timed out after {timeout:?}"))),
        };
        let _ = tcp.set_nodelay(true);
        let Some(tls) = &self.tls else {
            return Ok(Stream::Plain(tcp));
        };
        let name: ServerName<'static> = crate::tls::upstream_server_name(&tls.config, &ep.host)
            .map_err(|e| self.connect_failed(ep, e))?;
        let connector = match (&tls.h1_connector, http1) {
            (Some(h1), true) => h1,
            _ => &tls.connector,
        };
        match tokio::time::timeout(timeout, connector.connect(name, tcp)).await {
            Ok(Ok(s)) => {
                let want_h2 = self.config.protocol == UpstreamProtocol::Http2 && !http1;
                if want_h2 && s.get_ref().1.alpn_protocol() != Some(b"h2") {
                    // Without h2 in ALPN the server would read our preface as garbage.
                    return Err(self.connect_failed(ep, "upstream did not negotiate h2 by ALPN".into()));
                }
                Ok(Stream::Tls(Box::new(s)))
            }
            Ok(Err(e)) => Err(self.connect_failed(ep, format!("tls: {e}"))),
            Err(_) => Err(self.connect_failed(ep, format!("tls handshake timed out after {timeout:?}"))),
        }
    }

    fn connect_failed(&self, ep: &Endpoint, reason: String) -> ConnectError {
        let backoff = ep.record_failure(self.config.ejection_backoff, self.config.ejection_backoff_max);
        self.metrics.upstream_connect_error(&self.name);
        tracing::warn!(cluster = %self.name, upstream.addr = %ep.addr, error = %reason, ejected_for = ?backoff, "upstream connect failed; endpoint ejected");
        ConnectError(reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse() {
        assert_eq!(parse_endpoint("a.b:80").unwrap(), ("a.b".into(), 80));
        assert_eq!(parse_endpoint("[::1]:8080").unwrap(), ("::1".into(), 8080));
        assert!(parse_endpoint("nohost").is_err());
        assert!(parse_endpoint("h:0").is_err());
        assert!(parse_endpoint("h:99999").is_err());
        assert!(parse_endpoint(":80").is_err());
    }

    #[tokio::test]
    async fn a_changed_cluster_keeps_the_last_addresses_of_names_that_fail_to_resolve() {
        // `.invalid` never resolves (RFC 6761): the DNS failure during a reload.
        let toml = |timeout: &str| {
            format!(
                "[[listeners]]\nname = \"web\"\naddress = \"127.0.0.1:0\"\n[[routes]]\ncluster = \"c\"\n\
                 [clusters.c]\nendpoints = [\"api.weir-test.invalid:8080\", \"127.0.0.1:9\"]\nrequest_timeout = \"{timeout}\"\n"
            )
        };
        let metrics = Arc::new(Metrics::new());
        let old_config = Config::from_toml(&toml("5s"), "weir.toml", std::path::Path::new(".")).unwrap();
        let old = Cluster::new("c", &old_config.clusters["c"], &old_config, metrics.clone()).unwrap();
        // What the name resolved to while it still did.
        let resolved: SocketAddr = "127.0.0.7:8080".parse().unwrap();
        let mut eps: Vec<Arc<Endpoint>> = old.endpoints().iter().cloned().collect();
        eps.push(Arc::new(Endpoint::new(
            resolved,
            "api.weir-test.invalid:8080".into(),
            "api.weir-test.invalid".into(),
        )));
        old.endpoints.store(Arc::new(eps));

        let config = Config::from_toml(&toml("9s"), "weir.toml", std::path::Path::new(".")).unwrap();
        let new = Cluster::new("c", &config.clusters["c"], &config, metrics).unwrap();
        new.inherit_addresses(&old);
        new.refresh_dns().await;
        let mut addrs: Vec<SocketAddr> = new.endpoints().iter().map(|e| e.addr).collect();
        addrs.sort();
        assert_eq!(addrs, ["127.0.0.1:9".parse().unwrap(), resolved]);
    }

    #[test]
    fn concurrent_filter_ejections_never_take_out_the_last_endpoint() {
        let toml = "[[listeners]]\nname = \"web\"\naddress = \"127.0.0.1:0\"\n[[routes]]\ncluster = \"c\"\n\
                    [clusters.c]\nendpoints = [\"127.0.0.1:1\", \"127.0.0.1:2\"]\n";
        let config = Config::from_toml(toml, "weir.toml", std::path::Path::new(".")).unwrap();
        // Without the lock, some of 200 rounds see both go.
        for _ in 0..200 {
            let c = Cluster::new("c", &config.clusters["c"], &config, Arc::new(Metrics::new())).unwrap();
            let addrs: Vec<SocketAddr> = c.endpoints().iter().map(|e| e.addr).collect();
            let barrier = std::sync::Barrier::new(8);
            let ejected = std::thread::scope(|s| {
                let hs: Vec<_> = (0..8)
                    .map(|i| {
                        let (c, b, a) = (&c, &barrier, addrs[i % 2]);
                        s.spawn(move || {
                            b.wait();
                            c.eject_unless_last(a, Duration::from_secs(60)) == Ejection::Ejected
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).filter(|&e| e).count()
            });
            let now = Instant::now();
            assert!(ejected >= 1);
            assert_eq!(
                c.endpoints().iter().filter(|e| e.is_available(now)).count(),
                1,
                "one endpoint stays"
            );
        }
    }

    /// An endpoint nothing listens on (port 1), for the health bookkeeping alone.
    fn unreachable_endpoint() -> Endpoint {
        Endpoint::new(
            "127.0.0.1:1".parse().unwrap(),
            "127.0.0.1:1".into(),
            "127.0.0.1".into(),
        )
    }

    #[test]
    fn ejection_backs_off_exponentially_up_to_the_max() {
        let ep = unreachable_endpoint();
        let (b, m) = (Duration::from_secs(1), Duration::from_secs(5));
        let t = Instant::now();
        let s = Duration::from_secs;
        assert_eq!(ep.record_failure_at(t, b, m), s(1));
        // Connects that were under way fail during that ejection: no new step.
        assert_eq!(
            ep.record_failure_at(t + Duration::from_millis(400), b, m),
            Duration::from_millis(600)
        );
        assert_eq!(
            ep.record_failure_at(t + Duration::from_millis(900), b, m),
            Duration::from_millis(100)
        );
        // Each failure after an ejection ended doubles the next one, up to the max.
        assert_eq!(ep.record_failure_at(t + s(1), b, m), s(2));
        assert_eq!(ep.record_failure_at(t + s(3), b, m), s(4));
        assert_eq!(ep.record_failure_at(t + s(7), b, m), s(5));
        assert!(!ep.is_available(t + s(11)));
        assert!(ep.is_available(t + s(12)));
        ep.record_success();
        assert!(ep.is_available(Instant::now()));
        // A filter's ejection outlives a connection that succeeds meanwhile (one begun
        // before it, a filter's outbound call); a connect failure's back-off does not
        // shorten it.
        ep.eject_for(s(30));
        ep.record_success();
        assert!(!ep.is_available(Instant::now()));
        assert_eq!(ep.record_failure_at(Instant::now(), b, m), s(1));
        assert!(!ep.is_available(Instant::now() + s(2)));
        assert!(ep.is_available(Instant::now() + s(31)));
        let ep = unreachable_endpoint();
        // A back-off of centuries ejects for a year instead of overflowing the clock.
        let huge = Duration::from_secs(u64::MAX / 2);
        assert_eq!(ep.record_failure_at(t, huge, huge), huge);
        assert!(!ep.is_available(t + s(86_400 * 300)));
    }

    #[test]
    fn an_endpoint_out_again_after_an_ejection_ran_out_is_seen_out() {
        // Once an ejection runs out the balancer checks the endpoint without its lock: a later
        // ejection must be seen all the same.
        let ep = unreachable_endpoint();
        let (b, m) = (Duration::from_secs(1), Duration::from_secs(5));
        let s = Duration::from_secs;
        let t = Instant::now();
        assert!(ep.is_available(t));
        ep.record_failure_at(t, b, m);
        assert!(!ep.is_available(t));
        assert!(ep.is_available(t + s(2)), "ran out");
        assert!(ep.is_available(t + s(2)));
        assert_eq!(
            ep.record_failure_at(t + s(3), b, m),
            s(2),
            "the back-off still grows"
        );
        assert!(!ep.is_available(t + s(3)));
        assert!(ep.is_available(t + s(6)));
        ep.eject_for(s(60));
        assert!(!ep.is_available(Instant::now()), "a filter's ejection too");
        assert!(ep.is_available(Instant::now() + s(61)));
    }
}
