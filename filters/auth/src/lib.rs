//! `auth`: authentication (JWT, API keys, HTTP basic) and authorization rules on who the
//! client is (the authenticated principal, the mTLS peer's identity), deny by default: what
//! Envoy's `jwt_authn`, an `ext_authz` key check and `rbac` do together.
//!
//! ```toml
//! [[routes]]
//! path_prefix = "/api"
//! cluster = "api"
//! filters = [{ name = "auth", file = "weir_filter_auth.wasm", files = "keys", config = {
//!   realm = "api",
//!   providers = ["jwt", "api_keys", "basic"],
//!   jwt = { issuer = "https://idp.example.com", audiences = ["api"], algorithms = ["RS256", "ES256"], jwks_file = "/files/jwks.json", leeway = "60s", claim_to_headers = [{ claim = "sub", header = "x-user" }, { claim = "scope", header = "x-scope" }] },
//!   api_keys = { header = "x-api-key", name_header = "x-api-client", keys = [{ name = "ci", sha256 = "2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b" }] },
//!   basic = { user_header = "x-user", users = [{ name = "ops", hash = "$2b$12$..." }] },
//!   rules = [
//!     { principals = ["spiffe://cluster.local/ns/web/sa/frontend"], methods = ["GET"], paths = ["/api/*"] },
//!     { principals = ["jwt:*", "key:ci", "user:ops"] },
//!   ] } }]
//!
//! [clusters.idp]                  # for jwt.remote_jwks
//! endpoints = ["idp.internal:443"]
//! ```
//!
//! # Providers
//! - `jwt`: a bearer token from `Authorization: Bearer ...` (or `header`, where the `Bearer `
//!   prefix is optional; then, if set, the query parameter `query`). Signed with one of
//!   `algorithms` (`RS256`, `ES256` on P-256, `HS256`; default `["RS256", "ES256"]`): `alg: none`
//!   and every other algorithm are refused, and a key only verifies its own algorithm. Keys
//!   come from any of: `jwks` (a JWK set, inline as a table or a JSON string), `jwks_file` (a
//!   JWK set file read at load, typically under `/files`, the directory the chain entry's
//!   `files = "dir"` mounts read-only), `remote_jwks = { cluster = "idp", path =
//!   "/.well-known/jwks.json", cache_duration = "10m", refetch_interval = "10s", timeout = "1s" }`
//!   (fetched from a cluster on first use and shared by every instance through the filter's
//!   shared state; refreshed when older than `cache_duration`, fetched again when a token names
//!   an unknown `kid`, at most once per `refetch_interval`), and `secrets = [{ kid = "k1",
//!   secret = "..." }]` for HS256 (or `secret_base64`; at least 32 bytes). Checked claims:
//!   `exp` and `nbf` with `leeway` (default `"60s"`; a token without `exp` passes unless
//!   `require_exp = true`, as in Envoy), `iss` when `issuer` is set, `aud` (a string or an
//!   array) when `audiences` is set. The principal is `jwt:<sub>`. `claim_to_headers` forwards
//!   claims (dotted paths reach into objects; arrays are joined with `,`).
//! - `api_keys`: the key in `header` (default `x-api-key`) is hashed with SHA-256 and compared,
//!   in constant time, with every configured `sha256` (make one with
//!   `printf %s KEY | sha256sum`); a key found valid is remembered by the instance (up to
//!   1,024 keys) so its hash is computed once, not on every request. The principal is
//!   `key:<name>` (names default to `key1`, `key2`, ...); `name_header` forwards the name.
//! - `basic`: `Authorization: Basic ...` against `users`, each with a bcrypt hash (`$2a$`,
//!   `$2b$`, `$2y$`; e.g. `htpasswd -nbBC 10 USER PASS`) or an Argon2 PHC string
//!   (`$argon2id$...`). A verified password is remembered in the shared state for `cache_ttl`
//!   (default `"5m"`), keyed by a SHA-256 of the user, the password and the configured hash (a
//!   new hash invalidates it): bcrypt in Wasm costs about 2^cost × 0.1 ms, so the first check
//!   must fit `filter_host.cpu_budget` (20 ms by default: cost ≤ 7, or raise the budget). The
//!   principal is `user:<name>`; `user_header` forwards the name.
//!
//! # How a request is decided
//! 1. Every header this filter forwards (`claim_to_headers`, `name_header`, `user_header`) is
//!    removed from the request first: a client cannot forge them.
//! 2. `providers` (default: the configured ones, in the order `jwt`, `api_keys`, `basic`) are
//!    asked in order; the first one whose credential is present decides: an invalid credential
//!    is a 401 at once (later providers are not tried).
//! 3. On an mTLS listener the verified client certificate adds its identities: URI SANs
//!    (`spiffe://...`, or `uri:...`), `dns:<DNS SAN>` and `subject:<subject>`.
//! 4. Without `rules`, a request a provider authenticated is allowed. With `rules`, a request
//!    is allowed when a rule matches: one of its `principals` (default `["*"]`: any identity)
//!    matches one of the request's identities, its `methods` (default any) include the method
//!    and its `paths` (default any; exact, or a prefix with a trailing `*`: `/api/*`) match
//!    the path. Principals are written `jwt:SUB`, `key:NAME`, `user:NAME`, `dns:NAME`,
//!    `subject:SUBJECT`, `uri:URI` or a bare URI, each optionally ending in `*` (a prefix).
//! 5. Denied: 401 with a `WWW-Authenticate` challenge per provider when no provider credential
//!    was presented (`Bearer realm="api"`, `Basic realm="api", charset="UTF-8"`,
//!    `ApiKey realm="api", header="x-api-key"`), 403 otherwise (authenticated, or only by the
//!    client certificate, but not allowed). An invalid credential gets its provider's
//!    challenge (`Bearer realm="api", error="invalid_token"`).
//!
//! The client learns little (`unauthorized`, `forbidden`); the log says exactly why (expired
//! by N s, wrong audience, unknown kid, bad signature, `alg` none, unknown user, no rule for
//! which identities). Unless `forward_credentials = true`, no credential is sent upstream:
//! every place a configured provider reads one from (its header, a token's query parameter)
//! is cleared, whichever provider decided. A token must name its subject (`sub`, a non-empty
//! string or a number). When the JWK set cannot be had (the identity provider is down and
//! nothing is cached), the answer is 503, not a 401 that would make clients drop good tokens.
//! Outcomes are counted as `decisions{result="allowed|unauthenticated|forbidden|unavailable",
//! provider="jwt|api_keys|basic|mtls|none"}`.

pub mod jwt;
pub mod remote;

use std::time::{Duration, SystemTime, UNIX_EPOCH};
use weir_sdk::hash::{FastMap, SeededFx};

use base64::Engine as _;
use serde::Deserialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use subtle::ConditionallySelectable;
use weir_sdk::config::parse_duration;
use weir_sdk::{log, metrics, props, state, Action, Filter, Request, Response};

use crate::jwt::{Alg, ClaimRules, Key, Lookup, TokenError};
use crate::remote::Remote;

/// The filter's table in `weir.toml`.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The realm named in `WWW-Authenticate` challenges (default `weir`).
    #[serde(default = "default_realm")]
    pub realm: String,
    /// The order providers are asked in: `jwt`, `api_keys`, `basic` (default: the configured
    /// ones, in that order).
    #[serde(default)]
    pub providers: Option<Vec<String>>,
    /// JWT bearer tokens.
    #[serde(default)]
    pub jwt: Option<JwtConfig>,
    /// API keys.
    #[serde(default)]
    pub api_keys: Option<ApiKeysConfig>,
    /// HTTP basic authentication.
    #[serde(default)]
    pub basic: Option<BasicConfig>,
    /// Authorization rules; none: whoever a provider authenticated is allowed.
    #[serde(default)]
    pub rules: Vec<RuleConfig>,
    /// Send the credential that authenticated the request on upstream (default: removed).
    #[serde(default)]
    pub forward_credentials: bool,
}

fn default_realm() -> String {
    "weir".into()
}

