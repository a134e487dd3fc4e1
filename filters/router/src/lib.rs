//! `router`: routing in the Kubernetes Gateway API HTTPRoute vocabulary.
//!
//! The config is an HTTPRoute's `rules`, with the Gateway API's field names:
//!
//! ```toml
//! [[routes]]
//! cluster = "stable"            # the core's default; the router chooses per request
//! filters = [{ name = "router", file = "weir_filter_router.wasm", config = { rules = [
//!   { matches = [{ path = { type = "PathPrefix", value = "/api" }, method = "GET",
//!                  headers = [{ name = "x-canary", value = "always" }] }],
//!     backendRefs = [{ name = "canary" }] },
//!   { matches = [{ path = { type = "PathPrefix", value = "/api" } }],
//!     backendRefs = [{ name = "stable", weight = 90 }, { name = "canary", weight = 10 }],
//!     filters = [{ type = "URLRewrite", urlRewrite = { path = { type = "ReplacePrefixMatch", replacePrefixMatch = "/v2" } } },
//!                { type = "RequestMirror", requestMirror = { backendRef = { name = "shadow" } } }],
//!     timeouts = { request = "2s" } },
//!   { matches = [{ path = { type = "Exact", value = "/old" } }],
//!     filters = [{ type = "RequestRedirect", requestRedirect = { path = { type = "ReplaceFullPath", replaceFullPath = "/new" }, statusCode = 301 } }] },
//! ] } }]
//! ```
//!
//! - Matches: `path` (`Exact`, `PathPrefix` on segment boundaries, `RegularExpression`),
//!   `method`, `headers` and `queryParams` (`Exact` or `RegularExpression`); all of one match
//!   must hold; any match of a rule selects it. A rule without matches matches `/` prefix.
//! - Precedence, across all rules, as the Gateway API orders it: `Exact` path, then (an
//!   implementation choice, as Envoy Gateway's) `RegularExpression`, then the longest
//!   `PathPrefix`; then a match with a method; then the most header matches; then the most
//!   query matches; then rule order. No match: 404.
//! - Filters: `RequestHeaderModifier`, `ResponseHeaderModifier` (`set`, `add`: lists of
//!   `{ name, value }`; `remove`: names), `URLRewrite` (`hostname`; `path` by
//!   `ReplacePrefixMatch` or `ReplaceFullPath`), `RequestRedirect` (`scheme`, `hostname`,
//!   `port`, `path`, `statusCode` 301/302/303/307/308, default 302), `RequestMirror` (a copy of
//!   the request head to another cluster, fire and forget; the answer is discarded).
//! - `backendRefs` with `weight`: a weighted random choice per request (canary splits); all
//!   weights 0: 500, as the Gateway API requires. No backendRefs: the route's own cluster.
//! - `timeouts.request`: the upstream timeout of the request.

use std::time::Duration;
use weir_sdk::hash::FastMap;

use regex::Regex;
use serde::Deserialize;
use weir_sdk::config::parse_duration;
use weir_sdk::outbound::{self, OutboundRequest};
use weir_sdk::{props, Action, Filter, Request, Response, ResponseHead};

/// One HTTPRoute rule.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RuleConfig {
    /// A name for logs and metrics.
    #[serde(default)]
    pub name: Option<String>,
    /// Any of these selects the rule.
    #[serde(default)]
    pub matches: Vec<MatchConfig>,
    /// Processing, in order.
    #[serde(default)]
    pub filters: Vec<RouteFilter>,
    /// Where to send the request.
    #[serde(default)]
    pub backend_refs: Vec<BackendRef>,
    /// Timeouts.
    #[serde(default)]
    pub timeouts: Option<Timeouts>,
}

/// An HTTPRouteMatch.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MatchConfig {
    /// The path match.
    #[serde(default)]
    pub path: Option<PathMatch>,
    /// The method.
    #[serde(default)]
    pub method: Option<String>,
    /// Header matches (all must hold).
    #[serde(default)]
    pub headers: Vec<ValueMatch>,
    /// Query parameter matches (all must hold).
    #[serde(default)]
    pub query_params: Vec<ValueMatch>,
}

