//! The process: binds every listener and the admin API, serves, and on shutdown stops
//! accepting, drains in-flight requests up to a deadline, and returns.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context as _;
use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::admin::{self, AdminState};
use crate::config::Config;
use crate::filter::FilterChain;
use crate::listener::{self, BoundListener};
use crate::metrics::Metrics;
use crate::proxy::{Gateway, Shared};

/// A configured, bound proxy. Tests bind with port 0 and read the addresses back.
pub struct Proxy {
    config: Arc<Config>,
    shared: Arc<Shared>,
    listeners: Vec<BoundListener>,
    admin: Option<TcpListener>,
}

impl Proxy {
    /// Builds the data plane and binds every socket of `config`.
    pub async fn bind(config: Config) -> anyhow::Result<Proxy> {
        Self::bind_with_chains(config, HashMap::new()).await
    }

    /// As [`Proxy::bind`], with a filter chain per listener name.
    pub async fn bind_with_chains(
        config: Config,
        chains: HashMap<String, FilterChain>,
    ) -> anyhow::Result<Proxy> {
        crate::tls::install_default_provider();
        let metrics = Arc::new(Metrics::new());
        let gateway = Gateway::build(&config, &metrics, &chains).await?;
        let mut listeners = Vec::new();
        for (i, l) in config.listeners.iter().enumerate() {
            let tls = match &l.tls {
                Some(t) => Some(crate::tls::server_config(t, &config)?),
                None => None,
            };
            let bound = BoundListener::bind(l, tls).await.with_context(|| {
                format!(
                    "{}: listeners[{i}].address: cannot bind {}",
                    config.source_name, l.address
                )
            })?;
            listeners.push(bound);
        }
        let admin = if config.admin.enabled {
            Some(TcpListener::bind(config.admin.address).await.with_context(|| {
                format!(
                    "{}: admin.address: cannot bind {}",
                    config.source_name, config.admin.address
                )
            })?)
        } else {
            None
        };
        let shared = Arc::new(Shared {
            gateway: ArcSwap::from_pointee(gateway),
            metrics,
        });
        Ok(Proxy {
            config: Arc::new(config),
            shared,
            listeners,
            admin,
        })
    }

    /// The bound address of a listener.
    pub fn listener_addr(&self, name: &str) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|l| &*l.name == name)
            .map(BoundListener::local_addr)
    }

    /// The bound admin address.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|a| a.local_addr().ok())
    }

    /// Serves until `shutdown` resolves, then drains: listeners close at once (new connections
    /// are refused), `/ready` turns 503, in-flight requests get `runtime.drain_timeout`.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let (drain_tx, drain_rx) = watch::channel(false);
        let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
        let ready = Arc::new(AtomicBool::new(true));
        for l in self.listeners {
            tracing::info!(listener = %l.name, address = %l.local_addr(), "listening");
            tokio::spawn(listener::serve(
                l,
                self.shared.clone(),
                drain_rx.clone(),
                done_tx.clone(),
            ));
        }
        drop(done_tx);
        let (admin_stop_tx, admin_stop_rx) = watch::channel(false);
        if let Some(a) = self.admin {
            tracing::info!(address = %a.local_addr()?, "admin listening");
            let state = Arc::new(AdminState {
                metrics: self.shared.metrics.clone(),
                config: self.config.clone(),
                ready: ready.clone(),
            });
            tokio::spawn(admin::serve(a, state, admin_stop_rx));
        }
        shutdown.await;
        let deadline = self.config.runtime.drain_timeout;
        tracing::info!(deadline = ?deadline, "shutting down: draining connections");
        ready.store(false, Ordering::Relaxed);
        let _ = drain_tx.send(true);
        match tokio::time::timeout(deadline, done_rx.recv()).await {
            Ok(_) => tracing::info!("drained"),
            Err(_) => tracing::warn!("drain deadline passed; closing remaining connections"),
        }
        let _ = admin_stop_tx.send(true);
        Ok(())
    }
}
