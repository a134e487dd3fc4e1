//! The seam between the core and policy: the filter chain.
//!
//! The core runs a listener's chain at fixed phases of every request. A filter sees and edits
//! the request head, may answer at once (deny, redirect), and may choose the target cluster and
//! the upstream timeout through the [`RequestContext`]. The trait is independent of any ABI:
//! the Wasm host (WIT components, and later proxy-wasm modules) implements [`Filter`]; so can a
//! native Rust filter in tests. Failure policy is applied here, once, for every kind of filter.
//!
//! ```text
//! request head ──▶ route table ──▶ on-request-headers (chain order) ──▶ upstream
//!                                        │ respond ──▶ client
//!                                        │ error ──▶ fail-closed: 500 / fail-open: skip filter
//! request body ──▶ on-request-body (filters that asked for it) ──▶ upstream
//! upstream head ──▶ on-response-headers (chain order) ──▶ client
//!                                        │ retry ──▶ the request again, another endpoint
//! response body ──▶ on-response-body (filters that asked for it) ──▶ client
//! response end ──▶ on-log (every filter, errors only logged)
//! ```
//!
//! Bodies never enter a filter that did not ask for them ([`Filter::body_mode`]); the body
//! pipeline is in [`pipeline`].

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{request, response, Response};

use crate::body::Body;
use crate::error::ProxyError;
use crate::route::Route;
use crate::tls::TlsInfo;

pub mod bindings;
pub mod host;
pub mod pipeline;
pub mod state;
pub mod wasm;

/// What a phase returns: a future, so a filter may wait (a Wasm filter's outbound call)
/// without blocking the proxy.
pub type PhaseFuture<'a> = Pin<Box<dyn Future<Output = Result<Action, FilterError>> + Send + 'a>>;

/// What the log phase returns.
pub type LogFuture<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// What a body phase returns.
pub type BodyFuture<'a> = Pin<Box<dyn Future<Output = Result<BodyAction, FilterError>> + Send + 'a>>;

/// The phases of a request, named alike in WIT, the SDK, logs and metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Phase {
    /// The request head arrived and a route was found.
    RequestHeaders,
    /// A request body chunk (or the whole body) passes.
    RequestBody,
    /// The upstream's response head arrived.
    ResponseHeaders,
    /// A response body chunk (or the whole body) passes.
    ResponseBody,
    /// The response finished; for logs and metrics only.
    Log,
}

impl Phase {
    /// The phase's one name.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::RequestHeaders => "on-request-headers",
            Phase::RequestBody => "on-request-body",
            Phase::ResponseHeaders => "on-response-headers",
            Phase::ResponseBody => "on-response-body",
            Phase::Log => "on-log",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the core knows about a request besides its head; filters read and steer it.
#[derive(Debug, Clone)]
pub struct RequestContext {
    /// The listener that accepted the connection.
    pub listener: Arc<str>,
    /// The route the route table chose (its name: [`RequestContext::route_name`]). Shared
    /// with the route table: one reference count per request, where copies of its name,
    /// cluster, chain and series took four.
    pub route: Option<Arc<Route>>,
    /// The cluster a filter chose instead of the route's; [`RequestContext::cluster_name`]
    /// gives the one in force.
    pub cluster: Option<Arc<str>>,
    /// Upstream timeout override for this request.
    pub timeout: Option<Duration>,
    /// The client's address.
    pub client_addr: SocketAddr,
    /// TLS facts of the connection (SNI, ALPN, verified peer identity).
    pub tls: Option<Arc<TlsInfo>>,
    /// The request id (`x-request-id`), visible ASCII.
    pub request_id: http::HeaderValue,
    /// The upstream endpoint of the response, once there is one.
    pub upstream: Option<SocketAddr>,
    /// The back-off a response filter asked for before the retry it asks for.
    pub retry_delay: Option<Duration>,
    /// Per-request values filters keep between their phases (by filter, then key).
    pub values: Option<Box<RequestValues>>,
}

/// Per-request values of filters, by (filter name, key).
pub type RequestValues = std::collections::BTreeMap<(Arc<str>, String), Vec<u8>>;

impl RequestContext {
    /// The context of a new request on `listener` from `client_addr`.
    pub fn new(
        listener: Arc<str>,
        client_addr: SocketAddr,
        tls: Option<Arc<TlsInfo>>,
        request_id: http::HeaderValue,
    ) -> RequestContext {
        RequestContext {
            listener,
            route: None,
            cluster: None,
            timeout: None,
            client_addr,
            tls,
            request_id,
            upstream: None,
            retry_delay: None,
            values: None,
        }
    }

