//! How the proxy reads HTTP/1.1 from upstreams: response framing (RFC 9112, section 6), interim
//! responses, upstreams that frame a response wrongly (502, and the proxy keeps serving), when
//! a connection goes back to the pool, and request trailers toward HTTP/1.1.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::BodyExt;
use hyper::body::Frame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weir_tests::client::{raw_exchange, read_head_chunks, Client};
use weir_tests::proxy::start_one_route;

/// The response the scripted upstream gives to a path, and whether it closes after it.
fn script(path: &str) -> (Vec<u8>, bool) {
    let r: (&[u8], bool) = match path {
        "/length" => (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", false),
        "/chunked" => (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
            false,
        ),
        "/interim" => (
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n\
              HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            false,
        ),
        "/reason" => (b"HTTP/1.1 200 Fine Thanks\r\nContent-Length: 0\r\n\r\n", false),
        "/close" => (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok", true),
        "/http10" => (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", false),
        "/http10-keep-alive" => (
            b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok",
            false,
        ),
        "/until-close" => (b"HTTP/1.1 200 OK\r\n\r\nuntil close", true),
        "/chunked-and-length" => (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 100\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            false,
        ),
        "/gzip-chunked" => (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            false,
        ),
        "/two-lengths" => (
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
            false,
        ),
        "/bad-chunk" => (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n",
            false,
        ),
        "/short" => (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello", true),
        // A lenient parser reads `3;` to the CRLF and the body as `abc`; the size line ends
        // at the bare LF for a strict one.
        "/ext-bare-lf" => (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;\nxyz\r\nabc\r\n0\r\n\r\n",
            false,
        ),
        "/long-ext" => {
            let mut r = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
            r.extend_from_slice(format!("5;x={}\r\nhello\r\n0\r\n\r\n", "a".repeat(5000)).as_bytes());
            return (r, false);
        }
        // Framing fields on responses that have no body: they frame nothing.
        "/head-gzip" => (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", false),
        "/interim-then-close" => (b"HTTP/1.1 100 Continue\r\n\r\n", true),
        "/304-lengths" => (
            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            false,
        ),
        "/big-head" => {
            let mut r = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n".to_vec();
            r.extend_from_slice(format!("x-big: {}\r\n\r\nok", "a".repeat(70 * 1024)).as_bytes());
            return (r, false);
        }
        // Fields as an upstream may write them: mixed case, its own request id and date.
        "/own-fields" => (
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Request-Id: up-7\r\nDATE: Tue, 01 Jan 2030 00:00:00 GMT\r\nX-Empty:\r\nContent-Length: 2\r\n\r\nok",
            false,
        ),
        // Hop-by-hop fields, one named by `Connection`: none of them is the client's.
        "/hop-by-hop" => (
            b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=5\r\nConnection: x-hop\r\nX-Hop: 1\r\nProxy-Authenticate: Basic\r\nX-Kept: 1\r\nContent-Length: 2\r\n\r\nok",
            false,
        ),
        "/no-content" => (b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nX-Kept: 1\r\n\r\n", false),
        _ => (b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", false),
    };
    (r.0.to_vec(), r.1)
}

/// An upstream answering each request on a connection by [`script`]; with the count of
/// connections it accepted.
async fn scripted() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    weir_tests::upstream::raw_server(|mut s| async move {
        while let Some(head) = read_head_chunks(&mut s).await {
            let head = String::from_utf8_lossy(&head).into_owned();
            let path = head.split(' ').nth(1).unwrap_or("/").to_string();
            let (answer, close) = script(&path);
            if s.write_all(&answer).await.is_err() || close {
                return;
            }
        }
    })
    .await
}

async fn get(c: &mut Client, path: &str) -> (u16, http::HeaderMap, Result<Bytes, String>) {
    let resp = c.get(path, "x").await;
    let (parts, body) = resp.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .map_err(|e| e.to_string());
    (parts.status.as_u16(), parts.headers, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_are_read_by_their_framing_and_misframed_ones_get_502() {
    let (up, _) = scripted().await;
    let proxy = start_one_route(up, "", "").await;
    let addr = proxy.addr("web");
    for (path, body) in [
        ("/length", "hello"),
        ("/chunked", "hello world"),
        ("/interim", "ok"),
        ("/until-close", "until close"),
        ("/http10", "ok"),
    ] {
        let (status, _, got) = get(&mut Client::h1(addr).await, path).await;
        assert_eq!(status, 200, "{path}");
        assert_eq!(got.as_deref(), Ok(body.as_bytes()), "{path}");
    }
    // Chunked wins over a Content-Length sent with it, which must not reach the client.
    let (status, headers, got) = get(&mut Client::h1(addr).await, "/chunked-and-length").await;
    assert_eq!((status, got.as_deref()), (200, Ok(&b"hello"[..])));
    assert_ne!(
        headers.get("content-length").map(|v| v.as_bytes()),
        Some(&b"100"[..])
    );
    // A custom reason phrase passes through.
    let (out, _) = raw_exchange(
        addr,
        b"GET /reason HTTP/1.1\r\nHost: x\r\n\r\n",
        Duration::from_millis(300),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 200 Fine Thanks\r\n"), "{out}");
    // Framing the proxy cannot pass on faithfully: 502, and it keeps serving.
    for path in ["/gzip-chunked", "/two-lengths", "/big-head"] {
        let (status, headers, _) = get(&mut Client::h1(addr).await, path).await;
        assert_eq!(status, 502, "{path}");
        assert_eq!(headers["x-weir-error"], "upstream-failed", "{path}");
        let (status, _, got) = get(&mut Client::h1(addr).await, "/length").await;
        assert_eq!((status, got.as_deref()), (200, Ok(&b"hello"[..])), "after {path}");
    }
    // A body that breaks after its head: the client sees the exchange fail (the head may or
    // may not have left), never a response that ends early as if complete.
    for path in ["/bad-chunk", "/short", "/ext-bare-lf", "/long-ext"] {
        let mut c = Client::h1(addr).await;
        let req = Request::get(path)
            .header("host", "x")
            .body(weir_tests::empty())
            .unwrap();
        match c.send(req).await {
            Ok(resp) => {
                assert_eq!(resp.status(), 200, "{path}");
                let got = resp.into_body().collect().await;
                assert!(got.is_err(), "{path}: {:?}", got.map(|b| b.to_bytes()));
            }
            Err(e) => assert!(e.is_incomplete_message(), "{path}: {e}"),
        }
        let (status, _, got) = get(&mut Client::h1(addr).await, "/length").await;
        assert_eq!((status, got.as_deref()), (200, Ok(&b"hello"[..])), "after {path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_goes_back_to_the_pool_only_when_the_response_allows() {
    let (up, conns) = scripted().await;
    let proxy = start_one_route(up, "", "").await;
    let mut c = Client::h1(proxy.addr("web")).await;
    let opened = |n: usize| conns.load(Ordering::SeqCst) == n;
    for path in ["/length", "/chunked", "/interim", "/http10-keep-alive", "/length"] {
        let (status, _, got) = get(&mut c, path).await;
        assert!(status == 200 && got.is_ok(), "{path}");
    }
    assert!(opened(1), "one connection for all: {conns:?}");
    // Each of these ends its connection: the next request opens another.
    let mut expected = 1;
    for path in ["/close", "/http10", "/until-close", "/chunked-and-length"] {
        let (status, _, got) = get(&mut c, path).await;
        assert!(status == 200 && got.is_ok(), "{path}");
        let (status, _, _) = get(&mut c, "/length").await;
        assert_eq!(status, 200);
        expected += 1;
        assert!(opened(expected), "after {path}: {conns:?}, expected {expected}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailers_an_http2_client_did_not_declare_reach_an_http1_upstream() {
    // gRPC clients send trailers without a `Trailer` header; hyper's HTTP/1.1 client sent only
    // declared ones, so they were lost on the way to an HTTP/1.1 upstream.
    let seen = Arc::new(tokio::sync::Mutex::new(Vec::new()));
    let keep = seen.clone();
    let (up, _) = weir_tests::upstream::raw_server(move |mut s| {
        let keep = keep.clone();
        async move {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            // The head, then the chunked body up to its last chunk and trailer section.
            while !(buf.windows(5).any(|w| w == b"\r\n0\r\n") && buf.ends_with(b"\r\n\r\n")) {
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            *keep.lock().await = buf;
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .await;
        }
    })
    .await;
    let proxy = start_one_route(up, "", "").await;
    let mut c = Client::h2c(proxy.addr("web")).await;
    let (tx, body) = weir_tests::channel_body();
    let req = Request::post("/rpc")
        .header("host", "x")
        .header("te", "trailers")
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
    assert_eq!(resp.status(), 200);
    let seen = String::from_utf8_lossy(&seen.lock().await).to_ascii_lowercase();
    assert!(seen.contains("transfer-encoding: chunked\r\n"), "{seen}");
    assert!(
        seen.ends_with("\r\n7\r\npayload\r\n0\r\nx-checksum: c0ffee\r\n\r\n"),
        "{seen}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn framing_fields_of_bodiless_responses_frame_nothing() {
    let (up, _) = scripted().await;
    let proxy = start_one_route(up, "", "").await;
    let addr = proxy.addr("web");
    // A HEAD's answer may name the transfer coding its GET would use (RFC 9112 §6.1).
    let req = Request::head("/head-gzip")
        .header("host", "x")
        .body(weir_tests::empty())
        .unwrap();
    let resp = Client::h1(addr).await.send(req).await.expect("HEAD");
    assert_eq!(resp.status(), 200);
    let (status, _, got) = get(&mut Client::h1(addr).await, "/304-lengths").await;
    assert_eq!((status, got.as_deref()), (304, Ok(&b""[..])));
    let (status, _, got) = get(&mut Client::h1(addr).await, "/length").await;
    assert_eq!((status, got.as_deref()), (200, Ok(&b"hello"[..])));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_the_upstream_acknowledged_is_not_sent_again() {
    // A pooled connection that rested is resent on when it turns out closed before any
    // answer; a 100 Continue is an answer: the upstream took the request.
    let (up, conns) = scripted().await;
    let proxy = start_one_route(up, "", "").await;
    let mut c = Client::h1(proxy.addr("web")).await;
    let (status, _, _) = get(&mut c, "/length").await;
    assert_eq!(status, 200);
    tokio::time::sleep(weir::limits::RESEND_AFTER_IDLE * 3).await;
    let (status, headers, _) = get(&mut c, "/interim-then-close").await;
    assert_eq!(status, 502);
    assert_eq!(headers["x-weir-error"], "upstream-failed");
    assert_eq!(
        conns.load(Ordering::SeqCst),
        1,
        "the request went out again on a new connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_fields_reach_the_client_as_the_upstream_sent_them_less_the_hop_by_hop_ones() {
    // Weir's HTTP/1.1 server writes a response head it can pass on untouched from the bytes
    // the upstream sent (no header map in between): the same fields must come out as through
    // the map, names in lowercase, each once, with the proxy's request id and date only when
    // the upstream sent none.
    let (up, _) = scripted().await;
    let proxy = start_one_route(up, "", "").await;
    let addr = proxy.addr("web");
    let exchange = |path: &'static str| async move {
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
        let (out, _) = raw_exchange(addr, req.as_bytes(), Duration::from_millis(300)).await;
        let head = out.split("\r\n\r\n").next().unwrap_or_default().to_string();
        let lines: Vec<String> = head.lines().skip(1).map(str::to_string).collect();
        (out, lines)
    };
    let count = |lines: &[String], name: &str| {
        lines
            .iter()
            .filter(|l| l.starts_with(&format!("{name}:")))
            .count()
    };

    let (out, lines) = exchange("/own-fields").await;
    assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
    assert!(out.ends_with("\r\n\r\nok"), "{out}");
    for want in [
        "content-type: text/plain",
        "x-request-id: up-7",
        "date: Tue, 01 Jan 2030 00:00:00 GMT",
        "x-empty: ",
        "content-length: 2",
    ] {
        assert_eq!(lines.iter().filter(|l| *l == want).count(), 1, "{want}: {out}");
    }
    assert_eq!(lines.len(), 5, "{out}");

    let (out, lines) = exchange("/length").await;
    assert!(out.ends_with("\r\n\r\nhello"), "{out}");
    assert_eq!(count(&lines, "x-request-id"), 1, "{out}");
    assert_eq!(count(&lines, "date"), 1, "{out}");
    assert_eq!(count(&lines, "content-length"), 1, "{out}");

    let (out, lines) = exchange("/hop-by-hop").await;
    assert!(out.ends_with("\r\n\r\nok"), "{out}");
    for gone in ["keep-alive", "connection", "x-hop", "proxy-authenticate"] {
        assert_eq!(count(&lines, gone), 0, "{gone}: {out}");
    }
    assert_eq!(count(&lines, "x-kept"), 1, "{out}");

    // No length on a 204 (RFC 9110 §8.6), the other fields kept.
    let (out, lines) = exchange("/no-content").await;
    assert!(out.starts_with("HTTP/1.1 204 No Content\r\n"), "{out}");
    assert_eq!(count(&lines, "content-length"), 0, "{out}");
    assert_eq!(count(&lines, "x-kept"), 1, "{out}");

    // As an HTTP client library reads it.
    let mut c = Client::h1(addr).await;
    let (status, headers, got) = get(&mut c, "/own-fields").await;
    assert_eq!((status, got.as_deref()), (200, Ok(&b"ok"[..])));
    assert_eq!(headers["x-request-id"], "up-7");
    assert_eq!(headers.get_all("x-request-id").iter().count(), 1);
}
