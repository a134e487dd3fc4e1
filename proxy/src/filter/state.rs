//! Key-value state shared by every instance of one filter (rate limits, circuit breakers):
//! versioned for compare-and-swap, with optional expiry and a bound on entries.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Most keys one filter may hold; a filter that keys by something unbounded hits this
/// instead of exhausting the proxy's memory.
pub const MAX_ENTRIES: usize = 100_000;

/// Largest value, in bytes.
pub const MAX_VALUE_BYTES: usize = 64 * 1024;

struct Entry {
    value: Vec<u8>,
    version: u64,
    expires: Option<Instant>,
}

/// One filter's shared state.
#[derive(Default)]
pub struct SharedState {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    map: HashMap<String, Entry>,
    next_version: u64,
}

/// Why a write was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    /// Too many keys or too big a value.
    #[error("{0}")]
    Limit(String),
}

impl Inner {
    fn live(&mut self, key: &str, now: Instant) -> Option<&Entry> {
        if self
            .map
            .get(key)
            .is_some_and(|e| e.expires.is_some_and(|t| t <= now))
        {
            self.map.remove(key);
        }
        self.map.get(key)
    }

    fn write(
        &mut self,
        key: &str,
        value: &[u8],
        ttl: Option<Duration>,
        now: Instant,
    ) -> Result<(), StateError> {
        if value.len() > MAX_VALUE_BYTES {
            return Err(StateError::Limit(format!(
                "value larger than {MAX_VALUE_BYTES} bytes"
            )));
        }
        if !self.map.contains_key(key) && self.map.len() >= MAX_ENTRIES {
            // Make room from expired entries before refusing.
            self.map.retain(|_, e| e.expires.is_none_or(|t| t > now));
            if self.map.len() >= MAX_ENTRIES {
                return Err(StateError::Limit(format!("more than {MAX_ENTRIES} keys")));
            }
        }
        self.next_version += 1;
        let entry = Entry {
            value: value.to_vec(),
            version: self.next_version,
            expires: ttl.map(|d| now + d),
        };
        self.map.insert(key.to_string(), entry);
        Ok(())
    }
}

impl SharedState {
    /// The value and version of a key, if present and not expired.
    pub fn get(&self, key: &str) -> Option<(Vec<u8>, u64)> {
        let mut g = self.inner.lock().expect("state lock");
        g.live(key, Instant::now()).map(|e| (e.value.clone(), e.version))
    }

    /// Writes a key.
    pub fn set(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> Result<(), StateError> {
        self.inner
            .lock()
            .expect("state lock")
            .write(key, value, ttl, Instant::now())
    }

    /// Writes only if the current version is `expected` (`None`: absent); returns whether it did.
    pub fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<u64>,
        value: &[u8],
        ttl: Option<Duration>,
    ) -> Result<bool, StateError> {
        let now = Instant::now();
        let mut g = self.inner.lock().expect("state lock");
        let current = g.live(key, now).map(|e| e.version);
        if current != expected {
            return Ok(false);
        }
        g.write(key, value, ttl, now).map(|()| true)
    }

    /// Removes a key.
    pub fn delete(&self, key: &str) {
        self.inner.lock().expect("state lock").map.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_and_swap_and_expiry() {
        let s = SharedState::default();
        assert!(s.compare_and_swap("k", None, b"1", None).unwrap());
        assert!(!s.compare_and_swap("k", None, b"2", None).unwrap(), "present now");
        let (v, ver) = s.get("k").unwrap();
        assert_eq!(v, b"1");
        assert!(s.compare_and_swap("k", Some(ver), b"2", None).unwrap());
        assert!(
            !s.compare_and_swap("k", Some(ver), b"3", None).unwrap(),
            "stale version"
        );
        s.set("t", b"x", Some(Duration::from_millis(1))).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        assert!(s.get("t").is_none());
    }
}
