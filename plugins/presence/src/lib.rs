//! Presence: users set a status, watch other users' statuses, and hear when
//! a watched user's status changes or they come online or go offline.
//!
//! - `setStatus {"status": "available"|"busy"|"away", "text"?: "…"}` →
//!   reply `{"status", "text"}`; the user's watchers get `statusChanged`.
//! - `watchStatus {"users": ["c_1", …]}` (at most [`MAX_WATCHED`], each a
//!   user the sender may message under the `allow` role rules, as for chat)
//!   replaces the sender's watch list; the reply lists each user's
//!   `{"userId", "status", "text", "online"}`.
//! - `statusChanged {"userId", "status", "text", "online"}` is pushed to a
//!   user's watchers when it sets a status or comes online or goes offline
//!   (the host's `sockets.userOnline` / `sockets.userOffline`). Ephemeral: a
//!   client that reconnects sends `watchStatus` again and reads the reply.
//!
//! Everything is kept in the plugin's state (the host's, shared by every
//! node with MongoDB): `status/<user>` for 7 days, `watching/<user>` and
//! `watchers/<user>` as JSON lists for 7 days after the last `watchStatus`
//! that named them, changed by compare-and-set. A user's watch list is
//! dropped when it goes offline (and, should its node die first, expires).
//! Clients send `watchStatus` again after reconnecting.

use serde::{Deserialize, Serialize};
use sockets_sdk::{Delivery, Event, Failure, Host, Outcome, Plugin, UserId, lifecycle, roles};

/// Most users one `watchStatus` may watch: each costs a few state calls,
/// which with MongoDB are round trips within the call's 50 ms.
pub const MAX_WATCHED: usize = 25;
/// Most watchers of one user (their ids fit one state value).
pub const MAX_WATCHERS: usize = 200;
/// Longest status text, in characters.
const MAX_TEXT_CHARS: usize = 140;
/// How long a status is kept, in milliseconds (7 days).
const STATUS_TTL_MS: u64 = 7 * 24 * 3600 * 1000;
/// How long a watch list outlives the last `watchStatus` naming it, in
/// milliseconds (7 days): the bound on what a watcher whose node died
/// leaves behind.
const WATCH_TTL_MS: u64 = 7 * 24 * 3600 * 1000;
/// Attempts of one compare-and-set update before giving up.
const SWAP_ATTEMPTS: usize = 16;

/// The presence plugin.
pub struct Presence;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Availability {
    Available,
    Busy,
    Away,
}

/// What `status/<user>` holds.
#[derive(Serialize, Deserialize)]
struct Status {
    status: Availability,
    text: Option<String>,
}

#[derive(Deserialize)]
struct SetStatus {
    status: Availability,
    text: Option<String>,
}

#[derive(Deserialize)]
struct WatchStatus {
    users: Vec<UserId>,
}

#[derive(Deserialize, Default)]
struct Config {
    allow: Option<Vec<roles::Rule>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct StatusView<'a> {
    user_id: &'a str,
    status: Availability,
    text: Option<String>,
    online: bool,
}

impl Plugin for Presence {
    const SUBSCRIPTIONS: &'static [&'static str] = &[
        "setStatus",
        "watchStatus",
        lifecycle::USER_ONLINE,
        lifecycle::USER_OFFLINE,
    ];

    fn handle(event: &Event, host: &dyn Host) -> Result<Outcome, Failure> {
        if let Some((about, connections)) = event.lifecycle() {
            let online = connections > 0;
            let outcome = notify_watchers(host, &about.user_id, online)?;
            if event.name == lifecycle::USER_OFFLINE {
                forget_watch_list(host, &about.user_id)?;
            }
            return Ok(outcome);
        }
        let sender = event.require_client()?;
        match event.name.as_str() {
            "setStatus" => set_status(event, host, &sender.user_id),
            "watchStatus" => watch_status(event, host, &sender.user_id, &sender.role),
            other => Err(Failure::bad_request(format!("`{other}` is not handled"))),
        }
    }
}