/// `jwt`: bearer tokens.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// Required `iss`.
    #[serde(default)]
    pub issuer: Option<String>,
    /// `aud` must name one of these (empty: not checked).
    #[serde(default)]
    pub audiences: Vec<String>,
    /// Accepted algorithms: `RS256`, `ES256`, `HS256` (default `["RS256", "ES256"]`).
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<String>,
    /// Clock skew allowed on `exp` and `nbf` (default `"60s"`).
    #[serde(default = "default_leeway")]
    pub leeway: String,
    /// Refuse tokens without `exp`.
    #[serde(default)]
    pub require_exp: bool,
    /// The header carrying the token (default `authorization`, as `Bearer TOKEN`).
    #[serde(default = "default_jwt_header")]
    pub header: String,
    /// A query parameter carrying the token, tried after the header.
    #[serde(default)]
    pub query: Option<String>,
    /// A JWK set: a table, or a JSON string.
    #[serde(default)]
    pub jwks: Option<Value>,
    /// A JWK set file, read at load (e.g. `/files/jwks.json`).
    #[serde(default)]
    pub jwks_file: Option<String>,
    /// A JWK set fetched from a cluster.
    #[serde(default)]
    pub remote_jwks: Option<RemoteJwksConfig>,
    /// HS256 secrets.
    #[serde(default)]
    pub secrets: Vec<SecretConfig>,
    /// Claims forwarded as request headers.
    #[serde(default)]
    pub claim_to_headers: Vec<ClaimHeader>,
}

fn default_algorithms() -> Vec<String> {
    vec!["RS256".into(), "ES256".into()]
}

fn default_leeway() -> String {
    "60s".into()
}

fn default_jwt_header() -> String {
    "authorization".into()
}

/// `jwt.remote_jwks`: where to fetch a JWK set.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct RemoteJwksConfig {
    /// The cluster serving it.
    pub cluster: String,
    /// The path, e.g. `/.well-known/jwks.json`.
    pub path: String,
    /// How long a fetched set is fresh (default `"10m"`).
    #[serde(default = "default_cache_duration")]
    pub cache_duration: String,
    /// Least time between two fetches, also after an unknown `kid` (default `"10s"`).
    #[serde(default = "default_refetch_interval")]
    pub refetch_interval: String,
    /// Time one fetch may take (default `"1s"`).
    #[serde(default = "default_timeout")]
    pub timeout: String,
}

fn default_cache_duration() -> String {
    "10m".into()
}

fn default_refetch_interval() -> String {
    "10s".into()
}

fn default_timeout() -> String {
    "1s".into()
}

/// One HS256 secret: `secret` (text) or `secret_base64`.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct SecretConfig {
    /// The key id tokens name it by (optional).
    #[serde(default)]
    pub kid: Option<String>,
    /// The secret as text.
    #[serde(default)]
    pub secret: Option<String>,
    /// The secret in base64 (standard or URL-safe).
    #[serde(default)]
    pub secret_base64: Option<String>,
}

/// `{ claim = "sub", header = "x-user" }`.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct ClaimHeader {
    /// The claim; dotted paths reach into objects.
    pub claim: String,
    /// The request header it is forwarded in.
    pub header: String,
}

/// `api_keys`.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct ApiKeysConfig {
    /// The header carrying the key (default `x-api-key`).
    #[serde(default = "default_api_key_header")]
    pub header: String,
    /// A header to forward the key's name in.
    #[serde(default)]
    pub name_header: Option<String>,
    /// The keys.
    pub keys: Vec<ApiKeyConfig>,
}

fn default_api_key_header() -> String {
    "x-api-key".into()
}

/// One API key, stored hashed.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// Its name (default `keyN`, N from 1).
    #[serde(default)]
    pub name: Option<String>,
    /// SHA-256 of the key, hex (`printf %s KEY | sha256sum`).
    pub sha256: String,
}

/// `basic`.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct BasicConfig {
    /// The users.
    pub users: Vec<UserConfig>,
    /// A header to forward the user name in.
    #[serde(default)]
    pub user_header: Option<String>,
    /// How long a verified password is remembered (default `"5m"`; `"0s"`: never).
    #[serde(default = "default_cache_ttl")]
    pub cache_ttl: String,
}

fn default_cache_ttl() -> String {
    "5m".into()
}

/// One user.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    /// The user name.
    pub name: String,
    /// A bcrypt hash or an Argon2 PHC string.
    pub hash: String,
}

/// One authorization rule: all of its parts must hold.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// Who (default `["*"]`: any authenticated identity).
    #[serde(default)]
    pub principals: Option<Vec<String>>,
    /// Methods (default any).
    #[serde(default)]
    pub methods: Vec<String>,
    /// Paths: exact, or a prefix ending in `*` (default any).
    #[serde(default)]
    pub paths: Vec<String>,
}

fn positive_duration(field: &str, s: &str) -> Result<Duration, String> {
    let d = parse_duration(field, s)?;
    if d.is_zero() {
        return Err(format!("{field}: must be greater than zero"));
    }
    Ok(d)
}

/// A header name as the host wants it: a valid token, lower-case.
fn header_name(field: &str, s: &str) -> Result<String, String> {
    let valid = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    if !valid {
        return Err(format!("{field}: {s:?} is not a header name"));
    }
    Ok(s.to_ascii_lowercase())
}

/// Who a request is, by one means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A client certificate's URI SAN.
    Uri,
    /// A client certificate's DNS SAN.
    Dns,
    /// A client certificate's subject.
    Subject,
    /// A JWT's `sub`.
    Jwt,
    /// An API key's name.
    Key,
    /// A basic-auth user.
    User,
}

impl Kind {
    fn prefix(self) -> &'static str {
        match self {
            Kind::Uri => "uri",
            Kind::Dns => "dns",
            Kind::Subject => "subject",
            Kind::Jwt => "jwt",
            Kind::Key => "key",
            Kind::User => "user",
        }
    }
}

/// One identity of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// By what means.
    pub kind: Kind,
    /// The name.
    pub name: String,
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.kind.prefix(), self.name)
    }
}

/// An exact name, or a prefix (written with a trailing `*`).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Name {
    Exact(String),
    Prefix(String),
}

impl Name {
    fn parse(s: &str) -> Name {
        match s.strip_suffix('*') {
            Some(p) => Name::Prefix(p.to_string()),
            None => Name::Exact(s.to_string()),
        }
    }

    fn matches(&self, s: &str) -> bool {
        match self {
            Name::Exact(e) => e == s,
            Name::Prefix(p) => s.starts_with(p.as_str()),
        }
    }
}

/// A rule's principal.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Principal {
    Any,
    Of(Kind, Name),
}

impl Principal {
    fn parse(field: &str, s: &str) -> Result<Principal, String> {
        if s == "*" {
            return Ok(Principal::Any);
        }
        for kind in [
            Kind::Uri,
            Kind::Dns,
            Kind::Subject,
            Kind::Jwt,
            Kind::Key,
            Kind::User,
        ] {
            if let Some(rest) = s.strip_prefix(kind.prefix()).and_then(|r| r.strip_prefix(':')) {
                // `uri:` is only a prefix when a URI follows, not a URI with scheme `uri`.
                return Ok(Principal::Of(kind, Name::parse(rest)));
            }
        }
        if s.contains("://") {
            return Ok(Principal::Of(Kind::Uri, Name::parse(s)));
        }
        Err(format!(
            "{field}: {s:?}: use \"*\", a URI SAN such as \"spiffe://...\", or jwt:, key:, user:, \
             dns:, subject:, uri: followed by a name (a trailing * matches a prefix)"
        ))
    }

    fn matches(&self, ids: &[Identity]) -> bool {
        match self {
            Principal::Any => !ids.is_empty(),
            Principal::Of(kind, name) => ids.iter().any(|i| i.kind == *kind && name.matches(&i.name)),
        }
    }
}

/// An authorization rule.
#[derive(Debug)]
struct Rule {
    principals: Vec<Principal>,
    methods: Vec<String>,
    paths: Vec<Name>,
}

impl Rule {
    fn parse(i: usize, c: RuleConfig) -> Result<Rule, String> {
        let at = format!("rules[{i}]");
        let principals = match c.principals {
            None => vec![Principal::Any],
            Some(p) if p.is_empty() => {
                return Err(format!("{at}.principals: empty; name at least one, or \"*\""))
            }
            Some(p) => p
                .iter()
                .enumerate()
                .map(|(j, s)| Principal::parse(&format!("{at}.principals[{j}]"), s))
                .collect::<Result<_, _>>()?,
        };
        let methods = c
            .methods
            .iter()
            .enumerate()
            .map(|(j, m)| {
                header_name(&format!("{at}.methods[{j}]"), m)
                    .map(|m| m.to_ascii_uppercase())
                    .map_err(|_| format!("{at}.methods[{j}]: {m:?} is not a method"))
            })
            .collect::<Result<_, _>>()?;
        let paths = c
            .paths
            .iter()
            .enumerate()
            .map(|(j, p)| {
                if p.starts_with('/') {
                    Ok(Name::parse(p))
                } else {
                    Err(format!("{at}.paths[{j}]: {p:?} must start with '/'"))
                }
            })
            .collect::<Result<_, _>>()?;
        Ok(Rule {
            principals,
            methods,
            paths,
        })
    }

