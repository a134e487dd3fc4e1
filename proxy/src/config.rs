//! `weir.toml`: typed, validated configuration.
//!
//! Parsing goes through `serde_path_to_error`, so a type error names the field path; then
//! [`Config::validate`] checks everything serde cannot (files exist, references resolve, values
//! make sense) and reports *all* problems at once. Every error reads
//! `FILE: FIELD.PATH: reason`, e.g. `weir.toml: listeners[1].tls.cert: file not found: certs/a.pem`.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::limits;

/// The whole configuration of one Weir process.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Process-wide runtime settings.
    #[serde(default)]
    pub runtime: RuntimeConfig,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
    /// The admin listener (`/ready`, `/live`, `/metrics`, `/config`).
    #[serde(default)]
    pub admin: AdminConfig,
    /// Downstream listeners; at least one.
    #[serde(default)]
    pub listeners: Vec<ListenerConfig>,
    /// The route table: first match wins, in file order.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// Upstream clusters by name.
    #[serde(default)]
    pub clusters: BTreeMap<String, ClusterConfig>,
    /// Where filters live and the limits every filter runs under.
    #[serde(default)]
    pub filter_host: FilterHostConfig,
    /// OCI registries that filters named `oci://...` are pulled from.
    #[serde(default)]
    pub registry: RegistryConfig,
    /// Directory relative paths in this file are resolved against (the file's directory).
    #[serde(skip)]
    pub base_dir: PathBuf,
    /// The file name used in error messages.
    #[serde(skip)]
    pub source_name: String,
}

/// Process-wide runtime settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Tokio worker threads; 0 means one per core.
    pub worker_threads: usize,
    /// Time in-flight requests get to finish after SIGTERM/SIGINT.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            worker_threads: 0,
            drain_timeout: limits::DEFAULT_DRAIN_TIMEOUT,
        }
    }
}

/// Log output.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A `tracing` filter directive (`info`, `weir=debug`); `RUST_LOG` overrides it.
    pub level: String,
    /// `text` or `json`.
    pub format: LogFormat,
    /// One access-log line per request (target `weir::access`).
    pub access_log: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Text,
            access_log: true,
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The admin listener.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Whether the admin listener runs at all.
    pub enabled: bool,
    /// Where it listens; loopback by default because it shows the config.
    pub address: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            address: limits::DEFAULT_ADMIN_ADDRESS.parse().expect("valid"),
        }
    }
}

/// One downstream listener.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// Unique name, used in metrics, logs and route `listeners` lists.
    pub name: String,
    /// `ip:port` to bind; port 0 picks a free port.
    pub address: SocketAddr,
    /// Terminate TLS on this listener.
    #[serde(default)]
    pub tls: Option<ListenerTls>,
    /// Protection limits.
    #[serde(default)]
    pub limits: ListenerLimits,
    /// How `X-Forwarded-For`/`-Proto`/`-Host` are written.
    #[serde(default)]
    pub forwarded_headers: ForwardedMode,
    /// Filters run on every routed request of this listener, before the route's own.
    #[serde(default)]
    pub filters: Vec<FilterEntry>,
    /// Send the verified client certificate's identity upstream in
    /// `X-Forwarded-Client-Cert` (Envoy's format). A client-sent value is always removed.
    #[serde(default)]
    pub forward_client_cert: bool,
}

/// What Weir does with `X-Forwarded-*` headers.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ForwardedMode {
    /// Replace whatever the client sent (the safe edge default: clients can lie).
    #[default]
    Overwrite,
    /// Append the client address to an existing `X-Forwarded-For` (behind a trusted proxy).
    Append,
    /// Leave the headers alone.
    Off,
}

/// TLS termination on a listener.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerTls {
    /// PEM certificate chain served when no SNI entry matches.
    pub cert: PathBuf,
    /// PEM private key of `cert`.
    pub key: PathBuf,
    /// More certificates, chosen by the client's SNI.
    #[serde(default)]
    pub sni: Vec<SniCert>,
    /// PEM CA bundle; when set, clients must present a certificate signed by it (mTLS).
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// With `client_ca`: `required` (default) rejects clients without a certificate;
    /// `optional` lets them in without an identity.
    #[serde(default)]
    pub client_auth: ClientAuth,
}

