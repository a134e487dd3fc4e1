//! The host calls behind the typed API: the real imports on wasm, the mock host
//! ([`crate::testing`]) everywhere else, with the same signatures.

#[cfg(not(target_arch = "wasm32"))]
pub(crate) use crate::testing::imp::*;
#[cfg(target_arch = "wasm32")]
pub(crate) use imp::*;

/// What the metrics series cache of the wasm build uses, here so it is unit-tested natively.
#[cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]
mod fast {
    use std::hash::{Hash, Hasher};

    // A metric bump hashes its name and labels on every call: Fx, see `crate::hash`. The
    // keys are the filter's own series, bounded by the host, and collisions are told apart
    // by comparing.
    use crate::hash::FxHasher as Fx;

    /// The hash the series cache keys by.
    pub(crate) fn series_hash(kind: u8, name: &str, labels: &[(&str, &str)]) -> u64 {
        let mut h = Fx::default();
        (kind, name, labels).hash(&mut h);
        h.finish()
    }

    /// The cache's keys are already hashes: used as they are.
    #[derive(Default)]
    pub(crate) struct Identity(u64);

    impl Hasher for Identity {
        fn write(&mut self, bytes: &[u8]) {
            for &b in bytes {
                self.0 = (self.0 << 8) | u64::from(b);
            }
        }
        fn write_u64(&mut self, i: u64) {
            self.0 = i;
        }
        fn finish(&self) -> u64 {
            self.0
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn the_hash_tells_apart_what_the_cache_keys_by() {
            let h = |name: &str, labels: &[(&str, &str)]| series_hash(0, name, labels);
            let base = h("decisions", &[("result", "allowed")]);
            assert_eq!(base, h("decisions", &[("result", "allowed")]));
            assert_ne!(base, h("decisions", &[("result", "denied")]));
            assert_ne!(base, h("decisions", &[("resul", "tallowed")]));
            assert_ne!(base, h("decision", &[("result", "allowed")]));
            assert_ne!(h("a", &[]), h("a", &[("", "")]));
        }
    }
}

#[cfg(target_arch = "wasm32")]
mod imp {
    use crate::outbound::{OutboundRequest, OutboundResponse};
    use crate::wit::weir::filter::{
        log as lg, metrics as mt, outbound as ob, properties as pr, request as rq, response as rs,
        state as st, types as wt,
    };

