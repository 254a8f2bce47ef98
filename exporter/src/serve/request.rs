//! The export request in the seed's JSON shape, its validation (each error names its field), and
//! the hyperexport command line it becomes: a job of `serve` runs the same code as the CLI.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use hyperfarm_shared::text::Esc;

/// Most jobs in one submission.
pub const MAX_BATCH: usize = 100;

/// One export, as the seed's web API took it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ExportRequest {
    /// The job's name, for people (free text).
    #[serde(default)]
    pub name: Option<String>,
    /// The VM: an .ova, .ovf, .vmx or disk image on this host (an absolute path); with the
    /// vSphere provider, its inventory path (`/DC1/vm/web01`) or name.
    pub vm_path: String,
    /// `local` or `vsphere` (default: serve's `--provider`).
    #[serde(default)]
    pub provider: Option<String>,
    /// Export only: the queue directory; direct mode (pipeline without daemon): where the qcow2
    /// goes; daemon mode: unused unless the job falls back to converting here.
    #[serde(default)]
    pub output_dir: Option<String>,
    /// The result's format: `qcow2` (the only one produced).
    #[serde(default)]
    pub format: Option<String>,
    /// The VM's name, naming the output files (default: from the OVF/VMX, else the file name).
    #[serde(default)]
    pub vm_name: Option<String>,
    #[serde(default)]
    pub options: ExportOptions,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ExportOptions {
    #[serde(default)]
    pub enable_pipeline: Option<bool>,
    #[serde(default)]
    pub hyper2kvm_daemon: Option<bool>,
    #[serde(default)]
    pub hyper2kvm_instance: Option<String>,
    #[serde(default)]
    pub hyper2kvm_watch_dir: Option<String>,
    #[serde(default)]
    pub hyper2kvm_output_dir: Option<String>,
    /// Seconds, 1–60.
    #[serde(default)]
    pub hyper2kvm_poll_interval: Option<u64>,
    /// Minutes, 1–240.
    #[serde(default)]
    pub hyper2kvm_daemon_timeout: Option<u64>,
    #[serde(default)]
    pub libvirt_integration: Option<bool>,
    /// `auto`, `qemu-img` or `hyper2kvm`.
    #[serde(default)]
    pub engine: Option<String>,
    /// Pipeline stages besides convert: `inspect`, `fix`, `validate`.
    #[serde(default)]
    pub stages: Option<Vec<String>>,
}

/// A submission: one request, a list, or `{"jobs": [...]}`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Submission {
    Wrapped { jobs: Vec<serde_json::Value> },
    List(Vec<serde_json::Value>),
    One(serde_json::Map<String, serde_json::Value>),
}

/// A refused request: HTTP status, the field at fault (a JSON path) and what to do.
#[derive(Debug, Clone, PartialEq)]
pub struct Invalid {
    pub status: u16,
    pub field: Option<String>,
    pub message: String,
}

impl Invalid {
    pub fn field(field: impl Into<String>, message: impl Into<String>) -> Invalid {
        Invalid { status: 422, field: Some(field.into()), message: message.into() }
    }
}

/// How the job runs (the CLI's modes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Daemon,
    Direct,
    ExportOnly,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Daemon => "daemon",
            Mode::Direct => "direct",
            Mode::ExportOnly => "export-only",
        }
    }
}

impl ExportRequest {
    pub fn mode(&self) -> Mode {
        match (self.options.enable_pipeline.unwrap_or(false), self.options.hyper2kvm_daemon.unwrap_or(false)) {
            (_, true) => Mode::Daemon,
            (true, false) => Mode::Direct,
            (false, false) => Mode::ExportOnly,
        }
    }

    /// The job's display name.
    pub fn display_name(&self) -> String {
        self.name.clone().filter(|n| !n.trim().is_empty()).unwrap_or_else(|| {
            Path::new(&self.vm_path).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
        })
    }
}

