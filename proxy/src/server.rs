//! The process: binds every listener and the admin API, serves, reloads on change, and on
//! shutdown stops accepting, drains in-flight requests up to a deadline, and returns.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::admin::{self, AdminState};
use crate::config::Config;
use crate::filter::FilterChain;
use crate::listener::{self, BoundListener, ListenerRt};
use crate::proxy::Shared;
use crate::reload::{Control, ListenerApply, PrepareFuture, Prepared};

/// A configured, bound proxy. Tests bind with port 0 and read the addresses back.
pub struct Proxy {
    control: Arc<Control>,
    listeners: Arc<Listeners>,
    admin: Option<TcpListener>,
    watch: Option<Duration>,
}

impl Proxy {
    /// Builds the data plane and binds every socket of `config`.
    pub async fn bind(config: Config) -> anyhow::Result<Proxy> {
        Self::bind_with_chains(config, HashMap::new()).await
    }

    /// As [`Proxy::bind`], with a filter chain per listener name.
    pub async fn bind_with_chains(
        config: Config,
        chains: HashMap<String, FilterChain>,
    ) -> anyhow::Result<Proxy> {
        Self::bind_from(config, None, chains).await
    }

    /// Loads `path` and binds it; with [`Proxy::watch`], changes to the file (and to the
    /// filters and certificates it names) are applied while serving.
    pub async fn bind_file(path: PathBuf) -> anyhow::Result<Proxy> {
        let config = Config::load(&path).map_err(|e| anyhow::anyhow!("{e}"))?;
        Self::bind_from(config, Some(path), HashMap::new()).await
    }

    async fn bind_from(
        config: Config,
        path: Option<PathBuf>,
        chains: HashMap<String, FilterChain>,
    ) -> anyhow::Result<Proxy> {
        crate::tls::install_default_provider();
        let listeners = Arc::new(Listeners::default());
        // Sockets first: a port in use is reported before any filter compiles.
        let plan = listeners.plan(&config).await?;
        let control = Control::start(config, path, chains).await?;
        listeners.commit_plan(plan);
        let config = control.config.load_full();
        let admin = if config.admin.enabled {
            Some(TcpListener::bind(config.admin.address).await.with_context(|| {
                format!(
                    "{}: admin.address: cannot bind {}",
                    config.source_name, config.admin.address
                )
            })?)
        } else {
            None
        };
        Ok(Proxy {
            control,
            listeners,
            admin,
            watch: None,
        })
    }

    /// Reloads on changes to the config file, the filter directory and the TLS files, after
    /// `debounce` of quiet.
    pub fn watch(mut self, debounce: Duration) -> Self {
        self.watch = Some(debounce);
        self
    }

    /// The reload control (for embedders and tests: reload on demand, read the status).
    pub fn control(&self) -> Arc<Control> {
        self.control.clone()
    }

    /// Reloads now, as a file change would.
    pub async fn reload(&self) -> anyhow::Result<crate::reload::Outcome> {
        self.control.reload(&*self.listeners).await
    }

    /// The bound address of a listener.
    pub fn listener_addr(&self, name: &str) -> Option<SocketAddr> {
        self.listeners.local_addr(name)
    }

    /// The bound admin address.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|a| a.local_addr().ok())
    }

    /// Serves until `shutdown` resolves, then drains: listeners close at once (new connections
    /// are refused), `/ready` turns 503, in-flight requests get `runtime.drain_timeout`.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let (drain_tx, drain_rx) = watch::channel(false);
        let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
        let ready = Arc::new(AtomicBool::new(true));
        // Watch before accepting: a change made once a request was served is never missed.
        let watching = self
            .watch
            .and_then(|debounce| Some((crate::reload::Watching::start(self.control.clone())?, debounce)));
        self.listeners.serve(ServeCtx {
            shared: self.control.shared.clone(),
            drain: drain_rx,
            done: done_tx,
        });
        let (admin_stop_tx, admin_stop_rx) = watch::channel(false);
        if let Some(a) = self.admin {
            tracing::info!(address = %a.local_addr()?, "admin listening");
            let state = Arc::new(AdminState {
                metrics: self.control.shared.metrics.clone(),
                control: self.control.clone(),
                ready: ready.clone(),
            });
            tokio::spawn(admin::serve(a, state, admin_stop_rx));
        }
        let watcher = watching.map(|(w, debounce)| {
            let apply: Arc<dyn ListenerApply> = self.listeners.clone();
            tokio::spawn(w.run(apply, debounce))
        });
        shutdown.await;
        if let Some(w) = watcher {
            w.abort();
        }
        let deadline = self.control.config.load().runtime.drain_timeout;
        tracing::info!(deadline = ?deadline, "shutting down: draining connections");
        ready.store(false, Ordering::Relaxed);
        // Closing the serve context drops its `done` sender: only connections hold one now.
        self.listeners.close();
        let _ = drain_tx.send(true);
        match tokio::time::timeout(deadline, done_rx.recv()).await {
            Ok(_) => tracing::info!("drained"),
            Err(_) => tracing::warn!("drain deadline passed; closing remaining connections"),
        }
        let _ = admin_stop_tx.send(true);
        Ok(())
    }
}