/// Whether a client certificate is required when `client_ca` is set.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ClientAuth {
    /// A handshake without a valid client certificate fails.
    #[default]
    Required,
    /// A client may connect without a certificate; one it presents must verify.
    Optional,
}

/// A certificate served for some server names.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SniCert {
    /// Server names (exact, or `*.example.com`) this certificate answers for.
    pub names: Vec<String>,
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

/// Downstream protection limits of a listener; defaults in [`crate::limits`].
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenerLimits {
    /// Largest request head in bytes (431 above).
    pub max_header_bytes: usize,
    /// Most header fields (431 above).
    pub max_headers: usize,
    /// Longest request target in bytes (414 above).
    pub max_uri_bytes: usize,
    /// Largest request body in bytes (413 above).
    pub max_request_body: u64,
    /// Time to receive a whole request head (slowloris guard); also the time a new
    /// connection may stay silent (not a byte sent) before it is dropped.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Close a connection idle this long.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Time to complete a TLS handshake.
    #[serde(with = "humantime_serde")]
    pub tls_handshake_timeout: Duration,
    /// Longest silence inside a request or response body before the stream is cut.
    #[serde(with = "humantime_serde")]
    pub stream_idle_timeout: Duration,
    /// Concurrent HTTP/2 streams per connection.
    pub max_concurrent_streams: u32,
    /// Largest decoded HTTP/2 header list in bytes.
    pub h2_max_header_list_size: u32,
    /// Open connections on this listener.
    pub max_connections: usize,
}

impl Default for ListenerLimits {
    fn default() -> Self {
        Self {
            max_header_bytes: limits::DEFAULT_MAX_HEADER_BYTES,
            max_headers: limits::DEFAULT_MAX_HEADERS,
            max_uri_bytes: limits::DEFAULT_MAX_URI_BYTES,
            max_request_body: limits::DEFAULT_MAX_REQUEST_BODY,
            header_read_timeout: limits::DEFAULT_HEADER_READ_TIMEOUT,
            idle_timeout: limits::DEFAULT_IDLE_TIMEOUT,
            tls_handshake_timeout: limits::DEFAULT_TLS_HANDSHAKE_TIMEOUT,
            stream_idle_timeout: limits::DEFAULT_STREAM_IDLE_TIMEOUT,
            max_concurrent_streams: limits::DEFAULT_MAX_CONCURRENT_STREAMS,
            h2_max_header_list_size: limits::DEFAULT_H2_MAX_HEADER_LIST_SIZE,
            max_connections: limits::DEFAULT_MAX_CONNECTIONS,
        }
    }
}

/// One entry of the route table: which requests go to which cluster.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Name used in metrics and logs; defaults to `route-N`.
    #[serde(default)]
    pub name: Option<String>,
    /// Listeners this route applies to; empty means all.
    #[serde(default)]
    pub listeners: Vec<String>,
    /// Host to match (`api.example.com` or `*.example.com`, port ignored); absent matches any.
    #[serde(default)]
    pub host: Option<String>,
    /// Path prefix to match, on segment boundaries after path normalisation.
    #[serde(default = "default_prefix")]
    pub path_prefix: String,
    /// Target cluster (a filter may choose another later).
    pub cluster: String,
    /// Overrides the cluster's `request_timeout`.
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    /// Send this `Host`/`:authority` upstream instead of the client's.
    #[serde(default)]
    pub host_rewrite: Option<String>,
    /// Send the chosen endpoint's `host:port` as `Host`/`:authority`.
    #[serde(default)]
    pub auto_host_rewrite: bool,
    /// Tunnel `CONNECT` requests matching this route to the cluster (refused otherwise).
    #[serde(default)]
    pub allow_connect: bool,
    /// HTTP/1.1 `Upgrade` protocols tunnelled to the cluster (Envoy's `upgrade_configs`);
    /// a request asking for another goes on as a plain request, its `Upgrade` removed. Not
    /// every protocol by default: an `h2c` upgrade would open a raw HTTP/2 tunnel past the
    /// filters (h2c smuggling).
    #[serde(default = "default_upgrades")]
    pub upgrades: Vec<String>,
    /// Filters run on this route, after the listener's.
    #[serde(default)]
    pub filters: Vec<FilterEntry>,
}