/// Parse a submission body into its requests; errors name the field (`jobs[1].options.…`).
pub fn parse_submission(body: &[u8]) -> Result<Vec<ExportRequest>, Invalid> {
    let sub: Submission = serde_json::from_slice(body).map_err(|e| Invalid {
        status: 400,
        field: None,
        message: format!("the body is not a JSON export request, a list of them, or {{\"jobs\": [...]}}: {e}"),
    })?;
    let (items, wrapped) = match sub {
        Submission::Wrapped { jobs } => (jobs, true),
        Submission::List(v) => (v, true),
        Submission::One(m) => (vec![serde_json::Value::Object(m)], false),
    };
    if items.is_empty() {
        return Err(Invalid::field("jobs", "no job in the submission"));
    }
    if items.len() > MAX_BATCH {
        return Err(Invalid::field("jobs", format!("{} jobs in one submission; at most {MAX_BATCH}", items.len())));
    }
    let mut out = Vec::with_capacity(items.len());
    for (i, v) in items.into_iter().enumerate() {
        let prefix = if wrapped { format!("jobs[{i}]") } else { String::new() };
        let join = |path: &str| match (prefix.is_empty(), path.is_empty()) {
            (true, _) => path.to_string(),
            (false, true) => prefix.clone(),
            (false, false) => format!("{prefix}.{path}"),
        };
        let r: ExportRequest = serde_path_to_error::deserialize(v).map_err(|e| {
            let path = e.path().to_string();
            let path = if path == "." { String::new() } else { path };
            Invalid { status: 422, field: Some(join(&path)).filter(|f| !f.is_empty()), message: e.inner().to_string() }
        })?;
        validate(&r).map_err(|mut e| {
            e.field = e.field.map(|f| join(&f));
            e
        })?;
        out.push(r);
    }
    Ok(out)
}

fn text_ok(field: &str, s: &str, max: usize) -> Result<(), Invalid> {
    if s.len() > max {
        return Err(Invalid::field(field, format!("longer than {max} bytes")));
    }
    if s.chars().any(|c| c.is_control()) {
        return Err(Invalid::field(field, format!("contains control characters: {}", Esc(s))));
    }
    Ok(())
}

fn abs_path(field: &str, s: &str) -> Result<PathBuf, Invalid> {
    text_ok(field, s, 4096)?;
    let p = PathBuf::from(s);
    if !p.is_absolute() {
        return Err(Invalid::field(field, format!("{} is not an absolute path", Esc(s))));
    }
    Ok(p)
}

/// The providers this serve offers: the default one, and the vSphere connection flags its
/// children get (the password stays in a file or the environment, never on a command line).
#[derive(Debug, Clone, Default)]
pub struct Providers {
    pub default_vsphere: bool,
    /// Whether a vCenter is configured (`--vsphere-url` or `GOVC_URL`).
    pub vsphere: bool,
    pub vsphere_args: Vec<String>,
}

impl Providers {
    pub fn from_args(a: &super::ServeArgs) -> Providers {
        let v = &a.vsphere;
        let mut args = Vec::new();
        let mut push = |flag: &str, val: Option<String>| {
            if let Some(val) = val {
                args.extend([flag.to_string(), val]);
            }
        };
        push("--vsphere-url", v.vsphere_url.clone());
        push("--vsphere-user", v.vsphere_user.clone());
        push("--vsphere-password-file", v.vsphere_password_file.as_ref().map(|p| p.display().to_string()));
        push("--ca-file", v.ca_file.as_ref().map(|p| p.display().to_string()));
        push("--folder", v.folder.clone());
        if v.insecure {
            args.push("--insecure".into());
        }
        Providers {
            default_vsphere: a.provider == "vsphere",
            vsphere: crate::vsphere::configured(v),
            vsphere_args: args,
        }
    }
}

static PROVIDERS: std::sync::OnceLock<Providers> = std::sync::OnceLock::new();

/// Set once, when serve starts.
pub fn set_providers(p: Providers) {
    let _ = PROVIDERS.set(p);
}

fn providers() -> Providers {
    PROVIDERS.get().cloned().unwrap_or_default()
}

