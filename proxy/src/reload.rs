//! Hot reload: the config file, the filters and the certificates change under a running proxy
//! without a restart and without failing a request.
//!
//! Every reload resolves the whole input again: the config file (validated as at start), each
//! filter's bytes and each TLS file's bytes, identified by content (sha256), not by file
//! events. So an editor's rename, an in-place write and a Kubernetes ConfigMap's `..data`
//! symlink swap all look alike, and a reload that finds nothing new does nothing.
//!
//! What changed is built off the request path (components compile on the blocking pool), then
//! the new [`Gateway`] generation is swapped in atomically. Requests in flight keep the
//! generation they started with, and the old generation (its filter instances, its memory) is
//! released when its last request ends. What did not change is kept: clusters keep their
//! pools and latency estimates, filters their warm instances, and every filter keeps its shared
//! state and metrics across versions.
//!
//! A bad input never replaces a good one: a filter that does not load keeps its last good
//! version in service; a config that does not validate keeps the whole running config. Each
//! reload is counted (`weir_reload_total{result}`) and the last error is shown on `/filters`.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use arc_swap::ArcSwap;

use crate::cluster::Cluster;
use crate::config::{Config, FilterEntry, FilterSource};
use crate::filter::host::FilterShared;
use crate::filter::wasm::{digest, FilterLimits};
use crate::filter::{Filter, FilterChain, FilterError, Phase, PhaseFuture, RequestContext};
use crate::metrics::Metrics;
use crate::proxy::{wasm_engine, Gateway, Shared};
use crate::registry::{OciRef, Registry};

/// What `/filters` shows of one loaded filter.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FilterInfo {
    /// The chain entry name.
    pub name: String,
    /// Where it comes from (a file path, or a registry reference).
    pub source: String,
    /// sha256 of the component in service.
    pub digest: String,
    /// Reload generation that loaded the version in service.
    pub generation: u64,
    /// When the version in service was loaded (RFC 3339, UTC).
    pub loaded_at: String,
    /// The last failure to load a newer version, if the version in service is not the newest.
    pub last_error: Option<String>,
}

/// What `/filters` shows of reloads.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ReloadStatus {
    /// Generations applied (1 = the start).
    pub generation: u64,
    /// Reload attempts since the start, including those that found nothing changed.
    pub attempts: u64,
    /// When the last reload attempt ended.
    pub last_attempt_at: Option<String>,
    /// Why the last reload attempt failed, if it did.
    pub last_error: Option<String>,
    /// Every loaded filter.
    pub filters: Vec<FilterInfo>,
}

/// A filter as loaded, with what identifies its version.
#[derive(Clone)]
struct Loaded {
    /// digest + config + limits: equal keys are the same filter.
    key: String,
    filter: Arc<dyn Filter>,
    info: FilterInfo,
}

/// A cluster as built, with what identifies its config.
#[derive(Clone)]
struct BuiltCluster {
    key: String,
    cluster: Arc<Cluster>,
}

/// What the running generation was built from.
#[derive(Default)]
struct Applied {
    fingerprint: String,
    generation: u64,
    filters: HashMap<String, Loaded>,
    /// Per filter name, across versions: state, metrics, the clusters it may call.
    shared: HashMap<String, Arc<FilterShared>>,
    clusters: HashMap<String, BuiltCluster>,
    registry: Option<Arc<Registry>>,
    /// Each filter's view of the clusters as the build made it, put in place only when its
    /// generation goes into service: until then the running filters call the clusters in
    /// service (a build takes seconds when it compiles Wasm or pulls from a registry).
    views: Vec<(Arc<FilterShared>, Arc<crate::cluster::Clusters>)>,
}

impl Applied {
    fn repoint_filters(&mut self) {
        for (shared, view) in self.views.drain(..) {
            shared.clusters.store(view);
        }
    }
}

/// How a reload ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing changed since the last generation.
    Unchanged,
    /// A new generation is in service (some filters may have kept their old version: see
    /// the errors).
    Applied {
        /// Errors of filters that kept their old version.
        errors: Vec<String>,
    },
}