/// A path match.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct PathMatch {
    /// `Exact`, `PathPrefix` or `RegularExpression`.
    #[serde(rename = "type", default = "path_prefix")]
    pub kind: String,
    /// The path, prefix or expression.
    pub value: String,
}

fn path_prefix() -> String {
    "PathPrefix".into()
}

/// A header or query parameter match.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct ValueMatch {
    /// `Exact` (default) or `RegularExpression`.
    #[serde(rename = "type", default = "exact")]
    pub kind: String,
    /// Header or parameter name.
    pub name: String,
    /// The value or expression.
    pub value: String,
}

fn exact() -> String {
    "Exact".into()
}

/// A backend and its share.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct BackendRef {
    /// The cluster.
    pub name: String,
    /// Relative weight (default 1).
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

/// HTTPRouteTimeouts.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    /// Time to the response head, e.g. `"2s"`, `"500ms"`.
    pub request: String,
}

/// A header `{ name, value }`.
#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct HeaderValue {
    /// Name.
    pub name: String,
    /// Value.
    pub value: String,
}

/// HTTPHeaderFilter.
#[derive(Deserialize, Debug, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct HeaderModifier {
    /// Replace.
    #[serde(default)]
    pub set: Vec<HeaderValue>,
    /// Append.
    #[serde(default)]
    pub add: Vec<HeaderValue>,
    /// Remove.
    #[serde(default)]
    pub remove: Vec<String>,
}

/// HTTPPathModifier.
#[derive(Deserialize, Debug, Clone)]
#[serde(tag = "type", deny_unknown_fields)]
pub enum PathModifier {
    /// Replace the matched prefix.
    ReplacePrefixMatch {
        /// The new prefix.
        #[serde(rename = "replacePrefixMatch")]
        value: String,
    },
    /// Replace the whole path.
    ReplaceFullPath {
        /// The new path.
        #[serde(rename = "replaceFullPath")]
        value: String,
    },
}

/// HTTPURLRewriteFilter.
#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct UrlRewrite {
    /// New host.
    #[serde(default)]
    pub hostname: Option<String>,
    /// New path.
    #[serde(default)]
    pub path: Option<PathModifier>,
}

/// HTTPRequestRedirectFilter.
#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RequestRedirect {
    /// `http` or `https`.
    #[serde(default)]
    pub scheme: Option<String>,
    /// New host.
    #[serde(default)]
    pub hostname: Option<String>,
    /// New port.
    #[serde(default)]
    pub port: Option<u16>,
    /// New path.
    #[serde(default)]
    pub path: Option<PathModifier>,
    /// 301, 302 (default), 303, 307 or 308.
    #[serde(default = "found")]
    pub status_code: u16,
}

fn found() -> u16 {
    302
}

/// HTTPRequestMirrorFilter's backend.
#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct MirrorRef {
    /// The cluster mirrored to.
    pub name: String,
}

/// HTTPRequestMirrorFilter.
#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RequestMirror {
    /// Where the copy goes.
    pub backend_ref: MirrorRef,
}

/// An HTTPRouteFilter.
#[derive(Deserialize, Debug, Clone)]
#[serde(tag = "type", deny_unknown_fields)]
pub enum RouteFilter {
    /// Edits the request headers.
    RequestHeaderModifier {
        /// The edits.
        #[serde(rename = "requestHeaderModifier")]
        m: HeaderModifier,
    },
    /// Edits the response headers.
    ResponseHeaderModifier {
        /// The edits.
        #[serde(rename = "responseHeaderModifier")]
        m: HeaderModifier,
    },
    /// Rewrites host and path.
    #[serde(rename = "URLRewrite")]
    UrlRewrite {
        /// The rewrite.
        #[serde(rename = "urlRewrite")]
        r: UrlRewrite,
    },
    /// Answers with a redirect.
    RequestRedirect {
        /// The redirect.
        #[serde(rename = "requestRedirect")]
        r: RequestRedirect,
    },
    /// Copies the request to another cluster.
    RequestMirror {
        /// The mirror.
        #[serde(rename = "requestMirror")]
        m: RequestMirror,
    },
}

