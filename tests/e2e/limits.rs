//! Connection-level behaviour: idle timeout, the connection cap, CONNECT tunnels, DNS-named
//! endpoints.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weir_tests::client::{raw_status, Client, Waiting};
use weir_tests::proxy::{start_one_route, TestProxy, ADMIN};
use weir_tests::upstream::Upstream;

async fn read_head(s: &mut tokio::net::TcpStream) -> String {
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    while !out.ends_with(b"\r\n\r\n") {
        if s.read(&mut b).await.unwrap() == 0 {
            break;
        }
        out.push(b[0]);
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A raw TCP server on `127.0.0.1:0` that hands each accepted socket to `serve`.
async fn raw_server<F, Fut>(serve: F) -> std::net::SocketAddr
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    weir_tests::upstream::raw_server(serve).await.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed() {
    let up = Upstream::http1("up").start().await;
    let proxy = start_one_route(up.addr, r#"limits = { idle_timeout = "300ms" }"#, "").await;
    // HTTP/2: a connection with no stream open for the idle timeout gets GOAWAY and closes.
    let tcp = tokio::net::TcpStream::connect(proxy.addr("web")).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    let t = Instant::now();
    let conn = tokio::spawn(conn);
    let req = http::Request::get("http://x/").body(weir_tests::empty()).unwrap();
    assert_eq!(sender.send_request(req).await.unwrap().status(), 200);
    tokio::time::timeout(Duration::from_secs(3), conn)
        .await
        .expect("an idle h2 connection must be closed")
        .unwrap()
        .ok();
    assert!(
        t.elapsed() >= Duration::from_millis(250),
        "not before the idle timeout: {:?}",
        t.elapsed()
    );
    assert!(sender.is_closed());
    // HTTP/1.1 keep-alive: same after a completed request.
    let mut c = tokio::net::TcpStream::connect(proxy.addr("web")).await.unwrap();
    c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    assert_eq!(raw_status(&read_head(&mut c).await), Some(200));
    let mut rest = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(3), c.read_to_end(&mut rest)).await;
    assert!(r.is_ok(), "an idle keep-alive connection must be closed");
}

/// A connection the idle timeout asked to close but that cannot close gracefully (its request
/// head never completes) is dropped after the grace period, long before the header timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_that_does_not_close_is_dropped_after_the_grace() {
    let up = Upstream::http1("up").start().await;
    let proxy = start_one_route(
        up.addr,
        r#"limits = { idle_timeout = "300ms", header_read_timeout = "60s" }"#,
        "",
    )
    .await;
    let mut c = tokio::net::TcpStream::connect(proxy.addr("web")).await.unwrap();
    c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Half: ")
        .await
        .unwrap();
    let t = Instant::now();
    let mut rest = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(15), c.read_to_end(&mut rest)).await;
    assert!(r.is_ok(), "the connection must be dropped");
    let took = t.elapsed();
    // Idle timeout (300 ms, checked every 75 ms) plus the 5 s grace; the header timeout is 60 s.
    assert!(
        took >= Duration::from_secs(4) && took < Duration::from_secs(12),
        "dropped after {took:?}"
    );
    assert_eq!(up.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_cap_holds_new_connections_until_one_closes() {
    let up = Upstream::http1("up").start().await;
    let proxy = start_one_route(up.addr, r#"limits = { max_connections = 1 }"#, "").await;
    let addr = proxy.addr("web");
    let mut first = Client::h1(addr).await;
    assert_eq!(first.get("/", "x").await.status(), 200);
    let second = Waiting::start(addr, "a second connection waits while the cap is reached").await;
    drop(first);
    assert_eq!(second.served("served once the first closed").await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_is_tunnelled_only_where_allowed() {
    // A raw TCP echo server stands for whatever the tunnel reaches.
    let echo_addr = raw_server(|mut s| async move {
        let (mut r, mut w) = s.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
    })
    .await;
    let toml = format!(
        r#"{ADMIN}
[[listeners]]
name = "web"
address = "127.0.0.1:0"
[[routes]]
host = "tunnel.test"
cluster = "echo"
allow_connect = true
[[routes]]
cluster = "echo"
[clusters.echo]
endpoints = ["{echo_addr}"]
"#
    );
    let proxy = TestProxy::start(&toml, std::path::Path::new(".")).await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr("web")).await.unwrap();
    s.write_all(b"CONNECT tunnel.test:443 HTTP/1.1\r\nHost: tunnel.test:443\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(raw_status(&read_head(&mut s).await), Some(200));
    s.write_all(b"raw bytes, not http").await.unwrap();
    let mut buf = [0u8; 19];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"raw bytes, not http");

    let mut s = tokio::net::TcpStream::connect(proxy.addr("web")).await.unwrap();
    s.write_all(b"CONNECT other.test:443 HTTP/1.1\r\nHost: other.test:443\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(raw_status(&read_head(&mut s).await), Some(405));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_named_endpoints_resolve() {
    let up = Upstream::http1("named").start().await;
    let toml = format!(
        r#"{ADMIN}
[[listeners]]
name = "web"
address = "127.0.0.1:0"
[[routes]]
cluster = "c"
auto_host_rewrite = true
[clusters.c]
endpoints = ["localhost:{}"]
dns_refresh = "200ms"
"#,
        up.addr.port()
    );
    let proxy = TestProxy::start(&toml, std::path::Path::new(".")).await;
    let mut c = Client::h1(proxy.addr("web")).await;
    for _ in 0..5 {
        let r = c.get("/headers", "client.test").await;
        assert_eq!(r.status(), 200);
        let seen = weir_tests::collect(r.into_body()).await.unwrap();
        let seen = String::from_utf8_lossy(&seen);
        assert!(
            seen.contains(&format!("host: localhost:{}", up.addr.port())),
            "auto_host_rewrite: {seen}"
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await; // a few re-resolutions
    assert_eq!(c.get("/", "client.test").await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_stalls_is_cut_after_the_stream_idle_timeout() {
    // Response side: an upstream that sends half its body, then nothing, keeping the
    // connection open. The client's read used to wait forever.
    let up_addr = raw_server(|mut s| async move {
        let _ = read_head(&mut s).await;
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
            .await;
        tokio::time::sleep(Duration::from_secs(30)).await;
    })
    .await;
    let proxy = start_one_route(up_addr, r#"limits = { stream_idle_timeout = "300ms" }"#, "").await;
    let mut c = Client::h1(proxy.addr("web")).await;
    let r = c.get("/", "x").await;
    assert_eq!(r.status(), 200);
    let t = Instant::now();
    let read = tokio::time::timeout(Duration::from_secs(10), weir_tests::collect(r.into_body()))
        .await
        .expect("the stalled body must be cut, not hang");
    assert!(read.is_err(), "the client sees the body cut short: {read:?}");
    assert!(
        t.elapsed() >= Duration::from_millis(250),
        "not before the timeout"
    );

    // Request side: a client that sends half its body, then nothing, to an upstream that
    // waits for all of it: 408, and the connection closed.
    let up = Upstream::http1("up").delay(Duration::from_secs(3)).start().await;
    let proxy = start_one_route(up.addr, r#"limits = { stream_idle_timeout = "300ms" }"#, "").await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr("web")).await.unwrap();
    s.write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nhello")
        .await
        .unwrap();
    let head = tokio::time::timeout(Duration::from_secs(10), read_head(&mut s))
        .await
        .expect("an answer before the upstream's");
    assert_eq!(raw_status(&head), Some(408), "{head}");
    assert!(head.contains("request-body-idle"), "{head}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_connection_whose_request_was_cancelled_still_closes_when_idle() {
    // A client gives up on a slow request (its stream is reset) and sends nothing more. The
    // cancelled request used to stay counted as in flight, so the connection never went idle.
    let up = Upstream::http1("slow")
        .delay(Duration::from_secs(5))
        .start()
        .await;
    let proxy = start_one_route(up.addr, r#"limits = { idle_timeout = "500ms" }"#, "").await;
    let tcp = tokio::net::TcpStream::connect(proxy.addr("web")).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    let conn = tokio::spawn(conn);
    let req = http::Request::get("http://x/").body(weir_tests::empty()).unwrap();
    let gave_up = tokio::time::timeout(Duration::from_millis(200), sender.send_request(req)).await;
    assert!(
        gave_up.is_err(),
        "the upstream is slower than the client's patience"
    );
    tokio::time::timeout(Duration::from_secs(4), conn)
        .await
        .expect("the connection, idle after its cancelled request, must be closed")
        .unwrap()
        .ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_counts_under_the_connection_cap_while_it_lives() {
    // Once upgraded, the client's connection is a tunnel in a task of its own; its place
    // under the cap (and on the open-connections gauge, and in the drain's wait) used to be
    // given back at the upgrade, so tunnels could go past max_connections.
    let up = Upstream::http1("up").start().await;
    let proxy = start_one_route(up.addr, r#"limits = { max_connections = 1 }"#, "").await;
    let addr = proxy.addr("web");
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut ws, resp) = tokio_tungstenite::client_async("ws://x/ws", tcp)
        .await
        .expect("websocket handshake");
    assert_eq!(resp.status(), 101);
    let second = Waiting::start(addr, "the websocket holds the only place").await;
    let (_, m) = proxy.admin_get("/metrics").await;
    assert!(
        m.contains(r#"weir_listener_active_connections{listener="web"} 1"#),
        "{m}"
    );
    ws.close(None).await.unwrap();
    drop(ws);
    assert_eq!(second.served("served once the websocket closed").await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_dropped_after_the_stream_idle_timeout() {
    // A large response to a client that never reads: the sockets' buffers fill, nothing polls
    // the body any more, and the connection (with its upstream exchange) used to stay open
    // for good, holding its place under the connection cap.
    let up_addr = raw_server(|mut s| async move {
        let _ = read_head(&mut s).await;
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1073741824\r\n\r\n")
            .await;
        let chunk = vec![b'x'; 64 * 1024];
        while s.write_all(&chunk).await.is_ok() {}
    })
    .await;
    let proxy = start_one_route(
        up_addr,
        r#"limits = { idle_timeout = "60s", stream_idle_timeout = "500ms" }"#,
        "",
    )
    .await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr("web")).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let open = |m: &str| m.contains(r#"weir_listener_active_connections{listener="web"} 1"#);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, m) = proxy.admin_get("/metrics").await;
    assert!(open(&m), "the connection is open while the response streams: {m}");
    let t = Instant::now();
    loop {
        let (_, m) = proxy.admin_get("/metrics").await;
        if !open(&m) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "a client that never reads is dropped"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(s);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_timeout_runs_from_the_end_of_the_request_body() {
    // A client uploading steadily for longer than the request timeout, to an upstream that
    // answers once it has the whole body. The timeout ran from the start of sending: the
    // client got 504 from a healthy upstream, counted as that endpoint's failure and latency.
    let up_addr = raw_server(|mut s| async move {
        let _ = read_head(&mut s).await;
        let mut body = [0u8; 5];
        if s.read_exact(&mut body).await.is_ok() {
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .await;
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    })
    .await;
    let proxy = start_one_route(up_addr, "", r#"request_timeout = "500ms""#).await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr("web")).await.unwrap();
    s.write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n")
        .await
        .unwrap();
    for b in b"hello" {
        tokio::time::sleep(Duration::from_millis(300)).await;
        s.write_all(&[*b]).await.unwrap();
    }
    let head = tokio::time::timeout(Duration::from_secs(10), read_head(&mut s))
        .await
        .expect("an answer");
    assert_eq!(raw_status(&head), Some(200), "{head}");

    // The timer still runs for an upstream that answers late once the body is in.
    let up = Upstream::http1("up").start().await;
    let proxy = start_one_route(up.addr, "", r#"request_timeout = "500ms""#).await;
    let t = Instant::now();
    let req = http::Request::post("/delay/30000")
        .header("host", "x")
        .body(weir_tests::full("hello"))
        .unwrap();
    let r = Client::h1(proxy.addr("web")).await.send(req).await.unwrap();
    assert_eq!(r.status(), 504);
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_to_an_upstream_that_stopped_reading_is_given_up_after_the_stream_idle_timeout() {
    // The request timeout waits for the end of the body; an upstream that stops reading it
    // (and never answers) leaves it unpolled, so no body timer runs: the exchange gives up
    // once the upload has not moved for the stream idle timeout.
    let up_addr = raw_server(|mut s| async move {
        let _ = read_head(&mut s).await;
        tokio::time::sleep(Duration::from_secs(60)).await;
    })
    .await;
    let proxy = start_one_route(
        up_addr,
        r#"limits = { stream_idle_timeout = "500ms", max_request_body = 1073741824 }"#,
        r#"request_timeout = "60s""#,
    )
    .await;
    let s = tokio::net::TcpStream::connect(proxy.addr("web")).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    let size = 256usize << 20;
    let writer = tokio::spawn(async move {
        let head = format!("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n");
        wr.write_all(head.as_bytes()).await?;
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..256 {
            wr.write_all(&chunk).await?;
        }
        Ok::<_, std::io::Error>(wr)
    });
    let t = Instant::now();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(15), rd.read(&mut buf))
        .await
        .expect("an answer well before the 60 s request timeout")
        .unwrap();
    let head = String::from_utf8_lossy(&buf[..n]);
    assert_eq!(raw_status(&head), Some(504), "{head}");
    assert!(t.elapsed() >= Duration::from_millis(400), "{:?}", t.elapsed());
    writer.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_timeout_starts_at_the_end_of_a_body_that_ends_with_trailers() {
    // hyper's HTTP/1 client reads no further than the trailers, so the body's end must be
    // seen at the trailers frame: else the request timer never started and a hung upstream
    // held the request until the upload's stall check (minutes).
    let up = Upstream::http1("up").start().await;
    let proxy = start_one_route(up.addr, "", r#"request_timeout = "500ms""#).await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr("web")).await.unwrap();
    let t = Instant::now();
    s.write_all(
        b"POST /delay/5000 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nx-checksum: 1\r\n\r\n",
    )
    .await
    .unwrap();
    let head = tokio::time::timeout(Duration::from_secs(10), read_head(&mut s))
        .await
        .expect("an answer");
    assert_eq!(raw_status(&head), Some(504), "{head}");
    assert!(t.elapsed() < Duration::from_millis(2500), "{:?}", t.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_never_speaks_does_not_hold_up_shutdown() {
    // A drain waits for an unheard connection's first bytes, but only a short grace: a
    // browser's preconnect would otherwise hold the shutdown for the header read timeout.
    let up = Upstream::http1("up").start().await;
    let proxy = start_one_route(up.addr, "", "").await;
    let _silent = tokio::net::TcpStream::connect(proxy.addr("web")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t = Instant::now();
    proxy.stop().await;
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "shutdown took {:?}",
        t.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_that_grants_no_window_is_dropped_after_the_stream_idle_timeout() {
    // Over HTTP/2 the socket does not block: a client that reads nothing grants no window,
    // and hyper then never asks the response body for more, so no body timer ran and the
    // stream, and its upstream exchange, stayed open for good.
    use http_body_util::BodyExt;
    let up = Upstream::http1("up").start().await;
    let proxy = start_one_route(up.addr, r#"limits = { stream_idle_timeout = "500ms" }"#, "").await;
    let mut c = Client::h2c(proxy.addr("web")).await;
    // 8 MiB echoed back: far more than the client's windows (hyper's: 2 MiB a stream).
    let req = http::Request::post("/echo")
        .header("host", "x")
        .body(weir_tests::full(vec![b'x'; 8 << 20]))
        .unwrap();
    let resp = c.send(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    // Not reading: the proxy fills the windows, then waits on the client.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let read = tokio::time::timeout(Duration::from_secs(10), resp.into_body().collect())
        .await
        .expect("the body ends one way or the other");
    assert!(
        read.is_err(),
        "the connection was dropped, so the body is cut short"
    );
}