    fn matches(&self, ids: &[Identity], method: &str, path: &str) -> bool {
        self.principals.iter().any(|p| p.matches(ids))
            && (self.methods.is_empty() || self.methods.iter().any(|m| m.eq_ignore_ascii_case(method)))
            && (self.paths.is_empty() || self.paths.iter().any(|p| p.matches(path)))
    }
}

/// A provider's verdict on a request.
#[derive(Debug)]
enum Outcome {
    /// No credential of this kind.
    Absent,
    /// Authenticated.
    Valid(Authenticated),
    /// A credential that does not hold; why, for the log.
    Invalid(String),
    /// The credential cannot be checked now (the JWK set could not be fetched): not the
    /// client's fault, so not a 401 that would make it drop a good token.
    Unavailable(String),
}

#[derive(Debug)]
struct Authenticated {
    identity: Identity,
    /// Headers to forward.
    headers: Vec<(String, String)>,
}

/// JWT provider, ready to verify.
#[derive(Debug)]
struct JwtProvider {
    algorithms: Vec<Alg>,
    claims: ClaimRules,
    header: String,
    query: Option<String>,
    keys: Vec<Key>,
    remote: Option<Remote>,
    claim_headers: Vec<(String, String)>,
}

fn now() -> Duration {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default()
}

/// The value after `scheme ` (case-insensitive scheme, as RFC 9110 says).
fn strip_scheme<'a>(value: &'a str, scheme: &str) -> Option<&'a str> {
    let (s, rest) = value.split_once(' ')?;
    s.eq_ignore_ascii_case(scheme).then(|| rest.trim())
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (
            b[i],
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (b'+', _, _) => {
                out.push(b' ');
                i += 1;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(k) == name).then(|| percent_decode(v))
    })
}

impl JwtProvider {
    fn new(c: JwtConfig) -> Result<JwtProvider, String> {
        let mut algorithms = Vec::new();
        for (i, a) in c.algorithms.iter().enumerate() {
            match Alg::parse(a) {
                Some(alg) if !algorithms.contains(&alg) => algorithms.push(alg),
                Some(_) => return Err(format!("jwt.algorithms[{i}]: {a:?} is listed twice")),
                None => {
                    return Err(format!(
                        "jwt.algorithms[{i}]: unsupported algorithm {a:?} (RS256, ES256, HS256)"
                    ))
                }
            }
        }
        if algorithms.is_empty() {
            return Err("jwt.algorithms: empty".into());
        }
        let leeway = parse_duration("jwt.leeway", &c.leeway)?.as_secs();
        let header = header_name("jwt.header", &c.header)?;
        if c.query.as_deref() == Some("") {
            return Err("jwt.query: empty".into());
        }

        let mut keys = Vec::new();
        let add_set = |field: &str, v: &Value, keys: &mut Vec<Key>| -> Result<(), String> {
            let set = jwt::parse_jwks(v).map_err(|e| format!("{field}: {e}"))?;
            for s in &set.skipped {
                log::info(&format!("{field}: skipped {s}"));
            }
            if set.keys.is_empty() {
                return Err(format!("{field}: no RS256, ES256 or HS256 key in the set"));
            }
            keys.extend(set.keys);
            Ok(())
        };
        match &c.jwks {
            None => {}
            Some(Value::String(s)) => {
                let v: Value = serde_json::from_str(s).map_err(|e| format!("jwt.jwks: not JSON: {e}"))?;
                add_set("jwt.jwks", &v, &mut keys)?;
            }
            Some(v @ Value::Object(_)) => add_set("jwt.jwks", v, &mut keys)?,
            Some(_) => return Err("jwt.jwks: a JWK set table or a JSON string".into()),
        }
        if let Some(path) = &c.jwks_file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                format!(
                    "jwt.jwks_file: cannot read {path:?}: {e} (mount its directory with the chain \
                     entry's `files = \"dir\"`; it appears at /files)"
                )
            })?;
            let v: Value = serde_json::from_str(&text)
                .map_err(|e| format!("jwt.jwks_file: {path:?} is not JSON: {e}"))?;
            add_set("jwt.jwks_file", &v, &mut keys)?;
        }
        for (i, s) in c.secrets.iter().enumerate() {
            let at = format!("jwt.secrets[{i}]");
            let bytes = match (&s.secret, &s.secret_base64) {
                (Some(t), None) => t.as_bytes().to_vec(),
                (None, Some(b)) => {
                    let b = b.trim().trim_end_matches('=');
                    base64::engine::general_purpose::STANDARD_NO_PAD
                        .decode(b)
                        .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(b))
                        .map_err(|e| format!("{at}.secret_base64: not base64: {e}"))?
                }
                _ => return Err(format!("{at}: set one of secret, secret_base64")),
            };
            keys.push(Key::hmac(s.kid.clone(), bytes).map_err(|e| format!("{at}: {e}"))?);
        }
        for k in &keys {
            if !algorithms.contains(&k.alg()) {
                return Err(format!(
                    "jwt.algorithms: a {} key is configured (kid {:?}) but {} is not listed",
                    k.alg(),
                    k.kid.as_deref().unwrap_or("-"),
                    k.alg()
                ));
            }
        }
        let remote = match c.remote_jwks {
            None => None,
            Some(r) => {
                if r.cluster.is_empty() {
                    return Err("jwt.remote_jwks.cluster: empty".into());
                }
                if !r.path.starts_with('/') {
                    return Err(format!("jwt.remote_jwks.path: {:?} must start with '/'", r.path));
                }
                Some(Remote::new(
                    r.cluster,
                    r.path,
                    positive_duration("jwt.remote_jwks.cache_duration", &r.cache_duration)?,
                    positive_duration("jwt.remote_jwks.refetch_interval", &r.refetch_interval)?,
                    positive_duration("jwt.remote_jwks.timeout", &r.timeout)?,
                ))
            }
        };
        if keys.is_empty() && remote.is_none() {
            return Err("jwt: no keys: set jwks, jwks_file, remote_jwks or secrets".into());
        }
        let claim_headers = c
            .claim_to_headers
            .iter()
            .enumerate()
            .map(|(i, ch)| {
                if ch.claim.is_empty() {
                    return Err(format!("jwt.claim_to_headers[{i}].claim: empty"));
                }
                let h = header_name(&format!("jwt.claim_to_headers[{i}].header"), &ch.header)?;
                Ok((ch.claim.clone(), h))
            })
            .collect::<Result<_, String>>()?;
        Ok(JwtProvider {
            algorithms,
            claims: ClaimRules {
                issuer: c.issuer,
                audiences: c.audiences,
                leeway,
                require_exp: c.require_exp,
            },
            header,
            query: c.query,
            keys,
            remote,
            claim_headers,
        })
    }

    /// The token, from the header or else the query.
    fn token(&self, req: &Request) -> Option<String> {
        if let Some(v) = req.header_str(&self.header) {
            let token = if self.header == "authorization" {
                strip_scheme(&v, "bearer")
            } else {
                Some(strip_scheme(&v, "bearer").unwrap_or(v.trim()))
            };
            if let Some(t) = token {
                return Some(t.to_string());
            }
        }
        let name = self.query.as_ref()?;
        query_param(&req.query()?, name)
    }

    /// Verifies a token: signature (fetching keys if need be), then claims.
    fn verify(&self, raw: &str) -> Result<Map<String, Value>, TokenError> {
        let token = jwt::decode(raw, &self.algorithms)?;
        let now = now();
        let verified = match token.verify_with(&self.keys) {
            Lookup::Verified => true,
            Lookup::BadSignature => false,
            Lookup::NoMatch => {
                let Some(remote) = &self.remote else {
                    return Err(token.no_match());
                };
                let now_ms = now.as_millis() as u64;
                let keys = remote.keys(now_ms).map_err(TokenError::NoKeys)?;
                match token.verify_with(&keys) {
                    Lookup::Verified => true,
                    Lookup::BadSignature => false,
                    // A key the set did not have yet (rotation): fetch again, rate-limited.
                    Lookup::NoMatch => match remote.refetch(now_ms).map(|k| token.verify_with(&k)) {
                        Some(Lookup::Verified) => true,
                        Some(Lookup::BadSignature) => false,
                        Some(Lookup::NoMatch) | None => return Err(token.no_match()),
                    },
                }
            }
        };
        if !verified {
            return Err(TokenError::BadSignature);
        }
        let claims = token.claims()?;
        self.claims.check(&claims, now.as_secs())?;
        Ok(claims)
    }

    fn authenticate(&self, req: &Request) -> Outcome {
        let Some(raw) = self.token(req) else {
            return Outcome::Absent;
        };
        match self.verify(&raw) {
            Ok(claims) => {
                // The principal is the subject: a token without one names nobody, and an empty
                // name would match every `jwt:*` rule.
                let sub = match claims.get("sub") {
                    Some(Value::String(s)) if !s.is_empty() => s.clone(),
                    Some(Value::Number(n)) => n.to_string(),
                    _ => return Outcome::Invalid("no sub claim (a non-empty string)".into()),
                };
                Outcome::Valid(Authenticated {
                    identity: Identity {
                        kind: Kind::Jwt,
                        name: sub,
                    },
                    headers: self
                        .claim_headers
                        .iter()
                        .filter_map(|(claim, h)| Some((h.clone(), jwt::claim_value(&claims, claim)?)))
                        .collect(),
                })
            }
            Err(e @ TokenError::NoKeys(_)) => Outcome::Unavailable(e.to_string()),
            Err(e) => Outcome::Invalid(e.to_string()),
        }
    }
}

