//! `ratelimit`: a token bucket per key, shared by every instance of the filter through the
//! host's shared state (compare-and-swap), as Envoy's local rate limit filter does per key.
//!
//! ```toml
//! filters = [{ name = "ratelimit", file = "weir_filter_ratelimit.wasm", config = {
//!     requests = 100, per = "1s", burst = 200, key = "client_ip" } }]
//! ```
//!
//! - `requests` per `per` is the sustained rate; `burst` (default: `requests`) the bucket size.
//! - `key`: `client_ip`, `peer` (the mTLS peer's SPIFFE ID: per calling service in a mesh),
//!   `route`, `global`, or `header:NAME` (an API key, or a JWT claim the `auth` filter
//!   forwarded as a header). Requests without the header (or peer) share one bucket.
//! - Over the limit: 429 with `Retry-After` and `RateLimit-Limit`, `RateLimit-Remaining`,
//!   `RateLimit-Reset` (the IETF RateLimit header fields). With `headers_on_success = true`
//!   allowed responses carry the `RateLimit-*` fields too (off by default, as in Envoy's
//!   local rate limit: it costs a response-phase call per request). Buckets expire once full
//!   and idle, so memory follows active keys.

use std::cell::RefCell;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use weir_sdk::state::{self, Swapped};
use weir_sdk::{metrics, props, Action, Filter, Request, Response, ResponseHead};

/// How requests are grouped into buckets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    /// The client's IP address.
    ClientIp,
    /// The route's name.
    Route,
    /// One bucket for everything.
    Global,
    /// The mTLS peer's identity (its first URI SAN, else its subject): per calling service
    /// in a mesh.
    Peer,
    /// A request header's value.
    Header(String),
}

/// The filter's table in `weir.toml`.
#[derive(serde::Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Requests allowed per `per`.
    pub requests: u32,
    /// The period: `"1s"`, `"1m"`, `"1h"`, or a number with `ms`, `s`, `m`, `h`.
    #[serde(default = "default_per")]
    pub per: String,
    /// Bucket size (the largest burst); default `requests`.
    #[serde(default)]
    pub burst: Option<u32>,
    /// `client_ip`, `peer` (mTLS identity), `route`, `global`, or `header:NAME`.
    #[serde(default = "default_key")]
    pub key: String,
    /// Also set `RateLimit-*` on allowed responses (default: only on 429).
    #[serde(default)]
    pub headers_on_success: bool,
}

fn default_per() -> String {
    "1s".into()
}

fn default_key() -> String {
    "client_ip".into()
}

/// Parses `250ms`, `1s`, `5m`, `1h`.
pub fn parse_period(s: &str) -> Result<Duration, String> {
    let d = weir_sdk::config::parse_duration("per", s)?;
    if d.is_zero() {
        return Err("per: must be greater than zero".into());
    }
    Ok(d)
}

/// A bucket as stored: tokens (in millionths) and the time they were counted at (ms).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Bucket {
    micro_tokens: u64,
    at_ms: u64,
}

impl Bucket {
    fn decode(b: &[u8]) -> Option<Bucket> {
        let b: &[u8; 16] = b.try_into().ok()?;
        Some(Bucket {
            micro_tokens: u64::from_le_bytes(b[..8].try_into().ok()?),
            at_ms: u64::from_le_bytes(b[8..].try_into().ok()?),
        })
    }

    fn encode(&self) -> [u8; 16] {
        let mut out = [0; 16];
        out[..8].copy_from_slice(&self.micro_tokens.to_le_bytes());
        out[8..].copy_from_slice(&self.at_ms.to_le_bytes());
        out
    }
}

const MICRO: u64 = 1_000_000;

/// The filter.
pub struct RateLimit {
    key: Key,
    limit: u32,
    capacity: u64,
    /// Tokens (millionths) added per millisecond.
    micro_per_ms: f64,
    period: Duration,
    headers_on_success: bool,
    /// The bucket this instance wrote last and the version its write got: the next request
    /// with the same key updates from it without reading the state first. A stale copy
    /// (another instance wrote since) costs nothing extra: the conflict brings the current
    /// bucket.
    last: RefCell<Last>,
}

