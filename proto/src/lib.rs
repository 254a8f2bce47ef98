//! The hyperfarm gRPC contract. The `.proto` files in `proto/` are the source of truth; the Rust
//! code in `src/generated/` is generated from them by `tests/bootstrap.rs` (pure Rust: protox and
//! tonic-prost-build, no system `protoc`) and committed. That test fails when the committed code
//! is stale; run it with `HYPERFARM_BLESS=1` to regenerate.

#![allow(clippy::all, missing_docs, unused_qualifications)]

pub mod client;

/// `hyperfarm.v1`.

pub mod v1 {
    include!("generated/hyperfarm.v1.rs");
}

/// The encoded `FileDescriptorSet` of every `.proto` here, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!("generated/descriptor.bin");
