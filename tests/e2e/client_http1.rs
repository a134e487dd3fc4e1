//! Weir's HTTP/1.1 server toward clients, byte by byte: pipelining, `Expect: 100-continue`,
//! HTTP/1.0 keep-alive, the header read timeout between requests, trailers for clients that
//! take them.

use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use weir_tests::proxy::start_one_route;
use weir_tests::upstream::Upstream;

/// One response read off a raw connection.
struct Raw {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    trailers: Vec<(String, String)>,
}

impl Raw {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Reads one response (after any interim ones if `skip_interim`) from `s`, with `buf` holding
/// bytes read past the previous one. `None` if the connection closed or 5 s passed first.
async fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>, skip_interim: bool) -> Option<Raw> {
    async fn more(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<()> {
        let mut chunk = [0u8; 16384];
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => {
                buf.extend_from_slice(&chunk[..n]);
                Some(())
            }
            _ => None,
        }
    }
    loop {
        let (status, headers, used) = loop {
            let mut slots = [httparse::EMPTY_HEADER; 64];
            let mut r = httparse::Response::new(&mut slots);
            match r.parse(buf).expect("a valid response head") {
                httparse::Status::Complete(n) => {
                    let h = r
                        .headers
                        .iter()
                        .map(|h| (h.name.to_string(), String::from_utf8_lossy(h.value).into_owned()))
                        .collect::<Vec<_>>();
                    break (r.code.unwrap(), h, n);
                }
                httparse::Status::Partial => more(s, buf).await?,
            }
        };
        buf.drain(..used);
        let mut raw = Raw {
            status,
            headers,
            body: Vec::new(),
            trailers: Vec::new(),
        };
        if (100..200).contains(&status) {
            if skip_interim {
                continue;
            }
            return Some(raw);
        }
        if let Some(len) = raw.header("content-length") {
            let len: usize = len.parse().unwrap();
            while buf.len() < len {
                more(s, buf).await?;
            }
            raw.body = buf.drain(..len).collect();
        } else if raw.header("transfer-encoding") == Some("chunked") {
            loop {
                let size = loop {
                    match httparse::parse_chunk_size(buf) {
                        Ok(httparse::Status::Complete((n, size))) => {
                            buf.drain(..n);
                            break size as usize;
                        }
                        Ok(httparse::Status::Partial) => more(s, buf).await?,
                        Err(_) => panic!("bad chunk size line: {:?}", String::from_utf8_lossy(buf)),
                    }
                };
                if size == 0 {
                    break;
                }
                while buf.len() < size + 2 {
                    more(s, buf).await?;
                }
                raw.body.extend(buf.drain(..size));
                buf.drain(..2);
            }
            // The trailer section, up to its blank line.
            loop {
                if let Some(end) = buf.windows(2).position(|w| w == b"\r\n") {
                    let line: Vec<u8> = buf.drain(..end + 2).collect();
                    if end == 0 {
                        break;
                    }
                    let line = String::from_utf8_lossy(&line[..end]).into_owned();
                    let (n, v) = line.split_once(':').expect("a trailer field");
                    raw.trailers.push((n.to_string(), v.trim().to_string()));
                } else {
                    more(s, buf).await?;
                }
            }
        }
        return Some(raw);
    }
}

