//! Facts about the request (client, TLS identity, listener, route) and routing controls.

use std::time::Duration;

use crate::host;
use crate::http::HostError;

/// The verified identity of a TLS client (mTLS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// Certificate subject, e.g. `CN=frontend,O=acme`.
    pub subject: String,
    /// URI SANs, e.g. `spiffe://cluster.local/ns/web/sa/frontend`.
    pub uri_sans: Vec<String>,
    /// DNS SANs.
    pub dns_sans: Vec<String>,
}

/// The client's address, `ip:port`.
pub fn client_address() -> String {
    host::prop_client_address()
}

/// The verified client certificate's identity, on mTLS listeners.
pub fn peer_identity() -> Option<PeerIdentity> {
    host::prop_peer_identity().map(|p| PeerIdentity {
        subject: p.subject,
        uri_sans: p.uri_sans,
        dns_sans: p.dns_sans,
    })
}

/// The SNI the client sent.
pub fn sni() -> Option<String> {
    host::prop_sni()
}

/// The listener's name.
pub fn listener() -> String {
    host::prop_listener()
}

/// The route the route table chose.
pub fn route() -> Option<String> {
    host::prop_route()
}

/// The request id (`x-request-id`).
pub fn request_id() -> String {
    host::prop_request_id()
}

/// The cluster the request will go to.
pub fn cluster() -> Option<String> {
    host::prop_cluster()
}

/// Sends the request to another cluster; unknown names are refused.
pub fn set_cluster(name: &str) -> Result<(), HostError> {
    host::prop_set_cluster(name).map_err(Into::into)
}

/// Sets this request's upstream timeout (time to the response head).
pub fn set_timeout(t: Duration) -> Result<(), HostError> {
    host::prop_set_timeout(t.as_millis().min(u32::MAX as u128) as u32).map_err(Into::into)
}

/// The filter's own name, as configured.
pub fn filter_name() -> String {
    host::prop_filter_name()
}

/// The upstream endpoint (`ip:port`) the response came from, in response phases.
pub fn upstream() -> Option<String> {
    host::prop_upstream()
}

/// A value this filter stored for this request with [`set_request_value`].
///
/// Instances serve many requests, so a filter does not keep per-request facts in itself; what
/// one phase learns for a later phase of the same request goes here (the route a router
/// chose, a rate-limit bucket, a start time).
pub fn request_value(key: &str) -> Option<Vec<u8>> {
    host::prop_get_request_value(key)
}

/// Stores a value for this request, visible to this filter's later phases only. In header
/// phases; at most 32 values of 4 KiB per request.
pub fn set_request_value(key: &str, value: &[u8]) -> Result<(), HostError> {
    host::prop_set_request_value(key, value).map_err(Into::into)
}

/// Outlier signal, in `on_response_headers`: takes the response's upstream endpoint out of
/// balancing for `d` (at most 10 minutes). Refused for the cluster's last available endpoint.
pub fn eject_upstream(d: Duration) -> Result<(), HostError> {
    host::prop_eject_upstream(d.as_millis().min(u32::MAX as u128) as u32).map_err(Into::into)
}

/// In `on_response_headers`, before returning [`crate::Action::Retry`]: wait `d` before the
/// next attempt (back-off; at most 10 s).
pub fn set_retry_delay(d: Duration) -> Result<(), HostError> {
    host::prop_set_retry_delay(d.as_millis().min(u32::MAX as u128) as u32).map_err(Into::into)
}
