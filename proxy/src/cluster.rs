//! Upstream clusters: endpoints (static or from DNS, re-resolved periodically), their health
//! (ejection with exponential back-off after connect failures), and a connection pool per
//! endpoint: idle HTTP/1.1 connections kept alive and evicted when idle too long, or one
//! multiplexed HTTP/2 connection.
//!
//! The pool hands a connection back only when hyper says it is ready for the next request,
//! i.e. after the previous exchange fully finished in both directions: a connection whose
//! upstream still expects body bytes never serves another request.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
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
    idle: Mutex<Vec<IdleConn>>,
    h2: tokio::sync::Mutex<Option<http2::SendRequest<Body>>>,
}

struct IdleConn {
    sender: http1::SendRequest<Body>,
    since: Instant,
}

#[derive(Default)]
struct Health {
    consecutive_failures: u32,
    ejected_until: Option<Instant>,
}

impl Endpoint {
    fn new(addr: SocketAddr, authority: Arc<str>, host: String) -> Endpoint {
        Endpoint {
            addr,
            authority,
            host,
            load: Arc::new(Load::new(limits::DEFAULT_EWMA_RTT, limits::DEFAULT_EWMA_DECAY)),
            health: Mutex::new(Health::default()),
            idle: Mutex::new(Vec::new()),
            h2: tokio::sync::Mutex::new(None),
        }
    }

    /// Whether the endpoint may receive traffic now.
    pub fn is_available(&self, now: Instant) -> bool {
        match self.health.lock().expect("health lock").ejected_until {
            Some(until) => now >= until,
            None => true,
        }
    }

    fn record_failure(&self, base: Duration, max: Duration) -> Duration {
        let mut h = self.health.lock().expect("health lock");
        h.consecutive_failures = h.consecutive_failures.saturating_add(1);
        let exp = h.consecutive_failures.saturating_sub(1).min(16);
        let backoff = base.saturating_mul(1u32 << exp).min(max);
        h.ejected_until = Some(Instant::now() + backoff);
        backoff
    }

    fn record_success(&self) {
        let mut h = self.health.lock().expect("health lock");
        if h.consecutive_failures != 0 || h.ejected_until.is_some() {
            *h = Health::default();
        }
    }
}

/// An established upstream connection, ready for one request.
pub enum Conn {
    /// An HTTP/1.1 connection, returned to the pool when the exchange completes.
    Http1(http1::SendRequest<Body>),
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
                Some(UpstreamTls {
                    connector: tokio_rustls::TlsConnector::from(cc),
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
        })
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
        for ep in self.endpoints.load().iter() {
            // Dropping a sender lets its connection task finish and close the socket.
            ep.idle
                .lock()
                .expect("idle lock")
                .retain(|c| c.since.elapsed() < max_idle && !c.sender.is_closed());
        }
    }

    /// Picks an available endpoint not in `tried`.
    pub fn pick(&self, tried: &[SocketAddr]) -> Option<Arc<Endpoint>> {
        let eps = self.endpoints.load();
        let now = Instant::now();
        let i = self.balancer.pick(
            eps.len(),
            |i| !tried.contains(&eps[i].addr) && eps[i].is_available(now),
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
            let io = self.connect(ep).await?;
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
            while let Some(c) = idle.pop() {
                if c.sender.is_ready() && c.since.elapsed() < self.config.idle_timeout {
                    return Ok(Conn::Http1(c.sender));
                }
            }
        }
        let io = self.connect(ep).await?;
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| self.connect_failed(ep, format!("http/1 handshake: {e}")))?;
        let addr = ep.addr;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(upstream.addr = %addr, error = %e, "upstream connection ended");
            }
        });
        ep.record_success();
        Ok(Conn::Http1(sender))
    }

    /// Returns an HTTP/1.1 connection to the pool once its current exchange has completed.
    pub fn checkin_when_ready(&self, ep: Arc<Endpoint>, mut sender: http1::SendRequest<Body>) {
        let max = self.config.max_idle_per_endpoint;
        tokio::spawn(async move {
            if sender.ready().await.is_ok() {
                let mut idle = ep.idle.lock().expect("idle lock");
                if idle.len() < max {
                    idle.push(IdleConn {
                        sender,
                        since: Instant::now(),
                    });
                }
            }
        });
    }

    /// Opens a raw stream (TCP, then TLS if configured) to an endpoint, within the connect
    /// timeout. Failures eject the endpoint for a back-off.
    pub async fn connect(&self, ep: &Endpoint) -> Result<Stream, ConnectError> {
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
        match tokio::time::timeout(timeout, tls.connector.connect(name, tcp)).await {
            Ok(Ok(s)) => {
                let want_h2 = self.config.protocol == UpstreamProtocol::Http2;
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

    #[test]
    fn ejection_backs_off_exponentially_up_to_the_max() {
        let ep = Endpoint::new(
            "127.0.0.1:1".parse().unwrap(),
            "127.0.0.1:1".into(),
            "127.0.0.1".into(),
        );
        let (b, m) = (Duration::from_secs(1), Duration::from_secs(5));
        assert_eq!(ep.record_failure(b, m), Duration::from_secs(1));
        assert_eq!(ep.record_failure(b, m), Duration::from_secs(2));
        assert_eq!(ep.record_failure(b, m), Duration::from_secs(4));
        assert_eq!(ep.record_failure(b, m), Duration::from_secs(5));
        assert!(!ep.is_available(Instant::now()));
        ep.record_success();
        assert!(ep.is_available(Instant::now()));
    }
}
