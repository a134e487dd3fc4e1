//! Metrics exported on Weir's `/metrics` as `weir_filter_<name>{filter="...",...}`.
//!
//! On Weir, each series is named to the host once per instance and updated by its handle
//! after that (the SDK keeps the handles), so a metric update on the request path carries
//! no strings across the boundary.

use crate::host;
use crate::http::HostError;

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
