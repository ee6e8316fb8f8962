//! The health of a dependency (broker link, database), for `/readyz`.

use std::sync::{Mutex, PoisonError};

/// `None` while the dependency is usable; the last error otherwise.
#[derive(Debug, Default)]
pub struct Health {
    problem: Mutex<Option<String>>,
}

impl Health {
    /// A dependency that starts degraded (not connected yet).
    pub fn connecting() -> Self {
        Self {
            problem: Mutex::new(Some("not connected yet".to_owned())),
        }
    }

    /// Records the dependency's state: `None` when usable.
    pub fn set(&self, problem: Option<String>) {
        *self.problem.lock().unwrap_or_else(PoisonError::into_inner) = problem;
    }

    /// `None` when usable, else what is wrong.
    pub fn problem(&self) -> Option<String> {
        self.problem
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}