/// Builds generations and swaps them in; one per process.
pub struct Control {
    /// The data plane the listeners serve.
    pub shared: Arc<Shared>,
    /// The config in service.
    pub config: ArcSwap<Config>,
    /// The names `is_relevant` compares events with, made once per config in service.
    inputs: ArcSwap<InputNames>,
    path: Option<PathBuf>,
    native: HashMap<String, FilterChain>,
    applied: tokio::sync::Mutex<Applied>,
    status: Mutex<ReloadStatus>,
}

/// The current time as RFC 3339 (seconds, UTC).
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

impl Control {
    /// Builds the first generation of `config` (read from `path`, when it came from a file).
    /// Any error is fatal here: there is no good version to keep.
    pub async fn start(
        config: Config,
        path: Option<PathBuf>,
        native: HashMap<String, FilterChain>,
    ) -> anyhow::Result<Arc<Control>> {
        let metrics = Arc::new(Metrics::new());
        let mut applied = Applied::default();
        let files = files_fingerprint(&config);
        let (gateway, errors) = build(&config, &metrics, &native, &mut applied, 1, false).await?;
        applied.repoint_filters();
        applied.fingerprint = fingerprint(&files, &config, applied.registry.as_deref());
        applied.generation = 1;
        let status = ReloadStatus {
            generation: 1,
            last_error: (!errors.is_empty()).then(|| errors.join("; ")),
            filters: applied.filters.values().map(|l| l.info.clone()).collect(),
            ..ReloadStatus::default()
        };
        Ok(Arc::new(Control {
            shared: Arc::new(Shared::new(gateway, metrics)),
            inputs: ArcSwap::from_pointee(InputNames::of(path.as_deref(), &config)),
            config: ArcSwap::from_pointee(config),
            path,
            native,
            applied: tokio::sync::Mutex::new(applied),
            status: Mutex::new(status),
        }))
    }

    /// The reload status for `/filters`.
    pub fn status(&self) -> ReloadStatus {
        let mut s = self.status.lock().expect("status lock").clone();
        s.filters.sort_by(|a, b| a.name.cmp(&b.name));
        s
    }

