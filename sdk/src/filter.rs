//! The [`Filter`] trait and the runtime that adapts it to the exported `handler` interface.

use serde::de::DeserializeOwned;

use crate::http::{Action, Request, Response, ResponseHead};
use crate::wit::weir::filter::types as wt;

/// How a filter wants a body.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum BodyMode {
    /// The body streams past without entering the filter (fastest).
    #[default]
    None,
    /// Each chunk is handed over as it arrives.
    Stream,
    /// The whole body is gathered (up to the host's limit) and handed over once.
    Buffer,
}

/// What a filter asks of the host, once at load.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// How `on_request_body` gets the request body.
    pub request_body: BodyMode,
    /// How `on_response_body` gets the response body.
    pub response_body: BodyMode,
}

/// What a body phase decides about the chunk it was given.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum BodyAction {
    /// Pass the chunk on unchanged.
    Continue,
    /// Pass these bytes instead.
    Replace(Vec<u8>),
    /// From `on_request_body` only: answer now.
    Respond(Response),
}

/// What the log phase learns about the finished exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Final status sent to the client.
    pub status: u16,
    /// Response body bytes sent.
    pub bytes_sent: u64,
    /// Time from request head to response end, in microseconds.
    pub duration_us: u64,
    /// The upstream endpoint used, if any.
    pub upstream: Option<String>,
}

/// A config type for filters that take none: accepts any table and ignores it.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoConfig;

impl<'de> serde::Deserialize<'de> for NoConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        serde::de::IgnoredAny::deserialize(d).map(|_| NoConfig)
    }
}

/// A Weir filter. Built once per instance from its configuration; every phase is optional
/// and continues by default. One instance serves one request at a time.
pub trait Filter: Sized + 'static {
    /// The filter's configuration: its table in `weir.toml`, deserialised with serde.
    type Config: DeserializeOwned;

    /// Builds the filter from its configuration (once per instance, off the request path).
    /// An error stops the filter from loading; the message names what is wrong.
    fn new(config: Self::Config) -> Result<Self, String>;

    /// What the filter asks of the host. Default: no bodies.
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }

    /// The request head arrived and a route was chosen: inspect or edit the request, choose
    /// the cluster ([`crate::props::set_cluster`]), or answer. Default: continue.
    fn on_request_headers(&self, _req: &Request) -> Action {
        Action::NotImplemented
    }

    /// A request body chunk (only if `capabilities().request_body` is not `None`).
    /// Default: continue.
    fn on_request_body(&self, _chunk: &[u8], _end_of_stream: bool) -> BodyAction {
        BodyAction::Continue
    }

    /// The response head arrived: edit it, answer instead, or ask for a retry.
    /// Default: continue.
    fn on_response_headers(&self, _resp: &ResponseHead) -> Action {
        Action::NotImplemented
    }

    /// A response body chunk (only if `capabilities().response_body` is not `None`).
    /// Default: continue.
    fn on_response_body(&self, _chunk: &[u8], _end_of_stream: bool) -> BodyAction {
        BodyAction::Continue
    }

    /// The exchange finished: for logs and metrics. Default: nothing (and the host stops
    /// calling it).
    fn on_log(&self, _summary: &Summary) {
        runtime::LOG_DEFAULT.with(|d| d.set(true));
    }
}

/// The glue [`crate::export_filter!`] calls; generic over the author's filter type.
#[doc(hidden)]
pub mod runtime {
    use std::any::Any;
    use std::cell::RefCell;

    use super::*;

