//! Metrics exported on Weir's `/metrics` as `weir_filter_<name>{filter="...",...}`.
//!
//! On Weir, each series is named to the host once per instance and updated by its handle
//! after that (the SDK keeps the handles), so a metric update on the request path carries
//! no strings across the boundary. A series updated on every request is cheaper still as a
//! [`Counter`], [`Gauge`] or [`Histogram`] made once (in [`Filter::new`](crate::Filter::new)):
//! an update is then one host call, with no hashing and no comparing of names and labels.
//!
//! ```no_run
//! use weir_sdk::metrics::Counter;
//!
//! struct Audit {
//!     allowed: Counter,
//! }
//!
//! impl Audit {
//!     fn new() -> Self {
//!         Audit { allowed: Counter::new("decisions", &[("result", "allowed")]) }
//!     }
//!
//!     fn on_allowed(&self) {
//!         let _ = self.allowed.add(1);
//!     }
//! }
//! ```

use std::cell::Cell;

use crate::host;
use crate::http::HostError;
use crate::wit::weir::filter::metrics::MetricKind;

/// Adds to a counter.
pub fn counter_add(name: &str, labels: &[(&str, &str)], value: u64) -> Result<(), HostError> {
    host::metrics_counter_add(name, labels, value).map_err(Into::into)
}

/// Sets a gauge.
pub fn gauge_set(name: &str, labels: &[(&str, &str)], value: i64) -> Result<(), HostError> {
    host::metrics_gauge_set(name, labels, value).map_err(Into::into)
}

/// Records a histogram observation.
pub fn histogram_observe(name: &str, labels: &[(&str, &str)], value: f64) -> Result<(), HostError> {
    host::metrics_histogram_observe(name, labels, value).map_err(Into::into)
}

/// A series with its name and labels fixed, named to the host on its first update (an
/// invalid name or label is that update's error, and the next update tries again).
#[derive(Debug)]
struct Series {
    kind: MetricKind,
    name: String,
    labels: Vec<(String, String)>,
    handle: Cell<Option<u32>>,
}

impl Series {
    fn new(kind: MetricKind, name: &str, labels: &[(&str, &str)]) -> Series {
        Series {
            kind,
            name: name.to_string(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            handle: Cell::new(None),
        }
    }

    fn handle(&self) -> Result<u32, HostError> {
        if let Some(h) = self.handle.get() {
            return Ok(h);
        }
        let labels: Vec<(&str, &str)> = self
            .labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let h = host::metrics_series(self.kind, &self.name, &labels)?;
        self.handle.set(Some(h));
        Ok(h)
    }
}

/// A counter series: name and labels fixed when made, one host call per update.
#[derive(Debug)]
pub struct Counter(Series);

impl Counter {
    /// The counter `name` with `labels` (the same series [`counter_add`] names).
    pub fn new(name: &str, labels: &[(&str, &str)]) -> Counter {
        Counter(Series::new(MetricKind::Counter, name, labels))
    }

    /// Adds to the counter.
    pub fn add(&self, value: u64) -> Result<(), HostError> {
        host::metrics_add(self.0.handle()?, value).map_err(Into::into)
    }
}

/// A gauge series: name and labels fixed when made, one host call per update.
#[derive(Debug)]
pub struct Gauge(Series);

impl Gauge {
    /// The gauge `name` with `labels` (the same series [`gauge_set`] names).
    pub fn new(name: &str, labels: &[(&str, &str)]) -> Gauge {
        Gauge(Series::new(MetricKind::Gauge, name, labels))
    }

    /// Sets the gauge.
    pub fn set(&self, value: i64) -> Result<(), HostError> {
        host::metrics_set(self.0.handle()?, value).map_err(Into::into)
    }
}

/// A histogram series: name and labels fixed when made, one host call per observation.
#[derive(Debug)]
pub struct Histogram(Series);

impl Histogram {
    /// The histogram `name` with `labels` (the same series [`histogram_observe`] names).
    pub fn new(name: &str, labels: &[(&str, &str)]) -> Histogram {
        Histogram(Series::new(MetricKind::Histogram, name, labels))
    }

    /// Records an observation.
    pub fn observe(&self, value: f64) -> Result<(), HostError> {
        host::metrics_observe(self.0.handle()?, value).map_err(Into::into)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::MockHost;

    #[test]
    fn series_made_once_count_into_the_same_series_as_the_name_and_labels_calls() {
        MockHost::reset(|_| {});
        let allowed = Counter::new("decisions", &[("result", "allowed")]);
        let inflight = Gauge::new("inflight", &[]);
        let sizes = Histogram::new("sizes", &[("kind", "body")]);
        allowed.add(2).unwrap();
        counter_add("decisions", &[("result", "allowed")], 1).unwrap();
        allowed.add(1).unwrap();
        inflight.set(-3).unwrap();
        sizes.observe(1.5).unwrap();
        sizes.observe(2.5).unwrap();
        MockHost::with(|h| {
            assert_eq!(h.counters["decisions{result=allowed}"], 4);
            assert_eq!(h.gauges["inflight{}"], -3);
            assert_eq!(h.histograms["sizes{kind=body}"], vec![1.5, 2.5]);
        });
        // A counter made before a reset keeps counting into the fresh mock host.
        MockHost::reset(|_| {});
        allowed.add(5).unwrap();
        MockHost::with(|h| assert_eq!(h.counters["decisions{result=allowed}"], 5));
    }
}
