//! A Weir filter to copy: adds a configured header to every request, denies one path with a
//! 403, tags responses, and counts what it did.

use weir_sdk::{metrics, Action, Filter, Request, Response, ResponseHead};

/// The filter's table in `weir.toml`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Header added to every request going upstream.
    #[serde(default = "default_header")]
    pub header: String,
    /// Its value.
    #[serde(default = "default_value")]
    pub value: String,
    /// Requests to this path are denied with 403.
    #[serde(default)]
    pub deny_path: Option<String>,
}

fn default_header() -> String {
    "x-hello".into()
}

fn default_value() -> String {
    "world".into()
}

/// The filter: its config, parsed once per instance.
pub struct Hello {
    config: Config,
}

impl Filter for Hello {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        if config.header.is_empty() {
            return Err("header must not be empty".into());
        }
        Ok(Hello { config })
    }

    fn on_request_headers(&self, req: &Request) -> Action {
        if self.config.deny_path.as_deref() == Some(req.path().as_str()) {
            let _ = metrics::counter_add("denied", &[], 1);
            return Action::Respond(
                Response::new(403)
                    .header("content-type", "text/plain")
                    .body("denied by hello-filter\n"),
            );
        }
        // A refused header (a typo in config) is the filter's problem to report, not a crash.
        if let Err(e) = req.set_header(&self.config.header, &self.config.value) {
            weir_sdk::log::warn(&format!("cannot set {}: {e}", self.config.header));
        }
        Action::Continue
    }

    fn on_response_headers(&self, resp: &ResponseHead) -> Action {
        let _ = resp.set_header("x-hello-filter", "seen");
        Action::Continue
    }
}

weir_sdk::export_filter!(Hello);

#[cfg(test)]
mod tests {
    use super::*;
    use weir_sdk::testing::{MockHost, TestFilter};

    #[test]
    fn adds_the_header() {
        let f = TestFilter::<Hello>::new(r#"{"header": "x-team", "value": "blue"}"#).unwrap();
        MockHost::reset(|h| h.path = "/anything".into());
        assert_eq!(f.on_request_headers(), Action::Continue);
        assert_eq!(MockHost::request_header("x-team").as_deref(), Some("blue"));
    }

    #[test]
    fn denies_the_path_and_counts_it() {
        let f = TestFilter::<Hello>::new(r#"{"deny_path": "/admin"}"#).unwrap();
        MockHost::reset(|h| h.path = "/admin".into());
        match f.on_request_headers() {
            Action::Respond(r) => assert_eq!(r.status, 403),
            other => panic!("expected a 403, got {other:?}"),
        }
        assert_eq!(MockHost::with(|h| h.counters.get("denied{}").copied()), Some(1));
    }

    #[test]
    fn tags_responses() {
        let f = TestFilter::<Hello>::new("{}").unwrap();
        MockHost::reset(|_| {});
        assert_eq!(f.on_response_headers(), Action::Continue);
        assert_eq!(
            MockHost::response_header("x-hello-filter").as_deref(),
            Some("seen")
        );
    }

    #[test]
    fn bad_config_is_refused_with_a_reason() {
        let e = TestFilter::<Hello>::new(r#"{"heder": "x"}"#).err().unwrap();
        assert!(e.contains("unknown field `heder`"), "{e}");
        let e = TestFilter::<Hello>::new(r#"{"header": ""}"#).err().unwrap();
        assert_eq!(e, "header must not be empty");
    }

    #[test]
    fn a_refused_header_is_logged_not_fatal() {
        let f = TestFilter::<Hello>::new(r#"{"header": "connection"}"#).unwrap();
        MockHost::reset(|_| {});
        assert_eq!(f.on_request_headers(), Action::Continue);
        assert!(MockHost::with(|h| h
            .logs
            .iter()
            .any(|(_, m)| m.contains("managed by the proxy"))));
    }
}
