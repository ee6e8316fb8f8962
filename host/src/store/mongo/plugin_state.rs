//! Plugin state in MongoDB (`pluginState`), shared by every node: one
//! document per key, `_id` = `<plugin>/<key>` (plugin names have no `/`).
//! Plugins call it mid-call: an operation takes one or two round trips and
//! gives up at the call's deadline.

use std::time::{Duration, SystemTime};

use mongodb::Collection;
use mongodb::bson::{Bson, DateTime, Document, doc};
use mongodb::error::{ErrorKind, WriteFailure};

use super::{Mongo, PLUGIN_STATE, wait_in_plugin_call};
use crate::store::plugin_state::{
    Deadline, MAX_KEYS_PER_PLUGIN, PluginState, StateError, check_sizes,
};

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

    /// Runs `operation` from the plugin's call, until it ends or `deadline`
    /// passes.
    fn block_on<T>(
        &self,
        deadline: Deadline,
        operation: impl std::future::IntoFuture<Output = mongodb::error::Result<T>>,
    ) -> Result<T, StateError> {
        wait_in_plugin_call(deadline, operation)
            .map_err(|why| StateError::Unavailable(why.into()))?
            .map_err(|err| StateError::Unavailable(err.to_string()))
    }

    /// After a key was created: refuses it (and removes it again) when the
    /// plugin's namespace is over its cap.
    fn check_room(&self, plugin: &str, key_id: &str, deadline: Deadline) -> Result<(), StateError> {
        let live = doc! {"plugin": plugin, "$or": live_filter()};
        let count = self.block_on(deadline, self.collection.count_documents(live))?;
        if usize::try_from(count).unwrap_or(usize::MAX) > MAX_KEYS_PER_PLUGIN {
            let _ = self.block_on(deadline, self.collection.delete_one(doc! {"_id": key_id}));
            return Err(StateError::Full);
        }
        Ok(())
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
    fn get(
        &self,
        plugin: &str,
        key: &str,
        deadline: Deadline,
    ) -> Result<Option<String>, StateError> {
        check_sizes(key, None)?;
        let found = self.block_on(
            deadline,
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
        deadline: Deadline,
    ) -> Result<(), StateError> {
        check_sizes(key, Some(&value))?;
        let key_id = id(plugin, key);
        let written = self.block_on(
            deadline,
            self.collection
                .update_one(
                    doc! {"_id": &key_id},
                    doc! {
                        "$set": {"value": &value, "expiresAt": expiry(ttl)},
                        "$setOnInsert": {"plugin": plugin, "key": key},
                    },
                )
                .upsert(true),
        )?;
        if written.upserted_id.is_some() {
            self.check_room(plugin, &key_id, deadline)?;
        }
        Ok(())
    }

    fn delete(&self, plugin: &str, key: &str, deadline: Deadline) -> Result<(), StateError> {
        check_sizes(key, None)?;
        self.block_on(
            deadline,
            self.collection.delete_one(doc! {"_id": id(plugin, key)}),
        )?;
        Ok(())
    }

    fn swap(
        &self,
        plugin: &str,
        key: &str,
        expected: Option<&str>,
        value: Option<String>,
        ttl: Option<Duration>,
        deadline: Deadline,
    ) -> Result<bool, StateError> {
        check_sizes(key, value.as_deref())?;
        let key_id = id(plugin, key);
        match (expected, value) {
            (Some(expected), Some(value)) => {
                let updated = self.block_on(
                    deadline,
                    self.collection.update_one(
                        doc! {"_id": &key_id, "value": expected, "$or": live_filter()},
                        doc! {"$set": {"value": value, "expiresAt": expiry(ttl)}},
                    ),
                )?;
                Ok(updated.matched_count == 1)
            }
            (Some(expected), None) => {
                let deleted = self.block_on(
                    deadline,
                    self.collection
                        .delete_one(doc! {"_id": &key_id, "value": expected, "$or": live_filter()}),
                )?;
                Ok(deleted.deleted_count == 1)
            }
            (None, None) => {
                let found = self.block_on(
                    deadline,
                    self.collection
                        .find_one(doc! {"_id": &key_id, "$or": live_filter()}),
                )?;
                Ok(found.is_none())
            }
            (None, Some(value)) => {
                // Absent or expired: the insert decides between writers; a
                // duplicate may be an expired document, which is replaced.
                let fields = doc! {"value": &value, "expiresAt": expiry(ttl)};
                let mut document = doc! {"_id": &key_id, "plugin": plugin, "key": key};
                document.extend(fields.clone());
                let inserted = self.block_on(deadline, async {
                    match self.collection.insert_one(document).await {
                        Ok(_) => Ok(true),
                        Err(err) if is_duplicate(&err) => Ok(false),
                        Err(err) => Err(err),
                    }
                })?;
                if inserted {
                    self.check_room(plugin, &key_id, deadline)?;
                    return Ok(true);
                }
                let replaced = self.block_on(
                    deadline,
                    self.collection.update_one(
                        doc! {"_id": &key_id, "expiresAt": {"$lte": DateTime::now()}},
                        doc! {"$set": fields},
                    ),
                )?;
                Ok(replaced.matched_count == 1)
            }
        }
    }
}
