//! TLS: SNI picks the certificate, mTLS rejects clients without a valid certificate and
//! exposes the identity of those with one, upstream TLS verifies and fails closed.

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::BodyExt;
use hyper::body::Frame;
use weir_tests::client::{read_head_chunks, tls_connect, Client};
use weir_tests::collect;
use weir_tests::pki::{client_config, peer_cn, Pki};
use weir_tests::proxy::{start_one_route, TestProxy, ADMIN};
use weir_tests::upstream::Upstream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_picks_the_certificate() {
    let pki = Pki::new("sni");
    let default = pki.issue("default", "default-cert", &["default.test"], None);
    let a = pki.issue("a", "a-cert", &["a.test"], None);
    let wild = pki.issue("wild", "wild-cert", &["*.b.test"], None);
    let up = Upstream::http1("up").start().await;
    let toml = format!(
        r#"{ADMIN}
[[listeners]]
name = "tls"
address = "127.0.0.1:0"
[listeners.tls]
cert = "{}"
key = "{}"
sni = [ {{ names = ["a.test"], cert = "{}", key = "{}" }}, {{ names = ["*.b.test"], cert = "{}", key = "{}" }} ]
[[routes]]
cluster = "c"
[clusters.c]
endpoints = ["{}"]
"#,
        default.cert.display(),
        default.key.display(),
        a.cert.display(),
        a.key.display(),
        wild.cert.display(),
        wild.key.display(),
        up.addr
    );
    let proxy = TestProxy::start(&toml, pki.dir()).await;
    let cfg = client_config(&pki.ca, &[b"http/1.1"], None);
    for (sni, want) in [
        ("a.test", "a-cert"),
        ("x.b.test", "wild-cert"),
        ("default.test", "default-cert"),
    ] {
        let s = tls_connect(proxy.addr("tls"), sni, cfg.clone())
            .await
            .unwrap_or_else(|e| panic!("{sni}: {e}"));
        assert_eq!(peer_cn(&s), want, "SNI {sni}");
    }
    // A name no certificate covers gets the default one, which the client then rejects.
    assert!(tls_connect(proxy.addr("tls"), "other.test", cfg.clone())
        .await
        .is_err());
    // And the request goes through end to end.
    let mut c = Client::tls(proxy.addr("tls"), "a.test", cfg).await.unwrap();
    let r = c.get("/", "a.test").await;
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_rejects_unauthenticated_clients_and_exposes_identity() {
    let pki = Pki::new("mesh");
    let server = pki.issue("server", "proxy", &["proxy.test"], None);
    let frontend = pki.issue(
        "frontend",
        "frontend",
        &["frontend.test"],
        Some("spiffe://cluster.local/ns/web/sa/frontend"),
    );
    let rogue_pki = Pki::new("rogue");
    let rogue = rogue_pki.issue(
        "rogue",
        "rogue",
        &["rogue.test"],
        Some("spiffe://cluster.local/ns/web/sa/frontend"),
    );
    let up = Upstream::http1("up").start().await;
    let toml = format!(
        r#"{ADMIN}
[[listeners]]
name = "mesh"
address = "127.0.0.1:0"
forward_client_cert = true
tls = {{ cert = "{}", key = "{}", client_ca = "{}" }}
[[routes]]
cluster = "c"
[clusters.c]
endpoints = ["{}"]
"#,
        server.cert.display(),
        server.key.display(),
        pki.ca.display(),
        up.addr
    );
    let proxy = TestProxy::start(&toml, pki.dir()).await;
    let addr = proxy.addr("mesh");

    // No certificate: the handshake (or the first read, in TLS 1.3) fails; nothing reaches the upstream.
    for client in [None, Some(&rogue)] {
        let cfg = client_config(&pki.ca, &[b"http/1.1"], client);
        match Client::tls(addr, "proxy.test", cfg).await {
            Err(_) => {}
            Ok(mut c) => {
                let req = http::Request::get("/")
                    .header("host", "proxy.test")
                    .body(weir_tests::empty())
                    .unwrap();
                assert!(
                    c.send(req).await.is_err(),
                    "a client without a valid certificate must not get through"
                );
            }
        }
    }
    assert_eq!(up.hits(), 0);

    let cfg = client_config(&pki.ca, &[b"h2"], Some(&frontend));
    let mut c = Client::tls(addr, "proxy.test", cfg).await.unwrap();
    let r = c.get("/headers", "proxy.test").await;
    assert_eq!(r.status(), 200);
    let seen = String::from_utf8(collect(r.into_body()).await.unwrap().to_vec()).unwrap();
    let xfcc = seen
        .lines()
        .find(|l| l.starts_with("x-forwarded-client-cert: "))
        .unwrap_or_else(|| panic!("{seen}"));
    assert!(
        xfcc.contains("URI=spiffe://cluster.local/ns/web/sa/frontend"),
        "{xfcc}"
    );
    assert!(xfcc.contains("CN=frontend"), "{xfcc}");
    assert!(seen.contains("x-forwarded-proto: https"), "{seen}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_tls_verifies_and_fails_closed() {
    let pki = Pki::new("upstream");
    let good = pki.issue("good", "up", &["upstream.test"], None);
    let other_pki = Pki::new("impostor");
    let impostor = other_pki.issue("bad", "up", &["upstream.test"], None);
    let up_good = Upstream::http2("secure").tls(good).start().await;
    let up_h1 = Upstream::http1("secure-h1")
        .tls(pki.issue("good1", "up", &["upstream.test"], None))
        .start()
        .await;
    let up_bad = Upstream::http1("impostor").tls(impostor).start().await;
    let toml = format!(
        r#"{ADMIN}
[[listeners]]
name = "web"
address = "127.0.0.1:0"
[[routes]]
path_prefix = "/good"
cluster = "good"
[[routes]]
path_prefix = "/good1"
cluster = "good1"
[[routes]]
path_prefix = "/wrong-name"
cluster = "wrong_name"
[[routes]]
path_prefix = "/impostor"
cluster = "impostor"
[clusters.good]
endpoints = ["{g}"]
protocol = "http2"
tls = {{ ca = "{ca}", server_name = "upstream.test" }}
[clusters.good1]
endpoints = ["{g1}"]
tls = {{ ca = "{ca}", server_name = "upstream.test" }}
[clusters.wrong_name]
endpoints = ["{g1}"]
tls = {{ ca = "{ca}", server_name = "other.test" }}
[clusters.impostor]
endpoints = ["{b}"]
tls = {{ ca = "{ca}", server_name = "upstream.test" }}
"#,
        g = up_good.addr,
        g1 = up_h1.addr,
        b = up_bad.addr,
        ca = pki.ca.display()
    );
    let proxy = TestProxy::start(&toml, pki.dir()).await;
    let mut c = Client::h1(proxy.addr("web")).await;
    for (path, up) in [("/good", "secure"), ("/good1", "secure-h1")] {
        let r = c.get(path, "x").await;
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(r.headers()["x-upstream"], up);
    }
    for path in ["/wrong-name", "/impostor"] {
        let r = c.get(path, "x").await;
        assert_eq!(r.status(), 502, "{path} must fail closed");
        assert_eq!(r.headers()["x-weir-error"], "upstream-connect-failed", "{path}");
    }
    assert_eq!(up_bad.hits(), 0, "no request reaches an unverified upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_to_the_upstream() {
    let pki = Pki::new("upstream-mesh");
    let server = pki.issue("server", "up", &["upstream.test"], None);
    let weir_id = pki.issue(
        "weir",
        "weir",
        &["weir.test"],
        Some("spiffe://cluster.local/ns/edge/sa/weir"),
    );
    let up = Upstream::http1("strict")
        .tls(server)
        .require_client_cert(&pki.ca)
        .start()
        .await;
    let toml = format!(
        r#"{ADMIN}
[[listeners]]
name = "web"
address = "127.0.0.1:0"
[[routes]]
path_prefix = "/with-cert"
cluster = "with_cert"
[[routes]]
path_prefix = "/without-cert"
cluster = "without_cert"
[clusters.with_cert]
endpoints = ["{a}"]
tls = {{ ca = "{ca}", server_name = "upstream.test", cert = "{c}", key = "{k}" }}
[clusters.without_cert]
endpoints = ["{a}"]
tls = {{ ca = "{ca}", server_name = "upstream.test" }}
"#,
        a = up.addr,
        ca = pki.ca.display(),
        c = weir_id.cert.display(),
        k = weir_id.key.display()
    );
    let proxy = TestProxy::start(&toml, pki.dir()).await;
    let mut c = Client::h1(proxy.addr("web")).await;
    let r = c.get("/with-cert", "x").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-upstream"], "strict");
    let r = c.get("/without-cert", "x").await;
    assert_eq!(
        r.status(),
        502,
        "the upstream refuses Weir without a client certificate"
    );
    assert_eq!(up.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_queued_behind_a_hung_http2_connect_fail_together() {
    // An HTTP/2 upstream over TLS whose port takes TCP connections (the kernel's backlog) but
    // never answers the TLS handshake. Requests that arrive together queue for the one
    // connection being made; when it times out, they used to try again one after another
    // (the last after about 8 connect timeouts). The failure ejects the endpoint: they fail
    // with it, after one attempt.
    let pki = Pki::new("upstream");
    let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let cluster = format!(
        "protocol = \"http2\"\nconnect_timeout = \"300ms\"\n\
         tls = {{ ca = \"{}\", server_name = \"upstream.test\" }}",
        pki.ca.display()
    );
    let proxy = start_one_route(hung.local_addr().unwrap(), "", &cluster).await;
    let addr = proxy.addr("web");
    let calls: Vec<_> = (0..8)
        .map(|_| tokio::spawn(async move { Client::h1(addr).await.get("/", "x").await.status().as_u16() }))
        .collect();
    for c in calls {
        let status = c.await.unwrap();
        assert!(status == 502 || status == 503, "{status}");
    }
    let (_, m) = proxy.admin_get("/metrics").await;
    assert!(
        m.contains(r#"weir_upstream_connect_errors_total{cluster="c"} 1"#),
        "one connect attempt for the requests that queued behind it: {m}"
    );
    drop(hung);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_reaches_an_http2_tls_cluster_over_http1() {
    // An HTTP/2 cluster over TLS whose server speaks both protocols. Requests go over h2; a
    // WebSocket upgrade needs an HTTP/1.1 connection, and used to offer only `h2` by ALPN:
    // the server committed that connection to HTTP/2 and the upgrade failed with 502.
    use futures_util::{SinkExt, StreamExt};
    let pki = Pki::new("upstream");
    let up = Upstream::dual("both")
        .tls(pki.issue("both", "up", &["upstream.test"], None))
        .start()
        .await;
    let cluster = format!(
        "protocol = \"http2\"\ntls = {{ ca = \"{}\", server_name = \"upstream.test\" }}",
        pki.ca.display()
    );
    let proxy = start_one_route(up.addr, "", &cluster).await;
    let mut c = Client::h1(proxy.addr("web")).await;
    let r = c.get("/headers", "x").await;
    assert_eq!(r.status(), 200);
    let seen = String::from_utf8(collect(r.into_body()).await.unwrap().to_vec()).unwrap();
    assert!(seen.contains("HTTP/2.0"), "requests go over h2: {seen}");

    let tcp = tokio::net::TcpStream::connect(proxy.addr("web")).await.unwrap();
    let (mut ws, resp) = tokio_tungstenite::client_async("ws://x/ws", tcp)
        .await
        .expect("websocket handshake through an h2 cluster");
    assert_eq!(resp.status(), 101);
    ws.send(tokio_tungstenite::tungstenite::Message::text("ping"))
        .await
        .unwrap();
    let echo = ws.next().await.unwrap().unwrap();
    assert_eq!(echo.into_text().unwrap().as_str(), "ping");
}

/// A TLS HTTP/1.1 upstream that reads request bodies slowly (64 KiB every 2 ms, past the 4 MiB
/// a socket's send buffer grows to), so the proxy's socket toward it stays full, and answers with the number of body bytes it read.
async fn slow_reading_upstream(leaf: &weir_tests::pki::Leaf) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let acceptor =
        tokio_rustls::TlsAcceptor::from(weir_tests::pki::server_config(leaf, &[b"http/1.1"], None));
    // A set receive buffer is not grown by the kernel as reads go on.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(64 * 1024).unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(16).unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let mut s = acceptor.accept(tcp).await.unwrap();
                let mut seen = read_head_chunks(&mut s).await.expect("a request head");
                let head_end = seen.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                let mut buf = vec![0u8; 64 * 1024];
                let head = String::from_utf8_lossy(&seen[..head_end]).to_ascii_lowercase();
                let length = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map(|v| v.trim().parse::<usize>().unwrap());
                let mut body = seen.split_off(head_end);
                loop {
                    let complete = match length {
                        Some(n) => body.len() >= n,
                        None => body.ends_with(b"\r\n0\r\n\r\n"),
                    };
                    if complete {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    let n = match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    body.extend_from_slice(&buf[..n]);
                }
                let mut data = body.len();
                if length.is_none() {
                    // Count the data of the chunks, not their framing.
                    let (mut rest, mut sum) = (&body[..], 0);
                    loop {
                        let line = rest.windows(2).position(|w| w == b"\r\n").unwrap();
                        let size = std::str::from_utf8(&rest[..line]).unwrap();
                        let size = usize::from_str_radix(size.split(';').next().unwrap(), 16).unwrap();
                        if size == 0 {
                            break;
                        }
                        sum += size;
                        rest = &rest[line + 2 + size + 2..];
                    }
                    data = sum;
                }
                let count = data.to_string();
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{count}",
                    count.len()
                );
                s.write_all(resp.as_bytes()).await.unwrap();
                s.flush().await.unwrap();
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_to_a_slow_tls_upstream_arrive_whole() {
    // TLS takes bytes into its own buffer when the socket is full; only a flush sends them
    // on. With an upstream that reads slowly, the end of a request body lands in that buffer,
    // and must still leave: the upstream gets all of it and answers, not a stall to a timeout.
    let pki = Pki::new("upload");
    let up = slow_reading_upstream(&pki.issue("up", "up", &["upstream.test"], None)).await;
    let tls = format!(
        r#"tls = {{ ca = "{}", server_name = "upstream.test" }}"#,
        pki.ca.display()
    );
    let proxy = start_one_route(up, "", &tls).await;
    const PIECE: usize = 64 * 1024;
    const PIECES: usize = 128;
    for sized in [true, false] {
        for round in 0..3 {
            let mut c = Client::h1(proxy.addr("web")).await;
            let (tx, body) = weir_tests::channel_body();
            let mut req = Request::post("/upload").header("host", "x");
            if sized {
                req = req.header("content-length", PIECE * PIECES);
            }
            let req = req.body(body).unwrap();
            tokio::spawn(async move {
                for i in 0..PIECES {
                    let piece = Frame::data(Bytes::from(vec![i as u8; PIECE]));
                    if tx.send(Ok(piece)).await.is_err() {
                        return;
                    }
                }
            });
            let answer = tokio::time::timeout(Duration::from_secs(20), async {
                let resp = c.send(req).await.expect("response");
                assert_eq!(
                    resp.status(),
                    200,
                    "sized {sized}, round {round}: the body's end never left"
                );
                resp.into_body().collect().await.expect("body").to_bytes()
            })
            .await
            .unwrap_or_else(|_| panic!("sized {sized}, round {round}: the upload stalled"));
            let read: usize = std::str::from_utf8(&answer).unwrap().parse().unwrap();
            assert_eq!(read, PIECE * PIECES, "sized {sized}, round {round}");
        }
    }
}