    /// The name of the route the request took.
    pub fn route_name(&self) -> Option<&str> {
        self.route.as_deref().map(|r| &*r.name)
    }

    /// The cluster the request goes to: the one a filter chose, else the route's.
    pub fn cluster_name(&self) -> Option<&str> {
        self.cluster
            .as_deref()
            .or_else(|| self.route.as_deref().map(|r| &*r.cluster))
    }

    /// An empty context: what a filter instance's store holds between calls, swapped with
    /// the request's for the duration of a call (moving costs nothing; a clone costs
    /// reference counts and allocations).
    pub(crate) fn empty() -> RequestContext {
        RequestContext::new(
            Arc::from(""),
            SocketAddr::from(([0, 0, 0, 0], 0)),
            None,
            http::HeaderValue::from_static(""),
        )
    }
}

/// What a phase decides.
#[derive(Debug)]
#[non_exhaustive]
pub enum Action {
    /// Go on with the next filter, then the upstream.
    Continue,
    /// Answer the client with this response now; later filters and the upstream are skipped.
    Respond(Response<Body>),
    /// From a response phase: drop this response and send the request again, to another
    /// endpoint when the cluster has one. Treated as `Continue` when the request cannot be
    /// replayed (its body was larger than the replay buffer) or the attempts are spent.
    Retry,
}

/// How a filter wants a body.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum BodyMode {
    /// The body streams past without entering the filter.
    #[default]
    None,
    /// Each chunk is handed to the filter as it arrives.
    Streamed,
    /// The whole body is gathered (up to the filter host's buffer limit) and handed over once.
    Buffered,
}

/// What a body phase decides about its chunk.
#[derive(Debug)]
#[non_exhaustive]
pub enum BodyAction {
    /// Pass the chunk on unchanged.
    Continue,
    /// Pass these bytes instead.
    Replace(Bytes),
    /// Request body only: answer the client with this response instead of the upstream's.
    Respond(Response<Body>),
}

/// The heads a body phase may read: the request as sent upstream, and in response body
/// phases the response head as sent to the client.
#[derive(Debug)]
pub struct Heads {
    /// The request head.
    pub req: request::Parts,
    /// The response head (response body phases).
    pub resp: Option<response::Parts>,
}

/// What a failing filter's request gets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailurePolicy {
    /// The request is answered 500 (the safe default for auth-like filters).
    #[default]
    FailClosed,
    /// The request goes on past the filter, without its answer. Header edits it made in the
    /// failed call before failing stay, as with Envoy's `fail_open` (undoing them would
    /// mean a copy of the head before every call).
    FailOpen,
}

/// A filter failed (trapped, timed out, returned an invalid value).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct FilterError {
    /// A short label for metrics (`trap`, `timeout`, `memory`, `invalid`).
    pub kind: &'static str,
    /// Details for the log.
    pub message: String,
}

/// Summary handed to the log phase.
#[derive(Debug, Clone)]
pub struct LogSummary {
    /// Final status sent to the client.
    pub status: u16,
    /// Response body bytes sent.
    pub bytes: u64,
    /// Time from request head to response end.
    pub duration: Duration,
    /// The upstream endpoint, if one was used.
    pub upstream: Option<SocketAddr>,
    /// The request's method.
    pub method: http::Method,
    /// The request's target, as the client sent it.
    pub target: Option<http::Uri>,
}