    pub fn req_method() -> String {
        rq::method()
    }
    pub fn req_path() -> String {
        rq::path()
    }
    pub fn req_query() -> Option<String> {
        rq::query()
    }
    pub fn req_authority() -> Option<String> {
        rq::authority()
    }
    pub fn req_scheme() -> String {
        rq::scheme()
    }
    pub fn req_get_header(n: &str) -> Option<Vec<u8>> {
        rq::get_header(n)
    }
    pub fn req_get_header_all(n: &str) -> Vec<Vec<u8>> {
        rq::get_header_all(n)
    }
    pub fn req_get_headers() -> Vec<wt::Header> {
        rq::get_headers()
    }
    pub fn req_set_header(n: &str, v: &[u8]) -> Result<(), wt::Error> {
        rq::set_header(n, v)
    }
    pub fn req_append_header(n: &str, v: &[u8]) -> Result<(), wt::Error> {
        rq::append_header(n, v)
    }
    pub fn req_remove_header(n: &str) -> Result<(), wt::Error> {
        rq::remove_header(n)
    }
    pub fn req_set_path(p: &str) -> Result<(), wt::Error> {
        rq::set_path(p)
    }
    pub fn req_set_authority(a: &str) -> Result<(), wt::Error> {
        rq::set_authority(a)
    }
    pub fn resp_status() -> u16 {
        rs::status()
    }
    pub fn resp_set_status(s: u16) -> Result<(), wt::Error> {
        rs::set_status(s)
    }
    pub fn resp_get_header(n: &str) -> Option<Vec<u8>> {
        rs::get_header(n)
    }
    pub fn resp_get_headers() -> Vec<wt::Header> {
        rs::get_headers()
    }
    pub fn resp_set_header(n: &str, v: &[u8]) -> Result<(), wt::Error> {
        rs::set_header(n, v)
    }
    pub fn resp_append_header(n: &str, v: &[u8]) -> Result<(), wt::Error> {
        rs::append_header(n, v)
    }
    pub fn resp_remove_header(n: &str) -> Result<(), wt::Error> {
        rs::remove_header(n)
    }
    pub fn prop_client_address() -> String {
        pr::client_address()
    }
    pub fn prop_peer_identity() -> Option<wt::PeerIdentity> {
        pr::peer()
    }
    pub fn prop_sni() -> Option<String> {
        pr::sni()
    }
    pub fn prop_listener() -> String {
        pr::listener()
    }
    pub fn prop_route() -> Option<String> {
        pr::route()
    }
    pub fn prop_request_id() -> String {
        pr::request_id()
    }
    pub fn prop_cluster() -> Option<String> {
        pr::cluster()
    }
    pub fn prop_set_cluster(n: &str) -> Result<(), wt::Error> {
        pr::set_cluster(n)
    }
    pub fn prop_set_timeout(ms: u32) -> Result<(), wt::Error> {
        pr::set_timeout(ms)
    }
    pub fn prop_filter_name() -> String {
        pr::filter_name()
    }
    /// Asked of the host once per level and instance: the answer holds for an instance's life
    /// (see `enabled` in the WIT), and a filter that logs at debug on every request would
    /// otherwise pay a host call per request to learn that debug is off.
    pub fn log_enabled(l: wt::LogLevel) -> bool {
        use std::cell::Cell;
        thread_local! {
            /// Per level (bit 2i: known, bit 2i + 1: enabled).
            static LEVELS: Cell<u16> = const { Cell::new(0) };
        }
        let shift = 2 * (l as u16);
        let known = LEVELS.get();
        if known & (1 << shift) != 0 {
            return known & (2 << shift) != 0;
        }
        let on = lg::enabled(l);
        LEVELS.set(known | (1 << shift) | (u16::from(on) << (shift + 1)));
        on
    }
    pub fn log_write(l: wt::LogLevel, m: &str) {
        lg::write(l, m)
    }
    pub fn metrics_counter_add(n: &str, l: &[(&str, &str)], v: u64) -> Result<(), wt::Error> {
        mt::add(series::handle(mt::MetricKind::Counter, n, l)?, v)
    }
    pub fn metrics_gauge_set(n: &str, l: &[(&str, &str)], v: i64) -> Result<(), wt::Error> {
        mt::set(series::handle(mt::MetricKind::Gauge, n, l)?, v)
    }
    pub fn metrics_histogram_observe(n: &str, l: &[(&str, &str)], v: f64) -> Result<(), wt::Error> {
        mt::observe(series::handle(mt::MetricKind::Histogram, n, l)?, v)
    }
    pub fn metrics_series(k: mt::MetricKind, n: &str, l: &[(&str, &str)]) -> Result<u32, wt::Error> {
        series::handle(k, n, l)
    }
    pub fn metrics_add(h: u32, v: u64) -> Result<(), wt::Error> {
        mt::add(h, v)
    }
    pub fn metrics_set(h: u32, v: i64) -> Result<(), wt::Error> {
        mt::set(h, v)
    }
    pub fn metrics_observe(h: u32, v: f64) -> Result<(), wt::Error> {
        mt::observe(h, v)
    }

    /// The handles of the series this instance has named: looked up by a hash of kind, name
    /// and labels without allocating, named to the host on first use.
    mod series {
        use super::super::fast::{series_hash, Identity};
        use super::{mt, wt};
        use std::cell::RefCell;
        use std::collections::HashMap;
        use std::hash::BuildHasherDefault;

        struct Named {
            kind: mt::MetricKind,
            name: String,
            labels: Vec<(String, String)>,
            handle: u32,
        }

