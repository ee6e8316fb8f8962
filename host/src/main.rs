//! `sockets-host`: parses the command line, sets up logging, dispatches.

use std::process::ExitCode;

use clap::Parser;
use sockets_host::cli::{Cli, Command, PluginCommand};
use tracing_subscriber::EnvFilter;

fn main() -> anyhow::Result<ExitCode> {
    let filter = EnvFilter::try_from_env("SOCKETS_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();

    let cli = Cli::parse();
    match cli.command {
        Command::Plugin(PluginCommand::Check(args)) => {
            let handled = sockets_host::check::run(&args, &mut std::io::stdout().lock())?;
            Ok(if handled {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}
