//! Key-value state shared by every instance of one filter (rate limits, circuit breakers):
//! versioned for compare-and-swap, with optional expiry and a bound on entries.
//!
//! The keys are spread over shards, each behind its own lock, so the workers serving
//! different keys (clients, routes) do not queue on one lock per filter. A key is hashed once
//! per operation (SipHash with a random key: keys come from requests), and that hash picks
//! the shard and finds the entry; a write to a key that exists replaces its value in place.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hashbrown::HashTable;

/// Most keys one filter may hold; a filter that keys by something unbounded hits this
/// instead of exhausting the proxy's memory.
pub const MAX_ENTRIES: usize = 100_000;

/// Largest value, in bytes.
pub const MAX_VALUE_BYTES: usize = 64 * 1024;
/// Longest key: 100k keys of this size stay within a few hundred MiB.
pub const MAX_KEY_BYTES: usize = 1024;

/// Lock shards per filter: a power of two, a few times the usual worker count.
const SHARDS: usize = 16;

struct Entry {
    /// The key's hash, kept so that growing a shard never hashes a key again.
    hash: u64,
    key: String,
    value: Vec<u8>,
    version: u64,
    expires: Option<Instant>,
}

impl Entry {
    fn expired(&self, now: Instant) -> bool {
        self.expires.is_some_and(|t| t <= now)
    }
}

type Shard = HashTable<Entry>;

/// One filter's shared state.
pub struct SharedState {
    shards: [Mutex<Shard>; SHARDS],
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

/// What a guarded write did.
#[derive(Debug, PartialEq, Eq)]
pub enum Swap {
    /// Written; the key's new version.
    Written(u64),
    /// Not written: the key's current value and version (`None`: absent or expired).
    Conflict(Option<(Vec<u8>, u64)>),
}

/// A write that needs a new key while the state is full; hands the key and value back.
struct Full(String, Vec<u8>);

fn matches<'a>(hash: u64, key: &'a str) -> impl Fn(&Entry) -> bool + 'a {
    move |e| e.hash == hash && e.key == key
}

impl SharedState {
    /// Hashes `key` and locks its shard, chosen by bits 32..36 of the hash: the table inside
    /// uses the low bits for the bucket and the top seven for its tags.
    fn shard(&self, key: &str) -> (u64, MutexGuard<'_, Shard>) {
        let hash = self.hasher.hash_one(key);
        let i = (hash >> 32) as usize & (SHARDS - 1);
        (hash, self.shards[i].lock().expect("state lock"))
    }

