//! Wasm filters built from this repo's sources (`tests/fixtures/`), end to end through the
//! proxy: policy in the request path, and hostile filters cut off by their limits.

use std::time::{Duration, Instant};

use weir_tests::client::Client;
use weir_tests::proxy::{TestProxy, ADMIN};
use weir_tests::upstream::Upstream;

const POLICY: &str = env!("WEIR_FIXTURE_POLICY");
const HOSTILE: &str = env!("WEIR_FIXTURE_HOSTILE");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wasm_policy_filter_edits_denies_and_routes() {
    let stable = Upstream::http1("stable").start().await;
    let canary = Upstream::http1("canary").start().await;
    let toml = format!(
        r#"{ADMIN}
[[listeners]]
name = "web"
address = "127.0.0.1:0"
filters = [{{ name = "policy", file = "{POLICY}", config = {{ value = "yes", deny_path = "/admin" }} }}]
[[routes]]
cluster = "stable"
[clusters.stable]
endpoints = ["{}"]
[clusters.canary]
endpoints = ["{}"]
"#,
        stable.addr, canary.addr
    );
    let proxy = TestProxy::start(&toml, std::path::Path::new(".")).await;
    let mut c = Client::h1(proxy.addr("web")).await;

    let r = c.get("/headers", "x").await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["x-policy"],
        "seen",
        "a response header added by the filter"
    );
    let seen = String::from_utf8(weir_tests::collect(r.into_body()).await.unwrap().to_vec()).unwrap();
    assert!(
        seen.contains("x-filtered: yes"),
        "a request header added by the filter: {seen}"
    );

    let r = c.get("/admin", "x").await;
    assert_eq!(r.status(), 403);
    assert_eq!(
        &weir_tests::collect(r.into_body()).await.unwrap()[..],
        b"denied by policy\n"
    );
    assert_eq!(stable.hits(), 1, "a denied request never reaches the upstream");

    let req = http::Request::get("/")
        .header("host", "x")
        .header("x-route-to", "canary")
        .body(weir_tests::empty())
        .unwrap();
    let r = c.send(req).await.unwrap();
    assert_eq!(
        r.headers()["x-upstream"],
        "canary",
        "the filter chose the cluster"
    );
    let req = http::Request::get("/")
        .header("host", "x")
        .header("x-route-to", "nowhere")
        .body(weir_tests::empty())
        .unwrap();
    let r = c.send(req).await.unwrap();
    assert_eq!(
        r.status(),
        400,
        "the host refused an unknown cluster and the filter said so"
    );

    let (_, m) = proxy.admin_get("/metrics").await;
    assert!(
        m.contains(r#"weir_filter_policy_denied_total{filter="policy",reason="path"} 1"#),
        "{m}"
    );
    assert!(
        m.contains(r#"weir_filter_policy_requests_total{filter="policy"} 2"#),
        "{m}"
    );
    assert!(m.trim_end().ends_with("# EOF"), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_filters_are_cut_off_and_the_next_request_is_served() {
    let up = Upstream::http1("up").start().await;
    let modes = ["loop", "alloc", "trap", "bad-header", "huge-body"];
    let mut toml = format!(
        "{ADMIN}\n[filter_host]\ncpu_budget = \"50ms\"\nmemory_limit = 16777216\n[[routes]]\ncluster = \"c\"\n[clusters.c]\nendpoints = [\"{}\"]\n",
        up.addr
    );
    for m in modes {
        toml.push_str(&format!(
            "[[listeners]]\nname = \"{m}\"\naddress = \"127.0.0.1:0\"\nfilters = [{{ name = \"{m}\", file = \"{HOSTILE}\", config = {{ mode = \"{m}\" }} }}]\n"
        ));
    }
    toml.push_str(&format!(
        "[[listeners]]\nname = \"open\"\naddress = \"127.0.0.1:0\"\nfilters = [{{ name = \"loop-open\", file = \"{HOSTILE}\", failure_policy = \"fail-open\", config = {{ mode = \"loop\" }} }}]\n"
    ));
    let proxy = TestProxy::start(&toml, std::path::Path::new(".")).await;

    for m in modes {
        let mut c = Client::h1(proxy.addr(m)).await;
        let t = Instant::now();
        let r = c.get("/hostile", "x").await;
        assert_eq!(r.status(), 500, "{m}: fail-closed answers 500");
        assert_eq!(r.headers()["x-weir-error"], "filter-failed", "{m}");
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "{m}: cut off quickly, took {:?}",
            t.elapsed()
        );
        for _ in 0..3 {
            assert_eq!(
                c.get("/", "x").await.status(),
                200,
                "{m}: the next request is served normally"
            );
        }
    }
    let mut o = Client::h1(proxy.addr("open")).await;
    let r = o.get("/hostile", "x").await;
    assert_eq!(r.status(), 200, "fail-open goes on without the filter");

    let (_, metrics) = proxy.admin_get("/metrics").await;
    for (filter, kind) in [
        ("loop", "timeout"),
        ("alloc", "memory"),
        ("trap", "trap"),
        ("bad-header", "invalid"),
        ("huge-body", "invalid"),
        ("loop-open", "timeout"),
    ] {
        let want = format!(r#"weir_filter_errors_total{{filter="{filter}",kind="{kind}"}} 1"#);
        assert!(metrics.contains(&want), "missing {want} in:\n{metrics}");
    }
}

/// A proxy whose listener `web` runs the hostile filter in its `loop` mode (it loops on
/// `/hostile` and passes everything else), with `filter_host` settings `host` (TOML lines),
/// in front of one upstream (returned too: it lives as long as the test holds it).
async fn behind_a_looping_filter(host: &str) -> (TestProxy, weir_tests::upstream::Running) {
    let up = Upstream::http1("up").start().await;
    let toml = format!(
        r#"{ADMIN}
[filter_host]
{host}
[[listeners]]
name = "web"
address = "127.0.0.1:0"
filters = [{{ name = "loop", file = "{HOSTILE}", config = {{ mode = "loop" }} }}]
[[routes]]
cluster = "c"
[clusters.c]
endpoints = ["{}"]
"#,
        up.addr
    );
    (TestProxy::start(&toml, std::path::Path::new(".")).await, up)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_looping_filter_is_cut_off_after_the_proxy_sat_idle() {
    // The epoch clock sleeps once no Wasm has run for 100 ms; the first call after that must
    // wake it, or the loop would never be cut off.
    let (proxy, _up) = behind_a_looping_filter("cpu_budget = \"50ms\"").await;
    let mut c = Client::h1(proxy.addr("web")).await;
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let r = tokio::time::timeout(Duration::from_secs(10), c.get("/hostile", "x"))
            .await
            .expect("never cut off: the filters' clock stayed asleep");
        assert_eq!(r.status(), 500);
        assert_eq!(c.get("/", "x").await.status(), 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_looping_filter_does_not_hold_up_other_requests() {
    let (proxy, _up) = behind_a_looping_filter("cpu_budget = \"2s\"").await;
    let addr = proxy.addr("web");
    let hostile = tokio::spawn(async move { Client::h1(addr).await.get("/hostile", "x").await.status() });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut c = Client::h1(addr).await;
    assert_eq!(c.get("/", "x").await.status(), 200);
    // No time threshold (a slow machine would trip it): the other request was answered
    // while the loop still had most of its 2 s budget left.
    assert!(!hostile.is_finished(), "served while the loop runs");
    assert_eq!(hostile.await.unwrap(), 500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_leave_mid_filter_call_do_not_use_up_the_filters_instances() {
    // One instance allowed and a budget far longer than the test: only the cancelled calls
    // giving their instance back lets the last request through.
    let (proxy, _up) = behind_a_looping_filter("cpu_budget = \"60s\"\nmax_instances = 1").await;
    let addr = proxy.addr("web");
    for _ in 0..3 {
        // An h2 client gives up on a request stuck in the filter: the stream is reset and
        // the connection closed while the guest is mid-call.
        let stuck = tokio::spawn(async move { Client::h2c(addr).await.get("/hostile", "x").await.status() });
        tokio::time::sleep(Duration::from_millis(150)).await;
        stuck.abort();
        let _ = stuck.await;
        // The proxy notices the reset asynchronously: ask until the instance is free again.
        let mut status = 0;
        for _ in 0..100 {
            status = Client::h1(addr).await.get("/", "x").await.status().as_u16();
            if status == 200 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(status, 200, "the cancelled call's instance was never given back");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_never_run_more_instances_than_max_instances() {
    // Five requests at once into a filter that loops, two instances allowed: two run (one
    // from the pool, one made), the other three are refused at once, however their
    // checkouts interleave with the instantiations.
    let (proxy, _up) = behind_a_looping_filter("cpu_budget = \"60s\"\nmax_instances = 2").await;
    let addr = proxy.addr("web");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let calls: Vec<_> = (0..5)
        .map(|_| {
            let tx = tx.clone();
            tokio::spawn(async move {
                let status = Client::h1(addr).await.get("/hostile", "x").await.status();
                let _ = tx.send(status.as_u16());
            })
        })
        .collect();
    let mut refused = Vec::new();
    for _ in 0..3 {
        let status = tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .expect("three calls refused while two run")
            .unwrap();
        refused.push(status);
    }
    assert_eq!(refused, [500, 500, 500]);
    // The two running calls hold their instances: nothing else comes back.
    assert!(tokio::time::timeout(Duration::from_millis(500), rx.recv())
        .await
        .is_err());
    let (_, metrics) = proxy.admin_get("/metrics").await;
    // Counted as overload (the refused requests' log phases find no instance either).
    assert!(
        !metrics.contains(r#"weir_filter_errors_total{filter="loop",kind="overload"} 0"#),
        "{metrics}"
    );
    for c in calls {
        c.abort();
    }
}

/// Runs the real binary with JSON logs: `filter_host` (TOML lines) and a listener `web` with
/// the chain `filters` (a TOML array) in front of a test upstream. `drive` sends requests to
/// it; then the process is stopped and its `weir::filter` log lines returned.
async fn filter_log_lines<F, Fut>(filter_host: &str, filters: &str, drive: F) -> Vec<serde_json::Value>
where
    F: FnOnce(std::net::SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let up = Upstream::http1("up").start().await;
    let mut weir = crate::config_errors::WeirProcess::start(&format!(
        "[log]\nformat = \"json\"\n[admin]\nenabled = false\n[filter_host]\n{filter_host}\n\
         [[listeners]]\nname = \"web\"\naddress = \"127.0.0.1:0\"\nfilters = {filters}\n\
         [[routes]]\ncluster = \"c\"\n[clusters.c]\nendpoints = [\"{}\"]\n",
        up.addr
    ));
    let addr = weir.address(Some("web")).await;
    drive(addr).await;
    weir.terminate();
    let _ = weir.child.wait();
    std::fs::read_to_string(&weir.log)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "weir::filter")
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_log_line_lands_in_weirs_logs_tagged_with_its_name() {
    let lines = filter_log_lines(
        "",
        &format!(r#"[{{ name = "policy", file = "{POLICY}", config = {{ value = "yes", deny_path = "/admin" }} }}]"#),
        |addr| async move {
            assert_eq!(Client::h1(addr).await.get("/admin", "x").await.status(), 403);
        },
    )
    .await;
    let line = lines.first().expect("a filter log line");
    assert_eq!(line["filter"], "policy");
    assert_eq!(line["level"], "WARN");
    assert_eq!(line["message"], "denied /admin");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_logging_in_a_loop_writes_a_bounded_number_of_lines_per_call() {
    let lines = filter_log_lines(
        "cpu_budget = \"2s\"",
        &format!(r#"[{{ name = "flood", file = "{HOSTILE}", config = {{ mode = "log-flood" }} }}]"#),
        |addr| async move {
            let mut c = Client::h1(addr).await;
            // Each request's call tries 1 000 lines.
            for _ in 0..2 {
                assert_eq!(c.get("/hostile", "x").await.status(), 200);
            }
        },
    )
    .await;
    let count = |what: fn(&str) -> bool| {
        lines
            .iter()
            .filter(|v| what(v["message"].as_str().unwrap_or("")))
            .count()
    };
    let flood = count(|m| m.starts_with("flood "));
    let notes = count(|m| m.contains("lines are dropped"));
    assert_eq!(
        (flood, notes),
        (2 * 100, 2),
        "per call: 100 lines, then one saying the rest were dropped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn phases_a_filter_does_not_implement_are_not_called_again() {
    use std::sync::Arc;
    use weir::filter::{Filter, Phase};
    weir_tests::init();
    let engine = weir::filter::wasm::WasmEngine::new().unwrap();
    let load = |name: &'static str, path: &'static str, json: &'static str| {
        let engine = engine.clone();
        async move {
            let shared = Arc::new(weir::filter::host::FilterShared::new(
                name.into(),
                Default::default(),
            ));
            let limits = weir::filter::wasm::FilterLimits {
                cpu_budget: Duration::from_millis(50),
                memory: 16 << 20,
                max_instances: 4,
                files: None,
            };
            let metrics = Arc::new(weir::metrics::Metrics::new());
            engine
                .load_file(path.as_ref(), json.into(), limits, shared, metrics)
                .await
                .unwrap()
        }
    };
    // The hostile filter implements only on-request-headers.
    let f = load("hostile", HOSTILE, r#"{"mode": "trap"}"#).await;
    let head = || http::Request::get("/x").body(()).unwrap().into_parts().0;
    let mut ctx = weir::filter::RequestContext {
        route: None,
        cluster: None,
        ..weir::filter::RequestContext::new(
            "l".into(),
            "127.0.0.1:1".parse().unwrap(),
            None,
            http::HeaderValue::from_static("id"),
        )
    };
    assert!(f.wants(Phase::RequestHeaders) && f.wants(Phase::ResponseHeaders));
    let mut resp = http::Response::new(()).into_parts().0;
    f.on_response_headers(&mut head(), &mut resp, &mut ctx)
        .await
        .unwrap();
    assert!(
        !f.wants(Phase::ResponseHeaders),
        "the default phase told the host to stop calling it"
    );
    f.on_request_headers(&mut head(), &mut ctx).await.unwrap();
    assert!(
        f.wants(Phase::RequestHeaders),
        "an implemented phase keeps being called"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filters_call_on_a_pooled_connection_the_upstream_closes_goes_again() {
    use std::sync::atomic::Ordering;
    // The filter's calls (the policy fixture calls the cluster named by `x-call`) go to an
    // upstream that closes each connection as its second request arrives: every call after
    // the first meets its pooled connection closing, as the proxy's own requests do.
    let (idp, conns) = crate::failures::closes_on_second_request(crate::failures::Ending::Close).await;
    let up = Upstream::http1("up").start().await;
    let toml = format!(
        r#"{ADMIN}
[[listeners]]
name = "web"
address = "127.0.0.1:0"
filters = [{{ name = "policy", file = "{POLICY}", config = {{ value = "yes", deny_path = "/admin" }} }}]
[[routes]]
cluster = "c"
[clusters.c]
endpoints = ["{}"]
[clusters.idp]
endpoints = ["{idp}"]
"#,
        up.addr
    );
    let proxy = TestProxy::start(&toml, std::path::Path::new(".")).await;
    let mut c = Client::h1(proxy.addr("web")).await;
    for i in 0..3 {
        crate::failures::rest().await;
        let r = c.send_text("GET", "/headers", "x", &[("x-call", "idp")]).await;
        assert_eq!(r.status(), 200, "request {i}: {}", r.body());
        assert!(
            r.body().contains("x-call-status: 200"),
            "request {i}: {}",
            r.body()
        );
    }
    assert_eq!(
        conns.load(Ordering::SeqCst),
        3,
        "a new connection for each call after the first"
    );
    let (_, metrics) = proxy.admin_get("/metrics").await;
    assert!(
        metrics.contains(r#"weir_upstream_resent_requests_total{cluster="idp"} 2"#),
        "{metrics}"
    );
}
