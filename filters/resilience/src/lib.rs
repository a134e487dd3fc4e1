//! `resilience`: retries, circuit breaking, outlier ejection and fallbacks, as Envoy's retry
//! policy, circuit breakers and outlier detection give them, as a filter.
//!
//! ```toml
//! filters = [{ name = "resilience", file = "weir_filter_resilience.wasm", config = {
//!     per_try_timeout = "1s",
//!     retry = { attempts = 3, on = ["gateway-error", "connect-failure", "reset"], statuses = [409], backoff = { base = "25ms", max = "250ms" }, budget = { percent = 20, min_retries = 3 } },
//!     breaker = { consecutive_failures = 5, failure_rate = 0.5, min_requests = 20, window = "10s", open_for = "5s", half_open_probes = 1 },
//!     outlier = { consecutive_failures = 3, eject_for = "30s" },
//!     fallback = { status = 503, body = "temporarily unavailable", headers = { "retry-after" = "5" } } } }]
//! ```
//!
//! - **Retries** (`retry`): a failed attempt is sent again (by the proxy, to another endpoint
//!   when the cluster has one, with the request body replayed) while attempts remain. `on`
//!   chooses what is retried: `5xx` (any 5xx), `gateway-error` (502, 503, 504),
//!   `connect-failure` (no connection or no healthy endpoint), `reset` (the upstream failed
//!   mid-exchange), `timeout` (no answer within the per-try timeout), `retriable-status-codes`
//!   (the `statuses` list). Back-off between attempts is exponential from `base`, capped at
//!   `max`, with full jitter. The **budget** keeps retries under `percent` of the requests of
//!   the last 10 s per cluster (at least `min_retries`), so a failing upstream is never sent a
//!   storm of retries.
//! - **Per-try timeout** (`per_try_timeout`): each attempt's time to the response head.
//! - **Circuit breaker** (`breaker`), per cluster, shared by every instance: it opens after
//!   `consecutive_failures` failures in a row, or when at least `min_requests` requests in
//!   `window` failed at `failure_rate` or more. While open, requests get the fallback at once.
//!   After `open_for` it half-opens: `half_open_probes` requests go through; a success closes
//!   it, a failure opens it again.
//! - **Outlier ejection** (`outlier`), per endpoint: after `consecutive_failures` failures in
//!   a row from one endpoint, the filter tells the proxy to take that endpoint out of
//!   balancing for `eject_for` (never the cluster's last available one).
//! - **Fallback** while the breaker is open: a response (`status`, `body`, `headers`) or a
//!   `cluster` to send the request to instead. Without one: 503 `circuit open`.
//!
//! A failure is a 5xx response, including the proxy's own 502/503/504 for an upstream that
//! could not be reached, reset, or timed out (the `x-weir-error` header tells which).

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use weir_sdk::config::parse_duration;
use weir_sdk::{metrics, props, state, Action, Filter, Request, Response, ResponseHead};

/// `retry.backoff`.
#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct Backoff {
    /// First delay.
    pub base: String,
    /// Largest delay.
    pub max: String,
}

/// `retry.budget`.
#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    /// Retries may be at most this share of requests (percent).
    pub percent: u32,
    /// Retries always allowed per 10 s window, whatever the share.
    #[serde(default = "three")]
    pub min_retries: u32,
}

fn three() -> u32 {
    3
}

/// `retry`.
#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Most attempts, the first included (2 = one retry).
    pub attempts: u32,
    /// What is retried.
    #[serde(default = "default_on")]
    pub on: Vec<String>,
    /// Statuses retried with `retriable-status-codes`.
    #[serde(default)]
    pub statuses: Vec<u16>,
    /// Back-off between attempts.
    #[serde(default)]
    pub backoff: Option<Backoff>,
    /// Retry budget.
    #[serde(default)]
    pub budget: Option<Budget>,
}

fn default_on() -> Vec<String> {
    vec!["gateway-error".into(), "connect-failure".into(), "reset".into()]
}

/// `breaker`.
#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct BreakerConfig {
    /// Opens after this many failures in a row.
    #[serde(default = "five")]
    pub consecutive_failures: u32,
    /// Opens when this share of the window's requests failed...
    #[serde(default)]
    pub failure_rate: Option<f64>,
    /// ...and the window holds at least this many requests.
    #[serde(default = "twenty")]
    pub min_requests: u32,
    /// The failure-rate window.
    #[serde(default = "ten_s")]
    pub window: String,
    /// How long it stays open before probing.
    #[serde(default = "five_s")]
    pub open_for: String,
    /// Requests let through while half-open.
    #[serde(default = "one")]
    pub half_open_probes: u32,
}

