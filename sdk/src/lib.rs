//! The Weir filter SDK.
//!
//! Filters are WebAssembly components written in Rust against the ABI in `sdk/wit/`. The
//! WIT package, the typed `Filter` trait and the export macro arrive with the filter-host work;
//! until then this crate only reserves the name and the layout.
#![deny(missing_docs)]
