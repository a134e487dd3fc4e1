//! Body phases and retries of Wasm filters, end to end: bodies rewritten on the way up and
//! down (streamed and buffered), a body denied before the upstream sees it, and a retry that
//! a filter asks for landing on the cluster's other endpoint with the request body replayed.

use weir_tests::client::Client;
use weir_tests::proxy::{one_route, TestProxy, ADMIN};
use weir_tests::upstream::{Running, Upstream};
use weir_tests::{collect, full};

const REWRITE: &str = env!("WEIR_FIXTURE_REWRITE");

fn rewrite(config: &str) -> String {
    format!("filters = [{{ name = \"rewrite\", file = \"{REWRITE}\", config = {{ {config} }} }}]")
}

async fn post(c: &mut Client, path: &str, body: impl Into<bytes::Bytes>) -> (u16, http::HeaderMap, String) {
    let req = http::Request::post(path)
        .header("host", "x")
        .body(full(body))
        .unwrap();
    let r = c.send(req).await.unwrap();
    let (parts, body) = r.into_parts();
    let body = String::from_utf8(collect(body).await.unwrap().to_vec()).unwrap();
    (parts.status.as_u16(), parts.headers, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buffered_request_body_is_rewritten_or_denied_before_the_upstream() {
    let up = Upstream::http1("up").start().await;
    let cfg = one_route(
        up.addr,
        &rewrite(r#"request_body = "buffer", deny_marker = "secret""#),
        "",
    );
    let proxy = TestProxy::start(&cfg, std::path::Path::new(".")).await;
    for mut c in [
        Client::h1(proxy.addr("web")).await,
        Client::h2c(proxy.addr("web")).await,
    ] {
        let (status, _, body) = post(&mut c, "/echo", "hello body").await;
        assert_eq!(status, 200);
        assert_eq!(
            body, "HELLO BODY|whole",
            "the filter saw the whole body once and rewrote it"
        );

        let hits = up.hits();
        let (status, _, body) = post(&mut c, "/echo", "this has a secret in it").await;
        assert_eq!((status, body.as_str()), (403, "body denied\n"));
        assert_eq!(
            up.hits(),
            hits,
            "a body denied while buffered never reaches the upstream"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_request_body_is_rewritten_chunk_by_chunk() {
    let up = Upstream::http2("up").start().await;
    let cfg = one_route(
        up.addr,
        &rewrite(r#"request_body = "stream""#),
        "protocol = \"http2\"",
    );
    let proxy = TestProxy::start(&cfg, std::path::Path::new(".")).await;
    let mut c = Client::h1(proxy.addr("web")).await;
    let sent = "abcdefgh".repeat(128 * 1024); // 1 MiB
    let (status, _, body) = post(&mut c, "/echo", sent.clone()).await;
    assert_eq!(status, 200);
    assert_eq!(body.len(), sent.len());
    assert_eq!(
        body,
        sent.to_ascii_uppercase(),
        "every chunk passed the filter, in order"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_bodies_are_rewritten_streamed_and_buffered() {
    let up = Upstream::http1("up").start().await;
    for mode in ["stream", "buffer"] {
        let cfg = one_route(up.addr, &rewrite(&format!("response_body = \"{mode}\"")), "");
        let proxy = TestProxy::start(&cfg, std::path::Path::new(".")).await;
        let mut c = Client::h1(proxy.addr("web")).await;
        let r = c.get("/headers", "x").await;
        assert_eq!(r.status(), 200);
        let length = r.headers().get("content-length").cloned();
        let body = String::from_utf8(collect(r.into_body()).await.unwrap().to_vec()).unwrap();
        assert!(body.starts_with("GET /HEADERS"), "{mode}: rewritten: {body}");
        assert!(
            body.ends_with("|end"),
            "{mode}: the last call had end-of-stream: {body}"
        );
        if mode == "buffer" {
            assert_eq!(
                length.unwrap().to_str().unwrap(),
                body.len().to_string(),
                "a gathered body gets its new length"
            );
        }
        // Bodies a filter does not want stream past: a second request on the same
        // connection still works after the rewritten one.
        let r = c.get("/headers", "x").await;
        assert_eq!(r.status(), 200);
        proxy.stop().await;
    }
}

/// A proxy whose `rewrite` filter retries 503s, over a cluster of `bad` then `good`.
/// Round robin, named: the default peak-EWMA balancer prefers whichever endpoint answered
/// faster so far, so how many first attempts reach the (quick) failing endpoint is up to
/// timing; CI once saw 1 in 10.
async fn retrying_to(bad: &Running, good: &Running) -> TestProxy {
    let toml = format!(
        "{ADMIN}\n[[listeners]]\nname = \"web\"\naddress = \"127.0.0.1:0\"\n{}\n\
         [[routes]]\ncluster = \"c\"\n[clusters.c]\nendpoints = [\"{}\", \"{}\"]\n\
         balance = \"round-robin\"\n",
        rewrite("retry_on = 503"),
        bad.addr,
        good.addr
    );
    TestProxy::start(&toml, std::path::Path::new(".")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_lands_on_the_second_endpoint_with_the_body_replayed() {
    let bad = Upstream::http1("bad").status(503).start().await;
    let good = Upstream::http1("good").start().await;
    let proxy = retrying_to(&bad, &good).await;
    let mut c = Client::h1(proxy.addr("web")).await;
    let mut retried = 0;
    for i in 0..10 {
        let payload = format!("payload {i}");
        let (status, h, body) = post(&mut c, "/echo", payload.clone()).await;
        assert_eq!(status, 200, "request {i}: the retry hid the failing endpoint");
        assert_eq!(h["x-upstream"], "good");
        assert_eq!(body, payload, "request {i}: the body was replayed whole");
        if h["x-attempt"] == "2" {
            retried += 1;
        } else {
            assert_eq!(h["x-attempt"], "1");
        }
    }
    assert!(
        retried >= 5,
        "round robin sends at least every other first attempt to the bad endpoint: {retried}"
    );
    assert_eq!(
        bad.hits(),
        retried,
        "each retried request tried the bad endpoint once"
    );

    let (_, m) = proxy.admin_get("/metrics").await;
    assert!(
        m.contains(&format!(
            "weir_filter_rewrite_retries_total{{filter=\"rewrite\"}} {retried}"
        )),
        "{m}"
    );
    // The log phase runs after the response; give it a moment.
    let mut logged = false;
    for _ in 0..50 {
        let (_, m) = proxy.admin_get("/metrics").await;
        if m.contains("weir_filter_rewrite_logged_total{filter=\"rewrite\",status=\"200\"} 10") {
            logged = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(logged, "on-log ran once per request");
}

/// The failing endpoint answers 503 to the head, before the body has come: the retry takes
/// what was recorded and the rest as the client sends it. (It was given up before, the body
/// not being whole yet: the 503 went to the client, in CI about once in 30 runs.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_asked_before_the_body_came_whole_sends_all_of_it() {
    let bad = Upstream::http1("bad").status(503).start().await;
    let good = Upstream::http1("good").start().await;
    let proxy = retrying_to(&bad, &good).await;
    let mut retried = 0;
    for i in 0..4 {
        let (tx, body) = weir_tests::channel_body();
        let req = http::Request::post("/echo")
            .header("host", "x")
            .body(body)
            .unwrap();
        let mut c = Client::h1(proxy.addr("web")).await;
        let sent = tokio::spawn(async move {
            let r = c.send(req).await.unwrap();
            let (parts, body) = r.into_parts();
            (parts, collect(body).await.unwrap())
        });
        let (hits, good_hits) = (bad.hits(), good.hits());
        tx.send(Ok(http_body::Frame::data(bytes::Bytes::from(format!(
            "first half {i}, "
        )))))
        .await
        .unwrap();
        // The bad endpoint answers as soon as it has the head; give it the time to.
        for _ in 0..50 {
            if bad.hits() > hits || good.hits() > good_hits {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        tx.send(Ok(http_body::Frame::data(bytes::Bytes::from_static(
            b"second half",
        ))))
        .await
        .unwrap();
        drop(tx);
        let (parts, body) = sent.await.unwrap();
        assert_eq!(
            parts.status, 200,
            "request {i}: the retry hid the failing endpoint"
        );
        assert_eq!(parts.headers["x-upstream"], "good");
        assert_eq!(
            body,
            format!("first half {i}, second half"),
            "request {i}: all of the body went again"
        );
        if parts.headers["x-attempt"] == "2" {
            retried += 1;
        }
    }
    assert!(
        retried >= 2,
        "round robin sent every other first attempt to the bad endpoint: {retried}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_get_goes_again_without_a_body() {
    let bad = Upstream::http1("bad").status(503).start().await;
    let good = Upstream::http1("good").start().await;
    let proxy = retrying_to(&bad, &good).await;
    let mut c = Client::h1(proxy.addr("web")).await;
    let mut retried = 0;
    for i in 0..6 {
        let r = c.get("/headers", "x").await;
        assert_eq!(r.status(), 200, "request {i}");
        let attempt = r.headers()["x-attempt"].to_str().unwrap().to_string();
        let seen = String::from_utf8(collect(r.into_body()).await.unwrap().to_vec()).unwrap();
        // What the upstream received: a GET with no body, so no framing header at all.
        assert!(seen.starts_with("GET /headers"), "{seen}");
        assert!(
            !seen.contains("transfer-encoding"),
            "request {i}, attempt {attempt}: {seen}"
        );
        assert!(
            !seen.contains("content-length"),
            "request {i}, attempt {attempt}: {seen}"
        );
        if attempt == "2" {
            retried += 1;
        }
    }
    assert!(
        retried >= 3,
        "every other first attempt meets the bad endpoint: {retried}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_stop_after_the_attempt_cap_when_every_endpoint_fails() {
    let a = Upstream::http1("a").status(503).start().await;
    let b = Upstream::http1("b").status(503).start().await;
    let toml = format!(
        "{ADMIN}\n[[listeners]]\nname = \"web\"\naddress = \"127.0.0.1:0\"\n{}\n\
         [[routes]]\ncluster = \"c\"\n[clusters.c]\nendpoints = [\"{}\", \"{}\"]\n",
        rewrite("retry_on = 503"),
        a.addr,
        b.addr
    );
    let proxy = TestProxy::start(&toml, std::path::Path::new(".")).await;
    let mut c = Client::h1(proxy.addr("web")).await;
    let r = c.get("/", "x").await;
    assert_eq!(r.status(), 503, "the last attempt's answer goes to the client");
    assert_eq!(r.headers()["x-attempt"], "5");
    assert_eq!(a.hits() + b.hits(), 5, "at most 5 attempts per request");
    assert!(a.hits() >= 2 && b.hits() >= 2, "attempts alternate endpoints");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_with_a_body_is_retried_when_no_endpoint_could_be_reached() {
    // The only endpoint refuses connections: every attempt fails before the request body is
    // read. The body was never sent, so a retry can send it: a POST must be retried as
    // often as a GET (it used to get one attempt, its unread body counted as not kept).
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = dead.local_addr().unwrap();
    drop(dead);
    // A proxy each: the first failure ejects the endpoint (later attempts get 503).
    let mut seen = Vec::new();
    for method in ["GET", "POST"] {
        let cfg = one_route(addr, &rewrite("retry_on = 502"), "");
        let proxy = TestProxy::start(&cfg, std::path::Path::new(".")).await;
        let mut c = Client::h1(proxy.addr("web")).await;
        let req = http::Request::builder()
            .method(method)
            .uri("/echo")
            .header("host", "x")
            .body(full(if method == "GET" { "" } else { "a small body" }))
            .unwrap();
        let r = c.send(req).await.unwrap();
        seen.push((
            r.status().as_u16(),
            r.headers()["x-attempt"].to_str().unwrap().to_string(),
        ));
    }
    assert_ne!(seen[0].1, "1", "a GET is retried: {seen:?}");
    assert_eq!(
        seen[1], seen[0],
        "a POST whose body was never sent is retried like a GET"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_body_over_the_limit_gets_413_with_or_without_a_streaming_filter() {
    // A body without Content-Length is only found too large while it streams upstream. The
    // upstream here is slow to answer, so the body overflows first: the client must get 413
    // (its fault), not 502 with the upstream blamed.
    let up = Upstream::http1("up")
        .delay(std::time::Duration::from_millis(500))
        .start()
        .await;
    let head = "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n";
    let raw = format!("{head}800\r\n{}\r\n0\r\n\r\n", "a".repeat(0x800));
    for filters in ["", &rewrite(r#"request_body = "stream""#)] {
        let listener = format!("limits = {{ max_request_body = 1024 }}\n{filters}");
        let proxy = TestProxy::start(&one_route(up.addr, &listener, ""), std::path::Path::new(".")).await;
        let (out, _) = weir_tests::client::raw_exchange(
            proxy.addr("web"),
            raw.as_bytes(),
            std::time::Duration::from_secs(3),
        )
        .await;
        assert_eq!(
            weir_tests::client::raw_status(&out),
            Some(413),
            "filters {filters:?}: {out}"
        );
        assert!(out.contains("body-too-large"), "{out}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_body_is_cut_behind_body_filters_too() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use weir_tests::client::raw_status;
    let idle = r#"limits = { stream_idle_timeout = "300ms" }"#;
    // Response: an upstream that sends half its body, then nothing. A filter buffering the
    // response reads it inside the proxy, where no client read bounded it: the request hung.
    let stalling = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up_addr = stalling.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = stalling.accept().await {
            tokio::spawn(async move {
                let mut head = [0u8; 1024];
                let _ = s.read(&mut head).await;
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
                    .await;
                tokio::time::sleep(std::time::Duration::from_secs(30)).await;
            });
        }
    });
    let listener = format!("{idle}\n{}", rewrite(r#"response_body = "buffer""#));
    let proxy = TestProxy::start(&one_route(up_addr, &listener, ""), std::path::Path::new(".")).await;
    let mut c = Client::h1(proxy.addr("web")).await;
    let r = tokio::time::timeout(std::time::Duration::from_secs(10), c.get("/", "x"))
        .await
        .expect("answered once the upstream's body went idle");
    assert_eq!(r.status(), 502);

    // Request: a client that sends half its body through a streaming request filter: 408,
    // as without the filter (it was 400 behind one).
    let up = Upstream::http1("up")
        .delay(std::time::Duration::from_secs(3))
        .start()
        .await;
    let listener = format!("{idle}\n{}", rewrite(r#"request_body = "stream""#));
    let proxy = TestProxy::start(&one_route(up.addr, &listener, ""), std::path::Path::new(".")).await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr("web")).await.unwrap();
    s.write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nhello")
        .await
        .unwrap();
    let mut out = vec![0u8; 4096];
    let n = tokio::time::timeout(std::time::Duration::from_secs(10), s.read(&mut out))
        .await
        .expect("an answer before the upstream's")
        .unwrap();
    let out = String::from_utf8_lossy(&out[..n]).into_owned();
    assert_eq!(raw_status(&out), Some(408), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_limit_gets_413_from_an_http2_cluster_too() {
    // hyper's HTTP/2 client only resets the stream when the body it sends fails: the error
    // the exchange returns had lost the cause, and the client got 502 blaming the upstream.
    let up = Upstream::http2("up")
        .delay(std::time::Duration::from_millis(500))
        .start()
        .await;
    let cfg = one_route(
        up.addr,
        "limits = { max_request_body = 1024 }",
        "protocol = \"http2\"",
    );
    let proxy = TestProxy::start(&cfg, std::path::Path::new(".")).await;
    let head = "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n";
    let raw = format!("{head}800\r\n{}\r\n0\r\n\r\n", "a".repeat(0x800));
    let (out, _) = weir_tests::client::raw_exchange(
        proxy.addr("web"),
        raw.as_bytes(),
        std::time::Duration::from_secs(3),
    )
    .await;
    assert_eq!(weir_tests::client::raw_status(&out), Some(413), "{out}");
}
