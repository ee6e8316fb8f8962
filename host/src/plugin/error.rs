//! Errors of the plugin runtime, typed for the callers that match on them.

use std::time::Duration;

use super::types::RefusalCode;

/// Why a plugin could not be loaded. The plugin is not used; whatever served
/// before keeps serving.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The bytes are not a valid WebAssembly component.
    #[error("not a valid WebAssembly component: {0}")]
    Compile(String),
    /// The component's imports or exports do not match the plugin world.
    #[error("component does not implement the world `sockets:plugin/plugin@0.1.0`: {0}")]
    WrongWorld(String),
    /// The component trapped or timed out while starting or reporting its
    /// subscriptions.
    #[error("plugin failed while starting: {0}")]
    Start(String),
    /// The component's subscriptions are unusable.
    #[error("invalid subscriptions: {0}")]
    Subscriptions(String),
    /// The plugin's configuration is not JSON.
    #[error("invalid plugin configuration: {0}")]
    Config(String),
    /// The name or version the plugin declares is unusable (it becomes a
    /// metrics label and part of every log record).
    #[error("invalid plugin info: {0}")]
    Info(String),
}

/// Why one call to a plugin did not produce an outcome.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    /// The plugin refused the event (its own decision, not a malfunction).
    #[error("{message}")]
    Refused {
        /// The refusal's code.
        code: RefusalCode,
        /// The plugin's reason.
        message: String,
    },
    /// The call ran past its deadline and was interrupted.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// The plugin tried to grow its memory past the limit.
    #[error("exceeded its memory limit of {0} bytes")]
    OutOfMemory(usize),
    /// The plugin trapped (panic, unreachable, out-of-bounds access, …).
    #[error("trapped: {0}")]
    Trapped(String),
    /// The plugin returned an outcome the host will not act on.
    #[error("returned an invalid outcome: {0}")]
    InvalidOutcome(String),
}

impl CallError {
    /// A malfunction (anything but a refusal) counts against the plugin and
    /// becomes `plugin_failed` for the sender.
    pub fn is_malfunction(&self) -> bool {
        !matches!(self, Self::Refused { .. })
    }

    /// A short, stable name of the failure kind, for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Refused { .. } => "refused",
            Self::Timeout(_) => "timeout",
            Self::OutOfMemory(_) => "out_of_memory",
            Self::Trapped(_) => "trap",
            Self::InvalidOutcome(_) => "invalid_outcome",
        }
    }
}
