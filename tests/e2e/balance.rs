//! Balancing: with one slow endpoint of three, peak-EWMA sends it clearly less traffic than
//! round robin does.

use std::sync::Arc;
use std::time::Duration;

use weir_tests::client::Client;
use weir_tests::proxy::{TestProxy, ADMIN};
use weir_tests::upstream::{Running, Upstream};

const REQUESTS: usize = 300;
const CONCURRENCY: usize = 6;

async fn drive(addr: std::net::SocketAddr, host: &'static str) {
    let mut tasks = Vec::new();
    for _ in 0..CONCURRENCY {
        tasks.push(tokio::spawn(async move {
            let mut c = Client::h1(addr).await;
            for _ in 0..REQUESTS / CONCURRENCY {
                let r = c.get("/", host).await;
                assert_eq!(r.status(), 200);
                weir_tests::collect(r.into_body()).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

fn shares(ups: &[Running], before: &[usize]) -> Vec<f64> {
    let counts: Vec<usize> = ups.iter().zip(before).map(|(u, b)| u.hits() - b).collect();
    let total: usize = counts.iter().sum();
    counts.iter().map(|&c| c as f64 / total as f64).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peak_ewma_sends_the_slow_endpoint_less_than_round_robin() {
    let ups = vec![
        Upstream::http1("fast-1").start().await,
        Upstream::http1("fast-2").start().await,
        Upstream::http1("slow")
            // Well above the 30 ms a fresh endpoint is assumed to take, so a busy fast endpoint
            // still looks cheaper than the slow one on a loaded machine.
            .delay(Duration::from_millis(150))
            .start()
            .await,
    ];
    let eps = ups
        .iter()
        .map(|u| format!("\"{}\"", u.addr))
        .collect::<Vec<_>>()
        .join(", ");
    let toml = format!(
        r#"{ADMIN}
[[listeners]]
name = "web"
address = "127.0.0.1:0"
[[routes]]
host = "rr.test"
cluster = "rr"
[[routes]]
host = "ewma.test"
cluster = "ewma"
[clusters.rr]
endpoints = [{eps}]
balance = "round-robin"
[clusters.ewma]
endpoints = [{eps}]
balance = "peak-ewma"
"#
    );
    let proxy = Arc::new(TestProxy::start(&toml, std::path::Path::new(".")).await);
    let addr = proxy.addr("web");

    let before: Vec<usize> = ups.iter().map(Running::hits).collect();
    drive(addr, "rr.test").await;
    let rr = shares(&ups, &before);

    let before: Vec<usize> = ups.iter().map(Running::hits).collect();
    drive(addr, "ewma.test").await;
    let ewma = shares(&ups, &before);

    eprintln!(
        "slow endpoint share: round robin {:.3}, peak-ewma {:.3}",
        rr[2], ewma[2]
    );
    assert!(
        (0.28..=0.39).contains(&rr[2]),
        "round robin gives each endpoint a third: {rr:?}"
    );
    assert!(ewma[2] < 0.10, "peak-ewma avoids the slow endpoint: {ewma:?}");
    assert!(
        ewma[2] * 3.0 < rr[2],
        "clearly less than round robin: {ewma:?} vs {rr:?}"
    );
    assert!(
        ewma[0] > 0.3 && ewma[1] > 0.3,
        "the fast endpoints share the load: {ewma:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_waiting_on_a_connect_counts_as_its_endpoints_load() {
    // A listener whose accept queue is full: the kernel drops further SYNs, so a connect
    // to it hangs, as to a blackholed endpoint. Requests waiting on it must weigh on its
    // peak-EWMA cost, or the balancer keeps choosing it until the connect timeout.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    sock.listen(0).unwrap();
    let hung: std::net::SocketAddr = sock.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..16 {
        match tokio::time::timeout(Duration::from_millis(200), tokio::net::TcpStream::connect(hung)).await {
            Ok(Ok(s)) => fillers.push(s),
            _ => break,
        }
    }
    let proxy = weir_tests::proxy::start_one_route(hung, "", r#"connect_timeout = "5s""#).await;
    let addr = proxy.addr("web");
    let waiting = tokio::spawn(async move { Client::h1(addr).await.get("/", "x").await.status() });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, body) = proxy.admin_get("/clusters").await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["clusters"][0]["endpoints"][0]["in_flight"], 1, "{body}");
    waiting.abort();
    drop(sock);
}
