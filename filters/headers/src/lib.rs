//! `headers`: static header edits, like Envoy's `request_headers_to_add` /
//! `response_headers_to_remove` or the Gateway API's header modifier filters.
//!
//! ```toml
//! filters = [{ name = "headers", file = "weir_filter_headers.wasm", config = {
//!     request = { set = { "x-env" = "prod" }, add = { "via" = "weir" }, remove = ["x-debug"] },
//!     response = { set = { "strict-transport-security" = "max-age=31536000" }, remove = ["server"] } } }]
//! ```
//!
//! `set` replaces every value of a header, `add` appends one, `remove` drops all; per phase
//! they apply in that order: remove, set, add. Header names are checked when the filter loads
//! (a bad one is a config error); hop-by-hop and framing headers are refused by the host.

use std::collections::BTreeMap;

use weir_sdk::{Action, Filter, Request, ResponseHead};

/// Edits of one direction.
#[derive(serde::Deserialize, Default, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Edits {
    /// Replace every value with this one.
    pub set: BTreeMap<String, String>,
    /// Append this value.
    pub add: BTreeMap<String, String>,
    /// Remove every value.
    pub remove: Vec<String>,
}

impl Edits {
    fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }

    fn check(&self, at: &str) -> Result<(), String> {
        let names = self.set.keys().chain(self.add.keys()).chain(self.remove.iter());
        for n in names {
            if n.is_empty() || !n.bytes().all(is_token) || n.bytes().any(|b| b.is_ascii_uppercase()) {
                return Err(format!("{at}: {n:?} is not a lower-case header name"));
            }
        }
        for (n, v) in self.set.iter().chain(self.add.iter()) {
            if v.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
                return Err(format!("{at}: the value of {n:?} has a control character"));
            }
        }
        Ok(())
    }
}

/// RFC 9110 token characters.
fn is_token(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// The filter's table in `weir.toml`.
#[derive(serde::Deserialize, Default, Debug)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Edits of the request sent upstream.
    pub request: Edits,
    /// Edits of the response sent to the client.
    pub response: Edits,
}

/// The filter.
pub struct Headers {
    config: Config,
}

/// Applies edits through a head's setters.
fn apply(
    e: &Edits,
    remove: impl Fn(&str) -> Result<(), weir_sdk::HostError>,
    set: impl Fn(&str, &str) -> Result<(), weir_sdk::HostError>,
    add: impl Fn(&str, &str) -> Result<(), weir_sdk::HostError>,
) {
    let report = |what: &str, name: &str, r: Result<(), weir_sdk::HostError>| {
        if let Err(err) = r {
            weir_sdk::log::warn(&format!("cannot {what} {name}: {err}"));
        }
    };
    for n in &e.remove {
        report("remove", n, remove(n));
    }
    for (n, v) in &e.set {
        report("set", n, set(n, v));
    }
    for (n, v) in &e.add {
        report("add", n, add(n, v));
    }
}

impl Filter for Headers {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        config.request.check("request")?;
        config.response.check("response")?;
        Ok(Headers { config })
    }

    fn on_request_headers(&self, req: &Request) -> Action {
        if self.config.request.is_empty() {
            return Action::NotImplemented;
        }
        apply(
            &self.config.request,
            |n| req.remove_header(n),
            |n, v| req.set_header(n, v),
            |n, v| req.append_header(n, v),
        );
        Action::Continue
    }

    fn on_response_headers(&self, resp: &ResponseHead) -> Action {
        if self.config.response.is_empty() {
            return Action::NotImplemented;
        }
        apply(
            &self.config.response,
            |n| resp.remove_header(n),
            |n, v| resp.set_header(n, v),
            |n, v| resp.append_header(n, v),
        );
        Action::Continue
    }
}

weir_sdk::export_filter!(Headers);

#[cfg(test)]
mod tests {
    use super::*;
    use weir_sdk::testing::{MockHost, TestFilter};

    #[test]
    fn request_edits_apply_in_order() {
        let f = TestFilter::<Headers>::new(
            r#"{"request": {"set": {"x-env": "prod"}, "add": {"via": "weir"}, "remove": ["x-debug"]}}"#,
        )
        .unwrap();
        MockHost::reset(|h| {
            h.request_headers = vec![
                ("x-debug".into(), b"1".to_vec()),
                ("via".into(), b"edge".to_vec()),
            ];
        });
        assert_eq!(f.on_request_headers(), Action::Continue);
        assert_eq!(MockHost::request_header("x-env").as_deref(), Some("prod"));
        assert_eq!(MockHost::request_header("x-debug"), None);
        let via: Vec<Vec<u8>> = MockHost::with(|h| {
            h.request_headers
                .iter()
                .filter(|(n, _)| n == "via")
                .map(|(_, v)| v.clone())
                .collect()
        });
        assert_eq!(via, vec![b"edge".to_vec(), b"weir".to_vec()]);
    }

    #[test]
    fn bad_names_fail_at_load() {
        let e = TestFilter::<Headers>::new(r#"{"response": {"set": {"X Bad": "1"}}}"#)
            .err()
            .unwrap();
        assert!(e.contains("not a lower-case header name"), "{e}");
        let e = TestFilter::<Headers>::new(r#"{"request": {"add": {"x-a": "1\r\nx-b: 2"}}}"#)
            .err()
            .unwrap();
        assert!(e.contains("control character"), "{e}");
    }
}