/// API key provider.
#[derive(Debug)]
struct ApiKeys {
    header: String,
    name_header: Option<String>,
    hashes: Vec<[u8; 32]>,
    names: Vec<String>,
    /// Keys this instance has seen valid, with their index: SHA-256 runs once per key and
    /// instance rather than on every request (it was the largest part of the filter's work).
    /// Only valid keys are kept, so a lookup's timing tells no more than the answer does; at
    /// most `SEEN_KEYS`, forgotten all at once when full; a config change replaces the instance.
    /// Fx-hashed (SipHash was ~270 Wasm instructions per request) from a seed drawn per
    /// instance, so where a valid key sits cannot be aimed at from outside.
    seen: std::cell::RefCell<std::collections::HashMap<Vec<u8>, usize, SeededFx>>,
}

/// Most valid keys one instance remembers (see `ApiKeys::seen`).
const SEEN_KEYS: usize = 1024;

fn parse_sha256_hex(field: &str, s: &str) -> Result<[u8; 32], String> {
    let s = s.trim();
    let err = || format!("{field}: not a SHA-256 in hex (64 hex digits; `printf %s KEY | sha256sum`)");
    if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(err());
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| err())?;
    }
    Ok(out)
}

impl ApiKeys {
    fn new(c: ApiKeysConfig) -> Result<ApiKeys, String> {
        if c.keys.is_empty() {
            return Err("api_keys.keys: empty".into());
        }
        let mut hashes = Vec::new();
        let mut names: Vec<String> = Vec::new();
        for (i, k) in c.keys.iter().enumerate() {
            let h = parse_sha256_hex(&format!("api_keys.keys[{i}].sha256"), &k.sha256)?;
            if hashes.contains(&h) {
                return Err(format!("api_keys.keys[{i}].sha256: the same key is listed twice"));
            }
            let name = k.name.clone().unwrap_or_else(|| format!("key{}", i + 1));
            if name.is_empty() || names.contains(&name) {
                return Err(format!(
                    "api_keys.keys[{i}].name: {name:?} is empty or used twice"
                ));
            }
            hashes.push(h);
            names.push(name);
        }
        Ok(ApiKeys {
            header: header_name("api_keys.header", &c.header)?,
            name_header: c
                .name_header
                .as_deref()
                .map(|h| header_name("api_keys.name_header", h))
                .transpose()?,
            hashes,
            names,
            seen: std::cell::RefCell::new(std::collections::HashMap::with_hasher(SeededFx::random())),
        })
    }

    /// The index of the key whose hash is `digest`, comparing with every key in constant time.
    fn find(&self, digest: &[u8; 32]) -> Option<usize> {
        let mut found = subtle::Choice::from(0);
        let mut index = 0u32;
        for (i, h) in self.hashes.iter().enumerate() {
            let eq = digests_equal(h, digest);
            index.conditional_assign(&(i as u32), eq);
            found |= eq;
        }
        bool::from(found).then_some(index as usize)
    }

    fn authenticate(&self, req: &Request) -> Outcome {
        let Some(key) = req.header(&self.header) else {
            return Outcome::Absent;
        };
        if key.is_empty() {
            return Outcome::Invalid(format!("empty {}", self.header));
        }
        let known = self.seen.borrow().get(key.as_slice()).copied();
        let found = match known {
            Some(i) => Ok(i),
            None => {
                let digest: [u8; 32] = Sha256::digest(&key).into();
                match self.find(&digest) {
                    Some(i) => {
                        let mut seen = self.seen.borrow_mut();
                        if seen.len() >= SEEN_KEYS {
                            seen.clear();
                        }
                        seen.insert(key, i);
                        Ok(i)
                    }
                    None => Err(digest),
                }
            }
        };
        match found {
            Ok(i) => {
                let name = self.names[i].clone();
                Outcome::Valid(Authenticated {
                    headers: self
                        .name_header
                        .iter()
                        .map(|h| (h.clone(), name.clone()))
                        .collect(),
                    identity: Identity {
                        kind: Kind::Key,
                        name,
                    },
                })
            }
            Err(digest) => Outcome::Invalid(format!(
                "unknown API key in {} (sha256 {}...)",
                self.header,
                hex(&digest[..4])
            )),
        }
    }
}

/// Whether two digests are equal, in constant time: the difference of the four words is
/// folded into one bit without a data-dependent branch, and `Choice` hides that bit from the
/// optimiser. (`subtle`'s slice `ct_eq` puts an optimisation barrier on every byte: 32 of them
/// per key per request.)
fn digests_equal(a: &[u8; 32], b: &[u8; 32]) -> subtle::Choice {
    let mut diff = 0u64;
    for (x, y) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
        let x = u64::from_le_bytes(x.try_into().expect("8 bytes"));
        let y = u64::from_le_bytes(y.try_into().expect("8 bytes"));
        diff |= x ^ y;
    }
    // 1 when diff is 0: only then is neither diff nor its negation's top bit set.
    let zero = ((diff | diff.wrapping_neg()) >> 63) ^ 1;
    subtle::Choice::from(zero as u8)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

/// A password hash.
#[derive(Debug)]
enum PasswordHash {
    Bcrypt(String),
    Argon2(String),
}

impl PasswordHash {
    fn parse(field: &str, s: &str) -> Result<PasswordHash, String> {
        if s.starts_with("$argon2") {
            let h = argon2::PasswordHash::new(s)
                .map_err(|e| format!("{field}: not an Argon2 PHC string: {e}"))?;
            argon2::Algorithm::try_from(h.algorithm)
                .map_err(|e| format!("{field}: not an Argon2 PHC string: {e}"))?;
            argon2::Params::try_from(&h).map_err(|e| format!("{field}: Argon2 parameters: {e}"))?;
            if h.hash.is_none() {
                return Err(format!("{field}: the Argon2 PHC string has no hash"));
            }
            return Ok(PasswordHash::Argon2(s.to_string()));
        }
        let parts: bcrypt::HashParts = s.parse().map_err(|e| {
            format!("{field}: not a bcrypt hash ($2b$...) or an Argon2 PHC string ($argon2id$...): {e}")
        })?;
        if !(4..=31).contains(&parts.get_cost()) {
            return Err(format!(
                "{field}: bcrypt cost {} is not in 4..=31",
                parts.get_cost()
            ));
        }
        Ok(PasswordHash::Bcrypt(s.to_string()))
    }

    fn text(&self) -> &str {
        match self {
            PasswordHash::Bcrypt(s) | PasswordHash::Argon2(s) => s,
        }
    }

    fn verify(&self, password: &str) -> Result<bool, String> {
        match self {
            PasswordHash::Bcrypt(h) => bcrypt::verify(password, h).map_err(|e| e.to_string()),
            PasswordHash::Argon2(h) => {
                use argon2::PasswordVerifier as _;
                let parsed = argon2::PasswordHash::new(h).map_err(|e| e.to_string())?;
                match argon2::Argon2::default().verify_password(password.as_bytes(), &parsed) {
                    Ok(()) => Ok(true),
                    Err(argon2::password_hash::Error::Password) => Ok(false),
                    Err(e) => Err(e.to_string()),
                }
            }
        }
    }
}

/// Basic provider.
#[derive(Debug)]
struct Basic {
    users: FastMap<String, PasswordHash>,
    user_header: Option<String>,
    cache_ttl: Duration,
}

impl Basic {
    fn new(c: BasicConfig) -> Result<Basic, String> {
        if c.users.is_empty() {
            return Err("basic.users: empty".into());
        }
        let mut users = FastMap::default();
        for (i, u) in c.users.iter().enumerate() {
            if u.name.is_empty() || u.name.contains(':') {
                return Err(format!(
                    "basic.users[{i}].name: {:?} is empty or has a ':'",
                    u.name
                ));
            }
            let h = PasswordHash::parse(&format!("basic.users[{i}].hash"), &u.hash)?;
            if users.insert(u.name.clone(), h).is_some() {
                return Err(format!("basic.users[{i}].name: {:?} is listed twice", u.name));
            }
        }
        Ok(Basic {
            users,
            user_header: c
                .user_header
                .as_deref()
                .map(|h| header_name("basic.user_header", h))
                .transpose()?,
            cache_ttl: parse_duration("basic.cache_ttl", &c.cache_ttl)?,
        })
    }

