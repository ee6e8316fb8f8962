//! Host-side bindings generated from the WIT contract in `sdk/wit/`, the one
//! source of truth shared with the SDK. Hand-written code lives beside this
//! module, never in it.

wasmtime::component::bindgen!({
    path: "../sdk/wit",
    world: "plugin",
    // The event handed to `handle` borrows the host's strings instead of
    // owning copies of them: seven fewer allocations per call.
    ownership: Borrowing {
        duplicate_if_necessary: false
    },
});