    /// The files and directories a watcher should follow: the config file's directory, the
    /// filter directory, and each TLS file's directory.
    pub fn watched_dirs(&self) -> Vec<PathBuf> {
        let config = self.config.load();
        let mut dirs: Vec<PathBuf> = Vec::new();
        let mut add = |p: &Path| {
            let d = if p.is_dir() {
                p.to_path_buf()
            } else {
                p.parent().map(Path::to_path_buf).unwrap_or_default()
            };
            let d = if d.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                d
            };
            if !dirs.contains(&d) {
                dirs.push(d);
            }
        };
        if let Some(p) = &self.path {
            add(p);
        }
        add(&config.resolve(&config.filter_host.dir));
        for f in input_files(&config) {
            add(&f);
        }
        dirs
    }

    /// Whether a file event at `path` (in a watched directory) can concern this proxy: the
    /// config file, a filter file (any `.wasm`: a config waiting for a new file must see it
    /// arrive), a TLS file, a file of a mounted `files` directory, a Kubernetes volume's
    /// `..data` swap, or anything while the last reload failed. Other files sharing those
    /// directories (a build's `target/`, editors' swap files, logs) are not inputs. Names are
    /// compared, not whole paths: the watcher reports paths as it watched them.
    pub fn is_relevant(&self, path: &Path) -> bool {
        let Some(name) = path.file_name() else {
            return true;
        };
        if name.to_string_lossy().starts_with("..") || path.extension().is_some_and(|e| e == "wasm") {
            return true;
        }
        if self.status.lock().expect("status lock").last_error.is_some() {
            return true;
        }
        // Every event of a busy directory lands here: compare names computed once per config,
        // never list directories or build paths per event.
        let inputs = self.inputs.load();
        inputs.files.contains(name)
            || path
                .parent()
                .and_then(Path::file_name)
                .is_some_and(|dir| inputs.dirs.contains(dir))
    }

    /// Reloads: re-reads the config (when it came from a file) and every input, and applies
    /// what changed. `listeners` applies listener changes (bind first, commit after the swap).
    pub async fn reload(&self, listeners: &dyn ListenerApply) -> anyhow::Result<Outcome> {
        let mut applied = self.applied.lock().await;
        let result = self.reload_locked(&mut applied, listeners).await;
        let metrics = &self.shared.metrics;
        let mut status = self.status.lock().expect("status lock");
        status.last_attempt_at = Some(now_rfc3339());
        status.attempts += 1;
        match &result {
            Ok(Outcome::Unchanged) => {}
            Ok(Outcome::Applied { errors }) => {
                metrics.reload(if errors.is_empty() { "ok" } else { "error" });
                status.last_error = (!errors.is_empty()).then(|| errors.join("; "));
            }
            Err(e) => {
                metrics.reload("error");
                status.last_error = Some(format!("{e:#}"));
            }
        }
        status.generation = applied.generation;
        status.filters = applied.filters.values().map(|l| l.info.clone()).collect();
        match &result {
            Ok(Outcome::Applied { errors }) if errors.is_empty() => {
                tracing::info!(generation = applied.generation, "reloaded")
            }
            Ok(Outcome::Applied { errors }) => {
                tracing::warn!(generation = applied.generation, errors = ?errors, "reloaded; some filters kept their previous version")
            }
            Ok(Outcome::Unchanged) => tracing::debug!("reload: nothing changed"),
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "reload failed; the running config stays in service")
            }
        }
        result
    }

    async fn reload_locked(
        &self,
        applied: &mut Applied,
        listeners: &dyn ListenerApply,
    ) -> anyhow::Result<Outcome> {
        let config = match &self.path {
            Some(p) => Config::load(p).map_err(|e| anyhow::anyhow!("{e}"))?,
            None => (**self.config.load()).clone(),
        };
        // Inputs are digested before the build reads them: a file that changes during the
        // build differs from the recorded digest, so the next event reloads it again.
        let files = files_fingerprint(&config);
        if fingerprint(&files, &config, applied.registry.as_deref()) == applied.fingerprint {
            return Ok(Outcome::Unchanged);
        }
        let generation = applied.generation + 1;
        // Work on a copy: a failure half-way, or the reload dropped before it ends, leaves
        // the state in service untouched.
        let mut next = Applied {
            fingerprint: String::new(),
            generation: applied.generation,
            filters: applied.filters.clone(),
            shared: applied.shared.clone(),
            clusters: applied.clusters.clone(),
            registry: applied.registry.clone(),
            views: Vec::new(),
        };
        let (gateway, errors) = build(
            &config,
            &self.shared.metrics,
            &self.native,
            &mut next,
            generation,
            true,
        )
        .await?;
        let prepared = listeners.prepare(&config).await?;
        self.shared.publish(Arc::new(gateway));
        next.repoint_filters();
        listeners.commit(prepared);
        self.inputs
            .store(Arc::new(InputNames::of(self.path.as_deref(), &config)));
        self.config.store(Arc::new(config));
        // Pulls during the build may have resolved references: record the digests in service.
        next.fingerprint = fingerprint(&files, &self.config.load(), next.registry.as_deref());
        next.generation = generation;
        *applied = next;
        let in_use: HashSet<String> = applied.filters.values().map(|l| l.info.digest.clone()).collect();
        if let Some(r) = &applied.registry {
            r.retain(&config_refs(&self.config.load()));
        }
        if let Ok(engine) = wasm_engine() {
            engine.retain_compiled(&in_use);
        }
        Ok(Outcome::Applied { errors })
    }
}

/// Listener changes of a reload, applied in two steps so that a bind failure aborts the
/// reload before anything is swapped.
pub trait ListenerApply: Send + Sync {
    /// Binds new or moved listeners and builds new settings; nothing is served yet.
    fn prepare<'a>(&'a self, config: &'a Config) -> PrepareFuture<'a>;
    /// Starts what `prepare` bound, stops what left, and hands new settings to the rest.
    fn commit(&self, prepared: Prepared);
}

/// What [`ListenerApply::prepare`] made, for its `commit`.
pub type Prepared = Box<dyn std::any::Any + Send>;

/// What [`ListenerApply::prepare`] returns.
pub type PrepareFuture<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<Prepared>> + Send + 'a>>;

/// For reloads without listeners to change (embedders that serve themselves).
pub struct NoListeners;

impl ListenerApply for NoListeners {
    fn prepare<'a>(&'a self, _config: &'a Config) -> PrepareFuture<'a> {
        Box::pin(async { Ok(Box::new(()) as Prepared) })
    }
    fn commit(&self, _prepared: Prepared) {}
}