#[derive(Default)]
struct Last {
    key: String,
    written: Option<(u64, Bucket)>,
}

/// The outcome of taking a token.
#[derive(Debug, PartialEq, Eq)]
pub enum Taken {
    /// Allowed; whole tokens left.
    Allowed(u64),
    /// Refused; time until a token is back.
    Refused(Duration),
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl RateLimit {
    fn refill(&self, b: Option<Bucket>, now: u64) -> Bucket {
        match b {
            None => Bucket {
                micro_tokens: self.capacity * MICRO,
                at_ms: now,
            },
            Some(b) => {
                let elapsed = now.saturating_sub(b.at_ms);
                let added = (elapsed as f64 * self.micro_per_ms) as u64;
                Bucket {
                    micro_tokens: (b.micro_tokens + added).min(self.capacity * MICRO),
                    at_ms: now.max(b.at_ms),
                }
            }
        }
    }

    /// Takes one token from `bucket_key`'s bucket (compare-and-swap, retried on contention).
    pub fn take(&self, bucket_key: &str, now: u64) -> Taken {
        // Idle buckets refill completely within this time; then they may as well be gone.
        let ttl =
            Duration::from_millis((self.capacity as f64 * MICRO as f64 / self.micro_per_ms) as u64 + 1000);
        // What the key holds as far as this instance knows: its version and bucket.
        let same_key = self.last.borrow().key == bucket_key;
        let mut known = same_key
            .then(|| self.last.borrow().written)
            .flatten()
            .map(|(version, bucket)| (Some(version), Some(bucket)));
        for _ in 0..16 {
            let (version, stored) = known.take().unwrap_or_else(|| {
                let e = state::get(bucket_key);
                (
                    e.as_ref().map(|e| e.version),
                    e.and_then(|e| Bucket::decode(&e.value)),
                )
            });
            let bucket = self.refill(stored, now);
            if bucket.micro_tokens < MICRO {
                let missing = MICRO - bucket.micro_tokens;
                let wait = (missing as f64 / self.micro_per_ms).ceil() as u64;
                return Taken::Refused(Duration::from_millis(wait.max(1)));
            }
            let next = Bucket {
                micro_tokens: bucket.micro_tokens - MICRO,
                at_ms: bucket.at_ms,
            };
            match state::swap(bucket_key, version, &next.encode(), Some(ttl)) {
                Ok(Swapped::Written(version)) => {
                    let mut last = self.last.borrow_mut();
                    if !same_key {
                        last.key.clear();
                        last.key.push_str(bucket_key);
                    }
                    last.written = Some((version, next));
                    return Taken::Allowed(next.micro_tokens / MICRO);
                }
                Ok(Swapped::Conflict(current)) => {
                    known = Some((
                        current.as_ref().map(|e| e.version),
                        current.and_then(|e| Bucket::decode(&e.value)),
                    ));
                }
                Err(e) => {
                    weir_sdk::log::warn(&format!("rate limit state unavailable: {e}; allowing"));
                    return Taken::Allowed(0);
                }
            }
        }
        // Heavy contention on one key: refuse rather than over-admit.
        Taken::Refused(Duration::from_millis(1))
    }

    fn bucket_key(&self, req: &Request) -> String {
        let part = match &self.key {
            Key::ClientIp => {
                let a = props::client_address();
                // ip:port or [v6]:port: drop the port (the last colon is a few bytes from
                // the end; a plain loop, not the generic memrchr).
                let ip = a.bytes().rposition(|b| b == b':').map_or(a.as_str(), |i| &a[..i]);
                let mut key = String::with_capacity(2 + ip.len());
                key.push_str("b:");
                key.push_str(ip);
                return key;
            }
            Key::Route => props::route().unwrap_or_default(),
            Key::Global => String::new(),
            Key::Peer => props::peer_identity()
                .map(|p| p.uri_sans.into_iter().next().unwrap_or(p.subject))
                .unwrap_or_default(),
            Key::Header(h) => req.header_str(h).unwrap_or_default(),
        };
        format!("b:{part}")
    }

    fn remaining(&self, bucket_key: &str) -> u64 {
        let b = state::get(bucket_key).and_then(|e| Bucket::decode(&e.value));
        self.refill(b, now_ms()).micro_tokens / MICRO
    }
}

impl Filter for RateLimit {
    type Config = Config;