/// One filter, of any kind (a Wasm component, later a proxy-wasm module, or native Rust).
/// Every phase has a no-op default.
pub trait Filter: Send + Sync + 'static {
    /// The filter's name, used in logs, metrics and errors.
    fn name(&self) -> &str;

    /// Runs when the request head arrived and the route table chose a route. May edit the
    /// head, set `ctx.cluster`/`ctx.timeout`, or answer. Default: continue.
    fn on_request_headers<'a>(
        &'a self,
        _req: &'a mut request::Parts,
        _ctx: &'a mut RequestContext,
    ) -> PhaseFuture<'a> {
        Box::pin(std::future::ready(Ok(Action::Continue)))
    }

    /// Runs when the upstream's response head arrived. May edit it or replace the response;
    /// `req` is the request head as sent upstream (read-only by contract). Default: continue.
    fn on_response_headers<'a>(
        &'a self,
        _req: &'a mut request::Parts,
        _resp: &'a mut response::Parts,
        _ctx: &'a mut RequestContext,
    ) -> PhaseFuture<'a> {
        Box::pin(std::future::ready(Ok(Action::Continue)))
    }

    /// How the filter wants the body of `phase` ([`Phase::RequestBody`] or
    /// [`Phase::ResponseBody`]). Default: not at all, so the body streams past.
    fn body_mode(&self, _phase: Phase) -> BodyMode {
        BodyMode::None
    }

    /// Runs for a request body chunk (the whole body in [`BodyMode::Buffered`]); the last
    /// call has `end_of_stream`, possibly with an empty chunk. `ctx` is the body pipeline's
    /// copy of the request context, read-only by contract (`&mut` so a filter host can lend
    /// it to a call without copying it per chunk). Default: continue.
    fn on_request_body<'a>(
        &'a self,
        _chunk: Bytes,
        _end_of_stream: bool,
        _heads: &'a Arc<Heads>,
        _ctx: &'a mut RequestContext,
    ) -> BodyFuture<'a> {
        Box::pin(std::future::ready(Ok(BodyAction::Continue)))
    }

    /// Runs for a response body chunk, as [`Filter::on_request_body`]. `Respond` is not
    /// allowed here (the response head may have left already). Default: continue.
    fn on_response_body<'a>(
        &'a self,
        _chunk: Bytes,
        _end_of_stream: bool,
        _heads: &'a Arc<Heads>,
        _ctx: &'a mut RequestContext,
    ) -> BodyFuture<'a> {
        Box::pin(std::future::ready(Ok(BodyAction::Continue)))
    }

    /// Runs once when the response ended (or failed), off the request path (the response is
    /// already sent); errors are only logged and counted. Default: nothing.
    fn on_log<'a>(&'a self, _ctx: &'a RequestContext, _summary: &'a LogSummary) -> LogFuture<'a> {
        Box::pin(std::future::ready(()))
    }

    /// Whether the filter (still) wants `phase` called; the core skips work for phases no
    /// filter of a chain wants. Default: every phase.
    fn wants(&self, _phase: Phase) -> bool {
        true
    }
}

/// A filter in a chain with its failure policy.
#[derive(Clone)]
pub struct ChainEntry {
    /// The filter.
    pub filter: Arc<dyn Filter>,
    /// What happens when it fails.
    pub policy: FailurePolicy,
}

impl ChainEntry {
    /// Applies the failure policy to a failed call: `Ok` goes on without the filter
    /// (fail-open), `Err` is the request's error (fail-closed). The failure is logged.
    pub fn failed(&self, phase: Phase, err: FilterError) -> Result<(), ProxyError> {
        let name = self.filter.name();
        tracing::warn!(filter = name, phase = %phase, error = %err, policy = ?self.policy, "filter failed");
        match self.policy {
            FailurePolicy::FailOpen => Ok(()),
            FailurePolicy::FailClosed => Err(ProxyError::Filter {
                filter: name.to_string(),
                phase: phase.as_str(),
                reason: err.to_string(),
            }),
        }
    }
}

/// What a header phase of the whole chain decided.
#[derive(Debug)]
pub enum Verdict {
    /// Go on.
    Continue,
    /// Answer with this response.
    Respond(Response<Body>),
    /// Send the request again (response phase only).
    Retry,
}

