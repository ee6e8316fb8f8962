//! Write routing plugins for the sockets host.
//!
//! A plugin is a WebAssembly component that the host hands every event it
//! subscribes to; it answers with the deliveries to make and, for client
//! events, the reply. Implement [`Plugin`], export it with
//! [`export_plugin!`], build with `cargo build --target wasm32-wasip2`:
//!
//! ```
//! use serde::{Deserialize, Serialize};
//! use sockets_sdk::{Delivery, Event, Failure, Host, NonEmptyString, Outcome, Plugin};
//!
//! pub struct Echo;
//!
//! #[derive(Deserialize)]
//! struct Ping { text: NonEmptyString }
//!
//! #[derive(Serialize)]
//! struct Pong<'a> { text: &'a str }
//!
//! impl Plugin for Echo {
//!     const SUBSCRIPTIONS: &'static [&'static str] = &["ping"];
//!
//!     fn handle(event: &Event, _host: &dyn Host) -> Result<Outcome, Failure> {
//!         let client = event.require_client()?;
//!         let ping: Ping = event.data_as()?;
//!         let pong = Delivery::new("pong", &Pong { text: &ping.text })?.to_user(&client.user_id);
//!         Ok(Outcome::new().deliver(pong))
//!     }
//! }
//!
//! sockets_sdk::export_plugin!(Echo);
//! ```
//!
//! Plugin logic is tested natively with [`testing::TestHost`], a stand-in for
//! the host's user directory, presence, configuration and log.

#![deny(missing_docs)]

mod helpers;
mod host;
pub mod roles;
pub mod testing;

pub use helpers::{MAX_USER_ID_BYTES, NonEmptyString, UserId};
pub use host::Host;

/// Bindings generated from `wit/plugin.wit`; plugin authors use the
/// re-exports at the crate root instead.
#[doc(hidden)]
#[allow(unsafe_code, missing_docs, clippy::all)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "wit",
        world: "plugin",
        pub_export_macro: true,
        export_macro_name: "__export_plugin_world",
        default_bindings_module: "sockets_sdk::bindings",
        additional_derives: [PartialEq, Eq],
    });
}

pub use bindings::sockets::plugin::host::Level;
pub use bindings::sockets::plugin::types::{
    Client, Delivery, EmittedEvent, ErrorCode, Event, Failure, Info, Origin, Outcome, Recipient,
    Reply, StateError, User,
};

/// The lifecycle events the host raises for plugins that subscribe to them
/// (their origin is [`Origin::Lifecycle`]; see [`Event::lifecycle`]).
pub mod lifecycle {
    /// A connection opened.
    pub const CONNECTION_OPENED: &str = "sockets.connectionOpened";
    /// A connection closed.
    pub const CONNECTION_CLOSED: &str = "sockets.connectionClosed";
    /// A user's first live connection in the cluster opened.
    pub const USER_ONLINE: &str = "sockets.userOnline";
    /// A user's last live connection in the cluster closed.
    pub const USER_OFFLINE: &str = "sockets.userOffline";
}

/// A routing plugin: the event names it handles and what it does with one.
pub trait Plugin {
    /// Event names this plugin handles (client event names such as
    /// `sendMessage`, or broker events such as `PAYMENT_PROCESSED`).
    const SUBSCRIPTIONS: &'static [&'static str];

    /// Decides the deliveries and reply for one event.
    ///
    /// A returned [`Failure`] is reported to the sender with its code; a
    /// panic is isolated by the host and reported as `plugin_failed`.
    fn handle(event: &Event, host: &dyn Host) -> Result<Outcome, Failure>;
}

/// Exports a [`Plugin`] implementation as the component's entry points.
///
/// The declared name and version are the plugin crate's `CARGO_PKG_NAME`
/// and `CARGO_PKG_VERSION`.
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        #[allow(unsafe_code)]
        const _: () = {
            struct __SocketsPluginExport;

            impl $crate::bindings::Guest for __SocketsPluginExport {
                fn info() -> $crate::Info {
                    $crate::Info {
                        name: ::std::string::String::from(env!("CARGO_PKG_NAME")),
                        version: ::std::string::String::from(env!("CARGO_PKG_VERSION")),
                    }
                }

                fn subscriptions() -> ::std::vec::Vec<::std::string::String> {
                    <$plugin as $crate::Plugin>::SUBSCRIPTIONS
                        .iter()
                        .map(|name| ::std::string::String::from(*name))
                        .collect()
                }

                fn handle(
                    event: $crate::Event,
                ) -> ::std::result::Result<$crate::Outcome, $crate::Failure> {
                    <$plugin as $crate::Plugin>::handle(&event, &$crate::__private::ComponentHost)
                }
            }

            $crate::bindings::__export_plugin_world!(__SocketsPluginExport with_types_in $crate::bindings);
        };
    };
}

/// Support code for [`export_plugin!`]; not part of the public API.
#[doc(hidden)]
pub mod __private {
    pub use crate::host::ComponentHost;
}