    fn new(c: Config) -> Result<Self, String> {
        if c.requests == 0 {
            return Err("requests: must be at least 1".into());
        }
        let period = parse_period(&c.per)?;
        let key = match c.key.as_str() {
            "client_ip" => Key::ClientIp,
            "route" => Key::Route,
            "global" => Key::Global,
            "peer" => Key::Peer,
            k => match k.strip_prefix("header:") {
                Some(h) if !h.is_empty() => Key::Header(h.to_ascii_lowercase()),
                _ => {
                    return Err(format!(
                        "key: {k:?}: use client_ip, peer, route, global or header:NAME"
                    ))
                }
            },
        };
        let capacity = u64::from(c.burst.unwrap_or(c.requests).max(1));
        Ok(RateLimit {
            key,
            limit: c.requests,
            capacity,
            micro_per_ms: c.requests as f64 * MICRO as f64 / period.as_millis() as f64,
            period,
            headers_on_success: c.headers_on_success,
            last: RefCell::default(),
        })
    }

    fn on_request_headers(&self, req: &Request) -> Action {
        let key = self.bucket_key(req);
        match self.take(&key, now_ms()) {
            Taken::Allowed(_) => Action::Continue,
            Taken::Refused(wait) => {
                let _ = metrics::counter_add("limited", &[], 1);
                let secs = wait.as_millis().div_ceil(1000).max(1);
                Action::Respond(
                    Response::new(429)
                        .header("retry-after", secs.to_string())
                        .header("ratelimit-limit", self.limit.to_string())
                        .header("ratelimit-remaining", "0")
                        .header("ratelimit-reset", secs.to_string())
                        .header("content-type", "text/plain")
                        .body("rate limited\n"),
                )
            }
        }
    }

    fn on_response_headers(&self, resp: &ResponseHead) -> Action {
        if !self.headers_on_success {
            return Action::NotImplemented;
        }
        if resp.status() == 429 {
            return Action::Continue;
        }
        let key = self.bucket_key(&resp.request());
        let _ = resp.set_header("ratelimit-limit", self.limit.to_string());
        let _ = resp.set_header("ratelimit-remaining", self.remaining(&key).to_string());
        let _ = resp.set_header("ratelimit-reset", self.period.as_secs().max(1).to_string());
        Action::Continue
    }
}

weir_sdk::export_filter!(RateLimit);

#[cfg(test)]
mod tests {
    use super::*;
    use weir_sdk::testing::{MockHost, TestFilter};