fn five() -> u32 {
    5
}
fn twenty() -> u32 {
    20
}
fn one() -> u32 {
    1
}
fn ten_s() -> String {
    "10s".into()
}
fn five_s() -> String {
    "5s".into()
}

/// `outlier`.
#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct OutlierConfig {
    /// Ejects an endpoint after this many failures in a row.
    pub consecutive_failures: u32,
    /// For this long.
    #[serde(default = "thirty_s")]
    pub eject_for: String,
}

fn thirty_s() -> String {
    "30s".into()
}

/// `fallback`.
#[derive(Deserialize, Debug, Clone, Default)]
#[serde(deny_unknown_fields)]
pub struct FallbackConfig {
    /// Answer with this status...
    #[serde(default)]
    pub status: Option<u16>,
    /// ...this body...
    #[serde(default)]
    pub body: String,
    /// ...and these headers.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Or send the request to this cluster.
    #[serde(default)]
    pub cluster: Option<String>,
}

/// The filter's table in `weir.toml`.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Each attempt's time to the response head.
    #[serde(default)]
    pub per_try_timeout: Option<String>,
    /// Retries.
    #[serde(default)]
    pub retry: Option<RetryConfig>,
    /// The circuit breaker per cluster.
    #[serde(default)]
    pub breaker: Option<BreakerConfig>,
    /// Outlier ejection per endpoint.
    #[serde(default)]
    pub outlier: Option<OutlierConfig>,
    /// What requests get while the breaker is open.
    #[serde(default)]
    pub fallback: Option<FallbackConfig>,
}

/// What is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RetryOn {
    Any5xx,
    GatewayError,
    ConnectFailure,
    Reset,
    Timeout,
    Statuses,
}

struct Retry {
    attempts: u32,
    on: Vec<RetryOn>,
    statuses: Vec<u16>,
    backoff: Option<(Duration, Duration)>,
    budget: Option<Budget>,
}

struct Breaker {
    consecutive: u32,
    rate: Option<f64>,
    min_requests: u32,
    window: Duration,
    open_for: Duration,
    probes: u32,
}

/// A breaker's shared state.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
struct BreakerState {
    /// 0 closed, 1 open, 2 half-open.
    s: u8,
    /// Failures in a row.
    c: u32,
    /// When it opened (ms).
    at: u64,
    /// Probes let through while half-open.
    p: u32,
    /// Window start (ms), requests and failures in it.
    ws: u64,
    wn: u32,
    wf: u32,
}

const CLOSED: u8 = 0;
const OPEN: u8 = 1;
const HALF_OPEN: u8 = 2;

/// Requests and retries of a cluster in the current budget window.
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
struct BudgetState {
    ws: u64,
    req: u32,
    ret: u32,
}

const BUDGET_WINDOW_MS: u64 = 10_000;

/// The filter.
pub struct Resilience {
    per_try_timeout: Option<Duration>,
    retry: Option<Retry>,
    breaker: Option<Breaker>,
    outlier: Option<(u32, Duration)>,
    fallback: FallbackConfig,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Reads, changes and writes a shared record with compare-and-swap; `f` returns what to
/// report. Retried on contention, from the entry the conflict hands back (no second read).
fn update<T, R>(key: &str, ttl: Duration, mut f: impl FnMut(&mut T) -> R) -> Option<R>
where
    T: Serialize + for<'de> Deserialize<'de> + Default,
{
    let mut current = state::get(key);
    for _ in 0..16 {
        let mut value: T = current
            .as_ref()
            .and_then(|e| serde_json::from_slice(&e.value).ok())
            .unwrap_or_default();
        let out = f(&mut value);
        let bytes = serde_json::to_vec(&value).ok()?;
        match state::swap(key, current.map(|e| e.version), &bytes, Some(ttl)) {
            Ok(state::Swapped::Written(_)) => return Some(out),
            Ok(state::Swapped::Conflict(now)) => current = now,
            Err(e) => {
                weir_sdk::log::warn(&format!("shared state unavailable for {key}: {e}"));
                return None;
            }
        }
    }
    None
}

/// What the request phase decided about the breaker.
#[derive(Debug, PartialEq, Eq)]
enum Admission {
    Pass,
    /// The first probe: the breaker just half-opened.
    HalfOpened,
    Probe,
    Refuse,
}

impl Resilience {
    fn breaker_key(cluster: &str) -> String {
        format!("br:{cluster}")
    }