fn set_status(event: &Event, host: &dyn Host, user: &str) -> Result<Outcome, Failure> {
    let request: SetStatus = event.data_as()?;
    if let Some(text) = &request.text
        && text.chars().count() > MAX_TEXT_CHARS
    {
        return Err(Failure::bad_request(format!(
            "`text` is at most {MAX_TEXT_CHARS} characters"
        )));
    }
    let status = Status {
        status: request.status,
        text: request.text,
    };
    host.state_set(
        &key("status", user),
        &to_json(&status)?,
        Some(STATUS_TTL_MS),
    )?;
    let outcome = notify_watchers(host, user, true)?;
    outcome.reply(&serde_json::json!({"status": status.status, "text": status.text}))
}

fn watch_status(
    event: &Event,
    host: &dyn Host,
    watcher: &str,
    role: &str,
) -> Result<Outcome, Failure> {
    let request: WatchStatus = event.data_as()?;
    let config: Config = host.config_as()?;
    if request.users.len() > MAX_WATCHED {
        return Err(Failure::bad_request(format!(
            "at most {MAX_WATCHED} users may be watched"
        )));
    }
    let mut wanted: Vec<String> = Vec::with_capacity(request.users.len());
    for user in request.users {
        let user = user.to_string();
        if user != watcher && !wanted.contains(&user) {
            let found = host
                .get_user(&user)
                .ok_or_else(|| Failure::not_found(format!("user `{user}` does not exist")))?;
            roles::check(config.allow.as_deref(), role, &found.role, "watch")?;
            wanted.push(user);
        }
    }

    // The union first: a call cut short leaves a watch list that names
    // every watcher list it may have joined, which going offline cleans.
    let before = read_list(host, &key("watching", watcher))?;
    update_list(host, &key("watching", watcher), |list| {
        for user in &wanted {
            if !list.contains(user) {
                list.push(user.clone());
            }
        }
        Ok(())
    })?;
    for user in before.iter().filter(|user| !wanted.contains(user)) {
        update_list(host, &key("watchers", user), |watchers| {
            watchers.retain(|w| w != watcher);
            Ok(())
        })?;
    }
    // Every watched user's list, not only new ones: rewriting renews its
    // TTL.
    for user in &wanted {
        update_list(host, &key("watchers", user), |watchers| {
            if !watchers.iter().any(|w| w == watcher) {
                if watchers.len() >= MAX_WATCHERS {
                    return Err(Failure::forbidden(format!(
                        "`{user}` has {MAX_WATCHERS} watchers already"
                    )));
                }
                watchers.push(watcher.to_owned());
            }
            Ok(())
        })?;
    }
    update_list(host, &key("watching", watcher), |list| {
        list.clone_from(&wanted);
        Ok(())
    })?;

    let mut statuses = Vec::with_capacity(wanted.len());
    for user in &wanted {
        let status = read_status(host, user)?;
        statuses.push(StatusView {
            user_id: user,
            status: status.status,
            text: status.text,
            online: host.connection_count(user) > 0,
        });
    }
    Outcome::new().reply(&serde_json::json!({ "statuses": statuses }))
}

/// `statusChanged` for `user`'s watchers, ephemeral; no delivery when
/// nobody watches.
fn notify_watchers(host: &dyn Host, user: &str, online: bool) -> Result<Outcome, Failure> {
    let watchers = read_list(host, &key("watchers", user))?;
    if watchers.is_empty() {
        return Ok(Outcome::new());
    }
    let status = read_status(host, user)?;
    let view = StatusView {
        user_id: user,
        status: status.status,
        text: status.text,
        online,
    };
    let mut push = Delivery::new("statusChanged", &view)?.ephemeral();
    for watcher in &watchers {
        push = push.to_user(watcher);
    }
    Ok(Outcome::new().deliver(push))
}

