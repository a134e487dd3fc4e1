//! Builds the test filters in `fixtures/` for `wasm32-wasip2`, as a user would build theirs,
//! and exports each one's path as `WEIR_FIXTURE_<NAME>` for the tests. Built once per change.

use std::path::PathBuf;
use std::process::Command;

const FIXTURES: &[&str] = &["policy", "hostile", "noop", "rewrite", "swap-a", "swap-b"];

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let fixtures = manifest.join("fixtures");
    let sdk = manifest.join("../sdk");
    for p in [
        fixtures.clone(),
        sdk.join("src"),
        sdk.join("wit"),
        sdk.join("Cargo.toml"),
    ] {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    let target = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("wasm-target");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "build",
            "--release",
            "--target",
            "wasm32-wasip2",
            "--manifest-path",
        ])
        .arg(fixtures.join("Cargo.toml"))
        .env("CARGO_TARGET_DIR", &target)
        // Flags meant for the host build must not leak into the Wasm one.
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTFLAGS")
        .output()
        .expect("run cargo to build the test filters");
    if !out.status.success() {
        panic!(
            "building the test filters failed (is the target installed? `rustup target add wasm32-wasip2`):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for name in FIXTURES {
        let wasm = target
            .join("wasm32-wasip2/release")
            .join(format!("fixture_{}.wasm", name.replace('-', "_")));
        assert!(wasm.is_file(), "{} was not built", wasm.display());
        println!(
            "cargo:rustc-env=WEIR_FIXTURE_{}={}",
            name.to_uppercase().replace('-', "_"),
            wasm.display()
        );
    }
}