    fn admit(&self, b: &Breaker, cluster: &str, now: u64) -> Admission {
        let key = Self::breaker_key(cluster);
        // Fast path: a closed (or absent) breaker needs no write.
        let closed = state::get(&key)
            .and_then(|e| serde_json::from_slice::<BreakerState>(&e.value).ok())
            .is_none_or(|s| s.s == CLOSED);
        if closed {
            return Admission::Pass;
        }
        let ttl = b.window.max(b.open_for) * 4;
        update::<BreakerState, _>(&key, ttl, |s| match s.s {
            OPEN if now.saturating_sub(s.at) >= b.open_for.as_millis() as u64 => {
                s.s = HALF_OPEN;
                s.p = 1;
                Admission::HalfOpened
            }
            OPEN => Admission::Refuse,
            HALF_OPEN if s.p < b.probes => {
                s.p += 1;
                Admission::Probe
            }
            HALF_OPEN => Admission::Refuse,
            _ => Admission::Pass,
        })
        .unwrap_or(Admission::Pass)
    }

    /// Records an outcome on the cluster's breaker; returns the new state name if it changed.
    fn record(&self, b: &Breaker, cluster: &str, failed: bool, now: u64) -> Option<&'static str> {
        let ttl = b.window.max(b.open_for) * 4;
        update::<BreakerState, _>(&Self::breaker_key(cluster), ttl, |s| {
            let before = s.s;
            if now.saturating_sub(s.ws) >= b.window.as_millis() as u64 {
                s.ws = now;
                s.wn = 0;
                s.wf = 0;
            }
            s.wn += 1;
            if failed {
                s.wf += 1;
                s.c += 1;
            } else {
                s.c = 0;
            }
            match (s.s, failed) {
                (HALF_OPEN, true) => {
                    s.s = OPEN;
                    s.at = now;
                    s.p = 0;
                }
                (HALF_OPEN, false) => {
                    *s = BreakerState {
                        ws: now,
                        ..BreakerState::default()
                    }
                }
                (CLOSED, true) => {
                    let by_rate = b
                        .rate
                        .is_some_and(|r| s.wn >= b.min_requests && f64::from(s.wf) / f64::from(s.wn) >= r);
                    if s.c >= b.consecutive || by_rate {
                        s.s = OPEN;
                        s.at = now;
                        s.p = 0;
                    }
                }
                _ => {}
            }
            (s.s != before).then_some(match s.s {
                OPEN => "open",
                HALF_OPEN => "half-open",
                _ => "closed",
            })
        })
        .flatten()
    }

    fn fallback(&self, cluster: &str) -> Action {
        let _ = metrics::counter_add("fallbacks", &[("cluster", cluster)], 1);
        if let Some(c) = &self.fallback.cluster {
            return match props::set_cluster(c) {
                Ok(()) => Action::Continue,
                Err(e) => {
                    weir_sdk::log::error(&format!("fallback cluster {c}: {e}"));
                    Action::Respond(Response::new(503).body("circuit open\n"))
                }
            };
        }
        let mut r = Response::new(self.fallback.status.unwrap_or(503)).header("x-weir-circuit", "open");
        for (n, v) in &self.fallback.headers {
            r = r.header(n, v);
        }
        let body = if self.fallback.body.is_empty() {
            "circuit open\n".to_string()
        } else {
            self.fallback.body.clone()
        };
        Action::Respond(r.body(body))
    }

    fn retriable(&self, r: &Retry, status: u16, reason: Option<&str>) -> bool {
        r.on.iter().any(|on| match on {
            RetryOn::Any5xx => status >= 500,
            RetryOn::GatewayError => matches!(status, 502..=504),
            RetryOn::ConnectFailure => {
                matches!(reason, Some("upstream-connect-failed" | "no-healthy-endpoint"))
            }
            RetryOn::Reset => reason == Some("upstream-failed"),
            RetryOn::Timeout => reason == Some("upstream-timeout"),
            RetryOn::Statuses => r.statuses.contains(&status),
        })
    }

