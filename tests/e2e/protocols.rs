//! Every client protocol to every upstream protocol, with empty, sized and chunked bodies;
//! gRPC-style trailers; WebSocket upgrades; hop-by-hop and X-Forwarded-* handling.

use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::Request;
use http_body_util::BodyExt;
use hyper::body::Frame;
use weir_tests::client::Client;
use weir_tests::pki::{client_config, Pki};
use weir_tests::proxy::{TestProxy, ADMIN};
use weir_tests::upstream::{Running, Upstream};
use weir_tests::{channel_body, collect};

struct Setup {
    proxy: TestProxy,
    pki: Pki,
    _ups: Vec<Running>,
}

async fn setup() -> Setup {
    let pki = Pki::new("proto");
    let leaf = pki.issue("proxy", "proxy", &["proxy.test"], None);
    let h1 = Upstream::http1("up-h1").start().await;
    let h2 = Upstream::http2("up-h2").start().await;
    let toml = format!(
        r#"{ADMIN}
[[listeners]]
name = "plain"
address = "127.0.0.1:0"

[[listeners]]
name = "tls"
address = "127.0.0.1:0"
tls = {{ cert = "{cert}", key = "{key}" }}

[[routes]]
host = "h2.test"
cluster = "h2"

[[routes]]
cluster = "h1"

[clusters.h1]
endpoints = ["{a}"]

[clusters.h2]
endpoints = ["{b}"]
protocol = "http2"
"#,
        cert = leaf.cert.display(),
        key = leaf.key.display(),
        a = h1.addr,
        b = h2.addr,
    );
    let proxy = TestProxy::start(&toml, pki.dir()).await;
    Setup {
        proxy,
        pki,
        _ups: vec![h1, h2],
    }
}

async fn clients(s: &Setup) -> Vec<(&'static str, Client)> {
    let tls = client_config(&s.pki.ca, &[b"h2", b"http/1.1"], None);
    let h2tls = Client::tls(s.proxy.addr("tls"), "proxy.test", tls)
        .await
        .expect("tls");
    assert!(h2tls.is_h2(), "ALPN must pick h2");
    let h1tls = Client::tls(
        s.proxy.addr("tls"),
        "proxy.test",
        client_config(&s.pki.ca, &[b"http/1.1"], None),
    )
    .await
    .expect("tls");
    assert!(!h1tls.is_h2());
    vec![
        ("h1", Client::h1(s.proxy.addr("plain")).await),
        ("h2c", Client::h2c(s.proxy.addr("plain")).await),
        ("h2-tls", h2tls),
        ("h1-tls", h1tls),
    ]
}

