//! Failures: upstream down gives 502 then 503 while ejected; slower than the timeout gives
//! 504; an endpoint that comes back gets traffic again.

use std::time::Duration;

use weir_tests::client::Client;
use weir_tests::proxy::{TestProxy, ADMIN};
use weir_tests::upstream::Upstream;

/// A loopback address nothing listens on (yet).
fn free_addr() -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], weir_tests::unused_port()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn down_then_back() {
    let addr = free_addr(); // nothing listens there now
    let toml = format!(
        r#"{ADMIN}
[[listeners]]
name = "web"
address = "127.0.0.1:0"
[[routes]]
cluster = "c"
[clusters.c]
endpoints = ["{addr}"]
ejection_backoff = "1s"
ejection_backoff_max = "1s"
connect_timeout = "500ms"
"#
    );
    let proxy = TestProxy::start(&toml, std::path::Path::new(".")).await;
    let mut c = Client::h1(proxy.addr("web")).await;

    let r = c.get("/", "x").await;
    assert_eq!(r.status(), 502, "connect refused");
    assert_eq!(r.headers()["x-weir-error"], "upstream-connect-failed");
    assert_eq!(r.headers()["content-type"], "text/plain; charset=utf-8");
    let r = c.get("/", "x").await;
    assert_eq!(r.status(), 503, "the endpoint is ejected");
    assert_eq!(r.headers()["x-weir-error"], "no-healthy-endpoint");

    let up = Upstream::http1("back").at(addr).start().await;
    // Ejected for the back-off (no request reaches the endpoint), then tried again.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r = c.get("/", "x").await;
        if r.status() == 200 {
            break;
        }
        assert_eq!(r.status(), 503, "ejected until the back-off ends");
        assert!(
            std::time::Instant::now() < deadline,
            "traffic resumes after the back-off"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(up.hits(), 1, "nothing reached the endpoint while it was ejected");
    for _ in 0..5 {
        assert_eq!(c.get("/", "x").await.status(), 200);
    }
    let (_, metrics) = proxy.admin_get("/metrics").await;
    assert!(
        metrics.contains(r#"weir_upstream_connect_errors_total{cluster="c"} 1"#),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_failures_fall_over_to_a_live_endpoint() {
    let dead = free_addr();
    let up = Upstream::http1("alive").start().await;
    let toml = format!(
        r#"{ADMIN}
[[listeners]]
name = "web"
address = "127.0.0.1:0"
[[routes]]
cluster = "c"
[clusters.c]
endpoints = ["{dead}", "{}"]
balance = "round-robin"
"#,
        up.addr
    );
    let proxy = TestProxy::start(&toml, std::path::Path::new(".")).await;
    let mut c = Client::h1(proxy.addr("web")).await;
    for _ in 0..10 {
        assert_eq!(
            c.get("/", "x").await.status(),
            200,
            "a refused connection is tried elsewhere"
        );
    }
    assert_eq!(up.hits(), 10);
}

/// A proxy to `up` whose requests under `prefix` time out after 200 ms, the others after 5 s.
async fn with_route_timeout(up: std::net::SocketAddr, prefix: &str) -> TestProxy {
    let toml = format!(
        r#"{ADMIN}
[[listeners]]
name = "web"
address = "127.0.0.1:0"
[[routes]]
path_prefix = "{prefix}"
cluster = "c"
timeout = "200ms"
[[routes]]
cluster = "c"
[clusters.c]
endpoints = ["{up}"]
request_timeout = "5s"
"#
    );
    TestProxy::start(&toml, std::path::Path::new(".")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_upstream_times_out_with_504() {
    let up = Upstream::http1("slow").start().await;
    let proxy = with_route_timeout(up.addr, "/delay").await;
    let mut c = Client::h1(proxy.addr("web")).await;
    let t = std::time::Instant::now();
    let r = c.get("/delay/2000", "x").await;
    assert_eq!(r.status(), 504);
    assert_eq!(r.headers()["x-weir-error"], "upstream-timeout");
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "the route timeout applies: {:?}",
        t.elapsed()
    );
    // The same connection keeps working.
    assert_eq!(c.get("/", "x").await.status(), 200);
}

/// The requests of one keep-alive connection share its request timer: each still times out at
/// its own deadline, whether the one before had a longer or a shorter timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_request_on_a_connection_times_out_at_its_own_deadline() {
    let up = Upstream::http1("slow").start().await;
    let proxy = with_route_timeout(up.addr, "/delay/2000").await;
    let mut c = Client::h1(proxy.addr("web")).await;
    for round in 0..3 {
        // A short deadline, after a long one (from the second round on).
        let t = std::time::Instant::now();
        let r = c.get("/delay/2000", "x").await;
        assert_eq!(r.status(), 504, "round {round}");
        assert!(
            t.elapsed() < Duration::from_millis(1500),
            "round {round}: the 200 ms timeout applies: {:?}",
            t.elapsed()
        );
        // A long deadline after a short one that has passed: not cut at the old one.
        let r = c.get("/delay/600", "x").await;
        assert_eq!(r.status(), 200, "round {round}: the 5 s timeout applies");
        assert_eq!(c.get("/", "x").await.status(), 200, "round {round}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_pooled_and_evicted_when_idle() {
    let up = Upstream::http1("pooled").start().await;
    let up2 = Upstream::http2("mux").start().await;
    let toml = format!(
        r#"{ADMIN}
[[listeners]]
name = "web"
address = "127.0.0.1:0"
[[routes]]
path_prefix = "/h2"
cluster = "h2"
[[routes]]
cluster = "c"
[clusters.c]
endpoints = ["{}"]
idle_timeout = "1s"
[clusters.h2]
endpoints = ["{}"]
protocol = "http2"
"#,
        up.addr, up2.addr
    );
    let proxy = TestProxy::start(&toml, std::path::Path::new(".")).await;
    let mut c = Client::h1(proxy.addr("web")).await;
    for _ in 0..20 {
        let r = c.get("/", "x").await;
        assert_eq!(r.status(), 200);
        weir_tests::collect(r.into_body()).await.unwrap();
    }
    assert_eq!(up.hits(), 20);
    assert_eq!(up.conns(), 1, "sequential requests reuse one upstream connection");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(c.get("/", "x").await.status(), 200);
    assert_eq!(
        up.conns(),
        2,
        "the idle connection was evicted and a new one opened"
    );

    // HTTP/2 upstreams: concurrent requests share one multiplexed connection.
    let addr = proxy.addr("web");
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            tokio::spawn(async move {
                let mut c = Client::h1(addr).await;
                c.get("/h2/delay/100", "x").await.status()
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_eq!(up2.conns(), 1, "one h2 connection carries concurrent streams");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_without_a_body_keep_their_upstream_connection() {
    // HEAD responses (like 204s and 304s) carry no body: nothing ever reads one, and their
    // upstream connection used to be closed instead of pooled, one new connection each.
    let up = Upstream::http1("pooled").start().await;
    let proxy = weir_tests::proxy::start_one_route(up.addr, "", "").await;
    let mut c = Client::h1(proxy.addr("web")).await;
    for i in 0..10 {
        let req = http::Request::head("/")
            .header("host", "x")
            .body(weir_tests::empty())
            .unwrap();
        let r = c.send(req).await.unwrap();
        assert_eq!(r.status(), 200, "request {i}");
        weir_tests::collect(r.into_body()).await.unwrap();
    }
    let r = c.get("/", "x").await;
    assert_eq!(r.status(), 200);
    weir_tests::collect(r.into_body()).await.unwrap();
    assert_eq!(up.hits(), 11);
    assert_eq!(up.conns(), 1, "every exchange reused the one upstream connection");
}

/// How [`closes_on_second_request`] ends a connection when its second request arrives.
#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Ending {
    /// Closed with the request unread (a reset): an idle timeout firing as it arrived.
    Close,
    /// The request read, the start of a response head written, then closed: a response had
    /// begun, the upstream acted on the request.
    PartialResponse,
}

/// An upstream whose every connection answers one request (keep-alive), with the request's
/// head as the body, and ends as the next one arrives: an upstream's idle timeout firing
/// just as a pooled connection is reused (Node.js closes idle keep-alive connections after
/// 5 s; a proxy whose own idle timeout is longer meets this race under steady traffic).
/// Counts connections accepted.
pub(crate) async fn closes_on_second_request(
    ending: Ending,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use tokio::io::AsyncWriteExt;
    use weir_tests::client::read_head_chunks as read_head;
    weir_tests::upstream::raw_server(move |mut s| async move {
        // The first request's head (requests with a body get no answer).
        let Some(head) = read_head(&mut s).await else {
            return;
        };
        let mut answer = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: keep-alive\r\n\r\n",
            head.len()
        )
        .into_bytes();
        // No body after the head of a HEAD response.
        if !head.starts_with(b"HEAD ") {
            answer.extend_from_slice(&head);
        }
        let _ = s.write_all(&answer).await;
        match ending {
            Ending::Close => {
                // Waits for the next request's first byte without reading it. (`readable`
                // may return at once on the readiness the last read left: the connection then
                // closed before any reuse, and the pool found it closed instead of meeting the
                // race; the tests counting resends failed about once in 35 runs.)
                let _ = s.peek(&mut [0u8; 1]).await;
            }
            Ending::PartialResponse => {
                if read_head(&mut s).await.is_some() {
                    let _ = s.write_all(b"HTTP/1.1 20").await;
                }
            }
        }
        drop(s);
    })
    .await
}

/// Long enough for a pooled connection to count as rested (`limits::RESEND_AFTER_IDLE`, 100 ms).
pub(crate) async fn rest() {
    tokio::time::sleep(Duration::from_millis(150)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_the_upstream_closes_as_it_is_reused_is_retried_on_a_new_one() {
    use std::sync::atomic::Ordering;
    let (up, conns) = closes_on_second_request(Ending::Close).await;
    let proxy = weir_tests::proxy::start_one_route(up, "", "").await;
    let mut c = Client::h1(proxy.addr("web")).await;
    // Idempotent requests without a body: the upstream cannot have acted on the lost one
    // in a way a second one changes; each reuse fails and goes again on a new connection,
    // the same head as the first.
    for (i, method) in ["GET", "GET", "HEAD", "DELETE", "GET"].into_iter().enumerate() {
        rest().await;
        let r = c.send_text(method, "/p?q=1", "x", &[("x-mark", "m")]).await;
        assert_eq!(
            r.status(),
            200,
            "request {i} ({method}): {:?} {}",
            r.headers(),
            r.body()
        );
        if method != "HEAD" {
            let seen = r.body().to_ascii_lowercase();
            assert!(
                seen.starts_with(&format!("{} /p?q=1 http/1.1\r\n", method.to_ascii_lowercase())),
                "{seen}"
            );
            assert!(
                seen.contains("\r\nhost: x\r\n") && seen.contains("\r\nx-mark: m\r\n"),
                "{seen}"
            );
        }
    }
    assert_eq!(
        conns.load(Ordering::SeqCst),
        5,
        "one new connection per retried request"
    );
    rest().await;
    // A request that is not idempotent is not sent twice: the client learns it failed.
    let r = c.send_text("POST", "/", "x", &[]).await;
    assert_eq!(r.status(), 502, "{:?}", r.headers());
    rest().await;
    // The endpoint was not at fault: it is still there for the next request (a new
    // connection: the failed one is gone).
    assert_eq!(c.send_text("GET", "/", "x", &[]).await.status(), 200);
    assert_eq!(conns.load(Ordering::SeqCst), 6);
    rest().await;
    // A request that says it may go twice does (the Idempotency-Key header, as Go's HTTP
    // client honours it).
    let r = c.send_text("POST", "/", "x", &[("idempotency-key", "k-1")]).await;
    assert_eq!(r.status(), 200, "{:?} {}", r.headers(), r.body());
    assert_eq!(conns.load(Ordering::SeqCst), 7);
    rest().await;
    // An idempotent request with a body is not: the body streamed through, nothing kept it.
    let req = http::Request::put("/")
        .header("host", "x")
        .body(weir_tests::full("some data"))
        .unwrap();
    assert_eq!(c.send(req).await.unwrap().status(), 502);
    // Operators see it: the upstream closes idle connections sooner than the cluster does.
    let (_, metrics) = proxy.admin_get("/metrics").await;
    assert!(
        metrics.contains(r#"weir_upstream_resent_requests_total{cluster="c"} 5"#),
        "{metrics}"
    );
    assert!(
        !metrics.contains("weir_upstream_connect_errors_total{"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_that_fails_once_a_response_began_is_not_retried() {
    use std::sync::atomic::Ordering;
    // The upstream read the request and started answering: it acted on it. The client
    // learns the exchange failed, even for a GET.
    let (up, conns) = closes_on_second_request(Ending::PartialResponse).await;
    let proxy = weir_tests::proxy::start_one_route(up, "", "").await;
    let mut c = Client::h1(proxy.addr("web")).await;
    assert_eq!(c.send_text("GET", "/", "x", &[]).await.status(), 200);
    rest().await;
    let r = c.send_text("GET", "/", "x", &[]).await;
    assert_eq!(r.status(), 502, "{:?} {}", r.headers(), r.body());
    assert_eq!(conns.load(Ordering::SeqCst), 1);
}

/// An HTTP/2 upstream that answers one request per connection and then shuts the connection
/// down gracefully (GOAWAY, then close) while it sits idle: a server at its maximum
/// connection age (gRPC's `MaxConnectionAge`) or draining for a deploy. Counts connections.
async fn h2_one_request_per_connection() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    weir_tests::upstream::raw_server(|s| async move {
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        let done_tx = std::sync::Mutex::new(Some(done_tx));
        let svc = hyper::service::service_fn(move |_req: http::Request<hyper::body::Incoming>| {
            if let Some(t) = done_tx.lock().unwrap().take() {
                let _ = t.send(());
            }
            async { Ok::<_, std::convert::Infallible>(http::Response::new(weir_tests::full("ok"))) }
        });
        let conn = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .serve_connection(hyper_util::rt::TokioIo::new(s), svc);
        tokio::pin!(conn);
        tokio::select! {
            _ = conn.as_mut() => return,
            _ = done_rx => {}
        }
        // Answer the request, then go away once idle.
        let _ = tokio::time::timeout(Duration::from_millis(100), conn.as_mut()).await;
        conn.as_mut().graceful_shutdown();
        let _ = conn.await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_upstream_that_went_away_gets_the_next_request_on_a_new_connection() {
    use std::sync::atomic::Ordering;
    let (up, conns) = h2_one_request_per_connection().await;
    let proxy = weir_tests::proxy::start_one_route(up, "", r#"protocol = "http2""#).await;
    let mut c = Client::h1(proxy.addr("web")).await;
    for i in 0..4 {
        // A POST: the request never reached the upstream, so even it goes again.
        let r = c.send_text("POST", "/", "x", &[]).await;
        assert_eq!(r.status(), 200, "request {i}: {:?} {}", r.headers(), r.body());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(conns.load(Ordering::SeqCst), 4);
}