    #[test]
    fn periods_parse() {
        assert_eq!(parse_period("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_period("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_period("0s").is_err());
        assert!(parse_period("1d").unwrap_err().contains("unit"));
    }

    #[test]
    fn a_bucket_allows_its_burst_then_refills() {
        MockHost::reset(|_| {});
        let f = RateLimit::new(serde_json::from_str(r#"{"requests": 10, "per": "1s", "burst": 3}"#).unwrap())
            .unwrap();
        let t = 1_000_000;
        assert_eq!(f.take("k", t), Taken::Allowed(2));
        assert_eq!(f.take("k", t), Taken::Allowed(1));
        assert_eq!(f.take("k", t), Taken::Allowed(0));
        assert_eq!(f.take("k", t), Taken::Refused(Duration::from_millis(100)));
        // 10/s: one token every 100 ms.
        assert_eq!(f.take("k", t + 100), Taken::Allowed(0));
        assert!(matches!(f.take("k", t + 150), Taken::Refused(_)));
        assert_eq!(
            f.take("other", t),
            Taken::Allowed(2),
            "keys have their own buckets"
        );
    }

    #[test]
    fn instances_that_remember_stale_buckets_still_share_one_limit() {
        // Two instances of the filter over the same state: each remembers the bucket it wrote
        // last, which the other's writes make stale; no token is handed out twice.
        MockHost::reset(|_| {});
        let config = || serde_json::from_str(r#"{"requests": 1, "per": "1m", "burst": 5}"#).unwrap();
        let (a, b) = (
            RateLimit::new(config()).unwrap(),
            RateLimit::new(config()).unwrap(),
        );
        let t = 1_000_000;
        assert_eq!(a.take("k", t), Taken::Allowed(4));
        assert_eq!(a.take("k", t), Taken::Allowed(3), "from a's own copy");
        assert_eq!(b.take("k", t), Taken::Allowed(2), "b reads what a wrote");
        assert_eq!(
            a.take("k", t),
            Taken::Allowed(1),
            "a's copy is stale: the conflict corrects it"
        );
        assert_eq!(b.take("k", t), Taken::Allowed(0));
        assert!(matches!(a.take("k", t), Taken::Refused(_)));
        assert!(matches!(b.take("k", t), Taken::Refused(_)));
        // A key deleted behind an instance's back (expired) starts a full bucket again.
        weir_sdk::state::delete("k");
        assert_eq!(a.take("k", t), Taken::Allowed(4));
    }

    #[test]
    fn peers_have_their_own_buckets() {
        let f = TestFilter::<RateLimit>::new(r#"{"requests": 1, "per": "1m", "key": "peer"}"#).unwrap();
        let peer = |id: &str| weir_sdk::props::PeerIdentity {
            subject: "CN=x".into(),
            uri_sans: vec![id.into()],
            dns_sans: vec![],
        };
        MockHost::reset(|h| h.peer = Some(peer("spiffe://cluster.local/ns/web/sa/frontend")));
        assert_eq!(f.on_request_headers(), Action::Continue);
        assert!(matches!(f.on_request_headers(), Action::Respond(_)));
        MockHost::with(|h| h.peer = Some(peer("spiffe://cluster.local/ns/jobs/sa/batch")));
        assert_eq!(f.on_request_headers(), Action::Continue, "another service");
    }

    #[test]
    fn over_the_limit_answers_429_with_headers() {
        let f = TestFilter::<RateLimit>::new(r#"{"requests": 1, "per": "1m", "key": "header:x-api-key"}"#)
            .unwrap();
        MockHost::reset(|h| h.request_headers = vec![("x-api-key".into(), b"k1".to_vec())]);
        assert_eq!(f.on_request_headers(), Action::Continue);
        let Action::Respond(r) = f.on_request_headers() else {
            panic!("limited")
        };
        assert_eq!(r.status, 429);
        let h = |n: &str| {
            r.headers
                .iter()
                .find(|(k, _)| k == n)
                .map(|(_, v)| String::from_utf8(v.clone()).unwrap())
        };
        assert_eq!(h("retry-after").as_deref(), Some("60"));
        assert_eq!(h("ratelimit-remaining").as_deref(), Some("0"));
        MockHost::with(|m| m.request_headers = vec![("x-api-key".into(), b"k2".to_vec())]);
        assert_eq!(f.on_request_headers(), Action::Continue, "another key");
    }

    #[test]
    fn allowed_responses_carry_ratelimit_fields_only_when_asked() {
        for (config, want) in [
            (r#"{"requests": 5, "per": "1m"}"#, None),
            (
                r#"{"requests": 5, "per": "1m", "headers_on_success": true}"#,
                Some("4"),
            ),
        ] {
            let f = TestFilter::<RateLimit>::new(config).unwrap();
            MockHost::reset(|_| {});
            assert_eq!(f.on_request_headers(), Action::Continue);
            assert_eq!(f.on_response_headers(), Action::Continue);
            assert_eq!(
                MockHost::response_header("ratelimit-remaining").as_deref(),
                want,
                "{config}"
            );
        }
    }
}
