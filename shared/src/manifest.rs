//! The Artifact Manifest v1.0: hyper2kvm's schema, plus hyperfarm's additions in places hyper2kvm
//! 0.2.1 ignores (a top-level `hyperfarm` object and a `blake3` key in each disk entry).
//!
//! Parsing tolerates and preserves unknown fields, because exporters and agents of different
//! versions meet on a shared queue. Validation ([`Manifest::check`]) rejects what would be unsafe or
//! meaningless: bad names, duplicate ids, unknown formats, absurd sizes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::format::DiskFormat;
use crate::jobid::JobId;
use crate::names::{self, BadName};

/// The only manifest version hyper2kvm 0.2.1 accepts, and the one we write.
pub const MANIFEST_VERSION: &str = "1.0";
/// The version of our `hyperfarm` extension object.
pub const HYPERFARM_SCHEMA_VERSION: u32 = 1;
/// A manifest larger than this is refused before it is parsed.
pub const MAX_MANIFEST_BYTES: u64 = 1024 * 1024;
/// At most this many disks per VM.
pub const MAX_DISKS: usize = 64;
/// Largest declared disk file: 64 TiB (VMware's own limit is 62 TiB).
pub const MAX_DISK_BYTES: u64 = 64 << 40;

type Extra = Map<String, Value>;

