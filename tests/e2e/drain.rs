//! Drain: on SIGTERM a long request in flight completes, new connections are refused, the
//! process exits 0. Runs the real `weir` binary.

use std::time::{Duration, Instant};

use weir_tests::client::Client;
use weir_tests::upstream::Upstream;

use crate::config_errors::WeirProcess;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_and_exits_zero() {
    drains_and_exits_zero(2).await;
}

/// One worker runs Weir on a current-thread runtime: the same drain there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_with_one_worker_thread() {
    drains_and_exits_zero(1).await;
}

async fn drains_and_exits_zero(workers: usize) {
    let up = Upstream::http1("up").start().await;
    let mut weir = WeirProcess::start(&format!(
        r#"
[runtime]
worker_threads = {workers}
drain_timeout = "10s"
[log]
format = "json"
access_log = true
[admin]
address = "127.0.0.1:0"
[[listeners]]
name = "web"
address = "127.0.0.1:0"
[[routes]]
cluster = "c"
[clusters.c]
endpoints = ["{}"]
"#,
        up.addr,
    ));
    let listener = weir.address(Some("web")).await;
    let admin_addr = weir.address(None).await;
    let start = Instant::now();
    loop {
        if tokio::net::TcpStream::connect(admin_addr).await.is_ok() {
            let mut c = Client::h1(admin_addr).await;
            if c.get("/ready", "admin").await.status() == 200 {
                break;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "weir did not become ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let long = tokio::spawn(async move {
        let mut c = Client::h1(listener).await;
        let r = c.get("/delay/1500", "x").await;
        let status = r.status();
        let body = weir_tests::collect(r.into_body()).await.unwrap();
        (status, body)
    });
    // SIGTERM only once the long request has reached the upstream (in flight for real).
    let deadline = Instant::now() + Duration::from_secs(10);
    while up.hits() == 0 {
        assert!(
            Instant::now() < deadline,
            "the long request never reached the upstream"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    weir.terminate();
    // The listener closes soon after the signal (the long request still has ~1 s to go).
    let deadline = Instant::now() + Duration::from_millis(900);
    while tokio::net::TcpStream::connect(listener).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "new connections are refused while draining"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !long.is_finished(),
        "the check ran while the request was in flight"
    );

    let (status, body) = long.await.unwrap();
    assert_eq!(status, 200, "the in-flight request completes");
    assert_eq!(&body[..], b"late");

    let deadline = Instant::now() + Duration::from_secs(10);
    let exit = loop {
        if let Some(s) = weir.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "weir did not exit after draining");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(exit.code(), Some(0));
    let logs = std::fs::read_to_string(&weir.log).unwrap();
    let access = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["target"] == "weir::access")
        .unwrap_or_else(|| panic!("an access-log line in JSON:\n{logs}"));
    assert_eq!(access["path"], "/delay/1500");
    assert_eq!(access["status"], 200);
    assert_eq!(access["cluster"], "c");
    assert_eq!(access["upstream.addr"], up.addr.to_string());
    assert!(
        access["bytes"].as_u64() == Some(4) && access["duration_us"].as_u64().unwrap() >= 1_000_000,
        "{access}"
    );
}