/// The filter's table in `weir.toml`.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// HTTPRoute rules.
    pub rules: Vec<RuleConfig>,
}

enum PathRule {
    Exact(String),
    Prefix(String),
    Regex(Regex),
}

enum ValueRule {
    Exact(String),
    Regex(Regex),
}

impl ValueRule {
    fn matches(&self, v: &str) -> bool {
        match self {
            ValueRule::Exact(e) => e == v,
            ValueRule::Regex(r) => r.is_match(v),
        }
    }
}

struct CompiledMatch {
    rule: usize,
    path: PathRule,
    method: Option<String>,
    headers: Vec<(String, ValueRule)>,
    query: Vec<(String, ValueRule)>,
}

struct Rule {
    name: String,
    filters: Vec<RouteFilter>,
    backends: Vec<BackendRef>,
    total_weight: u64,
    timeout: Option<Duration>,
    response_headers: Option<HeaderModifier>,
}

/// The filter.
pub struct Router {
    rules: Vec<Rule>,
    /// Every match of every rule, in precedence order.
    matches: Vec<CompiledMatch>,
}

fn full_match(expr: &str, at: &str) -> Result<Regex, String> {
    Regex::new(&format!("^(?:{expr})$")).map_err(|e| format!("{at}: invalid regular expression: {e}"))
}

fn value_rule(m: &ValueMatch, at: &str) -> Result<(String, ValueRule), String> {
    let rule = match m.kind.as_str() {
        "Exact" => ValueRule::Exact(m.value.clone()),
        "RegularExpression" => ValueRule::Regex(full_match(&m.value, at)?),
        k => return Err(format!("{at}.type: {k:?}: use Exact or RegularExpression")),
    };
    Ok((m.name.to_ascii_lowercase(), rule))
}

/// Gateway API path prefix: on segment boundaries, a trailing `/` in the prefix ignored.
fn prefix_matches(prefix: &str, path: &str) -> bool {
    let p = prefix.trim_end_matches('/');
    p.is_empty() || path == p || (path.starts_with(p) && path.as_bytes().get(p.len()) == Some(&b'/'))
}

fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == name).then(|| v.to_string())
    })
}

impl Router {
    fn compile(config: Config) -> Result<Router, String> {
        let mut rules = Vec::new();
        let mut matches = Vec::new();
        for (i, r) in config.rules.into_iter().enumerate() {
            let at = format!("rules[{i}]");
            let mut total_weight = 0u64;
            for (k, b) in r.backend_refs.iter().enumerate() {
                if b.name.is_empty() {
                    return Err(format!("{at}.backendRefs[{k}].name: must not be empty"));
                }
                total_weight += u64::from(b.weight);
            }
            let mut response_headers = None;
            for (k, f) in r.filters.iter().enumerate() {
                match f {
                    RouteFilter::RequestRedirect { r: rd }
                        if ![301, 302, 303, 307, 308].contains(&rd.status_code) =>
                    {
                        return Err(format!(
                            "{at}.filters[{k}].requestRedirect.statusCode: {} is not a redirect status",
                            rd.status_code
                        ))
                    }
                    RouteFilter::ResponseHeaderModifier { m } => response_headers = Some(m.clone()),
                    _ => {}
                }
            }
            let timeout = match &r.timeouts {
                Some(t) => Some(parse_duration(&format!("{at}.timeouts.request"), &t.request)?),
                None => None,
            };
            let match_list = if r.matches.is_empty() {
                vec![MatchConfig::default()]
            } else {
                r.matches
            };
            for (k, m) in match_list.into_iter().enumerate() {
                let at = format!("{at}.matches[{k}]");
                let path = match &m.path {
                    None => PathRule::Prefix("/".into()),
                    Some(p) => match p.kind.as_str() {
                        "Exact" => PathRule::Exact(p.value.clone()),
                        "PathPrefix" => PathRule::Prefix(p.value.clone()),
                        "RegularExpression" => PathRule::Regex(full_match(&p.value, &format!("{at}.path"))?),
                        other => {
                            return Err(format!(
                                "{at}.path.type: {other:?}: use Exact, PathPrefix or RegularExpression"
                            ))
                        }
                    },
                };
                let headers = m
                    .headers
                    .iter()
                    .enumerate()
                    .map(|(h, v)| value_rule(v, &format!("{at}.headers[{h}]")))
                    .collect::<Result<Vec<_>, _>>()?;
                let query = m
                    .query_params
                    .iter()
                    .enumerate()
                    .map(|(q, v)| value_rule(v, &format!("{at}.queryParams[{q}]")))
                    .collect::<Result<Vec<_>, _>>()?;
                matches.push(CompiledMatch {
                    rule: i,
                    path,
                    method: m.method.map(|m| m.to_ascii_uppercase()),
                    headers,
                    query,
                });
            }
            rules.push(Rule {
                name: r.name.unwrap_or_else(|| format!("rule-{i}")),
                filters: r.filters,
                backends: r.backend_refs,
                total_weight,
                timeout,
                response_headers,
            });
        }
        // Gateway API precedence; the sort is stable, so rule order breaks ties.
        matches.sort_by_key(|m| {
            let (rank, len) = match &m.path {
                PathRule::Exact(p) => (0, p.len()),
                PathRule::Regex(_) => (1, 0),
                PathRule::Prefix(p) => (2, p.trim_end_matches('/').len()),
            };
            (
                rank,
                std::cmp::Reverse(len),
                m.method.is_none(),
                std::cmp::Reverse(m.headers.len()),
                std::cmp::Reverse(m.query.len()),
            )
        });
        Ok(Router { rules, matches })
    }

