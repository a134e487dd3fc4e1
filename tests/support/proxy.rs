//! Starting Weir in-process for a test: TOML text in, addresses out, stopped on drop.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;

use tokio::sync::oneshot;
use weir::filter::FilterChain;

/// A running proxy.
pub struct TestProxy {
    addrs: HashMap<String, SocketAddr>,
    /// The admin address.
    pub admin: Option<SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestProxy {
    /// Parses `toml` (relative paths resolve against `dir`), binds and serves.
    pub async fn start(toml: &str, dir: &Path) -> TestProxy {
        Self::start_with(toml, dir, HashMap::new()).await
    }

    /// As [`TestProxy::start`], with filter chains per listener.
    pub async fn start_with(toml: &str, dir: &Path, chains: HashMap<String, FilterChain>) -> TestProxy {
        crate::init();
        let config =
            weir::Config::from_toml(toml, "weir.toml", dir).unwrap_or_else(|e| panic!("config: {e}"));
        let names: Vec<String> = config.listeners.iter().map(|l| l.name.clone()).collect();
        let proxy = weir::Proxy::bind_with_chains(config, chains)
            .await
            .expect("bind proxy");
        let addrs = names
            .iter()
            .map(|n| (n.clone(), proxy.listener_addr(n).unwrap()))
            .collect();
        let admin = proxy.admin_addr();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(proxy.run(async move {
            let _ = rx.await;
        }));
        TestProxy {
            addrs,
            admin,
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// Loads the config file at `path` and serves it with hot reload on (the way `weir run`
    /// does), reloading after `debounce` of quiet.
    pub async fn start_file(
        path: &Path,
        debounce: std::time::Duration,
    ) -> (TestProxy, std::sync::Arc<weir::reload::Control>) {
        crate::init();
        let proxy = weir::Proxy::bind_file(path.to_path_buf())
            .await
            .expect("bind proxy")
            .watch(debounce);
        let control = proxy.control();
        let names: Vec<String> = control
            .config
            .load()
            .listeners
            .iter()
            .map(|l| l.name.clone())
            .collect();
        let addrs = names
            .iter()
            .map(|n| (n.clone(), proxy.listener_addr(n).unwrap()))
            .collect();
        let admin = proxy.admin_addr();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(proxy.run(async move {
            let _ = rx.await;
        }));
        (
            TestProxy {
                addrs,
                admin,
                stop: Some(tx),
                task: Some(task),
            },
            control,
        )
    }

    /// The address of listener `name`.
    pub fn addr(&self, name: &str) -> SocketAddr {
        self.addrs[name]
    }

    /// Triggers shutdown and waits for the drain to finish; re-raises a proxy error.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.expect("proxy task panicked").expect("proxy failed");
        }
    }

    /// GET on the admin API: (status, body).
    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        let addr = self.admin.expect("admin enabled");
        let mut c = crate::client::Client::h1(addr).await;
        let r = c.get(path, "admin").await;
        let status = r.status().as_u16();
        (
            status,
            String::from_utf8_lossy(&crate::collect(r.into_body()).await.unwrap()).into_owned(),
        )
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// The admin block every test config uses: on, on a fresh port.
pub const ADMIN: &str = "[admin]\naddress = \"127.0.0.1:0\"\n[log]\naccess_log = false\n";

/// The config most tests need: listener `web` on a fresh port routing everything to cluster
/// `c` at `upstream`. `listener` lines are added to the listener table, `cluster` lines to the
/// cluster table.
pub fn one_route(upstream: std::net::SocketAddr, listener: &str, cluster: &str) -> String {
    format!(
        "{ADMIN}\n[[listeners]]\nname = \"web\"\naddress = \"127.0.0.1:0\"\n{listener}\n\
         [[routes]]\ncluster = \"c\"\n[clusters.c]\nendpoints = [\"{upstream}\"]\n{cluster}\n"
    )
}

/// Starts a proxy with [`one_route`]'s config.
pub async fn start_one_route(upstream: std::net::SocketAddr, listener: &str, cluster: &str) -> TestProxy {
    TestProxy::start(&one_route(upstream, listener, cluster), Path::new(".")).await
}
