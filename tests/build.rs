//! Builds the Wasm the tests run, for `wasm32-wasip2`, exactly as a user builds a filter:
//! the test filters in `fixtures/` (exported as `WEIR_FIXTURE_<NAME>`) and the policy library
//! in `../filters/` (exported as `WEIR_FILTER_<NAME>`). They build in their own target dir,
//! so the nested builds never wait on the outer one. Rebuilt when their sources or the SDK
//! change.

use std::path::{Path, PathBuf};
use std::process::Command;

const FIXTURES: &[&str] = &[
    "policy", "hostile", "noop", "pass", "rewrite", "swap-a", "swap-b", "calls",
];
const FILTERS: &[&str] = &["headers", "cors", "ratelimit", "router", "auth", "resilience"];

fn build(manifest: &Path, packages: &[String], target: &Path) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args([
        "build",
        "--release",
        "--target",
        "wasm32-wasip2",
        "--manifest-path",
    ])
    .arg(manifest)
    // Small components: no debug info in what the tests load.
    .args([
        "--config",
        "profile.release.debug=false",
        "--config",
        "profile.release.strip=true",
    ]);
    for p in packages {
        cmd.args(["-p", p]);
    }
    let out = cmd
        .env("CARGO_TARGET_DIR", target)
        // Flags meant for the host build must not leak into the Wasm one.
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTFLAGS")
        .output()
        .expect("run cargo to build the test filters");
    if !out.status.success() {
        panic!(
            "building {} failed (is the target installed? `rustup target add wasm32-wasip2`):\n{}",
            manifest.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn export(prefix: &str, name: &str, wasm: PathBuf) {
    assert!(wasm.is_file(), "{} was not built", wasm.display());
    println!(
        "cargo:rustc-env={prefix}_{}={}",
        name.to_uppercase().replace('-', "_"),
        wasm.display()
    );
}

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let fixtures = manifest.join("fixtures");
    let filters = manifest.join("../filters");
    let sdk = manifest.join("../sdk");
    for p in [
        fixtures.clone(),
        filters.clone(),
        sdk.join("src"),
        sdk.join("wit"),
        sdk.join("Cargo.toml"),
    ] {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    // One target dir for both sets, beside the outer build's (`target/wasm-tests`) rather
    // than in OUT_DIR: `cargo clippy --all-targets` and `cargo test` run this script with
    // different OUT_DIRs, and in OUT_DIR each built all the Wasm again from cold (CI does
    // both). The two sets share their build-time crates (proc macros) here too.
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let target = out
        .ancestors()
        .nth(4) // out -> weir-tests-<hash> -> build -> <profile> -> target dir
        .map(|t| t.join("wasm-tests"))
        .unwrap_or_else(|| out.join("wasm-tests"));

    let packages: Vec<String> = FIXTURES.iter().map(|f| format!("fixture-{f}")).collect();
    build(&fixtures.join("Cargo.toml"), &packages, &target);
    for name in FIXTURES {
        let file = format!("fixture_{}.wasm", name.replace('-', "_"));
        export(
            "WEIR_FIXTURE",
            name,
            target.join("wasm32-wasip2/release").join(file),
        );
    }

    let packages: Vec<String> = FILTERS.iter().map(|f| format!("weir-filter-{f}")).collect();
    build(&manifest.join("../Cargo.toml"), &packages, &target);
    for name in FILTERS {
        let file = format!("weir_filter_{}.wasm", name.replace('-', "_"));
        export(
            "WEIR_FILTER",
            name,
            target.join("wasm32-wasip2/release").join(file),
        );
    }
    // The directory of them all, for configs that name filters by file (examples/).
    println!(
        "cargo:rustc-env=WEIR_FILTERS_DIR={}",
        target.join("wasm32-wasip2/release").display()
    );
}