fn default_upgrades() -> Vec<String> {
    vec!["websocket".into()]
}

/// The filter host: where filter files are and the limits each filter call runs under.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct FilterHostConfig {
    /// Directory filter `file`s are relative to (itself relative to this config file).
    pub dir: PathBuf,
    /// CPU time one phase call may use.
    #[serde(with = "humantime_serde")]
    pub cpu_budget: Duration,
    /// Linear memory one instance may grow to, in bytes.
    pub memory_limit: u64,
    /// Most live instances per filter (requests it serves at once).
    pub max_instances: usize,
    /// Most bytes gathered for a buffered body filter, and kept of a request body for a
    /// retry.
    pub body_buffer: u64,
}

impl Default for FilterHostConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("filters"),
            cpu_budget: limits::DEFAULT_FILTER_CPU_BUDGET,
            memory_limit: limits::DEFAULT_FILTER_MEMORY,
            max_instances: limits::DEFAULT_FILTER_MAX_INSTANCES,
            body_buffer: limits::DEFAULT_FILTER_BODY_BUFFER,
        }
    }
}

/// Pulling filters from OCI registries.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// Where pulled filters are kept by digest (relative to this file); a restart with the
    /// registry down starts from it.
    pub cache_dir: PathBuf,
    /// How often a tag is checked for a new version.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Time one pull or check may take.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Per registry host (`host` or `host:port`): TLS, plain HTTP, credentials.
    pub hosts: BTreeMap<String, RegistryHost>,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            cache_dir: PathBuf::from("weir-cache"),
            poll_interval: limits::DEFAULT_REGISTRY_POLL,
            timeout: limits::DEFAULT_REGISTRY_TIMEOUT,
            hosts: BTreeMap::new(),
        }
    }
}

/// How to reach one registry host.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryHost {
    /// Use plain HTTP (only for this host, and only when set).
    pub insecure: bool,
    /// CA bundle (PEM) to verify the registry's certificate with, besides the system roots.
    pub ca: Option<PathBuf>,
    /// Basic auth user.
    pub username: Option<String>,
    /// Basic auth password.
    pub password: Option<String>,
    /// Environment variable holding the basic auth password.
    pub password_env: Option<String>,
    /// Bearer token.
    pub token: Option<String>,
    /// Environment variable holding the bearer token.
    pub token_env: Option<String>,
}

/// Where a chain entry's filter comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FilterSource {
    /// A file (resolved against `filter_host.dir`).
    File(PathBuf),
    /// An OCI artifact.
    Oci(crate::registry::OciRef),
}

/// One filter in a chain.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FilterEntry {
    /// The filter's name: logs, metrics, errors; entries with the same name share state.
    pub name: String,
    /// The component: a `.wasm` file relative to `filter_host.dir`, or an OCI reference
    /// `oci://HOST[:PORT]/REPO:TAG` or `oci://HOST[:PORT]/REPO@sha256:DIGEST`.
    pub file: PathBuf,
    /// What a failing call does to the request: `fail-closed` (500) or `fail-open` (skip).
    #[serde(default)]
    pub failure_policy: crate::filter::FailurePolicy,
    /// The filter's own configuration, handed to it as JSON.
    #[serde(default)]
    pub config: toml::Table,
    /// A directory (relative to this file) the filter may read, mounted read-only at `/files`
    /// in the filter (key sets, allow lists). Its files are watched like the filter's own.
    #[serde(default)]
    pub files: Option<PathBuf>,
}

fn default_prefix() -> String {
    "/".into()
}

