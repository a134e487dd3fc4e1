//! Key-value state shared by every instance of one filter (rate limits, circuit breakers):
//! versioned for compare-and-swap, with optional expiry and a bound on entries.
//!
//! The keys are spread over shards, each behind its own lock, so the workers serving
//! different keys (clients, routes) do not queue on one lock per filter; a write to a key
//! that exists replaces its value in place, without allocating.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Most keys one filter may hold; a filter that keys by something unbounded hits this
/// instead of exhausting the proxy's memory.
pub const MAX_ENTRIES: usize = 100_000;

/// Largest value, in bytes.
pub const MAX_VALUE_BYTES: usize = 64 * 1024;

/// Lock shards per filter: a power of two, a few times the usual worker count.
const SHARDS: usize = 16;

struct Entry {
    value: Vec<u8>,
    version: u64,
    expires: Option<Instant>,
}

impl Entry {
    fn expired(&self, now: Instant) -> bool {
        self.expires.is_some_and(|t| t <= now)
    }
}

/// One filter's shared state.
pub struct SharedState {
    shards: [Mutex<HashMap<String, Entry>>; SHARDS],
    hasher: RandomState,
    /// Keys held, over all shards (the [`MAX_ENTRIES`] bound).
    len: AtomicUsize,
    next_version: AtomicU64,
}

impl Default for SharedState {
    fn default() -> Self {
        SharedState {
            shards: Default::default(),
            hasher: RandomState::new(),
            len: AtomicUsize::new(0),
            next_version: AtomicU64::new(0),
        }
    }
}

/// Why a write was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    /// Too many keys or too big a value.
    #[error("{0}")]
    Limit(String),
}

/// A write that needs a new key while the state is full; hands the key and value back.
struct Full(String, Vec<u8>);

