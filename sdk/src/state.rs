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

/// What [`swap`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Swapped {
    /// Written; the key's new version.
    Written(u64),
    /// Not written: the key's version was not the expected one. Its current entry (`None`:
    /// absent or expired), to compute the retry from.
    Conflict(Option<Entry>),
}

/// Compare-and-swap that answers with what the next update needs: the new version when
/// written, the current entry when not. One host call per update where [`get`] and
/// [`compare_and_swap`] are two: a filter that keeps the value and version it wrote (per
/// instance) updates the key next time without reading it, and a stale copy costs nothing
/// extra, since the conflict brings the current entry.
///
/// ```no_run
/// # use weir_sdk::state::{self, Entry, Swapped};
/// // Add one to a shared counter, starting from a remembered copy (or none).
/// fn bump(key: &str, mut seen: Option<Entry>) -> Option<Entry> {
///     loop {
///         let n = seen.as_ref().map_or(0, |e| u64::from_le_bytes(e.value[..8].try_into().unwrap()));
///         let value = (n + 1).to_le_bytes().to_vec();
///         match state::swap(key, seen.as_ref().map(|e| e.version), &value, None).ok()? {
///             Swapped::Written(version) => return Some(Entry { value, version }),
///             Swapped::Conflict(current) => seen = current,
///         }
///     }
/// }
/// ```
pub fn swap(
    key: &str,
    expected: Option<u64>,
    value: &[u8],
    ttl: Option<Duration>,
) -> Result<Swapped, HostError> {
    use crate::wit::weir::filter::state::Swapped as W;
    match host::state_swap(key, expected, value, ms(ttl))? {
        W::Written(v) => Ok(Swapped::Written(v)),
        W::Conflict(e) => Ok(Swapped::Conflict(e.map(|e| Entry {
            value: e.value,
            version: e.version,
        }))),
    }
}

/// Removes a key.
pub fn delete(key: &str) {
    host::state_delete(key)
}
