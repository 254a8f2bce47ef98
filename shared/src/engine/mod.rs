//! Conversion engines and the safety inspection of source images.
//!
//! The built-in engine is qemu-img ([`qemu_img`]). Every image is inspected with
//! `qemu-img info` before it is converted: its real format must match the declared one, and it
//! must not reach for other files (backing files, external data files, VMDK extents outside the
//! allowed directories).

pub mod hyper2kvm;
pub mod inspect;
pub mod process;
pub mod qemu_img;
pub mod sandbox;

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use inspect::{ImageInfo, InspectError, inspect_image};
pub use qemu_img::{ConvertOptions, QemuImg};

/// Errors of an engine run.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(
        "cannot start {program}: {source}; check that it is installed and on PATH (or set its path in the configuration)"
    )]
    Spawn {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} failed ({status}): {stderr}")]
    Failed { program: String, status: String, stderr: String },
    #[error("{program} did not finish within {}s and was killed", timeout.as_secs())]
    Timeout { program: String, timeout: Duration },
    #[error("cancelled")]
    Cancelled,
    #[error("{0}")]
    Output(String),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// Which engine converts a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum EngineKind {
    #[default]
    QemuImg,
    Hyper2kvm,
}

impl EngineKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EngineKind::QemuImg => "qemu-img",
            EngineKind::Hyper2kvm => "hyper2kvm",
        }
    }
}

/// Which engine an agent (or a job) asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum EngineChoice {
    /// hyper2kvm when a usable one is found, else qemu-img.
    #[default]
    Auto,
    QemuImg,
    Hyper2kvm,
}

impl EngineChoice {
    pub fn parse(s: &str) -> Option<EngineChoice> {
        match s {
            "auto" => Some(EngineChoice::Auto),
            "qemu-img" => Some(EngineChoice::QemuImg),
            "hyper2kvm" => Some(EngineChoice::Hyper2kvm),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            EngineChoice::Auto => "auto",
            EngineChoice::QemuImg => "qemu-img",
            EngineChoice::Hyper2kvm => "hyper2kvm",
        }
    }
}

impl std::fmt::Display for EngineKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
