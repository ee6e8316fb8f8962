//! `sockets-host plugin check`: load a plugin exactly as the server would and
//! show what it decides, so an operator can try a plugin before deploying it.

use std::io::Write;
use std::sync::Arc;

use anyhow::Context;
use serde::Serialize;

use crate::cli::CheckArgs;
use crate::plugin::{
    ClientOrigin, DispatchError, Event, HostServices, Origin, Outcome, PluginLimits, PluginRuntime,
};
use crate::store::directory::{FileDirectory, User, demo_users_file};
use crate::store::plugin_state::{MemoryPluginState, PluginState};

/// A directory from a users file, nobody online, state for this run only.
struct OfflineServices {
    directory: FileDirectory,
    state: MemoryPluginState,
}

impl HostServices for OfflineServices {
    fn get_user(&self, id: &str) -> Option<User> {
        self.directory.get(id).cloned()
    }

    fn connection_count(&self, _user_id: &str) -> u32 {
        0
    }

    fn plugin_state(&self) -> &dyn PluginState {
        &self.state
    }
}

#[derive(Serialize)]
struct Report<'a> {
    plugin: &'a str,
    name: &'a str,
    version: &'a str,
    sha256: &'a str,
    subscriptions: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    outcome: Option<&'a Outcome>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<ReportedError>,
}

#[derive(Serialize)]
struct ReportedError {
    code: &'static str,
    message: String,
}

/// Runs the check, printing a JSON report to `out`. Returns whether the
/// event (if any) was handled successfully.
pub fn run(args: &CheckArgs, out: &mut impl Write) -> anyhow::Result<bool> {
    let users_file = args.users.as_deref().unwrap_or_else(|| demo_users_file());
    let directory = FileDirectory::load(users_file)?;
    let runtime = PluginRuntime::new(
        PluginLimits::default(),
        Arc::new(OfflineServices {
            directory,
            state: MemoryPluginState::default(),
        }),
        None,
    )?;
    let wasm = std::fs::read(&args.file)
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    let name = args
        .file
        .file_stem()
        .and_then(|stem| stem.to_str())
        .context("the plugin file name is not UTF-8")?;
    let plugin = runtime
        .load(name, &wasm, args.plugin_config.as_deref().unwrap_or("{}"))
        .with_context(|| format!("cannot load {}", args.file.display()))?;

    let mut outcome = None;
    let mut error = None;
    if let Some(event_name) = &args.event {
        serde_json::from_str::<serde::de::IgnoredAny>(&args.data).context("--data is not JSON")?;
        let origin = match &args.user {
            Some(user) => Origin::Client(ClientOrigin {
                user_id: user.clone(),
                role: args.role.clone(),
                connection_id: "check-connection".to_owned(),
            }),
            None => Origin::Broker,
        };
        let event = Event {
            id: "check-event".to_owned(),
            name: event_name.clone(),
            origin,
            data: args.data.clone(),
            received_at: "1970-01-01T00:00:00Z".to_owned(),
        };
        if !plugin.subscriptions().contains(event_name) {
            error = Some(ReportedError {
                code: "unknown_event",
                message: DispatchError::NoHandler(event_name.clone()).to_string(),
            });
        } else {
            match plugin.handle(&event) {
                Ok(handled) => outcome = Some(handled),
                Err(err) => {
                    let code = match &err {
                        crate::plugin::CallError::Refused { code, .. } => code.as_str(),
                        _ => "plugin_failed",
                    };
                    error = Some(ReportedError {
                        code,
                        message: err.to_string(),
                    });
                }
            }
        }
    }

    let succeeded = error.is_none();
    let report = Report {
        plugin: plugin.label(),
        name: &plugin.info().name,
        version: &plugin.info().version,
        sha256: plugin.content_hash(),
        subscriptions: plugin.subscriptions(),
        outcome: outcome.as_ref(),
        error,
    };
    serde_json::to_writer_pretty(&mut *out, &report)?;
    writeln!(out)?;
    Ok(succeeded)
}
