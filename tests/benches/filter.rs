//! The filter host's hot path, side by side in one run: taking a warm instance from the pool,
//! a no-op phase call, a phase call with 0 and with 8 host calls, and a realistic
//! header-rewrite filter (the `policy` test filter: reads the path and two headers, sets one
//! header, bumps a counter) against the same logic in native Rust; and the gateway example's
//! policy filters (ratelimit, router, auth by API key) one by one and as the chain, with the
//! request the load bench sends. `cargo bench -p weir-tests --bench filter`.

use std::sync::Arc;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion};
use http::HeaderValue;
use weir::filter::host::FilterShared;
use weir::filter::wasm::{FilterLimits, WasmEngine, WasmFilter};
use weir::filter::{Action, Filter, FilterError, PhaseFuture, RequestContext};
use weir::metrics::Metrics;

async fn load(engine: &Arc<WasmEngine>, name: &str, path: &str, json: &str) -> WasmFilter {
    load_with(engine, name, path, json, Default::default()).await
}

async fn load_with(
    engine: &Arc<WasmEngine>,
    name: &str,
    path: &str,
    json: &str,
    clusters: Arc<weir::cluster::Clusters>,
) -> WasmFilter {
    let shared = Arc::new(FilterShared::new(name.into(), clusters));
    let limits = FilterLimits {
        cpu_budget: std::time::Duration::from_millis(20),
        memory: 32 << 20,
        max_instances: 16,
        files: None,
    };
    engine
        .load_file(
            path.as_ref(),
            json.into(),
            limits,
            shared,
            Arc::new(Metrics::new()),
        )
        .await
        .expect("load filter")
}

const API_KEY: HeaderValue = HeaderValue::from_static("bench-key");

fn head() -> (http::request::Parts, RequestContext) {
    let parts = http::Request::get("/api/users/42")
        .header("host", "api.example.com")
        .header("user-agent", "bench")
        .header("accept", "*/*")
        .body(())
        .unwrap()
        .into_parts()
        .0;
    let ctx = RequestContext {
        route: None,
        cluster: Some("c".into()),
        ..RequestContext::new(
            "bench".into(),
            "127.0.0.1:5000".parse().unwrap(),
            None,
            HeaderValue::from_static("0123456789abcdef"),
        )
    };
    (parts, ctx)
}

/// The policy filter's request phase written natively, for the boundary's cost.
struct NativePolicy(Arc<std::sync::atomic::AtomicU64>);

impl Filter for NativePolicy {
    fn name(&self) -> &str {
        "native"
    }
    fn on_request_headers<'a>(
        &'a self,
        req: &'a mut http::request::Parts,
        _ctx: &'a mut RequestContext,
    ) -> PhaseFuture<'a> {
        let r: Result<Action, FilterError> = (|| {
            if req.uri.path() == "/deny" {
                return Ok(Action::Continue);
            }
            let _ = req.headers.get("x-route-to");
            let _ = req.headers.get("x-call");
            req.headers.insert("x-filtered", HeaderValue::from_static("yes"));
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(Action::Continue)
        })();
        Box::pin(std::future::ready(r))
    }
}

