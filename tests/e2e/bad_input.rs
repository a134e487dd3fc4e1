//! Bad input gets the right 4xx, that connection is closed, and the proxy keeps serving
//! everyone else.

use std::time::Duration;

use weir_tests::client::{raw_exchange, raw_exchange_parts, raw_status, Client};
use weir_tests::proxy::{start_one_route, TestProxy, ADMIN};
use weir_tests::upstream::Upstream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_are_refused_and_others_keep_being_served() {
    let up = Upstream::http1("up").start().await;
    let proxy = start_one_route(
        up.addr,
        r#"limits = { max_header_bytes = 16384, max_request_body = 1024, max_uri_bytes = 2048 }"#,
        "",
    )
    .await;
    let addr = proxy.addr("web");
    // A well-behaved keep-alive client, opened before the attacks and used between them.
    let mut good = Client::h1(addr).await;
    assert_eq!(good.get("/", "x").await.status(), 200);

    let big = "a".repeat(20_000);
    let long_uri = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "u".repeat(3000));
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("malformed request line", b"GARBAGE\r\n\r\n".to_vec(), 400),
        ("bad method token", b"G(T / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), 400),
        ("oversize headers", format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n").into_bytes(), 431),
        (
            "content-length then transfer-encoding",
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(),
            400,
        ),
        (
            "transfer-encoding then content-length",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n".to_vec(),
            400,
        ),
        (
            "smuggling after a good request",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\nPOST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(),
            400,
        ),
        (
            // Even a list of equal values: refused, so no later head on the connection is read.
            "content-length list",
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2, 2\r\n\r\nok".to_vec(),
            400,
        ),
        (
            "two content-lengths that differ",
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab".to_vec(),
            400,
        ),
        (
            "transfer-encoding list",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n".to_vec(),
            400,
        ),
        ("missing host", b"GET / HTTP/1.1\r\n\r\n".to_vec(), 400),
        ("two hosts", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n".to_vec(), 400),
        // `user@a` is host `a` to some upstreams and not to routing (RFC 9112 §3.2).
        ("userinfo in host", b"GET / HTTP/1.1\r\nHost: admin@x\r\n\r\n".to_vec(), 400),
        ("a port that is not a number", b"GET / HTTP/1.1\r\nHost: x:80x\r\n\r\n".to_vec(), 400),
        ("userinfo in the target", b"GET http://admin@x/ HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), 400),
        ("nul in path", b"GET /a%00b HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), 400),
        ("body over the limit", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n".to_vec(), 413),
        ("uri too long", long_uri.into_bytes(), 414),
        ("CONNECT not allowed", b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n".to_vec(), 405),
    ];
    for (what, bytes, want) in cases {
        let hits = up.hits();
        let (out, closed) = raw_exchange(addr, &bytes, Duration::from_secs(3)).await;
        // For the smuggling case the first (good) response comes first; find the last status.
        let last = out.rfind("HTTP/1.1 ").map(|i| &out[i..]).unwrap_or("");
        assert_eq!(raw_status(last), Some(want), "{what}: got {out:?}");
        if want != 405 && want != 414 {
            assert!(closed, "{what}: the connection must be closed");
        }
        if what.starts_with("smuggling after") {
            // The first request is fine and served; only the second is refused.
            assert_eq!(raw_status(&out), Some(200), "{what}: got {out:?}");
        } else {
            assert_eq!(up.hits(), hits, "{what}: nothing reaches the upstream");
        }
        assert_eq!(
            good.get("/", "x").await.status(),
            200,
            "after {what}, others are still served"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_after_blank_lines_sent_on_their_own_is_refused() {
    // Blank lines before a request line are allowed (and skipped). Sent in their own packet,
    // they used to end the (since replaced) framing guard's search for the head's end, which stopped
    // looking at that connection: the conflicting head went through.
    let up = Upstream::http1("up").start().await;
    let proxy = start_one_route(up.addr, "", "").await;
    let (out, closed) = raw_exchange_parts(
        proxy.addr("web"),
        &[
            b"\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ],
        Duration::from_secs(3),
    )
    .await;
    assert_eq!(raw_status(&out), Some(400), "got {out:?}");
    assert!(closed, "the connection is closed");
    assert_eq!(up.hits(), 0, "nothing reaches the upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_is_cut_by_the_header_timeout() {
    let up = Upstream::http1("up").start().await;
    let proxy = start_one_route(up.addr, r#"limits = { header_read_timeout = "300ms" }"#, "").await;
    let t = std::time::Instant::now();
    let (_, closed) = raw_exchange(
        proxy.addr("web"),
        b"GET / HTTP/1.1\r\nHost: x\r\n",
        Duration::from_secs(3),
    )
    .await;
    assert!(closed, "an unfinished head is cut off");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_routes_get_404() {
    let up = Upstream::http1("up").start().await;
    let toml = format!(
        r#"{ADMIN}
[[listeners]]
name = "web"
address = "127.0.0.1:0"
[[routes]]
host = "known.test"
cluster = "c"
[clusters.c]
endpoints = ["{}"]
"#,
        up.addr
    );
    let proxy = TestProxy::start(&toml, std::path::Path::new(".")).await;
    let mut c = Client::h1(proxy.addr("web")).await;
    let r = c.get("/", "unknown.test").await;
    assert_eq!(r.status(), 404);
    assert_eq!(r.headers()["x-weir-error"], "no-route");
    assert_eq!(
        c.get("/", "known.test:8080").await.status(),
        200,
        "the port is ignored for routing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_after_an_upgrade_or_connect_that_was_not_tunnelled_is_not_served() {
    // The smuggling guard stops reading a connection at an upgrade or CONNECT (what follows
    // may be a tunnel's bytes). When the request is answered without a tunnel (an Upgrade
    // header without `Connection: upgrade` is a plain request; CONNECT here is refused), the
    // connection used to stay open with nothing checking the next heads: a CL+TE request
    // pipelined behind went to the upstream. Now the connection closes after the answer.
    let up = Upstream::http1("up").start().await;
    let proxy = start_one_route(up.addr, "", "").await;
    let smuggled =
        "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
    for (first, status) in [
        ("GET / HTTP/1.1\r\nHost: x\r\nUpgrade: foo\r\n\r\n", 200),
        ("CONNECT a:1 HTTP/1.1\r\nHost: a:1\r\n\r\n", 405),
    ] {
        let hits = up.hits();
        let (out, closed) = raw_exchange(
            proxy.addr("web"),
            format!("{first}{smuggled}").as_bytes(),
            Duration::from_secs(3),
        )
        .await;
        assert_eq!(raw_status(&out), Some(status), "{first:?}: {out}");
        assert_eq!(
            out.matches("HTTP/1.1 ").count(),
            1,
            "{first:?}: one answer only: {out}"
        );
        assert!(closed, "{first:?}: the connection is closed after the answer");
        assert_eq!(
            up.hits(),
            hits + usize::from(status == 200),
            "{first:?}: the smuggled request never reaches the upstream"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_sends_nothing_is_cut_by_the_header_timeout() {
    // On a plain listener nothing is read before the HTTP/1-or-HTTP/2 detection, where no
    // head timer of hyper's runs: a silent client held its connection (and a place under the
    // connection cap) until the idle timeout, 60 s by default.
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let up = Upstream::http1("up").start().await;
    let proxy = start_one_route(up.addr, r#"limits = { header_read_timeout = "300ms" }"#, "").await;
    let mut silent = tokio::net::TcpStream::connect(proxy.addr("web")).await.unwrap();
    // An HTTP/2 client that sent its preface and settings, and no request yet, is an idle
    // connection, not a slow head: the idle timeout (60 s) governs it.
    let mut h2 = tokio::net::TcpStream::connect(proxy.addr("web")).await.unwrap();
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let t = std::time::Instant::now();
    let n = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf))
        .await
        .expect("a silent client is cut within 5 s")
        .unwrap_or(0);
    assert_eq!(n, 0, "closed without an answer");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    // The HTTP/2 connection is still open: reading drains the server's frames, then waits.
    let open = tokio::time::timeout(Duration::from_secs(1), async {
        loop {
            match h2.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(open.is_err(), "the HTTP/2 connection was closed");
}
