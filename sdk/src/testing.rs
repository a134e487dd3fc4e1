//! A mock host for unit-testing filters with plain `cargo test` (on the build machine, not
//! in Wasm). Set up the request in a [`MockHost`], run a phase through [`TestFilter`], and
//! assert on what the filter did: headers, cluster, logs, metrics, state.
//!
//! The mock host refuses what the proxy refuses: framing and hop-by-hop header names, a
//! status outside 200..=599, a zero timeout, and an edit in a phase where the proxy answers
//! `wrong-phase` (the request only in `on_request_headers`, the response only in
//! `on_response_headers`). A phase that answers with a response the proxy would refuse (in
//! the proxy, that filter's error) panics, failing the test.
//!
//! ```no_run
//! # use weir_sdk::{Action, Filter, NoConfig, Request};
//! # struct Deny;
//! # impl Filter for Deny {
//! #     type Config = NoConfig;
//! #     fn new(_: NoConfig) -> Result<Self, String> { Ok(Deny) }
//! # }
//! use weir_sdk::testing::{MockHost, TestFilter};
//!
//! let filter = TestFilter::<Deny>::new("{}").unwrap();
//! MockHost::reset(|h| h.path = "/admin".into());
//! assert_eq!(filter.on_request_headers(), Action::Continue);
//! ```

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::marker::PhantomData;

use crate::filter::{runtime, BodyAction, Capabilities, Filter, Summary};
use crate::http::Action;
use crate::log::Level;
use crate::outbound::{OutboundRequest, OutboundResponse};
use crate::props::PeerIdentity;

/// A handler for outbound calls in tests: `(cluster, request) -> response`.
pub type OutboundHandler = Box<dyn FnMut(&str, &OutboundRequest) -> Result<OutboundResponse, String>>;

/// Everything the host would know and record, as plain fields.
pub struct MockHost {
    /// Request method.
    pub method: String,
    /// Canonical path.
    pub path: String,
    /// Query without `?`.
    pub query: Option<String>,
    /// Authority.
    pub authority: Option<String>,
    /// `http` or `https`.
    pub scheme: String,
    /// Request headers, in order, names lower-case.
    pub request_headers: Vec<(String, Vec<u8>)>,
    /// Response status (response phases).
    pub status: u16,
    /// Response headers.
    pub response_headers: Vec<(String, Vec<u8>)>,
    /// Client address.
    pub client_address: String,
    /// mTLS identity.
    pub peer: Option<PeerIdentity>,
    /// SNI.
    pub sni: Option<String>,
    /// Listener name.
    pub listener: String,
    /// Route name.
    pub route: Option<String>,
    /// Request id.
    pub request_id: String,
    /// Chosen cluster.
    pub cluster: Option<String>,
    /// Clusters `set_cluster` accepts.
    pub known_clusters: Vec<String>,
    /// Timeout set by the filter, in ms.
    pub timeout_ms: Option<u32>,
    /// The filter's name.
    pub filter_name: String,
    /// Log lines written.
    pub logs: Vec<(Level, String)>,
    /// Counters by `name{k=v,...}`.
    pub counters: BTreeMap<String, u64>,
    /// Gauges by `name{k=v,...}`.
    pub gauges: BTreeMap<String, i64>,
    /// Histogram observations by `name{k=v,...}`.
    pub histograms: BTreeMap<String, Vec<f64>>,
    /// Shared state: key -> (value, version).
    pub state: BTreeMap<String, (Vec<u8>, u64)>,
    /// Answers outbound calls; without one they fail.
    pub outbound: Option<OutboundHandler>,
    /// The upstream endpoint of the response (response phases).
    pub upstream: Option<String>,
    /// Per-request values the filter stored.
    pub request_values: BTreeMap<String, Vec<u8>>,
    /// Ejections the filter asked for, in ms.
    pub ejections: Vec<u32>,
    /// The retry back-off the filter asked for, in ms.
    pub retry_delay_ms: Option<u32>,
    /// Fire-and-forget sends the filter made: (cluster, request).
    pub sent: Vec<(String, OutboundRequest)>,
    /// The phase [`TestFilter`] is running, if any: host calls check it as the proxy does (a
    /// request edit outside `on_request_headers` is `wrong-phase`). Calls made outside a
    /// `TestFilter` phase are not checked.
    phase: Option<MockPhase>,
}

/// A phase [`TestFilter`] runs, for the host calls' phase rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MockPhase {
    RequestHeaders,
    RequestBody,
    ResponseHeaders,
    ResponseBody,
    Log,
}

