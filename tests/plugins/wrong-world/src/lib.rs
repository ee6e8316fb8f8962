//! A component of another world (a `handle` with a different signature and
//! none of the plugin exports), for the runtime's load-time checks.

#[allow(unsafe_code, missing_docs)]
mod bindings {
    wit_bindgen::generate!({ path: "wit", world: "thing" });
}

struct Thing;

impl bindings::Guest for Thing {
    fn handle(input: u32) -> u32 {
        input + 1
    }
}

#[allow(unsafe_code)]
mod export {
    use super::{Thing, bindings};
    bindings::export!(Thing with_types_in bindings);
}
