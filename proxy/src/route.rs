//! The route table: the routing *mechanism* the core needs before any filter runs.
//!
//! A route matches a host (exact or `*.suffix`) and a path prefix on segment boundaries; the
//! first match in file order wins. The chosen cluster is only a value in the request context:
//! a filter may replace it before the core resolves it.

use std::sync::Arc;
use std::time::Duration;

use crate::config::{Config, RouteConfig};
use crate::filter::FilterChain;
use crate::metrics::{Metrics, RouteMetrics};

/// How a route matches the host.
#[derive(Debug, Clone)]
enum HostMatch {
    Any,
    Exact(String),
    /// `*.example.com` stored as `.example.com`.
    Suffix(String),
}

/// One compiled route.
pub struct Route {
    /// Route name (metrics, logs).
    pub name: Arc<str>,
    host: HostMatch,
    prefix: String,
    /// Target cluster name.
    pub cluster: Arc<str>,
    /// Overrides the cluster's request timeout.
    pub timeout: Option<Duration>,
    /// Fixed upstream `Host`.
    pub host_rewrite: Option<http::HeaderValue>,
    /// Use the endpoint's `host:port` as upstream `Host`.
    pub auto_host_rewrite: bool,
    /// Tunnel `CONNECT` to the cluster.
    pub allow_connect: bool,
    /// `Upgrade` protocols tunnelled to the cluster.
    pub upgrades: Arc<[String]>,
    /// Pre-resolved metric series for (listener, route, route's cluster).
    pub metrics: RouteMetrics,
    /// The filters this route's requests run: the listener's, then the route's own.
    pub chain: FilterChain,
}

impl std::fmt::Debug for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Route")
            .field("name", &self.name)
            .field("cluster", &self.cluster)
            .finish_non_exhaustive()
    }
}

impl Route {
    /// Of the protocols an `Upgrade` header offers (`websocket`, `h2c`, `TLS/1.2`, in the
    /// client's order), those this route tunnels, matched by name (the version aside); `None`
    /// when none is. The offer goes upstream with only these: an allowed protocol first must
    /// not carry a disallowed one through.
    pub fn allowed_upgrades(&self, offered: &http::HeaderValue) -> Option<http::HeaderValue> {
        let offered_str = offered.to_str().ok()?;
        let tokens = offered_str.split(',').map(str::trim).filter(|t| !t.is_empty());
        let kept: Vec<&str> = tokens.clone().filter(|t| self.allows(t)).collect();
        if kept.is_empty() {
            None
        } else if kept.len() == tokens.count() {
            Some(offered.clone())
        } else {
            http::HeaderValue::from_str(&kept.join(", ")).ok()
        }
    }

    fn allows(&self, token: &str) -> bool {
        let name = protocol_name(token);
        self.upgrades.iter().any(|u| u.eq_ignore_ascii_case(name))
    }

    fn matches(&self, host: &str, path: &str) -> bool {
        let host_ok = match &self.host {
            HostMatch::Any => true,
            HostMatch::Exact(h) => h.eq_ignore_ascii_case(host),
            HostMatch::Suffix(s) => {
                host.len() > s.len() && host[host.len() - s.len()..].eq_ignore_ascii_case(s)
            }
        };
        host_ok && prefix_matches(&self.prefix, path)
    }
}

/// `/api` matches `/api`, `/api/` and `/api/x`, not `/apix`; a prefix ending in `/` is plain.
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// The routes of one listener, in order.
pub struct RouteTable {
    routes: Vec<Arc<Route>>,
}

impl RouteTable {
    /// Compiles the routes that apply to `listener`; `chain(i)` is the filter chain of
    /// `config.routes[i]` on this listener.
    pub fn build(
        config: &Config,
        listener: &str,
        metrics: &Metrics,
        chain: impl Fn(usize) -> FilterChain,
    ) -> RouteTable {
        let routes = config
            .routes
            .iter()
            .enumerate()
            .filter(|(_, r)| r.listeners.is_empty() || r.listeners.iter().any(|l| l == listener))
            .map(|(i, r)| Arc::new(compile(i, r, listener, metrics, chain(i))))
            .collect();
        RouteTable { routes }
    }

