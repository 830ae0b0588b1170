//! The `shardlite` binary: parses the command line and hands it to the library.

use clap::Parser;
use std::process::ExitCode;

/// mimalloc: glibc's malloc and free were 8-10% of the proxy's CPU time on the request path.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = shardlite::cli::Cli::parse();
    shardlite::cli::init_tracing();
    let runtime = match shardlite::cli::runtime(&cli.command) {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(shardlite::cli::run(cli, &mut std::io::stdout())) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