/// Drops an offline user's watch list, and it from its watched users'
/// watcher lists: state stays bounded by the users online.
fn forget_watch_list(host: &dyn Host, watcher: &str) -> Result<(), Failure> {
    for user in read_list(host, &key("watching", watcher))? {
        update_list(host, &key("watchers", &user), |watchers| {
            watchers.retain(|w| w != watcher);
            Ok(())
        })?;
    }
    host.state_delete(&key("watching", watcher))?;
    Ok(())
}

fn key(kind: &str, user: &str) -> String {
    format!("{kind}/{user}")
}

fn to_json(value: &impl Serialize) -> Result<String, Failure> {
    serde_json::to_string(value).map_err(|err| Failure::internal(err.to_string()))
}

fn read_status(host: &dyn Host, user: &str) -> Result<Status, Failure> {
    Ok(host
        .state_get(&key("status", user))?
        .and_then(|json| serde_json::from_str(&json).ok())
        .unwrap_or(Status {
            status: Availability::Available,
            text: None,
        }))
}

fn read_list(host: &dyn Host, key: &str) -> Result<Vec<String>, Failure> {
    Ok(host
        .state_get(key)?
        .and_then(|json| serde_json::from_str(&json).ok())
        .unwrap_or_default())
}

/// Changes the JSON list at `key` by compare-and-set, retried while other
/// instances (or nodes) change it at the same time; an empty list is
/// removed.
fn update_list(
    host: &dyn Host,
    key: &str,
    change: impl Fn(&mut Vec<String>) -> Result<(), Failure>,
) -> Result<(), Failure> {
    for _ in 0..SWAP_ATTEMPTS {
        let current = host.state_get(key)?;
        let mut list: Vec<String> = current
            .as_deref()
            .and_then(|json| serde_json::from_str(json).ok())
            .unwrap_or_default();
        change(&mut list)?;
        let next = if list.is_empty() {
            None
        } else {
            Some(to_json(&list)?)
        };
        if next.is_none() && current.is_none() {
            return Ok(());
        }
        // Written even when unchanged: that renews the TTL.
        if host.state_swap(key, current.as_deref(), next.as_deref(), Some(WATCH_TTL_MS))? {
            return Ok(());
        }
    }
    Err(Failure::internal(format!("`{key}` kept changing")))
}