/// An upstream cluster: a set of endpoints and how to talk to them.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// `host:port` endpoints; names are resolved by DNS and re-resolved periodically.
    pub endpoints: Vec<String>,
    /// Protocol spoken to the endpoints.
    #[serde(default)]
    pub protocol: UpstreamProtocol,
    /// Load-balancing algorithm.
    #[serde(default)]
    pub balance: BalanceAlgorithm,
    /// Time to connect (TCP + TLS).
    #[serde(default = "d_connect", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Time from the end of the request (its body's last byte, for a request with one) to the
    /// response head, as Envoy's route timeout: a slow upload is bounded by the listener's
    /// stream idle timeout instead.
    #[serde(default = "d_request", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Close pooled connections idle this long.
    #[serde(default = "d_idle", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Idle HTTP/1 connections kept per endpoint.
    #[serde(default = "d_max_idle")]
    pub max_idle_per_endpoint: usize,
    /// How often DNS names are resolved again.
    #[serde(default = "d_dns", with = "humantime_serde")]
    pub dns_refresh: Duration,
    /// First ejection of an endpoint that failed to connect (doubles each time).
    #[serde(default = "d_eject", with = "humantime_serde")]
    pub ejection_backoff: Duration,
    /// Longest ejection.
    #[serde(default = "d_eject_max", with = "humantime_serde")]
    pub ejection_backoff_max: Duration,
    /// TLS to the endpoints.
    #[serde(default)]
    pub tls: Option<ClusterTls>,
}

fn d_connect() -> Duration {
    limits::DEFAULT_CONNECT_TIMEOUT
}
fn d_request() -> Duration {
    limits::DEFAULT_REQUEST_TIMEOUT
}
fn d_idle() -> Duration {
    limits::DEFAULT_UPSTREAM_IDLE_TIMEOUT
}
fn d_max_idle() -> usize {
    limits::DEFAULT_MAX_IDLE_PER_ENDPOINT
}
fn d_dns() -> Duration {
    limits::DEFAULT_DNS_REFRESH
}
fn d_eject() -> Duration {
    limits::DEFAULT_EJECTION_BACKOFF
}
fn d_eject_max() -> Duration {
    limits::DEFAULT_EJECTION_BACKOFF_MAX
}

/// Protocol to an upstream.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum UpstreamProtocol {
    /// HTTP/1.1 with keep-alive.
    #[default]
    Http1,
    /// HTTP/2 (h2 by ALPN over TLS, prior knowledge over plain TCP).
    Http2,
}

/// Load-balancing algorithm of a cluster.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum BalanceAlgorithm {
    /// Each endpoint in turn.
    RoundRobin,
    /// Power of two choices over a peak-EWMA latency estimate (linkerd2's algorithm).
    #[default]
    PeakEwma,
}

/// TLS to upstream endpoints.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterTls {
    /// PEM CA bundle that upstream certificates must chain to; the system bundle if absent.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// Name to send as SNI and to verify; defaults to the endpoint's host.
    #[serde(default)]
    pub server_name: Option<String>,
    /// Client certificate for mTLS to the upstream.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// Private key of `cert`.
    #[serde(default)]
    pub key: Option<PathBuf>,
}

/// Where the system CA bundle usually lives (Debian/Ubuntu, Fedora/RHEL, Alpine).
pub const SYSTEM_CA_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

/// One configuration problem: where and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    /// Field path, e.g. `listeners[1].tls.cert`; empty for the whole file.
    pub path: String,
    /// Why it is wrong.
    pub message: String,
}

