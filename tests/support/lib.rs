//! Test support for Weir's end-to-end tests: a PKI made at test time, upstreams built as
//! prose (`Upstream::http1("a").start()`), the proxy on `127.0.0.1:0`, and real clients
//! (HTTP/1.1, h2c, h2 over TLS, raw TCP).
//!
//! # Layout
//! - [`pki`]: a CA and leaf certificates written to a temp dir.
//! - [`upstream`]: test upstreams with echo, delay, trailers, WebSocket behaviours.
//! - [`proxy`]: start Weir from TOML text, stop it, read its addresses.
//! - [`client`]: clients per protocol, plus raw-socket helpers.

pub mod client;
pub mod jwt;
pub mod pki;
pub mod proxy;
pub mod registry;
pub mod upstream;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full};

/// Boxed body used by test clients and upstreams.
pub type Body = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// A body from bytes.
pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|n| match n {}).boxed()
}

/// An empty body.
pub fn empty() -> Body {
    Empty::new().map_err(|n| match n {}).boxed()
}

/// The sending side of a [`channel_body`].
pub type BodyTx =
    tokio::sync::mpsc::Sender<Result<hyper::body::Frame<Bytes>, Box<dyn std::error::Error + Send + Sync>>>;

/// A body streamed frame by frame through a channel (data, then trailers if the test wants
/// them): what a client or upstream sends in pieces, with no length known ahead.
pub fn channel_body() -> (BodyTx, Body) {
    let (tx, mut rx) = tokio::sync::mpsc::channel(2);
    let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
    (tx, http_body_util::StreamBody::new(stream).boxed())
}

/// Reads a whole body.
pub async fn collect<B>(b: B) -> anyhow::Result<Bytes>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    Ok(b.collect()
        .await
        .map_err(|e| anyhow::anyhow!("body: {e}"))?
        .to_bytes())
}

/// A free loopback port below the kernel's ephemeral range, never handed out twice in one test
/// process: for a test that must name a port before anything listens on it (a dead endpoint,
/// a listener a reload moves, a registry that restarts). A port got by binding port 0 and
/// releasing it comes from the ephemeral range, where an outgoing connection or another
/// test's port-0 bind can take it the moment it is free.
pub fn unused_port() -> u16 {
    use rand::Rng;
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768)
        .max(10_001);
    let mut given = GIVEN.lock().unwrap();
    loop {
        let p = rand::thread_rng().gen_range(10_000..low);
        if !given.contains(&p) && std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() {
            given.push(p);
            return p;
        }
    }
}

/// Installs the ring crypto provider and a test log subscriber once.
pub fn init() {
    weir::tls::install_default_provider();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
}
