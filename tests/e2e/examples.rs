//! The example configs in `examples/` run as shipped: the same file, with the test's
//! upstreams, freshly built filters and loopback ports substituted in.

use std::path::Path;

use weir_tests::client::Client;
use weir_tests::pki::{client_config, Pki};
use weir_tests::proxy::TestProxy;
use weir_tests::upstream::Upstream;

/// Reads an example config and points it at this test's filters, ports and upstreams.
fn example(file: &str, endpoints: &[(&str, std::net::SocketAddr)]) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(file);
    let mut toml = std::fs::read_to_string(&path).unwrap();
    let dir = toml
        .lines()
        .find_map(|l| l.strip_prefix("dir = \""))
        .and_then(|l| l.split('"').next())
        .unwrap()
        .to_string();
    toml = toml.replace(
        &format!("dir = \"{dir}\""),
        &format!("dir = \"{}\"", env!("WEIR_FILTERS_DIR")),
    );
    for (from, to) in endpoints {
        toml = toml.replace(&format!("\"{from}\""), &format!("\"{to}\""));
    }
    for port in ["8080", "9901", "15000", "15001", "15006"] {
        toml = toml.replace(&format!("\"127.0.0.1:{port}\""), "\"127.0.0.1:0\"");
    }
    toml
}

async fn send(c: &mut Client, method: &str, path: &str, headers: &[(&str, &str)]) -> http::Response<String> {
    c.send_text(method, path, "gateway.example.com", headers).await
}