/// An ordered list of filters; cloning it is cheap (requests keep one for their log phase).
#[derive(Clone, Default)]
pub struct FilterChain {
    entries: Arc<[ChainEntry]>,
}

/// A copy of a request head (what response phases read), made only for routes with filters.
pub fn copy_head(parts: &request::Parts) -> request::Parts {
    let mut r = http::Request::new(());
    *r.method_mut() = parts.method.clone();
    *r.uri_mut() = parts.uri.clone();
    *r.version_mut() = parts.version;
    *r.headers_mut() = parts.headers.clone();
    r.into_parts().0
}

impl FilterChain {
    /// A chain of these entries, in order.
    pub fn new(entries: Vec<ChainEntry>) -> FilterChain {
        FilterChain {
            entries: entries.into(),
        }
    }

    /// This chain followed by `more`.
    pub fn then(&self, more: impl IntoIterator<Item = ChainEntry>) -> FilterChain {
        FilterChain::new(self.entries.iter().cloned().chain(more).collect())
    }

    /// Whether the chain has no filter (the core skips all phase work then).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether any filter of the chain wants `phase`.
    pub fn wants(&self, phase: Phase) -> bool {
        self.entries.iter().any(|e| e.filter.wants(phase))
    }

    /// Whether any filter of the chain wants the body of `phase`.
    pub fn wants_body(&self, phase: Phase) -> bool {
        self.entries
            .iter()
            .any(|e| e.filter.body_mode(phase) != BodyMode::None)
    }

    /// The entries, in order.
    pub fn entries(&self) -> &[ChainEntry] {
        &self.entries
    }

    fn settle(
        &self,
        e: &ChainEntry,
        phase: Phase,
        r: Result<Action, FilterError>,
    ) -> Result<Verdict, ProxyError> {
        match r {
            Ok(Action::Continue) => Ok(Verdict::Continue),
            Ok(Action::Respond(resp)) => Ok(Verdict::Respond(resp)),
            Ok(Action::Retry) if phase == Phase::ResponseHeaders => Ok(Verdict::Retry),
            Ok(Action::Retry) => self.settle(
                e,
                phase,
                Err(FilterError {
                    kind: "invalid",
                    message: format!("retry is not an answer of {phase}"),
                }),
            ),
            Err(err) => e.failed(phase, err).map(|()| Verdict::Continue),
        }
    }

    /// Runs `on-request-headers` through the chain; `Some(response)` means answer now.
    pub async fn on_request_headers(
        &self,
        req: &mut request::Parts,
        ctx: &mut RequestContext,
    ) -> Result<Option<Response<Body>>, ProxyError> {
        for e in self.entries.iter() {
            if !e.filter.wants(Phase::RequestHeaders) {
                continue;
            }
            let r = e.filter.on_request_headers(req, ctx).await;
            if let Verdict::Respond(resp) = self.settle(e, Phase::RequestHeaders, r)? {
                return Ok(Some(resp));
            }
        }
        Ok(None)
    }

    /// Runs `on-response-headers` through the chain, up to the first filter that answers or
    /// asks for a retry.
    pub async fn on_response_headers(
        &self,
        req: &mut request::Parts,
        resp: &mut response::Parts,
        ctx: &mut RequestContext,
    ) -> Result<Verdict, ProxyError> {
        for e in self.entries.iter() {
            if !e.filter.wants(Phase::ResponseHeaders) {
                continue;
            }
            let r = e.filter.on_response_headers(req, resp, ctx).await;
            match self.settle(e, Phase::ResponseHeaders, r)? {
                Verdict::Continue => {}
                v => return Ok(v),
            }
        }
        Ok(Verdict::Continue)
    }

    /// Runs `on-log` on every filter that wants it.
    pub async fn on_log(&self, ctx: &RequestContext, summary: &LogSummary) {
        for e in self.entries.iter() {
            if e.filter.wants(Phase::Log) {
                e.filter.on_log(ctx, summary).await;
            }
        }
    }
}