impl Default for MockHost {
    fn default() -> Self {
        MockHost {
            method: "GET".into(),
            path: "/".into(),
            query: None,
            authority: Some("example.com".into()),
            scheme: "http".into(),
            request_headers: Vec::new(),
            status: 200,
            response_headers: Vec::new(),
            client_address: "127.0.0.1:50000".into(),
            peer: None,
            sni: None,
            listener: "test".into(),
            route: Some("test".into()),
            request_id: "test-request".into(),
            cluster: Some("default".into()),
            known_clusters: vec!["default".into()],
            timeout_ms: None,
            filter_name: "test".into(),
            logs: Vec::new(),
            counters: BTreeMap::new(),
            gauges: BTreeMap::new(),
            histograms: BTreeMap::new(),
            state: BTreeMap::new(),
            outbound: None,
            upstream: None,
            request_values: BTreeMap::new(),
            ejections: Vec::new(),
            retry_delay_ms: None,
            sent: Vec::new(),
            phase: None,
        }
    }
}

thread_local! {
    static MOCK: RefCell<MockHost> = RefCell::new(MockHost::default());
}

impl MockHost {
    /// Starts a fresh request: default values, then `setup`.
    pub fn reset(setup: impl FnOnce(&mut MockHost)) {
        MOCK.with(|m| {
            let mut h = MockHost::default();
            setup(&mut h);
            *m.borrow_mut() = h;
        })
    }

    /// Reads or changes the mock host (e.g. to assert on headers after a phase).
    pub fn with<R>(f: impl FnOnce(&mut MockHost) -> R) -> R {
        MOCK.with(|m| f(&mut m.borrow_mut()))
    }

    /// The first value of a request header, as text.
    pub fn request_header(name: &str) -> Option<String> {
        Self::with(|h| get(&h.request_headers, name).map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// The first value of a response header, as text.
    pub fn response_header(name: &str) -> Option<String> {
        Self::with(|h| get(&h.response_headers, name).map(|v| String::from_utf8_lossy(&v).into_owned()))
    }
}

/// A filter under test, initialised from JSON config like the host does.
pub struct TestFilter<F: Filter> {
    /// What `init` answered.
    pub capabilities: Capabilities,
    _f: PhantomData<F>,
}

impl<F: Filter> TestFilter<F> {
    /// Initialises the filter with its config as JSON (`"{}"` for none).
    pub fn new(config_json: &str) -> Result<Self, String> {
        let capabilities = runtime::init_typed::<F>(config_json)?;
        Ok(TestFilter {
            capabilities,
            _f: PhantomData,
        })
    }

    /// Runs `on_request_headers` against the mock host. Panics, as a failed test, when the
    /// answer is a response the proxy would refuse (a framing or hop-by-hop header, a status
    /// outside 200..=599): in the proxy that is the filter's error.
    pub fn on_request_headers(&self) -> Action {
        checked(in_phase(
            MockPhase::RequestHeaders,
            runtime::request_headers_typed::<F>,
        ))
    }

    /// Runs `on_request_body`.
    pub fn on_request_body(&self, chunk: &[u8], end_of_stream: bool) -> BodyAction {
        checked_body(in_phase(MockPhase::RequestBody, || {
            runtime::request_body_typed::<F>(chunk, end_of_stream)
        }))
    }

    /// Runs `on_response_headers` (its answer checked as in [`TestFilter::on_request_headers`]).
    pub fn on_response_headers(&self) -> Action {
        checked(in_phase(
            MockPhase::ResponseHeaders,
            runtime::response_headers_typed::<F>,
        ))
    }

    /// Runs `on_response_body`.
    pub fn on_response_body(&self, chunk: &[u8], end_of_stream: bool) -> BodyAction {
        checked_body(in_phase(MockPhase::ResponseBody, || {
            runtime::response_body_typed::<F>(chunk, end_of_stream)
        }))
    }

    /// Runs `on_log`.
    pub fn on_log(&self, summary: &Summary) {
        in_phase(MockPhase::Log, || runtime::log_typed::<F>(summary))
    }
}

fn in_phase<R>(phase: MockPhase, run: impl FnOnce() -> R) -> R {
    MockHost::with(|h| h.phase = Some(phase));
    let r = run();
    MockHost::with(|h| h.phase = None);
    r
}

fn checked(a: Action) -> Action {
    if let Action::Respond(r) = &a {
        check_response(r);
    }
    a
}

fn checked_body(a: BodyAction) -> BodyAction {
    if let BodyAction::Respond(r) = &a {
        check_response(r);
    }
    a
}

/// What the proxy checks of a response a filter makes.
fn check_response(r: &crate::Response) {
    let w = r.clone().into_wit();
    assert!(
        (200..=599).contains(&w.status),
        "weir-sdk testing: the proxy refuses a response with status {} (200..=599)",
        w.status
    );
    for h in &w.headers {
        if let Err(e) = imp::check_name(&h.name).and_then(|()| imp::check_value(&h.value)) {
            panic!(
                "weir-sdk testing: the proxy refuses this response's header {:?}: {e:?}",
                h.name
            );
        }
    }
}

fn get(list: &[(String, Vec<u8>)], name: &str) -> Option<Vec<u8>> {
    list.iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.clone())
}

fn key(name: &str, labels: &[(&str, &str)]) -> String {
    let l: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("{name}{{{}}}", l.join(","))
}

/// The mock implementations of the host calls (same signatures as the wasm ones).
#[doc(hidden)]
pub(crate) mod imp {
    use super::*;
    use crate::wit::weir::filter::{metrics as mt, state as st, types as wt};