sockets_sdk::export_plugin!(Presence);

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};
    use sockets_sdk::testing::{TestHost, client_event, lifecycle_event};
    use sockets_sdk::{ErrorCode, Recipient};

    use super::*;

    fn directory() -> TestHost {
        TestHost::new()
            .with_user("s_1", "student")
            .with_user("s_2", "student")
            .with_user("c_1", "consultant")
            .with_user("c_2", "consultant")
    }

    fn send(host: &TestHost, from: &str, name: &str, data: Value) -> Result<Outcome, Failure> {
        Presence::handle(
            &client_event(name, from, "student", &data.to_string()),
            host,
        )
    }

    fn reply(outcome: &Outcome) -> Value {
        serde_json::from_str(&outcome.reply.as_ref().unwrap().data).unwrap()
    }

    #[test]
    fn watchers_hear_status_changes_ephemerally() {
        let host = directory().with_connections("c_1", 1);
        let watched = send(&host, "s_1", "watchStatus", json!({"users": ["c_1"]})).unwrap();
        assert_eq!(
            reply(&watched),
            json!({"statuses": [{"userId": "c_1", "status": "available", "text": null, "online": true}]})
        );
        send(&host, "s_2", "watchStatus", json!({"users": ["c_1"]})).unwrap();

        let set = send(
            &host,
            "c_1",
            "setStatus",
            json!({"status": "busy", "text": "in a session"}),
        )
        .unwrap();
        assert_eq!(
            reply(&set),
            json!({"status": "busy", "text": "in a session"})
        );
        let push = &set.deliveries[0];
        assert!(push.ephemeral);
        assert_eq!(push.event, "statusChanged");
        assert_eq!(
            push.to,
            vec![Recipient::User("s_1".into()), Recipient::User("s_2".into())]
        );
        let data: Value = serde_json::from_str(&push.data).unwrap();
        assert_eq!(
            data,
            json!({"userId": "c_1", "status": "busy", "text": "in a session", "online": true})
        );
    }

    #[test]
    fn online_and_offline_reach_watchers_and_offline_forgets_the_watch_list() {
        let host = directory();
        send(&host, "s_1", "watchStatus", json!({"users": ["c_1"]})).unwrap();
        let online = Presence::handle(
            &lifecycle_event(lifecycle::USER_ONLINE, "c_1", "consultant", 1),
            &host,
        )
        .unwrap();
        let data: Value = serde_json::from_str(&online.deliveries[0].data).unwrap();
        assert_eq!(data["online"], true);
        let offline = Presence::handle(
            &lifecycle_event(lifecycle::USER_OFFLINE, "c_1", "consultant", 0),
            &host,
        )
        .unwrap();
        let data: Value = serde_json::from_str(&offline.deliveries[0].data).unwrap();
        assert_eq!(data["online"], false);

        // The watcher goes offline: its watch list and its place in c_1's
        // watchers are dropped.
        Presence::handle(
            &lifecycle_event(lifecycle::USER_OFFLINE, "s_1", "student", 0),
            &host,
        )
        .unwrap();
        assert!(host.state().is_empty(), "{:?}", host.state());
    }

    #[test]
    fn a_new_watch_list_replaces_the_old_one() {
        let host = directory();
        let watch = |users: Value| send(&host, "s_1", "watchStatus", json!({ "users": users }));
        watch(json!(["c_1", "c_2"])).unwrap();
        watch(json!(["c_2"])).unwrap();
        let state = host.state();
        assert_eq!(state.get("watchers/c_1"), None);
        assert_eq!(state["watchers/c_2"], r#"["s_1"]"#);
        assert_eq!(state["watching/s_1"], r#"["c_2"]"#);
        // Renewed on every watchStatus, so a stable list does not expire.
        assert_eq!(host.state_ttl("watchers/c_2"), Some(WATCH_TTL_MS));
    }

    #[test]
    fn only_users_one_may_message_may_be_watched() {
        let host = directory();
        let refused = send(&host, "s_1", "watchStatus", json!({"users": ["s_2"]})).unwrap_err();
        assert_eq!(refused.code, ErrorCode::Forbidden);
        assert!(
            host.state().is_empty(),
            "nothing written: {:?}",
            host.state()
        );
        let open = directory().with_config(r#"{"allow":[{"from":"*","to":"*"}]}"#);
        assert!(send(&open, "s_1", "watchStatus", json!({"users": ["s_2"]})).is_ok());
    }

    #[test]
    fn bad_requests_are_refused() {
        let host = directory();
        let code = |result: Result<Outcome, Failure>| result.unwrap_err().code;
        assert_eq!(
            code(send(&host, "s_1", "setStatus", json!({"status": "asleep"}))),
            ErrorCode::BadRequest
        );
        let long = "x".repeat(MAX_TEXT_CHARS + 1);
        assert_eq!(
            code(send(
                &host,
                "s_1",
                "setStatus",
                json!({"status": "away", "text": long})
            )),
            ErrorCode::BadRequest
        );
        let many: Vec<String> = (0..=MAX_WATCHED).map(|i| format!("u{i}")).collect();
        assert_eq!(
            code(send(&host, "s_1", "watchStatus", json!({ "users": many }))),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code(send(
                &host,
                "s_1",
                "watchStatus",
                json!({"users": ["nobody"]})
            )),
            ErrorCode::NotFound
        );
    }
}
