//! A plugin as plugins were built before the 0.2 contract: generated
//! straight from `sdk/wit-0.1/` (the SDK now builds 0.2). `legacyPing
//! {"to": user}` uses every 0.1 feature: the directory (`not_found` for an
//! unknown user), the user's connection count, the configuration, the log,
//! a push to the user and to the sender's other connections, and a reply
//! whose `delivered` the host fills in.

#[allow(unsafe_code, missing_docs, clippy::all)]
mod bindings {
    wit_bindgen::generate!({ path: "../../../sdk/wit-0.1", world: "plugin" });
}

use bindings::sockets::plugin::host;
use bindings::sockets::plugin::types::{
    Delivery, ErrorCode, Event, Failure, Info, Origin, Outcome, Recipient, Reply,
};

struct Legacy;

impl bindings::Guest for Legacy {
    fn info() -> Info {
        Info {
            name: "legacy".into(),
            version: env!("CARGO_PKG_VERSION").into(),
        }
    }

    fn subscriptions() -> Vec<String> {
        vec!["legacyPing".into()]
    }

    fn handle(event: Event) -> Result<Outcome, Failure> {
        let failure = |code, message: &str| Failure {
            code,
            message: message.into(),
        };
        let Origin::Client(sender) = &event.origin else {
            return Err(failure(ErrorCode::Forbidden, "clients only"));
        };
        let data: serde_json::Value = serde_json::from_str(&event.data)
            .map_err(|_| failure(ErrorCode::BadRequest, "data must be JSON"))?;
        let to = data["to"]
            .as_str()
            .ok_or_else(|| failure(ErrorCode::BadRequest, "`to` is required"))?;
        let user =
            host::get_user(to).ok_or_else(|| failure(ErrorCode::NotFound, "no such user"))?;
        host::log(host::Level::Info, &format!("legacyPing to {}", user.id));
        let pong = serde_json::json!({
            "from": sender.user_id,
            "online": host::connection_count(&user.id),
            "config": serde_json::from_str::<serde_json::Value>(&host::config()).unwrap_or_default(),
        });
        Ok(Outcome {
            deliveries: vec![Delivery {
                to: vec![Recipient::User(user.id), Recipient::SenderOthers],
                event: "legacyPong".into(),
                data: pong.to_string(),
            }],
            reply: Some(Reply {
                data: r#"{"pong":true}"#.into(),
                delivered_field: Some("delivered".into()),
            }),
        })
    }
}

#[allow(unsafe_code)]
mod export {
    use super::{Legacy, bindings};
    bindings::export!(Legacy with_types_in bindings);
}
