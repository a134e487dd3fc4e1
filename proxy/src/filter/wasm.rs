//! Wasm filters: components compiled once, pre-linked (`InstancePre`), and run from a pool of
//! warm instances, each call under a CPU deadline (epoch interruption), a memory limit and a
//! stack limit. An instance that failed is thrown away; the next call gets a fresh one.
//!
//! One process has one [`WasmEngine`]: one `Engine`, one `Linker`, one epoch ticker thread.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http::{request, response, HeaderValue, Response, StatusCode};
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Engine, Store, StoreLimitsBuilder};
use wasmtime_wasi::WasiCtxBuilder;

use super::bindings::{self, types as wt};
use super::host::CallState;
use super::host::{guest_header_name, guest_header_value, FilterShared, HostState};
use super::{
    Action, BodyAction, BodyFuture, BodyMode, Filter, FilterError, Heads, LogFuture, LogSummary, Phase,
    PhaseFuture, RequestContext,
};
use crate::body;
use crate::limits;
use crate::metrics::Metrics;

/// Per-filter limits and grants, from config.
#[derive(Debug, Clone)]
pub struct FilterLimits {
    /// CPU time one phase call may use.
    pub cpu_budget: Duration,
    /// Linear memory one instance may grow to, in bytes.
    pub memory: usize,
    /// Most live instances (the concurrency of this filter).
    pub max_instances: usize,
    /// A host directory the filter may read, mounted read-only at `/files`.
    pub files: Option<std::path::PathBuf>,
}

/// The export every filter of this ABI version has.
pub const ABI_HANDLER: &str = "weir:filter/handler@0.1.0";

/// The sha256 of some bytes, as `sha256:<hex>` (the OCI digest form).
pub fn digest(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    let d = sha2::Sha256::digest(bytes);
    let mut s = String::with_capacity(71);
    s.push_str("sha256:");
    for b in d {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Tells apart what is not a component before the compiler does, with a clearer message.
pub fn check_header(what: &str, bytes: &[u8]) -> anyhow::Result<()> {
    match bytes.get(..8) {
        Some([0, b'a', b's', b'm', 1, 0, 0, 0]) => {
            anyhow::bail!("{what}: a core Wasm module, not a component: build with `--target wasm32-wasip2`")
        }
        Some([0, b'a', b's', b'm', _, _, 1, 0]) => Ok(()),
        _ => anyhow::bail!("{what}: not a WebAssembly file"),
    }
}

/// The process's Wasm engine and linker.
pub struct WasmEngine {
    engine: Engine,
    linker: Linker<HostState>,
    /// Compiled components by digest.
    compiled: Mutex<HashMap<String, Component>>,
    ticker: Arc<Ticker>,
}

impl Drop for WasmEngine {
    fn drop(&mut self) {
        // No filter can run any more (every filter holds this engine): the ticker ends.
        self.ticker.closed.store(true, Ordering::SeqCst);
        self.ticker.thread.unpark();
    }
}

/// The epoch ticker's state. It advances the engine's epoch every tick (the clock of filter
/// CPU deadlines) while Wasm may be running, and sleeps once none has run for
/// [`TICKER_IDLE_TICKS`]: an idle proxy with filters loaded would otherwise wake 1 000 times a
/// second for nothing (a cost every sidecar of a mesh pays, all the time).
///
/// Whatever runs Wasm holds a [`Ticking`] guard meanwhile. The guard counts itself in
/// `active`, then wakes the ticker if it is asleep; the ticker says it is going to sleep,
/// then looks at `active` once more. Both in sequentially consistent order: either the guard
/// sees `parked` or the ticker sees the guard, so a call never runs with the clock stopped
/// (a guest in a loop would never be cut off).
struct Ticker {
    /// Guards alive: calls, instantiations.
    active: AtomicUsize,
    /// The ticker is asleep or about to be.
    parked: AtomicBool,
    /// The engine is gone: the thread ends.
    closed: AtomicBool,
    /// Ticks so far (for tests: whether the clock runs).
    ticks: AtomicU64,
    thread: std::thread::Thread,
}

/// Ticks without a guard before the ticker sleeps: 100 ms. A proxy serving a request now and
/// then wakes it once per request (one futex wake-up), not 1 000 times a second.
const TICKER_IDLE_TICKS: u32 = 100;

impl Ticker {
    /// Starts the ticker thread for `engine`.
    fn start(engine: &Engine) -> std::io::Result<Arc<Ticker>> {
        let weak = engine.weak();
        let (tx, rx) = std::sync::mpsc::channel::<Arc<Ticker>>();
        let handle = std::thread::Builder::new()
            .name("weir-epoch".into())
            .spawn(move || {
                let Ok(t) = rx.recv() else { return };
                let mut idle = 0;
                while !t.closed.load(Ordering::SeqCst) {
                    std::thread::sleep(limits::FILTER_EPOCH_TICK);
                    match weak.upgrade() {
                        Some(e) => e.increment_epoch(),
                        None => return,
                    }
                    t.ticks.fetch_add(1, Ordering::Relaxed);
                    if t.active.load(Ordering::SeqCst) > 0 {
                        idle = 0;
                        continue;
                    }
                    idle += 1;
                    if idle < TICKER_IDLE_TICKS {
                        continue;
                    }
                    t.parked.store(true, Ordering::SeqCst);
                    if t.active.load(Ordering::SeqCst) == 0 && !t.closed.load(Ordering::SeqCst) {
                        // Woken by a guard (or spuriously: then it ticks 100 more times).
                        std::thread::park();
                    }
                    t.parked.store(false, Ordering::SeqCst);
                    idle = 0;
                }
            })?;
        let t = Arc::new(Ticker {
            active: AtomicUsize::new(0),
            parked: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            ticks: AtomicU64::new(0),
            thread: handle.thread().clone(),
        });
        tx.send(t.clone()).expect("the ticker thread waits for its state");
        Ok(t)
    }

    /// Keeps the clock running until the guard drops.
    fn enter(&self) -> Ticking<'_> {
        self.active.fetch_add(1, Ordering::SeqCst);
        if self.parked.load(Ordering::SeqCst) {
            self.thread.unpark();
        }
        Ticking(self)
    }
}

/// Wasm may run while this lives (see [`Ticker`]).
struct Ticking<'a>(&'a Ticker);