    /// The shared-state key remembering that `password` is `user`'s under `hash`.
    fn cache_key(user: &str, password: &str, hash: &PasswordHash) -> String {
        let mut d = Sha256::new();
        for part in [user, password, hash.text()] {
            d.update((part.len() as u64).to_le_bytes());
            d.update(part.as_bytes());
        }
        format!("basic:{}", hex(&d.finalize()))
    }

    fn check(&self, user: &str, password: &str) -> Result<(), String> {
        let Some(hash) = self.users.get(user) else {
            // As slow as a known user's wrong password: the answer time must not tell which
            // user names exist.
            if let Some(any) = self.users.values().next() {
                let _ = any.verify(password);
            }
            return Err(format!("unknown user {user:?}"));
        };
        let key = Basic::cache_key(user, password, hash);
        if !self.cache_ttl.is_zero() && state::get(&key).is_some() {
            return Ok(());
        }
        match hash.verify(password) {
            Ok(true) => {
                if !self.cache_ttl.is_zero() {
                    let _ = state::set(&key, b"1", Some(self.cache_ttl));
                }
                Ok(())
            }
            Ok(false) => Err(format!("wrong password for user {user:?}")),
            Err(e) => Err(format!("password check for user {user:?} failed: {e}")),
        }
    }

    fn authenticate(&self, req: &Request) -> Outcome {
        let Some(value) = req.header_str("authorization") else {
            return Outcome::Absent;
        };
        let Some(encoded) = strip_scheme(&value, "basic") else {
            return Outcome::Absent;
        };
        let decoded = base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(encoded.trim_end_matches('='))
            .ok()
            .and_then(|b| String::from_utf8(b).ok());
        let Some((user, password)) = decoded.as_deref().and_then(|d| d.split_once(':')) else {
            return Outcome::Invalid("basic credentials are not base64 of user:password".into());
        };
        match self.check(user, password) {
            Ok(()) => Outcome::Valid(Authenticated {
                identity: Identity {
                    kind: Kind::User,
                    name: user.to_string(),
                },
                headers: self
                    .user_header
                    .iter()
                    .map(|h| (h.clone(), user.to_string()))
                    .collect(),
            }),
            Err(e) => Outcome::Invalid(e),
        }
    }
}

/// A configured provider.
#[derive(Debug)]
enum Provider {
    Jwt(Box<JwtProvider>),
    ApiKeys(ApiKeys),
    Basic(Basic),
}

impl Provider {
    fn name(&self) -> &'static str {
        match self {
            Provider::Jwt(_) => "jwt",
            Provider::ApiKeys(_) => "api_keys",
            Provider::Basic(_) => "basic",
        }
    }

    fn authenticate(&self, req: &Request) -> Outcome {
        match self {
            Provider::Jwt(p) => p.authenticate(req),
            Provider::ApiKeys(p) => p.authenticate(req),
            Provider::Basic(p) => p.authenticate(req),
        }
    }

    /// The `WWW-Authenticate` challenge; `invalid`: a credential was presented and refused.
    fn challenge(&self, realm: &str, invalid: bool) -> String {
        match self {
            Provider::Jwt(_) if invalid => format!("Bearer realm=\"{realm}\", error=\"invalid_token\""),
            Provider::Jwt(_) => format!("Bearer realm=\"{realm}\""),
            Provider::Basic(_) => format!("Basic realm=\"{realm}\", charset=\"UTF-8\""),
            Provider::ApiKeys(k) => format!("ApiKey realm=\"{realm}\", header=\"{}\"", k.header),
        }
    }

    /// Where this provider reads its credential: a header, and for JWT maybe a query parameter.
    fn credential_location(&self) -> (String, Option<String>) {
        match self {
            Provider::Jwt(p) => (p.header.clone(), p.query.clone()),
            Provider::ApiKeys(p) => (p.header.clone(), None),
            Provider::Basic(_) => ("authorization".into(), None),
        }
    }

    /// Headers this provider forwards (removed from every incoming request).
    fn forwarded_headers(&self) -> Vec<String> {
        match self {
            Provider::Jwt(p) => p.claim_headers.iter().map(|(_, h)| h.clone()).collect(),
            Provider::ApiKeys(p) => p.name_header.iter().cloned().collect(),
            Provider::Basic(p) => p.user_header.iter().cloned().collect(),
        }
    }
}

/// The filter.
#[derive(Debug)]
pub struct Auth {
    realm: String,
    providers: Vec<Provider>,
    rules: Vec<Rule>,
    /// Headers removed from every request before anything else.
    strip: Vec<String>,
    forward_credentials: bool,
    /// Every place a configured provider reads a credential from: with `forward_credentials`
    /// off, all of them are cleared from an allowed request, not only the one that decided
    /// (an unchecked token beside a valid API key must not reach the upstream).
    credential_headers: Vec<String>,
    credential_query: Option<String>,
    /// `decisions{result="allowed"}` per provider (same order), counted on every allowed
    /// request: made once, so a count is one host call with nothing to look up.
    allowed: Vec<metrics::Counter>,
    allowed_mtls: metrics::Counter,
}

/// Takes the query parameter `name` out of `query`; `None` when nothing is left.
fn without_param(query: &str, name: &str) -> Option<String> {
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| percent_decode(pair.split_once('=').map_or(pair, |(k, _)| k)) != name)
        .collect();
    (!kept.is_empty()).then(|| kept.join("&"))
}

impl Auth {
    fn respond(&self, status: u16, challenges: &[String], result: &str, provider: &str) -> Action {
        let _ = metrics::counter_add("decisions", &[("result", result), ("provider", provider)], 1);
        let mut r = Response::new(status)
            .header("content-type", "text/plain")
            .header("cache-control", "no-store");
        for c in challenges {
            r = r.header("www-authenticate", c);
        }
        let body = match status {
            401 => "unauthorized\n",
            403 => "forbidden\n",
            _ => "authentication unavailable\n",
        };
        Action::Respond(r.body(body))
    }

    fn describe(ids: &[Identity]) -> String {
        if ids.is_empty() {
            return "no identity".into();
        }
        ids.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
    }
}

impl Filter for Auth {
    type Config = Config;

    fn new(c: Config) -> Result<Self, String> {
        if c.realm.is_empty()
            || c.realm
                .chars()
                .any(|ch| ch == '"' || ch == '\\' || ch.is_control())
        {
            return Err(format!(
                "realm: {:?} must be non-empty text without quotes",
                c.realm
            ));
        }
        let mut configured: Vec<(&str, Provider)> = Vec::new();
        if let Some(j) = c.jwt {
            configured.push(("jwt", Provider::Jwt(Box::new(JwtProvider::new(j)?))));
        }
        if let Some(k) = c.api_keys {
            configured.push(("api_keys", Provider::ApiKeys(ApiKeys::new(k)?)));
        }
        if let Some(b) = c.basic {
            configured.push(("basic", Provider::Basic(Basic::new(b)?)));
        }
        let providers = match c.providers {
            None => configured.into_iter().map(|(_, p)| p).collect(),
            Some(order) => {
                let mut out = Vec::new();
                for (i, name) in order.iter().enumerate() {
                    let Some(pos) = configured.iter().position(|(n, _)| n == name) else {
                        return Err(match name.as_str() {
                            "jwt" | "api_keys" | "basic"
                                if out.iter().any(|p: &Provider| p.name() == name) =>
                            {
                                format!("providers[{i}]: {name:?} is listed twice")
                            }
                            "jwt" | "api_keys" | "basic" => {
                                format!("providers[{i}]: {name:?} is listed but has no [{name}] table")
                            }
                            _ => format!("providers[{i}]: unknown provider {name:?} (jwt, api_keys, basic)"),
                        });
                    };
                    out.push(configured.remove(pos).1);
                }
                if let Some((name, _)) = configured.first() {
                    return Err(format!("providers: {name} is configured but not listed"));
                }
                out
            }
        };
        let rules = c
            .rules
            .into_iter()
            .enumerate()
            .map(|(i, r)| Rule::parse(i, r))
            .collect::<Result<Vec<_>, _>>()?;
        if providers.is_empty() && rules.is_empty() {
            return Err("configure at least one of jwt, api_keys, basic, rules".into());
        }
        let mut strip: Vec<String> = Vec::new();
        for h in providers.iter().flat_map(Provider::forwarded_headers) {
            if !strip.contains(&h) {
                strip.push(h);
            }
        }
        let mut credential_headers: Vec<String> = Vec::new();
        let mut credential_query = None;
        for (h, q) in providers.iter().map(Provider::credential_location) {
            if !credential_headers.contains(&h) {
                credential_headers.push(h);
            }
            credential_query = credential_query.or(q);
        }
        let allowed = providers
            .iter()
            .map(|p| metrics::Counter::new("decisions", &[("result", "allowed"), ("provider", p.name())]))
            .collect();
        Ok(Auth {
            allowed,
            allowed_mtls: metrics::Counter::new("decisions", &[("result", "allowed"), ("provider", "mtls")]),
            realm: c.realm,
            providers,
            rules,
            strip,
            forward_credentials: c.forward_credentials,
            credential_headers,
            credential_query,
        })
    }