/// An Artifact Manifest v1.0.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub manifest_version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Source>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<VmInfo>,
    pub disks: Vec<Disk>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline: Option<Pipeline>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Output>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Extra>,
    /// hyperfarm's additions. hyper2kvm ignores unknown top-level keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hyperfarm: Option<HyperfarmInfo>,
    #[serde(flatten)]
    pub extra: Extra,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Source {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_name: Option<String>,
    #[serde(flatten)]
    pub extra: Extra,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct VmInfo {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<u32>,
    /// hyper2kvm requires an integer >= 1; we round memory up to whole GiB here and keep the exact
    /// figure in `hyperfarm.memory_mib`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_gb: Option<u64>,
    /// `bios`, `uefi` or `unknown` (hyper2kvm's vocabulary).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<String>,
    #[serde(flatten)]
    pub extra: Extra,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Disk {
    pub id: String,
    pub source_format: String,
    /// The size of the file at `local_path`, in bytes.
    pub bytes: u64,
    /// Relative to the job directory for jobs published by hyperexport; for seed-style manifest
    /// drops, absolute or relative to the watch directory.
    pub local_path: String,
    /// `sha256:<hex>` (hyper2kvm's format). Verified when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_order_hint: Option<u32>,
    /// `boot`, `data` or `unknown`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// Our addition: the blake3 digest of the whole file, 64 lowercase hex digits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blake3: Option<String>,
    #[serde(flatten)]
    pub extra: Extra,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Pipeline {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inspect: Option<Stage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fix: Option<Stage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub convert: Option<Stage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validate: Option<Stage>,
    /// Our addition: `auto`, `qemu-img` or `hyper2kvm`, overriding the agent's engine for this job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<String>,
    #[serde(flatten)]
    pub extra: Extra,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Stage {
    #[serde(default)]
    pub enabled: bool,
    #[serde(flatten)]
    pub extra: Extra,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Output {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub directory: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filename: Option<String>,
    #[serde(flatten)]
    pub extra: Extra,
}

/// hyperfarm's extension object.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HyperfarmInfo {
    pub schema_version: u32,
    pub job_id: JobId,
    /// RFC 3339 time of submission.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub submitted_by: Option<Submitter>,
    /// The VM's memory in MiB (hyper2kvm's `vm.mem_gb` is whole GiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
    #[serde(flatten)]
    pub extra: Extra,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Submitter {
    pub host: String,
    pub pid: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool: Option<String>,
}

/// Why a manifest was refused. The text is what an operator reads in `<vm>.error`.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("the manifest is larger than {} bytes ({size} bytes); it cannot be a real manifest", MAX_MANIFEST_BYTES)]
    TooLarge { size: u64 },
    #[error("the manifest is not valid JSON: {0}")]
    Json(String),
    #[error("the manifest has a wrong or missing field: {0}")]
    Schema(String),
    #[error("manifest_version is {0:?}; only \"1.0\" (Artifact Manifest v1.0) is supported")]
    Version(String),
    #[error("the manifest lists no disks")]
    NoDisks,
    #[error("the manifest lists {0} disks; at most {MAX_DISKS} are supported")]
    TooManyDisks(usize),
    #[error("disks[{index}]: {source}")]
    BadDiskId {
        index: usize,
        #[source]
        source: BadName,
    },
    #[error("disks[{index}]: the disk id {id:?} appears twice")]
    DuplicateDiskId { index: usize, id: String },
    #[error("disk {id}: source_format {format:?} is not supported (supported: raw, qcow2, vmdk, vhd, vhdx, vdi)")]
    BadFormat { id: String, format: String },
    #[error("disk {id}: bytes = {bytes} is larger than the {} TiB limit", MAX_DISK_BYTES >> 40)]
    TooBig { id: String, bytes: u64 },
    #[error("disk {id}: local_path is empty")]
    EmptyPath { id: String },
    #[error("disk {id}: {field} {value:?} is not {expected}")]
    BadDigest { id: String, field: &'static str, value: String, expected: &'static str },
    #[error("disk {id}: disk_type {value:?} is not one of boot, data, unknown")]
    BadDiskType { id: String, value: String },
    #[error("the manifest names no VM: set source.vm_name (or vm.name)")]
    NoVmName,
    #[error("{0}; rename the VM (hyperexport --name) so that its output file name is safe")]
    BadVmName(#[source] BadName),
    #[error("vm.firmware {0:?} is not one of bios, uefi, unknown")]
    BadFirmware(String),
    #[error("vm.{field} = {value} is out of range ({range})")]
    OutOfRange { field: &'static str, value: u64, range: &'static str },
    #[error("pipeline.engine {0:?} is not one of auto, qemu-img, hyper2kvm")]
    BadEngine(String),
    #[error("output.format {0:?} is not supported; hyperfarm publishes qcow2")]
    BadOutputFormat(String),
    #[error(
        "hyperfarm.schema_version {0} is newer than this program understands ({HYPERFARM_SCHEMA_VERSION}); upgrade the agent"
    )]
    FutureSchema(u32),
}

/// A digest a disk must match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expected {
    Blake3([u8; 32]),
    Sha256([u8; 32]),
}

impl Expected {
    pub fn algorithm(&self) -> &'static str {
        match self {
            Expected::Blake3(_) => "blake3",
            Expected::Sha256(_) => "sha256",
        }
    }
    pub fn hex(&self) -> String {
        match self {
            Expected::Blake3(d) | Expected::Sha256(d) => crate::digest::to_hex(d),
        }
    }
}

/// One disk after validation.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckedDisk {
    pub id: String,
    pub format: DiskFormat,
    pub bytes: u64,
    pub local_path: String,
    /// Strongest digest declared (blake3 preferred over sha256), if any.
    pub expected: Option<Expected>,
    pub boot: bool,
}

/// The parts of a manifest the agent acts on, validated. Disks are in boot order: the boot disk
/// first.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckedManifest {
    pub vm_name: String,
    pub job_id: Option<JobId>,
    pub disks: Vec<CheckedDisk>,
    pub engine: Option<String>,
    pub stages: Stages,
}

/// Which hyper2kvm pipeline stages a job asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Stages {
    pub inspect: bool,
    pub fix: bool,
    pub convert: bool,
    pub validate: bool,
}

