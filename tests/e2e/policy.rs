//! The policy library (`filters/`), built for wasm32-wasip2 from this repo and run end to end
//! through the proxy against real upstreams: routing in the Gateway API vocabulary (every
//! match kind, canary weights, rewrite, redirect, mirror, header modifiers), rate limits under
//! concurrency, CORS and static headers.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use weir_tests::client::Client;
use weir_tests::proxy::{TestProxy, ADMIN};
use weir_tests::upstream::{Running, Upstream};

const ROUTER: &str = env!("WEIR_FILTER_ROUTER");
const RATELIMIT: &str = env!("WEIR_FILTER_RATELIMIT");
const CORS: &str = env!("WEIR_FILTER_CORS");
const HEADERS: &str = env!("WEIR_FILTER_HEADERS");

/// A listener `web` with `filters`, routing by default to cluster `a`, with one cluster per
/// upstream named by its position (`a`, `b`, ...).
fn config(filters: &str, upstreams: &[&Running]) -> String {
    let mut s = format!(
        "{ADMIN}\n[[listeners]]\nname = \"web\"\naddress = \"127.0.0.1:0\"\nfilters = [{filters}]\n\
         [[routes]]\ncluster = \"a\"\n"
    );
    for (i, u) in upstreams.iter().enumerate() {
        s.push_str(&format!(
            "[clusters.{}]\nendpoints = [\"{}\"]\n",
            (b'a' + i as u8) as char,
            u.addr
        ));
    }
    s
}

async fn get(c: &mut Client, path: &str, headers: &[(&str, &str)], method: &str) -> http::Response<String> {
    c.send_text(method, path, "example.com", headers).await
}

