//! The library both sides of hyperfarm use.
//!
//! - [`manifest`]: the Artifact Manifest v1.0 (hyper2kvm's schema plus our additions), parsing and
//!   validation.
//! - [`queue`]: the job queue on shared storage (NFS in production): publish, claim, lease, states,
//!   recovery, seed-style manifest drops. The contract is written down in `docs/protocol.md`.
//! - [`results`]: how results become visible in the output directory (`<vm>.qcow2`, `<vm>.error`, the
//!   per-job result record).
//! - [`engine`]: the conversion engines (qemu-img built in) and the safety inspection of disk images.
//! - [`fsx`], [`digest`], [`format`]: durable file-system steps (and bounded, non-blocking reads of
//!   files anyone could plant), blake3/sha256 digests, format detection.
//! - [`text`]: escaping text from outside before it reaches a terminal or a log.
//!
//! This crate knows nothing of gRPC, command-line parsing or global logging set-up.

pub mod digest;
pub mod duration;
pub mod engine;
pub mod failpoint;
pub mod format;
pub mod fsx;
pub mod human;
pub mod instance;
pub mod jobid;
pub mod libvirt;
pub mod manifest;
pub mod names;
pub mod progress;
pub mod queue;
pub mod results;
pub mod storage;
pub mod text;
pub mod timefmt;
pub mod tree_hash;
pub mod vmdk;
pub mod worker;

pub use jobid::JobId;
