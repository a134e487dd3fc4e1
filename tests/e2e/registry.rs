//! Filters from a real OCI registry (Debian's `docker-registry`, basic auth): pulled at start,
//! swapped when their tag moves (under load, with zero failed requests), pinned by digest,
//! published with `weir filter push`, and served from the disk cache when the registry is
//! down, or per the failure policy when there is no copy at all.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use weir_tests::client::Client;
use weir_tests::proxy::{TestProxy, ADMIN};
use weir_tests::registry::{TestRegistry, PASSWORD, USER};
use weir_tests::upstream::Upstream;

const SWAP_A: &str = env!("WEIR_FIXTURE_SWAP_A");
const SWAP_B: &str = env!("WEIR_FIXTURE_SWAP_B");

fn config(
    registry: &TestRegistry,
    cache: &Path,
    upstream: std::net::SocketAddr,
    reference: &str,
    policy: &str,
) -> String {
    format!(
        "{ADMIN}\n{}\n[[listeners]]\nname = \"web\"\naddress = \"127.0.0.1:0\"\n\
         filters = [{{ name = \"version\", file = \"{reference}\", failure_policy = \"{policy}\" }}]\n\
         [[routes]]\ncluster = \"c\"\n[clusters.c]\nendpoints = [\"{upstream}\"]\n",
        registry.config(cache, "100ms")
    )
}

async fn version_of(c: &mut Client) -> (u16, Option<String>) {
    let r = c.get("/", "x").await;
    let status = r.status().as_u16();
    let v = r
        .headers()
        .get("x-version")
        .map(|v| v.to_str().unwrap().to_string());
    let _ = weir_tests::collect(r.into_body()).await;
    (status, v)
}