fn filters(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let engine = WasmEngine::new().unwrap();
    let noop = rt.block_on(load(&engine, "noop", env!("WEIR_FIXTURE_NOOP"), "{}"));
    let policy = rt.block_on(load(
        &engine,
        "policy",
        env!("WEIR_FIXTURE_POLICY"),
        r#"{"value": "yes", "deny_path": "/deny"}"#,
    ));
    let native = NativePolicy(Arc::default());

    // 'static borrows for the closures: the filters live for the whole bench run.
    let noop: &'static WasmFilter = Box::leak(Box::new(noop));
    let policy: &'static WasmFilter = Box::leak(Box::new(policy));
    let native: &'static NativePolicy = Box::leak(Box::new(native));
    let rt = &rt;
    let mut g = c.benchmark_group("filter");
    g.bench_function("pool_checkout_checkin", |b| {
        b.to_async(rt).iter(|| noop.pool_roundtrip())
    });
    let phase = |f: &'static dyn Filter| {
        move |b: &mut criterion::Bencher| {
            b.to_async(rt).iter_custom(|iters| async move {
                let (mut parts, mut ctx) = head();
                let start = Instant::now();
                for _ in 0..iters {
                    // auth removes the credential it used: each request brings it again.
                    parts.headers.insert("x-api-key", API_KEY);
                    f.on_request_headers(&mut parts, &mut ctx).await.unwrap();
                }
                start.elapsed()
            })
        }
    };
    g.bench_function("noop_on_request_headers", phase(noop));
    // The boundary's two costs apart: a phase call with nothing in it, and the same call
    // making 8 host calls that each return a string (per host call: the difference / 8).
    for calls in [0, 8] {
        let f = rt.block_on(load(
            &engine,
            "calls",
            env!("WEIR_FIXTURE_CALLS"),
            &format!(r#"{{"calls": {calls}}}"#),
        ));
        let f: &'static WasmFilter = Box::leak(Box::new(f));
        g.bench_function(format!("phase_call_with_{calls}_host_calls"), phase(f));
    }
    g.bench_function("policy_on_request_headers_wasm", phase(policy));
    g.bench_function("policy_on_request_headers_native", phase(native));

    // The gateway chain of the load bench (bench/load.sh), each filter's request phase alone
    // and the three in order, as the core runs them.
    let cfg = weir::Config::from_toml(
        "[[listeners]]\nname = \"b\"\naddress = \"127.0.0.1:0\"\n\
         [[routes]]\ncluster = \"up\"\n[clusters.up]\nendpoints = [\"127.0.0.1:9\"]\n",
        "bench.toml",
        std::path::Path::new("."),
    )
    .unwrap();
    let up = weir::cluster::Cluster::new("up", &cfg.clusters["up"], &cfg, Arc::new(Metrics::new())).unwrap();
    let clusters: Arc<weir::cluster::Clusters> =
        Arc::new([(Arc::from("up"), Arc::new(up))].into_iter().collect());
    let key = weir::filter::wasm::digest(b"bench-key");
    let key = key.strip_prefix("sha256:").expect("an OCI-style digest");
    let gateway: [(&str, &str, String); 3] = [
        (
            "ratelimit",
            env!("WEIR_FILTER_RATELIMIT"),
            r#"{"requests": 100000000, "per": "1s", "key": "client_ip"}"#.into(),
        ),
        (
            "router",
            env!("WEIR_FILTER_ROUTER"),
            r#"{"rules": [{"matches": [{"path": {"type": "PathPrefix", "value": "/api"}}], "backendRefs": [{"name": "up"}]}]}"#.into(),
        ),
        (
            "auth",
            env!("WEIR_FILTER_AUTH"),
            format!(r#"{{"api_keys": {{"header": "x-api-key", "keys": [{{"name": "bench", "sha256": "{key}"}}]}}}}"#),
        ),
    ];
    let mut chain: Vec<&'static WasmFilter> = Vec::new();
    for (name, file, json) in &gateway {
        let f = rt.block_on(load_with(&engine, name, file, json, clusters.clone()));
        let f: &'static WasmFilter = Box::leak(Box::new(f));
        g.bench_function(format!("gateway_{name}_on_request_headers"), phase(f));
        chain.push(f);
    }
    let chain: &'static [&'static WasmFilter] = Box::leak(chain.into_boxed_slice());
    g.bench_function("gateway_chain_on_request_headers", move |b| {
        b.to_async(rt).iter_custom(|iters| async move {
            let (mut parts, mut ctx) = head();
            let start = Instant::now();
            for _ in 0..iters {
                parts.headers.insert("x-api-key", API_KEY);
                for f in chain {
                    match f.on_request_headers(&mut parts, &mut ctx).await.unwrap() {
                        Action::Continue => {}
                        Action::Respond(r) => {
                            panic!("{} answered the bench request: {}", f.name(), r.status())
                        }
                        _ => panic!("{} did not let the bench request through", f.name()),
                    }
                }
            }
            start.elapsed()
        })
    });
    g.finish();
}

criterion_group!(benches, filters);
criterion_main!(benches);