/// The files directly in a directory, sorted.
fn dir_files(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// A digest of a directory's files (names and contents).
fn dir_digest(dir: &Path) -> String {
    let mut all = String::new();
    for f in dir_files(dir) {
        all.push_str(&f.display().to_string());
        all.push_str(&digest(&std::fs::read(&f).unwrap_or_default()));
    }
    digest(all.as_bytes())
}

/// Every file a config's generation is built from, besides the config itself and filters.
/// The file names of a config's inputs (the config file itself, TLS files, filter files,
/// the files of mounted directories), and the names of the directories mounted into filters,
/// where any file counts.
#[derive(Debug, Default)]
struct InputNames {
    files: HashSet<std::ffi::OsString>,
    dirs: HashSet<std::ffi::OsString>,
}

impl InputNames {
    fn of(path: Option<&Path>, config: &Config) -> InputNames {
        fn names<'a>(paths: impl Iterator<Item = &'a Path>) -> HashSet<std::ffi::OsString> {
            paths.filter_map(Path::file_name).map(ToOwned::to_owned).collect()
        }
        let inputs = input_files(config);
        let mounted = config
            .listeners
            .iter()
            .flat_map(|l| l.filters.iter())
            .chain(config.routes.iter().flat_map(|r| r.filters.iter()))
            .filter_map(|f| f.files.as_deref());
        InputNames {
            files: names(path.into_iter().chain(inputs.iter().map(PathBuf::as_path))),
            dirs: names(mounted),
        }
    }
}

fn input_files(config: &Config) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    for l in &config.listeners {
        if let Some(t) = &l.tls {
            out.push(config.resolve(&t.cert));
            out.push(config.resolve(&t.key));
            for s in &t.sni {
                out.push(config.resolve(&s.cert));
                out.push(config.resolve(&s.key));
            }
            if let Some(ca) = &t.client_ca {
                out.push(config.resolve(ca));
            }
        }
    }
    let entries = config
        .listeners
        .iter()
        .flat_map(|l| l.filters.iter())
        .chain(config.routes.iter().flat_map(|r| r.filters.iter()));
    for f in entries {
        if let Ok(FilterSource::File(p)) = config.filter_source(f) {
            out.push(p);
        }
        if let Some(d) = &f.files {
            out.extend(dir_files(&config.resolve(d)));
        }
    }
    for c in config.clusters.values() {
        out.extend(c.tls_files().into_iter().map(|p| config.resolve(p)));
    }
    out
}

/// Every registry reference a config names.
pub fn config_refs(config: &Config) -> Vec<OciRef> {
    let entries = config
        .listeners
        .iter()
        .flat_map(|l| l.filters.iter())
        .chain(config.routes.iter().flat_map(|r| r.filters.iter()));
    let mut out: Vec<OciRef> = Vec::new();
    for e in entries {
        if let Ok(FilterSource::Oci(r)) = config.filter_source(e) {
            if !out.contains(&r) {
                out.push(r);
            }
        }
    }
    out
}

/// A digest of the config as parsed and of every file it names, as they are now.
fn files_fingerprint(config: &Config) -> String {
    let mut all = digest(format!("{config:?}").as_bytes());
    for f in input_files(config) {
        all.push_str(&f.display().to_string());
        all.push_str(&digest(&std::fs::read(&f).unwrap_or_default()));
    }
    all
}

/// One digest over everything a generation is built from: `files` (from
/// [`files_fingerprint`]) and the registry artifacts in service (no network).
fn fingerprint(files: &str, config: &Config, registry: Option<&Registry>) -> String {
    let mut all = files.to_string();
    for r in config_refs(config) {
        all.push_str(&r.to_string());
        all.push_str(&registry.and_then(|g| g.known_digest(&r)).unwrap_or_default());
    }
    digest(all.as_bytes())
}

