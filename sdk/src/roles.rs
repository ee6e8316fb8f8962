//! Who may address whom, by role: the rule list chat and typing share, so
//! that a user who may not message someone may not show them typing either.
//!
//! ```json
//! {"allow": [{"from": "student", "to": "consultant"}, {"from": "consultant", "to": "student"}]}
//! ```
//!
//! `"*"` matches any role. Without an `allow` list only students and
//! consultants may address each other.

use std::borrow::Cow;

use serde::Deserialize;

use crate::Failure;

/// One allowed (sender role, recipient role) pair.
#[derive(Debug, Clone, Deserialize)]
pub struct Rule {
    from: Cow<'static, str>,
    to: Cow<'static, str>,
}

impl Rule {
    /// `from` may address `to`.
    pub const fn new(from: &'static str, to: &'static str) -> Self {
        Self {
            from: Cow::Borrowed(from),
            to: Cow::Borrowed(to),
        }
    }

    fn permits(&self, from_role: &str, to_role: &str) -> bool {
        let matches = |pattern: &str, role: &str| pattern == "*" || pattern == role;
        matches(&self.from, from_role) && matches(&self.to, to_role)
    }
}

/// Students and consultants address each other. Static: configurations are
/// read per event, and most deployments set none.
pub const DEFAULT_RULES: &[Rule] = &[
    Rule::new("student", "consultant"),
    Rule::new("consultant", "student"),
];

/// Checks `from_role` → `to_role` against `rules` (the defaults when
/// `None`); a pair no rule allows is `forbidden`, in the words of `what`
/// (e.g. "message").
pub fn check(
    rules: Option<&[Rule]>,
    from_role: &str,
    to_role: &str,
    what: &str,
) -> Result<(), Failure> {
    let rules = rules.unwrap_or(DEFAULT_RULES);
    if rules.iter().any(|rule| rule.permits(from_role, to_role)) {
        Ok(())
    } else {
        Err(Failure::forbidden(format!(
            "a {from_role} may not {what} a {to_role}"
        )))
    }
}
