//! The host's bindings to the filter ABI (`sdk/wit/`), generated in this one module; async
//! and trap choices sit here. Header phases are plain calls; only the outbound HTTP call is
//! async on the host (the guest sees a blocking call), which makes every export an async call
//! on a fiber.

wasmtime::component::bindgen!({
    path: "../sdk/wit",
    world: "filter",
    imports: {
        "weir:filter/outbound.call": async,
    },
    exports: { default: async },
});

pub use self::weir::filter::types;
