//! The admin listener: `/live`, `/ready`, `/metrics` (Prometheus text), `/config` (the
//! effective config, secrets redacted), `/filters` (loaded filters and reload status),
//! `/clusters` (each endpoint's health, ejections, load and idle connections, as Envoy's
//! `/clusters`). Loopback by default; HTTP/1.1 only.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{header, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::body::{self, Body};
use crate::metrics::Metrics;
use crate::reload::Control;

/// What the admin endpoints read.
pub struct AdminState {
    /// Process metrics.
    pub metrics: Arc<Metrics>,
    /// The config in service and the reload status.
    pub control: Arc<Control>,
    /// False while draining: `/ready` answers 503 so load balancers stop sending.
    pub ready: Arc<AtomicBool>,
}

/// Serves the admin API until `stop` turns true.
pub async fn serve(tcp: TcpListener, state: Arc<AdminState>, mut stop: watch::Receiver<bool>) {
    loop {
        let (io, _) = tokio::select! {
            r = tcp.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let state = state.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, std::convert::Infallible>(route(req, &state)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(io), svc)
                .await;
        });
    }
}

fn route(req: Request<Incoming>, state: &AdminState) -> Response<Body> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    }
    match req.uri().path() {
        "/live" => text(StatusCode::OK, "live\n"),
        "/ready" => {
            if state.ready.load(Ordering::Relaxed) {
                text(StatusCode::OK, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
            }
        }
        "/metrics" => {
            let mut r = Response::new(body::full(state.metrics.encode()));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            r
        }
        "/config" => json(&state.control.config.load().redacted_json()),
        "/filters" => json(&state.control.status()),
        "/clusters" => {
            let gateway = state.control.shared.gateway();
            let mut clusters: Vec<_> = gateway.clusters.values().map(|c| c.status()).collect();
            clusters.sort_by(|a, b| a.name.cmp(&b.name));
            json(&serde_json::json!({ "clusters": clusters }))
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /live /ready /metrics /config /filters /clusters\n",
        ),
    }
}

fn json(value: &impl serde::Serialize) -> Response<Body> {
    let json = serde_json::to_string_pretty(value).unwrap_or_default();
    let mut r = Response::new(body::full(json + "\n"));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

fn text(status: StatusCode, s: &'static str) -> Response<Body> {
    let mut r = Response::new(body::full(s));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}
