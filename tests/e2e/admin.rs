//! The admin API: liveness, readiness, Prometheus metrics and the effective config.

use weir_tests::client::Client;
use weir_tests::proxy::TestProxy;
use weir_tests::upstream::Upstream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints() {
    let up = Upstream::http1("up").start().await;
    let toml = format!(
        r#"
[admin]
address = "127.0.0.1:0"
[[listeners]]
name = "web"
address = "127.0.0.1:0"
[[routes]]
name = "api"
path_prefix = "/api"
cluster = "c"
[clusters.c]
endpoints = ["{}"]
"#,
        up.addr
    );
    let proxy = TestProxy::start(&toml, std::path::Path::new(".")).await;
    assert_eq!(proxy.admin_get("/live").await, (200, "live\n".into()));
    assert_eq!(proxy.admin_get("/ready").await, (200, "ready\n".into()));
    assert_eq!(proxy.admin_get("/nope").await.0, 404);

    let mut c = Client::h1(proxy.addr("web")).await;
    for _ in 0..3 {
        assert_eq!(c.get("/api/x", "x").await.status(), 200);
    }
    assert_eq!(c.get("/other", "x").await.status(), 404);

    let (status, m) = proxy.admin_get("/metrics").await;
    assert_eq!(status, 200);
    for want in [
        r#"weir_http_requests_total{listener="web",route="api",cluster="c",status_class="2xx"} 3"#,
        r#"weir_http_requests_total{listener="web",route="",cluster="",status_class="4xx"} 1"#,
        r#"weir_http_request_duration_seconds_count{listener="web",route="api",cluster="c"} 3"#,
        r#"weir_listener_active_connections{listener="web"} 1"#,
        r#"weir_listener_connections_total{listener="web"} 1"#,
        "# EOF",
    ] {
        assert!(m.contains(want), "missing {want} in:\n{m}");
    }

    let (status, cfg) = proxy.admin_get("/config").await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    assert_eq!(v["routes"][0]["name"], "api");
    assert_eq!(v["clusters"]["c"]["request_timeout"], "15s");
    assert_eq!(v["listeners"][0]["limits"]["max_headers"], 100);
}
