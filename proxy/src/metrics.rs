//! Prometheus metrics (`/metrics`), with bounded labels only: listener, route, cluster,
//! status class. Never paths or client addresses, so series cannot explode.
//!
//! Handles for a route's series are resolved once when the route table is built, so a request
//! only bumps atomics; no label set is allocated on the hot path.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    listener: String,
    route: String,
    cluster: String,
    status_class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LatencyLabels {
    listener: String,
    route: String,
    cluster: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabels {
    listener: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClusterLabels {
    cluster: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FilterErrorLabels {
    filter: String,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReloadLabels {
    result: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 100 µs .. ~13 s in 18 doublings: proxy overhead at the low end, slow upstreams at the top.
    Histogram::new(exponential_buckets(0.0001, 2.0, 18))
}

/// Every metric family of the proxy core, registered once.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: HistogramFamily<LatencyLabels>,
    connections: Family<ListenerLabels, Gauge>,
    connections_total: Family<ListenerLabels, Counter>,
    connect_errors: Family<ClusterLabels, Counter>,
    resends: Family<ClusterLabels, Counter>,
    filter_errors: Family<FilterErrorLabels, Counter>,
    reloads: Family<ReloadLabels, Counter>,
    filters: std::sync::Mutex<Vec<(Arc<str>, std::sync::Weak<crate::filter::host::FilterMetrics>)>>,
}

const CLASSES: [&str; 6] = ["other", "1xx", "2xx", "3xx", "4xx", "5xx"];

/// The series of one (listener, route, cluster), resolved ahead of time. Shared: a request
/// takes a handle to them with one reference count, not one per series (seven atomic
/// increments and as many decrements per request, 1 % of Weir's CPU under load).
#[derive(Clone)]
pub struct RouteMetrics(Arc<RouteSeries>);

struct RouteSeries {
    by_class: [Counter; 6],
    latency: Histogram,
}

impl RouteMetrics {
    /// Counts one response and its duration.
    pub fn record(&self, status: u16, elapsed: Duration) {
        let class = match status / 100 {
            c @ 1..=5 => c as usize,
            _ => 0,
        };
        self.0.by_class[class].inc();
        self.0.latency.observe(elapsed.as_secs_f64());
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every family under the `weir_` prefix.
    pub fn new() -> Metrics {
        let mut root = Registry::with_prefix("weir");
        let requests = Family::<RequestLabels, Counter>::default();
        let latency: HistogramFamily<LatencyLabels> = Family::new_with_constructor(latency_histogram);
        let connections = Family::<ListenerLabels, Gauge>::default();
        let connections_total = Family::<ListenerLabels, Counter>::default();
        let connect_errors = Family::<ClusterLabels, Counter>::default();
        let resends = Family::<ClusterLabels, Counter>::default();
        let filter_errors = Family::<FilterErrorLabels, Counter>::default();
        let reloads = Family::<ReloadLabels, Counter>::default();
        // Both results exist from the start, so a dashboard sees 0 rather than no series.
        let _ = reloads.get_or_create(&ReloadLabels { result: "ok" });
        let _ = reloads.get_or_create(&ReloadLabels { result: "error" });
        root.register(
            "reload",
            "Reloads of config, filters or certificates that changed something, by result",
            reloads.clone(),
        );
        let http = root.sub_registry_with_prefix("http");
        http.register("requests", "Responses sent downstream", requests.clone());
        http.register_with_unit(
            "request_duration",
            "Time from request head to the end of the response body",
            Unit::Seconds,
            latency.clone(),
        );
        let listener = root.sub_registry_with_prefix("listener");
        listener.register(
            "active_connections",
            "Open downstream connections",
            connections.clone(),
        );
        listener.register(
            "connections",
            "Accepted downstream connections",
            connections_total.clone(),
        );
        let upstream = root.sub_registry_with_prefix("upstream");
        upstream.register(
            "connect_errors",
            "Failed connection attempts to upstream endpoints",
            connect_errors.clone(),
        );
        upstream.register(
            "resent_requests",
            "Requests sent again on a new connection because their pooled connection closed \
             under them (the upstream's idle timeout is shorter than the cluster's)",
            resends.clone(),
        );
        let filter = root.sub_registry_with_prefix("filter");
        filter.register(
            "errors",
            "Filter calls that failed, by kind (trap, timeout, memory, invalid, overload, config)",
            filter_errors.clone(),
        );
        Metrics {
            registry: root,
            requests,
            latency,
            connections,
            connections_total,
            connect_errors,
            resends,
            filter_errors,
            reloads,
            filters: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// The handles of one (listener, route, cluster); resolve once, use per request.
    pub fn route(&self, listener: &str, route: &str, cluster: &str) -> RouteMetrics {
        let by_class = CLASSES.map(|class| {
            self.requests
                .get_or_create(&RequestLabels {
                    listener: listener.into(),
                    route: route.into(),
                    cluster: cluster.into(),
                    status_class: class,
                })
                .clone()
        });
        let latency = self
            .latency
            .get_or_create(&LatencyLabels {
                listener: listener.into(),
                route: route.into(),
                cluster: cluster.into(),
            })
            .clone();
        RouteMetrics(Arc::new(RouteSeries { by_class, latency }))
    }

    /// Gauge of open connections and counter of accepted ones for a listener.
    pub fn listener(&self, listener: &str) -> (Gauge, Counter) {
        let l = ListenerLabels {
            listener: listener.into(),
        };
        (
            self.connections.get_or_create(&l).clone(),
            self.connections_total.get_or_create(&l).clone(),
        )
    }

    /// Counts a failed connection attempt to a cluster's endpoint.
    pub fn upstream_connect_error(&self, cluster: &str) {
        self.connect_errors
            .get_or_create(&ClusterLabels {
                cluster: cluster.into(),
            })
            .inc();
    }

    /// Counts a request sent again after its pooled connection closed under it.
    pub fn upstream_resend(&self, cluster: &str) {
        self.resends
            .get_or_create(&ClusterLabels {
                cluster: cluster.into(),
            })
            .inc();
    }

    /// Counts a failed filter call.
    pub fn filter_error(&self, filter: &str, kind: &'static str) {
        self.filter_errors
            .get_or_create(&FilterErrorLabels {
                filter: filter.into(),
                kind,
            })
            .inc();
    }

    /// Counts a reload attempt that changed something (`ok`) or failed (`error`).
    pub fn reload(&self, result: &'static str) {
        self.reloads.get_or_create(&ReloadLabels { result }).inc();
    }

    /// Exports a filter's own metrics while it is loaded.
    pub fn register_filter(&self, name: Arc<str>, m: &Arc<crate::filter::host::FilterMetrics>) {
        let mut g = self.filters.lock().expect("filters lock");
        g.retain(|(_, w)| w.strong_count() > 0);
        g.push((name, Arc::downgrade(m)));
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        // Filters' own series go before the closing `# EOF` of the OpenMetrics text.
        if out.ends_with("# EOF\n") {
            out.truncate(out.len() - "# EOF\n".len());
        }
        for (name, m) in self.filters.lock().expect("filters lock").iter() {
            if let Some(m) = m.upgrade() {
                m.encode(name, &mut out);
            }
        }
        out.push_str("# EOF\n");
        out
    }
}

/// Shared handle.
pub type SharedMetrics = Arc<Metrics>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_series_share_state_with_the_registry() {
        let m = Metrics::new();
        let r = m.route("web", "api", "app");
        r.record(204, Duration::from_millis(3));
        r.record(503, Duration::from_millis(3));
        let text = m.encode();
        assert!(
            text.contains(
                r#"weir_http_requests_total{listener="web",route="api",cluster="app",status_class="2xx"} 1"#
            ),
            "{text}"
        );
        assert!(text.contains(r#"status_class="5xx"} 1"#), "{text}");
        assert!(
            text.contains("weir_http_request_duration_seconds_count"),
            "{text}"
        );
    }
}
