//! Integration tests: real binaries, real qemu-img, real processes and signals, one fresh
//! directory tree per test. Build the binaries first (`scripts/test` does).

#![allow(clippy::unwrap_used)]

mod agent_lifecycle;
mod api_load;
mod crash;
mod cross_host;
mod exporter;
mod faults;
mod formats;
mod grpc;
mod hostile;
mod hostile_exporter;
mod hostile_queue;
mod hyper2kvm;
mod interactive;
mod libvirt;
mod metrics;
mod netns;
mod races;
mod seed;
mod serve;
mod vsphere;