/// Sends `per_client` requests on each client, all clients at once (a burst a slow machine
/// cannot stretch past the refill rate); returns how many were answered 429.
async fn burst(clients: Vec<Client>, per_client: usize, path: &str) -> usize {
    let each = clients.into_iter().map(|mut c| async move {
        let mut limited = 0;
        for _ in 0..per_client {
            let r = send(&mut c, "GET", path, &[]).await;
            if r.status() == 429 {
                assert!(r.headers().contains_key("retry-after"));
                limited += 1;
            }
        }
        limited
    });
    futures_util::future::join_all(each).await.into_iter().sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_example_routes_authenticates_limits_and_shapes() {
    let web = Upstream::http1("web").start().await;
    let canary = Upstream::http1("web-canary").start().await;
    let api = Upstream::http1("api").start().await;
    let toml = example(
        "gateway/weir.toml",
        &[
            ("127.0.0.1:9001", web.addr),
            ("127.0.0.1:9002", canary.addr),
            ("127.0.0.1:9003", api.addr),
        ],
    );
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/gateway");
    let proxy = TestProxy::start(&toml, &dir).await;
    let mut c = Client::h1(proxy.addr("public")).await;

    // Web: weighted to the canary, security and cache headers on the way out.
    let mut to_canary = 0;
    for _ in 0..60 {
        let r = send(&mut c, "GET", "/", &[]).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-frame-options"], "DENY");
        assert_eq!(r.headers()["cache-control"], "public, max-age=60");
        if r.headers()["x-upstream"] == "web-canary" {
            to_canary += 1;
        }
    }
    assert!(to_canary < 20, "about 10 % to the canary: {to_canary} of 60");
    let r = send(&mut c, "GET", "/old/page", &[]).await;
    assert_eq!(
        (r.status().as_u16(), r.headers()["location"].to_str().unwrap()),
        (301, "http://gateway.example.com/new/page")
    );

    // API: a credential is needed; a forged identity header is dropped.
    let r = send(&mut c, "GET", "/api/orders", &[]).await;
    assert_eq!(r.status(), 401);
    assert_eq!(api.hits(), 0);
    let r = send(
        &mut c,
        "GET",
        "/api/headers",
        &[("x-api-key", "demo-key-1"), ("x-user", "admin")],
    )
    .await;
    assert_eq!(r.status(), 200, "{}", r.body());
    assert_eq!(r.headers()["x-upstream"], "api");
    assert!(!r.body().contains("x-user: admin"), "{}", r.body());
    let r = send(
        &mut c,
        "OPTIONS",
        "/api/orders",
        &[
            ("origin", "https://app.example.com"),
            ("access-control-request-method", "GET"),
        ],
    )
    .await;
    assert_eq!(r.status(), 204, "CORS preflight answered at the edge");

    // The per-client rate limit: a burst of 100, then 429.
    let mut clients = vec![c];
    for _ in 0..9 {
        clients.push(Client::h1(proxy.addr("public")).await);
    }
    let limited = burst(clients, 20, "/").await;
    assert!(limited > 0, "the burst ran out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecar_example_authorizes_peers_and_makes_outbound_calls_resilient() {
    // The mesh: a CA, this workload ("orders"), its callers, and the services it calls.
    let pki = Pki::new("mesh");
    let id = |sa: &str| format!("spiffe://cluster.local/ns/{sa}");
    let _orders = pki.issue(
        "orders",
        "orders",
        &["orders.mesh.internal"],
        Some(&id("shop/sa/orders")),
    );
    let frontend = pki.issue(
        "frontend",
        "frontend",
        &["frontend.mesh.internal"],
        Some(&id("web/sa/frontend")),
    );
    let billing = pki.issue(
        "billing",
        "billing",
        &["billing.mesh.internal"],
        Some(&id("billing/sa/invoicer")),
    );
    let batch = pki.issue(
        "batch",
        "batch",
        &["batch.mesh.internal"],
        Some(&id("batch/sa/reports")),
    );
    let payments_cert = pki.issue("payments", "payments", &["payments.mesh.internal"], None);
    let inventory_cert = pki.issue("inventory", "inventory", &["inventory.mesh.internal"], None);

    let app = Upstream::http1("orders-app").start().await;
    let payments = Upstream::http2("payments")
        .tls(payments_cert)
        .require_client_cert(&pki.ca)
        .start()
        .await;
    let inventory_ok = Upstream::http1("inventory")
        .tls(inventory_cert.clone())
        .require_client_cert(&pki.ca)
        .start()
        .await;
    let inventory_bad = Upstream::http1("inventory-bad")
        .tls(inventory_cert)
        .require_client_cert(&pki.ca)
        .status(503)
        .start()
        .await;
    let mut toml = example(
        "sidecar/weir.toml",
        &[
            ("127.0.0.1:8081", app.addr),
            ("127.0.0.1:9101", payments.addr),
            ("127.0.0.1:9102", inventory_bad.addr),
            ("127.0.0.1:9103", inventory_ok.addr),
        ],
    );
    toml = toml.replace("\"certs/", &format!("\"{}/", pki.dir().display()));
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/sidecar");
    let proxy = TestProxy::start(&toml, &dir).await;

    // Inbound: callers are told apart by their SPIFFE IDs.
    let inbound = proxy.addr("inbound");
    let connect = |leaf: &weir_tests::pki::Leaf| {
        let cfg = client_config(&pki.ca, &[b"h2", b"http/1.1"], Some(leaf));
        async move { Client::tls(inbound, "orders.mesh.internal", cfg).await.unwrap() }
    };
    let mut c = connect(&frontend).await;
    let r = send(&mut c, "GET", "/api/orders", &[]).await;
    assert_eq!(r.status(), 200, "{}", r.body());
    assert_eq!(r.headers()["x-upstream"], "orders-app");
    let r = send(&mut c, "GET", "/headers", &[]).await;
    assert_eq!(r.status(), 403, "the frontend may only read orders");
    let r = send(&mut c, "POST", "/api/orders/17", &[]).await;
    assert_eq!(r.status(), 403);
    let mut c = connect(&billing).await;
    assert_eq!(send(&mut c, "POST", "/api/orders/17", &[]).await.status(), 200);
    let mut c = connect(&batch).await;
    assert_eq!(
        send(&mut c, "GET", "/api/orders", &[]).await.status(),
        403,
        "denied by default"
    );
    assert_eq!(app.hits(), 2);

    // Per-caller rate limit: the frontend's burst runs out; billing's bucket is its own.
    let mut clients = Vec::new();
    for _ in 0..10 {
        clients.push(connect(&frontend).await);
    }
    let limited = burst(clients, 15, "/api/orders").await;
    assert!(limited > 0, "a burst of 20 at 100/s cannot serve 150 at once");
    let mut c = connect(&billing).await;
    assert_eq!(send(&mut c, "GET", "/api/orders/17", &[]).await.status(), 200);

    // Outbound: by Host to the mesh services, over mTLS with the sidecar's certificate; the
    // failing inventory endpoint is retried around and then ejected.
    let mut c = Client::h1(proxy.addr("outbound")).await;
    let b = http::Request::builder()
        .uri("/api/charge")
        .header("host", "payments.mesh.internal");
    // Each body read to its end: one dropped unread leaves hyper's client unable to reuse the
    // connection, and the next request fails with `ChannelClosed` (when the body had not all
    // come with the head).
    let (parts, body) = c
        .send(b.body(weir_tests::empty()).unwrap())
        .await
        .unwrap()
        .into_parts();
    weir_tests::collect(body).await.unwrap();
    assert_eq!(parts.status, 200);
    assert_eq!(parts.headers["x-upstream"], "payments");
    for i in 0..20 {
        let req = http::Request::builder()
            .uri("/api/stock")
            .header("host", "inventory.mesh.internal")
            .body(weir_tests::empty())
            .unwrap();
        let (parts, body) = c.send(req).await.unwrap().into_parts();
        weir_tests::collect(body).await.unwrap();
        assert_eq!(parts.status, 200, "request {i}: retried on the healthy endpoint");
        assert_eq!(parts.headers["x-upstream"], "inventory");
    }
    assert!(
        inventory_bad.hits() <= 3,
        "ejected after 3 failures: {} hits",
        inventory_bad.hits()
    );
    let req = http::Request::builder()
        .uri("/")
        .header("host", "unknown.mesh.internal")
        .body(weir_tests::empty())
        .unwrap();
    assert_eq!(
        c.send(req).await.unwrap().status(),
        404,
        "no route for an unknown service"
    );
}