impl Drop for Ticking<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

impl WasmEngine {
    /// Creates the engine (Cranelift, component model, epoch interruption, a stack limit),
    /// links WASI and the filter ABI once, and starts the epoch ticker.
    pub fn new() -> anyhow::Result<Arc<WasmEngine>> {
        let mut cfg = wasmtime::Config::new();
        cfg.wasm_component_model(true);
        cfg.epoch_interruption(true);
        cfg.max_wasm_stack(limits::DEFAULT_FILTER_STACK);
        // `WEIR_WASM_PROFILER=perfmap` writes /tmp/perf-PID.map so `perf report` names the
        // guests' functions (what `wasmtime run --profile=perfmap` does); for profiling only.
        if std::env::var_os("WEIR_WASM_PROFILER").is_some_and(|v| v == "perfmap") {
            cfg.profiler(wasmtime::ProfilingStrategy::PerfMap);
        }
        // The pooling allocator: instance slots (memories, tables, fiber stacks) are reserved
        // once and recycled, so replacing a failed instance or warming a new filter version
        // costs a slot reset, not fresh mappings.
        // `WEIR_WASM_ALLOCATOR=on-demand` maps each instance on its own instead: for running
        // under valgrind, which cannot reserve the pool's terabytes of address space (counting
        // instructions is the one measure this noisy VM repeats exactly); for profiling only.
        if std::env::var_os("WEIR_WASM_ALLOCATOR").is_none_or(|v| v != "on-demand") {
            let n = limits::FILTER_POOL_INSTANCES;
            let mut pool = wasmtime::PoolingAllocationConfig::default();
            pool.total_component_instances(n)
                .total_core_instances(n * 4)
                .total_memories(n * 2)
                .total_tables(n * 4)
                .total_stacks(n)
                .max_memory_size(limits::FILTER_POOL_MEMORY as usize);
            cfg.allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pool));
        }
        let engine = Engine::new(&cfg)?;
        let mut linker = Linker::<HostState>::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        bindings::Filter::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)?;
        let ticker = Ticker::start(&engine)?;
        Ok(Arc::new(WasmEngine {
            engine,
            linker,
            compiled: Mutex::new(HashMap::new()),
            ticker,
        }))
    }

    /// The compiled component of these bytes (`digest` is their sha256): from the cache, or
    /// compiled on the blocking pool (compiling takes milliseconds to seconds and must never
    /// stall a request worker). `what` names the source in errors.
    pub async fn component(&self, what: &str, bytes: Arc<[u8]>, digest: &str) -> anyhow::Result<Component> {
        if let Some(c) = self.compiled.lock().expect("compiled lock").get(digest) {
            return Ok(c.clone());
        }
        check_header(what, &bytes)?;
        let engine = self.engine.clone();
        let c = tokio::task::spawn_blocking(move || Component::new(&engine, &bytes))
            .await
            .context("the compile task failed")?
            .map_err(anyhow::Error::from)
            .with_context(|| format!("{what}: does not compile as a component"))?;
        self.check_world(what, &c)?;
        self.compiled
            .lock()
            .expect("compiled lock")
            .insert(digest.to_string(), c.clone());
        Ok(c)
    }

    /// Drops compiled components no longer in use (after a reload).
    pub fn retain_compiled(&self, in_use: &std::collections::HashSet<String>) {
        self.compiled
            .lock()
            .expect("compiled lock")
            .retain(|d, _| in_use.contains(d));
    }

    /// Checks the component exports a `weir:filter` handler of a version this host runs.
    fn check_world(&self, what: &str, c: &Component) -> anyhow::Result<()> {
        let ty = c.component_type();
        let exports: Vec<String> = ty.exports(&self.engine).map(|(n, _)| n.to_string()).collect();
        if exports.iter().any(|n| n == ABI_HANDLER) {
            return Ok(());
        }
        match exports.iter().find(|n| n.starts_with("weir:filter/handler@")) {
            Some(other) => anyhow::bail!(
                "{what}: built for {other}, but this Weir runs {ABI_HANDLER}: rebuild it with a matching weir-sdk"
            ),
            None => anyhow::bail!(
                "{what}: not a Weir filter: it exports {exports:?}, not {ABI_HANDLER}"
            ),
        }
    }

    /// Reads, compiles and loads a filter file (benches, tests, embedders).
    pub async fn load_file(
        self: &Arc<Self>,
        path: &std::path::Path,
        config_json: String,
        limits: FilterLimits,
        shared: Arc<FilterShared>,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<WasmFilter> {
        let what = path.display().to_string();
        let bytes: Arc<[u8]> = std::fs::read(path)
            .with_context(|| format!("cannot read {what}"))?
            .into();
        let d = digest(&bytes);
        let component = self.component(&what, bytes, &d).await?;
        self.load(&what, &component, config_json, limits, shared, metrics)
            .await
    }

    /// Loads a filter from its compiled component: pre-links, and initialises one instance
    /// with its config (so config errors show at load).
    pub async fn load(
        self: &Arc<Self>,
        what: &str,
        component: &Component,
        config_json: String,
        limits: FilterLimits,
        shared: Arc<FilterShared>,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<WasmFilter> {
        let pre = self
            .linker
            .instantiate_pre(component)
            .map_err(anyhow::Error::from)
            .with_context(|| format!("{what}: imports something Weir does not provide"))?;
        let pre = bindings::FilterPre::new(pre)
            .map_err(anyhow::Error::from)
            .with_context(|| format!("{what}: does not export {ABI_HANDLER}"))?;
        let mut filter = WasmFilter {
            name: shared.name.clone(),
            engine: self.clone(),
            pre,
            config_json,
            limits,
            shared,
            idle: Mutex::new(Vec::new()),
            live: Arc::new(AtomicUsize::new(0)),
            metrics,
            skipped: std::sync::atomic::AtomicU8::new(0),
            body_modes: [BodyMode::None; 2],
        };
        // The first instance, which says what the filter implements; always allowed.
        let live =
            Live::reserve(&filter.live, filter.limits.max_instances.max(1)).expect("a new filter has none");
        let (first, caps) = filter
            .instantiate(live)
            .await
            .map_err(|e| anyhow::anyhow!("{}: {}", filter.name, e.message))?;
        filter.body_modes = [body_mode(caps.request_body), body_mode(caps.response_body)];
        filter.checkin(first);
        Ok(filter)
    }
}

struct Instance {
    store: Store<HostState>,
    exports: bindings::Filter,
    _live: Live,
}

/// One live instance in its filter's count, for as long as the instance exists: however it
/// goes (back to the pool, dropped after a trap, or dropped with a cancelled phase call's
/// future when the client goes away mid-call), the count follows. A count kept by hand
/// missed the last case, and after `max_instances` cancelled calls every request was
/// answered "overload".
struct Live(Arc<AtomicUsize>);

impl Live {
    /// A place in `count` if it is below `max`: taken before instantiating, so concurrent
    /// checkouts that all find the pool empty never instantiate past the limit between
    /// them (instantiation awaits; a check then an increment afterwards let them overshoot).
    fn reserve(count: &Arc<AtomicUsize>, max: usize) -> Option<Live> {
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Live(count.clone()))
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A loaded Wasm filter, with its pool of warm instances.
pub struct WasmFilter {
    name: Arc<str>,
    engine: Arc<WasmEngine>,
    pre: bindings::FilterPre<HostState>,
    config_json: String,
    limits: FilterLimits,
    shared: Arc<FilterShared>,
    /// Boxed: an instance moves in and out of the pool and through every phase call's future;
    /// as a pointer that is 8 bytes, not the store and the export table.
    #[allow(clippy::vec_box)]
    idle: Mutex<Vec<Box<Instance>>>,
    /// Instances in existence, pooled or in a call (see [`Live`]).
    live: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
    /// Phases the filter said it does not implement (bit per phase): never called again.
    skipped: std::sync::atomic::AtomicU8,
    /// What `init` asked for the request and the response body.
    body_modes: [BodyMode; 2],
}

/// Swaps a call's inputs with the store's slots: once before the call, once after.
fn exchange(
    c: &mut CallState,
    req: Option<&mut request::Parts>,
    resp: Option<&mut response::Parts>,
    ctx: &mut RequestContext,
) {
    if let Some(r) = req {
        std::mem::swap(r, &mut c.req);
    }
    if let Some(r) = resp {
        std::mem::swap(r, &mut c.resp);
    }
    std::mem::swap(ctx, &mut c.ctx);
}

fn phase_bit(p: Phase) -> u8 {
    match p {
        Phase::RequestHeaders => 1,
        Phase::RequestBody => 2,
        Phase::ResponseHeaders => 4,
        Phase::ResponseBody => 8,
        Phase::Log => 16,
    }
}

fn body_mode(m: wt::BodyMode) -> BodyMode {
    match m {
        wt::BodyMode::None => BodyMode::None,
        wt::BodyMode::Streamed => BodyMode::Streamed,
        wt::BodyMode::Buffered => BodyMode::Buffered,
    }
}

/// One call into a guest.
enum Call<'a> {
    RequestHeaders,
    ResponseHeaders,
    RequestBody(&'a [u8], bool),
    ResponseBody(&'a [u8], bool),
    Log(wt::Summary),
}

/// A guest's answer.
enum Answer {
    Head(wt::Action),
    Body(wt::BodyAction),
    Log(bool),
}

fn ticks(d: Duration) -> u64 {
    // In u64: a u128 division is a library call, and this runs on every phase call.
    let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    (nanos / limits::FILTER_EPOCH_TICK.as_nanos() as u64).max(1) + 1
}

/// Names a failure for `weir_filter_errors_total{kind}`.
fn classify(e: &wasmtime::Error) -> &'static str {
    match e.downcast_ref::<wasmtime::Trap>() {
        Some(wasmtime::Trap::Interrupt) => "timeout",
        Some(wasmtime::Trap::StackOverflow) => "stack",
        Some(_) => "trap",
        None if format!("{e:#}").contains("memory") => "memory",
        None => "trap",
    }
}

impl WasmFilter {
    /// A new instance, initialised, holding the place `live` reserved for it (given back
    /// if this fails).
    async fn instantiate(&self, live: Live) -> Result<(Box<Instance>, wt::Capabilities), FilterError> {
        let limits = StoreLimitsBuilder::new()
            .memory_size(self.limits.memory)
            .instances(64)
            .tables(64)
            .trap_on_grow_failure(true)
            .build();
        let state = HostState {
            wasi: {
                let mut b = WasiCtxBuilder::new();
                if let Some(dir) = &self.limits.files {
                    b.preopened_dir(dir, "/files", wasmtime_wasi::FsPerms::ReadOnly)
                        .map_err(|e| FilterError {
                            kind: "config",
                            message: format!("cannot mount {}: {e:#}", dir.display()),
                        })?;
                }
                b.build()
            },
            table: ResourceTable::new(),
            limits,
            shared: self.shared.clone(),
            call: CallState::idle(),
            active: false,
            // Instantiation and init run the guest's start code and config parsing: a larger budget.
            ticks_left: ticks(self.limits.cpu_budget * 10),
            logs_left: super::host::LOG_QUOTA,
        };
        let mut store = Store::new(&self.engine.engine, state);
        store.limiter(|s| &mut s.limits);
        // Every tick the guest yields to the runtime, so a looping filter never holds up the
        // other requests of its worker thread; when its budget is spent it is interrupted.
        store.epoch_deadline_callback(|mut cx| {
            let s = cx.data_mut();
            if s.ticks_left <= 1 {
                return Ok(wasmtime::UpdateDeadline::Interrupt);
            }
            s.ticks_left -= 1;
            Ok(wasmtime::UpdateDeadline::Yield(1))
        });
        store.set_epoch_deadline(1);
        let fail = |kind: &'static str, e: wasmtime::Error| FilterError {
            kind,
            message: format!("{e:#}"),
        };
        let _ticking = self.engine.ticker.enter();
        let exports = self
            .pre
            .instantiate_async(&mut store)
            .await
            .map_err(|e| fail(classify(&e), e))?;
        match exports
            .weir_filter_handler()
            .call_init(&mut store, &self.config_json)
            .await
        {
            Ok(Ok(caps)) => Ok((
                Box::new(Instance {
                    store,
                    exports,
                    _live: live,
                }),
                caps,
            )),
            Ok(Err(msg)) => Err(FilterError {
                kind: "config",
                message: format!("init: {msg}"),
            }),
            Err(e) => Err(fail(classify(&e), e)),
        }
    }

    async fn checkout(&self) -> Result<Box<Instance>, FilterError> {
        if let Some(i) = self.idle.lock().expect("idle lock").pop() {
            return Ok(i);
        }
        let Some(live) = Live::reserve(&self.live, self.limits.max_instances) else {
            return Err(FilterError {
                kind: "overload",
                message: format!("all {} instances busy", self.limits.max_instances),
            });
        };
        // Boxed: instantiation's future is several KiB, and inline it would make every phase
        // call's future (boxed per call, behind the `Filter` trait) that large, though a warm
        // instance is at hand on all but the first calls.
        Box::pin(self.instantiate(live)).await.map(|(i, _)| i)
    }

    /// Takes a warm instance from the pool and puts it back: what every phase call pays on
    /// top of the call itself. For benches.
    #[doc(hidden)]
    pub async fn pool_roundtrip(&self) -> Result<(), FilterError> {
        let i = self.checkout().await?;
        self.checkin(i);
        Ok(())
    }

    fn checkin(&self, i: Box<Instance>) {
        self.idle.lock().expect("idle lock").push(i);
    }

    fn failed(&self, e: FilterError) -> FilterError {
        self.metrics.filter_error(&self.name, e.kind);
        e
    }

    /// Runs one guest call on a pooled instance. What the call reads (the request head, the
    /// response head, the read-only heads of a body phase, the context) is swapped into the
    /// store's idle slots for the call and swapped back out after, also when the guest failed
    /// (a fail-open request goes on with its heads): no copies through intermediate values,
    /// no empty heads built and dropped. The host calls change only what a filter may steer
    /// (heads, cluster, timeout, values, retry delay). A failed instance is dropped, never
    /// reused.
    async fn run(
        &self,
        phase: Phase,
        mut req: Option<&mut request::Parts>,
        mut resp: Option<&mut response::Parts>,
        heads: Option<Arc<Heads>>,
        ctx: &mut RequestContext,
        call: Call<'_>,
    ) -> Result<Answer, FilterError> {
        let mut inst = self.checkout().await.map_err(|e| self.failed(e))?;
        let data = inst.store.data_mut();
        data.ticks_left = ticks(self.limits.cpu_budget);
        data.logs_left = super::host::LOG_QUOTA;
        data.active = true;
        let c = &mut data.call;
        c.phase = phase;
        c.heads = heads;
        c.has_resp = resp.is_some();
        exchange(c, req.as_deref_mut(), resp.as_deref_mut(), ctx);
        let result = self.call(&mut inst, call).await;
        let data = inst.store.data_mut();
        data.active = false;
        let c = &mut data.call;
        exchange(c, req, resp, ctx);
        c.heads = None;
        c.has_resp = false;
        self.finish(inst, result)
    }

    /// One guest call on an instance whose store holds the call's inputs.
    async fn call(&self, inst: &mut Instance, call: Call<'_>) -> wasmtime::Result<Answer> {
        let _ticking = self.engine.ticker.enter();
        inst.store.set_epoch_deadline(1);
        let handler = inst.exports.weir_filter_handler();
        match call {
            Call::RequestHeaders => handler
                .call_on_request_headers(&mut inst.store)
                .await
                .map(Answer::Head),
            Call::ResponseHeaders => handler
                .call_on_response_headers(&mut inst.store)
                .await
                .map(Answer::Head),
            Call::RequestBody(chunk, eos) => handler
                .call_on_request_body(&mut inst.store, chunk, eos)
                .await
                .map(Answer::Body),
            Call::ResponseBody(chunk, eos) => handler
                .call_on_response_body(&mut inst.store, chunk, eos)
                .await
                .map(Answer::Body),
            Call::Log(summary) => handler
                .call_on_log(&mut inst.store, &summary)
                .await
                .map(Answer::Log),
        }
    }

    /// Returns a healthy instance to the pool; drops and counts a failed one.
    fn finish(&self, inst: Box<Instance>, result: wasmtime::Result<Answer>) -> Result<Answer, FilterError> {
        match result {
            Ok(answer) => {
                self.checkin(inst);
                Ok(answer)
            }
            Err(e) => {
                // The instance's state may be inconsistent after a trap: it is not reused.
                drop(inst);
                Err(self.failed(FilterError {
                    kind: classify(&e),
                    message: format!("{e:#}"),
                }))
            }
        }
    }

    async fn phase(
        &self,
        phase: Phase,
        req: &mut request::Parts,
        resp: Option<&mut response::Parts>,
        ctx: &mut RequestContext,
    ) -> Result<Action, FilterError> {
        let call = match phase {
            Phase::ResponseHeaders => Call::ResponseHeaders,
            _ => Call::RequestHeaders,
        };
        match self.run(phase, Some(req), resp, None, ctx, call).await {
            Ok(Answer::Head(wt::Action::NotImplemented)) => {
                self.skipped.fetch_or(phase_bit(phase), Ordering::Relaxed);
                Ok(Action::Continue)
            }
            Ok(Answer::Head(action)) => self.action(action).map_err(|e| self.failed(e)),
            Ok(_) => unreachable!("a head phase answers an action"),
            Err(e) => Err(e),
        }
    }

    async fn body_phase(
        &self,
        phase: Phase,
        chunk: Bytes,
        eos: bool,
        heads: &Arc<Heads>,
        ctx: &mut RequestContext,
    ) -> Result<BodyAction, FilterError> {
        let call = match phase {
            Phase::RequestBody => Call::RequestBody(&chunk, eos),
            _ => Call::ResponseBody(&chunk, eos),
        };
        // No body phase host call changes the context: the pipeline's copy is lent, not cloned.
        let answer = self
            .run(phase, None, None, Some(heads.clone()), ctx, call)
            .await?;
        let invalid = |message: String| {
            self.failed(FilterError {
                kind: "invalid",
                message,
            })
        };
        match answer {
            Answer::Body(wt::BodyAction::Continue) => Ok(BodyAction::Continue),
            Answer::Body(wt::BodyAction::Replace(b)) => {
                if b.len() > limits::MAX_FILTER_RESPONSE_BODY.max(chunk.len() * 2) {
                    return Err(invalid(format!(
                        "replacement of {} bytes for a chunk of {}",
                        b.len(),
                        chunk.len()
                    )));
                }
                Ok(BodyAction::Replace(Bytes::from(b)))
            }
            Answer::Body(wt::BodyAction::Respond(r)) => match self.action(wt::Action::Respond(r)) {
                Ok(Action::Respond(resp)) => Ok(BodyAction::Respond(resp)),
                Ok(_) => unreachable!("a response stays a response"),
                Err(e) => Err(self.failed(e)),
            },
            _ => unreachable!("a body phase answers a body action"),
        }
    }

    /// Turns the guest's answer into the core's, validating everything in it.
    fn action(&self, a: wt::Action) -> Result<Action, FilterError> {
        let invalid = |message: String| FilterError {
            kind: "invalid",
            message,
        };
        match a {
            wt::Action::Continue | wt::Action::NotImplemented => Ok(Action::Continue),
            wt::Action::Retry => Ok(Action::Retry),
            wt::Action::Respond(r) => {
                let status = StatusCode::from_u16(r.status)
                    .ok()
                    .filter(|s| (200..=599).contains(&s.as_u16()))
                    .ok_or_else(|| invalid(format!("invalid status {}", r.status)))?;
                if r.body.len() > limits::MAX_FILTER_RESPONSE_BODY {
                    return Err(invalid(format!(
                        "response body larger than {} bytes",
                        limits::MAX_FILTER_RESPONSE_BODY
                    )));
                }
                if r.headers.len() > limits::MAX_FILTER_HEADERS {
                    return Err(invalid(format!(
                        "response with more than {} headers",
                        limits::MAX_FILTER_HEADERS
                    )));
                }
                let mut resp = Response::new(body::full(r.body));
                *resp.status_mut() = status;
                for h in r.headers {
                    let n = guest_header_name(&h.name).map_err(|e| invalid(format!("{e:?}")))?;
                    let v: HeaderValue =
                        guest_header_value(h.value).map_err(|e| invalid(format!("{e:?}")))?;
                    super::host::room_for(resp.headers(), &v).map_err(|e| invalid(format!("{e:?}")))?;
                    resp.headers_mut().append(n, v);
                }
                Ok(Action::Respond(resp))
            }
        }
    }
}

impl Filter for WasmFilter {
    fn name(&self) -> &str {
        &self.name
    }

    fn wants(&self, phase: Phase) -> bool {
        self.skipped.load(Ordering::Relaxed) & phase_bit(phase) == 0
    }

    fn on_log<'a>(&'a self, ctx: &'a RequestContext, summary: &'a LogSummary) -> LogFuture<'a> {
        Box::pin(async move {
            // The log phase reads the request line; the head itself is gone with the request.
            let mut head = http::Request::new(());
            *head.method_mut() = summary.method.clone();
            if let Some(t) = &summary.target {
                *head.uri_mut() = t.clone();
            }
            let mut head = head.into_parts().0;
            let mut ctx = ctx.clone();
            let s = wt::Summary {
                status: summary.status,
                bytes_sent: summary.bytes,
                duration_us: summary.duration.as_micros() as u64,
                upstream: summary.upstream.map(|a| a.to_string()),
            };
            match self
                .run(Phase::Log, Some(&mut head), None, None, &mut ctx, Call::Log(s))
                .await
            {
                Ok(Answer::Log(false)) => {
                    self.skipped.fetch_or(phase_bit(Phase::Log), Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(filter = %self.name, error = %e, "filter failed in on-log"),
            }
        })
    }

    fn body_mode(&self, phase: Phase) -> BodyMode {
        match phase {
            Phase::RequestBody => self.body_modes[0],
            Phase::ResponseBody => self.body_modes[1],
            _ => BodyMode::None,
        }
    }

    fn on_request_body<'a>(
        &'a self,
        chunk: Bytes,
        end_of_stream: bool,
        heads: &'a Arc<Heads>,
        ctx: &'a mut RequestContext,
    ) -> BodyFuture<'a> {
        Box::pin(self.body_phase(Phase::RequestBody, chunk, end_of_stream, heads, ctx))
    }

    fn on_response_body<'a>(
        &'a self,
        chunk: Bytes,
        end_of_stream: bool,
        heads: &'a Arc<Heads>,
        ctx: &'a mut RequestContext,
    ) -> BodyFuture<'a> {
        Box::pin(self.body_phase(Phase::ResponseBody, chunk, end_of_stream, heads, ctx))
    }

    fn on_request_headers<'a>(
        &'a self,
        req: &'a mut request::Parts,
        ctx: &'a mut RequestContext,
    ) -> PhaseFuture<'a> {
        Box::pin(self.phase(Phase::RequestHeaders, req, None, ctx))
    }

    fn on_response_headers<'a>(
        &'a self,
        req: &'a mut request::Parts,
        resp: &'a mut response::Parts,
        ctx: &'a mut RequestContext,
    ) -> PhaseFuture<'a> {
        Box::pin(self.phase(Phase::ResponseHeaders, req, Some(resp), ctx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budget_is_its_ticks_plus_the_one_under_way() {
        let tick = limits::FILTER_EPOCH_TICK;
        assert_eq!(ticks(tick * 20), 21);
        // Less than a tick still gets one whole tick.
        assert_eq!(ticks(Duration::ZERO), 2);
        assert_eq!(ticks(tick / 2), 2);
        // A budget too long for u64 nanoseconds saturates instead of wrapping.
        assert!(ticks(Duration::MAX) > ticks(Duration::from_secs(86_400 * 365)));
    }

    /// Waits up to 10 s for `cond`.
    fn eventually(what: &str, cond: impl Fn() -> bool) {
        let t = std::time::Instant::now();
        while !cond() {
            assert!(t.elapsed() < Duration::from_secs(10), "never: {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn the_epoch_ticker_sleeps_while_no_wasm_runs_and_ticks_while_a_guard_lives() {
        let engine = WasmEngine::new().unwrap();
        let t = engine.ticker.clone();
        eventually("the idle ticker sleeps", || t.parked.load(Ordering::SeqCst));
        let asleep = t.ticks.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(t.ticks.load(Ordering::Relaxed), asleep, "no ticks while asleep");

        // A call (or an instantiation) wakes it, and it ticks for as long as the call runs,
        // past the idle threshold.
        let g = t.enter();
        let woken = t.ticks.load(Ordering::Relaxed);
        eventually("ticks during a long call", || {
            t.ticks.load(Ordering::Relaxed) > woken + u64::from(TICKER_IDLE_TICKS) + 10
        });
        assert!(!t.parked.load(Ordering::SeqCst));
        drop(g);
        eventually("asleep again after the call", || t.parked.load(Ordering::SeqCst));

        // The thread ends with the engine.
        drop(engine);
        eventually("the ticker ends with its engine", || Arc::strong_count(&t) == 1);
    }

    #[test]
    fn places_are_reserved_up_to_the_limit_from_many_threads_and_given_back_on_drop() {
        let count = Arc::new(AtomicUsize::new(0));
        let max = 3;
        // Many threads reserving at once (as concurrent checkouts do before their awaited
        // instantiations): exactly `max` get a place.
        let barrier = Arc::new(std::sync::Barrier::new(16));
        let got: Vec<Option<Live>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..16)
                .map(|_| {
                    let (count, barrier) = (count.clone(), barrier.clone());
                    s.spawn(move || {
                        barrier.wait();
                        Live::reserve(&count, max)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(got.iter().filter(|l| l.is_some()).count(), max);
        assert_eq!(count.load(Ordering::Relaxed), max);
        assert!(Live::reserve(&count, max).is_none());
        // However an instance goes, its place comes back.
        drop(got);
        assert_eq!(count.load(Ordering::Relaxed), 0);
        assert!(Live::reserve(&count, max).is_some());
    }
}