    /// The rule that takes the request at `path`, by precedence. The method, query and
    /// headers are read from the host only when a candidate rule looks at them: each read is
    /// a call across the Wasm boundary.
    fn select(&self, req: &Request, path: &str) -> Option<usize> {
        let mut method: Option<String> = None;
        let mut query: Option<String> = None;
        let mut header_cache: FastMap<&str, Option<String>> = FastMap::default();
        'next: for m in &self.matches {
            let path_ok = match &m.path {
                PathRule::Exact(p) => p == path,
                PathRule::Prefix(p) => prefix_matches(p, path),
                PathRule::Regex(r) => r.is_match(path),
            };
            if !path_ok {
                continue;
            }
            if let Some(want) = &m.method {
                if *want != *method.get_or_insert_with(|| req.method()) {
                    continue;
                }
            }
            for (name, rule) in &m.headers {
                let v = header_cache
                    .entry(name.as_str())
                    .or_insert_with(|| req.header_str(name));
                if !v.as_deref().is_some_and(|v| rule.matches(v)) {
                    continue 'next;
                }
            }
            if !m.query.is_empty() {
                let query = query.get_or_insert_with(|| req.query().unwrap_or_default());
                for (name, rule) in &m.query {
                    if !query_param(query, name).is_some_and(|v| rule.matches(&v)) {
                        continue 'next;
                    }
                }
            }
            return Some(m.rule);
        }
        None
    }

    fn pick_backend(rule: &Rule) -> Option<&str> {
        if rule.total_weight == 0 {
            return None;
        }
        // One backend: no random draw (a WASI call per request).
        if let [only] = rule.backends.as_slice() {
            return Some(&only.name);
        }
        let mut n = u64::from(getrandom::u32().unwrap_or(0)) % rule.total_weight;
        for b in &rule.backends {
            let w = u64::from(b.weight);
            if n < w {
                return Some(&b.name);
            }
            n -= w;
        }
        None
    }
}

/// Header fields the proxy manages; a mirrored copy does not carry them.
const MANAGED: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
];

/// The path after a path modifier, given the prefix the rule matched (for prefix replace).
fn modify_path(m: &PathModifier, matched_prefix: Option<&str>, path: &str) -> String {
    match m {
        PathModifier::ReplaceFullPath { value } => value.clone(),
        PathModifier::ReplacePrefixMatch { value } => {
            let prefix = matched_prefix.unwrap_or("/").trim_end_matches('/');
            let rest = &path[prefix.len().min(path.len())..];
            let base = value.trim_end_matches('/');
            match (base.is_empty(), rest.is_empty()) {
                (true, true) => "/".into(),
                (true, false) => rest.into(),
                (false, _) => format!("{base}{rest}"),
            }
        }
    }
}

