//! A JWK set fetched from a cluster and shared by every instance of the filter.
//!
//! The set is kept in the filter's shared state as `fetched_at_ms (u64 LE) ++ the JSON body`,
//! with a state TTL of twice `cache_duration`: fresh for `cache_duration`, then stale but still
//! used while one instance refreshes it (stale-while-revalidate; an identity provider that is
//! briefly down does not lock everyone out). Each instance parses a version of the set once
//! and keeps the parsed keys until the state's version changes.
//!
//! Fetches are serialised by a lease in the shared state (compare-and-swap, expiring after
//! `refetch_interval`): one instance fetches, the others use the keys they have, or, when there
//! are none yet, wait briefly for the fetching instance's result. The lease outlives the fetch,
//! so a token with an unknown `kid` causes at most one refetch per `refetch_interval`, and a
//! failing identity provider is asked at most that often.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use weir_sdk::log;
use weir_sdk::outbound::{self, OutboundRequest};
use weir_sdk::state;

use crate::jwt::{self, Key};

const FETCHING: &[u8] = b"fetching";
const FAILED: &[u8] = b"failed";
/// How long an instance without keys waits for another instance's fetch, in steps.
const WAIT_STEP: Duration = Duration::from_millis(25);
const WAIT_STEPS: u32 = 8;

/// Where the set comes from and how long it is kept.
#[derive(Debug)]
pub struct Remote {
    /// The cluster serving the set.
    pub cluster: String,
    /// Its path.
    pub path: String,
    /// How long a fetched set is fresh.
    pub cache_duration: Duration,
    /// Least time between two fetches (the lease's life).
    pub refetch_interval: Duration,
    /// Time for one fetch.
    pub timeout: Duration,
    set_key: String,
    lease_key: String,
    local: RefCell<Option<Cached>>,
}

#[derive(Debug, Clone)]
struct Cached {
    version: u64,
    fetched_at_ms: u64,
    keys: Rc<Vec<Key>>,
}

impl Remote {
    /// A remote set; nothing is fetched until a token needs it.
    pub fn new(
        cluster: String,
        path: String,
        cache_duration: Duration,
        refetch_interval: Duration,
        timeout: Duration,
    ) -> Remote {
        // Entries of the same filter name share state: key by the source, so two chain
        // entries with different identity providers never mix their sets.
        let id = Sha256::digest(format!("{cluster}\0{path}").as_bytes());
        let id: String = id[..8].iter().map(|b| format!("{b:02x}")).collect();
        Remote {
            cluster,
            path,
            cache_duration,
            refetch_interval,
            timeout,
            set_key: format!("jwks:{id}"),
            lease_key: format!("jwks:{id}:lease"),
            local: RefCell::new(None),
        }
    }

    /// The state key holding the set (for tests).
    pub fn state_key(&self) -> &str {
        &self.set_key
    }

    /// The state key of the fetch lease (for tests).
    pub fn lease_key(&self) -> &str {
        &self.lease_key
    }

    /// The set in the shared state, parsed (once per version per instance).
    fn load(&self) -> Option<Cached> {
        let Some(entry) = state::get(&self.set_key) else {
            *self.local.borrow_mut() = None;
            return None;
        };
        if let Some(c) = self.local.borrow().as_ref() {
            if c.version == entry.version {
                return Some(c.clone());
            }
        }
        let fetched_at_ms = u64::from_le_bytes(entry.value.get(..8)?.try_into().ok()?);
        let keys = match parse(&entry.value[8..]) {
            Ok(set) => set.keys,
            Err(e) => {
                // Only valid sets are stored; this is another version of the filter's layout.
                log::warn(&format!("JWK set in the shared state is unusable: {e}"));
                return None;
            }
        };
        let c = Cached {
            version: entry.version,
            fetched_at_ms,
            keys: Rc::new(keys),
        };
        *self.local.borrow_mut() = Some(c.clone());
        Some(c)
    }