impl ExportRequest {
    /// Whether the VM is on vSphere.
    pub fn is_vsphere(&self) -> bool {
        match self.provider.as_deref() {
            Some(p) => p == "vsphere",
            None => providers().default_vsphere,
        }
    }
}

/// Check a request the way the CLI checks its flags, and what can be checked on this host now.
pub fn validate(r: &ExportRequest) -> Result<(), Invalid> {
    if let Some(n) = &r.name {
        text_ok("name", n, 200)?;
    }
    if let Some(p) = &r.provider
        && !matches!(p.as_str(), "local" | "vsphere")
    {
        return Err(Invalid::field("provider", format!("\"{}\" is not local or vsphere", Esc(p))));
    }
    if r.is_vsphere() {
        if !providers().vsphere {
            return Err(Invalid::field(
                "provider",
                "this hyperexport serve has no vCenter: start it with --vsphere-url (or GOVC_URL), --vsphere-user and --vsphere-password-file",
            ));
        }
        text_ok("vm_path", &r.vm_path, 1024)?;
        if r.vm_path.trim().is_empty() {
            return Err(Invalid::field("vm_path", "give the VM's inventory path (/DC1/vm/web01) or name"));
        }
    } else {
        validate_local_path(r)?;
    }
    validate_rest(r)
}

fn validate_local_path(r: &ExportRequest) -> Result<(), Invalid> {
    let vm = abs_path("vm_path", &r.vm_path)?;
    match std::fs::symlink_metadata(&vm) {
        Ok(m) if m.is_file() => {}
        Ok(_) => {
            return Err(Invalid::field(
                "vm_path",
                format!("{} is not a regular file (symbolic links, devices and FIFOs are refused)", Esc(&r.vm_path)),
            ));
        }
        Err(e) => {
            return Err(Invalid::field(
                "vm_path",
                format!(
                    "{}: {e}; give the path of an .ova, .ovf, .vmx or disk image on the export host",
                    Esc(&r.vm_path)
                ),
            ));
        }
    }
    Ok(())
}

fn validate_rest(r: &ExportRequest) -> Result<(), Invalid> {
    if let Some(f) = &r.format
        && f != "qcow2"
    {
        return Err(Invalid::field(
            "format",
            format!(
                "\"{}\": hyperfarm converts to qcow2 and reads the source as it is (OVA, OVF, VMX, VMDK, VHD, VHDX, raw, qcow2); give \"qcow2\" or leave it out",
                Esc(f)
            ),
        ));
    }
    if let Some(n) = &r.vm_name {
        text_ok("vm_name", n, 200)?;
        hyperfarm_shared::names::check_vm_name(n).map_err(|e| Invalid::field("vm_name", e.to_string()))?;
    }
    if let Some(o) = &r.output_dir {
        abs_path("output_dir", o)?;
    }
    let o = &r.options;
    let mode = r.mode();
    if mode != Mode::Daemon && r.output_dir.is_none() {
        return Err(Invalid::field(
            "output_dir",
            match mode {
                Mode::Direct => {
                    "enable_pipeline without hyper2kvm_daemon converts on the export host: give output_dir for <vm>.qcow2"
                }
                _ => {
                    "export only (enable_pipeline false): give output_dir, the queue directory a conversion agent watches (or set enable_pipeline and hyper2kvm_daemon)"
                }
            },
        ));
    }
    if let Some(i) = &o.hyper2kvm_instance
        && !i.is_empty()
    {
        hyperfarm_shared::instance::check_name(i).map_err(|e| Invalid::field("options.hyper2kvm_instance", e))?;
    }
    if let Some(d) = &o.hyper2kvm_watch_dir {
        abs_path("options.hyper2kvm_watch_dir", d)?;
    }
    if let Some(d) = &o.hyper2kvm_output_dir {
        abs_path("options.hyper2kvm_output_dir", d)?;
    }
    if let Some(p) = o.hyper2kvm_poll_interval
        && !(1..=60).contains(&p)
    {
        return Err(Invalid::field("options.hyper2kvm_poll_interval", format!("{p} seconds: give 1 to 60")));
    }
    if let Some(t) = o.hyper2kvm_daemon_timeout
        && !(1..=240).contains(&t)
    {
        return Err(Invalid::field("options.hyper2kvm_daemon_timeout", format!("{t} minutes: give 1 to 240")));
    }
    if o.libvirt_integration == Some(true) && mode == Mode::ExportOnly {
        return Err(Invalid::field(
            "options.libvirt_integration",
            "defining the VM in libvirt needs its conversion: set enable_pipeline (with hyper2kvm_daemon the conversion host's agent defines it)",
        ));
    }
    if let Some(e) = &o.engine
        && hyperfarm_shared::engine::EngineChoice::parse(e).is_none()
    {
        return Err(Invalid::field("options.engine", format!("\"{}\" is not auto, qemu-img or hyper2kvm", Esc(e))));
    }
    if let Some(st) = &o.stages {
        if st.len() > 3 || st.iter().enumerate().any(|(i, s)| st[..i].contains(s)) {
            return Err(Invalid::field(
                "options.stages",
                format!("{} stages; give at most inspect, fix and validate, once each", st.len()),
            ));
        }
        for (i, s) in st.iter().enumerate() {
            if !["inspect", "fix", "validate"].contains(&s.as_str()) {
                return Err(Invalid::field(
                    format!("options.stages[{i}]"),
                    format!("\"{}\" is not inspect, fix or validate", Esc(s)),
                ));
            }
        }
    }
    Ok(())
}