fn apply_mods(
    m: &HeaderModifier,
    remove: impl Fn(&str) -> Result<(), weir_sdk::HostError>,
    set: impl Fn(&str, &str) -> Result<(), weir_sdk::HostError>,
    add: impl Fn(&str, &str) -> Result<(), weir_sdk::HostError>,
) {
    for n in &m.remove {
        let _ = remove(&n.to_ascii_lowercase());
    }
    for h in &m.set {
        if let Err(e) = set(&h.name.to_ascii_lowercase(), &h.value) {
            weir_sdk::log::warn(&format!("cannot set {}: {e}", h.name));
        }
    }
    for h in &m.add {
        if let Err(e) = add(&h.name.to_ascii_lowercase(), &h.value) {
            weir_sdk::log::warn(&format!("cannot add {}: {e}", h.name));
        }
    }
}

impl Filter for Router {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        Router::compile(config)
    }

    fn on_request_headers(&self, req: &Request) -> Action {
        let path = req.path();
        let Some(i) = self.select(req, &path) else {
            return Action::Respond(
                Response::new(404)
                    .header("content-type", "text/plain")
                    .body("no route\n"),
            );
        };
        let rule = &self.rules[i];
        let matched_prefix = self
            .matches
            .iter()
            .find(|m| m.rule == i && matches!(&m.path, PathRule::Prefix(p) if prefix_matches(p, &path)))
            .and_then(|m| match &m.path {
                PathRule::Prefix(p) => Some(p.as_str()),
                _ => None,
            });
        for f in &rule.filters {
            match f {
                RouteFilter::RequestRedirect { r } => {
                    let scheme = r.scheme.clone().unwrap_or_else(|| req.scheme());
                    let authority = req.authority().unwrap_or_default();
                    let host = r.hostname.clone().unwrap_or_else(|| {
                        authority
                            .rsplit_once(':')
                            .map_or(authority.clone(), |(h, _)| h.to_string())
                    });
                    let port = match (r.port, r.scheme.is_some()) {
                        (Some(p), _) => Some(p),
                        // A scheme change without a port uses the scheme's default port.
                        (None, true) => None,
                        (None, false) => authority.rsplit_once(':').and_then(|(_, p)| p.parse().ok()),
                    };
                    let default_port = if scheme == "https" { 443 } else { 80 };
                    let new_path = r
                        .path
                        .as_ref()
                        .map_or(path.clone(), |m| modify_path(m, matched_prefix, &path));
                    let mut location = format!("{scheme}://{host}");
                    if let Some(p) = port.filter(|p| *p != default_port) {
                        location.push_str(&format!(":{p}"));
                    }
                    location.push_str(&new_path);
                    if let Some(q) = req.query() {
                        location.push('?');
                        location.push_str(&q);
                    }
                    return Action::Respond(Response::new(r.status_code).header("location", location));
                }
                RouteFilter::RequestHeaderModifier { m } => apply_mods(
                    m,
                    |n| req.remove_header(n),
                    |n, v| req.set_header(n, v),
                    |n, v| req.append_header(n, v),
                ),
                RouteFilter::UrlRewrite { r } => {
                    if let Some(m) = &r.path {
                        let mut p = modify_path(m, matched_prefix, &path);
                        if let Some(q) = req.query() {
                            p.push('?');
                            p.push_str(&q);
                        }
                        if let Err(e) = req.set_path(&p) {
                            weir_sdk::log::warn(&format!("rewrite to {p}: {e}"));
                        }
                    }
                    if let Some(h) = &r.hostname {
                        if let Err(e) = req.set_authority(h) {
                            weir_sdk::log::warn(&format!("rewrite host to {h}: {e}"));
                        }
                    }
                }
                RouteFilter::RequestMirror { m } => {
                    let target = match req.query() {
                        Some(q) => format!("{}?{q}", req.path()),
                        None => req.path(),
                    };
                    let mut copy = OutboundRequest::get(&target);
                    copy.method = req.method();
                    // The proxy sets framing and Host itself; hop-by-hop fields never travel.
                    copy.headers = req
                        .headers()
                        .into_iter()
                        .filter(|(n, _)| !MANAGED.contains(&n.as_str()))
                        .collect();
                    if let Err(e) = outbound::send(&m.backend_ref.name, &copy) {
                        weir_sdk::log::warn(&format!("mirror to {}: {e}", m.backend_ref.name));
                    }
                }
                RouteFilter::ResponseHeaderModifier { .. } => {}
            }
        }
        if !rule.backends.is_empty() {
            let Some(cluster) = Router::pick_backend(rule) else {
                return Action::Respond(Response::new(500).body("no backend with weight\n"));
            };
            if let Err(e) = props::set_cluster(cluster) {
                weir_sdk::log::error(&format!("{}: backend {cluster}: {e}", rule.name));
                return Action::Respond(Response::new(500).body("invalid backend\n"));
            }
        }
        if let Some(t) = rule.timeout {
            let _ = props::set_timeout(t);
        }
        if rule.response_headers.is_some() {
            let _ = props::set_request_value("rule", &(i as u32).to_le_bytes());
        }
        Action::Continue
    }

    fn on_response_headers(&self, resp: &ResponseHead) -> Action {
        if self.rules.iter().all(|r| r.response_headers.is_none()) {
            // No rule edits responses: the host need not call this phase again.
            return Action::NotImplemented;
        }
        let Some(i) = props::request_value("rule")
            .and_then(|v| v.try_into().ok())
            .map(|b: [u8; 4]| u32::from_le_bytes(b) as usize)
        else {
            return Action::Continue;
        };
        if let Some(m) = self.rules.get(i).and_then(|r| r.response_headers.as_ref()) {
            apply_mods(
                m,
                |n| resp.remove_header(n),
                |n, v| resp.set_header(n, v),
                |n, v| resp.append_header(n, v),
            );
        }
        Action::Continue
    }
}

