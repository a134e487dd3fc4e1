//! The filter host's hot path, side by side in one run: taking a warm instance from the pool,
//! a no-op phase call, and a realistic header-rewrite filter (the `policy` test filter: reads
//! the path and two headers, sets one header, bumps a counter) against the same logic in
//! native Rust. `cargo bench -p weir-tests --bench filter`.

use std::sync::Arc;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion};
use http::HeaderValue;
use weir::filter::host::FilterShared;
use weir::filter::wasm::{FilterLimits, WasmEngine, WasmFilter};
use weir::filter::{Action, Filter, FilterError, PhaseFuture, RequestContext};
use weir::metrics::Metrics;

async fn load(engine: &Arc<WasmEngine>, name: &str, path: &str, json: &str) -> WasmFilter {
    let shared = Arc::new(FilterShared::new(name.into(), Default::default()));
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
        route: Some("r".into()),
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
                    f.on_request_headers(&mut parts, &mut ctx).await.unwrap();
                }
                start.elapsed()
            })
        }
    };
    g.bench_function("noop_on_request_headers", phase(noop));
    g.bench_function("policy_on_request_headers_wasm", phase(policy));
    g.bench_function("policy_on_request_headers_native", phase(native));
    g.finish();
}

criterion_group!(benches, filters);
criterion_main!(benches);
