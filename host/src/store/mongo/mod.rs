//! MongoDB persistence (PROTOCOL.md §7), enabled by `SOCKETS_MONGO_URL`:
//! `userConnections` (this node's records mirrored in memory and written
//! behind), `notificationLogs` (batched, idempotent, retried until written),
//! the read-only `users` directory (cached), presence across nodes and the
//! published idempotency keys (`publishedKeys` and `publishedAnswers`,
//! shared by the nodes). A
//! maintenance task keeps the indexes, this node's lease in `instances`,
//! and removes the records of nodes whose lease ran out. The only module
//! that knows the `mongodb` crate.

mod connections;
mod documents;
mod keys;
mod log;
mod maintenance;
mod plugin_state;
mod users;

use std::sync::Arc;
use std::time::Duration;

use mongodb::options::ClientOptions;
use mongodb::{Client, Database};

pub use connections::MongoConnections;
pub use keys::MongoKeys;
pub use log::MongoLog;
pub use maintenance::Maintenance;
pub use plugin_state::MongoPluginState;
pub use users::MongoDirectory;

use super::StoreError;
use crate::health::Health;

/// Collection names (PROTOCOL.md §7 fixes the first three).
const USER_CONNECTIONS: &str = "userConnections";
const NOTIFICATION_LOGS: &str = "notificationLogs";
const USERS: &str = "users";
/// One document per live node: its lease.
const INSTANCES: &str = "instances";
/// One document per idempotency key claimed within the retention.
const PUBLISHED_KEYS: &str = "publishedKeys";
/// The first publication's answer of each key published within the
/// retention.
const PUBLISHED_ANSWERS: &str = "publishedAnswers";
/// Plugins' state (`state-*` host calls).
const PLUGIN_STATE: &str = "pluginState";

/// How long an operation waits for a usable server before failing: short,
/// so that a database outage degrades the service instead of stalling it.
const SERVER_SELECTION_TIMEOUT: Duration = Duration::from_secs(2);

/// Runs a MongoDB operation from a plugin's synchronous host call, which
/// blocks its runtime worker meanwhile, until it ends or `deadline` passes.
/// `Err` says why it did not run to its end: no multi-threaded runtime to
/// run it on (`block_in_place` would panic on another), or the deadline.
fn wait_in_plugin_call<T>(
    deadline: std::time::Instant,
    operation: impl std::future::IntoFuture<Output = mongodb::error::Result<T>>,
) -> Result<mongodb::error::Result<T>, &'static str> {
    use tokio::runtime::{Handle, RuntimeFlavor};
    let runtime = Handle::try_current()
        .ok()
        .filter(|runtime| runtime.runtime_flavor() == RuntimeFlavor::MultiThread)
        .ok_or("no runtime to reach MongoDB from")?;
    if deadline <= std::time::Instant::now() {
        return Err("the call's deadline has passed");
    }
    tokio::task::block_in_place(|| {
        runtime.block_on(async {
            tokio::time::timeout_at(deadline.into(), operation)
                .await
                .map_err(|_| "MongoDB did not answer in time")
        })
    })
}

/// A handle on the database, shared by the collections' implementations.
#[derive(Clone)]
pub struct Mongo {
    db: Database,
    health: Arc<Health>,
}

impl std::fmt::Debug for Mongo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mongo")
            .field("db", &self.db.name())
            .finish_non_exhaustive()
    }
}

impl Mongo {
    /// Parses the URL and prepares the client. Does not wait for the server:
    /// the service starts while the database is down (`/readyz` says so).
    pub async fn connect(url: &str, database: &str) -> Result<Self, StoreError> {
        let mut options = ClientOptions::parse(url)
            .await
            .map_err(|err| StoreError::Unavailable(format!("invalid MongoDB URL: {err}")))?;
        options.app_name = Some("sockets-host".to_owned());
        options.server_selection_timeout = Some(SERVER_SELECTION_TIMEOUT);
        options.connect_timeout = Some(SERVER_SELECTION_TIMEOUT);
        let client = Client::with_options(options)
            .map_err(|err| StoreError::Unavailable(format!("MongoDB client: {err}")))?;
        Ok(Self {
            db: client.database(database),
            health: Arc::new(Health::connecting()),
        })
    }

    /// The database's health, for `/readyz`.
    pub fn health(&self) -> Arc<Health> {
        Arc::clone(&self.health)
    }

    /// Records the outcome of an operation in the health. An error about
    /// one document (the server refused it) says nothing of the database's
    /// health and leaves it as it is.
    fn observe<T>(&self, result: mongodb::error::Result<T>) -> Result<T, StoreError> {
        match result {
            Ok(value) => {
                self.health.set(None);
                Ok(value)
            }
            Err(err) if is_about_the_document(&err) => Err(StoreError::Rejected(err.to_string())),
            Err(err) => {
                let problem = unavailable(&err);
                self.health.set(Some(problem.to_string()));
                Err(problem)
            }
        }
    }
}

/// Whether the server refused an operation for what the document holds (a
/// key it does not accept, a value it cannot store) rather than because it
/// is unreachable or unwell: retrying that document can never succeed, and
/// must not hold back the others.
fn is_about_the_document(err: &mongodb::error::Error) -> bool {
    use mongodb::error::{ErrorKind, WriteFailure};
    match &*err.kind {
        ErrorKind::BsonSerialization(_) | ErrorKind::InvalidArgument { .. } => true,
        ErrorKind::Write(WriteFailure::WriteError(_)) => true,
        // Some records of a batch refused, the others written (unordered);
        // a record that is there already counts as written.
        ErrorKind::InsertMany(failure) => {
            failure.write_concern_error.is_none()
                && failure.write_errors.as_ref().is_some_and(|errors| {
                    errors
                        .iter()
                        .all(|error| matches!(error.code, 2 | 52 | 55 | 56 | 57 | 121 | 11000))
                })
        }
        // Document validation and bad field names (MongoDB codes 2, 52, 55,
        // 56, 57, 121; FerretDB answers with the same codes).
        ErrorKind::Command(command) => is_refusal_of_the_document(command.code),
        _ => false,
    }
}

/// Whether a server error code says a document is refused for what it
/// holds (validation, field names), not that the server is unwell.
fn is_refusal_of_the_document(code: i32) -> bool {
    matches!(code, 2 | 52 | 55 | 56 | 57 | 121)
}

fn unavailable(err: &mongodb::error::Error) -> StoreError {
    StoreError::Unavailable(format!("MongoDB: {err}"))
}
