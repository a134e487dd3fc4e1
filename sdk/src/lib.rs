//! The Weir filter SDK: write a Weir filter as a small Rust crate.
//!
//! A filter implements [`Filter`]: its configuration type (deserialised from the filter's table
//! in `weir.toml`), a constructor, and the phases it cares about; every phase has a default
//! that continues. [`export_filter!`] exports it. Build with
//! `cargo build --target wasm32-wasip2 --release` and point a chain entry at the `.wasm`.
//!
//! ```no_run
//! use weir_sdk::{Action, Filter, Request, Response};
//!
//! #[derive(serde::Deserialize)]
//! struct Config {
//!     header: String,
//! }
//!
//! struct AddHeader {
//!     header: String,
//! }
//!
//! impl Filter for AddHeader {
//!     type Config = Config;
//!
//!     fn new(config: Config) -> Result<Self, String> {
//!         Ok(AddHeader { header: config.header })
//!     }
//!
//!     fn on_request_headers(&self, req: &Request) -> Action {
//!         if req.path() == "/forbidden" {
//!             return Action::Respond(Response::new(403).body("no"));
//!         }
//!         let _ = req.set_header(&self.header, b"1");
//!         Action::Continue
//!     }
//! }
//!
//! weir_sdk::export_filter!(AddHeader);
//! ```
//!
//! The phases, in order, for one request:
//!
//! ```text
//! init (once per instance) ─▶ on_request_headers ─▶ on_request_body* ─▶ [upstream]
//!   ─▶ on_response_headers ─▶ on_response_body* ─▶ on_log
//!   (Respond from a request phase skips the upstream; a trap or timeout is the host's
//!    failure policy: fail-closed answers 500, fail-open skips the filter)
//! ```
//!
//! Filters are unit-tested on the host with plain `cargo test` through [`testing`], a mock
//! host that records what the filter did.
//!
//! # Layout
//! - [`Filter`], [`Action`], [`BodyAction`], [`Response`], [`Capabilities`]: the filter's side.
//! - [`Request`], [`ResponseHead`]: the request and response being processed.
//! - [`props`], [`log`], [`metrics`], [`state`], [`outbound`]: host services.
//! - [`testing`]: the mock host (not on wasm).
//!
//! # Features
//! - `allocator` (on by default): in Wasm builds the SDK installs a small-block allocator as
//!   the filter's `#[global_allocator]`: free lists per power-of-two size up to 4 KiB over
//!   the system allocator (an allocation and its free cost a few instructions instead of
//!   ~400 through `malloc`/`dlmalloc`). Small blocks a filter frees stay reserved for the
//!   same size. A filter with its own global allocator sets `default-features = false`.
//! - `memcmp` (on by default): in Wasm builds the SDK defines `memcmp` and `bcmp`, comparing
//!   eight bytes at a time (wasi-libc's compare a byte at a time, ~25 instructions per byte;
//!   every string `==` and string-keyed map lookup ends there).
#![deny(missing_docs)]

// The generated bindings name this crate by its public path, also from inside it.
extern crate self as weir_sdk;

pub mod config;
mod filter;
pub mod hash;
mod host;
mod http;
pub mod log;
#[cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]
mod mem;
#[cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]
mod memory;
pub mod metrics;
pub mod outbound;
pub mod props;
pub mod state;
#[cfg(not(target_arch = "wasm32"))]
pub mod testing;

/// The filter's allocator (see the `memory` module): small blocks from per-size free lists.
/// Only in single-threaded Wasm builds; turn the `allocator` feature off to use your own.
#[cfg(all(
    feature = "allocator",
    target_arch = "wasm32",
    not(target_feature = "atomics")
))]
#[global_allocator]
static ALLOCATOR: memory::SizeClasses<std::alloc::System> = memory::SizeClasses::new(std::alloc::System);

pub use filter::{BodyAction, BodyMode, Capabilities, Filter, NoConfig, Summary};
pub use http::{Action, HostError, Request, Response, ResponseHead};

/// Bindings generated from `sdk/wit/` (the ABI). Not for filter authors: use the typed API.
#[doc(hidden)]
#[allow(missing_docs, unsafe_code, clippy::all)]
pub mod wit {
    wit_bindgen::generate!({
        path: "wit",
        world: "filter",
        pub_export_macro: true,
        export_macro_name: "__weir_export",
        default_bindings_module: "::weir_sdk::wit",
        runtime_path: "::weir_sdk::__private::wit_bindgen::rt",
    });
}

/// What the export macro expands to; not a public API.
#[doc(hidden)]
pub mod __private {
    pub use crate::filter::runtime;
    pub use wit_bindgen;
}

/// Exports a [`Filter`] type as the component's `handler`. Use once per crate.
#[macro_export]
macro_rules! export_filter {
    ($filter:ty) => {
        #[doc(hidden)]
        #[allow(dead_code)]
        pub struct __WeirFilterExport;

        impl $crate::wit::exports::weir::filter::handler::Guest for __WeirFilterExport {
            fn init(
                config: ::std::string::String,
            ) -> ::std::result::Result<$crate::wit::weir::filter::types::Capabilities, ::std::string::String> {
                $crate::__private::runtime::init::<$filter>(&config)
            }
            fn on_request_headers() -> $crate::wit::weir::filter::types::Action {
                $crate::__private::runtime::on_request_headers::<$filter>()
            }
            fn on_request_body(
                chunk: ::std::vec::Vec<u8>,
                end_of_stream: bool,
            ) -> $crate::wit::weir::filter::types::BodyAction {
                $crate::__private::runtime::on_request_body::<$filter>(chunk, end_of_stream)
            }
            fn on_response_headers() -> $crate::wit::weir::filter::types::Action {
                $crate::__private::runtime::on_response_headers::<$filter>()
            }
            fn on_response_body(
                chunk: ::std::vec::Vec<u8>,
                end_of_stream: bool,
            ) -> $crate::wit::weir::filter::types::BodyAction {
                $crate::__private::runtime::on_response_body::<$filter>(chunk, end_of_stream)
            }
            fn on_log(summary: $crate::wit::weir::filter::types::Summary) -> bool {
                $crate::__private::runtime::on_log::<$filter>(summary)
            }
        }

        // Component exports only exist in Wasm; native builds (unit tests against the mock
        // host) use the same glue without exporting it.
        #[cfg(target_arch = "wasm32")]
        $crate::wit::__weir_export!(__WeirFilterExport with_types_in $crate::wit);
    };
}
