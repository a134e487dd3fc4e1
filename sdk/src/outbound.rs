//! HTTP calls from a filter to a configured cluster (external auth, token introspection,
//! JWKS). The call blocks the filter; the proxy awaits it without blocking other requests.

use std::time::Duration;

use crate::host;

/// A request to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundRequest {
    /// Method, e.g. `GET`.
    pub method: String,
    /// Path and query.
    pub path: String,
    /// Header fields.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Body.
    pub body: Vec<u8>,
    /// Time to the whole response.
    pub timeout: Duration,
}

impl OutboundRequest {
    /// A GET of `path` with a 1 s timeout.
    pub fn get(path: &str) -> OutboundRequest {
        OutboundRequest {
            method: "GET".into(),
            path: path.into(),
            headers: Vec::new(),
            body: Vec::new(),
            timeout: Duration::from_secs(1),
        }
    }
}

/// The answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundResponse {
    /// Status code.
    pub status: u16,
    /// Header fields.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Body.
    pub body: Vec<u8>,
}

/// Sends `req` to an endpoint of `cluster`; the error explains a failure.
pub fn call(cluster: &str, req: &OutboundRequest) -> Result<OutboundResponse, String> {
    host::outbound_call(cluster, req)
}

/// Sends `req` to `cluster` and returns at once; the answer is discarded (request mirroring,
/// notifications). Fails only for an unknown cluster or too many sends in flight.
pub fn send(cluster: &str, req: &OutboundRequest) -> Result<(), String> {
    host::outbound_send(cluster, req)
}