/// Builds a generation, keeping from `applied` what did not change. With `keep_on_error`, a
/// filter that fails to load keeps its previous version and the error is returned beside the
/// gateway; without (at start), any error fails the build.
async fn build(
    config: &Config,
    metrics: &Arc<Metrics>,
    native: &HashMap<String, FilterChain>,
    applied: &mut Applied,
    generation: u64,
    keep_on_error: bool,
) -> anyhow::Result<(Gateway, Vec<String>)> {
    // Clusters: kept when their config and files are the same.
    let mut clusters = crate::cluster::Clusters::default();
    let mut built_clusters = HashMap::new();
    for (name, c) in &config.clusters {
        let mut key = serde_json::to_string(c).unwrap_or_default();
        for f in c.tls_files() {
            key.push_str(&digest(&std::fs::read(config.resolve(f)).unwrap_or_default()));
        }
        let cluster = match applied.clusters.get(name) {
            Some(b) if b.key == key => b.cluster.clone(),
            _ => {
                let cluster = Arc::new(
                    Cluster::new(name, c, config, metrics.clone())
                        .with_context(|| format!("{}: clusters.{name}", config.source_name))?,
                );
                if let Some(previous) = applied.clusters.get(name) {
                    cluster.inherit_addresses(&previous.cluster);
                }
                cluster.refresh_dns().await;
                tokio::spawn(Cluster::maintain(Arc::downgrade(&cluster)));
                cluster
            }
        };
        clusters.insert(Arc::from(name.as_str()), cluster.clone());
        built_clusters.insert(name.clone(), BuiltCluster { key, cluster });
    }
    let clusters_arc = Arc::new(clusters.clone());
    let registry = match applied.registry.take() {
        Some(r) if r.same_settings(config) => r,
        _ => Arc::new(Registry::new(config).with_context(|| config.source_name.clone())?),
    };
    applied.registry = Some(registry.clone());

    // Filters: one per entry name (the first entry of a name defines it).
    let mut entries: Vec<(String, &FilterEntry)> = Vec::new();
    for (li, l) in config.listeners.iter().enumerate() {
        for (k, e) in l.filters.iter().enumerate() {
            entries.push((format!("listeners[{li}].filters[{k}]"), e));
        }
    }
    for (ri, r) in config.routes.iter().enumerate() {
        for (k, e) in r.filters.iter().enumerate() {
            entries.push((format!("routes[{ri}].filters[{k}]"), e));
        }
    }
    let mut filters: HashMap<String, Arc<dyn Filter>> = HashMap::new();
    let mut loaded: HashMap<String, Loaded> = HashMap::new();
    let mut errors = Vec::new();
    for (at, e) in entries {
        if loaded.contains_key(&e.name) {
            continue;
        }
        let shared = applied
            .shared
            .entry(e.name.clone())
            .or_insert_with(|| {
                let shared = FilterShared::new(e.name.as_str().into(), clusters_arc.clone());
                metrics.register_filter(e.name.as_str().into(), &shared.metrics);
                Arc::new(shared)
            })
            .clone();
        applied.views.push((shared.clone(), clusters_arc.clone()));
        let source = config
            .filter_source(e)
            .map_err(|err| anyhow::anyhow!("{}: {at}.file: {err}", config.source_name))?;
        let shown = match &source {
            FilterSource::File(p) => p.display().to_string(),
            FilterSource::Oci(r) => r.to_string(),
        };
        let what = format!("{}: {at} ({}): {shown}", config.source_name, e.name);
        let old = applied.filters.get(&e.name);
        let result = load(
            config, e, &source, &what, shared, metrics, old, &registry, generation,
        )
        .await;
        let msg = match result {
            Ok(l) => {
                loaded.insert(e.name.clone(), l);
                continue;
            }
            Err(err) => format!("{err:#}"),
        };
        match applied.filters.remove(&e.name) {
            // The previous version serves on (an unavailable placeholder is no version).
            Some(mut old) if keep_on_error && !old.key.is_empty() => {
                tracing::warn!(filter = %e.name, error = %msg, "filter not reloaded; its previous version stays in service");
                old.info.last_error = Some(msg.clone());
                errors.push(msg);
                loaded.insert(e.name.clone(), old);
            }
            _ if matches!(source, FilterSource::Oci(_)) => {
                // A registry filter with no version to serve: the chain applies the entry's
                // failure policy until a pull succeeds.
                tracing::error!(filter = %e.name, error = %msg, policy = ?e.failure_policy, "filter unavailable");
                errors.push(msg.clone());
                let filter = Arc::new(Unavailable {
                    name: e.name.clone(),
                    reason: msg.clone(),
                    metrics: metrics.clone(),
                });
                let info = FilterInfo {
                    name: e.name.clone(),
                    source: shown,
                    digest: String::new(),
                    generation,
                    loaded_at: now_rfc3339(),
                    last_error: Some(msg),
                };
                loaded.insert(
                    e.name.clone(),
                    Loaded {
                        key: String::new(),
                        filter,
                        info,
                    },
                );
            }
            _ => return Err(anyhow::anyhow!(msg)),
        }
    }
    for (name, l) in &loaded {
        filters.insert(name.clone(), l.filter.clone());
    }
    let gateway = Gateway::assemble(config, metrics, clusters, &filters, native);
    applied.filters = loaded;
    applied.clusters = built_clusters;
    Ok((gateway, errors))
}