    thread_local! {
        // One filter value per instance, built by `init`.
        static FILTER: RefCell<Option<Box<dyn Any>>> = const { RefCell::new(None) };
        // Set by the default `on_log`: the filter does not implement it.
        pub(crate) static LOG_DEFAULT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    fn with<F: Filter, R>(f: impl FnOnce(&F) -> R) -> R {
        FILTER.with(|cell| {
            let slot = cell.borrow();
            let filter = slot
                .as_ref()
                .and_then(|b| b.downcast_ref::<F>())
                .expect("weir-sdk: a phase ran before init");
            f(filter)
        })
    }

    fn mode(m: BodyMode) -> wt::BodyMode {
        match m {
            BodyMode::None => wt::BodyMode::None,
            BodyMode::Stream => wt::BodyMode::Streamed,
            BodyMode::Buffer => wt::BodyMode::Buffered,
        }
    }

    fn body_action(a: BodyAction) -> wt::BodyAction {
        match a {
            BodyAction::Continue => wt::BodyAction::Continue,
            BodyAction::Replace(b) => wt::BodyAction::Replace(b),
            BodyAction::Respond(r) => wt::BodyAction::Respond(r.into_wit()),
        }
    }

    /// Builds the filter from its JSON config.
    pub fn init_typed<F: Filter>(config: &str) -> Result<Capabilities, String> {
        let config = if config.trim().is_empty() { "{}" } else { config };
        let parsed: F::Config = serde_json::from_str(config).map_err(|e| format!("invalid config: {e}"))?;
        let filter = F::new(parsed)?;
        let caps = filter.capabilities();
        FILTER.with(|cell| *cell.borrow_mut() = Some(Box::new(filter)));
        Ok(caps)
    }

    /// `init` export.
    pub fn init<F: Filter>(config: &str) -> Result<wt::Capabilities, String> {
        let c = init_typed::<F>(config)?;
        Ok(wt::Capabilities {
            request_body: mode(c.request_body),
            response_body: mode(c.response_body),
        })
    }

    /// `on-request-headers`, typed (a default phase reads as `Continue`).
    pub fn request_headers_typed<F: Filter>() -> Action {
        visible(request_headers_raw::<F>())
    }

    fn request_headers_raw<F: Filter>() -> Action {
        with::<F, _>(|f| f.on_request_headers(&Request))
    }

    fn visible(a: Action) -> Action {
        match a {
            Action::NotImplemented => Action::Continue,
            a => a,
        }
    }

    /// `on-request-headers` export.
    pub fn on_request_headers<F: Filter>() -> wt::Action {
        request_headers_raw::<F>().into_wit()
    }

    /// `on-request-body`, typed.
    pub fn request_body_typed<F: Filter>(chunk: &[u8], eos: bool) -> BodyAction {
        with::<F, _>(|f| f.on_request_body(chunk, eos))
    }

    /// `on-request-body` export.
    pub fn on_request_body<F: Filter>(chunk: Vec<u8>, eos: bool) -> wt::BodyAction {
        body_action(request_body_typed::<F>(&chunk, eos))
    }

    /// `on-response-headers`, typed (a default phase reads as `Continue`).
    pub fn response_headers_typed<F: Filter>() -> Action {
        visible(response_headers_raw::<F>())
    }

    fn response_headers_raw<F: Filter>() -> Action {
        with::<F, _>(|f| f.on_response_headers(&ResponseHead))
    }

    /// `on-response-headers` export.
    pub fn on_response_headers<F: Filter>() -> wt::Action {
        response_headers_raw::<F>().into_wit()
    }

    /// `on-response-body`, typed.
    pub fn response_body_typed<F: Filter>(chunk: &[u8], eos: bool) -> BodyAction {
        with::<F, _>(|f| f.on_response_body(chunk, eos))
    }

    /// `on-response-body` export.
    pub fn on_response_body<F: Filter>(chunk: Vec<u8>, eos: bool) -> wt::BodyAction {
        body_action(response_body_typed::<F>(&chunk, eos))
    }

    /// `on-log`, typed.
    pub fn log_typed<F: Filter>(s: &Summary) {
        with::<F, _>(|f| f.on_log(s))
    }

    /// `on-log` export: false when the filter left `on_log` to its default.
    pub fn on_log<F: Filter>(s: wt::Summary) -> bool {
        let s = Summary {
            status: s.status,
            bytes_sent: s.bytes_sent,
            duration_us: s.duration_us,
            upstream: s.upstream,
        };
        LOG_DEFAULT.with(|d| d.set(false));
        log_typed::<F>(&s);
        !LOG_DEFAULT.with(|d| d.get())
    }
}