/// What a serving listener needs from the process.
#[derive(Clone)]
struct ServeCtx {
    shared: Arc<Shared>,
    drain: watch::Receiver<bool>,
    done: mpsc::Sender<()>,
}

struct Running {
    /// The configured address (port 0 stays 0: the listener is not moved).
    address: SocketAddr,
    local: SocketAddr,
    rt: Arc<ArcSwap<ListenerRt>>,
    stop: watch::Sender<bool>,
    /// Where its serve loop gives the socket when stopped (see [`listener::Handoff`]).
    handoff: listener::Handoff,
}

/// The listeners of the process, by name; reloads add, move, rename, re-set and remove them.
#[derive(Default)]
pub struct Listeners {
    inner: Mutex<ListenersInner>,
}

#[derive(Default)]
struct ListenersInner {
    running: HashMap<String, Running>,
    /// Bound before `run` started, with their stop signal.
    pending: Vec<(BoundListener, watch::Receiver<bool>, listener::Handoff)>,
    serve: Option<ServeCtx>,
}

/// A reload's listener changes.
struct Plan {
    /// Newly bound sockets.
    start: Vec<(SocketAddr, BoundListener)>,
    /// Listeners that take over the socket of a stopped one at the same address: (the
    /// stopped one's name, the configured address, the new name, its settings).
    take_over: Vec<(String, SocketAddr, Arc<str>, ListenerRt)>,
    stop: Vec<String>,
    store: Vec<(Arc<ArcSwap<ListenerRt>>, ListenerRt)>,
}

impl Listeners {
    fn local_addr(&self, name: &str) -> Option<SocketAddr> {
        self.inner
            .lock()
            .expect("listeners lock")
            .running
            .get(name)
            .map(|r| r.local)
    }

    /// What a reload changes. A listener keeps its socket when its name and address stay;
    /// one at the address of a listener that goes (renamed, or two trading addresses) takes
    /// that socket over, as the kernel refuses a second bind while the first listens; any
    /// other is bound anew, before anything is committed, so a bind failure changes nothing.
    async fn plan(&self, config: &Config) -> anyhow::Result<Plan> {
        let current: HashMap<String, (SocketAddr, Arc<ArcSwap<ListenerRt>>)> = self
            .inner
            .lock()
            .expect("listeners lock")
            .running
            .iter()
            .map(|(n, r)| (n.clone(), (r.address, r.rt.clone())))
            .collect();
        let mut plan = Plan {
            start: Vec::new(),
            take_over: Vec::new(),
            stop: Vec::new(),
            store: Vec::new(),
        };
        let kept = |name: &str, address: SocketAddr| current.get(name).is_some_and(|(a, _)| *a == address);
        let stays = |name: &str| {
            config
                .listeners
                .iter()
                .any(|l| l.name == name && kept(name, l.address))
        };
        // Running listeners whose socket a new one may take over: those that do not stay.
        let mut going: Vec<(&String, SocketAddr)> = current
            .iter()
            .filter(|(n, _)| !stays(n))
            .map(|(n, (a, _))| (n, *a))
            .collect();
        for (i, l) in config.listeners.iter().enumerate() {
            let tls = match &l.tls {
                Some(t) => Some(
                    crate::tls::server_config(t, config)
                        .with_context(|| format!("{}: listeners[{i}].tls", config.source_name))?,
                ),
                None => None,
            };
            if kept(&l.name, l.address) {
                let rt = current[&l.name].1.clone();
                plan.store.push((rt, ListenerRt::new(l, tls)));
                continue;
            }
            // Port 0 is "any free port": two such listeners do not share a socket.
            let at = (l.address.port() != 0)
                .then(|| going.iter().position(|(_, a)| *a == l.address))
                .flatten();
            if let Some(k) = at {
                let (old, _) = going.swap_remove(k);
                plan.take_over.push((
                    old.clone(),
                    l.address,
                    l.name.as_str().into(),
                    ListenerRt::new(l, tls),
                ));
                continue;
            }
            let bound = BoundListener::bind(l, tls).await.with_context(|| {
                format!(
                    "{}: listeners[{i}].address: cannot bind {}",
                    config.source_name, l.address
                )
            })?;
            plan.start.push((l.address, bound));
        }
        plan.stop = current.keys().filter(|n| !stays(n)).cloned().collect();
        Ok(plan)
    }