    /// Counts a first attempt in the cluster's budget window.
    fn count_request(cluster: &str, now: u64) {
        update::<BudgetState, _>(
            &format!("bud:{cluster}"),
            Duration::from_millis(BUDGET_WINDOW_MS * 3),
            |b| {
                if now.saturating_sub(b.ws) >= BUDGET_WINDOW_MS {
                    *b = BudgetState {
                        ws: now,
                        ..BudgetState::default()
                    };
                }
                b.req += 1;
            },
        );
    }

    /// Takes a retry from the cluster's budget; false when spent.
    fn take_retry(budget: &Budget, cluster: &str, now: u64) -> bool {
        update::<BudgetState, _>(
            &format!("bud:{cluster}"),
            Duration::from_millis(BUDGET_WINDOW_MS * 3),
            |b| {
                if now.saturating_sub(b.ws) >= BUDGET_WINDOW_MS {
                    *b = BudgetState {
                        ws: now,
                        ..BudgetState::default()
                    };
                }
                let allowed =
                    (u64::from(b.req) * u64::from(budget.percent) / 100).max(u64::from(budget.min_retries));
                if u64::from(b.ret) < allowed {
                    b.ret += 1;
                    true
                } else {
                    false
                }
            },
        )
        .unwrap_or(false)
    }

    fn backoff(&self, r: &Retry, attempt: u32) -> Option<Duration> {
        let (base, max) = r.backoff?;
        let exp = base
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
            .min(max);
        // Full jitter: uniform in [0, exp].
        let ms = exp.as_millis() as u64;
        let jitter = u64::from(getrandom::u32().unwrap_or(0)) % (ms + 1);
        Some(Duration::from_millis(jitter))
    }

    fn outlier(&self, consecutive: u32, eject_for: Duration, upstream: &str, failed: bool) {
        let key = format!("ol:{upstream}");
        let streak = update::<u32, _>(&key, eject_for * 4, |c| {
            *c = if failed { *c + 1 } else { 0 };
            *c
        });
        if failed && streak.is_some_and(|s| s >= consecutive) {
            match props::eject_upstream(eject_for) {
                Ok(()) => {
                    let _ = metrics::counter_add("ejections", &[], 1);
                    weir_sdk::log::warn(&format!(
                        "{upstream}: {consecutive} failures in a row; ejected for {eject_for:?}"
                    ));
                    state::delete(&key);
                }
                Err(e) => weir_sdk::log::info(&format!("{upstream}: not ejected: {e}")),
            }
        }
    }
}

impl Filter for Resilience {
    type Config = Config;

