//! A small, fast upstream for the quickstart demo and the load bench.
//!
//! Speaks HTTP/1.1 and h2c (prior knowledge). Routes:
//! - `GET /` (and anything else): a short greeting naming this upstream;
//! - `/echo`: the request body streamed back;
//! - `/headers`: the request head as the upstream saw it (what the proxy forwarded).

use std::net::SocketAddr;

use bytes::Bytes;
use clap::Parser;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

#[derive(Parser)]
#[command(about = "Weir's demo upstream: answers fast, echoes, shows what the proxy forwarded")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9000")]
    listen: SocketAddr,
    /// Name shown in responses (tells endpoints apart).
    #[arg(long, default_value = "demo")]
    name: String,
    /// Tokio worker threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

type Body = BoxBody<Bytes, hyper::Error>;

fn full(s: impl Into<Bytes>) -> Body {
    Full::new(s.into()).map_err(|never| match never {}).boxed()
}

async fn handle(
    req: Request<Incoming>,
    name: &'static str,
    greeting: Bytes,
) -> Result<Response<Body>, hyper::Error> {
    let resp = match req.uri().path() {
        "/echo" => Response::new(req.into_body().boxed()),
        "/headers" => {
            let mut out = format!("{} {} {:?}\n", req.method(), req.uri(), req.version());
            for (k, v) in req.headers() {
                out.push_str(&format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes())));
            }
            Response::new(full(out))
        }
        _ => Response::new(full(greeting)),
    };
    let (mut parts, body) = resp.into_parts();
    parts
        .headers
        .insert("x-upstream", hyper::header::HeaderValue::from_static(name));
    Ok(Response::from_parts(parts, body))
}

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen).await?;
        eprintln!(
            "demo upstream {:?} listening on {}",
            args.name,
            listener.local_addr()?
        );
        let name: &'static str = Box::leak(args.name.into_boxed_str());
        let greeting = Bytes::from(format!("hello from the demo upstream {name}\n"));
        loop {
            let (tcp, _) = match listener.accept().await {
                Ok(x) => x,
                Err(_) => continue,
            };
            let _ = tcp.set_nodelay(true);
            let greeting = greeting.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| handle(req, name, greeting.clone()));
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    })
}
