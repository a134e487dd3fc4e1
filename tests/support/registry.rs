//! A real OCI registry for tests: Debian's `docker-registry` (the CNCF distribution server),
//! started on a loopback port with its own config and storage, with htpasswd basic auth, and
//! killed when dropped.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The user and password the test registry accepts.
pub const USER: &str = "weir";
/// See [`USER`].
pub const PASSWORD: &str = "s3cret-for-tests";

/// A running registry.
pub struct TestRegistry {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The CA its TLS certificate chains to, when it serves TLS.
    pub ca: Option<std::path::PathBuf>,
    child: Child,
    _dir: tempfile::TempDir,
}

impl TestRegistry {
    /// Starts a plain-HTTP registry on a fresh port (or on `port`, to bring one back at the
    /// same address).
    pub async fn start(port: Option<u16>) -> TestRegistry {
        Self::start_with(port, None).await
    }

    /// Starts a registry serving TLS with `leaf` (issued for 127.0.0.1 by the CA `ca`).
    pub async fn start_tls(leaf: &crate::pki::Leaf, ca: &Path) -> TestRegistry {
        let mut r = Self::start_with(None, Some(leaf)).await;
        r.ca = Some(ca.to_path_buf());
        r
    }

    async fn start_with(port: Option<u16>, tls: Option<&crate::pki::Leaf>) -> TestRegistry {
        let bin = ["/usr/bin/docker-registry", "/usr/sbin/docker-registry"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("docker-registry missing: `apt-get install docker-registry` (the test command does)");
        let dir = tempfile::tempdir().unwrap();
        let port = port.unwrap_or_else(crate::unused_port);
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let hash = bcrypt::hash(PASSWORD, 5).unwrap();
        std::fs::write(dir.path().join("htpasswd"), format!("{USER}:{hash}\n")).unwrap();
        let mut config = format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
             auth:\n  htpasswd:\n    realm: weir-tests\n    path: {}\nhttp:\n  addr: {addr}\n",
            dir.path().join("data").display(),
            dir.path().join("htpasswd").display()
        );
        if let Some(leaf) = tls {
            config.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                leaf.cert.display(),
                leaf.key.display()
            ));
        }
        let cfg = dir.path().join("config.yml");
        std::fs::write(&cfg, config).unwrap();
        let child = Command::new(bin)
            .arg("serve")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start docker-registry");
        let start = Instant::now();
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "docker-registry did not start"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        TestRegistry {
            addr,
            ca: None,
            child,
            _dir: dir,
        }
    }

    /// The `[registry]` table for a proxy using this registry.
    pub fn config(&self, cache: &Path, poll: &str) -> String {
        format!(
            "[registry]\ncache_dir = \"{}\"\npoll_interval = \"{poll}\"\ntimeout = \"5s\"\n\
             [registry.hosts.\"{}\"]\n{}\nusername = \"{USER}\"\npassword = \"{PASSWORD}\"\n",
            cache.display(),
            self.addr,
            match &self.ca {
                Some(ca) => format!("ca = \"{}\"", ca.display()),
                None => "insecure = true".to_string(),
            }
        )
    }

    /// Pushes a component to `oci://ADDR/REPO:TAG`; returns the manifest digest.
    pub async fn push(&self, file: &Path, repo_tag: &str) -> String {
        let opts = weir::registry::PushOptions {
            insecure: self.ca.is_none(),
            ca: self.ca.clone(),
            username: Some(USER.into()),
            password: Some(PASSWORD.into()),
            token: None,
        };
        weir::registry::push(file, &format!("oci://{}/{repo_tag}", self.addr), opts)
            .await
            .unwrap_or_else(|e| panic!("push {repo_tag}: {e:#}"))
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