    /// The first route matching host (port already stripped) and canonical path.
    pub fn find(&self, host: &str, path: &str) -> Option<&Arc<Route>> {
        self.routes.iter().find(|r| r.matches(host, path))
    }
}

fn compile(i: usize, r: &RouteConfig, listener: &str, metrics: &Metrics, chain: FilterChain) -> Route {
    let name: Arc<str> = r.name.clone().unwrap_or_else(|| format!("route-{i}")).into();
    let host = match r.host.as_deref().map(str::to_ascii_lowercase) {
        None => HostMatch::Any,
        Some(h) if h == "*" => HostMatch::Any,
        Some(h) => match h.strip_prefix('*') {
            Some(suffix) => HostMatch::Suffix(suffix.to_string()),
            None => HostMatch::Exact(h),
        },
    };
    Route {
        metrics: metrics.route(listener, &name, &r.cluster),
        name,
        host,
        prefix: r.path_prefix.clone(),
        cluster: r.cluster.as_str().into(),
        timeout: r.timeout,
        host_rewrite: r
            .host_rewrite
            .as_deref()
            .and_then(|h| http::HeaderValue::from_str(h).ok()),
        auto_host_rewrite: r.auto_host_rewrite,
        allow_connect: r.allow_connect,
        upgrades: r
            .upgrades
            .iter()
            .map(|u| protocol_name(u).to_ascii_lowercase())
            .collect(),
        chain,
    }
}

/// A protocol's name without its version: `TLS/1.2` → `TLS`.
fn protocol_name(token: &str) -> &str {
    token.split('/').next().unwrap_or_default().trim()
}

/// Whether every protocol of an upstream's 101 `Upgrade` is one of those `offered`.
pub fn upgrade_among(chosen: &http::HeaderValue, offered: &http::HeaderValue) -> bool {
    let (Ok(chosen), Ok(offered)) = (chosen.to_str(), offered.to_str()) else {
        return false;
    };
    let offered: Vec<&str> = offered.split(',').map(protocol_name).collect();
    let mut chosen = chosen
        .split(',')
        .map(protocol_name)
        .filter(|c| !c.is_empty())
        .peekable();
    chosen.peek().is_some() && chosen.all(|c| offered.iter().any(|o| o.eq_ignore_ascii_case(c)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn prefixes_match_on_segment_boundaries() {
        assert!(prefix_matches("/", "/anything"));
        assert!(prefix_matches("/api", "/api"));
        assert!(prefix_matches("/api", "/api/v1"));
        assert!(!prefix_matches("/api", "/apix"));
        assert!(prefix_matches("/api/", "/api/v1"));
        assert!(!prefix_matches("/api/", "/api"));
    }

    #[test]
    fn first_match_wins_and_hosts_match() {
        let text = r#"
[[listeners]]
name = "web"
address = "127.0.0.1:0"
[[listeners]]
name = "other"
address = "127.0.0.1:0"
[[routes]]
name = "a"
host = "api.example.com"
path_prefix = "/v1"
cluster = "c"
[[routes]]
name = "wild"
host = "*.example.com"
cluster = "c"
[[routes]]
name = "only-other"
listeners = ["other"]
cluster = "c"
[clusters.c]
endpoints = ["127.0.0.1:1"]
"#;
        let c = Config::from_toml(text, "t", Path::new(".")).unwrap();
        let m = Metrics::new();
        let t = RouteTable::build(&c, "web", &m, |_| FilterChain::default());
        assert_eq!(&*t.find("API.example.com", "/v1/x").unwrap().name, "a");
        assert_eq!(&*t.find("api.example.com", "/v2").unwrap().name, "wild");
        assert_eq!(&*t.find("x.example.com", "/").unwrap().name, "wild");
        assert!(t.find("example.com", "/").is_none());
        let o = RouteTable::build(&c, "other", &m, |_| FilterChain::default());
        assert_eq!(&*o.find("example.com", "/").unwrap().name, "only-other");
    }
}
