//! The `users` directory in MongoDB (read-only), behind the plugins'
//! synchronous `get-user`: answers from a cache with expiry, and looks a
//! missing user up with a short timeout (plugin calls have a 50 ms
//! deadline); a stale entry is better than none while the database is away.

use std::time::{Duration, Instant};

use mongodb::Collection;
use mongodb::bson::{Document, doc};

use super::{Mongo, USERS, wait_in_plugin_call};
use crate::store::directory::{User, UserDirectory};

/// How long a found user is trusted.
const FOUND_TTL: Duration = Duration::from_secs(60);
/// How long "no such user" is trusted (a user may be created meanwhile).
const MISSING_TTL: Duration = Duration::from_secs(5);
/// How long an entry is kept past its trust, to answer while the database
/// does not.
const STALE_LIMIT: Duration = Duration::from_secs(600);
const LOOKUP_TIMEOUT: Duration = Duration::from_millis(20);
/// Entries kept at most. Clients choose the ids looked up (`to`), so the
/// cache is bounded (least recently used go first); ids are at most
/// `SOCKETS_MAX_USER_ID_BYTES` long, so this bounds its memory too.
const MAX_ENTRIES: u64 = 100_000;

#[derive(Clone)]
struct Entry {
    user: Option<User>,
    fresh_until: Instant,
}

/// The user directory in MongoDB.
pub struct MongoDirectory {
    collection: Collection<Document>,
    cache: moka::sync::Cache<String, Entry>,
}

impl std::fmt::Debug for MongoDirectory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MongoDirectory").finish_non_exhaustive()
    }
}

impl MongoDirectory {
    /// A directory over the `users` collection.
    pub fn new(mongo: &Mongo) -> Self {
        Self {
            collection: mongo.db.collection(USERS),
            cache: moka::sync::Cache::builder()
                .max_capacity(MAX_ENTRIES)
                .time_to_live(STALE_LIMIT)
                .build(),
        }
    }

    fn lookup(&self, id: &str) -> Option<Option<User>> {
        let found = wait_in_plugin_call(
            Instant::now() + LOOKUP_TIMEOUT,
            self.collection.find_one(doc! {"_id": id}),
        )
        .ok()?
        .ok()?;
        Some(found.and_then(|document| user(&document)))
    }
}

fn user(document: &Document) -> Option<User> {
    Some(User {
        id: document.get_str("_id").ok()?.to_owned(),
        role: document.get_str("role").unwrap_or("user").to_owned(),
        name: document.get_str("name").ok().map(str::to_owned),
    })
}

impl UserDirectory for MongoDirectory {
    fn get_user(&self, id: &str) -> Option<User> {
        let now = Instant::now();
        let cached = self.cache.get(id);
        if let Some(entry) = &cached
            && entry.fresh_until > now
        {
            return entry.user.clone();
        }
        let Some(found) = self.lookup(id) else {
            // The database did not answer in time: keep what we knew.
            return cached.and_then(|entry| entry.user);
        };
        let ttl = if found.is_some() {
            FOUND_TTL
        } else {
            MISSING_TTL
        };
        self.cache.insert(
            id.to_owned(),
            Entry {
                user: found.clone(),
                fresh_until: now + ttl,
            },
        );
        found
    }
}
