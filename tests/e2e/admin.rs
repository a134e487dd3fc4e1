//! The admin API: liveness, readiness, Prometheus metrics, the effective config, clusters.

use weir_tests::client::Client;
use weir_tests::proxy::{TestProxy, ADMIN};
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clusters_shows_each_endpoints_health_load_and_pool() {
    // What an operator asks when traffic goes wrong: which endpoints are out, why, for how
    // long; Envoy's `/clusters`.
    let up = Upstream::http1("up").start().await;
    let dead = std::net::SocketAddr::from(([127, 0, 0, 1], weir_tests::unused_port()));
    let toml = format!(
        r#"{ADMIN}
[[listeners]]
name = "web"
address = "127.0.0.1:0"
[[routes]]
cluster = "c"
[clusters.c]
endpoints = ["{}", "{dead}"]
balance = "round-robin"
ejection_backoff = "30s"
"#,
        up.addr
    );
    let proxy = TestProxy::start(&toml, std::path::Path::new(".")).await;
    let mut c = Client::h1(proxy.addr("web")).await;
    for _ in 0..4 {
        let r = c.get("/", "x").await;
        assert_eq!(r.status(), 200);
        weir_tests::collect(r.into_body()).await.unwrap();
    }
    let (status, body) = proxy.admin_get("/clusters").await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let cluster = &v["clusters"][0];
    assert_eq!(cluster["name"], "c", "{body}");
    assert_eq!(cluster["balance"], "round-robin", "{body}");
    let eps = cluster["endpoints"].as_array().unwrap();
    let find = |a: std::net::SocketAddr| {
        eps.iter()
            .find(|e| e["address"] == a.to_string())
            .unwrap_or_else(|| panic!("{a} in {body}"))
    };
    let live = find(up.addr);
    assert_eq!(live["available"], true, "{body}");
    assert_eq!(live["connect_failures"], 0, "{body}");
    assert_eq!(live["idle_connections"], 1, "{body}");
    assert_eq!(live["in_flight"], 0, "{body}");
    let gone = find(dead);
    assert_eq!(gone["available"], false, "{body}");
    assert_eq!(gone["connect_failures"], 1, "{body}");
    let left = gone["connect_ejection_ms"].as_u64().unwrap();
    assert!(left > 20_000 && left <= 30_000, "{body}");
    assert_eq!(gone["outlier_ejection_ms"], 0, "{body}");
}