fn upstream_of(r: &http::Response<String>) -> &str {
    r.headers().get("x-upstream").map_or("-", |v| v.to_str().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_router_matches_every_kind_by_gateway_api_precedence() {
    let names = ["a", "b", "c", "d", "e", "f", "g"];
    let mut ups = Vec::new();
    for n in names {
        ups.push(Upstream::http1(n).start().await);
    }
    let rules = r#"rules = [
        { matches = [{ path = { type = "PathPrefix", value = "/" } }], backendRefs = [{ name = "a" }] },
        { matches = [{ path = { type = "PathPrefix", value = "/api" } }], backendRefs = [{ name = "b" }] },
        { matches = [{ path = { type = "PathPrefix", value = "/api" }, method = "POST" }], backendRefs = [{ name = "c" }] },
        { matches = [{ path = { type = "PathPrefix", value = "/api" }, headers = [{ name = "x-tier", value = "gold" }] }], backendRefs = [{ name = "d" }] },
        { matches = [{ path = { type = "Exact", value = "/api/exact" } }], backendRefs = [{ name = "e" }] },
        { matches = [{ path = { type = "RegularExpression", value = "/api/[0-9]+" } }], backendRefs = [{ name = "f" }] },
        { matches = [{ queryParams = [{ name = "beta", value = "1" }] }, { headers = [{ type = "RegularExpression", name = "user-agent", value = ".*Mobile.*" }] }], backendRefs = [{ name = "g" }] },
    ]"#;
    let filters = format!("{{ name = \"router\", file = \"{ROUTER}\", config = {{ {rules} }} }}");
    let refs: Vec<&Running> = ups.iter().collect();
    let proxy = TestProxy::start(&config(&filters, &refs), std::path::Path::new(".")).await;
    let mut c = Client::h1(proxy.addr("web")).await;
    for (method, path, headers, want) in [
        ("GET", "/x", vec![], "a"),
        ("GET", "/apix", vec![], "a"),
        ("GET", "/api/x", vec![], "b"),
        ("POST", "/api/x", vec![], "c"),
        ("GET", "/api/x", vec![("x-tier", "gold")], "d"),
        ("GET", "/api/exact", vec![], "e"),
        ("GET", "/api/123", vec![], "f"),
        ("GET", "/x?beta=1", vec![], "g"),
        ("GET", "/x", vec![("user-agent", "Foo Mobile Safari")], "g"),
    ] {
        let r = get(&mut c, path, &headers, method).await;
        assert_eq!(r.status(), 200, "{method} {path}");
        assert_eq!(upstream_of(&r), want, "{method} {path} {headers:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_split_holds_its_weights_over_2000_requests() {
    let stable = Upstream::http1("stable").start().await;
    let canary = Upstream::http1("canary").start().await;
    let filters = format!(
        "{{ name = \"router\", file = \"{ROUTER}\", config = {{ rules = [{{ backendRefs = [{{ name = \"a\", weight = 80 }}, {{ name = \"b\", weight = 20 }}] }}] }} }}"
    );
    let proxy = TestProxy::start(&config(&filters, &[&stable, &canary]), std::path::Path::new(".")).await;
    let mut c = Client::h2c(proxy.addr("web")).await;
    let mut to_canary = 0;
    for _ in 0..2000 {
        let r = get(&mut c, "/", &[], "GET").await;
        assert_eq!(r.status(), 200);
        if upstream_of(&r) == "canary" {
            to_canary += 1;
        }
    }
    let share = to_canary as f64 / 2000.0;
    assert!(
        (0.15..=0.25).contains(&share),
        "canary share {share} (weight 20 %)"
    );
    assert_eq!(stable.hits() + canary.hits(), 2000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrite_redirect_mirror_and_header_modifiers_reach_the_upstreams() {
    let app = Upstream::http1("app").start().await;
    let shadow = Upstream::http1("shadow").start().await;
    // TOML inline tables stay on one line; the rules array may span lines.
    let rules = [
        r#"{ matches = [{ path = { type = "PathPrefix", value = "/svc" } }], backendRefs = [{ name = "a" }], filters = ["#,
        r#"{ type = "URLRewrite", urlRewrite = { hostname = "internal.test", path = { type = "ReplacePrefixMatch", replacePrefixMatch = "/" } } },"#,
        r#"{ type = "RequestHeaderModifier", requestHeaderModifier = { set = [{ name = "x-env", value = "prod" }], remove = ["x-debug"] } },"#,
        r#"{ type = "ResponseHeaderModifier", responseHeaderModifier = { add = [{ name = "x-served-by", value = "weir" }] } },"#,
        r#"{ type = "RequestMirror", requestMirror = { backendRef = { name = "b" } } } ] },"#,
        r#"{ matches = [{ path = { type = "PathPrefix", value = "/old" } }], filters = [{ type = "RequestRedirect", requestRedirect = { scheme = "https", hostname = "new.example.com", path = { type = "ReplacePrefixMatch", replacePrefixMatch = "/new" }, statusCode = 301 } }] }"#,
    ]
    .concat();
    let rules = format!("rules = [{rules}]");
    let filters = format!("{{ name = \"router\", file = \"{ROUTER}\", config = {{ {rules} }} }}");
    let proxy = TestProxy::start(&config(&filters, &[&app, &shadow]), std::path::Path::new(".")).await;
    let mut c = Client::h1(proxy.addr("web")).await;

    let r = get(&mut c, "/svc/headers", &[("x-debug", "1")], "GET").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-served-by"], "weir", "response header modifier");
    let seen = r.body();
    assert!(seen.starts_with("GET /headers"), "the path was rewritten: {seen}");
    assert!(
        seen.contains("host: internal.test"),
        "the host was rewritten: {seen}"
    );
    assert!(
        seen.contains("x-env: prod") && !seen.contains("x-debug"),
        "request header modifier: {seen}"
    );
    let start = Instant::now();
    while shadow.hits() < 1 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the mirror never reached the shadow"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        app.hits(),
        1,
        "the mirror is a copy; the request went to its backend once"
    );

    let hits = app.hits();
    let r = get(&mut c, "/old/page?x=1", &[], "GET").await;
    assert_eq!(r.status(), 301);
    assert_eq!(r.headers()["location"], "https://new.example.com/new/page?x=1");
    assert_eq!(app.hits(), hits, "a redirect never reaches an upstream");

    let r = get(&mut c, "/nothing-matches", &[], "GET").await;
    assert_eq!(r.status(), 404, "no rule: 404, as the Gateway API says");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limit_holds_under_concurrency() {
    let up = Upstream::http1("up").start().await;
    let (rate, burst) = (100.0, 50.0);
    let filters = format!(
        "{{ name = \"ratelimit\", file = \"{RATELIMIT}\", config = {{ requests = 100, per = \"1s\", burst = 50, key = \"global\" }} }}"
    );
    let proxy = TestProxy::start(&config(&filters, &[&up]), std::path::Path::new(".")).await;
    let addr = proxy.addr("web");
    let (ok, limited) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let start = Instant::now();
    let run_for = Duration::from_secs(3);
    // Tokens accrue from the first request on, not from while the clients connect: the
    // window the limit is checked over starts at the first request sent.
    let first_sent: Arc<std::sync::Mutex<Option<Instant>>> = Arc::default();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let (ok, limited, first_sent) = (ok.clone(), limited.clone(), first_sent.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = if i % 2 == 0 {
                Client::h1(addr).await
            } else {
                Client::h2c(addr).await
            };
            first_sent.lock().unwrap().get_or_insert_with(Instant::now);
            while start.elapsed() < run_for {
                let r = get(&mut c, "/", &[], "GET").await;
                match r.status().as_u16() {
                    200 => ok.fetch_add(1, Ordering::Relaxed),
                    429 => {
                        assert!(r.headers().contains_key("retry-after"));
                        assert_eq!(r.headers()["ratelimit-remaining"], "0");
                        limited.fetch_add(1, Ordering::Relaxed)
                    }
                    s => panic!("unexpected status {s}"),
                };
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = first_sent
        .lock()
        .unwrap()
        .expect("a request was sent")
        .elapsed()
        .as_secs_f64();
    let (ok, limited) = (ok.load(Ordering::Relaxed) as f64, limited.load(Ordering::Relaxed));
    let expected = burst + rate * elapsed;
    println!(
        "rate limit: {ok} allowed of {} in {elapsed:.2} s; the limit allows {expected:.0}",
        ok as usize + limited
    );
    assert!(limited > 100, "the load exceeded the limit: {limited} limited");
    assert!(
        (ok - expected).abs() <= expected * 0.05,
        "allowed {ok}, limit {expected:.0} ± 5 %"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_and_static_headers() {
    let up = Upstream::http1("up").start().await;
    let filters = format!(
        "{{ name = \"cors\", file = \"{CORS}\", config = {{ allow_origins = [\"https://app.example.com\"], allow_methods = [\"GET\", \"PUT\"], allow_headers = [\"content-type\"], max_age = 600 }} }}, \
         {{ name = \"headers\", file = \"{HEADERS}\", config = {{ request = {{ set = {{ \"x-env\" = \"prod\" }}, remove = [\"x-internal\"] }}, response = {{ set = {{ \"x-frame-options\" = \"DENY\" }} }} }} }}"
    );
    let proxy = TestProxy::start(&config(&filters, &[&up]), std::path::Path::new(".")).await;
    let mut c = Client::h1(proxy.addr("web")).await;

    let pre = [
        ("origin", "https://app.example.com"),
        ("access-control-request-method", "PUT"),
        ("access-control-request-headers", "content-type"),
    ];
    let r = get(&mut c, "/headers", &pre, "OPTIONS").await;
    assert_eq!(r.status(), 204);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    assert_eq!(r.headers()["access-control-max-age"], "600");
    assert_eq!(up.hits(), 0, "a preflight is answered by the filter");
    let evil = [
        ("origin", "https://evil.example"),
        ("access-control-request-method", "GET"),
    ];
    assert_eq!(get(&mut c, "/headers", &evil, "OPTIONS").await.status(), 403);

    let r = get(
        &mut c,
        "/headers",
        &[("origin", "https://app.example.com"), ("x-internal", "1")],
        "GET",
    )
    .await;
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    assert_eq!(r.headers()["x-frame-options"], "DENY");
    assert!(
        r.body().contains("x-env: prod") && !r.body().contains("x-internal"),
        "{}",
        r.body()
    );
    let r = get(&mut c, "/", &[("origin", "https://evil.example")], "GET").await;
    assert!(!r.headers().contains_key("access-control-allow-origin"));
}
