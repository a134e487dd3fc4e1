//! The `weir` command line, run as a user runs it.
//!
//! Being an integration test of this package, it also makes `cargo test --workspace` build
//! the `weir` binary itself (with the same feature unification as every test: a separate
//! `cargo build -p weir` resolves features differently and rebuilt wasmtime a second time
//! from cold in CI). The end-to-end tests in `tests/` run that binary.

use std::process::Command;

fn weir() -> Command {
    Command::new(env!("CARGO_BIN_EXE_weir"))
}

#[test]
fn version_and_missing_file() {
    let out = weir().arg("--version").output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("weir {}", env!("CARGO_PKG_VERSION"))
    );
    let out = weir()
        .args(["check", "-c", "/nonexistent/weir.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "a config error exits 64");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/weir.toml: cannot read"), "{err}");
}

#[test]
fn usage_errors_say_what_is_wrong_and_check_defaults_to_weir_toml() {
    let out = weir().arg("serve").output().unwrap();
    assert_eq!(out.status.code(), Some(2), "clap's usage error code");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unrecognized subcommand 'serve'"), "{err}");

    // Without `-c`, `weir check` reads `weir.toml` in the current directory.
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("cli-empty");
    std::fs::create_dir_all(&dir).unwrap();
    let _ = std::fs::remove_file(dir.join("weir.toml"));
    let out = weir().arg("check").current_dir(&dir).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("weir.toml: cannot read"), "{err}");
    std::fs::write(
        dir.join("weir.toml"),
        "[[listeners]]\nname = \"web\"\naddress = \"127.0.0.1:0\"\n\
         [[routes]]\ncluster = \"app\"\n[clusters.app]\nendpoints = [\"127.0.0.1:9000\"]\n",
    )
    .unwrap();
    let out = weir().arg("check").current_dir(&dir).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