impl Manifest {
    /// Parse manifest bytes. Unknown fields are kept; types are checked; the error names the field.
    pub fn parse(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        if bytes.len() as u64 > MAX_MANIFEST_BYTES {
            return Err(ManifestError::TooLarge { size: bytes.len() as u64 });
        }
        let value: Value = serde_json::from_slice(bytes).map_err(|e| ManifestError::Json(e.to_string()))?;
        if !value.is_object() {
            return Err(ManifestError::Schema("the manifest must be a JSON object".into()));
        }
        let manifest: Manifest = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            ManifestError::Schema(format!("{path}: {}", e.into_inner()))
        })?;
        Ok(manifest)
    }

    /// Serialise as pretty JSON (what we write into a job).
    pub fn to_json(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec_pretty(self).expect("a manifest always serialises");
        out.push(b'\n');
        out
    }

    /// The VM name: `source.vm_name`, else `vm.name`.
    pub fn vm_name(&self) -> Option<&str> {
        self.source
            .as_ref()
            .and_then(|s| s.vm_name.as_deref())
            .or_else(|| self.vm.as_ref().and_then(|v| v.name.as_deref()))
    }

    /// The job id our exporter put in the manifest, if any.
    pub fn job_id(&self) -> Option<JobId> {
        self.hyperfarm.as_ref().map(|h| h.job_id)
    }

    /// Validate everything that can be judged from the manifest alone.
    pub fn check(&self) -> Result<CheckedManifest, ManifestError> {
        if self.manifest_version != MANIFEST_VERSION {
            return Err(ManifestError::Version(self.manifest_version.clone()));
        }
        if let Some(h) = &self.hyperfarm
            && h.schema_version > HYPERFARM_SCHEMA_VERSION
        {
            return Err(ManifestError::FutureSchema(h.schema_version));
        }
        let vm_name = self.vm_name().ok_or(ManifestError::NoVmName)?.to_string();
        names::check_vm_name(&vm_name).map_err(ManifestError::BadVmName)?;

        if let Some(vm) = &self.vm {
            if let Some(fw) = &vm.firmware
                && !matches!(fw.as_str(), "bios" | "uefi" | "unknown")
            {
                return Err(ManifestError::BadFirmware(fw.clone()));
            }
            if let Some(cpu) = vm.cpu
                && !(1..=1024).contains(&cpu)
            {
                return Err(ManifestError::OutOfRange { field: "cpu", value: cpu.into(), range: "1 to 1024" });
            }
            if let Some(mem) = vm.mem_gb
                && !(1..=65536).contains(&mem)
            {
                return Err(ManifestError::OutOfRange { field: "mem_gb", value: mem, range: "1 to 65536" });
            }
        }
        if let Some(out) = &self.output
            && let Some(fmt) = &out.format
            && fmt != "qcow2"
        {
            return Err(ManifestError::BadOutputFormat(fmt.clone()));
        }

        if self.disks.is_empty() {
            return Err(ManifestError::NoDisks);
        }
        if self.disks.len() > MAX_DISKS {
            return Err(ManifestError::TooManyDisks(self.disks.len()));
        }
        let mut seen = BTreeMap::new();
        let mut disks = Vec::with_capacity(self.disks.len());
        for (index, d) in self.disks.iter().enumerate() {
            names::check_disk_id(&d.id).map_err(|source| ManifestError::BadDiskId { index, source })?;
            if seen.insert(d.id.clone(), index).is_some() {
                return Err(ManifestError::DuplicateDiskId { index, id: d.id.clone() });
            }
            let format = DiskFormat::from_manifest_name(&d.source_format)
                .ok_or_else(|| ManifestError::BadFormat { id: d.id.clone(), format: d.source_format.clone() })?;
            if d.bytes > MAX_DISK_BYTES {
                return Err(ManifestError::TooBig { id: d.id.clone(), bytes: d.bytes });
            }
            if d.local_path.is_empty() {
                return Err(ManifestError::EmptyPath { id: d.id.clone() });
            }
            if let Some(t) = &d.disk_type
                && !matches!(t.as_str(), "boot" | "data" | "unknown")
            {
                return Err(ManifestError::BadDiskType { id: d.id.clone(), value: t.clone() });
            }
            let expected = match (&d.blake3, &d.checksum) {
                (Some(b3), _) => Some(Expected::Blake3(parse_hex32(b3).ok_or_else(|| ManifestError::BadDigest {
                    id: d.id.clone(),
                    field: "blake3",
                    value: b3.clone(),
                    expected: "64 lowercase hex digits",
                })?)),
                (None, Some(sum)) => {
                    Some(Expected::Sha256(sum.strip_prefix("sha256:").and_then(parse_hex32).ok_or_else(|| {
                        ManifestError::BadDigest {
                            id: d.id.clone(),
                            field: "checksum",
                            value: sum.clone(),
                            expected: "sha256:<64 lowercase hex digits>",
                        }
                    })?))
                }
                (None, None) => None,
            };
            disks.push((
                d,
                CheckedDisk {
                    id: d.id.clone(),
                    format,
                    bytes: d.bytes,
                    local_path: d.local_path.clone(),
                    expected,
                    boot: false,
                },
            ));
        }
        // Boot order: an explicit boot disk_type first, then boot_order_hint, then manifest order.
        disks.sort_by_key(|(d, _)| (d.disk_type.as_deref() != Some("boot"), d.boot_order_hint.unwrap_or(u32::MAX)));
        let mut disks: Vec<CheckedDisk> = disks.into_iter().map(|(_, c)| c).collect();
        disks[0].boot = true;

        let pipeline = self.pipeline.clone().unwrap_or_default();
        if let Some(e) = &pipeline.engine
            && !matches!(e.as_str(), "auto" | "qemu-img" | "hyper2kvm")
        {
            return Err(ManifestError::BadEngine(e.clone()));
        }
        let on = |s: &Option<Stage>| s.as_ref().is_some_and(|s| s.enabled);
        let stages = Stages {
            inspect: on(&pipeline.inspect),
            fix: on(&pipeline.fix),
            convert: pipeline.convert.as_ref().is_none_or(|s| s.enabled),
            validate: on(&pipeline.validate),
        };
        Ok(CheckedManifest { vm_name, job_id: self.job_id(), disks, engine: pipeline.engine, stages })
    }
}

fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    crate::digest::from_hex(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> serde_json::Value {
        serde_json::json!({
            "manifest_version": "1.0",
            "source": {"provider": "local", "vm_name": "web01", "datacenter": "dc1"},
            "vm": {"cpu": 2, "mem_gb": 4, "firmware": "uefi", "os_hint": "linux"},
            "disks": [
                {"id": "data1", "source_format": "raw", "bytes": 1024, "local_path": "disks/data1.raw",
                 "boot_order_hint": 1},
                {"id": "disk0", "source_format": "vmdk", "bytes": 2048, "local_path": "disks/disk0.vmdk",
                 "boot_order_hint": 0, "blake3": "ab".repeat(32), "future_field": [1, 2]}
            ],
            "pipeline": {"convert": {"enabled": true}, "validate": {"enabled": true}},
            "hyperfarm": {"schema_version": 1, "job_id": JobId::new().to_string(), "later": true},
            "unknown_top": {"x": 1}
        })
    }

    fn parse(v: &serde_json::Value) -> Result<Manifest, ManifestError> {
        Manifest::parse(&serde_json::to_vec(v).expect("json"))
    }

    #[test]
    fn round_trip_keeps_unknown_fields() {
        let v = sample();
        let m = parse(&v).expect("parse");
        let back: serde_json::Value = serde_json::from_slice(&m.to_json()).expect("json");
        assert_eq!(back, v);
    }

    /// Found by the fuzzer: without serde_json's `float_roundtrip` a number in an unknown
    /// field came back one unit in the last place off, so the manifest handed on to hyper2kvm
    /// was not the one the exporter wrote.
    #[test]
    fn numbers_in_unknown_fields_survive_exactly() {
        let text = br#"{"manifest_version": "1.0", "disks": [], "later": {"a": 18888888888888888888888888888888888888888888888888888888888888888888888888888888888888888888, "b": 0.1, "c": 5e-324, "d": 18446744073709551615, "e": -9223372036854775808}}"#;
        let m = Manifest::parse(text).expect("parse");
        let again = Manifest::parse(&m.to_json()).expect("parse again");
        assert_eq!(again, m);
        let later = &m.extra["later"];
        assert_eq!(later["a"].as_f64(), Some(1.888888888888889e91));
        assert_eq!(later["d"].as_u64(), Some(u64::MAX));
    }

    #[test]
    fn check_orders_disks_and_reads_digests() {
        let c = parse(&sample()).expect("parse").check().expect("valid");
        assert_eq!(c.vm_name, "web01");
        assert_eq!(c.disks[0].id, "disk0");
        assert!(c.disks[0].boot && !c.disks[1].boot);
        assert_eq!(c.disks[0].expected, Some(Expected::Blake3([0xab; 32])));
        assert_eq!(c.disks[1].expected, None);
        assert!(c.stages.convert && c.stages.validate && !c.stages.fix);
    }

    fn refused(edit: impl FnOnce(&mut serde_json::Value)) -> String {
        let mut v = sample();
        edit(&mut v);
        match parse(&v).and_then(|m| m.check()) {
            Ok(_) => panic!("accepted: {v}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn refuses_bad_manifests_with_named_fields() {
        assert!(refused(|v| v["manifest_version"] = "2.0".into()).contains("manifest_version"));
        assert!(refused(|v| v["disks"] = serde_json::json!([])).contains("no disks"));
        assert!(refused(|v| v["disks"][0]["bytes"] = "big".into()).contains("disks[0].bytes"));
        assert!(refused(|v| v["disks"][0]["bytes"] = (-1).into()).contains("disks[0].bytes"));
        assert!(refused(|v| v["disks"][0]["bytes"] = serde_json::json!(1e30)).contains("bytes"));
        assert!(refused(|v| v["disks"][0]["bytes"] = (u64::MAX).into()).contains("TiB"));
        assert!(refused(|v| v["disks"][0]["id"] = "../x".into()).contains("disk id"));
        assert!(refused(|v| v["disks"][0]["id"] = "disk0".into()).contains("twice"));
        assert!(refused(|v| v["disks"][0]["source_format"] = "iso".into()).contains("iso"));
        assert!(refused(|v| v["disks"][1]["blake3"] = "xyz".into()).contains("blake3"));
        assert!(refused(|v| v["disks"][0]["checksum"] = "md5:00".into()).contains("sha256"));
        assert!(refused(|v| v["source"]["vm_name"] = "../../etc/cron.d/x".into()).contains("VM name"));
        assert!(
            refused(|v| {
                v.as_object_mut().expect("obj").remove("source");
            })
            .contains("names no VM")
        );
        assert!(refused(|v| v["vm"]["firmware"] = "coreboot".into()).contains("firmware"));
        assert!(refused(|v| v["vm"]["cpu"] = 0.into()).contains("cpu"));
        assert!(refused(|v| v["pipeline"]["engine"] = "sh -c".into()).contains("engine"));
        assert!(refused(|v| v["hyperfarm"]["job_id"] = "not-an-id".into()).contains("job_id"));
        assert!(refused(|v| v["hyperfarm"]["schema_version"] = 99.into()).contains("newer"));
        assert!(refused(|v| v["output"] = serde_json::json!({"format": "vdi"})).contains("qcow2"));
        assert!(
            refused(|v| {
                v.as_object_mut().expect("obj").remove("disks");
            })
            .contains("disks")
        );
    }

    #[test]
    fn refuses_non_objects_garbage_and_huge_input() {
        assert!(matches!(Manifest::parse(b"[1,2]"), Err(ManifestError::Schema(_))));
        assert!(matches!(Manifest::parse(b"{\"manifest_version\": \"1.0\", "), Err(ManifestError::Json(_))));
        assert!(matches!(Manifest::parse(b"\xff\xfe"), Err(ManifestError::Json(_))));
        let huge = vec![b' '; (MAX_MANIFEST_BYTES + 1) as usize];
        assert!(matches!(Manifest::parse(&huge), Err(ManifestError::TooLarge { .. })));
    }
}