    /// The host's rules for names filters may set: the same refusals the proxy makes.
    pub(super) fn check_name(n: &str) -> Result<(), wt::Error> {
        const REFUSED: &[&str] = &[
            "connection",
            "keep-alive",
            "proxy-connection",
            "proxy-authenticate",
            "proxy-authorization",
            "transfer-encoding",
            "te",
            "trailer",
            "upgrade",
            "content-length",
            "host",
        ];
        let valid = !n.is_empty()
            && n.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
        if !valid {
            return Err(wt::Error::Invalid(format!("invalid header name {n:?}")));
        }
        if REFUSED.contains(&n.to_ascii_lowercase().as_str()) {
            return Err(wt::Error::Invalid(format!(
                "header {n:?} is managed by the proxy"
            )));
        }
        Ok(())
    }

    pub(super) fn check_value(v: &[u8]) -> Result<(), wt::Error> {
        if v.iter().any(|&b| b == b'\r' || b == b'\n' || b == 0) {
            return Err(wt::Error::Invalid("invalid header value".into()));
        }
        Ok(())
    }

    fn m<R>(f: impl FnOnce(&mut MockHost) -> R) -> R {
        MockHost::with(f)
    }

    /// `wrong-phase` when a [`TestFilter`] phase runs and it is none of `allowed`.
    fn only_in(allowed: &[MockPhase]) -> Result<(), wt::Error> {
        match m(|h| h.phase) {
            Some(p) if !allowed.contains(&p) => Err(wt::Error::WrongPhase),
            _ => Ok(()),
        }
    }
    const REQUEST_EDITS: &[MockPhase] = &[MockPhase::RequestHeaders];
    const RESPONSE_EDITS: &[MockPhase] = &[MockPhase::ResponseHeaders];

    fn headers(list: &[(String, Vec<u8>)]) -> Vec<wt::Header> {
        list.iter()
            .map(|(n, v)| wt::Header {
                name: n.clone(),
                value: v.clone(),
            })
            .collect()
    }

    fn set(list: &mut Vec<(String, Vec<u8>)>, n: &str, v: &[u8], append: bool) -> Result<(), wt::Error> {
        check_name(n)?;
        check_value(v)?;
        let n = n.to_ascii_lowercase();
        if !append {
            list.retain(|(k, _)| *k != n);
        }
        list.push((n, v.to_vec()));
        Ok(())
    }

