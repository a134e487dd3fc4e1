//! Weir: an HTTP proxy for the edge and the mesh whose policy lives in WebAssembly filters.
//!
//! The core in this crate owns connections, TLS, HTTP/1.1 and HTTP/2, upstream pools and load
//! balancing, and the mechanisms of timeouts; policy plugs in at the [`filter`] seam.
//!
//! # Layout
//! - [`config`]: `weir.toml`, typed and validated; [`limits`]: every default limit.
//! - [`server`]: the process (bind, serve, drain); [`listener`]: accept, TLS, HTTP serving;
//!   [`iowatch`]: what a connection's watchdog sees of its I/O.
//! - [`reload`]: hot reload of config, filters and certificates.
//! - [`tls`]: rustls configs, SNI, mTLS identities.
//! - [`proxy`]: the request path; [`route`]: the route table; [`path`]: canonical paths.
//! - [`cluster`]: endpoints, DNS, ejection, connection pools; [`balance`]: RR and peak-EWMA;
//!   [`h1`]: HTTP/1.1, toward upstreams and toward clients (hyper serves HTTP/2).
//! - [`filter`]: the filter chain seam; [`error`]: error causes and their statuses.
//! - [`admin`]: `/ready`, `/live`, `/metrics`, `/config`, `/filters`; [`metrics`]: series.
//! - [`body`]: body type and wrappers; [`log`]: tracing setup; [`alloc`]: the allocator;
//!   [`clock`]: the coarse clock.

pub mod admin;
// The one module with unsafe code: the global allocator is FFI to mimalloc.
#[allow(unsafe_code)]
pub mod alloc;
pub mod balance;
pub mod body;
// A clock read by FFI, the one other unsafe call.
#[allow(unsafe_code)]
pub mod clock;
pub mod cluster;
pub mod config;
pub mod error;
pub mod filter;
pub mod h1;
pub mod iowatch;
pub mod limits;
pub mod listener;
pub mod log;
pub mod metrics;
pub mod path;
pub mod proxy;
pub mod registry;
pub mod reload;
pub mod route;
pub mod server;
pub mod tls;

pub use config::Config;
pub use server::Proxy;
