//! Metrics exported on Weir's `/metrics` as `weir_filter_<name>{filter="...",...}`.

use crate::host;
use crate::http::HostError;

fn labels(l: &[(&str, &str)]) -> Vec<(String, String)> {
    l.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// Adds to a counter.
pub fn counter_add(name: &str, l: &[(&str, &str)], value: u64) -> Result<(), HostError> {
    host::metrics_counter_add(name, &labels(l), value).map_err(Into::into)
}

/// Sets a gauge.
pub fn gauge_set(name: &str, l: &[(&str, &str)], value: i64) -> Result<(), HostError> {
    host::metrics_gauge_set(name, &labels(l), value).map_err(Into::into)
}

/// Records a histogram observation.
pub fn histogram_observe(name: &str, l: &[(&str, &str)], value: f64) -> Result<(), HostError> {
    host::metrics_histogram_observe(name, &labels(l), value).map_err(Into::into)
}
