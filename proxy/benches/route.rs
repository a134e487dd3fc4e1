//! Hot paths of the request path, side by side: route lookup, path canonicalisation,
//! endpoint choice (round robin vs P2C peak-EWMA) and hop-by-hop stripping. `cargo bench -p weir`.

use std::sync::Arc;
use std::time::Duration;

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use http::{HeaderMap, HeaderValue};
use weir::balance::{Balancer, Load};
use weir::config::{BalanceAlgorithm, Config};
use weir::metrics::Metrics;
use weir::route::RouteTable;

fn routes(c: &mut Criterion) {
    let mut toml = String::from("[[listeners]]\nname = \"web\"\naddress = \"127.0.0.1:0\"\n");
    for i in 0..20 {
        toml.push_str(&format!(
            "[[routes]]\nhost = \"svc{i}.example.com\"\npath_prefix = \"/api/v{i}\"\ncluster = \"c\"\n"
        ));
    }
    toml.push_str("[[routes]]\ncluster = \"c\"\n[clusters.c]\nendpoints = [\"127.0.0.1:1\"]\n");
    let cfg = Config::from_toml(&toml, "bench", std::path::Path::new(".")).unwrap();
    let table = RouteTable::build(&cfg, "web", &Metrics::new(), |_| {
        weir::filter::FilterChain::default()
    });
    let mut g = c.benchmark_group("route");
    g.bench_function("first_of_21", |b| {
        b.iter(|| table.find(black_box("svc0.example.com"), black_box("/api/v0/users")))
    });
    g.bench_function("last_of_21", |b| {
        b.iter(|| table.find(black_box("other.example.com"), black_box("/x")))
    });
    g.finish();
}

fn paths(c: &mut Criterion) {
    let mut g = c.benchmark_group("path_normalize");
    for (name, p) in [
        ("canonical", "/api/v1/users/42/orders"),
        ("dots_and_escapes", "/api/./v1/%75sers/../users/42"),
    ] {
        g.bench_with_input(BenchmarkId::from_parameter(name), p, |b, p| {
            b.iter(|| weir::path::normalize(black_box(p)))
        });
    }
    g.finish();
}

fn balance(c: &mut Criterion) {
    let loads: Vec<Arc<Load>> = (0..8)
        .map(|i| {
            let l = Arc::new(Load::new(Duration::from_millis(1), Duration::from_secs(10)));
            l.observe(Duration::from_micros(200 + i * 50));
            l
        })
        .collect();
    let mut g = c.benchmark_group("balance_pick_of_8");
    for alg in [BalanceAlgorithm::RoundRobin, BalanceAlgorithm::PeakEwma] {
        let b8 = Balancer::new(alg);
        g.bench_function(format!("{alg:?}"), |b| {
            b.iter(|| b8.pick(8, |_| true, |i| &loads[i]))
        });
    }
    g.finish();
}

fn headers(c: &mut Criterion) {
    let mut base = HeaderMap::new();
    for (k, v) in [
        ("host", "api.example.com"),
        ("user-agent", "bench/1.0"),
        ("accept", "*/*"),
        ("connection", "keep-alive"),
        ("content-type", "application/json"),
        ("authorization", "Bearer abc.def.ghi"),
        ("x-request-id", "0123456789abcdef"),
    ] {
        base.insert(k, HeaderValue::from_static(v));
    }
    c.bench_function("strip_hop_by_hop_7_headers", |b| {
        b.iter_batched_ref(
            || base.clone(),
            |h| weir::proxy::strip_hop_by_hop(h, true),
            criterion::BatchSize::SmallInput,
        )
    });
}

criterion_group!(benches, routes, paths, balance, headers);
criterion_main!(benches);