    fn new(c: Config) -> Result<Self, String> {
        let per_try_timeout = c
            .per_try_timeout
            .as_deref()
            .map(|t| parse_duration("per_try_timeout", t))
            .transpose()?;
        let retry = match c.retry {
            None => None,
            Some(r) => {
                if r.attempts < 1 {
                    return Err("retry.attempts: at least 1 (the first attempt)".into());
                }
                let on = r
                    .on
                    .iter()
                    .map(|o| match o.as_str() {
                        "5xx" => Ok(RetryOn::Any5xx),
                        "gateway-error" => Ok(RetryOn::GatewayError),
                        "connect-failure" => Ok(RetryOn::ConnectFailure),
                        "reset" => Ok(RetryOn::Reset),
                        "timeout" => Ok(RetryOn::Timeout),
                        "retriable-status-codes" => Ok(RetryOn::Statuses),
                        other => Err(format!(
                            "retry.on: {other:?}: use 5xx, gateway-error, connect-failure, reset, timeout, retriable-status-codes"
                        )),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let mut on = on;
                if !r.statuses.is_empty() && !on.contains(&RetryOn::Statuses) {
                    on.push(RetryOn::Statuses);
                }
                let backoff = match &r.backoff {
                    Some(b) => Some((
                        parse_duration("retry.backoff.base", &b.base)?,
                        parse_duration("retry.backoff.max", &b.max)?,
                    )),
                    None => None,
                };
                if let Some(b) = &r.budget {
                    if b.percent > 100 {
                        return Err("retry.budget.percent: at most 100".into());
                    }
                }
                Some(Retry {
                    attempts: r.attempts,
                    on,
                    statuses: r.statuses,
                    backoff,
                    budget: r.budget,
                })
            }
        };
        let breaker = match c.breaker {
            None => None,
            Some(b) => {
                if let Some(r) = b.failure_rate {
                    if !(0.0..=1.0).contains(&r) || r == 0.0 {
                        return Err("breaker.failure_rate: between 0 and 1".into());
                    }
                }
                Some(Breaker {
                    consecutive: b.consecutive_failures.max(1),
                    rate: b.failure_rate,
                    min_requests: b.min_requests.max(1),
                    window: parse_duration("breaker.window", &b.window)?,
                    open_for: parse_duration("breaker.open_for", &b.open_for)?,
                    probes: b.half_open_probes.max(1),
                })
            }
        };
        let outlier = match c.outlier {
            None => None,
            Some(o) => Some((
                o.consecutive_failures.max(1),
                parse_duration("outlier.eject_for", &o.eject_for)?,
            )),
        };
        let fallback = c.fallback.unwrap_or_default();
        if let Some(s) = fallback.status {
            if !(200..=599).contains(&s) {
                return Err(format!("fallback.status: {s} is not a status"));
            }
        }
        Ok(Resilience {
            per_try_timeout,
            retry,
            breaker,
            outlier,
            fallback,
        })
    }

    fn on_request_headers(&self, _req: &Request) -> Action {
        let cluster = props::cluster().unwrap_or_default();
        let now = now_ms();
        if let Some(b) = &self.breaker {
            match self.admit(b, &cluster, now) {
                Admission::Pass | Admission::Probe => {}
                Admission::HalfOpened => {
                    let _ = metrics::counter_add(
                        "breaker_transitions",
                        &[("cluster", &cluster), ("to", "half-open")],
                        1,
                    );
                    weir_sdk::log::warn(&format!("circuit breaker of {cluster}: half-open"));
                }
                Admission::Refuse => return self.fallback(&cluster),
            }
        }
        if let Some(t) = self.per_try_timeout {
            let _ = props::set_timeout(t);
        }
        if self.retry.as_ref().is_some_and(|r| r.budget.is_some()) {
            Self::count_request(&cluster, now);
        }
        Action::Continue
    }

    fn on_response_headers(&self, resp: &ResponseHead) -> Action {
        let status = resp.status();
        if resp.header("x-weir-circuit").is_some() {
            // Our own fallback answer: not an upstream outcome.
            return Action::Continue;
        }
        let failed = status >= 500;
        let cluster = props::cluster().unwrap_or_default();
        let now = now_ms();
        if let Some(b) = &self.breaker {
            if let Some(to) = self.record(b, &cluster, failed, now) {
                let _ = metrics::counter_add("breaker_transitions", &[("cluster", &cluster), ("to", to)], 1);
                weir_sdk::log::warn(&format!("circuit breaker of {cluster}: {to}"));
            }
        }
        if let (Some((n, d)), Some(up)) = (self.outlier, props::upstream()) {
            self.outlier(n, d, &up, failed);
        }
        let Some(r) = &self.retry else {
            return Action::Continue;
        };
        let reason = resp
            .header("x-weir-error")
            .and_then(|v| String::from_utf8(v).ok());
        if !failed && !r.statuses.contains(&status) {
            return Action::Continue;
        }
        if !self.retriable(r, status, reason.as_deref()) {
            return Action::Continue;
        }
        let attempt: u32 = resp
            .request()
            .header_str("x-weir-attempt-count")
            .and_then(|a| a.parse().ok())
            .unwrap_or(1);
        if attempt >= r.attempts {
            return Action::Continue;
        }
        if let Some(budget) = &r.budget {
            if !Self::take_retry(budget, &cluster, now) {
                let _ = metrics::counter_add("retries_over_budget", &[("cluster", &cluster)], 1);
                return Action::Continue;
            }
        }
        if let Some(d) = self.backoff(r, attempt) {
            let _ = props::set_retry_delay(d);
        }
        let _ = metrics::counter_add("retries", &[("cluster", &cluster)], 1);
        Action::Retry
    }
}

weir_sdk::export_filter!(Resilience);

#[cfg(test)]
mod tests {
    use super::*;
    use weir_sdk::testing::{MockHost, TestFilter};

    fn filter(json: &str) -> TestFilter<Resilience> {
        TestFilter::new(json).unwrap_or_else(|e| panic!("{e}"))
    }

    fn response(status: u16, attempt: Option<u32>, reason: Option<&str>) {
        MockHost::with(|h| {
            h.status = status;
            h.response_headers = reason
                .map(|r| vec![("x-weir-error".into(), r.as_bytes().to_vec())])
                .unwrap_or_default();
            h.request_headers = attempt
                .map(|a| vec![("x-weir-attempt-count".into(), a.to_string().into_bytes())])
                .unwrap_or_default();
            h.upstream = Some("10.0.0.1:80".into());
        });
    }

    #[test]
    fn retries_what_is_configured_until_attempts_run_out() {
        MockHost::reset(|_| {});
        let f = filter(
            r#"{"retry": {"attempts": 3, "on": ["gateway-error", "reset"], "backoff": {"base": "10ms", "max": "40ms"}}}"#,
        );
        response(503, None, None);
        assert_eq!(f.on_response_headers(), Action::Retry);
        assert!(MockHost::with(|h| h.retry_delay_ms).is_some_and(|d| d <= 10));
        response(502, Some(2), Some("upstream-failed"));
        assert_eq!(f.on_response_headers(), Action::Retry);
        response(503, Some(3), None);
        assert_eq!(f.on_response_headers(), Action::Continue, "attempts spent");
        response(500, None, None);
        assert_eq!(
            f.on_response_headers(),
            Action::Continue,
            "500 is not a gateway error"
        );
        response(200, None, None);
        assert_eq!(f.on_response_headers(), Action::Continue);
    }

    #[test]
    fn the_budget_caps_retries() {
        MockHost::reset(|_| {});
        let f = filter(
            r#"{"retry": {"attempts": 5, "on": ["5xx"], "budget": {"percent": 10, "min_retries": 2}}}"#,
        );
        let mut retries = 0;
        for _ in 0..50 {
            f.on_request_headers();
            response(503, None, None);
            if f.on_response_headers() == Action::Retry {
                retries += 1;
            }
        }
        assert_eq!(retries, 5, "10 % of 50 requests");
    }

    #[test]
    fn the_breaker_opens_half_opens_and_closes() {
        MockHost::reset(|_| {});
        let f = filter(
            r#"{"breaker": {"consecutive_failures": 3, "open_for": "1s"}, "fallback": {"status": 503, "body": "later"}}"#,
        );
        for _ in 0..3 {
            assert_eq!(f.on_request_headers(), Action::Continue);
            response(503, None, None);
            f.on_response_headers();
        }
        let Action::Respond(r) = f.on_request_headers() else {
            panic!("open: fallback")
        };
        assert_eq!((r.status, r.body.as_slice()), (503, &b"later"[..]));
        // Time passes: the breaker state says it opened long ago.
        let key = Resilience::breaker_key("default");
        let mut s: BreakerState = serde_json::from_slice(&state::get(&key).unwrap().value).unwrap();
        s.at -= 2_000;
        state::set(&key, &serde_json::to_vec(&s).unwrap(), None).unwrap();
        assert_eq!(f.on_request_headers(), Action::Continue, "one probe");
        assert!(
            matches!(f.on_request_headers(), Action::Respond(_)),
            "only one probe"
        );
        response(200, None, None);
        f.on_response_headers();
        assert_eq!(f.on_request_headers(), Action::Continue, "closed again");
    }

    #[test]
    fn outliers_are_ejected_after_consecutive_failures() {
        MockHost::reset(|_| {});
        let f = filter(r#"{"outlier": {"consecutive_failures": 2, "eject_for": "30s"}}"#);
        response(502, None, None);
        f.on_response_headers();
        assert!(MockHost::with(|h| h.ejections.is_empty()));
        response(502, None, None);
        f.on_response_headers();
        assert_eq!(MockHost::with(|h| h.ejections.clone()), vec![30_000]);
    }

    #[test]
    fn config_errors_name_the_field() {
        for (json, want) in [
            (r#"{"retry": {"attempts": 2, "on": ["sometimes"]}}"#, "retry.on"),
            (r#"{"breaker": {"open_for": "soon"}}"#, "breaker.open_for"),
            (
                r#"{"retry": {"attempts": 2, "budget": {"percent": 150}}}"#,
                "retry.budget.percent",
            ),
        ] {
            let e = TestFilter::<Resilience>::new(json).err().unwrap();
            assert!(e.contains(want), "{e}");
        }
    }
}