/// All problems found in one configuration file.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigError {
    /// The file, as named in messages.
    pub file: String,
    /// Every problem found.
    pub issues: Vec<ConfigIssue>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, issue) in self.issues.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            if issue.path.is_empty() {
                write!(f, "{}: {}", self.file, issue.message)?;
            } else {
                write!(f, "{}: {}: {}", self.file, issue.path, issue.message)?;
            }
        }
        Ok(())
    }
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: name.clone(),
            issues: vec![ConfigIssue {
                path: String::new(),
                message: format!("cannot read: {e}"),
            }],
        })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Self::from_toml(&text, &name, &base)
    }

    /// Parses and validates config text; `name` is used in messages, relative paths resolve
    /// against `base_dir`.
    pub fn from_toml(text: &str, name: &str, base_dir: &Path) -> Result<Config, ConfigError> {
        let de = toml::Deserializer::new(text);
        let mut config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let mut message = inner.message().to_string();
            if let Some(span) = inner.span() {
                let (line, col) = line_col(text, span.start);
                message = format!("{message} (line {line}, column {col})");
            }
            let path = if path == "." { String::new() } else { path };
            ConfigError {
                file: name.into(),
                issues: vec![ConfigIssue { path, message }],
            }
        })?;
        config.base_dir = base_dir.to_path_buf();
        config.source_name = name.into();
        config.validate()?;
        Ok(config)
    }

    /// Resolves a path from the config against the config file's directory.
    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        }
    }

    /// Checks what serde cannot; reports every problem at once.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut issues = Vec::new();
        let mut push = |path: String, message: String| issues.push(ConfigIssue { path, message });

        if self.listeners.is_empty() {
            push("listeners".into(), "at least one listener is required".into());
        }
        let mut names = HashSet::new();
        let mut addrs = HashSet::new();
        for (i, l) in self.listeners.iter().enumerate() {
            let at = format!("listeners[{i}]");
            if l.name.is_empty() {
                push(format!("{at}.name"), "must not be empty".into());
            } else if !names.insert(l.name.as_str()) {
                push(
                    format!("{at}.name"),
                    format!("duplicate listener name {:?}", l.name),
                );
            }
            if l.address.port() != 0 && !addrs.insert(l.address) {
                push(
                    format!("{at}.address"),
                    format!("address {} is used twice", l.address),
                );
            }
            if self.admin.enabled && l.address.port() != 0 && l.address == self.admin.address {
                push(format!("{at}.address"), "same address as admin.address".into());
            }
            if let Some(tls) = &l.tls {
                self.check_file(&mut push, format!("{at}.tls.cert"), &tls.cert);
                self.check_file(&mut push, format!("{at}.tls.key"), &tls.key);
                for (j, s) in tls.sni.iter().enumerate() {
                    if s.names.is_empty() {
                        push(format!("{at}.tls.sni[{j}].names"), "must name a server".into());
                    }
                    self.check_file(&mut push, format!("{at}.tls.sni[{j}].cert"), &s.cert);
                    self.check_file(&mut push, format!("{at}.tls.sni[{j}].key"), &s.key);
                }
                if let Some(ca) = &tls.client_ca {
                    self.check_file(&mut push, format!("{at}.tls.client_ca"), ca);
                }
            }
            self.check_filters(&mut push, &at, &l.filters);
            let lim = &l.limits;
            if lim.max_header_bytes < 8192 {
                push(
                    format!("{at}.limits.max_header_bytes"),
                    "must be at least 8192".into(),
                );
            }
            if lim.max_headers == 0 {
                push(format!("{at}.limits.max_headers"), "must be at least 1".into());
            }
            if lim.max_connections == 0 {
                push(
                    format!("{at}.limits.max_connections"),
                    "must be at least 1".into(),
                );
            } else if lim.max_connections > tokio::sync::Semaphore::MAX_PERMITS {
                push(
                    format!("{at}.limits.max_connections"),
                    format!("must be at most {}", tokio::sync::Semaphore::MAX_PERMITS),
                );
            }
            if lim.max_concurrent_streams == 0 {
                push(
                    format!("{at}.limits.max_concurrent_streams"),
                    "must be at least 1".into(),
                );
            }
            for (field, d) in [
                ("header_read_timeout", lim.header_read_timeout),
                ("idle_timeout", lim.idle_timeout),
                ("tls_handshake_timeout", lim.tls_handshake_timeout),
                ("stream_idle_timeout", lim.stream_idle_timeout),
            ] {
                if d.is_zero() {
                    push(format!("{at}.limits.{field}"), "must be greater than zero".into());
                }
            }
        }

        let mut route_names = HashSet::new();
        for (i, r) in self.routes.iter().enumerate() {
            let at = format!("routes[{i}]");
            if let Some(n) = &r.name {
                if !route_names.insert(n.as_str()) {
                    push(format!("{at}.name"), format!("duplicate route name {n:?}"));
                }
            }
            for (j, l) in r.listeners.iter().enumerate() {
                if !self.listeners.iter().any(|x| &x.name == l) {
                    push(format!("{at}.listeners[{j}]"), format!("unknown listener {l:?}"));
                }
            }
            if !r.path_prefix.starts_with('/') {
                push(format!("{at}.path_prefix"), "must start with '/'".into());
            }
            if !self.clusters.contains_key(&r.cluster) {
                push(
                    format!("{at}.cluster"),
                    format!("unknown cluster {:?}", r.cluster),
                );
            }
            if let Some(h) = &r.host_rewrite {
                if r.auto_host_rewrite {
                    push(
                        format!("{at}.host_rewrite"),
                        "cannot be combined with auto_host_rewrite".into(),
                    );
                }
                if http::uri::Authority::try_from(h.as_str()).is_err() {
                    push(format!("{at}.host_rewrite"), format!("invalid host {h:?}"));
                }
            }
            if let Some(h) = &r.host {
                if h.is_empty() || h.contains('/') {
                    push(format!("{at}.host"), format!("invalid host {h:?}"));
                }
            }
            self.check_filters(&mut push, &at, &r.filters);
            if matches!(r.timeout, Some(d) if d.is_zero()) {
                push(format!("{at}.timeout"), "must be greater than zero".into());
            }
        }

        for (name, c) in &self.clusters {
            let at = format!("clusters.{name}");
            if c.endpoints.is_empty() {
                push(
                    format!("{at}.endpoints"),
                    "at least one endpoint is required".into(),
                );
            }
            for (j, e) in c.endpoints.iter().enumerate() {
                if let Err(why) = crate::cluster::parse_endpoint(e) {
                    push(format!("{at}.endpoints[{j}]"), why);
                }
            }
            for (field, d) in [
                ("connect_timeout", c.connect_timeout),
                ("request_timeout", c.request_timeout),
                ("idle_timeout", c.idle_timeout),
                ("dns_refresh", c.dns_refresh),
                ("ejection_backoff", c.ejection_backoff),
            ] {
                if d.is_zero() {
                    push(format!("{at}.{field}"), "must be greater than zero".into());
                }
            }
            if c.ejection_backoff_max < c.ejection_backoff {
                push(
                    format!("{at}.ejection_backoff_max"),
                    "must not be less than ejection_backoff".into(),
                );
            }
            if let Some(tls) = &c.tls {
                if let Some(ca) = &tls.ca {
                    self.check_file(&mut push, format!("{at}.tls.ca"), ca);
                } else if !SYSTEM_CA_BUNDLES.iter().any(|p| Path::new(p).is_file()) {
                    push(
                        format!("{at}.tls.ca"),
                        "no CA bundle given and none on this system".into(),
                    );
                }
                match (&tls.cert, &tls.key) {
                    (Some(cert), Some(key)) => {
                        self.check_file(&mut push, format!("{at}.tls.cert"), cert);
                        self.check_file(&mut push, format!("{at}.tls.key"), key);
                    }
                    (Some(_), None) => push(format!("{at}.tls.key"), "required with tls.cert".into()),
                    (None, Some(_)) => push(format!("{at}.tls.cert"), "required with tls.key".into()),
                    (None, None) => {}
                }
                if let Some(sn) = &tls.server_name {
                    if rustls::pki_types::ServerName::try_from(sn.as_str()).is_err() {
                        push(
                            format!("{at}.tls.server_name"),
                            format!("invalid server name {sn:?}"),
                        );
                    }
                }
            }
        }

        if self.filter_host.cpu_budget.is_zero() {
            push(
                "filter_host.cpu_budget".into(),
                "must be greater than zero".into(),
            );
        }
        if self.filter_host.max_instances == 0
            || self.filter_host.max_instances > limits::FILTER_POOL_INSTANCES as usize
        {
            push(
                "filter_host.max_instances".into(),
                format!("must be between 1 and {}", limits::FILTER_POOL_INSTANCES),
            );
        }
        if self.filter_host.memory_limit < 1024 * 1024
            || self.filter_host.memory_limit > limits::FILTER_POOL_MEMORY
        {
            push(
                "filter_host.memory_limit".into(),
                format!(
                    "must be between 1 MiB and {} MiB",
                    limits::FILTER_POOL_MEMORY >> 20
                ),
            );
        }
        if self.registry.poll_interval.is_zero() {
            push(
                "registry.poll_interval".into(),
                "must be greater than zero".into(),
            );
        }
        if self.registry.timeout.is_zero() {
            push("registry.timeout".into(), "must be greater than zero".into());
        }
        for (host, h) in &self.registry.hosts {
            let at = format!("registry.hosts.{host:?}");
            if let Some(ca) = &h.ca {
                self.check_file(&mut push, format!("{at}.ca"), ca);
            }
            let password = h.password.is_some() || h.password_env.is_some();
            if h.username.is_some() != password {
                push(
                    at.clone(),
                    "username and password (or password_env) go together".into(),
                );
            }
            if (h.token.is_some() || h.token_env.is_some()) && h.username.is_some() {
                push(at.clone(), "either basic credentials or a token, not both".into());
            }
            for (field, var) in [("password_env", &h.password_env), ("token_env", &h.token_env)] {
                if let Some(v) = var {
                    if std::env::var_os(v).is_none() {
                        push(
                            format!("{at}.{field}"),
                            format!("environment variable {v} is not set"),
                        );
                    }
                }
            }
        }
        if self.filter_host.body_buffer == 0 {
            push("filter_host.body_buffer".into(), "must be at least 1 byte".into());
        }
        if issues.is_empty() {
            // Files exist; now check they hold what they should (PEM that parses, keys that match).
            issues.extend(crate::tls::check_config(self));
        }
        if issues.is_empty() {
            Ok(())
        } else {
            Err(ConfigError {
                file: self.source_name.clone(),
                issues,
            })
        }
    }

    /// Where a chain entry's filter comes from.
    pub fn filter_source(&self, e: &FilterEntry) -> Result<FilterSource, String> {
        match e.file.to_str().filter(|s| s.starts_with("oci://")) {
            Some(r) => crate::registry::OciRef::parse(r).map(FilterSource::Oci),
            None => Ok(FilterSource::File(self.filter_path(&e.file))),
        }
    }

    /// Where a filter entry's file is.
    pub fn filter_path(&self, file: &Path) -> PathBuf {
        if file.is_absolute() {
            file.to_path_buf()
        } else {
            self.resolve(&self.filter_host.dir).join(file)
        }
    }

    fn check_filters(&self, push: &mut impl FnMut(String, String), at: &str, entries: &[FilterEntry]) {
        for (k, f) in entries.iter().enumerate() {
            if f.name.is_empty() {
                push(format!("{at}.filters[{k}].name"), "must not be empty".into());
            }
            if let Some(d) = &f.files {
                if !self.resolve(d).is_dir() {
                    push(
                        format!("{at}.filters[{k}].files"),
                        format!("not a directory: {}", d.display()),
                    );
                }
            }
            match self.filter_source(f) {
                Ok(FilterSource::File(full)) if !full.is_file() => push(
                    format!("{at}.filters[{k}].file"),
                    format!("file not found: {}", full.display()),
                ),
                Ok(_) => {}
                Err(e) => push(format!("{at}.filters[{k}].file"), e),
            }
        }
    }

    fn check_file(&self, push: &mut impl FnMut(String, String), path: String, file: &Path) {
        let full = self.resolve(file);
        if !full.is_file() {
            push(path, format!("file not found: {}", file.display()));
        }
    }

    /// The effective config as JSON with secrets redacted (for the admin `/config` endpoint).
    pub fn redacted_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or(serde_json::Value::Null);
        redact(&mut v);
        v
    }
}

