//! Hot reload from the filter directory and the config file: filters swapped under load with
//! zero failed requests, bad files refused while the good version serves on, Kubernetes
//! ConfigMap-style `..data` symlink swaps, config changes (routes, listener addresses) and
//! certificate rotation, all without a restart.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use weir_tests::client::{tls_connect, Client, Waiting};
use weir_tests::pki::{client_config, peer_cn, Pki};
use weir_tests::proxy::{TestProxy, ADMIN};
use weir_tests::upstream::Upstream;

const SWAP_A: &str = env!("WEIR_FIXTURE_SWAP_A");
const SWAP_B: &str = env!("WEIR_FIXTURE_SWAP_B");
const DEBOUNCE: Duration = Duration::from_millis(50);

/// Replaces `dst` the way deploy tools do: write beside it, then rename over it.
fn replace(dst: &Path, bytes: &[u8]) {
    let tmp = dst.with_extension("tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, dst).unwrap();
}

fn config(upstream: std::net::SocketAddr, filter_file: &str) -> String {
    format!(
        "{ADMIN}\n[filter_host]\ndir = \"filters\"\n[[listeners]]\nname = \"web\"\naddress = \"127.0.0.1:0\"\n\
         filters = [{{ name = \"version\", file = \"{filter_file}\" }}]\n\
         [[routes]]\ncluster = \"c\"\n[clusters.c]\nendpoints = [\"{upstream}\"]\n"
    )
}

async fn version_of(c: &mut Client) -> Option<String> {
    let r = c.get("/", "x").await;
    let v = r
        .headers()
        .get("x-version")
        .map(|v| v.to_str().unwrap().to_string());
    let _ = weir_tests::collect(r.into_body()).await;
    v
}

/// Polls until a fresh request sees `want`; returns how long it took.
async fn wait_for_version(c: &mut Client, want: &str, since: Instant) -> Duration {
    loop {
        if version_of(c).await.as_deref() == Some(want) {
            return since.elapsed();
        }
        assert!(since.elapsed() < Duration::from_secs(10), "{want} never served");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

async fn metric(proxy: &TestProxy, line_start: &str) -> Option<u64> {
    let (_, m) = proxy.admin_get("/metrics").await;
    m.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

async fn wait_reload_errors(proxy: &TestProxy, want: u64) {
    let start = Instant::now();
    while metric(proxy, "weir_reload_total{result=\"error\"}").await != Some(want) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no reload error counted"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_swapped_20_times_under_load_fails_no_request() {
    let up = Upstream::http1("up").start().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("filters")).unwrap();
    let target = dir.path().join("filters/version.wasm");
    let (a, b) = (std::fs::read(SWAP_A).unwrap(), std::fs::read(SWAP_B).unwrap());
    std::fs::write(&target, &a).unwrap();
    std::fs::write(dir.path().join("weir.toml"), config(up.addr, "version.wasm")).unwrap();
    let (proxy, _) = TestProxy::start_file(&dir.path().join("weir.toml"), DEBOUNCE).await;
    let addr = proxy.addr("web");

    // Steady load: 6 keep-alive clients (HTTP/1.1 and h2c) until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, bad) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut loaders = Vec::new();
    for i in 0..6 {
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
                match c.send(req).await {
                    Ok(r) => {
                        let versions: Vec<_> = r.headers().get_all("x-version").iter().collect();
                        let good = r.status() == 200
                            && versions.len() == 1
                            && (versions[0] == "swap-a" || versions[0] == "swap-b");
                        let body = weir_tests::collect(r.into_body()).await;
                        if good && body.is_ok() {
                            ok.fetch_add(1, Ordering::Relaxed);
                        } else {
                            bad.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(_) => {
                        bad.fetch_add(1, Ordering::Relaxed);
                        c = if i % 2 == 0 {
                            Client::h1(addr).await
                        } else {
                            Client::h2c(addr).await
                        };
                    }
                }
            }
        }));
    }

    let mut probe = Client::h1(addr).await;
    assert_eq!(version_of(&mut probe).await.as_deref(), Some("swap-a"));
    let mut took = Vec::new();
    for i in 0..20 {
        let (bytes, name) = if i % 2 == 0 {
            (&b, "swap-b")
        } else {
            (&a, "swap-a")
        };
        let t = Instant::now();
        replace(&target, bytes);
        took.push(wait_for_version(&mut probe, name, t).await);
    }
    stop.store(true, Ordering::Relaxed);
    for l in loaders {
        l.await.unwrap();
    }
    let (ok, bad) = (ok.load(Ordering::Relaxed), bad.load(Ordering::Relaxed));
    took.sort();
    println!(
        "filter file swap: {} swaps, write to first new response: median {:?}, max {:?}; {ok} requests served during the swaps",
        took.len(),
        took[took.len() / 2],
        took[took.len() - 1]
    );
    assert_eq!(
        bad, 0,
        "no request failed or carried a wrong version ({ok} succeeded)"
    );
    assert!(ok > 200, "the load was steady: {ok} requests");
    // After the last swap (back to a), every new response carries a.
    for _ in 0..20 {
        assert_eq!(version_of(&mut probe).await.as_deref(), Some("swap-a"));
    }
    let (_, filters) = proxy.admin_get("/filters").await;
    let v: serde_json::Value = serde_json::from_str(&filters).unwrap();
    assert_eq!(v["generation"], 21, "{filters}");
    assert_eq!(v["filters"][0]["name"], "version");
    assert_eq!(v["filters"][0]["generation"], 21);
    assert!(v["filters"][0]["digest"].as_str().unwrap().starts_with("sha256:"));
    assert_eq!(metric(&proxy, "weir_reload_total{result=\"ok\"}").await, Some(20));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_filter_file_never_replaces_the_good_one() {
    let up = Upstream::http1("up").start().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("filters")).unwrap();
    let target = dir.path().join("filters/version.wasm");
    std::fs::copy(SWAP_A, &target).unwrap();
    std::fs::write(dir.path().join("weir.toml"), config(up.addr, "version.wasm")).unwrap();
    let (proxy, _) = TestProxy::start_file(&dir.path().join("weir.toml"), DEBOUNCE).await;
    let mut c = Client::h1(proxy.addr("web")).await;
    assert_eq!(version_of(&mut c).await.as_deref(), Some("swap-a"));

    let cases: [(&[u8], &str); 3] = [
        (b"this is not wasm", "not a WebAssembly file"),
        (b"\0asm\x01\0\0\0", "a core Wasm module, not a component"),
        (b"\0asm\x0d\0\x01\0garbage", "does not compile as a component"),
    ];
    for (i, (bytes, why)) in cases.iter().enumerate() {
        replace(&target, bytes);
        wait_reload_errors(&proxy, i as u64 + 1).await;
        assert_eq!(
            version_of(&mut c).await.as_deref(),
            Some("swap-a"),
            "the good version stays in service"
        );
        let (_, filters) = proxy.admin_get("/filters").await;
        let v: serde_json::Value = serde_json::from_str(&filters).unwrap();
        let err = v["filters"][0]["last_error"].as_str().unwrap_or_default();
        assert!(err.contains(why), "the error says why: {err}");
        assert!(err.contains("version.wasm"), "the error names the file: {err}");
        assert!(v["last_error"].as_str().unwrap_or_default().contains(why));
    }
    replace(&target, &std::fs::read(SWAP_B).unwrap());
    wait_for_version(&mut c, "swap-b", Instant::now()).await;
    // The status is written as the reload finishes, just after the swap is in service.
    let start = Instant::now();
    loop {
        let (_, filters) = proxy.admin_get("/filters").await;
        let v: serde_json::Value = serde_json::from_str(&filters).unwrap();
        if v["filters"][0]["last_error"].is_null() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "a good version clears the error: {filters}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // A config that does not validate keeps the running config.
    std::fs::write(dir.path().join("weir.toml"), "[[listeners]]\nname = 3\n").unwrap();
    wait_reload_errors(&proxy, 4).await;
    let (_, filters) = proxy.admin_get("/filters").await;
    assert!(
        filters.contains("weir.toml"),
        "the config error names the file: {filters}"
    );
    assert_eq!(version_of(&mut c).await.as_deref(), Some("swap-b"));
}

/// Lays out `files` as Kubernetes mounts a ConfigMap: in a timestamped directory, reached
/// through the `..data` symlink, with one symlink per file at the top.
fn configmap_update(top: &Path, generation: u32, files: &[(&str, Vec<u8>)]) {
    let ts = format!("..2026_11_25_00_00_{generation:02}.000000001");
    let data_dir = top.join(&ts);
    std::fs::create_dir(&data_dir).unwrap();
    for (name, bytes) in files {
        std::fs::write(data_dir.join(name), bytes).unwrap();
    }
    let tmp = top.join("..data_tmp");
    std::os::unix::fs::symlink(&ts, &tmp).unwrap();
    let old = std::fs::read_link(top.join("..data")).ok();
    std::fs::rename(&tmp, top.join("..data")).unwrap();
    for (name, _) in files {
        let link = top.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(PathBuf::from("..data").join(name), &link).unwrap();
        }
    }
    if let Some(old) = old {
        std::fs::remove_dir_all(top.join(old)).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configmap_symlink_swap_reloads_config_and_filter() {
    let one = Upstream::http1("one").start().await;
    let two = Upstream::http1("two").start().await;
    let top = tempfile::tempdir().unwrap();
    let toml = |cluster: &str| {
        format!(
            "{ADMIN}\n[filter_host]\ndir = \".\"\n[[listeners]]\nname = \"web\"\naddress = \"127.0.0.1:0\"\n\
             filters = [{{ name = \"version\", file = \"version.wasm\" }}]\n\
             [[routes]]\ncluster = \"{cluster}\"\n[clusters.one]\nendpoints = [\"{}\"]\n[clusters.two]\nendpoints = [\"{}\"]\n",
            one.addr, two.addr
        )
        .into_bytes()
    };
    configmap_update(
        top.path(),
        1,
        &[
            ("weir.toml", toml("one")),
            ("version.wasm", std::fs::read(SWAP_A).unwrap()),
        ],
    );
    let (proxy, _) = TestProxy::start_file(&top.path().join("weir.toml"), DEBOUNCE).await;
    let mut c = Client::h1(proxy.addr("web")).await;
    let r = c.get("/", "x").await;
    assert_eq!(
        (
            r.headers()["x-upstream"].to_str().unwrap(),
            r.headers()["x-version"].to_str().unwrap()
        ),
        ("one", "swap-a")
    );

    configmap_update(
        top.path(),
        2,
        &[
            ("weir.toml", toml("two")),
            ("version.wasm", std::fs::read(SWAP_B).unwrap()),
        ],
    );
    wait_for_version(&mut c, "swap-b", Instant::now()).await;
    let r = c.get("/", "x").await;
    assert_eq!(
        r.headers()["x-upstream"],
        "two",
        "the new config is in service too"
    );
    // The reload is counted as it finishes, just after the swap new requests already see.
    let start = Instant::now();
    while metric(&proxy, "weir_reload_total{result=\"ok\"}").await != Some(1) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the reload was not counted"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(DEBOUNCE * 4).await;
    assert_eq!(
        metric(&proxy, "weir_reload_total{result=\"ok\"}").await,
        Some(1),
        "one update, one reload"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_changes_move_listeners_and_rotate_certificates() {
    let pki = Pki::new("rotate");
    let first = pki.issue("first", "first-cert", &["proxy.test"], None);
    let second = pki.issue("second", "second-cert", &["proxy.test"], None);
    let served = pki.dir().join("served");
    std::fs::create_dir(&served).unwrap();
    std::fs::copy(&first.cert, served.join("cert.pem")).unwrap();
    std::fs::copy(&first.key, served.join("key.pem")).unwrap();
    let up = Upstream::http1("up").start().await;
    let (p1, p2) = (weir_tests::unused_port(), weir_tests::unused_port());
    let toml = |port: u16| {
        format!(
            "{ADMIN}\n[[listeners]]\nname = \"tls\"\naddress = \"127.0.0.1:{port}\"\n\
             tls = {{ cert = \"served/cert.pem\", key = \"served/key.pem\" }}\n\
             [[routes]]\ncluster = \"c\"\n[clusters.c]\nendpoints = [\"{}\"]\n",
            up.addr
        )
    };
    let file = pki.dir().join("weir.toml");
    std::fs::write(&file, toml(p1)).unwrap();
    let (proxy, _) = TestProxy::start_file(&file, DEBOUNCE).await;
    let cfg = client_config(&pki.ca, &[b"http/1.1"], None);
    let at = |port: u16| std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let s = tls_connect(at(p1), "proxy.test", cfg.clone()).await.unwrap();
    assert_eq!(peer_cn(&s), "first-cert");
    // A connection open before the rotation keeps working after it.
    let mut open = Client::tls(at(p1), "proxy.test", cfg.clone()).await.unwrap();

    // Rotation: new certificate files, same config.
    replace(&served.join("key.pem"), &std::fs::read(&second.key).unwrap());
    replace(&served.join("cert.pem"), &std::fs::read(&second.cert).unwrap());
    let start = Instant::now();
    loop {
        let s = tls_connect(at(p1), "proxy.test", cfg.clone()).await.unwrap();
        if peer_cn(&s) == "second-cert" {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the certificate was not rotated"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(open.get("/", "proxy.test").await.status(), 200);

    // A new address: the listener moves; the old port stops accepting.
    std::fs::write(&file, toml(p2)).unwrap();
    let start = Instant::now();
    while tokio::net::TcpStream::connect(at(p2)).await.is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the listener did not move"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut c = Client::tls(at(p2), "proxy.test", cfg.clone()).await.unwrap();
    assert_eq!(c.get("/", "proxy.test").await.status(), 200);
    let start = Instant::now();
    while tokio::net::TcpStream::connect(at(p1)).await.is_ok() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the old address still accepts"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(proxy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unchanged_directory_is_not_reloaded() {
    // A reload reads every input; the watcher once took those reads for changes and reloaded
    // in a loop, hashing every filter file ten times a second.
    let up = Upstream::http1("up").start().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("filters")).unwrap();
    std::fs::create_dir(dir.path().join("keys")).unwrap();
    std::fs::write(dir.path().join("keys/list.txt"), "k1\n").unwrap();
    std::fs::write(
        dir.path().join("filters/version.wasm"),
        std::fs::read(SWAP_A).unwrap(),
    )
    .unwrap();
    let toml = config(up.addr, "version.wasm").replace(
        "file = \"version.wasm\" }",
        "file = \"version.wasm\", files = \"keys\" }",
    );
    std::fs::write(dir.path().join("weir.toml"), toml).unwrap();
    let (proxy, control) = TestProxy::start_file(&dir.path().join("weir.toml"), DEBOUNCE).await;
    let mut c = Client::h1(proxy.addr("web")).await;
    assert_eq!(version_of(&mut c).await.as_deref(), Some("swap-a"));

    // One change: one reload. Written beside the config (not an input) and renamed into the
    // mounted directory, where every file counts: a temporary file there is a change of its
    // own when the writer is paused past the debounce between write and rename.
    let tmp = dir.path().join("list.tmp");
    std::fs::write(&tmp, b"k1\nk2\n").unwrap();
    std::fs::rename(&tmp, dir.path().join("keys/list.txt")).unwrap();
    let start = Instant::now();
    while control.status().attempts == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the change was not seen"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Then quiet for 20 debounce periods, with traffic: no more reloads.
    let settled = Instant::now();
    while settled.elapsed() < DEBOUNCE * 20 {
        assert_eq!(version_of(&mut c).await.as_deref(), Some("swap-a"));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(control.status().attempts, 1, "reloads without a change");

    // Files that are not inputs, in watched directories (a log beside the config, a build's
    // by-products beside the filters), are not changes either.
    for i in 0..5 {
        std::fs::write(dir.path().join("weir.log"), format!("line {i}\n")).unwrap();
        std::fs::write(dir.path().join("filters/version.d"), format!("dep {i}\n")).unwrap();
        tokio::time::sleep(DEBOUNCE * 2).await;
    }
    tokio::time::sleep(DEBOUNCE * 4).await;
    assert_eq!(
        control.status().attempts,
        1,
        "reloads for files that are not inputs"
    );
    // While a real one still is.
    replace(
        &dir.path().join("filters/version.wasm"),
        &std::fs::read(SWAP_B).unwrap(),
    );
    let start = Instant::now();
    while version_of(&mut c).await.as_deref() != Some("swap-b") {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the new filter was not loaded"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reloaded_connection_cap_takes_effect() {
    // Limits reload, but the cap was sized once: raising max_connections did nothing until
    // a restart.
    let up = Upstream::http1("up").start().await;
    let dir = tempfile::tempdir().unwrap();
    let port = weir_tests::unused_port();
    let toml = |cap: usize| {
        format!(
            "{ADMIN}\n[[listeners]]\nname = \"web\"\naddress = \"127.0.0.1:{port}\"\n\
             limits = {{ max_connections = {cap} }}\n\
             [[routes]]\ncluster = \"c\"\n[clusters.c]\nendpoints = [\"{}\"]\n",
            up.addr
        )
    };
    let file = dir.path().join("weir.toml");
    std::fs::write(&file, toml(1)).unwrap();
    let (proxy, _) = TestProxy::start_file(&file, DEBOUNCE).await;
    let addr = proxy.addr("web");
    let mut first = Client::h1(addr).await;
    assert_eq!(first.get("/", "x").await.status(), 200);
    let second = Waiting::start(addr, "at the cap of 1, a second connection waits").await;
    replace(&file, toml(2).as_bytes());
    assert_eq!(second.served("served once the reload raised the cap").await, 200);
    assert_eq!(first.get("/", "x").await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_renames_listeners_and_trades_their_addresses() {
    // The new name's socket at an address the old name still listens on cannot be bound:
    // the listener that takes over the address takes over the old one's socket.
    let up = Upstream::http1("up").start().await;
    let (p1, p2) = (weir_tests::unused_port(), weir_tests::unused_port());
    let at = |port: u16| std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let toml = |a: &str, pa: u16, b: &str, pb: u16| {
        format!(
            "{ADMIN}\n[[listeners]]\nname = \"{a}\"\naddress = \"127.0.0.1:{pa}\"\n\
             [[listeners]]\nname = \"{b}\"\naddress = \"127.0.0.1:{pb}\"\n\
             [[routes]]\ncluster = \"c\"\n[clusters.c]\nendpoints = [\"{}\"]\n",
            up.addr
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("weir.toml");
    std::fs::write(&file, toml("a", p1, "b", p2)).unwrap();
    let (proxy, _) = TestProxy::start_file(&file, DEBOUNCE).await;
    // A keep-alive connection, idle when the listener it came through is renamed.
    let mut open = tokio::net::TcpStream::connect(at(p1)).await.unwrap();
    open.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = open.read(&mut buf).await.unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );

    let reloaded = |n: u64| {
        let proxy = &proxy;
        async move {
            let start = Instant::now();
            while metric(proxy, "weir_reload_total{result=\"ok\"}").await != Some(n) {
                assert_eq!(
                    metric(proxy, "weir_reload_total{result=\"error\"}")
                        .await
                        .unwrap_or(0),
                    0,
                    "the reload failed"
                );
                assert!(start.elapsed() < Duration::from_secs(10), "no reload");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    let served_by = |name: &'static str, port: u16| {
        let proxy = &proxy;
        async move {
            let line = format!("weir_listener_connections_total{{listener=\"{name}\"}}");
            let before = metric(proxy, &line).await.unwrap_or(0);
            assert_eq!(Client::h1(at(port)).await.get("/", "x").await.status(), 200);
            assert_eq!(metric(proxy, &line).await, Some(before + 1), "{name} at {port}");
        }
    };

    // Renamed, same addresses.
    std::fs::write(&file, toml("web", p1, "api", p2)).unwrap();
    reloaded(1).await;
    // The old listener's connections are drained (closed once idle), as Envoy drains a
    // removed listener's: their requests would find its config gone.
    // (Well within the 10 s in which hyper closes a connection waiting for a request head.)
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        while open.read(&mut buf).await.unwrap_or(0) > 0 {}
    });
    closed
        .await
        .expect("the old listener's idle connection was closed");
    served_by("web", p1).await;
    served_by("api", p2).await;
    // The two trade addresses.
    std::fs::write(&file, toml("web", p2, "api", p1)).unwrap();
    reloaded(2).await;
    served_by("web", p2).await;
    served_by("api", p1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_before_serving_move_and_rename_listeners_too() {
    // An embedder may reload before `run`: the listeners are then bound but not serving.
    // Moving one and then renaming it at its new address once handed over the socket of the
    // first address, which the stopped listener still held.
    weir_tests::init();
    let up = Upstream::http1("up").start().await;
    let (px, py) = (weir_tests::unused_port(), weir_tests::unused_port());
    let at = |port: u16| std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let toml = |name: &str, port: u16| {
        format!(
            "[admin]\nenabled = false\n[[listeners]]\nname = \"{name}\"\naddress = \"127.0.0.1:{port}\"\n\
             [[routes]]\ncluster = \"c\"\n[clusters.c]\nendpoints = [\"{}\"]\n",
            up.addr
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("weir.toml");
    std::fs::write(&file, toml("a", px)).unwrap();
    let proxy = weir::Proxy::bind_file(file.clone()).await.unwrap();
    std::fs::write(&file, toml("a", py)).unwrap();
    proxy.reload().await.unwrap();
    std::fs::write(&file, toml("b", py)).unwrap();
    proxy.reload().await.unwrap();
    assert_eq!(proxy.listener_addr("b"), Some(at(py)));
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(proxy.run(async move {
        let _ = rx.await;
    }));
    assert_eq!(Client::h1(at(py)).await.get("/", "x").await.status(), 200);
    assert!(
        tokio::net::TcpStream::connect(at(px)).await.is_err(),
        "the first address is closed"
    );
    let _ = tx.send(());
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_has_not_spoken_yet_when_its_listener_goes_gets_an_answer() {
    // A stopped listener drains its connections. One accepted but not yet heard from sits in
    // the HTTP/1-or-2 detection, which, asked to shut down, closed it with no answer; the
    // request it then sends gets one, and the connection closes after it. (Its listener's
    // config is gone: 503 `listener-gone`, which a client may retry on a new connection.)
    let up = Upstream::http1("up").start().await;
    let port = weir_tests::unused_port();
    let toml = |name: &str| {
        format!(
            "{ADMIN}\n[[listeners]]\nname = \"{name}\"\naddress = \"127.0.0.1:{port}\"\n\
             [[routes]]\ncluster = \"c\"\n[clusters.c]\nendpoints = [\"{}\"]\n",
            up.addr
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("weir.toml");
    std::fs::write(&file, toml("a")).unwrap();
    let (proxy, _) = TestProxy::start_file(&file, DEBOUNCE).await;
    let mut quiet = tokio::net::TcpStream::connect(proxy.addr("a")).await.unwrap();
    // Accepted, not yet heard from, when the reload renames its listener.
    tokio::time::sleep(Duration::from_millis(100)).await;
    std::fs::write(&file, toml("b")).unwrap();
    let start = Instant::now();
    while metric(&proxy, "weir_reload_total{result=\"ok\"}").await != Some(1) {
        assert!(start.elapsed() < Duration::from_secs(10), "no reload");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    quiet
        .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), quiet.read_to_end(&mut got)).await;
    let got = String::from_utf8_lossy(&got);
    assert!(got.starts_with("HTTP/1.1 503"), "{got:?}");
    assert!(got.contains("x-weir-error: listener-gone"), "{got:?}");
    assert!(got.to_ascii_lowercase().contains("connection: close"), "{got:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_reload_leaves_the_filters_calling_the_clusters_in_service() {
    // The build of a reload repointed the filters' view of the clusters before the reload
    // was known to succeed: after a reload that failed (its new listener's address was
    // taken), the running filter called the failed config's clusters, and one it removed
    // was gone.
    weir_tests::init();
    let up = Upstream::http1("up").start().await;
    let idp = Upstream::http1("idp").start().await;
    let port = weir_tests::unused_port();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = taken.local_addr().unwrap();
    let policy = env!("WEIR_FIXTURE_POLICY");
    let toml = |broken: bool| {
        let (extra, idp) = if broken {
            (
                format!("[[listeners]]\nname = \"taken\"\naddress = \"{taken}\"\n"),
                String::new(),
            )
        } else {
            (
                String::new(),
                format!("[clusters.idp]\nendpoints = [\"{}\"]\n", idp.addr),
            )
        };
        format!(
            "[admin]\nenabled = false\n[[listeners]]\nname = \"web\"\naddress = \"127.0.0.1:{port}\"\n\
             filters = [{{ name = \"policy\", file = \"{policy}\", config = {{ value = \"yes\", deny_path = \"/admin\" }} }}]\n\
             {extra}[[routes]]\ncluster = \"c\"\n[clusters.c]\nendpoints = [\"{}\"]\n{idp}",
            up.addr
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("weir.toml");
    std::fs::write(&file, toml(false)).unwrap();
    let (proxy, control) = TestProxy::start_file(&file, DEBOUNCE).await;
    let addr = proxy.addr("web");
    let call = || async move {
        let mut c = Client::h1(addr).await;
        c.send_text("GET", "/headers", "x", &[("x-call", "idp")]).await
    };
    let r = call().await;
    assert!(r.body().contains("x-call-status: 200"), "{}", r.body());
    std::fs::write(&file, toml(true)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let err = loop {
        if let Some(e) = control.status().last_error {
            break e;
        }
        assert!(Instant::now() < deadline, "the broken config was never tried");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(err.contains(&taken.to_string()), "{err}");
    let r = call().await;
    assert_eq!(r.status(), 200, "{}", r.body());
    assert!(r.body().contains("x-call-status: 200"), "{}", r.body());
}
