//! `cors`: Cross-Origin Resource Sharing, as Envoy's CORS filter and the Gateway API's CORS
//! filter do it.
//!
//! ```toml
//! filters = [{ name = "cors", file = "weir_filter_cors.wasm", config = {
//!     allow_origins = ["https://app.example.com", "https://*.example.org"],
//!     allow_methods = ["GET", "POST"], allow_headers = ["authorization", "content-type"],
//!     expose_headers = ["x-request-id"], max_age = 600, allow_credentials = true } }]
//! ```
//!
//! - A preflight (`OPTIONS` with `Origin` and `Access-Control-Request-Method`) from an allowed
//!   origin is answered here with 204 and the `Access-Control-Allow-*` headers; the upstream
//!   never sees it. From any other origin it is answered 403.
//! - An actual request from an allowed origin gets `Access-Control-Allow-Origin` (and
//!   `-Credentials`, `-Expose-Headers`) on its response, plus `Vary: Origin`. Other origins get
//!   no CORS headers, so the browser blocks the page from reading the answer.
//! - `"*"` allows every origin; with `allow_credentials` the origin is echoed instead, since
//!   browsers refuse `*` with credentials. `https://*.example.org` allows any subdomain.

use weir_sdk::{Action, Filter, Request, Response, ResponseHead};

/// The filter's table in `weir.toml`.
#[derive(serde::Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Allowed origins: exact (`https://app.example.com`), a subdomain pattern
    /// (`https://*.example.com`), or `"*"`.
    pub allow_origins: Vec<String>,
    /// Methods a preflight may ask for.
    #[serde(default = "default_methods")]
    pub allow_methods: Vec<String>,
    /// Request headers a preflight may ask for (lower-case); `["*"]` allows any.
    #[serde(default)]
    pub allow_headers: Vec<String>,
    /// Response headers the page may read.
    #[serde(default)]
    pub expose_headers: Vec<String>,
    /// Seconds a browser may cache a preflight answer.
    #[serde(default)]
    pub max_age: Option<u32>,
    /// Whether cookies and credentials may be sent.
    #[serde(default)]
    pub allow_credentials: bool,
}

fn default_methods() -> Vec<String> {
    ["GET", "HEAD", "POST"].map(String::from).to_vec()
}

/// The filter.
pub struct Cors {
    config: Config,
}

impl Cors {
    fn allows(&self, origin: &str) -> bool {
        self.config.allow_origins.iter().any(|o| {
            if o == "*" {
                return true;
            }
            match o.split_once("://*.") {
                Some((scheme, suffix)) => origin
                    .strip_prefix(scheme)
                    .and_then(|r| r.strip_prefix("://"))
                    .is_some_and(|host| {
                        host.len() > suffix.len() + 1 && host.ends_with(&format!(".{suffix}"))
                    }),
                None => o.eq_ignore_ascii_case(origin),
            }
        })
    }

    /// The `Access-Control-Allow-Origin` value for an allowed origin.
    fn allow_origin_value<'a>(&self, origin: &'a str) -> &'a str {
        if self.config.allow_origins.iter().any(|o| o == "*") && !self.config.allow_credentials {
            "*"
        } else {
            origin
        }
    }

    fn preflight(&self, req: &Request, origin: &str) -> Action {
        let method = req
            .header_str("access-control-request-method")
            .unwrap_or_default();
        let asked: Vec<String> = req
            .header_str("access-control-request-headers")
            .unwrap_or_default()
            .split(',')
            .map(|h| h.trim().to_ascii_lowercase())
            .filter(|h| !h.is_empty())
            .collect();
        let any_header = self.config.allow_headers.iter().any(|h| h == "*");
        let methods_ok = self
            .config
            .allow_methods
            .iter()
            .any(|m| m.eq_ignore_ascii_case(&method));
        let headers_ok = any_header
            || asked.iter().all(|h| {
                self.config
                    .allow_headers
                    .iter()
                    .any(|a| a.eq_ignore_ascii_case(h))
            });
        if !self.allows(origin) || !methods_ok || !headers_ok {
            weir_sdk::log::debug(&format!(
                "preflight refused: origin {origin}, method {method}, headers {asked:?}"
            ));
            return Action::Respond(
                Response::new(403)
                    .header("vary", "origin")
                    .body("CORS preflight refused\n"),
            );
        }
        let mut r = Response::new(204)
            .header("access-control-allow-origin", self.allow_origin_value(origin))
            .header(
                "access-control-allow-methods",
                self.config.allow_methods.join(", "),
            )
            .header("vary", "origin");
        if !asked.is_empty() {
            let allowed = if any_header {
                asked.join(", ")
            } else {
                self.config.allow_headers.join(", ")
            };
            r = r.header("access-control-allow-headers", allowed);
        }
        if let Some(age) = self.config.max_age {
            r = r.header("access-control-max-age", age.to_string());
        }
        if self.config.allow_credentials {
            r = r.header("access-control-allow-credentials", "true");
        }
        Action::Respond(r)
    }
}