    /// The keys to verify with at `now_ms`: fetched when there are none, refreshed when stale.
    pub fn keys(&self, now_ms: u64) -> Result<Rc<Vec<Key>>, String> {
        match self.load() {
            Some(c)
                if now_ms
                    < c.fetched_at_ms
                        .saturating_add(self.cache_duration.as_millis() as u64) =>
            {
                Ok(c.keys)
            }
            Some(c) => Ok(self.fetch_if_leased(now_ms).unwrap_or(c.keys)),
            None => match self.fetch_if_leased(now_ms) {
                Some(keys) => Ok(keys),
                None => self.wait_for_fetch(),
            },
        }
    }

    /// After a token named a `kid` the set lacks: fetches again, unless a fetch happened within
    /// `refetch_interval`. Returns the new keys when fetched.
    pub fn refetch(&self, now_ms: u64) -> Option<Rc<Vec<Key>>> {
        self.fetch_if_leased(now_ms)
    }

    /// Takes the lease and fetches; `None` when another fetch holds it (or just happened), or
    /// when the fetch fails.
    fn fetch_if_leased(&self, now_ms: u64) -> Option<Rc<Vec<Key>>> {
        match state::compare_and_swap(&self.lease_key, None, FETCHING, Some(self.refetch_interval)) {
            Ok(true) => {}
            Ok(false) => return None,
            Err(e) => log::warn(&format!(
                "shared state unavailable ({e}); fetching the JWK set anyway"
            )),
        }
        match self.fetch() {
            Ok((body, keys)) => {
                let mut value = now_ms.to_le_bytes().to_vec();
                value.extend_from_slice(&body);
                if let Err(e) = state::set(&self.set_key, &value, Some(self.cache_duration * 2)) {
                    log::warn(&format!(
                        "JWK set of {} bytes not shared with the other instances: {e}",
                        body.len()
                    ));
                }
                let keys = Rc::new(keys);
                // This instance's copy; `load` replaces it when the state's version moves on.
                *self.local.borrow_mut() = state::get(&self.set_key).map(|e| Cached {
                    version: e.version,
                    fetched_at_ms: now_ms,
                    keys: keys.clone(),
                });
                Some(keys)
            }
            Err(e) => {
                log::warn(&format!(
                    "fetching the JWK set from cluster {:?} {}: {e}; next try in {:?}",
                    self.cluster, self.path, self.refetch_interval
                ));
                // Tell waiting instances not to wait; the lease keeps its life.
                if let Some(lease) = state::get(&self.lease_key) {
                    let _ = state::compare_and_swap(
                        &self.lease_key,
                        Some(lease.version),
                        FAILED,
                        Some(self.refetch_interval),
                    );
                }
                None
            }
        }
    }

    fn fetch(&self) -> Result<(Vec<u8>, Vec<Key>), String> {
        let mut req = OutboundRequest::get(&self.path);
        req.headers.push(("accept".into(), b"application/json".to_vec()));
        req.timeout = self.timeout;
        let resp = outbound::call(&self.cluster, &req)?;
        if resp.status != 200 {
            return Err(format!("status {}", resp.status));
        }
        let set = parse(&resp.body)?;
        for s in &set.skipped {
            log::info(&format!("JWK set from cluster {:?}: skipped {s}", self.cluster));
        }
        if set.keys.is_empty() {
            return Err("the set has no RS256, ES256 or HS256 key".into());
        }
        Ok((resp.body, set.keys))
    }

    /// No keys yet and another instance holds the lease: wait for its result, briefly.
    fn wait_for_fetch(&self) -> Result<Rc<Vec<Key>>, String> {
        for _ in 0..WAIT_STEPS {
            match state::get(&self.lease_key) {
                Some(e) if e.value == FETCHING => {}
                _ => break,
            }
            std::thread::sleep(WAIT_STEP);
            if let Some(c) = self.load() {
                return Ok(c.keys);
            }
        }
        self.load().map(|c| c.keys).ok_or_else(|| {
            format!(
                "no JWK set from cluster {:?} {} (the last fetch failed or is still running; \
                 fetches are at most one per {:?})",
                self.cluster, self.path, self.refetch_interval
            )
        })
    }
}

fn parse(body: &[u8]) -> Result<jwt::KeySet, String> {
    let v: serde_json::Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    jwt::parse_fetched_jwks(&v)
}