/// Loads one filter entry, or keeps `old` when its bytes, config and limits are the same.
#[allow(clippy::too_many_arguments)]
async fn load(
    config: &Config,
    e: &FilterEntry,
    source: &FilterSource,
    what: &str,
    shared: Arc<FilterShared>,
    metrics: &Arc<Metrics>,
    old: Option<&Loaded>,
    registry: &Registry,
    generation: u64,
) -> anyhow::Result<Loaded> {
    let (bytes, d, shown): (Arc<[u8]>, String, String) = match source {
        FilterSource::File(p) => {
            // Reading and hashing a filter (megabytes with debug info) is blocking work: off
            // the request threads.
            let path = p.clone();
            let (bytes, d) = tokio::task::spawn_blocking(move || {
                std::fs::read(&path).map(|b| {
                    let d = digest(&b);
                    (Arc::<[u8]>::from(b), d)
                })
            })
            .await
            .context("reading a filter file")?
            .with_context(|| format!("{what}: cannot read"))?;
            (bytes, d, p.display().to_string())
        }
        FilterSource::Oci(r) => {
            let a = registry.resolve(r).await.with_context(|| what.to_string())?;
            (a.bytes, a.digest, r.to_string())
        }
    };
    let fh = &config.filter_host;
    let limits = FilterLimits {
        cpu_budget: fh.cpu_budget,
        memory: usize::try_from(fh.memory_limit).unwrap_or(usize::MAX),
        max_instances: fh.max_instances,
        files: e.files.as_ref().map(|d| config.resolve(d)),
    };
    let json = serde_json::to_string(&e.config)?;
    // A mounted directory is part of the version: new key files load a new instance set.
    let files = match limits.files.clone() {
        Some(dir) => tokio::task::spawn_blocking(move || dir_digest(&dir))
            .await
            .context("hashing a mounted directory")?,
        None => String::new(),
    };
    let key = format!("{d} {json} {limits:?} {files}");
    if let Some(old) = old.filter(|o| o.key == key) {
        let mut info = old.info.clone();
        info.last_error = None;
        return Ok(Loaded {
            key,
            filter: old.filter.clone(),
            info,
        });
    }
    let engine = wasm_engine()?;
    let component = engine.component(what, bytes, &d).await?;
    let filter = engine
        .load(what, &component, json, limits, shared, metrics.clone())
        .await?;
    Ok(Loaded {
        key,
        filter: Arc::new(filter),
        info: FilterInfo {
            name: e.name.clone(),
            source: shown,
            digest: d,
            generation,
            loaded_at: now_rfc3339(),
            last_error: None,
        },
    })
}

/// Watches the inputs' directories and reloads after changes settle (debounced): a burst of
/// writes (an editor, a ConfigMap update) is one reload. Runs until the process ends.
pub async fn watch(control: Arc<Control>, listeners: Arc<dyn ListenerApply>, debounce: Duration) {
    if let Some(w) = Watching::start(control) {
        w.run(listeners, debounce).await;
    }
}

/// A file watcher already following the inputs' directories: made before the listeners
/// accept, so no change made after the first request is served can be missed.
pub struct Watching {
    control: Arc<Control>,
    watcher: notify::RecommendedWatcher,
    watching: HashSet<PathBuf>,
    tx: tokio::sync::mpsc::UnboundedSender<()>,
    rx: tokio::sync::mpsc::UnboundedReceiver<()>,
}

