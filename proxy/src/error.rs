//! Why the proxy could not serve a request, and the one place that maps each cause to a
//! status code. Nothing else in Weir picks an error status.

use std::net::SocketAddr;
use std::time::Duration;

use http::{header, HeaderValue, Response, StatusCode};

use crate::body::{self, Body};

/// The header naming the reason of a locally generated error response.
pub const REASON_HEADER: &str = "x-weir-error";

/// A request the proxy answers itself with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProxyError {
    /// The request is malformed in a way hyper lets through.
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    /// The request target is longer than the listener allows.
    #[error("request target longer than {0} bytes")]
    UriTooLong(usize),
    /// The declared request body is larger than the listener allows.
    #[error("request body larger than {0} bytes")]
    BodyTooLarge(u64),
    /// The client stopped sending its request body for the stream idle timeout.
    #[error("request body idle for {0:?}")]
    BodyIdle(std::time::Duration),
    /// No route matches the request.
    #[error("no route for host and path")]
    NoRoute,
    /// `CONNECT` on a route that does not allow it.
    #[error("CONNECT is not allowed on this route")]
    ConnectNotAllowed,
    /// A reload removed (or renamed) the listener of the request's connection, which is
    /// being drained.
    #[error("the connection's listener was removed by a reload")]
    ListenerGone,
    /// The chosen cluster does not exist (a filter named a wrong one).
    #[error("unknown cluster {0:?}")]
    UnknownCluster(String),
    /// Every endpoint of the cluster is ejected or none is resolved.
    #[error("no healthy endpoint in cluster {0:?}")]
    NoHealthyEndpoint(String),
    /// Connecting to an endpoint failed (every attempt).
    #[error("connect to {addr} failed: {reason}")]
    Connect {
        /// The endpoint.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// The upstream failed after the request was sent (reset, protocol error).
    #[error("upstream {addr} failed: {reason}")]
    Upstream {
        /// The endpoint.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// The upstream did not answer within the request timeout.
    #[error("upstream {addr} did not answer within {timeout:?}")]
    Timeout {
        /// The endpoint.
        addr: SocketAddr,
        /// The timeout in force.
        timeout: Duration,
    },
    /// An HTTP upgrade was asked of an upstream that cannot do it.
    #[error("upgrade not possible: {0}")]
    UpgradeUnsupported(&'static str),
    /// A filter failed and its policy is fail-closed.
    #[error("filter {filter}: {phase}: {reason}")]
    Filter {
        /// The filter's name.
        filter: String,
        /// The phase that failed.
        phase: &'static str,
        /// Why.
        reason: String,
    },
}

impl ProxyError {
    /// The status code for this cause: the proxy's whole error policy on one screen.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::UriTooLong(_) => StatusCode::URI_TOO_LONG,
            ProxyError::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::BodyIdle(_) => StatusCode::REQUEST_TIMEOUT,
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::ConnectNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::UnknownCluster(_) | ProxyError::Filter { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            ProxyError::NoHealthyEndpoint(_) | ProxyError::ListenerGone => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Connect { .. } | ProxyError::Upstream { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::UpgradeUnsupported(_) => StatusCode::NOT_IMPLEMENTED,
        }
    }

    /// A short stable token for the `x-weir-error` header, logs and tests.
    pub fn reason(&self) -> &'static str {
        match self {
            ProxyError::BadRequest(_) => "bad-request",
            ProxyError::UriTooLong(_) => "uri-too-long",
            ProxyError::BodyTooLarge(_) => "body-too-large",
            ProxyError::BodyIdle(_) => "request-body-idle",
            ProxyError::NoRoute => "no-route",
            ProxyError::ConnectNotAllowed => "connect-not-allowed",
            ProxyError::ListenerGone => "listener-gone",
            ProxyError::UnknownCluster(_) => "unknown-cluster",
            ProxyError::NoHealthyEndpoint(_) => "no-healthy-endpoint",
            ProxyError::Connect { .. } => "upstream-connect-failed",
            ProxyError::Upstream { .. } => "upstream-failed",
            ProxyError::Timeout { .. } => "upstream-timeout",
            ProxyError::UpgradeUnsupported(_) => "upgrade-unsupported",
            ProxyError::Filter { .. } => "filter-failed",
        }
    }

    /// Whether the upstream failed (connect, reset, timeout, none healthy): a response that
    /// resilience filters may retry or replace.
    pub fn is_upstream_failure(&self) -> bool {
        matches!(
            self,
            ProxyError::Connect { .. }
                | ProxyError::Upstream { .. }
                | ProxyError::Timeout { .. }
                | ProxyError::NoHealthyEndpoint(_)
        )
    }

    /// The endpoint that failed, when one did.
    pub fn upstream_addr(&self) -> Option<std::net::SocketAddr> {
        match self {
            ProxyError::Connect { addr, .. }
            | ProxyError::Upstream { addr, .. }
            | ProxyError::Timeout { addr, .. } => Some(*addr),
            _ => None,
        }
    }

    /// Whether the downstream connection should be closed after answering (the request's
    /// framing can no longer be trusted, or its listener is gone).
    pub fn closes_connection(&self) -> bool {
        matches!(
            self,
            ProxyError::BadRequest(_)
                | ProxyError::BodyTooLarge(_)
                | ProxyError::BodyIdle(_)
                | ProxyError::ListenerGone
        )
    }

    /// The response the client gets: status, reason header, a short plain body. Details stay
    /// in the log; the client learns only the class of failure.
    pub fn to_response(&self) -> Response<Body> {
        let status = self.status();
        let text = format!("{} {}\n", status.as_u16(), self.reason());
        let mut resp = Response::new(body::full(text));
        *resp.status_mut() = status;
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        h.insert(REASON_HEADER, HeaderValue::from_static(self.reason()));
        if self.closes_connection() {
            h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}