    fn on_request_headers(&self, req: &Request) -> Action {
        // Nothing the client sent may pass for what this filter vouches for.
        for h in &self.strip {
            let _ = req.remove_header(h);
        }

        let mut authenticated: Option<(usize, &Provider, Authenticated)> = None;
        for (i, p) in self.providers.iter().enumerate() {
            match p.authenticate(req) {
                Outcome::Absent => continue,
                Outcome::Valid(a) => {
                    authenticated = Some((i, p, a));
                    break;
                }
                Outcome::Invalid(why) => {
                    log::info(&format!("401: {}: {why}", p.name()));
                    return self.respond(
                        401,
                        &[p.challenge(&self.realm, true)],
                        "unauthenticated",
                        p.name(),
                    );
                }
                Outcome::Unavailable(why) => {
                    log::warn(&format!("503: {}: {why}", p.name()));
                    return self.respond(503, &[], "unavailable", p.name());
                }
            }
        }

        let mut ids: Vec<Identity> = authenticated.iter().map(|(_, _, a)| a.identity.clone()).collect();
        // The TLS peer's names matter to the rules and the debug line only: without either,
        // no host call for them.
        let debug = authenticated.is_some() && log::enabled(log::Level::Debug);
        let peer = if self.rules.is_empty() && !debug {
            None
        } else {
            props::peer_identity()
        };
        if let Some(peer) = peer {
            ids.extend(peer.uri_sans.into_iter().map(|name| Identity {
                kind: Kind::Uri,
                name,
            }));
            ids.extend(peer.dns_sans.into_iter().map(|name| Identity {
                kind: Kind::Dns,
                name,
            }));
            if !peer.subject.is_empty() {
                ids.push(Identity {
                    kind: Kind::Subject,
                    name: peer.subject,
                });
            }
        }

        let allowed = if self.rules.is_empty() {
            authenticated.is_some()
        } else {
            let (method, path) = (req.method(), req.path());
            let ok = self.rules.iter().any(|r| r.matches(&ids, &method, &path));
            if !ok {
                let (status, result) = if authenticated.is_none() && !self.providers.is_empty() {
                    (401, "unauthenticated")
                } else {
                    (403, "forbidden")
                };
                log::info(&format!(
                    "{status}: no rule allows {method} {path} for {}",
                    Auth::describe(&ids)
                ));
                return match status {
                    401 => self.respond(401, &self.challenges(), result, "none"),
                    _ => {
                        let provider = authenticated.as_ref().map_or("mtls", |(_, p, _)| p.name());
                        self.respond(403, &[], result, provider)
                    }
                };
            }
            true
        };
        if !allowed {
            log::info("401: no credential");
            return self.respond(401, &self.challenges(), "unauthenticated", "none");
        }

        let (provider, allowed) = match authenticated {
            None => ("mtls", &self.allowed_mtls),
            Some((i, p, a)) => {
                for (h, v) in &a.headers {
                    if let Err(e) = req.set_header(h, v) {
                        log::warn(&format!("cannot forward {h}: {e}"));
                    }
                }
                if debug {
                    log::debug(&format!("allowed: {}", Auth::describe(&ids)));
                }
                (p.name(), &self.allowed[i])
            }
        };
        if !self.forward_credentials {
            for h in &self.credential_headers {
                let _ = req.remove_header(h);
            }
            if let Some(name) = &self.credential_query {
                if let Some(q) = req.query().filter(|q| query_param(q, name).is_some()) {
                    let path = req.path();
                    let target = match without_param(&q, name) {
                        Some(q) => format!("{path}?{q}"),
                        None => path,
                    };
                    if let Err(e) = req.set_path(&target) {
                        // Never send a token on that could not be taken out.
                        log::warn(&format!("403: cannot remove the token from the query: {e}"));
                        return self.respond(403, &[], "forbidden", provider);
                    }
                }
            }
        }
        let _ = allowed.add(1);
        Action::Continue
    }
}

impl Auth {
    /// Every provider's challenge, for a request that presented no credential.
    fn challenges(&self) -> Vec<String> {
        self.providers
            .iter()
            .map(|p| p.challenge(&self.realm, false))
            .collect()
    }
}

weir_sdk::export_filter!(Auth);

