//! Key-value state shared by every instance of the same filter, with versions for
//! compare-and-swap and optional expiry: what rate limits and circuit breakers need.

use std::time::Duration;

use crate::host;
use crate::http::HostError;

/// A stored value and its version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The value.
    pub value: Vec<u8>,
    /// Changes on every write.
    pub version: u64,
}

fn ms(ttl: Option<Duration>) -> Option<u64> {
    ttl.map(|d| d.as_millis().min(u64::MAX as u128) as u64)
}

/// Reads a key.
pub fn get(key: &str) -> Option<Entry> {
    host::state_get(key).map(|e| Entry {
        value: e.value,
        version: e.version,
    })
}

/// Writes a key, optionally expiring after `ttl`.
pub fn set(key: &str, value: &[u8], ttl: Option<Duration>) -> Result<(), HostError> {
    host::state_set(key, value, ms(ttl)).map_err(Into::into)
}

/// Writes only if the current version is `expected` (`None`: only if absent); returns whether
/// the write happened.
pub fn compare_and_swap(
    key: &str,
    expected: Option<u64>,
    value: &[u8],
    ttl: Option<Duration>,
) -> Result<bool, HostError> {
    host::state_cas(key, expected, value, ms(ttl)).map_err(Into::into)
}

/// Removes a key.
pub fn delete(key: &str) {
    host::state_delete(key)
}