        type Handles = HashMap<u64, Vec<Named>, BuildHasherDefault<Identity>>;

        thread_local! {
            static HANDLES: RefCell<Handles> = RefCell::new(Handles::default());
        }

        pub fn handle(kind: mt::MetricKind, name: &str, labels: &[(&str, &str)]) -> Result<u32, wt::Error> {
            let hash = series_hash(kind as u8, name, labels);
            let same = |n: &Named| {
                n.kind == kind
                    && n.name == name
                    && n.labels.len() == labels.len()
                    && n.labels
                        .iter()
                        .zip(labels)
                        .all(|((a, b), (c, d))| a == c && b == d)
            };
            let known = HANDLES.with(|m| {
                m.borrow()
                    .get(&hash)
                    .and_then(|v| v.iter().find(|n| same(n)).map(|n| n.handle))
            });
            if let Some(handle) = known {
                return Ok(handle);
            }
            let owned: Vec<(String, String)> = labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            let handle = mt::series(kind, name, &owned)?;
            HANDLES.with(|m| {
                m.borrow_mut().entry(hash).or_default().push(Named {
                    kind,
                    name: name.to_string(),
                    labels: owned,
                    handle,
                })
            });
            Ok(handle)
        }
    }
    pub fn state_get(k: &str) -> Option<st::Entry> {
        st::get(k)
    }
    pub fn state_set(k: &str, v: &[u8], ttl: Option<u64>) -> Result<(), wt::Error> {
        st::set(k, v, ttl)
    }
    pub fn state_cas(k: &str, e: Option<u64>, v: &[u8], ttl: Option<u64>) -> Result<bool, wt::Error> {
        st::compare_and_swap(k, e, v, ttl)
    }
    pub fn state_swap(k: &str, e: Option<u64>, v: &[u8], ttl: Option<u64>) -> Result<st::Swapped, wt::Error> {
        st::swap(k, e, v, ttl)
    }
    pub fn state_delete(k: &str) {
        st::delete(k)
    }
    pub fn prop_upstream() -> Option<String> {
        pr::upstream()
    }
    pub fn prop_get_request_value(k: &str) -> Option<Vec<u8>> {
        pr::get_request_value(k)
    }
    pub fn prop_eject_upstream(ms: u32) -> Result<(), wt::Error> {
        pr::eject_upstream(ms)
    }
    pub fn prop_set_retry_delay(ms: u32) -> Result<(), wt::Error> {
        pr::set_retry_delay(ms)
    }
    pub fn prop_set_request_value(k: &str, v: &[u8]) -> Result<(), wt::Error> {
        pr::set_request_value(k, v)
    }
    fn wire(req: &OutboundRequest) -> ob::OutboundRequest {
        ob::OutboundRequest {
            method: req.method.clone(),
            path: req.path.clone(),
            headers: req
                .headers
                .iter()
                .map(|(n, v)| wt::Header {
                    name: n.clone(),
                    value: v.clone(),
                })
                .collect(),
            body: req.body.clone(),
            timeout_ms: req.timeout.as_millis().min(u32::MAX as u128) as u32,
        }
    }
    pub fn outbound_send(cluster: &str, req: &OutboundRequest) -> Result<(), String> {
        ob::send(cluster, &wire(req))
    }
    pub fn outbound_call(cluster: &str, req: &OutboundRequest) -> Result<OutboundResponse, String> {
        let r = ob::OutboundRequest {
            method: req.method.clone(),
            path: req.path.clone(),
            headers: req
                .headers
                .iter()
                .map(|(n, v)| wt::Header {
                    name: n.clone(),
                    value: v.clone(),
                })
                .collect(),
            body: req.body.clone(),
            timeout_ms: req.timeout.as_millis().min(u32::MAX as u128) as u32,
        };
        ob::call(cluster, &r).map(|r| OutboundResponse {
            status: r.status,
            headers: r.headers.into_iter().map(|h| (h.name, h.value)).collect(),
            body: r.body,
        })
    }
}