/// Whether the proxy closed `s` (end of stream or reset) within `wait`.
async fn closed_within(s: &mut TcpStream, wait: Duration) -> bool {
    let mut b = [0u8; 1024];
    loop {
        match tokio::time::timeout(wait, s.read(&mut b)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order_on_one_connection() {
    let up = Upstream::http1("up").start().await;
    let proxy = start_one_route(up.addr, "", "").await;
    let mut s = TcpStream::connect(proxy.addr("web")).await.unwrap();
    // Four requests in one write: two GETs, a POST with a body, a chunked POST, a GET.
    s.write_all(
        b"GET /headers?n=1 HTTP/1.1\r\nHost: x\r\n\r\n\
          POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
          POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n\
          GET /headers?n=2 HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    let mut bodies = Vec::new();
    for i in 0..4 {
        let r = read_response(&mut s, &mut buf, false)
            .await
            .unwrap_or_else(|| panic!("response {i} missing"));
        assert_eq!(r.status, 200, "response {i}");
        bodies.push(String::from_utf8_lossy(&r.body).into_owned());
    }
    assert!(bodies[0].starts_with("GET /headers?n=1 "), "{bodies:?}");
    assert_eq!(bodies[1], "hello");
    assert_eq!(bodies[2], "abcde");
    assert!(bodies[3].starts_with("GET /headers?n=2 "), "{bodies:?}");
    // Still open for a fifth.
    s.write_all(b"GET /headers?n=3 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let r = read_response(&mut s, &mut buf, false)
        .await
        .expect("the connection stays open");
    assert_eq!(r.status, 200);
    assert_eq!(up.hits(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_is_answered_before_the_body_is_sent() {
    // An upstream that answers only once it has the whole body (an echo that answers at once
    // would start the response first, and a response under way means no 100 is owed).
    let raw = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up_addr = raw.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = raw.accept().await {
            tokio::spawn(async move {
                let mut got = Vec::new();
                let mut b = [0u8; 4096];
                loop {
                    let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match c.read(&mut b).await {
                            Ok(n) if n > 0 => got.extend_from_slice(&b[..n]),
                            _ => return,
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&got[..end]).to_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map_or(0, |v| v.trim().parse().unwrap());
                    while got.len() < end + 4 + len {
                        match c.read(&mut b).await {
                            Ok(n) if n > 0 => got.extend_from_slice(&b[..n]),
                            _ => return,
                        }
                    }
                    let body: Vec<u8> = got.drain(..end + 4 + len).skip(end + 4).collect();
                    let mut resp =
                        format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len()).into_bytes();
                    resp.extend_from_slice(&body);
                    if c.write_all(&resp).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let proxy = start_one_route(up_addr, "", "").await;
    let mut s = TcpStream::connect(proxy.addr("web")).await.unwrap();
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\nExpect: 100-continue\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    // A client waits for the interim answer before it sends the body.
    let interim = read_response(&mut s, &mut buf, false)
        .await
        .expect("an interim response before the body");
    assert_eq!(interim.status, 100);
    s.write_all(b"hello world").await.unwrap();
    let r = read_response(&mut s, &mut buf, false)
        .await
        .expect("the response");
    assert_eq!(r.status, 200);
    assert_eq!(r.body, b"hello world");
    // And the connection serves the next request.
    s.write_all(b"GET /headers HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(
        read_response(&mut s, &mut buf, false).await.expect("next").status,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http10_client_asking_for_keep_alive_keeps_its_connection() {
    let up = Upstream::http1("up").start().await;
    let proxy = start_one_route(up.addr, "", "").await;
    let mut s = TcpStream::connect(proxy.addr("web")).await.unwrap();
    let mut buf = Vec::new();
    for i in 0..2 {
        s.write_all(b"GET /headers HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            .await
            .unwrap();
        let r = read_response(&mut s, &mut buf, false)
            .await
            .unwrap_or_else(|| panic!("request {i} answered on the same connection"));
        assert_eq!(r.status, 200);
        assert_eq!(r.header("connection"), Some("keep-alive"), "request {i}");
        assert!(
            r.header("content-length").is_some(),
            "an HTTP/1.0 client cannot read chunked"
        );
    }
    // Without it, the connection closes after the answer.
    s.write_all(b"GET /headers HTTP/1.0\r\n\r\n").await.unwrap();
    let r = read_response(&mut s, &mut buf, false).await.expect("answered");
    assert_eq!(r.header("connection"), Some("close"));
    assert!(closed_within(&mut s, Duration::from_secs(3)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_started_after_a_served_request_is_cut_by_the_header_timeout() {
    // The timer runs for every head, not only a connection's first.
    let up = Upstream::http1("up").start().await;
    let proxy = start_one_route(up.addr, r#"limits = { header_read_timeout = "300ms" }"#, "").await;
    let mut s = TcpStream::connect(proxy.addr("web")).await.unwrap();
    let mut buf = Vec::new();
    for _ in 0..3 {
        s.write_all(b"GET /headers HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(
            read_response(&mut s, &mut buf, false)
                .await
                .expect("served")
                .status,
            200
        );
    }
    let t = std::time::Instant::now();
    s.write_all(b"GET /headers HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    assert!(
        closed_within(&mut s, Duration::from_secs(3)).await,
        "an unfinished head is cut off"
    );
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(2),
        "{took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_trailers_reach_a_client_that_takes_them() {
    // An HTTP/2 upstream: its echo always ends with trailers (the request's, and a gRPC status).
    let up = Upstream::http2("up").start().await;
    let proxy = start_one_route(up.addr, "", r#"protocol = "http2""#).await;
    let mut buf = Vec::new();
    for (te, want) in [("TE: trailers\r\n", true), ("", false)] {
        let mut s = TcpStream::connect(proxy.addr("web")).await.unwrap();
        let req = format!(
            "POST /echo HTTP/1.1\r\nHost: x\r\n{te}Trailer: x-sum\r\nTransfer-Encoding: chunked\r\n\r\n\
             4\r\ndata\r\n0\r\nx-sum: 42\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.unwrap();
        buf.clear();
        let r = read_response(&mut s, &mut buf, false).await.expect("answered");
        assert_eq!(r.status, 200);
        assert_eq!(r.body, b"data");
        let got = r.trailers.iter().any(|(n, v)| n == "x-sum" && v == "42");
        assert_eq!(got, want, "te {te:?}: {:?}", r.trailers);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_header_fields_get_431() {
    let up = Upstream::http1("up").start().await;
    let proxy = start_one_route(up.addr, r#"limits = { max_headers = 10 }"#, "").await;
    let mut s = TcpStream::connect(proxy.addr("web")).await.unwrap();
    let fields: String = (0..11).map(|i| format!("x-f{i}: v\r\n")).collect();
    s.write_all(format!("GET /headers HTTP/1.1\r\nHost: x\r\n{fields}\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    let r = read_response(&mut s, &mut buf, false).await.expect("answered");
    assert_eq!(r.status, 431);
    assert!(closed_within(&mut s, Duration::from_secs(3)).await);
    assert_eq!(up.hits(), 0);
}

/// CPU time (user + system) a process has used, in clock ticks (1/100 s).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces), from field 3 on.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_waiting_for_its_client_costs_no_cpu() {
    // The request body is read as the upstream exchange asks for it; while the client sends
    // nothing, the connection sleeps. (It used to wake itself for ever: a slow upload kept a
    // core busy.) A `weir` process of its own, so its CPU time is the proxy's alone.
    let up = Upstream::http1("up").start().await;
    let mut weir = crate::config_errors::WeirProcess::start(&format!(
        "[runtime]\nworker_threads = 1\n[log]\nformat = \"json\"\n[admin]\nenabled = false\n\
         [[listeners]]\nname = \"web\"\naddress = \"127.0.0.1:0\"\n\
         [[routes]]\ncluster = \"c\"\n[clusters.c]\nendpoints = [\"{}\"]\n",
        up.addr
    ));
    let addr = weir.address(Some("web")).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nhello")
        .await
        .unwrap();
    // The exchange is under way (the echo streams back what came) before the client pauses.
    let mut first = [0u8; 256];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut first))
        .await
        .expect("the response starts")
        .unwrap();
    assert!(
        first[..n].starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&first[..n])
    );
    let before = cpu_ticks(weir.child.id());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let used = cpu_ticks(weir.child.id()) - before;
    s.write_all(b"world").await.unwrap();
    let mut rest = Vec::from(&first[..n]);
    while !String::from_utf8_lossy(&rest).contains("world") {
        let mut b = [0u8; 256];
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await {
            Ok(Ok(m)) if m > 0 => rest.extend_from_slice(&b[..m]),
            _ => break,
        }
    }
    drop(weir);
    assert!(used <= 20, "{used} ticks of CPU in 1 s of waiting for the client");
    assert!(
        String::from_utf8_lossy(&rest).contains("world"),
        "{:?}",
        String::from_utf8_lossy(&rest)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_answered_before_it_was_read_keeps_the_connection_only_when_all_of_it_came() {
    let up = Upstream::http1("up").start().await;
    let toml = format!(
        "{}\n[[listeners]]\nname = \"web\"\naddress = \"127.0.0.1:0\"\n\
         limits = {{ max_request_body = 1000 }}\n\
         [[routes]]\nhost = \"known.test\"\ncluster = \"c\"\n[clusters.c]\nendpoints = [\"{}\"]\n",
        weir_tests::proxy::ADMIN,
        up.addr
    );
    let proxy = weir_tests::proxy::TestProxy::start(&toml, std::path::Path::new(".")).await;
    let mut buf = Vec::new();
    // No route: answered without reading the body, which is all here (in one write with its
    // head, chunked or sized): it is dropped and the connection serves the next request.
    let mut s = TcpStream::connect(proxy.addr("web")).await.unwrap();
    s.write_all(
        b"POST / HTTP/1.1\r\nHost: nowhere.test\r\nContent-Length: 5\r\n\r\nhello\
          POST / HTTP/1.1\r\nHost: nowhere.test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n\
          GET /headers HTTP/1.1\r\nHost: known.test\r\n\r\n",
    )
    .await
    .unwrap();
    for want in [404, 404, 200] {
        let r = read_response(&mut s, &mut buf, false).await.expect("answered");
        assert_eq!(r.status, want);
        assert_eq!(r.header("connection"), None, "{want}: kept alive");
    }
    // Over the body limit, its body not sent yet: the answer says the connection closes,
    // and it does (what the client still sends is read and dropped, not refused with a reset).
    let mut s = TcpStream::connect(proxy.addr("web")).await.unwrap();
    buf.clear();
    s.write_all(b"POST / HTTP/1.1\r\nHost: known.test\r\nContent-Length: 5000\r\n\r\nsome of it")
        .await
        .unwrap();
    let r = read_response(&mut s, &mut buf, false).await.expect("answered");
    assert_eq!(r.status, 413);
    assert_eq!(r.header("connection"), Some("close"));
    // The client, not reading the answer's end yet, goes on sending its body.
    let _ = s.write_all(&[b'x'; 4000]).await;
    assert!(closed_within(&mut s, Duration::from_secs(5)).await);
    assert_eq!(up.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_the_http2_upstream_answered_early_is_ended_upstream_too() {
    // Over HTTP/2 the request body is read by the upstream connection's own task. An upstream
    // that answers before the body ends (a 200 for a stream, a 413) ends the exchange on the
    // client side (the connection closes: the rest of the body is not read); the body's
    // reader was never told, so the upstream's stream stayed open (holding one of the
    // connection's streams) for ever.
    use http_body_util::BodyExt as _;
    let (tx, mut ended) = tokio::sync::mpsc::unbounded_channel::<String>();
    let h2 = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up_addr = h2.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = h2.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let tx = tx.clone();
                    async move {
                        // Answers at once; reads the body to its end (or failure) meanwhile.
                        tokio::spawn(async move {
                            let outcome = match req.into_body().collect().await {
                                Ok(b) => format!("complete, {} bytes", b.to_bytes().len()),
                                Err(e) => format!("failed: {e}"),
                            };
                            let _ = tx.send(outcome);
                        });
                        Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(
                            bytes::Bytes::from_static(b"ok"),
                        )))
                    }
                });
                let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    let proxy = start_one_route(up_addr, "", r#"protocol = "http2""#).await;
    let mut s = TcpStream::connect(proxy.addr("web")).await.unwrap();
    s.write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\nfirst bytes")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let r = read_response(&mut s, &mut buf, false).await.expect("answered");
    assert_eq!((r.status, &r.body[..]), (200, &b"ok"[..]));
    let outcome = tokio::time::timeout(Duration::from_secs(5), ended.recv())
        .await
        .expect("the upstream learns that the upload ended")
        .unwrap();
    assert!(outcome.starts_with("failed"), "{outcome}");
}