impl Filter for Cors {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        if config.allow_origins.is_empty() {
            return Err("allow_origins: name at least one origin (or \"*\")".into());
        }
        for o in &config.allow_origins {
            if o != "*" && !(o.starts_with("http://") || o.starts_with("https://")) {
                return Err(format!(
                    "allow_origins: {o:?} is not an origin (scheme://host[:port]) or \"*\""
                ));
            }
        }
        Ok(Cors { config })
    }

    fn on_request_headers(&self, req: &Request) -> Action {
        let Some(origin) = req.header_str("origin") else {
            return Action::Continue;
        };
        if req.method() == "OPTIONS" && req.header("access-control-request-method").is_some() {
            return self.preflight(req, &origin);
        }
        Action::Continue
    }

    fn on_response_headers(&self, resp: &ResponseHead) -> Action {
        let Some(origin) = resp.request().header_str("origin") else {
            return Action::Continue;
        };
        let _ = resp.append_header("vary", "origin");
        if !self.allows(&origin) {
            return Action::Continue;
        }
        let _ = resp.set_header("access-control-allow-origin", self.allow_origin_value(&origin));
        if self.config.allow_credentials {
            let _ = resp.set_header("access-control-allow-credentials", "true");
        }
        if !self.config.expose_headers.is_empty() {
            let _ = resp.set_header(
                "access-control-expose-headers",
                self.config.expose_headers.join(", "),
            );
        }
        Action::Continue
    }
}

weir_sdk::export_filter!(Cors);

#[cfg(test)]
mod tests {
    use super::*;
    use weir_sdk::testing::{MockHost, TestFilter};

    fn filter() -> TestFilter<Cors> {
        TestFilter::new(
            r#"{"allow_origins": ["https://app.example.com", "https://*.example.org"],
                "allow_methods": ["GET", "PUT"], "allow_headers": ["content-type"],
                "expose_headers": ["x-request-id"], "max_age": 600, "allow_credentials": true}"#,
        )
        .unwrap()
    }

    fn preflight(origin: &str, method: &str, headers: &str) -> Action {
        MockHost::reset(|h| {
            h.method = "OPTIONS".into();
            h.request_headers = vec![
                ("origin".into(), origin.as_bytes().to_vec()),
                ("access-control-request-method".into(), method.as_bytes().to_vec()),
                (
                    "access-control-request-headers".into(),
                    headers.as_bytes().to_vec(),
                ),
            ];
        });
        filter().on_request_headers()
    }

    fn header<'a>(r: &'a Response, name: &str) -> Option<&'a str> {
        r.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| std::str::from_utf8(v).unwrap())
    }

    #[test]
    fn preflights_from_allowed_origins_are_answered() {
        let Action::Respond(r) = preflight("https://app.example.com", "PUT", "Content-Type") else {
            panic!("a preflight is answered")
        };
        assert_eq!(r.status, 204);
        assert_eq!(
            header(&r, "access-control-allow-origin"),
            Some("https://app.example.com")
        );
        assert_eq!(header(&r, "access-control-allow-methods"), Some("GET, PUT"));
        assert_eq!(header(&r, "access-control-max-age"), Some("600"));
        assert_eq!(header(&r, "access-control-allow-credentials"), Some("true"));
        let Action::Respond(r) = preflight("https://a.b.example.org", "GET", "") else {
            panic!()
        };
        assert_eq!(r.status, 204, "subdomain pattern");
    }

    #[test]
    fn preflights_outside_the_policy_are_refused() {
        for (origin, method, headers) in [
            ("https://evil.example", "GET", ""),
            ("https://example.org", "GET", ""),
            ("https://app.example.com", "DELETE", ""),
            ("https://app.example.com", "GET", "x-secret"),
        ] {
            let Action::Respond(r) = preflight(origin, method, headers) else {
                panic!()
            };
            assert_eq!(r.status, 403, "{origin} {method} {headers}");
        }
    }

    #[test]
    fn actual_responses_get_headers_only_for_allowed_origins() {
        let f = filter();
        MockHost::reset(|h| h.request_headers = vec![("origin".into(), b"https://app.example.com".to_vec())]);
        assert_eq!(f.on_response_headers(), Action::Continue);
        assert_eq!(
            MockHost::response_header("access-control-allow-origin").as_deref(),
            Some("https://app.example.com")
        );
        assert_eq!(
            MockHost::response_header("access-control-expose-headers").as_deref(),
            Some("x-request-id")
        );
        MockHost::reset(|h| h.request_headers = vec![("origin".into(), b"https://evil.example".to_vec())]);
        f.on_response_headers();
        assert_eq!(MockHost::response_header("access-control-allow-origin"), None);
        assert_eq!(MockHost::response_header("vary").as_deref(), Some("origin"));
    }
}
