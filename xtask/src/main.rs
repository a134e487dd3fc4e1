//! Project tasks, so a fresh machine needs only cargo:
//!
//! - `cargo xtask demo` (alias `cargo demo`): builds Weir, the demo upstream and the hello
//!   filter (`examples/hello-filter`, into `examples/quickstart/filters/`), starts two demo
//!   upstreams and Weir with `examples/quickstart/weir.toml`, until Ctrl-C.
//! - `cargo xtask test`: installs what the tests need, checks formatting and lints, builds the
//!   `weir` binary (the end-to-end tests run it), runs every test of the workspace, and
//!   checks the quickstart config with the filter `cargo demo` builds.
//! - `cargo xtask bench`: the load bench (`bench/load.sh`): direct vs Weir vs nginx.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode};

use anyhow::{bail, Context, Result};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("demo") => demo(),
        Some("test") => test(&args[1..]),
        Some("bench") => bench(&args[1..]),
        _ => {
            eprintln!("usage: cargo xtask <demo|test|bench> [args]");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("+ {cmd:?}");
    let status = cmd.status().with_context(|| format!("cannot run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn have(bin: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {bin}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Installs Debian packages whose commands are missing (`apt-get update` once first).
fn ensure_packages(wanted: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|(bin, _)| !have(bin))
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !have("apt-get") {
        bail!("missing {missing:?} and no apt-get to install them");
    }
    let sudo: &[&str] = if is_root() { &[] } else { &["sudo"] };
    let apt = |args: &[&str]| {
        let mut c = Command::new(sudo.first().copied().unwrap_or("apt-get"));
        if !sudo.is_empty() {
            c.arg("apt-get");
        }
        c.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        c
    };
    run(&mut apt(&["update", "-qq"]))?;
    let mut install = apt(&["install", "-y", "-qq"]);
    install.args(&missing);
    run(&mut install)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Filters compile to `wasm32-wasip2`; the end-to-end tests build test filters for it.
fn ensure_wasm_target() -> Result<()> {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .context("rustup is needed to install the wasm32-wasip2 target")?;
    if !String::from_utf8_lossy(&installed.stdout)
        .lines()
        .any(|l| l.trim() == "wasm32-wasip2")
    {
        run(Command::new("rustup").args(["target", "add", "wasm32-wasip2"]))?;
    }
    Ok(())
}

fn test(extra: &[String]) -> Result<()> {
    // curl is used by the quickstart's instructions and by the load bench's readiness probe;
    // the registry tests run a real OCI registry (the CNCF distribution server).
    ensure_packages(&[("curl", "curl"), ("docker-registry", "docker-registry")])?;
    ensure_wasm_target()?;
    run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    run(cargo().args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]))?;
    // The end-to-end tests start the real binary (drain, `weir check`); `cargo test
    // --workspace` builds it for weir's own integration test. No separate `cargo build -p
    // weir`: its feature unification differs from the workspace's, and it built wasmtime's
    // whole tree a second time.
    run_tests(cargo().args(["test", "--workspace"]).args(extra))?;
    // The README's first command: the quickstart config must load with what `cargo demo`
    // builds (it once named a filter file nothing built).
    quickstart_filters()?;
    run(Command::new(target_dir().join("debug/weir"))
        .args(["check", "-c"])
        .arg(root().join("examples/quickstart/weir.toml")))
}

fn target_dir() -> PathBuf {
    std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root().join("target"))
}

/// Builds the hello filter for wasm32-wasip2 as its README shows and drops it where the
/// quickstart config loads filters from (`examples/quickstart/filters/`, git-ignored).
fn quickstart_filters() -> Result<()> {
    ensure_wasm_target()?;
    run(cargo().args([
        "build",
        "--release",
        "--target",
        "wasm32-wasip2",
        "-p",
        "hello-filter",
    ]))?;
    let built = target_dir().join("wasm32-wasip2/release/hello_filter.wasm");
    let dir = root().join("examples/quickstart/filters");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    std::fs::copy(&built, dir.join("hello_filter.wasm"))
        .with_context(|| format!("cannot copy {} into {}", built.display(), dir.display()))?;
    Ok(())
}

/// Runs `cargo test`, echoing its output, and ends with one total line (`N passed, N failed`):
/// cargo's own last line is that of whichever crate ran last, often a doc-test run with none.
fn run_tests(cmd: &mut Command) -> Result<()> {
    use std::io::{BufRead, BufReader};
    eprintln!("+ {cmd:?}");
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("cannot run cargo test")?;
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            for part in rest.split(['.', ';']) {
                let mut words = part.split_whitespace();
                if let (Some(n), Some(what)) = (words.next(), words.next()) {
                    let n: u64 = n.parse().unwrap_or(0);
                    match what {
                        "passed" => passed += n,
                        "failed" => failed += n,
                        "ignored" => ignored += n,
                        _ => {}
                    }
                }
            }
        }
    }
    let status = child.wait()?;
    println!("\ntotal: {passed} passed, {failed} failed, {ignored} skipped");
    if !status.success() {
        bail!("cargo test failed: {status}");
    }
    Ok(())
}

struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn demo() -> Result<()> {
    ensure_packages(&[("curl", "curl")])?;
    run(cargo().args(["build", "-p", "weir", "-p", "weir-demo-upstream"]))?;
    quickstart_filters()?;
    let bin = target_dir().join("debug");
    let mut children = Children(Vec::new());
    for (port, name) in [(9001, "one"), (9002, "two")] {
        children.0.push(
            Command::new(bin.join("weir-demo-upstream"))
                .args(["--listen", &format!("127.0.0.1:{port}"), "--name", name])
                .spawn()
                .context("start demo upstream")?,
        );
    }
    eprintln!(
        "\nWeir quickstart: gateway on http://127.0.0.1:8080, admin on http://127.0.0.1:9901\n\
         try:  curl -s localhost:8080/\n      curl -s localhost:8080/headers   (see x-hello: world, added by the Wasm filter)\n      \
         curl -si localhost:8080/admin     (403 from the filter)\n      \
         curl -s --http2-prior-knowledge localhost:8080/\n      curl -s localhost:9901/metrics\n\
         Ctrl-C stops it.\n"
    );
    let status = Command::new(bin.join("weir"))
        .args(["run", "-c"])
        .arg(root().join("examples/quickstart/weir.toml"))
        .status()
        .context("start weir")?;
    drop(children);
    if !status.success() {
        bail!("weir exited with {status}");
    }
    Ok(())
}

fn bench(extra: &[String]) -> Result<()> {
    let mut c = Command::new("bash");
    c.arg(root().join("bench/load.sh"))
        .args(extra)
        .current_dir(root());
    run(&mut c)
}
