//! Plugin state in MongoDB (`pluginState`), shared by every node: one
//! document per key, `_id` = `<plugin>/<key>`. Plugins call it mid-call, so
//! every operation blocks its thread for at most [`STATE_TIMEOUT`].

use std::time::{Duration, SystemTime};

use mongodb::Collection;
use mongodb::bson::{Bson, DateTime, Document, doc};
use mongodb::error::{ErrorKind, WriteFailure};

use super::Mongo;
use crate::store::plugin_state::{MAX_KEYS_PER_PLUGIN, PluginState, StateError, check_sizes};

const PLUGIN_STATE: &str = "pluginState";

/// How long one state operation may take: within the default plugin call
/// deadline (50 ms), which keeps running while the host answers.
const STATE_TIMEOUT: Duration = Duration::from_millis(40);

/// Plugin state in the shared database.
pub struct MongoPluginState {
    collection: Collection<Document>,
}

impl MongoPluginState {
    /// The `pluginState` collection of `mongo`'s database.
    pub fn new(mongo: &Mongo) -> Self {
        Self {
            collection: mongo.db.collection(PLUGIN_STATE),
        }
    }

    /// Runs `operation` to its end or [`STATE_TIMEOUT`], from the plugin's
    /// synchronous call.
    fn block_on<T>(
        &self,
        operation: impl std::future::IntoFuture<Output = mongodb::error::Result<T>>,
    ) -> Result<T, StateError> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| StateError::Unavailable("no runtime to reach MongoDB from".into()))?;
        tokio::task::block_in_place(|| {
            runtime.block_on(async {
                tokio::time::timeout(STATE_TIMEOUT, operation)
                    .await
                    .map_err(|_| StateError::Unavailable("MongoDB did not answer in time".into()))?
                    .map_err(|err| StateError::Unavailable(err.to_string()))
            })
        })
    }

    /// Makes sure a new key fits the plugin's namespace.
    fn check_room(&self, plugin: &str) -> Result<(), StateError> {
        let live = doc! {"plugin": plugin, "$or": live_filter()};
        let count = self.block_on(self.collection.count_documents(live))?;
        if usize::try_from(count).unwrap_or(usize::MAX) >= MAX_KEYS_PER_PLUGIN {
            Err(StateError::Full)
        } else {
            Ok(())
        }
    }
}

fn id(plugin: &str, key: &str) -> String {
    format!("{plugin}/{key}")
}

fn expiry(ttl: Option<Duration>) -> Bson {
    ttl.and_then(|ttl| SystemTime::now().checked_add(ttl))
        .map_or(Bson::Null, |at| {
            Bson::DateTime(DateTime::from_system_time(at))
        })
}

/// Matches a document that has not expired.
fn live_filter() -> Vec<Document> {
    vec![
        doc! {"expiresAt": Bson::Null},
        doc! {"expiresAt": {"$gt": DateTime::now()}},
    ]
}

fn is_duplicate(err: &mongodb::error::Error) -> bool {
    matches!(&*err.kind, ErrorKind::Write(WriteFailure::WriteError(write)) if write.code == 11000)
}

impl PluginState for MongoPluginState {
    fn get(&self, plugin: &str, key: &str) -> Result<Option<String>, StateError> {
        check_sizes(key, None)?;
        let found = self.block_on(
            self.collection
                .find_one(doc! {"_id": id(plugin, key), "$or": live_filter()}),
        )?;
        Ok(found.and_then(|document| document.get_str("value").ok().map(str::to_owned)))
    }

    fn set(
        &self,
        plugin: &str,
        key: &str,
        value: String,
        ttl: Option<Duration>,
    ) -> Result<(), StateError> {
        check_sizes(key, Some(&value))?;
        let fields = doc! {"value": &value, "expiresAt": expiry(ttl)};
        let updated = self.block_on(
            self.collection
                .update_one(doc! {"_id": id(plugin, key)}, doc! {"$set": fields.clone()}),
        )?;
        if updated.matched_count == 1 {
            return Ok(());
        }
        self.check_room(plugin)?;
        self.block_on(
            self.collection
                .update_one(
                    doc! {"_id": id(plugin, key)},
                    doc! {"$set": fields, "$setOnInsert": {"plugin": plugin, "key": key}},
                )
                .upsert(true),
        )?;
        Ok(())
    }

    fn delete(&self, plugin: &str, key: &str) -> Result<(), StateError> {
        check_sizes(key, None)?;
        self.block_on(self.collection.delete_one(doc! {"_id": id(plugin, key)}))?;
        Ok(())
    }

    fn swap(
        &self,
        plugin: &str,
        key: &str,
        expected: Option<&str>,
        value: Option<String>,
        ttl: Option<Duration>,
    ) -> Result<bool, StateError> {
        check_sizes(key, value.as_deref())?;
        let key_id = id(plugin, key);
        match (expected, value) {
            (Some(expected), Some(value)) => {
                let updated = self.block_on(self.collection.update_one(
                    doc! {"_id": &key_id, "value": expected, "$or": live_filter()},
                    doc! {"$set": {"value": value, "expiresAt": expiry(ttl)}},
                ))?;
                Ok(updated.matched_count == 1)
            }
            (Some(expected), None) => {
                let deleted = self
                    .block_on(self.collection.delete_one(
                        doc! {"_id": &key_id, "value": expected, "$or": live_filter()},
                    ))?;
                Ok(deleted.deleted_count == 1)
            }
            (None, value) => {
                // Absent includes expired: an expired document is cleared
                // first, then the insert decides (one writer wins).
                self.block_on(
                    self.collection
                        .delete_one(doc! {"_id": &key_id, "expiresAt": {"$lte": DateTime::now()}}),
                )?;
                let Some(value) = value else {
                    let found = self.block_on(self.collection.find_one(doc! {"_id": &key_id}))?;
                    return Ok(found.is_none());
                };
                self.check_room(plugin)?;
                let document = doc! {
                    "_id": &key_id, "plugin": plugin, "key": key,
                    "value": value, "expiresAt": expiry(ttl),
                };
                let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
                    StateError::Unavailable("no runtime to reach MongoDB from".into())
                })?;
                let inserted = tokio::task::block_in_place(|| {
                    runtime.block_on(tokio::time::timeout(
                        STATE_TIMEOUT,
                        self.collection.insert_one(document),
                    ))
                });
                match inserted {
                    Err(_) => Err(StateError::Unavailable(
                        "MongoDB did not answer in time".into(),
                    )),
                    Ok(Ok(_)) => Ok(true),
                    Ok(Err(err)) if is_duplicate(&err) => Ok(false),
                    Ok(Err(err)) => Err(StateError::Unavailable(err.to_string())),
                }
            }
        }
    }
}
