//! The `weir` command: `run` a config, `check` one, or print `--version`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use weir::{Config, Proxy};

/// Exit status for a configuration error (EX_CONFIG-like: sysexits' EX_USAGE).
const EXIT_BAD_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "weir",
    version,
    about = "A programmable HTTP proxy whose every policy is a WebAssembly filter"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve with a config file until SIGTERM/SIGINT, then drain and exit 0.
    Run {
        /// The config file.
        #[arg(short, long, default_value = "weir.toml")]
        config: PathBuf,
    },
    /// Validate a config file without serving; exits non-zero on error.
    Check {
        /// The config file.
        #[arg(short, long, default_value = "weir.toml")]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (path, serve) = match &cli.command {
        Command::Run { config } => (config, true),
        Command::Check { config } => (config, false),
    };
    weir::tls::install_default_provider();
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    if !serve {
        println!("{}: ok", path.display());
        return ExitCode::SUCCESS;
    }
    weir::log::init(&config.log);
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    if config.runtime.worker_threads > 0 {
        rt.worker_threads(config.runtime.worker_threads);
    }
    let rt = match rt.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        let proxy = Proxy::bind_file(path.clone())
            .await?
            .watch(weir::limits::RELOAD_DEBOUNCE);
        proxy.run(shutdown_signal()).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "weir stopped");
            eprintln!("weir: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
