//! The request and response a filter works on, and the responses it makes.

use crate::host;
use crate::wit::weir::filter::types as wt;

/// Why the host refused a call.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum HostError {
    /// A name or value the host does not accept (invalid header, hop-by-hop or framing header,
    /// unknown cluster, bad status).
    Invalid(String),
    /// The call makes no sense in this phase (e.g. editing the request after it was sent).
    WrongPhase,
    /// A host limit was reached.
    Limit(String),
}

impl std::fmt::Display for HostError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HostError::Invalid(why) => write!(f, "invalid: {why}"),
            HostError::WrongPhase => f.write_str("not allowed in this phase"),
            HostError::Limit(why) => write!(f, "limit reached: {why}"),
        }
    }
}

impl std::error::Error for HostError {}

impl From<wt::Error> for HostError {
    fn from(e: wt::Error) -> Self {
        match e {
            wt::Error::Invalid(s) => HostError::Invalid(s),
            wt::Error::WrongPhase => HostError::WrongPhase,
            wt::Error::Limit(s) => HostError::Limit(s),
        }
    }
}

/// A response the filter sends itself (deny, redirect, rate limit).
///
/// ```no_run
/// let r = weir_sdk::Response::new(302).header("location", "https://example.com/").body("moved");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Header fields (name, value).
    pub headers: Vec<(String, Vec<u8>)>,
    /// Body.
    pub body: Vec<u8>,
}

impl Response {
    /// A response with this status, no headers and an empty body.
    pub fn new(status: u16) -> Response {
        Response {
            status,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    /// Adds a header.
    pub fn header(mut self, name: &str, value: impl AsRef<[u8]>) -> Response {
        self.headers
            .push((name.to_ascii_lowercase(), value.as_ref().to_vec()));
        self
    }

    /// Sets the body.
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Response {
        self.body = body.into();
        self
    }

    pub(crate) fn into_wit(self) -> wt::Response {
        wt::Response {
            status: self.status,
            headers: self
                .headers
                .into_iter()
                .map(|(name, value)| wt::Header { name, value })
                .collect(),
            body: self.body,
        }
    }
}

/// What a header phase decides.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Action {
    /// Go on to the next filter, then the upstream (or the client).
    Continue,
    /// Answer the client now with this response.
    Respond(Response),
    /// From `on_response_headers` only: send the request again, to another endpoint when the
    /// cluster has one.
    Retry,
    /// This phase has nothing to do for this filter as configured: the host stops calling it
    /// for this loaded version (a new config or file loads a fresh one). What the trait's
    /// default phases return; a filter returns it when its config makes the phase idle (no
    /// response header edits configured, say), saving a call per request. Otherwise return
    /// [`Action::Continue`]: returning this for one request skips the phase for all.
    NotImplemented,
}

impl Action {
    pub(crate) fn into_wit(self) -> wt::Action {
        match self {
            Action::Continue => wt::Action::Continue,
            Action::Respond(r) => wt::Action::Respond(r.into_wit()),
            Action::Retry => wt::Action::Retry,
            Action::NotImplemented => wt::Action::NotImplemented,
        }
    }
}

fn header_list(h: Vec<wt::Header>) -> Vec<(String, Vec<u8>)> {
    h.into_iter().map(|h| (h.name, h.value)).collect()
}

/// The downstream request. Readable in every phase; editable in `on_request_headers`.
/// Values are read from the host on demand: a filter copies only what it touches.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct Request;

impl Request {
    /// The method, e.g. `GET`.
    pub fn method(&self) -> String {
        host::req_method()
    }
    /// The canonical path, without the query.
    pub fn path(&self) -> String {
        host::req_path()
    }
    /// The query string without `?`.
    pub fn query(&self) -> Option<String> {
        host::req_query()
    }
    /// The host the client addressed.
    pub fn authority(&self) -> Option<String> {
        host::req_authority()
    }
    /// `http` or `https`.
    pub fn scheme(&self) -> String {
        host::req_scheme()
    }
    /// The first value of a header.
    pub fn header(&self, name: &str) -> Option<Vec<u8>> {
        host::req_get_header(name)
    }
    /// The first value of a header as text, if it is UTF-8.
    pub fn header_str(&self, name: &str) -> Option<String> {
        self.header(name).and_then(|v| String::from_utf8(v).ok())
    }
    /// Every value of a header.
    pub fn header_all(&self, name: &str) -> Vec<Vec<u8>> {
        host::req_get_header_all(name)
    }
    /// Every header field, in order.
    pub fn headers(&self) -> Vec<(String, Vec<u8>)> {
        header_list(host::req_get_headers())
    }
    /// Replaces a header's values with one value.
    pub fn set_header(&self, name: &str, value: impl AsRef<[u8]>) -> Result<(), HostError> {
        host::req_set_header(name, value.as_ref()).map_err(Into::into)
    }
    /// Adds a value to a header.
    pub fn append_header(&self, name: &str, value: impl AsRef<[u8]>) -> Result<(), HostError> {
        host::req_append_header(name, value.as_ref()).map_err(Into::into)
    }
    /// Removes a header.
    pub fn remove_header(&self, name: &str) -> Result<(), HostError> {
        host::req_remove_header(name).map_err(Into::into)
    }
    /// Replaces the path and query sent upstream.
    pub fn set_path(&self, path_and_query: &str) -> Result<(), HostError> {
        host::req_set_path(path_and_query).map_err(Into::into)
    }
    /// Replaces the authority (`Host`) sent upstream.
    pub fn set_authority(&self, authority: &str) -> Result<(), HostError> {
        host::req_set_authority(authority).map_err(Into::into)
    }
}

/// The response head, from `on_response_headers` on.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct ResponseHead;

impl ResponseHead {
    /// The request this response answers (read-only here).
    pub fn request(&self) -> Request {
        Request
    }

    /// The status code.
    pub fn status(&self) -> u16 {
        host::resp_status()
    }
    /// Replaces the status code.
    pub fn set_status(&self, status: u16) -> Result<(), HostError> {
        host::resp_set_status(status).map_err(Into::into)
    }
    /// The first value of a header.
    pub fn header(&self, name: &str) -> Option<Vec<u8>> {
        host::resp_get_header(name)
    }
    /// Every header field, in order.
    pub fn headers(&self) -> Vec<(String, Vec<u8>)> {
        header_list(host::resp_get_headers())
    }
    /// Replaces a header's values with one value.
    pub fn set_header(&self, name: &str, value: impl AsRef<[u8]>) -> Result<(), HostError> {
        host::resp_set_header(name, value.as_ref()).map_err(Into::into)
    }
    /// Adds a value to a header.
    pub fn append_header(&self, name: &str, value: impl AsRef<[u8]>) -> Result<(), HostError> {
        host::resp_append_header(name, value.as_ref()).map_err(Into::into)
    }
    /// Removes a header.
    pub fn remove_header(&self, name: &str) -> Result<(), HostError> {
        host::resp_remove_header(name).map_err(Into::into)
    }
}
