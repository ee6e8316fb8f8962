//! The user directory: who exists and with which role (the seed's
//! getUserByID / getConsultantByID). Plugins reach it through the host's
//! `get-user`.

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// A user of the directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// The user id (a token's `sub`).
    #[serde(alias = "_id")]
    pub id: String,
    /// The user's role, e.g. `student` or `consultant`.
    pub role: String,
    /// Display name, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// Why a users file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum DirectoryError {
    /// The file could not be read.
    #[error("cannot read users file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not a JSON array of users.
    #[error("invalid users file {path}: {source}")]
    Parse {
        /// The file.
        path: String,
        /// The JSON error.
        source: serde_json::Error,
    },
}

/// Where users are looked up: a users file here, MongoDB's `users` in
/// production. Answers synchronously: plugins call it mid-`handle`.
pub trait UserDirectory: Send + Sync + 'static {
    /// Looks a user up.
    fn get_user(&self, id: &str) -> Option<User>;
}

/// A directory held in memory, loaded from a JSON users file:
/// `[{"id": "s_1", "role": "student", "name": "Sam"}, …]`.
#[derive(Debug, Clone, Default)]
pub struct FileDirectory {
    users: HashMap<String, User>,
}

impl FileDirectory {
    /// Loads a users file.
    pub fn load(path: &Path) -> Result<Self, DirectoryError> {
        let text = std::fs::read_to_string(path).map_err(|source| DirectoryError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let users: Vec<User> =
            serde_json::from_str(&text).map_err(|source| DirectoryError::Parse {
                path: path.display().to_string(),
                source,
            })?;
        Ok(Self::from_users(users))
    }

    /// A directory of the given users.
    pub fn from_users(users: impl IntoIterator<Item = User>) -> Self {
        Self {
            users: users
                .into_iter()
                .map(|user| (user.id.clone(), user))
                .collect(),
        }
    }

    /// Looks a user up.
    pub fn get(&self, id: &str) -> Option<&User> {
        self.users.get(id)
    }

    /// Every user, by id.
    pub fn users(&self) -> Vec<User> {
        let mut users: Vec<User> = self.users.values().cloned().collect();
        users.sort_by(|a, b| a.id.cmp(&b.id));
        users
    }
}

impl UserDirectory for FileDirectory {
    fn get_user(&self, id: &str) -> Option<User> {
        self.get(id).cloned()
    }
}

/// The demo users file shipped with the project, used when none is configured.
pub fn demo_users_file() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/demo/users.json"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_demo_file_has_students_and_consultants() {
        let directory = FileDirectory::load(demo_users_file()).unwrap();
        assert_eq!(directory.get("s_1").unwrap().role, "student");
        assert_eq!(directory.get("c_1").unwrap().role, "consultant");
        assert!(directory.get("nobody").is_none());
    }

    #[test]
    fn a_malformed_file_is_reported_with_its_path() {
        let path = std::env::temp_dir().join(format!("users-{}.json", std::process::id()));
        std::fs::write(&path, r#"{"not":"a list"}"#).unwrap();
        let err = FileDirectory::load(&path).unwrap_err();
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
        std::fs::remove_file(path).unwrap();
    }
}