fn pattern(len: usize) -> Bytes {
    (0..len).map(|i| (i * 7 % 251) as u8).collect::<Vec<u8>>().into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_client_to_every_upstream_with_every_body() {
    let s = setup().await;
    let mib = pattern(1024 * 1024);
    for (cname, mut c) in clients(&s).await {
        for (host, upstream) in [("h1.test", "up-h1"), ("h2.test", "up-h2")] {
            for kind in ["empty", "1MiB-sized-streamed", "chunked"] {
                let what = format!("{cname} -> {upstream} with {kind}");
                let (req, expect) = match kind {
                    "empty" => (
                        Request::post("/echo")
                            .header("host", host)
                            .body(weir_tests::empty())
                            .unwrap(),
                        Bytes::new(),
                    ),
                    "1MiB-sized-streamed" => {
                        let (tx, body) = channel_body();
                        let data = mib.clone();
                        tokio::spawn(async move {
                            for chunk in data.chunks(16 * 1024) {
                                if tx
                                    .send(Ok(Frame::data(Bytes::copy_from_slice(chunk))))
                                    .await
                                    .is_err()
                                {
                                    return;
                                }
                            }
                        });
                        let req = Request::post("/echo")
                            .header("host", host)
                            .header("content-length", mib.len())
                            .body(body)
                            .unwrap();
                        (req, mib.clone())
                    }
                    _ => {
                        let (tx, body) = channel_body();
                        let parts: Vec<Bytes> = (1..40).map(|i| pattern(i * 37)).collect();
                        let all: Vec<u8> = parts.iter().flat_map(|p| p.to_vec()).collect();
                        tokio::spawn(async move {
                            for p in parts {
                                let _ = tx.send(Ok(Frame::data(p))).await;
                            }
                        });
                        (
                            Request::post("/echo").header("host", host).body(body).unwrap(),
                            Bytes::from(all),
                        )
                    }
                };
                let resp = c.send(req).await.unwrap_or_else(|e| panic!("{what}: {e}"));
                assert_eq!(resp.status(), 200, "{what}");
                assert_eq!(resp.headers()["x-upstream"], upstream, "{what}");
                let got = collect(resp.into_body())
                    .await
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                assert_eq!(got.len(), expect.len(), "{what}");
                assert!(got == expect, "{what}: body differs");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_stream_both_ways_without_buffering() {
    let s = setup().await;
    for (cname, mut c) in clients(&s).await {
        for host in ["h1.test", "h2.test"] {
            let (tx, body) = channel_body();
            let req = Request::post("/echo").header("host", host).body(body).unwrap();
            let resp = tokio::time::timeout(Duration::from_secs(5), c.send(req))
                .await
                .expect("response head arrives before the request body ends")
                .unwrap();
            let mut rbody = resp.into_body();
            for i in 0..3 {
                let chunk = Bytes::from(format!("chunk-{i}"));
                tx.send(Ok(Frame::data(chunk.clone()))).await.unwrap();
                let mut got = Vec::new();
                while got.len() < chunk.len() {
                    let f = tokio::time::timeout(Duration::from_secs(5), rbody.frame())
                        .await
                        .unwrap_or_else(|_| {
                            panic!("{cname}->{host}: chunk {i} not echoed while the request is open")
                        })
                        .expect("frame")
                        .expect("ok frame");
                    if let Ok(d) = f.into_data() {
                        got.extend_from_slice(&d);
                    }
                }
                assert_eq!(got, chunk.to_vec());
            }
            // End the request; the response then ends too and the connection is reusable.
            drop(tx);
            let rest = collect(rbody).await.unwrap();
            assert!(rest.is_empty(), "{cname}->{host}: nothing after the last chunk");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_style_trailers_pass_through_http2() {
    let s = setup().await;
    let tls = client_config(&s.pki.ca, &[b"h2"], None);
    let clients = vec![
        Client::h2c(s.proxy.addr("plain")).await,
        Client::tls(s.proxy.addr("tls"), "proxy.test", tls).await.unwrap(),
    ];
    for mut c in clients {
        let (tx, body) = channel_body();
        let req = Request::post("/echo")
            .header("host", "h2.test")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(body)
            .unwrap();
        tokio::spawn(async move {
            tx.send(Ok(Frame::data(Bytes::from_static(b"\0\0\0\0\x05hello"))))
                .await
                .unwrap();
            let mut t = http::HeaderMap::new();
            t.insert("x-request-trailer", "yes".parse().unwrap());
            tx.send(Ok(Frame::trailers(t))).await.unwrap();
        });
        let resp = c.send(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let collected = resp.into_body().collect().await.unwrap();
        let trailers = collected.trailers().cloned().expect("response trailers");
        assert_eq!(trailers["grpc-status"], "0");
        assert_eq!(
            trailers["x-request-trailer"], "yes",
            "request trailers reach the upstream"
        );
        assert_eq!(&collected.to_bytes()[..], b"\0\0\0\0\x05hello");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_is_tunnelled() {
    let s = setup().await;
    let tcp = tokio::net::TcpStream::connect(s.proxy.addr("plain"))
        .await
        .unwrap();
    let (mut ws, resp) = tokio_tungstenite::client_async("ws://h1.test/ws", tcp)
        .await
        .expect("websocket handshake");
    assert_eq!(resp.status(), 101);
    assert_eq!(resp.headers()["x-upstream"], "up-h1");
    for i in 0..3 {
        let msg = format!("hello {i}");
        ws.send(tokio_tungstenite::tungstenite::Message::text(msg.clone()))
            .await
            .unwrap();
        let echo = ws.next().await.unwrap().unwrap();
        assert_eq!(echo.into_text().unwrap().as_str(), msg);
    }
    ws.close(None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_go_and_forwarded_headers_are_set() {
    let s = setup().await;
    for host in ["h1.test", "h2.test"] {
        let mut c = Client::h1(s.proxy.addr("plain")).await;
        let req = Request::get("/headers")
            .header("host", host)
            .header("connection", "keep-alive, x-private")
            .header("x-private", "secret")
            .header("keep-alive", "timeout=5")
            .header("proxy-authorization", "Basic Zm9vOmJhcg==")
            .header("x-forwarded-for", "6.6.6.6")
            .header("x-forwarded-client-cert", "By=forged")
            .header("x-kept", "yes")
            .body(weir_tests::empty())
            .unwrap();
        let resp = c.send(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let seen = String::from_utf8(collect(resp.into_body()).await.unwrap().to_vec()).unwrap();
        for gone in [
            "x-private",
            "keep-alive",
            "proxy-authorization",
            "x-forwarded-client-cert",
            "6.6.6.6",
        ] {
            assert!(
                !seen.contains(gone),
                "{host}: {gone} must not reach the upstream:\n{seen}"
            );
        }
        assert!(seen.contains("x-kept: yes"), "{seen}");
        assert!(seen.contains("x-forwarded-for: 127.0.0.1"), "{seen}");
        assert!(seen.contains("x-forwarded-proto: http"), "{seen}");
        assert!(seen.contains(&format!("x-forwarded-host: {host}")), "{seen}");
        assert!(seen.contains("x-request-id: "), "{seen}");
        let host_line = if host == "h2.test" {
            "GET http://h2.test/headers HTTP/2.0"
        } else {
            "host: h1.test"
        };
        assert!(seen.contains(host_line), "the client's host is preserved: {seen}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declared_trailers_cross_http1_hops_both_ways() {
    // An HTTP/1.1 hop sends only the trailer fields its `Trailer` header names (hyper, as RFC
    // 9110 §6.6.2 asks senders to declare them): a proxy that drops `Trailer` as hop-by-hop
    // loses the trailers on every HTTP/1.1 leg.
    let s = setup().await;
    for host in ["h1.test", "h2.test"] {
        let mut c = Client::h1(s.proxy.addr("plain")).await;
        let (tx, body) = channel_body();
        let req = Request::post("/echo")
            .header("host", host)
            .header("te", "trailers")
            .header("trailer", "x-checksum")
            .body(body)
            .unwrap();
        tokio::spawn(async move {
            tx.send(Ok(Frame::data(Bytes::from_static(b"payload"))))
                .await
                .unwrap();
            let mut t = http::HeaderMap::new();
            t.insert("x-checksum", "c0ffee".parse().unwrap());
            tx.send(Ok(Frame::trailers(t))).await.unwrap();
        });
        let resp = c.send(req).await.unwrap();
        assert_eq!(resp.status(), 200, "{host}");
        assert_eq!(resp.headers()["trailer"], "x-checksum", "{host}");
        let collected = resp.into_body().collect().await.unwrap();
        let trailers = collected.trailers().cloned();
        assert_eq!(
            trailers
                .as_ref()
                .and_then(|t| t.get("x-checksum"))
                .map(|v| v.to_str().unwrap()),
            Some("c0ffee"),
            "{host}: the request's trailer reached the upstream and the response's came back: {trailers:?}"
        );
        assert_eq!(&collected.to_bytes()[..], b"payload");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absolute_form_target_replaces_host_and_a_hostless_request_gets_one() {
    use weir_tests::client::raw_exchange;
    let s = setup().await;
    let wait = Duration::from_secs(2);
    // RFC 9112 §3.2.2: the target's authority wins; the upstream must not see the other.
    let (out, _) = raw_exchange(
        s.proxy.addr("plain"),
        b"GET http://h1.test/headers HTTP/1.1\r\nHost: admin.internal\r\nConnection: close\r\n\r\n",
        wait,
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains("\nhost: h1.test\n"), "{out}");
    assert!(!out.contains("admin.internal"), "{out}");
    // HTTP/1.0 needs no Host; the HTTP/1.1 request to the upstream does (RFC 9112 §3.2).
    let (out, _) = raw_exchange(s.proxy.addr("plain"), b"GET /headers HTTP/1.0\r\n\r\n", wait).await;
    // Answered as HTTP/1.1, the highest version Weir speaks (RFC 9110 §6.2), as nginx does.
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let up = s._ups[0].addr.to_string();
    assert!(out.contains(&format!("\nhost: {up}\n")), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_with_a_body_of_unknown_length_reaches_an_http1_upstream() {
    // Search APIs take a GET with a body; sent chunked (no length), it reached the upstream
    // as a GET without one.
    let s = setup().await;
    let (out, _) = weir_tests::client::raw_exchange(
        s.proxy.addr("plain"),
        b"GET /echo HTTP/1.1\r\nHost: h1.test\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\nc\r\n{\"query\":{}}\r\n0\r\n\r\n",
        Duration::from_secs(2),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(
        out.contains("{\"query\":{}}"),
        "the body reached the upstream: {out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cookies_an_http2_client_split_reach_an_http1_upstream_as_one_header() {
    // Browsers send each cookie as its own field over HTTP/2 (HPACK compresses them apart);
    // HTTP/1.1 allows one Cookie header, and servers read only the first of several.
    let s = setup().await;
    for (host, joined) in [("h1.test", true), ("h2.test", false)] {
        let mut c = Client::h2c(s.proxy.addr("plain")).await;
        let req = Request::get("/headers")
            .header("host", host)
            .header("cookie", "session=abc")
            .header("cookie", "theme=dark")
            .header("cookie", "lang=en")
            .body(weir_tests::empty())
            .unwrap();
        let resp = c.send(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let seen = String::from_utf8(collect(resp.into_body()).await.unwrap().to_vec()).unwrap();
        let cookies: Vec<&str> = seen.lines().filter(|l| l.starts_with("cookie: ")).collect();
        if joined {
            assert_eq!(cookies, ["cookie: session=abc; theme=dark; lang=en"], "{seen}");
        } else {
            // An HTTP/2 upstream takes them as they came.
            assert_eq!(cookies.len(), 3, "{seen}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_are_canonical_before_routing_and_upstream() {
    let s = setup().await;
    let mut c = Client::h1(s.proxy.addr("plain")).await;
    let resp = c.get("/x/%2e%2e/./headers?q=%2e", "h1.test").await;
    let seen = String::from_utf8(collect(resp.into_body()).await.unwrap().to_vec()).unwrap();
    assert!(seen.starts_with("GET /headers?q=%2e HTTP/1.1"), "{seen}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_forwarded_for_appends_to_every_line_the_client_sent() {
    // Behind a trusted proxy (`append`): a CDN that adds its hop as a line of its own must not
    // lose it; the upstream counts trusted hops from the right.
    let up = Upstream::http1("up").start().await;
    let proxy = weir_tests::proxy::start_one_route(up.addr, r#"forwarded_headers = "append""#, "").await;
    let mut c = Client::h1(proxy.addr("web")).await;
    let r = c
        .send_text(
            "GET",
            "/headers",
            "x",
            &[
                ("x-forwarded-for", "203.0.113.7"),
                ("x-request-id", "trace-7"),
                ("x-forwarded-for", "198.51.100.2"),
                ("x-forwarded-proto", "https"),
            ],
        )
        .await;
    let lines = |name: &str| -> Vec<String> {
        r.body()
            .lines()
            .filter(|l| l.starts_with(&format!("{name}: ")))
            .map(str::to_string)
            .collect()
    };
    assert_eq!(
        lines("x-forwarded-for"),
        ["x-forwarded-for: 203.0.113.7, 198.51.100.2, 127.0.0.1"],
        "{}",
        r.body()
    );
    // Each field once: the client's request id and scheme (a trusted hop's) kept, the host
    // added.
    assert_eq!(lines("x-request-id"), ["x-request-id: trace-7"], "{}", r.body());
    assert_eq!(
        lines("x-forwarded-proto"),
        ["x-forwarded-proto: https"],
        "{}",
        r.body()
    );
    assert_eq!(lines("x-forwarded-host"), ["x-forwarded-host: x"], "{}", r.body());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_upgrades_a_route_allows_are_tunnelled() {
    use tokio::io::AsyncWriteExt;
    use weir_tests::client::raw_exchange;
    // An upstream that switches to h2c whenever an upgrade is asked for, whichever. An `h2c`
    // upgrade through the proxy would give the client a raw HTTP/2 tunnel to it, past every
    // filter (h2c smuggling): only `websocket` is tunnelled unless the route lists more.
    let (up, _) = weir_tests::upstream::raw_server(|mut s| async move {
        let Some(head) = weir_tests::client::read_head_chunks(&mut s).await else {
            return;
        };
        let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
        let answer: &[u8] = if head.contains("\r\nupgrade: ") {
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\r\n"
        } else {
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nplain"
        };
        let _ = s.write_all(answer).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
    })
    .await;
    let toml = format!(
        r#"{ADMIN}
[[listeners]]
name = "web"
address = "127.0.0.1:0"
[[routes]]
path_prefix = "/open"
cluster = "c"
upgrades = ["websocket", "h2c"]
[[routes]]
cluster = "c"
[clusters.c]
endpoints = ["{up}"]
"#
    );
    let proxy = TestProxy::start(&toml, std::path::Path::new(".")).await;
    let ask = |path: &str, upgrade: &str| {
        format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: {upgrade}\r\n\
             HTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n"
        )
    };
    let wait = Duration::from_millis(500);
    let (out, _) = raw_exchange(proxy.addr("web"), ask("/", "h2c").as_bytes(), wait).await;
    assert!(
        out.starts_with("HTTP/1.1 200"),
        "a plain request, not a tunnel: {out}"
    );
    assert!(out.ends_with("plain"), "{out}");
    // An allowed protocol first does not carry another through: the upstream is offered
    // websocket alone, and its switch to h2c is refused.
    let (out, _) = raw_exchange(proxy.addr("web"), ask("/", "websocket, h2c").as_bytes(), wait).await;
    assert!(out.starts_with("HTTP/1.1 502"), "{out}");
    let (out, _) = raw_exchange(proxy.addr("web"), ask("/open", "h2c").as_bytes(), wait).await;
    assert!(out.starts_with("HTTP/1.1 101"), "the route allows h2c: {out}");
    assert!(out.to_ascii_lowercase().contains("\r\nupgrade: h2c\r\n"), "{out}");
}
