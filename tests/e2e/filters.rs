//! The filter-chain seam, exercised with native filters: header edits, a local answer, the
//! cluster chosen by a filter, and the fail-open / fail-closed policies.

use std::collections::HashMap;
use std::sync::Arc;

use http::{HeaderValue, Response, StatusCode};
use weir::filter::{
    Action, ChainEntry, FailurePolicy, Filter, FilterChain, FilterError, PhaseFuture, RequestContext,
};
use weir_tests::client::Client;
use weir_tests::proxy::{TestProxy, ADMIN};
use weir_tests::upstream::Upstream;

struct Policy;

impl Filter for Policy {
    fn name(&self) -> &str {
        "policy"
    }

    fn on_request_headers<'a>(
        &'a self,
        req: &'a mut http::request::Parts,
        ctx: &'a mut RequestContext,
    ) -> PhaseFuture<'a> {
        Box::pin(async move { self.request(req, ctx) })
    }

    fn on_response_headers<'a>(
        &'a self,
        _req: &'a mut http::request::Parts,
        resp: &'a mut http::response::Parts,
        _ctx: &'a mut RequestContext,
    ) -> PhaseFuture<'a> {
        resp.headers.insert("x-policy", HeaderValue::from_static("seen"));
        Box::pin(std::future::ready(Ok(Action::Continue)))
    }
}

impl Policy {
    fn request(
        &self,
        req: &mut http::request::Parts,
        ctx: &mut RequestContext,
    ) -> Result<Action, FilterError> {
        req.headers.insert("x-filtered", HeaderValue::from_static("1"));
        if req.uri.path() == "/admin" {
            let mut r = Response::new(weir::body::full("denied\n"));
            *r.status_mut() = StatusCode::FORBIDDEN;
            return Ok(Action::Respond(r));
        }
        if req.headers.get("x-canary").is_some() {
            ctx.cluster = Some("canary".into());
        }
        Ok(Action::Continue)
    }
}

struct Broken(&'static str);

impl Filter for Broken {
    fn name(&self) -> &str {
        self.0
    }

    fn on_request_headers<'a>(
        &'a self,
        req: &'a mut http::request::Parts,
        _ctx: &'a mut RequestContext,
    ) -> PhaseFuture<'a> {
        let r = if req.uri.path() == "/fail" {
            Err(FilterError {
                kind: "trap",
                message: "unreachable executed".into(),
            })
        } else {
            Ok(Action::Continue)
        };
        Box::pin(std::future::ready(r))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_filters_steer_the_core() {
    let stable = Upstream::http1("stable").start().await;
    let canary = Upstream::http1("canary").start().await;
    let toml = format!(
        r#"{ADMIN}
[[listeners]]
name = "closed"
address = "127.0.0.1:0"
[[listeners]]
name = "open"
address = "127.0.0.1:0"
[[routes]]
cluster = "stable"
[clusters.stable]
endpoints = ["{}"]
[clusters.canary]
endpoints = ["{}"]
"#,
        stable.addr, canary.addr
    );
    let chain = |policy| {
        FilterChain::new(vec![
            ChainEntry {
                filter: Arc::new(Broken("broken")),
                policy,
            },
            ChainEntry {
                filter: Arc::new(Policy),
                policy: FailurePolicy::FailClosed,
            },
        ])
    };
    let chains = HashMap::from([
        ("closed".to_string(), chain(FailurePolicy::FailClosed)),
        ("open".to_string(), chain(FailurePolicy::FailOpen)),
    ]);
    let proxy = TestProxy::start_with(&toml, std::path::Path::new("."), chains).await;
    let mut c = Client::h1(proxy.addr("closed")).await;

    let r = c.get("/headers", "x").await;
    assert_eq!(r.headers()["x-upstream"], "stable");
    assert_eq!(r.headers()["x-policy"], "seen");
    let seen = weir_tests::collect(r.into_body()).await.unwrap();
    assert!(String::from_utf8_lossy(&seen).contains("x-filtered: 1"));

    let req = http::Request::get("/")
        .header("host", "x")
        .header("x-canary", "yes")
        .body(weir_tests::empty())
        .unwrap();
    let r = c.send(req).await.unwrap();
    assert_eq!(
        r.headers()["x-upstream"],
        "canary",
        "the filter chose the cluster"
    );

    let r = c.get("/admin", "x").await;
    assert_eq!(r.status(), 403);
    assert_eq!(
        &weir_tests::collect(r.into_body()).await.unwrap()[..],
        b"denied\n"
    );
    assert_eq!(stable.hits() + canary.hits(), 2);

    let r = c.get("/fail", "x").await;
    assert_eq!(r.status(), 500, "fail-closed");
    assert_eq!(r.headers()["x-weir-error"], "filter-failed");
    let mut o = Client::h1(proxy.addr("open")).await;
    let r = o.get("/fail", "x").await;
    assert_eq!(r.status(), 200, "fail-open skips the broken filter");
    assert_eq!(r.headers()["x-policy"], "seen");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_answer_never_lets_the_unread_body_become_a_request() {
    let up = Upstream::http1("up").start().await;
    let toml = format!(
        r#"{ADMIN}
[[listeners]]
name = "web"
address = "127.0.0.1:0"
[[routes]]
cluster = "c"
[clusters.c]
endpoints = ["{}"]
"#,
        up.addr
    );
    let chain = FilterChain::new(vec![ChainEntry {
        filter: Arc::new(Policy),
        policy: FailurePolicy::FailClosed,
    }]);
    let proxy = TestProxy::start_with(
        &toml,
        std::path::Path::new("."),
        HashMap::from([("web".to_string(), chain)]),
    )
    .await;
    // The denied request's body is a whole request: it must never reach the upstream.
    let smuggled = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut raw = format!(
        "POST /admin HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        smuggled.len()
    )
    .into_bytes();
    raw.extend_from_slice(smuggled);
    let (out, _) =
        weir_tests::client::raw_exchange(proxy.addr("web"), &raw, std::time::Duration::from_secs(2)).await;
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
    assert_eq!(out.matches("HTTP/1.1 ").count(), 1, "exactly one response: {out}");
    assert_eq!(up.hits(), 0);
}
