//! `sockets-host`: parses the command line and configuration, sets up
//! logging, binds, and runs the chosen command.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use sockets_host::auth::Authenticator;
use sockets_host::cli::{Cli, Command, PluginCommand};
use sockets_host::config::Config;
use sockets_host::server;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            // One line a newcomer can act on; the backtrace only on request.
            eprintln!("error: {err:#}");
            if std::env::var_os("RUST_BACKTRACE").is_some_and(|value| value != "0") {
                eprintln!("{}", err.backtrace());
            }
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    // Making a plugin reads no setting: a bad one must not stop it.
    if let Some(Command::Plugin(PluginCommand::New(args))) = &cli.command {
        sockets_host::cli::new::run(args, &mut std::io::stdout().lock())?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut config = cli.config()?;

    let filter = EnvFilter::try_new(&config.log).context("invalid SOCKETS_LOG filter")?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(config),
        Command::Token(args) => {
            server::apply_dev_mode(&mut config)?;
            let auth = Authenticator::new(&config.jwt)?;
            let token = auth
                .mint(&args.sub, &args.role, args.ttl)
                .context("minting needs an HS256 secret (SOCKETS_JWT_SECRET)")?;
            println!("{token}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Plugin(PluginCommand::New(_)) => unreachable!("made before the settings are read"),
        Command::Plugin(PluginCommand::Check(mut args)) => {
            args.users = args.users.or_else(|| Some(config.users_file.clone()));
            if args.plugin_config.is_none() {
                let name = args
                    .file
                    .file_stem()
                    .and_then(|stem| stem.to_str())
                    .unwrap_or_default();
                args.plugin_config = config.plugin_configs.get(name).cloned();
            }
            let handled = sockets_host::cli::check::run(&args, &mut std::io::stdout().lock())?;
            Ok(if handled {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

fn serve(mut config: Config) -> anyhow::Result<ExitCode> {
    let dev_mode = server::apply_dev_mode(&mut config)?;
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async move {
        let listener = server::bind(config.listen)?;
        let addr = listener.local_addr()?;
        if dev_mode {
            let secret = config.jwt.secret.as_deref().unwrap_or_default();
            eprintln!(
                "dev mode: JWT HS256 secret {secret} (kept in {}); mint tokens with\n  cargo run -p sockets-host -- token --sub s_1 --role student",
                config.data_dir.join("dev-jwt-secret").display()
            );
        }
        let server = server::start(config, listener).await?;
        // Only now: everything that can fail at start has succeeded.
        println!("sockets-host listening on http://{addr}");
        server.serve(shutdown_signal()).await
    })?;
    Ok(ExitCode::SUCCESS)
}

/// SIGTERM or ctrl-c.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}