/// Field names whose values never leave the process.
const SECRET_KEYS: &[&str] = &["password", "secret", "token", "api_key", "private_key"];

fn redact(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, val) in map.iter_mut() {
                let k = k.to_ascii_lowercase();
                if SECRET_KEYS.iter().any(|s| k.contains(s)) {
                    *val = serde_json::Value::String("<redacted>".into());
                } else {
                    redact(val);
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(redact),
        _ => {}
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

impl ClusterConfig {
    /// The files the cluster's TLS reads (CA bundle, client certificate and key), when set.
    pub fn tls_files(&self) -> Vec<&Path> {
        match &self.tls {
            Some(t) => [&t.ca, &t.cert, &t.key]
                .into_iter()
                .flatten()
                .map(PathBuf::as_path)
                .collect(),
            None => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, "weir.toml", Path::new("/nonexistent"))
    }

    const MIN: &str = r#"
[[listeners]]
name = "web"
address = "127.0.0.1:0"

[[routes]]
cluster = "app"

[clusters.app]
endpoints = ["127.0.0.1:9000"]
"#;

    #[test]
    fn minimal_config_loads_with_defaults() {
        let c = parse(MIN).unwrap();
        assert_eq!(c.listeners[0].limits.max_headers, limits::DEFAULT_MAX_HEADERS);
        assert_eq!(c.clusters["app"].balance, BalanceAlgorithm::PeakEwma);
        assert_eq!(c.routes[0].path_prefix, "/");
    }

    #[test]
    fn unknown_field_names_its_path() {
        let e = parse(&MIN.replace("endpoints =", "endpiont = 1\nendpoints =")).unwrap_err();
        let s = e.to_string();
        assert!(
            s.starts_with("weir.toml: clusters.app.endpiont: unknown field `endpiont`"),
            "{s}"
        );
    }

    #[test]
    fn bad_duration_names_its_path() {
        let e = parse(&format!("{MIN}connect_timeout = \"5 fortnights\"\n")).unwrap_err();
        let s = e.to_string();
        assert!(s.starts_with("weir.toml: clusters.app.connect_timeout: "), "{s}");
        assert!(s.contains("(line 11, column 19)"), "{s}");
    }

    #[test]
    fn all_semantic_errors_are_reported_at_once() {
        let text = MIN.replace("cluster = \"app\"", "cluster = \"nope\"\nlisteners = [\"x\"]")
            + "[listeners.tls]\ncert = \"certs/a.pem\"\nkey = \"certs/a.key\"\n";
        // The tls table attaches to the last [[listeners]] entry only if written there; build it
        // explicitly instead.
        let text = text.replace(
            "address = \"127.0.0.1:0\"\n",
            "address = \"127.0.0.1:0\"\ntls = { cert = \"certs/a.pem\", key = \"certs/a.key\" }\n",
        );
        let text = text.replace(
            "[listeners.tls]\ncert = \"certs/a.pem\"\nkey = \"certs/a.key\"\n",
            "",
        );
        let s = parse(&text).unwrap_err().to_string();
        assert!(
            s.contains("weir.toml: listeners[0].tls.cert: file not found: certs/a.pem"),
            "{s}"
        );
        assert!(
            s.contains("weir.toml: listeners[0].tls.key: file not found: certs/a.key"),
            "{s}"
        );
        assert!(
            s.contains("weir.toml: routes[0].cluster: unknown cluster \"nope\""),
            "{s}"
        );
        assert!(
            s.contains("weir.toml: routes[0].listeners[0]: unknown listener \"x\""),
            "{s}"
        );
    }

    #[test]
    fn bad_endpoint_is_named() {
        let s = parse(&MIN.replace("127.0.0.1:9000", "no-port"))
            .unwrap_err()
            .to_string();
        assert!(s.starts_with("weir.toml: clusters.app.endpoints[0]: "), "{s}");
    }

    #[test]
    fn secrets_are_redacted() {
        let mut v = serde_json::json!({"a": {"password": "x", "b": [{"token": "y"}], "c": 1}});
        redact(&mut v);
        assert_eq!(v["a"]["password"], "<redacted>");
        assert_eq!(v["a"]["b"][0]["token"], "<redacted>");
        assert_eq!(v["a"]["c"], 1);
    }
}