impl Watching {
    /// Starts watching (synchronously); `None`, logged, when the platform watcher fails.
    pub fn start(control: Arc<Control>) -> Option<Watching> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let events = tx.clone();
        let relevant = control.clone();
        let watcher = match notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
            let change = match ev {
                Ok(e) => {
                    is_change(&e.kind)
                        && (e.paths.is_empty() || e.paths.iter().any(|p| relevant.is_relevant(p)))
                }
                // Events were lost (queue overflow): look at everything.
                Err(_) => true,
            };
            if change {
                let _ = events.send(());
            }
        }) {
            Ok(w) => w,
            Err(e) => {
                tracing::error!(error = %e, "cannot watch files; hot reload is off");
                return None;
            }
        };
        let mut w = Watching {
            control,
            watcher,
            watching: HashSet::new(),
            tx,
            rx,
        };
        w.follow();
        Some(w)
    }

    /// Watches the directories the config in service names that are not watched yet.
    fn follow(&mut self) {
        use notify::Watcher as _;
        for d in self.control.watched_dirs() {
            if self.watching.contains(&d) {
                continue;
            }
            match self.watcher.watch(&d, notify::RecursiveMode::NonRecursive) {
                Ok(()) => {
                    tracing::debug!(dir = %d.display(), "watching");
                    self.watching.insert(d);
                }
                Err(e) => tracing::warn!(dir = %d.display(), error = %e, "cannot watch"),
            }
        }
    }

    /// Reloads after each settled burst of changes, until the process ends.
    pub async fn run(mut self, listeners: Arc<dyn ListenerApply>, debounce: Duration) {
        // Registry tags are checked on their own clock; a moved tag is a change like a file's.
        let poller = tokio::spawn(poll_registry(self.control.clone(), self.tx.clone()));
        let _poller = AbortOnDrop(poller);
        while self.rx.recv().await.is_some() {
            // Settle: wait until no event came for `debounce`.
            loop {
                match tokio::time::timeout(debounce, self.rx.recv()).await {
                    Ok(Some(())) => continue,
                    Ok(None) => return,
                    Err(_) => break,
                }
            }
            let _ = self.control.reload(&*listeners).await;
            // A new config may name new directories.
            self.follow();
        }
    }
}

/// Whether a file event can change an input. Reads are not changes: a reload reads every
/// input, and counting its own opens and closes made it reload again, forever.
fn is_change(kind: &notify::EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode, EventKind};
    match kind {
        // A file closed after writing: the end of a write (an editor, `cp`).
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Checks every registry tag in service each `registry.poll_interval`; a moved tag (or a
/// reference that becomes pullable) triggers a reload.
async fn poll_registry(control: Arc<Control>, reload: tokio::sync::mpsc::UnboundedSender<()>) {
    loop {
        let registry = control.applied.lock().await.registry.clone();
        let Some(registry) = registry else {
            tokio::time::sleep(crate::limits::DEFAULT_REGISTRY_POLL).await;
            continue;
        };
        tokio::time::sleep(registry.poll_interval()).await;
        let refs = config_refs(&control.config.load());
        let mut changed = false;
        for r in refs {
            match registry.check(&r).await {
                Ok(true) => {
                    tracing::info!(reference = %r, "registry reference moved");
                    changed = true;
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(reference = %r, error = %format!("{e:#}"), "registry check failed; the version in service stays")
                }
            }
        }
        if changed && reload.send(()).is_err() {
            return;
        }
    }
}

/// A registry filter that could not be pulled and has no cached copy: every request meets
/// the entry's failure policy (fail-closed: 500; fail-open: the filter is skipped).
struct Unavailable {
    name: String,
    reason: String,
    metrics: Arc<Metrics>,
}

impl Filter for Unavailable {
    fn name(&self) -> &str {
        &self.name
    }

    fn wants(&self, phase: Phase) -> bool {
        phase == Phase::RequestHeaders
    }

    fn on_request_headers<'a>(
        &'a self,
        _req: &'a mut http::request::Parts,
        _ctx: &'a mut RequestContext,
    ) -> PhaseFuture<'a> {
        self.metrics.filter_error(&self.name, "unavailable");
        Box::pin(std::future::ready(Err(FilterError {
            kind: "unavailable",
            message: self.reason.clone(),
        })))
    }
}
