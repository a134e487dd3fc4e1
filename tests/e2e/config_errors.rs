//! Each kind of config error gives a message naming the file, the field and why; `weir check`
//! exits non-zero with it.

use std::path::{Path, PathBuf};
use std::process::Command;

use weir_tests::pki::Pki;

/// The `weir` binary, built next to this test binary by `cargo test --workspace` (weir's own
/// integration test, `proxy/tests/cli.rs`, makes cargo build it).
pub fn weir_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let bin = dir.join(format!("weir{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "{} missing: build it with `cargo build -p weir` (`cargo test --workspace` does)",
        bin.display()
    );
    bin
}

/// A `weir` process serving `toml`, written to a temporary directory with the process's log
/// (stderr) beside it. Killed when dropped, if it is still running.
pub struct WeirProcess {
    /// The process.
    pub child: std::process::Child,
    /// Its log file.
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

impl WeirProcess {
    /// Starts `weir run` on `toml`.
    pub fn start(toml: &str) -> WeirProcess {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("weir.toml");
        std::fs::write(&cfg, toml).unwrap();
        let log = dir.path().join("weir.log");
        let child = Command::new(weir_bin())
            .args(["run", "-c"])
            .arg(&cfg)
            .stderr(std::process::Stdio::from(std::fs::File::create(&log).unwrap()))
            .spawn()
            .unwrap();
        WeirProcess {
            child,
            log,
            _dir: dir,
        }
    }

    /// The address it bound for `listener` (the admin listener for `None`).
    pub async fn address(&mut self, listener: Option<&str>) -> std::net::SocketAddr {
        bound_address(&mut self.child, &self.log, listener).await
    }

    /// Sends it SIGTERM.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for WeirProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The address a `weir` process bound, read from its JSON log (`"listening"` for a listener by
/// name, `"admin listening"` for the admin one): the config asks for port 0, so no port is
/// picked by the test and released for someone else to take first. Waits up to 20 s, and
/// fails early with the log if the process exited.
pub async fn bound_address(
    child: &mut std::process::Child,
    log: &Path,
    listener: Option<&str>,
) -> std::net::SocketAddr {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let found = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| match listener {
                Some(name) => v["message"] == "listening" && v["listener"] == name,
                None => v["message"] == "admin listening",
            });
        if let Some(addr) = found.as_ref().and_then(|v| v["address"].as_str()) {
            return addr.parse().expect("a socket address in the log");
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("weir exited ({status}) before listening:\n{text}");
        }
        assert!(
            std::time::Instant::now() < deadline,
            "weir did not log its address within 20 s:\n{text}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

const BASE: &str = r#"
[[listeners]]
name = "web"
address = "127.0.0.1:0"

[[routes]]
cluster = "app"

[clusters.app]
endpoints = ["127.0.0.1:9000"]
"#;

fn check(text: &str, dir: &Path) -> (bool, String) {
    let file = dir.join("weir.toml");
    std::fs::write(&file, text).unwrap();
    let out = Command::new(weir_bin())
        .args(["check", "-c"])
        .arg(&file)
        .output()
        .unwrap();
    let msg = String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        assert_eq!(out.status.code(), Some(64), "bad config exits 64: {msg}");
    }
    (out.status.success(), msg)
}

#[test]
fn each_kind_of_config_error_names_file_field_and_reason() {
    let pki = Pki::new("cfg");
    let leaf = pki.issue("ok", "ok", &["ok.test"], None);
    let other = pki.issue("other", "other", &["other.test"], None);
    let garbage = pki.dir().join("garbage.pem");
    std::fs::write(&garbage, "not a pem file\n").unwrap();
    let dir = pki.dir();
    let f = dir.join("weir.toml").display().to_string();

    let (ok, msg) = check(BASE, dir);
    assert!(ok, "{msg}");

    let cases: Vec<(String, String)> = vec![
        (format!("{BASE}[oops"), format!("{f}: ")),
        (BASE.replace("cluster = \"app\"", "cluster = \"app\"\nclustr = 1"), format!("{f}: routes[0].clustr: unknown field `clustr`")),
        (BASE.replace("127.0.0.1:0", "localhost:http"), format!("{f}: listeners[0].address: invalid socket address")),
        (format!("{BASE}connect_timeout = \"3 lightyears\"\n"), format!("{f}: clusters.app.connect_timeout: invalid value: string \"3 lightyears\", expected a duration")),
        (BASE.replace("cluster = \"app\"", "cluster = \"nope\""), format!("{f}: routes[0].cluster: unknown cluster \"nope\"")),
        (BASE.replace("127.0.0.1:9000", "nowhere"), format!("{f}: clusters.app.endpoints[0]: endpoint \"nowhere\" must be host:port")),
        (format!("{BASE}\n[[listeners]]\nname = \"web\"\naddress = \"127.0.0.1:0\"\n"), format!("{f}: listeners[1].name: duplicate listener name \"web\"")),
        (
            BASE.replace("address = \"127.0.0.1:0\"", "address = \"127.0.0.1:0\"\ntls = { cert = \"certs/a.pem\", key = \"certs/a.key\" }"),
            format!("{f}: listeners[0].tls.cert: file not found: certs/a.pem"),
        ),
        (
            BASE.replace("address = \"127.0.0.1:0\"", &format!("address = \"127.0.0.1:0\"\ntls = {{ cert = \"{}\", key = \"{}\" }}", garbage.display(), leaf.key.display())),
            format!("{f}: listeners[0].tls: {}: no certificate found in PEM file", garbage.display()),
        ),
        (
            BASE.replace("address = \"127.0.0.1:0\"", &format!("address = \"127.0.0.1:0\"\ntls = {{ cert = \"{}\", key = \"{}\" }}", leaf.cert.display(), other.key.display())),
            format!("{f}: listeners[0].tls: {}: key does not match", other.key.display()),
        ),
        (BASE.replace("name = \"web\"", "name = \"web\"\nlimits = { max_headers = 0 }"), format!("{f}: listeners[0].limits.max_headers: must be at least 1")),
        (format!("{BASE}balance = \"random\"\n"), format!("{f}: clusters.app.balance: unknown variant `random`")),
        (String::new(), format!("{f}: listeners: at least one listener is required")),
    ];
    for (text, want) in cases {
        let (ok, msg) = check(&text, dir);
        assert!(!ok, "must fail: {want}");
        assert!(msg.contains(&want), "want {want:?} in:\n{msg}");
    }

    // Several mistakes are reported at once.
    let text = BASE
        .replace("cluster = \"app\"", "cluster = \"nope\"")
        .replace("127.0.0.1:9000", "nowhere");
    let (_, msg) = check(&text, dir);
    assert!(
        msg.contains("routes[0].cluster") && msg.contains("clusters.app.endpoints[0]"),
        "{msg}"
    );
}
