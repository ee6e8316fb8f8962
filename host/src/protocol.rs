//! Rules of the wire protocol (PROTOCOL.md §2) shared by every module that
//! accepts or produces event names.

/// Longest event name, in characters.
pub const MAX_EVENT_NAME_CHARS: usize = 64;

/// Whether `name` is a valid event name: 1–64 chars of `[A-Za-z0-9_.:-]`.
pub fn is_valid_event_name(name: &str) -> bool {
    (1..=MAX_EVENT_NAME_CHARS).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_names_follow_the_protocol() {
        for good in [
            "a",
            "sendMessage",
            "PAYMENT_PROCESSED",
            "chat.v2:typing-start",
            &"x".repeat(64),
        ] {
            assert!(is_valid_event_name(good), "{good}");
        }
        for bad in ["", "with space", "émoji", "a/b", &"x".repeat(65)] {
            assert!(!is_valid_event_name(bad), "{bad}");
        }
    }
}