    pub fn req_method() -> String {
        m(|h| h.method.clone())
    }
    pub fn req_path() -> String {
        m(|h| h.path.clone())
    }
    pub fn req_query() -> Option<String> {
        m(|h| h.query.clone())
    }
    pub fn req_authority() -> Option<String> {
        m(|h| h.authority.clone())
    }
    pub fn req_scheme() -> String {
        m(|h| h.scheme.clone())
    }
    pub fn req_get_header(n: &str) -> Option<Vec<u8>> {
        m(|h| get(&h.request_headers, n))
    }
    pub fn req_get_header_all(n: &str) -> Vec<Vec<u8>> {
        m(|h| {
            h.request_headers
                .iter()
                .filter(|(k, _)| k.eq_ignore_ascii_case(n))
                .map(|(_, v)| v.clone())
                .collect()
        })
    }
    pub fn req_get_headers() -> Vec<wt::Header> {
        m(|h| headers(&h.request_headers))
    }
    pub fn req_set_header(n: &str, v: &[u8]) -> Result<(), wt::Error> {
        only_in(REQUEST_EDITS)?;
        m(|h| set(&mut h.request_headers, n, v, false))
    }
    pub fn req_append_header(n: &str, v: &[u8]) -> Result<(), wt::Error> {
        only_in(REQUEST_EDITS)?;
        m(|h| set(&mut h.request_headers, n, v, true))
    }
    pub fn req_remove_header(n: &str) -> Result<(), wt::Error> {
        only_in(REQUEST_EDITS)?;
        check_name(n)?;
        m(|h| h.request_headers.retain(|(k, _)| !k.eq_ignore_ascii_case(n)));
        Ok(())
    }
    pub fn req_set_path(p: &str) -> Result<(), wt::Error> {
        only_in(REQUEST_EDITS)?;
        if !p.starts_with('/') {
            return Err(wt::Error::Invalid(format!("path must start with '/': {p:?}")));
        }
        let (path, query) = match p.split_once('?') {
            Some((a, b)) => (a.to_string(), Some(b.to_string())),
            None => (p.to_string(), None),
        };
        m(|h| {
            h.path = path;
            h.query = query;
        });
        Ok(())
    }
    pub fn req_set_authority(a: &str) -> Result<(), wt::Error> {
        only_in(REQUEST_EDITS)?;
        m(|h| h.authority = Some(a.to_string()));
        Ok(())
    }
    pub fn resp_status() -> u16 {
        m(|h| h.status)
    }
    pub fn resp_set_status(s: u16) -> Result<(), wt::Error> {
        only_in(RESPONSE_EDITS)?;
        if !(200..=599).contains(&s) {
            return Err(wt::Error::Invalid(format!("invalid status {s}")));
        }
        m(|h| h.status = s);
        Ok(())
    }
    pub fn resp_get_header(n: &str) -> Option<Vec<u8>> {
        m(|h| get(&h.response_headers, n))
    }
    pub fn resp_get_headers() -> Vec<wt::Header> {
        m(|h| headers(&h.response_headers))
    }
    pub fn resp_set_header(n: &str, v: &[u8]) -> Result<(), wt::Error> {
        only_in(RESPONSE_EDITS)?;
        m(|h| set(&mut h.response_headers, n, v, false))
    }
    pub fn resp_append_header(n: &str, v: &[u8]) -> Result<(), wt::Error> {
        only_in(RESPONSE_EDITS)?;
        m(|h| set(&mut h.response_headers, n, v, true))
    }
    pub fn resp_remove_header(n: &str) -> Result<(), wt::Error> {
        only_in(RESPONSE_EDITS)?;
        check_name(n)?;
        m(|h| h.response_headers.retain(|(k, _)| !k.eq_ignore_ascii_case(n)));
        Ok(())
    }
    pub fn prop_client_address() -> String {
        m(|h| h.client_address.clone())
    }
    pub fn prop_peer_identity() -> Option<wt::PeerIdentity> {
        m(|h| {
            h.peer.as_ref().map(|p| wt::PeerIdentity {
                subject: p.subject.clone(),
                uri_sans: p.uri_sans.clone(),
                dns_sans: p.dns_sans.clone(),
            })
        })
    }
    pub fn prop_sni() -> Option<String> {
        m(|h| h.sni.clone())
    }
    pub fn prop_listener() -> String {
        m(|h| h.listener.clone())
    }
    pub fn prop_route() -> Option<String> {
        m(|h| h.route.clone())
    }
    pub fn prop_request_id() -> String {
        m(|h| h.request_id.clone())
    }
    pub fn prop_cluster() -> Option<String> {
        m(|h| h.cluster.clone())
    }
    pub fn prop_set_cluster(n: &str) -> Result<(), wt::Error> {
        only_in(REQUEST_EDITS)?;
        m(|h| {
            if !h.known_clusters.iter().any(|c| c == n) {
                return Err(wt::Error::Invalid(format!("unknown cluster {n:?}")));
            }
            h.cluster = Some(n.to_string());
            Ok(())
        })
    }
    pub fn prop_set_timeout(ms: u32) -> Result<(), wt::Error> {
        only_in(REQUEST_EDITS)?;
        if ms == 0 {
            return Err(wt::Error::Invalid("timeout must be greater than zero".into()));
        }
        m(|h| h.timeout_ms = Some(ms));
        Ok(())
    }
    pub fn prop_filter_name() -> String {
        m(|h| h.filter_name.clone())
    }
    pub fn log_enabled(_: wt::LogLevel) -> bool {
        true
    }
    pub fn log_write(l: wt::LogLevel, msg: &str) {
        let level = match l {
            wt::LogLevel::Trace => Level::Trace,
            wt::LogLevel::Debug => Level::Debug,
            wt::LogLevel::Info => Level::Info,
            wt::LogLevel::Warn => Level::Warn,
            wt::LogLevel::Error => Level::Error,
        };
        m(|h| h.logs.push((level, msg.to_string())))
    }
    pub fn metrics_counter_add(n: &str, l: &[(&str, &str)], v: u64) -> Result<(), wt::Error> {
        m(|h| *h.counters.entry(key(n, l)).or_default() += v);
        Ok(())
    }
    pub fn metrics_gauge_set(n: &str, l: &[(&str, &str)], v: i64) -> Result<(), wt::Error> {
        m(|h| h.gauges.insert(key(n, l), v));
        Ok(())
    }
    pub fn metrics_histogram_observe(n: &str, l: &[(&str, &str)], v: f64) -> Result<(), wt::Error> {
        m(|h| h.histograms.entry(key(n, l)).or_default().push(v));
        Ok(())
    }
    thread_local! {
        /// Series named through handles: (kind, key). Kept across `MockHost::reset`, as a
        /// filter instance keeps its handles; the values live in the mock host.
        static SERIES: RefCell<Vec<(mt::MetricKind, String)>> = const { RefCell::new(Vec::new()) };
    }
    pub fn metrics_series(k: mt::MetricKind, n: &str, l: &[(&str, &str)]) -> Result<u32, wt::Error> {
        let key = key(n, l);
        Ok(SERIES.with(|s| {
            let mut s = s.borrow_mut();
            match s.iter().position(|(kind, have)| *kind == k && *have == key) {
                Some(i) => i as u32,
                None => {
                    s.push((k, key));
                    (s.len() - 1) as u32
                }
            }
        }))
    }
    fn series(h: u32, want: mt::MetricKind) -> Result<String, wt::Error> {
        SERIES.with(|s| match s.borrow().get(h as usize) {
            Some((kind, key)) if *kind == want => Ok(key.clone()),
            _ => Err(wt::Error::Invalid(format!("unknown {want:?} series handle {h}"))),
        })
    }
    pub fn metrics_add(h: u32, v: u64) -> Result<(), wt::Error> {
        let key = series(h, mt::MetricKind::Counter)?;
        m(|host| *host.counters.entry(key).or_default() += v);
        Ok(())
    }
    pub fn metrics_set(h: u32, v: i64) -> Result<(), wt::Error> {
        let key = series(h, mt::MetricKind::Gauge)?;
        m(|host| host.gauges.insert(key, v));
        Ok(())
    }
    pub fn metrics_observe(h: u32, v: f64) -> Result<(), wt::Error> {
        let key = series(h, mt::MetricKind::Histogram)?;
        m(|host| host.histograms.entry(key).or_default().push(v));
        Ok(())
    }
    pub fn state_get(k: &str) -> Option<st::Entry> {
        m(|h| {
            h.state.get(k).map(|(value, version)| st::Entry {
                value: value.clone(),
                version: *version,
            })
        })
    }
    pub fn state_set(k: &str, v: &[u8], _ttl: Option<u64>) -> Result<(), wt::Error> {
        m(|h| {
            let version = h.state.get(k).map_or(1, |(_, ver)| ver + 1);
            h.state.insert(k.to_string(), (v.to_vec(), version));
        });
        Ok(())
    }
    pub fn state_cas(k: &str, expected: Option<u64>, v: &[u8], ttl: Option<u64>) -> Result<bool, wt::Error> {
        let current = m(|h| h.state.get(k).map(|(_, ver)| *ver));
        if current != expected {
            return Ok(false);
        }
        state_set(k, v, ttl).map(|()| true)
    }
    pub fn state_swap(
        k: &str,
        expected: Option<u64>,
        v: &[u8],
        ttl: Option<u64>,
    ) -> Result<st::Swapped, wt::Error> {
        let current = state_get(k);
        if current.as_ref().map(|e| e.version) != expected {
            return Ok(st::Swapped::Conflict(current));
        }
        state_set(k, v, ttl)?;
        Ok(st::Swapped::Written(m(|h| h.state[k].1)))
    }
    pub fn state_delete(k: &str) {
        m(|h| h.state.remove(k));
    }
    pub fn prop_upstream() -> Option<String> {
        m(|h| h.upstream.clone())
    }
    pub fn prop_get_request_value(k: &str) -> Option<Vec<u8>> {
        m(|h| h.request_values.get(k).cloned())
    }
    pub fn prop_eject_upstream(ms: u32) -> Result<(), wt::Error> {
        only_in(RESPONSE_EDITS)?;
        m(|h| match h.upstream {
            Some(_) => {
                h.ejections.push(ms);
                Ok(())
            }
            None => Err(wt::Error::Invalid(
                "this response has no upstream endpoint".into(),
            )),
        })
    }
    pub fn prop_set_retry_delay(ms: u32) -> Result<(), wt::Error> {
        only_in(RESPONSE_EDITS)?;
        m(|h| h.retry_delay_ms = Some(ms));
        Ok(())
    }
    pub fn prop_set_request_value(k: &str, v: &[u8]) -> Result<(), wt::Error> {
        only_in(&[MockPhase::RequestHeaders, MockPhase::ResponseHeaders])?;
        m(|h| h.request_values.insert(k.to_string(), v.to_vec()));
        Ok(())
    }
    pub fn outbound_send(cluster: &str, req: &OutboundRequest) -> Result<(), String> {
        m(|h| {
            if !h.known_clusters.iter().any(|c| c == cluster) {
                return Err(format!("unknown cluster {cluster:?}"));
            }
            h.sent.push((cluster.to_string(), req.clone()));
            Ok(())
        })
    }
    pub fn outbound_call(cluster: &str, req: &OutboundRequest) -> Result<OutboundResponse, String> {
        // Take the handler out while it runs so it may use the mock host itself.
        let handler = m(|h| h.outbound.take());
        let Some(mut handler) = handler else {
            return Err(format!(
                "no outbound handler in the mock host for cluster {cluster:?}"
            ));
        };
        let r = handler(cluster, req);
        m(|h| h.outbound = Some(handler));
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Filter, HostError, NoConfig, Request, ResponseHead};

