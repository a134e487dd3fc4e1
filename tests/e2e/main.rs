//! Weir's end-to-end tests: one binary, real sockets on 127.0.0.1:0, real TLS, real clients.

mod admin;
mod auth;
mod bad_input;
mod balance;
mod bodies;
mod client_http1;
mod config_errors;
mod drain;
mod examples;
mod failures;
mod filters;
mod limits;
mod policy;
mod protocols;
mod registry;
mod reload;
mod resilience;
mod tls;
mod upstream_http1;
mod wasm;