impl SharedState {
    fn shard(&self, key: &str) -> MutexGuard<'_, HashMap<String, Entry>> {
        let i = self.hasher.hash_one(key) as usize & (SHARDS - 1);
        self.shards[i].lock().expect("state lock")
    }

    /// Writes `key`: in place when it exists (one hashed lookup: a write to a key that
    /// exists is what a rate limit does on every request), else as a new key under the bound.
    /// An expired entry counts as absent for `guard` and its slot is reused.
    fn write(
        &self,
        map: &mut HashMap<String, Entry>,
        key: String,
        guard: Option<Option<u64>>,
        value: Vec<u8>,
        ttl: Option<Duration>,
        now: Instant,
    ) -> Result<bool, Full> {
        let expires = ttl.map(|d| now + d);
        if let Some(e) = map.get_mut(key.as_str()) {
            let current = (!e.expired(now)).then_some(e.version);
            if guard.is_some_and(|expected| current != expected) {
                return Ok(false);
            }
            *e = Entry {
                value,
                version: self.next_version.fetch_add(1, Ordering::Relaxed) + 1,
                expires,
            };
            return Ok(true);
        }
        if guard.is_some_and(|expected| expected.is_some()) {
            return Ok(false);
        }
        if self.len.fetch_add(1, Ordering::Relaxed) >= MAX_ENTRIES {
            self.len.fetch_sub(1, Ordering::Relaxed);
            return Err(Full(key, value));
        }
        map.insert(
            key,
            Entry {
                value,
                version: self.next_version.fetch_add(1, Ordering::Relaxed) + 1,
                expires,
            },
        );
        Ok(true)
    }

    /// Drops every expired entry, one shard at a time (never two locks at once).
    fn purge(&self, now: Instant) {
        for shard in &self.shards {
            let mut map = shard.lock().expect("state lock");
            let before = map.len();
            map.retain(|_, e| !e.expired(now));
            self.len.fetch_sub(before - map.len(), Ordering::Relaxed);
        }
    }

    fn check_size(value: &[u8]) -> Result<(), StateError> {
        if value.len() > MAX_VALUE_BYTES {
            return Err(StateError::Limit(format!(
                "value larger than {MAX_VALUE_BYTES} bytes"
            )));
        }
        Ok(())
    }

    fn full() -> StateError {
        StateError::Limit(format!("more than {MAX_ENTRIES} keys"))
    }

    /// The value and version of a key, if present and not expired.
    pub fn get(&self, key: &str) -> Option<(Vec<u8>, u64)> {
        let mut map = self.shard(key);
        let now = Instant::now();
        match map.get(key) {
            Some(e) if !e.expired(now) => Some((e.value.clone(), e.version)),
            Some(_) => {
                map.remove(key);
                self.len.fetch_sub(1, Ordering::Relaxed);
                None
            }
            None => None,
        }
    }

    /// Writes a key.
    pub fn set(&self, key: String, value: Vec<u8>, ttl: Option<Duration>) -> Result<(), StateError> {
        self.put(key, None, value, ttl).map(|_| ())
    }

    /// Writes only if the current version is `expected` (`None`: absent); returns whether it did.
    pub fn compare_and_swap(
        &self,
        key: String,
        expected: Option<u64>,
        value: Vec<u8>,
        ttl: Option<Duration>,
    ) -> Result<bool, StateError> {
        self.put(key, Some(expected), value, ttl)
    }

    /// Writes `key`, unconditionally (`guard` `None`) or only if its current version is the
    /// guard's; returns whether it wrote. A new key while full first makes room from expired
    /// entries; a key that exists is replaced in place and never refused.
    fn put(
        &self,
        key: String,
        guard: Option<Option<u64>>,
        value: Vec<u8>,
        ttl: Option<Duration>,
    ) -> Result<bool, StateError> {
        Self::check_size(&value)?;
        let now = Instant::now();
        let mut map = self.shard(&key);
        let (key, value) = match self.write(&mut map, key, guard, value, ttl, now) {
            Ok(wrote) => return Ok(wrote),
            Err(Full(key, value)) => (key, value),
        };
        drop(map);
        self.purge(now);
        let mut map = self.shard(&key);
        // Someone may have written the key meanwhile: `write` compares again.
        self.write(&mut map, key, guard, value, ttl, now)
            .map_err(|_| Self::full())
    }

    /// Removes a key.
    pub fn delete(&self, key: &str) {
        if self.shard(key).remove(key).is_some() {
            self.len.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_and_swap_and_expiry() {
        let s = SharedState::default();
        let k = || "k".to_string();
        assert!(s.compare_and_swap(k(), None, b"1".to_vec(), None).unwrap());
        assert!(
            !s.compare_and_swap(k(), None, b"2".to_vec(), None).unwrap(),
            "present now"
        );
        let (v, ver) = s.get("k").unwrap();
        assert_eq!(v, b"1");
        assert!(s.compare_and_swap(k(), Some(ver), b"2".to_vec(), None).unwrap());
        assert!(
            !s.compare_and_swap(k(), Some(ver), b"3".to_vec(), None).unwrap(),
            "stale version"
        );
        assert_eq!(s.get("k").unwrap().0, b"2");
        s.set("t".into(), b"x".to_vec(), Some(Duration::from_millis(1)))
            .unwrap();
        std::thread::sleep(Duration::from_millis(5));
        assert!(s.get("t").is_none());
        // An expired key is absent to compare-and-swap too, and its slot is written in place.
        s.set("e".into(), b"x".to_vec(), Some(Duration::from_millis(20)))
            .unwrap();
        let (_, ver) = s.get("e").unwrap();
        std::thread::sleep(Duration::from_millis(30));
        assert!(
            !s.compare_and_swap("e".into(), Some(ver), b"y".to_vec(), None)
                .unwrap(),
            "expired: no longer at its last version"
        );
        assert!(s.compare_and_swap("e".into(), None, b"y".to_vec(), None).unwrap());
        assert_eq!(s.get("e").unwrap().0, b"y");
        assert_eq!(s.len.load(Ordering::Relaxed), 2, "k and e, each counted once");
        s.delete("e");
        s.delete("k");
        assert!(s.get("k").is_none());
        assert_eq!(s.len.load(Ordering::Relaxed), 0, "every key counted out");
    }

    #[test]
    fn the_key_bound_holds_across_shards_and_expired_keys_make_room() {
        let s = SharedState::default();
        for i in 0..MAX_ENTRIES - 1 {
            s.set(format!("k{i}"), vec![1], None).unwrap();
        }
        // The last key to fill the state expires soon (written last: filling takes a while).
        s.set("short".into(), vec![1], Some(Duration::from_millis(200)))
            .unwrap();
        assert_eq!(
            s.set("one-more".into(), vec![1], None),
            Err(StateError::Limit(format!("more than {MAX_ENTRIES} keys")))
        );
        assert!(
            s.compare_and_swap("one-more".into(), None, vec![1], None)
                .is_err(),
            "a new key is refused while full"
        );
        // A key that exists is still written while full.
        let (_, v) = s.get("k7").unwrap();
        assert!(s.compare_and_swap("k7".into(), Some(v), vec![2], None).unwrap());
        std::thread::sleep(Duration::from_millis(250));
        // `short` has expired: its room goes to the next new key.
        s.set("one-more".into(), vec![1], None).unwrap();
        assert_eq!(s.len.load(Ordering::Relaxed), MAX_ENTRIES);
        assert!(s.get("short").is_none());
        assert_eq!(s.get("k7").unwrap().0, vec![2]);
    }

    #[test]
    fn concurrent_compare_and_swap_loses_no_update() {
        let s = std::sync::Arc::new(SharedState::default());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        loop {
                            let cur = s.get("n");
                            let n = cur
                                .as_ref()
                                .map_or(0, |(v, _)| u64::from_le_bytes(v[..].try_into().unwrap()));
                            let next = (n + 1).to_le_bytes().to_vec();
                            if s.compare_and_swap("n".into(), cur.map(|(_, v)| v), next, None)
                                .unwrap()
                            {
                                break;
                            }
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let (v, _) = s.get("n").unwrap();
        assert_eq!(u64::from_le_bytes(v[..].try_into().unwrap()), 4000);
    }
}
