//! The `resilience` filter end to end: retries that hide a failing endpoint, a retry budget
//! that caps amplification when everything fails, per-try timeouts, a circuit breaker that
//! opens, serves the fallback, half-opens and closes, and outlier ejection moving traffic.

use std::time::{Duration, Instant};

use weir_tests::client::Client;
use weir_tests::proxy::{TestProxy, ADMIN};
use weir_tests::upstream::{Running, Upstream};

const RESILIENCE: &str = env!("WEIR_FILTER_RESILIENCE");

/// Listener `web` with the resilience filter configured by `config`, routing to cluster `c`
/// over `endpoints`.
fn proxy_config(config: &str, endpoints: &[&Running]) -> String {
    let eps: Vec<String> = endpoints.iter().map(|u| format!("\"{}\"", u.addr)).collect();
    format!(
        "{ADMIN}\n[[listeners]]\nname = \"web\"\naddress = \"127.0.0.1:0\"\n\
         filters = [{{ name = \"resilience\", file = \"{RESILIENCE}\", config = {{ {config} }} }}]\n\
         [[routes]]\ncluster = \"c\"\n[clusters.c]\nendpoints = [{}]\nbalance = \"round-robin\"\n",
        eps.join(", ")
    )
}

async fn status_and_body(c: &mut Client) -> (u16, String) {
    let r = c.get("/", "x").await;
    let s = r.status().as_u16();
    (
        s,
        String::from_utf8_lossy(&weir_tests::collect(r.into_body()).await.unwrap()).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_recover_from_an_endpoint_that_fails_half_the_time() {
    let bad = Upstream::http1("bad").status(503).start().await;
    let good = Upstream::http1("good").start().await;
    let cfg = proxy_config(
        r#"retry = { attempts = 3, on = ["gateway-error"], backoff = { base = "1ms", max = "5ms" } }"#,
        &[&bad, &good],
    );
    let proxy = TestProxy::start(&cfg, std::path::Path::new(".")).await;
    let mut c = Client::h1(proxy.addr("web")).await;
    for i in 0..100 {
        assert_eq!(status_and_body(&mut c).await.0, 200, "request {i}");
    }
    assert!(
        bad.hits() >= 30,
        "half the first attempts met the failing endpoint: {}",
        bad.hits()
    );
    assert_eq!(good.hits(), 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_budget_caps_amplification_when_everything_fails() {
    let a = Upstream::http1("a").status(503).start().await;
    let b = Upstream::http1("b").status(503).start().await;
    let cfg = proxy_config(
        r#"retry = { attempts = 5, on = ["5xx"], budget = { percent = 20, min_retries = 3 } }"#,
        &[&a, &b],
    );
    let proxy = TestProxy::start(&cfg, std::path::Path::new(".")).await;
    let mut c = Client::h1(proxy.addr("web")).await;
    for _ in 0..100 {
        assert_eq!(status_and_body(&mut c).await.0, 503);
    }
    let sent = a.hits() + b.hits();
    // Without a budget 5 attempts each would be 500; the budget allows 20 % (+ 3).
    assert!(
        (100..=123).contains(&sent),
        "{sent} upstream requests for 100 client requests"
    );
    let (_, m) = proxy.admin_get("/metrics").await;
    assert!(
        m.contains("weir_filter_resilience_retries_over_budget_total"),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_endpoint_is_retried_after_the_per_try_timeout() {
    let slow = Upstream::http1("slow")
        .delay(Duration::from_secs(3))
        .start()
        .await;
    let fast = Upstream::http1("fast").start().await;
    let cfg = proxy_config(
        r#"per_try_timeout = "200ms", retry = { attempts = 2, on = ["timeout"] }"#,
        &[&slow, &fast],
    );
    let proxy = TestProxy::start(&cfg, std::path::Path::new(".")).await;
    let mut c = Client::h1(proxy.addr("web")).await;
    for _ in 0..4 {
        let t = Instant::now();
        let r = c.get("/", "x").await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-upstream"], "fast");
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "the slow attempt was cut at 200 ms"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_breaker_opens_serves_the_fallback_half_opens_and_closes() {
    let failing = Upstream::http1("failing").status(503).start().await;
    let cfg = proxy_config(
        r#"breaker = { consecutive_failures = 5, open_for = "2s" }, fallback = { status = 503, body = "fallback: try later", headers = { "retry-after" = "1" } }"#,
        &[&failing],
    );
    let proxy = TestProxy::start(&cfg, std::path::Path::new(".")).await;
    let mut c = Client::h1(proxy.addr("web")).await;
    for _ in 0..5 {
        assert_eq!(status_and_body(&mut c).await, (503, "ok".into()));
    }
    assert_eq!(failing.hits(), 5);
    for _ in 0..10 {
        let r = c.get("/", "x").await;
        assert_eq!(r.headers()["retry-after"], "1");
        let body = String::from_utf8_lossy(&weir_tests::collect(r.into_body()).await.unwrap()).into_owned();
        assert_eq!(body, "fallback: try later", "open: the fallback answers");
    }
    assert_eq!(failing.hits(), 5, "nothing reaches the upstream while open");

    // The upstream recovers; after open_for one probe goes through. (2 s open: ten fallback
    // answers fit in it even on a slow machine.)
    failing.set_status(0);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(
        status_and_body(&mut c).await,
        (200, "ok".into()),
        "the half-open probe"
    );
    for _ in 0..10 {
        assert_eq!(status_and_body(&mut c).await.0, 200, "closed again");
    }
    assert_eq!(failing.hits(), 16);
    let (_, m) = proxy.admin_get("/metrics").await;
    for to in ["open", "half-open", "closed"] {
        let line = format!("weir_filter_resilience_breaker_transitions_total{{filter=\"resilience\",cluster=\"c\",to=\"{to}\"}} 1");
        assert!(m.contains(&line), "{line}\n{m}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outlier_ejection_takes_a_failing_endpoint_out() {
    let bad = Upstream::http1("bad").status(502).start().await;
    let good = Upstream::http1("good").start().await;
    let cfg = proxy_config(
        r#"outlier = { consecutive_failures = 2, eject_for = "30s" }"#,
        &[&bad, &good],
    );
    let proxy = TestProxy::start(&cfg, std::path::Path::new(".")).await;
    let mut c = Client::h1(proxy.addr("web")).await;
    for _ in 0..6 {
        let _ = status_and_body(&mut c).await;
    }
    let bad_hits = bad.hits();
    assert_eq!(bad_hits, 2, "ejected after its second failure in a row");
    for _ in 0..20 {
        assert_eq!(
            status_and_body(&mut c).await.0,
            200,
            "only the good endpoint serves now"
        );
    }
    assert_eq!(bad.hits(), bad_hits);
}