    fn version(&self) -> u64 {
        self.next_version.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Writes the key: in place when it exists (a write to a key that exists is what a rate
    /// limit does on every request), else as a new key under the bound. An expired entry
    /// counts as absent for `guard` and its slot is reused.
    #[allow(clippy::too_many_arguments)]
    fn write(
        &self,
        shard: &mut Shard,
        hash: u64,
        key: String,
        guard: Option<Option<u64>>,
        value: Vec<u8>,
        ttl: Option<Duration>,
        now: Instant,
    ) -> Result<Swap, Full> {
        // A TTL too long for the clock (a guest may send u64::MAX ms) never expires.
        let expires = ttl.and_then(|d| now.checked_add(d));
        if let Some(e) = shard.find_mut(hash, matches(hash, &key)) {
            let live = !e.expired(now);
            if guard.is_some_and(|expected| expected != live.then_some(e.version)) {
                return Ok(Swap::Conflict(live.then(|| (e.value.clone(), e.version))));
            }
            e.value = value;
            e.version = self.version();
            e.expires = expires;
            return Ok(Swap::Written(e.version));
        }
        if guard.is_some_and(|expected| expected.is_some()) {
            return Ok(Swap::Conflict(None));
        }
        // Counted in only while under the bound: an add-then-undo would count a refused key
        // for a moment, and a concurrent insert could be refused for it with room left.
        if self
            .len
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < MAX_ENTRIES).then_some(n + 1)
            })
            .is_err()
        {
            return Err(Full(key, value));
        }
        let version = self.version();
        shard.insert_unique(
            hash,
            Entry {
                hash,
                key,
                value,
                version,
                expires,
            },
            |e| e.hash,
        );
        Ok(Swap::Written(version))
    }

    /// Drops every expired entry, one shard at a time (never two locks at once).
    fn purge(&self, now: Instant) {
        for shard in &self.shards {
            let mut shard = shard.lock().expect("state lock");
            let before = shard.len();
            shard.retain(|e| !e.expired(now));
            self.len.fetch_sub(before - shard.len(), Ordering::Relaxed);
        }
    }

    fn check_size(key: &str, value: &[u8]) -> Result<(), StateError> {
        if key.len() > MAX_KEY_BYTES {
            return Err(StateError::Limit(format!(
                "key longer than {MAX_KEY_BYTES} bytes"
            )));
        }
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
        let (hash, mut shard) = self.shard(key);
        let now = Instant::now();
        match shard.find_entry(hash, matches(hash, key)) {
            Ok(e) if !e.get().expired(now) => Some((e.get().value.clone(), e.get().version)),
            Ok(e) => {
                e.remove();
                self.len.fetch_sub(1, Ordering::Relaxed);
                None
            }
            Err(_) => None,
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
        self.swap(key, expected, value, ttl)
            .map(|s| matches!(s, Swap::Written(_)))
    }

    /// Writes only if the current version is `expected` (`None`: absent); returns the new
    /// version, or the current entry when the version did not match.
    pub fn swap(
        &self,
        key: String,
        expected: Option<u64>,
        value: Vec<u8>,
        ttl: Option<Duration>,
    ) -> Result<Swap, StateError> {
        self.put(key, Some(expected), value, ttl)
    }

    /// Writes `key`, unconditionally (`guard` `None`) or only if its current version is the
    /// guard's. A new key while full first makes room from expired entries; a key that exists
    /// is replaced in place and never refused.
    fn put(
        &self,
        key: String,
        guard: Option<Option<u64>>,
        value: Vec<u8>,
        ttl: Option<Duration>,
    ) -> Result<Swap, StateError> {
        Self::check_size(&key, &value)?;
        let now = Instant::now();
        let (hash, mut shard) = self.shard(&key);
        let (key, value) = match self.write(&mut shard, hash, key, guard, value, ttl, now) {
            Ok(done) => return Ok(done),
            Err(Full(key, value)) => (key, value),
        };
        drop(shard);
        self.purge(now);
        let (hash, mut shard) = self.shard(&key);
        // Someone may have written the key meanwhile: `write` compares again.
        self.write(&mut shard, hash, key, guard, value, ttl, now)
            .map_err(|_| Self::full())
    }

    /// Removes a key.
    pub fn delete(&self, key: &str) {
        let (hash, mut shard) = self.shard(key);
        if let Ok(e) = shard.find_entry(hash, matches(hash, key)) {
            e.remove();
            self.len.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_values_are_bounded_in_size() {
        let s = SharedState::default();
        assert!(s.set("k".repeat(MAX_KEY_BYTES), vec![], None).is_ok());
        assert!(matches!(
            s.set("k".repeat(MAX_KEY_BYTES + 1), vec![], None),
            Err(StateError::Limit(_))
        ));
        assert!(matches!(
            s.set("k".into(), vec![0; MAX_VALUE_BYTES + 1], None),
            Err(StateError::Limit(_))
        ));
    }

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
    fn a_ttl_too_long_for_the_clock_never_expires_and_never_panics() {
        // The TTL comes from the guest: u64::MAX milliseconds must not overflow the clock.
        let s = SharedState::default();
        let ttl = Some(Duration::from_millis(u64::MAX));
        let Swap::Written(v) = s.swap("k".into(), None, b"1".to_vec(), ttl).unwrap() else {
            panic!("an absent key is written");
        };
        assert_eq!(s.get("k"), Some((b"1".to_vec(), v)));
        let ttl = Some(Duration::MAX);
        assert!(matches!(
            s.swap("k".into(), Some(v), b"2".to_vec(), ttl),
            Ok(Swap::Written(_))
        ));
    }

    #[test]
    fn swap_answers_the_new_version_or_the_current_entry() {
        let s = SharedState::default();
        let Swap::Written(v1) = s.swap("k".into(), None, b"1".to_vec(), None).unwrap() else {
            panic!("an absent key is written with expected None");
        };
        assert_eq!(
            s.get("k"),
            Some((b"1".to_vec(), v1)),
            "the version swap answered is the key's"
        );
        assert_eq!(
            s.swap("k".into(), None, b"x".to_vec(), None).unwrap(),
            Swap::Conflict(Some((b"1".to_vec(), v1))),
            "present: the conflict carries the current entry"
        );
        // Updating from the version the last write answered: no read needed.
        let Swap::Written(v2) = s.swap("k".into(), Some(v1), b"2".to_vec(), None).unwrap() else {
            panic!("the remembered version is current");
        };
        assert!(v2 > v1);
        assert_eq!(
            s.swap("k".into(), Some(v1), b"3".to_vec(), None).unwrap(),
            Swap::Conflict(Some((b"2".to_vec(), v2))),
            "a stale version gets the current entry"
        );
        assert_eq!(
            s.swap("gone".into(), Some(v2), b"3".to_vec(), None).unwrap(),
            Swap::Conflict(None),
            "an absent key with a version expected"
        );
        s.set("t".into(), b"x".to_vec(), Some(Duration::from_millis(1)))
            .unwrap();
        let (_, vt) = s.get("t").unwrap();
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(
            s.swap("t".into(), Some(vt), b"y".to_vec(), None).unwrap(),
            Swap::Conflict(None),
            "an expired key is absent to swap"
        );
        assert_eq!(s.get("gone"), None);
        assert_eq!(s.len.load(Ordering::Relaxed), 2, "k and t");
    }

    #[test]
    fn many_keys_over_every_shard_stay_readable_through_growth() {
        // Keys land in all shards and grow each table several times (entries move, hashes
        // are reused); every key keeps its own value and version.
        let s = SharedState::default();
        let mut versions = Vec::new();
        for i in 0..5000u32 {
            let Swap::Written(v) = s
                .swap(format!("key-{i}"), None, i.to_le_bytes().to_vec(), None)
                .unwrap()
            else {
                panic!("new key {i}");
            };
            versions.push(v);
        }
        for i in (0..5000u32).step_by(7) {
            assert_eq!(
                s.get(&format!("key-{i}")),
                Some((i.to_le_bytes().to_vec(), versions[i as usize]))
            );
        }
        for i in 0..5000u32 {
            s.delete(&format!("key-{i}"));
        }
        assert_eq!(s.len.load(Ordering::Relaxed), 0);
        assert!(s.shards.iter().all(|m| m.lock().unwrap().is_empty()));
    }

    #[test]
    fn at_the_bound_the_count_never_goes_over_it_and_ends_exact() {
        let s = std::sync::Arc::new(SharedState::default());
        for i in 0..MAX_ENTRIES - 2 {
            s.set(format!("k{i}"), vec![1], None).unwrap();
        }
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        // Four writers for two free places: many inserts are refused, each for a moment
        // counted in by the old add-then-undo.
        let writers: Vec<_> = (0..4)
            .map(|t| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for _ in 0..20_000 {
                        let key = format!("w{t}");
                        if s.set(key.clone(), vec![1], None).is_ok() {
                            s.delete(&key);
                        }
                    }
                })
            })
            .collect();
        let watcher = {
            let (s, done) = (s.clone(), done.clone());
            std::thread::spawn(move || {
                let mut most = 0;
                while !done.load(Ordering::Relaxed) {
                    most = most.max(s.len.load(Ordering::Relaxed));
                }
                most
            })
        };
        for w in writers {
            w.join().unwrap();
        }
        done.store(true, Ordering::Relaxed);
        assert!(
            watcher.join().unwrap() <= MAX_ENTRIES,
            "the count went over the bound"
        );
        assert_eq!(s.len.load(Ordering::Relaxed), MAX_ENTRIES - 2);
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