async fn start(dir: &Path, toml: String) -> TestProxy {
    let file = dir.join(format!("weir-{}.toml", rand_suffix()));
    std::fs::write(&file, toml).unwrap();
    TestProxy::start_file(&file, Duration::from_millis(50)).await.0
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_pushed_20_times_under_load_swaps_with_no_failed_request() {
    let registry = TestRegistry::start(None).await;
    let up = Upstream::http1("up").start().await;
    let dir = tempfile::tempdir().unwrap();
    registry.push(Path::new(SWAP_A), "weir/version:live").await;
    let reference = format!("oci://{}/weir/version:live", registry.addr);
    let proxy = start(
        dir.path(),
        config(
            &registry,
            &dir.path().join("cache"),
            up.addr,
            &reference,
            "fail-closed",
        ),
    )
    .await;
    let addr = proxy.addr("web");

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, bad) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut loaders = Vec::new();
    for i in 0..4 {
        let (stop, ok, bad) = (stop.clone(), ok.clone(), bad.clone());
        loaders.push(tokio::spawn(async move {
            let mut c = if i % 2 == 0 {
                Client::h1(addr).await
            } else {
                Client::h2c(addr).await
            };
            while !stop.load(Ordering::Relaxed) {
                let req = http::Request::get("/")
                    .header("host", "x")
                    .body(weir_tests::empty())
                    .unwrap();
                let good = match c.send(req).await {
                    Ok(r) => {
                        let v: Vec<_> = r.headers().get_all("x-version").iter().cloned().collect();
                        let fine =
                            r.status() == 200 && v.len() == 1 && (v[0] == "swap-a" || v[0] == "swap-b");
                        fine && weir_tests::collect(r.into_body()).await.is_ok()
                    }
                    Err(_) => false,
                };
                if good {
                    ok.fetch_add(1, Ordering::Relaxed)
                } else {
                    bad.fetch_add(1, Ordering::Relaxed)
                };
            }
        }));
    }

    let mut probe = Client::h1(addr).await;
    assert_eq!(version_of(&mut probe).await, (200, Some("swap-a".into())));
    let mut took = Vec::new();
    for i in 0..20 {
        let (file, name) = if i % 2 == 0 {
            (SWAP_B, "swap-b")
        } else {
            (SWAP_A, "swap-a")
        };
        registry.push(Path::new(file), "weir/version:live").await;
        let t = Instant::now();
        loop {
            if version_of(&mut probe).await.1.as_deref() == Some(name) {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(15), "{name} never served");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        took.push(t.elapsed());
    }
    stop.store(true, Ordering::Relaxed);
    for l in loaders {
        l.await.unwrap();
    }
    took.sort();
    let (ok, bad) = (ok.load(Ordering::Relaxed), bad.load(Ordering::Relaxed));
    println!(
        "registry tag push: {} swaps, push to first new response: median {:?}, max {:?} (poll every 100 ms); {ok} requests served",
        took.len(),
        took[took.len() / 2],
        took[took.len() - 1]
    );
    assert_eq!(bad, 0, "no failed request during the swaps ({ok} succeeded)");
    // After the last push (swap-a), every new response carries it.
    for _ in 0..20 {
        assert_eq!(version_of(&mut probe).await, (200, Some("swap-a".into())));
    }
    let (_, filters) = proxy.admin_get("/filters").await;
    assert!(filters.contains(&reference), "{filters}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_digest_is_verified_and_the_cli_pushes_over_tls() {
    let pki = weir_tests::pki::Pki::new("registry");
    let leaf = pki.issue("registry", "registry", &["127.0.0.1"], None);
    let registry = TestRegistry::start_tls(&leaf, &pki.ca).await;
    let up = Upstream::http1("up").start().await;
    let dir = tempfile::tempdir().unwrap();
    // `weir filter push`, the way a user publishes a filter.
    let out = std::process::Command::new(crate::config_errors::weir_bin())
        .args(["filter", "push", SWAP_B])
        .arg(format!("oci://{}/weir/pinned:v1", registry.addr))
        .args(["--username", USER, "--ca"])
        .arg(&pki.ca)
        .env("WEIR_REGISTRY_PASSWORD", PASSWORD)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let digest = stdout
        .lines()
        .find_map(|l| l.strip_prefix("digest: "))
        .unwrap()
        .to_string();

    let pinned = format!("oci://{}/weir/pinned@{digest}", registry.addr);
    let proxy = start(
        dir.path(),
        config(
            &registry,
            &dir.path().join("cache"),
            up.addr,
            &pinned,
            "fail-closed",
        ),
    )
    .await;
    let mut c = Client::h1(proxy.addr("web")).await;
    assert_eq!(version_of(&mut c).await, (200, Some("swap-b".into())));
    drop(proxy);

    // A digest the registry does not have: nothing to serve, and the chain fails closed.
    let wrong = format!("oci://{}/weir/pinned@sha256:{}", registry.addr, "0".repeat(64));
    let proxy = start(
        dir.path(),
        config(
            &registry,
            &dir.path().join("cache2"),
            up.addr,
            &wrong,
            "fail-closed",
        ),
    )
    .await;
    let mut c = Client::h1(proxy.addr("web")).await;
    assert_eq!(version_of(&mut c).await.0, 500);
    let (_, filters) = proxy.admin_get("/filters").await;
    assert!(
        filters.contains("cannot pull, and no cached copy") && filters.contains(&wrong),
        "{filters}"
    );

    // A user without the right password is refused by the registry: the push fails clearly.
    let out = std::process::Command::new(crate::config_errors::weir_bin())
        .args(["filter", "push", SWAP_B])
        .arg(format!("oci://{}/weir/pinned:v2", registry.addr))
        .args(["--username", USER, "--ca"])
        .arg(&pki.ca)
        .env("WEIR_REGISTRY_PASSWORD", "wrong")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("push failed"));

    // Without the CA, the registry's certificate is not trusted: TLS is verified.
    let out = std::process::Command::new(crate::config_errors::weir_bin())
        .args(["filter", "push", SWAP_B])
        .arg(format!("oci://{}/weir/pinned:v3", registry.addr))
        .args(["--username", USER])
        .env("WEIR_REGISTRY_PASSWORD", PASSWORD)
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "an untrusted registry certificate is refused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_down_at_start_serves_from_cache_or_per_failure_policy() {
    let registry = TestRegistry::start(None).await;
    let up = Upstream::http1("up").start().await;
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    registry.push(Path::new(SWAP_A), "weir/version:v1").await;
    let reference = format!("oci://{}/weir/version:v1", registry.addr);
    let proxy = start(
        dir.path(),
        config(&registry, &cache, up.addr, &reference, "fail-closed"),
    )
    .await;
    let mut c = Client::h1(proxy.addr("web")).await;
    assert_eq!(version_of(&mut c).await, (200, Some("swap-a".into())));
    proxy.stop().await;

    // The registry goes away; a restart serves the cached copy.
    let port = registry.addr.port();
    let toml_cached = config(&registry, &cache, up.addr, &reference, "fail-closed");
    let toml_open = config(
        &registry,
        &dir.path().join("empty-cache"),
        up.addr,
        &reference,
        "fail-open",
    );
    let toml_closed = config(
        &registry,
        &dir.path().join("empty-cache2"),
        up.addr,
        &reference,
        "fail-closed",
    );
    drop(registry);
    let proxy = start(dir.path(), toml_cached).await;
    let mut c = Client::h1(proxy.addr("web")).await;
    assert_eq!(
        version_of(&mut c).await,
        (200, Some("swap-a".into())),
        "started from the cache"
    );
    drop(proxy);

    // No cache: the chain follows the entry's failure policy, and the error names the reference.
    let proxy = start(dir.path(), toml_open).await;
    let mut c = Client::h1(proxy.addr("web")).await;
    assert_eq!(
        version_of(&mut c).await,
        (200, None),
        "fail-open skips the missing filter"
    );
    drop(proxy);
    let proxy = start(dir.path(), toml_closed).await;
    let mut c = Client::h1(proxy.addr("web")).await;
    assert_eq!(version_of(&mut c).await.0, 500, "fail-closed answers 500");
    let (_, filters) = proxy.admin_get("/filters").await;
    assert!(filters.contains(&reference), "{filters}");

    // The registry comes back: the next poll pulls, and the filter serves.
    let registry = TestRegistry::start(Some(port)).await;
    registry.push(Path::new(SWAP_B), "weir/version:v1").await;
    let t = Instant::now();
    while version_of(&mut c).await != (200, Some("swap-b".into())) {
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "the filter never became available"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
