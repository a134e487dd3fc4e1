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

/// Installs the ring crypto provider and a test log subscriber once.
pub fn init() {
    weir::tls::install_default_provider();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
}