    fn commit_plan(&self, plan: Plan) {
        let mut inner = self.inner.lock().expect("listeners lock");
        let inner = &mut *inner;
        for (rt, new) in plan.store {
            rt.store(Arc::new(new));
        }
        // Sockets handed over: asked for before the old listeners are stopped.
        let mut taken = Vec::new();
        for (old, address, name, rt) in plan.take_over {
            let Some(r) = inner.running.get(&old) else {
                continue;
            };
            let local = r.local;
            let (tx, rx) = tokio::sync::oneshot::channel();
            match inner.pending.iter().position(|(b, _, _)| *b.name == *old) {
                // Not serving yet: the socket is at hand.
                Some(k) => {
                    let _ = tx.send(inner.pending.swap_remove(k).0.tcp);
                }
                None => *r.handoff.lock().expect("handoff lock") = Some(tx),
            }
            tracing::info!(listener = %name, from = %old, address = %local, "listener takes over the socket of one stopped by reload");
            taken.push((address, local, name, rt, rx));
        }
        for name in plan.stop {
            if let Some(r) = inner.running.remove(&name) {
                tracing::info!(listener = %name, address = %r.local, "listener stopped by reload");
                let _ = r.stop.send(true);
            }
            // Not serving yet: its socket closes now (or went to its successor above).
            inner.pending.retain(|(b, _, _)| *b.name != *name);
        }
        for (address, bound) in plan.start {
            let local = bound.local_addr();
            let name = bound.name.to_string();
            let rt = bound.rt.clone();
            let serve = async move { Some(bound) };
            inner.start(name, address, local, rt, serve);
        }
        for (address, local, name, rt, rx) in taken {
            let rt = Arc::new(ArcSwap::from_pointee(rt));
            let (n, r) = (name.clone(), rt.clone());
            let serve = async move {
                let tcp = match rx.await {
                    Ok(tcp) => tcp,
                    // The old listener ended without giving its socket (its task failed):
                    // the address is free now.
                    Err(_) => match listener::bind_socket(local) {
                        Ok(tcp) => tcp,
                        Err(e) => {
                            tracing::error!(listener = %n, address = %local, error = %e, "cannot bind the address of the listener this one replaces");
                            return None;
                        }
                    },
                };
                Some(BoundListener { name: n, tcp, rt: r })
            };
            inner.start(name.to_string(), address, local, rt, serve);
        }
    }

    fn serve(&self, ctx: ServeCtx) {
        let mut inner = self.inner.lock().expect("listeners lock");
        for (bound, stop, handoff) in std::mem::take(&mut inner.pending) {
            spawn_serve(bound, &ctx, stop, handoff);
        }
        inner.serve = Some(ctx);
    }

    fn close(&self) {
        let mut inner = self.inner.lock().expect("listeners lock");
        inner.serve = None;
        inner.pending.clear();
    }
}

impl ListenersInner {
    /// Registers a listener and serves it once `socket` gives its socket (at once for a new
    /// bind, when the old listener has stopped for a takeover).
    fn start(
        &mut self,
        name: String,
        address: SocketAddr,
        local: SocketAddr,
        rt: Arc<ArcSwap<ListenerRt>>,
        socket: impl Future<Output = Option<BoundListener>> + Send + 'static,
    ) {
        let (stop_tx, stop_rx) = watch::channel(false);
        let handoff = listener::Handoff::default();
        self.running.insert(
            name,
            Running {
                address,
                local,
                rt,
                stop: stop_tx,
                handoff: handoff.clone(),
            },
        );
        match &self.serve {
            Some(ctx) => {
                let ctx = ctx.clone();
                tokio::spawn(async move {
                    let mut drain = ctx.drain.clone();
                    // At shutdown it gives up waiting (it holds a drain's `done`).
                    let bound = tokio::select! {
                        b = socket => b,
                        _ = drain.changed() => None,
                    };
                    if let Some(bound) = bound {
                        spawn_serve(bound, &ctx, stop_rx, handoff);
                    }
                });
            }
            None => {
                // Not serving yet: the socket is at hand (bound now, or taken from the
                // pending listener it replaces).
                if let Some(bound) = futures_util::FutureExt::now_or_never(socket).flatten() {
                    self.pending.push((bound, stop_rx, handoff));
                }
            }
        }
    }
}

fn spawn_serve(
    bound: BoundListener,
    ctx: &ServeCtx,
    stop: watch::Receiver<bool>,
    handoff: listener::Handoff,
) {
    tracing::info!(listener = %bound.name, address = %bound.local_addr(), "listening");
    tokio::spawn(listener::serve(
        bound,
        ctx.shared.clone(),
        ctx.drain.clone(),
        stop,
        handoff,
        ctx.done.clone(),
    ));
}

impl ListenerApply for Listeners {
    fn prepare<'a>(&'a self, config: &'a Config) -> PrepareFuture<'a> {
        Box::pin(async move { self.plan(config).await.map(|p| Box::new(p) as Prepared) })
    }

    fn commit(&self, prepared: Prepared) {
        if let Ok(plan) = prepared.downcast::<Plan>() {
            self.commit_plan(*plan);
        }
    }
}
