//! Host-side bindings generated from the WIT contracts, one module per
//! contract version: `sdk/wit/` (0.2, what the SDK builds) and
//! `sdk/wit-0.1/` (0.1, frozen, still loaded). Hand-written code lives
//! beside this module, never in it.

/// `sockets:plugin@0.2.0`.
pub mod v2 {
    wasmtime::component::bindgen!({
        path: "../sdk/wit",
        world: "plugin",
        // The event handed to `handle` borrows the host's strings instead of
        // owning copies of them: seven fewer allocations per call.
        ownership: Borrowing {
            duplicate_if_necessary: false
        },
    });
}

/// `sockets:plugin@0.1.0`, as plugins built before 0.2 import it.
pub mod v1 {
    wasmtime::component::bindgen!({
        path: "../sdk/wit-0.1",
        world: "plugin",
        ownership: Borrowing {
            duplicate_if_necessary: false
        },
    });
}