/// The hyperexport command line for a request (after the program name).
pub fn command_args(r: &ExportRequest, queue_job_id: &str, config: Option<&Path>) -> Vec<String> {
    let mut a: Vec<String> = vec!["--progress".into(), "json".into(), "--job-id".into(), queue_job_id.into()];
    if let Some(c) = config {
        a.extend(["--config".into(), c.display().to_string()]);
    }
    if r.is_vsphere() {
        a.extend(["--provider".into(), "vsphere".into()]);
        a.extend(providers().vsphere_args);
    }
    a.extend(["--vm".into(), r.vm_path.clone()]);
    if let Some(n) = &r.vm_name {
        a.extend(["--name".into(), n.clone()]);
    }
    if let Some(o) = &r.output_dir {
        a.extend(["--output".into(), o.clone()]);
    }
    let o = &r.options;
    let flag = |a: &mut Vec<String>, name: &str, v: Option<bool>| {
        if let Some(v) = v {
            a.push(format!("--{name}={v}"));
        }
    };
    flag(&mut a, "pipeline", o.enable_pipeline);
    flag(&mut a, "hyper2kvm-daemon", o.hyper2kvm_daemon);
    if let Some(i) = o.hyper2kvm_instance.as_ref().filter(|i| !i.is_empty()) {
        a.extend(["--hyper2kvm-instance".into(), i.clone()]);
    }
    if let Some(d) = &o.hyper2kvm_watch_dir {
        a.extend(["--hyper2kvm-watch-dir".into(), d.clone()]);
    }
    if let Some(d) = &o.hyper2kvm_output_dir {
        a.extend(["--hyper2kvm-output-dir".into(), d.clone()]);
    }
    if let Some(p) = o.hyper2kvm_poll_interval {
        a.extend(["--hyper2kvm-poll-interval".into(), p.to_string()]);
    }
    if let Some(t) = o.hyper2kvm_daemon_timeout {
        a.extend(["--hyper2kvm-daemon-timeout".into(), t.to_string()]);
    }
    if let Some(e) = &o.engine {
        a.extend(["--engine".into(), e.clone()]);
    }
    if o.libvirt_integration == Some(true) {
        a.push("--libvirt".into());
    }
    if let Some(st) = o.stages.as_ref().filter(|s| !s.is_empty()) {
        a.extend(["--hyper2kvm-stages".into(), st.join(",")]);
    }
    a
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn vm() -> (tempfile::TempDir, String) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("vm.raw");
        std::fs::write(&p, b"x").unwrap();
        let s = p.display().to_string();
        (d, s)
    }

    #[test]
    fn the_seed_shape_is_accepted_in_its_three_forms() {
        let (_d, p) = vm();
        let one = serde_json::json!({"name": "Ubuntu Server Migration", "vm_path": p, "options": {
            "enable_pipeline": true, "hyper2kvm_daemon": true, "hyper2kvm_instance": "vsphere-prod",
            "hyper2kvm_watch_dir": "/var/lib/hyper2kvm/vsphere-queue", "hyper2kvm_output_dir": "/var/lib/hyper2kvm/vsphere-output",
            "hyper2kvm_poll_interval": 5, "hyper2kvm_daemon_timeout": 60, "libvirt_integration": false}});
        let r = parse_submission(one.to_string().as_bytes()).unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].mode(), Mode::Daemon);
        let args = command_args(&r[0], "id", None);
        for want in [
            "--hyper2kvm-instance",
            "vsphere-prod",
            "--hyper2kvm-poll-interval",
            "5",
            "--hyper2kvm-daemon-timeout",
            "60",
        ] {
            assert!(args.contains(&want.to_string()), "{want} missing from {args:?}");
        }
        let list = serde_json::json!([one, one]);
        assert_eq!(parse_submission(list.to_string().as_bytes()).unwrap().len(), 2);
        let wrapped = serde_json::json!({"jobs": [one]});
        assert_eq!(parse_submission(wrapped.to_string().as_bytes()).unwrap().len(), 1);
    }

    #[test]
    fn errors_name_the_field() {
        let (_d, p) = vm();
        let cases = [
            (
                serde_json::json!({"vm_path": p, "options": {"hyper2kvm_daemon": true, "hyper2kvm_poll_interval": 61}}),
                "options.hyper2kvm_poll_interval",
            ),
            (
                serde_json::json!({"vm_path": p, "options": {"hyper2kvm_daemon": true, "hyper2kvm_daemon_timeout": 0}}),
                "options.hyper2kvm_daemon_timeout",
            ),
            (serde_json::json!({"vm_path": "relative.ova", "options": {"hyper2kvm_daemon": true}}), "vm_path"),
            (serde_json::json!({"vm_path": "/nonexistent/x.ova", "options": {"hyper2kvm_daemon": true}}), "vm_path"),
            (serde_json::json!({"vm_path": p}), "output_dir"),
            (serde_json::json!({"vm_path": p, "format": "ova", "options": {"hyper2kvm_daemon": true}}), "format"),
            (
                serde_json::json!({"vm_path": p, "output_dir": "/tmp", "options": {"libvirt_integration": true}}),
                "options.libvirt_integration",
            ),
            (
                serde_json::json!({"vm_path": p, "options": {"hyper2kvm_daemon": true, "surprise": 1}}),
                "options.surprise",
            ),
            (serde_json::json!({"vm_path": p, "options": {"hyper2kvm_daemon": "yes"}}), "options.hyper2kvm_daemon"),
            (
                serde_json::json!({"vm_path": p, "options": {"hyper2kvm_daemon": true, "hyper2kvm_instance": "../x"}}),
                "options.hyper2kvm_instance",
            ),
            (serde_json::json!({"vm_path": p, "name": "a\u{1b}[2J", "options": {"hyper2kvm_daemon": true}}), "name"),
        ];
        for (body, field) in cases {
            let e = parse_submission(body.to_string().as_bytes()).unwrap_err();
            assert_eq!(e.field.as_deref(), Some(field), "{body}: {e:?}");
            assert_eq!(e.status, 422);
        }
        let e = parse_submission(
            serde_json::json!({"jobs": [{"vm_path": p, "options": {"hyper2kvm_daemon": true}}, {"vm_path": 3}]})
                .to_string()
                .as_bytes(),
        )
        .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("jobs[1].vm_path"));
        assert_eq!(parse_submission(b"nonsense").unwrap_err().status, 400);
        assert_eq!(parse_submission(b"[]").unwrap_err().field.as_deref(), Some("jobs"));
    }
}