    struct LateEdit;

    impl Filter for LateEdit {
        type Config = NoConfig;
        fn new(_: NoConfig) -> Result<Self, String> {
            Ok(LateEdit)
        }
        fn on_request_headers(&self, req: &Request) -> Action {
            req.set_header("x-early", "1").unwrap();
            Action::Continue
        }
        fn on_response_headers(&self, resp: &ResponseHead) -> Action {
            // The request has left: the proxy refuses this edit, so must the mock host.
            let late = resp.request().set_header("x-late", "1");
            resp.set_header("x-late-edit", format!("{late:?}")).unwrap();
            Action::Continue
        }
    }

    #[test]
    fn host_calls_follow_the_proxys_phase_rules() {
        MockHost::reset(|_| {});
        let f = TestFilter::<LateEdit>::new("{}").unwrap();
        assert_eq!(f.on_request_headers(), Action::Continue);
        assert_eq!(MockHost::request_header("x-early").as_deref(), Some("1"));
        assert_eq!(f.on_response_headers(), Action::Continue);
        assert_eq!(
            MockHost::response_header("x-late-edit"),
            Some(format!("{:?}", Err::<(), _>(HostError::WrongPhase)))
        );
        assert_eq!(MockHost::request_header("x-late"), None);
        // Outside a TestFilter phase, calls are not checked (set-up code may use them).
        assert!(imp::req_set_header("x-setup", b"1").is_ok());
        assert!(imp::prop_set_timeout(0).is_err());
        assert!(imp::req_set_header("proxy-authorization", b"x").is_err());
    }

    struct FramedAnswer;

    impl Filter for FramedAnswer {
        type Config = NoConfig;
        fn new(_: NoConfig) -> Result<Self, String> {
            Ok(FramedAnswer)
        }
        fn on_request_headers(&self, _: &Request) -> Action {
            Action::Respond(crate::Response::new(403).header("content-length", "2").body("no"))
        }
    }

    #[test]
    #[should_panic(expected = "the proxy refuses this response's header")]
    fn a_response_the_proxy_would_refuse_fails_the_test() {
        MockHost::reset(|_| {});
        let f = TestFilter::<FramedAnswer>::new("{}").unwrap();
        let _ = f.on_request_headers();
    }
}