weir_sdk::export_filter!(Router);

#[cfg(test)]
mod tests {
    use super::*;
    use weir_sdk::testing::{MockHost, TestFilter};

    fn router(json: &str) -> TestFilter<Router> {
        TestFilter::new(json).unwrap_or_else(|e| panic!("{e}"))
    }

    fn request(method: &str, path: &str, query: Option<&str>, headers: &[(&str, &str)]) {
        MockHost::reset(|h| {
            h.method = method.into();
            h.path = path.into();
            h.query = query.map(str::to_string);
            h.authority = Some("example.com".into());
            h.request_headers = headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
                .collect();
            h.known_clusters = ["a", "b", "c", "d", "e", "f"].map(String::from).to_vec();
        });
    }

    fn cluster() -> Option<String> {
        MockHost::with(|h| h.cluster.clone())
    }

    #[test]
    fn precedence_follows_the_gateway_api() {
        let r = router(
            r#"{"rules": [
                {"matches": [{"path": {"type": "PathPrefix", "value": "/"}}], "backendRefs": [{"name": "a"}]},
                {"matches": [{"path": {"type": "PathPrefix", "value": "/api"}}], "backendRefs": [{"name": "b"}]},
                {"matches": [{"path": {"type": "PathPrefix", "value": "/api"}, "method": "POST"}], "backendRefs": [{"name": "c"}]},
                {"matches": [{"path": {"type": "PathPrefix", "value": "/api"}, "headers": [{"name": "x-v", "value": "2"}]}], "backendRefs": [{"name": "d"}]},
                {"matches": [{"path": {"type": "Exact", "value": "/api/exact"}}], "backendRefs": [{"name": "e"}]},
                {"matches": [{"path": {"type": "RegularExpression", "value": "/api/[0-9]+"}}], "backendRefs": [{"name": "f"}]}
            ]}"#,
        );
        for (method, path, headers, want) in [
            ("GET", "/x", vec![], "a"),
            ("GET", "/api/x", vec![], "b"),
            ("GET", "/apix", vec![], "a"),
            ("POST", "/api/x", vec![("x-v", "2")], "c"),
            ("GET", "/api/x", vec![("x-v", "2")], "d"),
            ("GET", "/api/exact", vec![], "e"),
            ("GET", "/api/42", vec![], "f"),
        ] {
            request(method, path, None, &headers);
            assert_eq!(r.on_request_headers(), Action::Continue);
            assert_eq!(cluster().as_deref(), Some(want), "{method} {path} {headers:?}");
        }
    }

    #[test]
    fn query_and_regex_header_matches() {
        let r = router(
            r#"{"rules": [
                {"matches": [{"queryParams": [{"name": "v", "value": "2"}]}], "backendRefs": [{"name": "b"}]},
                {"matches": [{"headers": [{"type": "RegularExpression", "name": "user-agent", "value": ".*Mobile.*"}]}], "backendRefs": [{"name": "c"}]}
            ]}"#,
        );
        request("GET", "/", Some("a=1&v=2"), &[]);
        r.on_request_headers();
        assert_eq!(cluster().as_deref(), Some("b"));
        request("GET", "/", None, &[("user-agent", "X Mobile Y")]);
        r.on_request_headers();
        assert_eq!(cluster().as_deref(), Some("c"));
        request("GET", "/", None, &[]);
        let Action::Respond(resp) = r.on_request_headers() else {
            panic!("no match")
        };
        assert_eq!(resp.status, 404);
    }

    #[test]
    fn rewrites_and_redirects() {
        let r = router(
            r#"{"rules": [
                {"matches": [{"path": {"value": "/old"}}],
                 "filters": [{"type": "RequestRedirect", "requestRedirect": {"scheme": "https", "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/new"}, "statusCode": 301}}]},
                {"matches": [{"path": {"value": "/api"}}],
                 "filters": [{"type": "URLRewrite", "urlRewrite": {"hostname": "internal", "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/v2"}}},
                             {"type": "RequestHeaderModifier", "requestHeaderModifier": {"set": [{"name": "X-Env", "value": "prod"}]}}]}
            ]}"#,
        );
        request("GET", "/old/page", Some("q=1"), &[]);
        let Action::Respond(resp) = r.on_request_headers() else {
            panic!("redirect")
        };
        assert_eq!(resp.status, 301);
        assert_eq!(
            resp.headers[0],
            ("location".into(), b"https://example.com/new/page?q=1".to_vec())
        );
        request("GET", "/api/users", None, &[]);
        assert_eq!(r.on_request_headers(), Action::Continue);
        MockHost::with(|h| {
            assert_eq!(h.path, "/v2/users");
            assert_eq!(h.authority.as_deref(), Some("internal"));
        });
        assert_eq!(MockHost::request_header("x-env").as_deref(), Some("prod"));
    }

    #[test]
    fn weights_split_traffic() {
        let r = router(
            r#"{"rules": [{"backendRefs": [{"name": "a", "weight": 90}, {"name": "b", "weight": 10}]}]}"#,
        );
        let mut b = 0;
        for _ in 0..2000 {
            request("GET", "/", None, &[]);
            r.on_request_headers();
            if cluster().as_deref() == Some("b") {
                b += 1;
            }
        }
        assert!((140..=260).contains(&b), "about 10 % of 2000: {b}");
        let r = router(r#"{"rules": [{"backendRefs": [{"name": "a", "weight": 0}]}]}"#);
        request("GET", "/", None, &[]);
        let Action::Respond(resp) = r.on_request_headers() else {
            panic!()
        };
        assert_eq!(resp.status, 500);
    }

    #[test]
    fn config_errors_name_the_field() {
        for (json, want) in [
            (
                r#"{"rules": [{"matches": [{"path": {"type": "Glob", "value": "/"}}]}]}"#,
                "rules[0].matches[0].path.type",
            ),
            (
                r#"{"rules": [{"matches": [{"headers": [{"type": "RegularExpression", "name": "a", "value": "("}]}]}]}"#,
                "rules[0].matches[0].headers[0]",
            ),
            (
                r#"{"rules": [{"filters": [{"type": "RequestRedirect", "requestRedirect": {"statusCode": 200}}]}]}"#,
                "statusCode",
            ),
            (
                r#"{"rules": [{"timeouts": {"request": "soon"}}]}"#,
                "rules[0].timeouts.request",
            ),
        ] {
            let e = TestFilter::<Router>::new(json).err().unwrap();
            assert!(e.contains(want), "{e}");
        }
    }
}