#[cfg(test)]
mod tests {
    use super::*;
    use hmac::Mac as _;
    use serde_json::json;
    use weir_sdk::outbound::OutboundResponse;
    use weir_sdk::testing::{MockHost, TestFilter};

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn b64(b: &[u8]) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
    }

    fn hs256(kid: &str, secret: &[u8], claims: &Value) -> String {
        let input = format!(
            "{}.{}",
            b64(json!({"alg": "HS256", "kid": kid}).to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let mut m = hmac::Hmac::<Sha256>::new_from_slice(secret).unwrap();
        m.update(input.as_bytes());
        format!("{input}.{}", b64(&m.finalize().into_bytes()))
    }

    fn unix_now() -> u64 {
        now().as_secs()
    }

    fn request(headers: &[(&str, &str)]) {
        MockHost::reset(|h| {
            h.path = "/reports/q3".into();
            h.request_headers = headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
                .collect();
        });
    }

    fn status(a: &Action) -> u16 {
        match a {
            Action::Continue => 0,
            Action::Respond(r) => r.status,
            other => panic!("unexpected {other:?}"),
        }
    }

    fn last_log() -> String {
        MockHost::with(|h| h.logs.last().map(|(_, l)| l.clone()).unwrap_or_default())
    }

    fn jwt_filter() -> TestFilter<Auth> {
        TestFilter::<Auth>::new(
            &json!({"jwt": {"issuer": "idp", "audiences": ["api"], "algorithms": ["HS256"], "leeway": "10s",
                "secrets": [{"kid": "k1", "secret": SECRET}],
                "claim_to_headers": [{"claim": "sub", "header": "x-user"}, {"claim": "org.id", "header": "x-org"}]}})
            .to_string(),
        )
        .unwrap()
    }

    #[test]
    fn a_good_token_forwards_claims_and_is_not_sent_on() {
        let f = jwt_filter();
        let t = unix_now();
        let token = hs256(
            "k1",
            SECRET.as_bytes(),
            &json!({"iss": "idp", "aud": "api", "sub": "ann", "exp": t + 60, "org": {"id": 7}}),
        );
        request(&[("authorization", &format!("Bearer {token}")), ("x-org", "forged")]);
        assert_eq!(f.on_request_headers(), Action::Continue);
        assert_eq!(MockHost::request_header("x-user").as_deref(), Some("ann"));
        assert_eq!(MockHost::request_header("x-org").as_deref(), Some("7"));
        assert_eq!(MockHost::request_header("authorization"), None);
        assert_eq!(
            MockHost::with(|h| h.counters.clone())
                .into_iter()
                .filter(|(k, _)| k.starts_with("decisions") && k.contains("allowed"))
                .map(|(_, v)| v)
                .sum::<u64>(),
            1
        );
    }

    #[test]
    fn a_refused_token_tells_the_client_little_and_the_log_exactly_why() {
        let f = jwt_filter();
        let t = unix_now();
        let claims = |f: &dyn Fn(&mut Value)| {
            let mut c = json!({"iss": "idp", "aud": "api", "sub": "ann", "exp": t + 60});
            f(&mut c);
            c
        };
        for (token, why) in [
            (
                hs256("k1", SECRET.as_bytes(), &claims(&|c| c["exp"] = json!(t - 100))),
                "expired",
            ),
            (
                hs256("k1", SECRET.as_bytes(), &claims(&|c| c["aud"] = json!("web"))),
                "wrong audience \"web\"",
            ),
            (
                hs256("k1", SECRET.as_bytes(), &claims(&|c| c["iss"] = json!("evil"))),
                "wrong issuer \"evil\"",
            ),
            (
                hs256("k2", SECRET.as_bytes(), &claims(&|_| {})),
                "unknown kid \"k2\"",
            ),
            (
                hs256("k1", b"another secret that is 32 bytes!", &claims(&|_| {})),
                "bad signature",
            ),
            (
                format!(
                    "{}.{}.",
                    b64(br#"{"alg":"none"}"#),
                    b64(claims(&|_| {}).to_string().as_bytes())
                ),
                "alg none",
            ),
        ] {
            request(&[("authorization", &format!("Bearer {token}"))]);
            let a = f.on_request_headers();
            assert_eq!(status(&a), 401, "{why}");
            let Action::Respond(r) = a else { unreachable!() };
            assert_eq!(r.body, b"unauthorized\n");
            assert!(r.headers.iter().any(
                |(n, v)| n == "www-authenticate" && v == br#"Bearer realm="weir", error="invalid_token""#
            ));
            assert!(last_log().contains(why), "{why}: {}", last_log());
        }
    }

    #[test]
    fn digests_are_equal_only_when_every_bit_is() {
        let a: [u8; 32] = Sha256::digest(b"key-one").into();
        assert!(bool::from(digests_equal(&a, &a)));
        for byte in 0..32 {
            for bit in [0, 7] {
                let mut b = a;
                b[byte] ^= 1 << bit;
                assert!(!bool::from(digests_equal(&a, &b)), "byte {byte} bit {bit}");
            }
        }
        assert!(!bool::from(digests_equal(&[0; 32], &[0xff; 32])));
    }

    #[test]
    fn api_keys_are_compared_by_hash_and_named() {
        let hash = hex(&Sha256::digest(b"key-one"));
        let f = TestFilter::<Auth>::new(
            &json!({"api_keys": {"name_header": "x-client", "keys": [{"sha256": "00".repeat(32)}, {"name": "ci", "sha256": hash}]}})
                .to_string(),
        )
        .unwrap();
        request(&[("x-api-key", "key-one"), ("x-client", "forged")]);
        assert_eq!(f.on_request_headers(), Action::Continue);
        assert_eq!(MockHost::request_header("x-client").as_deref(), Some("ci"));
        assert_eq!(MockHost::request_header("x-api-key"), None);
        request(&[("x-api-key", "key-two")]);
        assert_eq!(status(&f.on_request_headers()), 401);
        assert!(last_log().contains("unknown API key"), "{}", last_log());
    }

    #[test]
    fn a_remembered_key_keeps_its_own_name_and_others_are_still_checked() {
        let (one, two) = (hex(&Sha256::digest(b"key-one")), hex(&Sha256::digest(b"key-two")));
        let f = TestFilter::<Auth>::new(
            &json!({"api_keys": {"name_header": "x-client", "keys": [{"name": "one", "sha256": one}, {"name": "two", "sha256": two}]}})
                .to_string(),
        )
        .unwrap();
        for key in ["key-one", "key-two", "key-one", "key-two"] {
            request(&[("x-api-key", key)]);
            assert_eq!(f.on_request_headers(), Action::Continue, "{key}");
            assert_eq!(
                MockHost::request_header("x-client").as_deref(),
                Some(&key[4..]),
                "{key} is named as itself, also when remembered"
            );
        }
        for key in ["key-on", "key-one ", "KEY-ONE", ""] {
            request(&[("x-api-key", key)]);
            assert_eq!(
                status(&f.on_request_headers()),
                401,
                "{key:?} after key-one was remembered"
            );
        }
    }

    #[test]
    fn decisions_are_counted_by_result_and_provider() {
        let one = hex(&Sha256::digest(b"key-one"));
        let f = TestFilter::<Auth>::new(
            &json!({"api_keys": {"keys": [{"name": "one", "sha256": one}]}}).to_string(),
        )
        .unwrap();
        let count = |series: &str| MockHost::with(|h| h.counters.get(series).copied().unwrap_or(0));
        request(&[("x-api-key", "key-one")]);
        assert_eq!(f.on_request_headers(), Action::Continue);
        // The key is taken off an allowed request; the same request again, sent anew.
        MockHost::with(|h| h.request_headers = vec![("x-api-key".into(), b"key-one".to_vec())]);
        assert_eq!(f.on_request_headers(), Action::Continue);
        assert_eq!(count("decisions{result=allowed,provider=api_keys}"), 2);
        request(&[("x-api-key", "key-two")]);
        assert_eq!(status(&f.on_request_headers()), 401);
        assert_eq!(count("decisions{result=unauthenticated,provider=api_keys}"), 1);
        assert_eq!(
            count("decisions{result=allowed,provider=api_keys}"),
            0,
            "a fresh mock host"
        );
        request(&[("x-api-key", "key-one")]);
        assert_eq!(f.on_request_headers(), Action::Continue);
        assert_eq!(
            count("decisions{result=allowed,provider=api_keys}"),
            1,
            "the counter made at init still counts"
        );
    }

    #[test]
    fn basic_checks_bcrypt_once_then_remembers_it() {
        let hash = bcrypt::hash("pw", 4).unwrap();
        let f = TestFilter::<Auth>::new(
            &json!({"basic": {"users": [{"name": "ops", "hash": hash}]}}).to_string(),
        )
        .unwrap();
        let basic = |u: &str, p: &str| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
            )
        };
        request(&[("authorization", &basic("ops", "pw"))]);
        assert_eq!(f.on_request_headers(), Action::Continue);
        let remembered = MockHost::with(|h| h.state.keys().filter(|k| k.starts_with("basic:")).count());
        assert_eq!(remembered, 1);
        // The next check finds the entry every instance shares (one entry, not a second).
        MockHost::with(|h| {
            h.request_headers = vec![("authorization".into(), basic("ops", "pw").into_bytes())];
            h.logs.clear();
        });
        assert_eq!(f.on_request_headers(), Action::Continue);
        assert_eq!(MockHost::with(|h| h.state.len()), 1);
        let state = MockHost::with(|h| h.state.clone());
        request(&[("authorization", &basic("ops", "nope"))]);
        MockHost::with(|h| h.state = state.clone());
        assert_eq!(status(&f.on_request_headers()), 401);
        assert!(
            last_log().contains("wrong password for user \"ops\""),
            "{}",
            last_log()
        );
        request(&[("authorization", &basic("root", "pw"))]);
        assert_eq!(status(&f.on_request_headers()), 401);
        assert!(last_log().contains("unknown user \"root\""), "{}", last_log());
    }

    #[test]
    fn rules_deny_by_default_with_401_or_403() {
        let hash = hex(&Sha256::digest(b"key-one"));
        let f = TestFilter::<Auth>::new(
            &json!({"api_keys": {"keys": [{"name": "ci", "sha256": hash}]},
                "rules": [{"principals": ["key:ci"], "methods": ["GET"], "paths": ["/reports/*"]},
                          {"principals": ["spiffe://cluster.local/ns/web/*"]}]})
            .to_string(),
        )
        .unwrap();
        request(&[]);
        let a = f.on_request_headers();
        assert_eq!(status(&a), 401, "no credential");
        request(&[("x-api-key", "key-one")]);
        assert_eq!(f.on_request_headers(), Action::Continue);
        request(&[("x-api-key", "key-one")]);
        MockHost::with(|h| h.method = "DELETE".into());
        assert_eq!(status(&f.on_request_headers()), 403);
        assert!(
            last_log().contains("no rule allows DELETE /reports/q3 for key:ci"),
            "{}",
            last_log()
        );
        request(&[]);
        MockHost::with(|h| {
            h.peer = Some(props::PeerIdentity {
                subject: "CN=frontend".into(),
                uri_sans: vec!["spiffe://cluster.local/ns/web/sa/frontend".into()],
                dns_sans: vec![],
            })
        });
        assert_eq!(
            f.on_request_headers(),
            Action::Continue,
            "the peer's SPIFFE ID matches a prefix rule"
        );
    }

    #[test]
    fn a_remote_key_set_is_fetched_once_and_shared() {
        let f = TestFilter::<Auth>::new(
            &json!({"jwt": {"algorithms": ["HS256"], "remote_jwks": {"cluster": "idp", "path": "/jwks", "refetch_interval": "1h"}}})
                .to_string(),
        )
        .unwrap();
        let set = json!({"keys": [{"kty": "oct", "kid": "k1", "k": b64(SECRET.as_bytes())}]}).to_string();
        let calls = std::rc::Rc::new(std::cell::Cell::new(0));
        let token = hs256(
            "k1",
            SECRET.as_bytes(),
            &json!({"sub": "svc", "exp": unix_now() + 60}),
        );
        let mut state = None;
        for _ in 0..5 {
            request(&[("authorization", &format!("Bearer {token}"))]);
            let (set, c) = (set.clone(), calls.clone());
            MockHost::with(|h| {
                if let Some(s) = state.take() {
                    h.state = s;
                }
                h.outbound = Some(Box::new(move |cluster, req| {
                    assert_eq!((cluster, req.path.as_str()), ("idp", "/jwks"));
                    c.set(c.get() + 1);
                    Ok(OutboundResponse {
                        status: 200,
                        headers: vec![],
                        body: set.as_bytes().to_vec(),
                    })
                }));
            });
            assert_eq!(f.on_request_headers(), Action::Continue, "{}", last_log());
            state = Some(MockHost::with(|h| h.state.clone()));
        }
        assert_eq!(calls.get(), 1);
        // A token for a key the set lacks: refetching is rate-limited by the lease.
        let other = hs256(
            "k9",
            SECRET.as_bytes(),
            &json!({"sub": "svc", "exp": unix_now() + 60}),
        );
        request(&[("authorization", &format!("Bearer {other}"))]);
        MockHost::with(|h| h.state = state.take().unwrap());
        assert_eq!(status(&f.on_request_headers()), 401);
        assert!(last_log().contains("unknown kid \"k9\""), "{}", last_log());
        assert_eq!(calls.get(), 1);
    }

    #[test]
    fn config_errors_name_the_field() {
        for (config, want) in [
            (json!({}), "configure at least one of"),
            (
                json!({"providers": ["ldap"], "rules": [{}]}),
                "providers[0]: unknown provider \"ldap\"",
            ),
            (
                json!({"jwt": {"algorithms": ["HS512"], "secrets": [{"secret": SECRET}]}}),
                "jwt.algorithms[0]: unsupported algorithm",
            ),
            (
                json!({"jwt": {"algorithms": ["HS256"], "secrets": [{"secret": "short"}]}}),
                "jwt.secrets[0]",
            ),
            (
                json!({"jwt": {"jwks_file": "/files/none.json"}}),
                "jwt.jwks_file: cannot read",
            ),
            (
                json!({"jwt": {"secrets": [{"secret": SECRET}]}}),
                "but HS256 is not listed",
            ),
            (
                json!({"api_keys": {"keys": [{"sha256": "abc"}]}}),
                "api_keys.keys[0].sha256",
            ),
            (
                json!({"basic": {"users": [{"name": "a", "hash": "plain"}]}}),
                "basic.users[0].hash",
            ),
            (
                json!({"rules": [{"paths": ["api/*"]}]}),
                "rules[0].paths[0]: \"api/*\" must start with",
            ),
        ] {
            let e = TestFilter::<Auth>::new(&config.to_string())
                .err()
                .unwrap_or_else(|| panic!("{config} accepted"));
            assert!(e.contains(want), "{config}: {e}");
        }
    }
}

#[cfg(test)]
mod review_tests {
    //! Cases a security review of this filter raised.
    use super::*;
    use serde_json::json;
    use weir_sdk::testing::{MockHost, TestFilter};

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn hs256(claims: &Value) -> String {
        use hmac::Mac as _;
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let input = format!(
            "{}.{}",
            b64(br#"{"alg":"HS256"}"#),
            b64(claims.to_string().as_bytes())
        );
        let mut m = hmac::Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
        m.update(input.as_bytes());
        format!("{input}.{}", b64(&m.finalize().into_bytes()))
    }

    fn filter(extra: Value) -> TestFilter<Auth> {
        let mut c = json!({"providers": ["api_keys", "jwt"],
            "api_keys": {"keys": [{"name": "ci", "sha256": hex(&Sha256::digest(b"key-one"))}]},
            "jwt": {"algorithms": ["HS256"], "secrets": [{"secret": SECRET}], "query": "access_token"}});
        if let (Value::Object(c), Value::Object(e)) = (&mut c, extra) {
            c.extend(e);
        }
        TestFilter::<Auth>::new(&c.to_string()).unwrap()
    }

    #[test]
    fn no_credential_reaches_the_upstream_only_because_another_one_was_valid() {
        let f = filter(json!({}));
        MockHost::reset(|h| {
            h.query = Some("a=1&access_token=forged.jwt.value".into());
            h.request_headers = vec![
                ("x-api-key".into(), b"key-one".to_vec()),
                ("authorization".into(), b"Bearer forged.jwt.value".to_vec()),
            ];
        });
        assert_eq!(f.on_request_headers(), Action::Continue, "the API key decides");
        assert_eq!(MockHost::request_header("authorization"), None);
        assert_eq!(MockHost::request_header("x-api-key"), None);
        assert_eq!(MockHost::with(|h| h.query.clone()).as_deref(), Some("a=1"));
    }

    #[test]
    fn a_token_without_a_subject_names_nobody() {
        let f = filter(json!({"rules": [{"principals": ["jwt:*"]}]}));
        let exp = now().as_secs() + 60;
        for (claims, ok) in [
            (json!({"exp": exp}), false),
            (json!({"exp": exp, "sub": ""}), false),
            (json!({"exp": exp, "sub": 42}), true),
            (json!({"exp": exp, "sub": "svc"}), true),
        ] {
            MockHost::reset(|h| {
                h.request_headers = vec![(
                    "authorization".into(),
                    format!("Bearer {}", hs256(&claims)).into_bytes(),
                )]
            });
            assert_eq!(f.on_request_headers() == Action::Continue, ok, "{claims}");
        }
    }

    #[test]
    fn a_padded_token_is_refused_and_an_unreachable_key_set_is_503() {
        let f = filter(json!({}));
        let t = hs256(&json!({"sub": "svc", "exp": now().as_secs() + 60}));
        MockHost::reset(|h| {
            h.request_headers = vec![("authorization".into(), format!("Bearer {t}==").into_bytes())]
        });
        assert!(matches!(f.on_request_headers(), Action::Respond(r) if r.status == 401));

        let f = TestFilter::<Auth>::new(
            &json!({"jwt": {"algorithms": ["HS256"], "remote_jwks": {"cluster": "idp", "path": "/jwks"}}})
                .to_string(),
        )
        .unwrap();
        // No outbound handler: the fetch fails.
        MockHost::reset(|h| {
            h.request_headers = vec![("authorization".into(), format!("Bearer {t}").into_bytes())]
        });
        match f.on_request_headers() {
            Action::Respond(r) => {
                assert_eq!(r.status, 503);
                assert!(r.headers.iter().all(|(n, _)| n != "www-authenticate"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_broken_key_in_a_fetched_set_does_not_lose_the_good_ones() {
        let f = TestFilter::<Auth>::new(
            &json!({"jwt": {"algorithms": ["HS256"], "remote_jwks": {"cluster": "idp", "path": "/jwks"}}})
                .to_string(),
        )
        .unwrap();
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let set = json!({"keys": [
            {"kty": "RSA", "kid": "short", "n": b64(&[0xc5; 64]), "e": "AQAB"},
            {"kty": "oct", "kid": 7},
            {"kty": "oct", "k": b64(SECRET.as_bytes())},
        ]})
        .to_string();
        let t = hs256(&json!({"sub": "svc", "exp": now().as_secs() + 60}));
        MockHost::reset(|h| {
            h.request_headers = vec![("authorization".into(), format!("Bearer {t}").into_bytes())];
            h.outbound = Some(Box::new(move |_, _| {
                Ok(weir_sdk::outbound::OutboundResponse {
                    status: 200,
                    headers: vec![],
                    body: set.as_bytes().to_vec(),
                })
            }));
        });
        assert_eq!(f.on_request_headers(), Action::Continue);
        let logs = MockHost::with(|h| {
            h.logs
                .iter()
                .map(|(_, l)| l.clone())
                .collect::<Vec<_>>()
                .join("\n")
        });
        assert!(logs.contains("skipped keys[0] (kid \"short\")"), "{logs}");
        // A configured set with the same broken key is a config error.
        let e = TestFilter::<Auth>::new(
            &json!({"jwt": {"jwks": {"keys": [{"kty": "RSA", "n": b64(&[0xc5; 64]), "e": "AQAB"}]}}})
                .to_string(),
        )
        .err()
        .unwrap();
        assert!(e.contains("jwt.jwks: keys[0]"), "{e}");
    }

    #[test]
    fn config_values_that_would_overflow_or_panic_are_errors() {
        for (c, want) in [
            (
                json!({"api_keys": {"keys": [{"sha256": "é".repeat(32)}]}}),
                "not a SHA-256",
            ),
            (
                json!({"jwt": {"algorithms": ["HS256"], "secrets": [{"secret": SECRET}], "leeway": "99999999999999999h"}}),
                "too long",
            ),
            (
                json!({"jwt": {"remote_jwks": {"cluster": "idp", "path": "/j", "cache_duration": "999999h"}}}),
                "longer than a year",
            ),
        ] {
            let e = TestFilter::<Auth>::new(&c.to_string())
                .err()
                .unwrap_or_else(|| panic!("{c} accepted"));
            assert!(e.contains(want), "{c}: {e}");
        }
    }
}
