//! `hyperexport --interactive`: the seed's terminal wizard.
//!
//! Steps: the VM (a file browser over local paths, or a typed path; with `--provider vsphere`, or
//! a vCenter configured and chosen as the source, the vCenter's VMs to pick from, a running one
//! only after agreeing to a snapshot export), conversion (none = export
//! only, here = direct, on the farm = daemon), the output, the pipeline stages and engine, then
//! the daemon phase — its settings hidden until the user opts in, validated as the CLI and the
//! web form validate them — a summary, and the export itself with its live progress (the same
//! code as the CLI: the answers become the CLI's settings).
//!
//! Ctrl-C or Esc at any question ends the wizard with exit code 130 before anything is written.
//! Ctrl-C during the export stops it: the staged copy is removed, and a job already in the queue
//! is cancelled (the wizard's user asked to stop it, unlike a script's `kill`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use inquire::validator::Validation;
use inquire::{Confirm, CustomType, InquireError, MultiSelect, Select, Text};

use hyperfarm_shared::text::Esc;

use crate::cli::Cli;

/// The file extensions the browser offers as VMs.
const VM_EXTENSIONS: &[&str] = &["ova", "ovf", "vmx", "vmdk", "vhd", "vhdx", "raw", "img", "qcow2"];

/// Entries shown per directory at most (the rest can be typed).
const MAX_ENTRIES: usize = 2000;

enum Stop {
    Cancelled,
    Failed(String),
    /// Talking to the vCenter failed: its exit code (2 bad settings, 3 no such VM, 6 unreachable).
    Export(crate::ExportError),
}

impl From<InquireError> for Stop {
    fn from(e: InquireError) -> Self {
        match e {
            InquireError::OperationCanceled | InquireError::OperationInterrupted => Stop::Cancelled,
            e => Stop::Failed(e.to_string()),
        }
    }
}

pub fn main(mut cli: Cli) -> ExitCode {
    use std::io::IsTerminal;
    if !std::io::stdin().is_terminal() || !std::io::stderr().is_terminal() {
        eprintln!("hyperexport: --interactive needs a terminal; give the flags instead (hyperexport --help)");
        return ExitCode::from(crate::EXIT_USAGE);
    }
    match wizard(&mut cli) {
        Ok(true) => {}
        Ok(false) | Err(Stop::Cancelled) => {
            eprintln!("hyperexport: cancelled; nothing was written");
            return ExitCode::from(crate::EXIT_INTERRUPTED);
        }
        Err(Stop::Failed(e)) => {
            eprintln!("hyperexport: {}", hyperfarm_shared::text::escape_lines(&e));
            return ExitCode::from(crate::EXIT_INTERNAL);
        }
        Err(Stop::Export(e)) => {
            eprintln!("hyperexport: {}", hyperfarm_shared::text::escape_lines(&e.to_string()));
            return ExitCode::from(e.code());
        }
    }
    cli.interactive = false;
    cli.cancel_on_interrupt = true;
    // The same path as a command line from here on.
    super::init_logging(cli.quiet);
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("hyperexport: cannot start the runtime: {e}");
            return ExitCode::from(crate::EXIT_INTERNAL);
        }
    };
    match rt.block_on(crate::run(cli)) {
        Ok(()) => {
            eprintln!("hyperexport: finished");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("hyperexport: {}", hyperfarm_shared::text::escape_lines(&e.to_string()));
            ExitCode::from(e.code())
        }
    }
}

/// One entry of the file browser.
#[derive(Clone)]
enum Entry {
    Up,
    Dir(PathBuf),
    File(PathBuf),
    Type,
}

impl std::fmt::Display for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name =
            |p: &Path| p.file_name().map(|n| Esc(&n.to_string_lossy().into_owned()).to_string()).unwrap_or_default();
        match self {
            Entry::Up => write!(f, "../"),
            Entry::Dir(p) => write!(f, "{}/", name(p)),
            Entry::File(p) => {
                let size = std::fs::symlink_metadata(p).map(|m| m.len()).unwrap_or(0);
                write!(f, "{}  ({})", name(p), hyperfarm_shared::human::bytes(size))
            }
            Entry::Type => write!(f, "[type a path]"),
        }
    }
}

fn is_vm_file(p: &Path) -> bool {
    p.extension().and_then(|e| e.to_str()).is_some_and(|e| VM_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// Directory entries: sub-directories, then VM files; symbolic links are not followed (a link is
/// neither a directory nor a file here), nor are FIFOs or devices offered.
fn entries(dir: &Path) -> Vec<Entry> {
    let mut dirs = Vec::new();
    let mut files = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten().take(MAX_ENTRIES) {
            let Ok(ft) = e.file_type() else { continue };
            let p = e.path();
            if ft.is_dir() {
                dirs.push(p);
            } else if ft.is_file() && is_vm_file(&p) {
                files.push(p);
            }
        }
    }
    dirs.sort();
    files.sort();
    let mut v = vec![Entry::Type];
    if dir.parent().is_some() {
        v.push(Entry::Up);
    }
    v.extend(dirs.into_iter().map(Entry::Dir));
    v.extend(files.into_iter().map(Entry::File));
    v
}

fn browse(start: &Path) -> Result<PathBuf, Stop> {
    let mut dir = start.to_path_buf();
    loop {
        let choice = Select::new(&format!("VM ({}):", Esc(&dir.display().to_string())), entries(&dir))
            .with_help_message("↑↓ move, type to filter, Enter opens a directory or picks the VM, Esc/Ctrl-C cancels")
            .with_page_size(15)
            .prompt()?;
        match choice {
            Entry::Up => {
                dir = dir.parent().map(Path::to_path_buf).unwrap_or(dir);
            }
            Entry::Dir(d) => dir = d,
            Entry::File(f) => return Ok(f),
            Entry::Type => {
                let p = Text::new("VM path:")
                    .with_validator(|s: &str| {
                        Ok(match std::fs::symlink_metadata(s) {
                            Ok(m) if m.is_file() => Validation::Valid,
                            Ok(_) => Validation::Invalid(
                                "not a regular file (links, devices and directories are not VMs)".into(),
                            ),
                            Err(e) => Validation::Invalid(format!("{e}").into()),
                        })
                    })
                    .prompt()?;
                return Ok(PathBuf::from(p));
            }
        }
    }
}

fn dir_input(prompt: &str, default: Option<&Path>, must_exist: bool) -> Result<PathBuf, Stop> {
    let mut t = Text::new(prompt).with_validator(move |s: &str| {
        if s.trim().is_empty() {
            return Ok(Validation::Invalid("give a directory".into()));
        }
        if must_exist && !Path::new(s.trim()).is_dir() {
            return Ok(Validation::Invalid("no such directory (is the share mounted?)".into()));
        }
        Ok(Validation::Valid)
    });
    let d = default.map(|d| d.display().to_string());
    if let Some(d) = &d {
        t = t.with_default(d);
    }
    Ok(PathBuf::from(t.prompt()?.trim()))
}

fn range(prompt: &str, unit: &str, lo: u64, hi: u64, default: u64) -> Result<u64, Stop> {
    let msg = format!("give {lo} to {hi} {unit}");
    let v = CustomType::<u64>::new(prompt)
        .with_default(default)
        .with_error_message("give a whole number")
        .with_validator(move |v: &u64| {
            Ok(if (lo..=hi).contains(v) { Validation::Valid } else { Validation::Invalid(msg.clone().into()) })
        })
        .with_help_message(&format!("{lo}–{hi} {unit}"))
        .prompt()?;
    Ok(v)
}

/// A VM of the vCenter, as the list shows it (everything in it comes from the server: escaped).
struct VsVm(crate::vsphere::inventory::VmEntry);

impl std::fmt::Display for VsVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let v = &self.0;
        write!(
            f,
            "{:<44} {:<10} {:>2} CPU {:>6} MiB  {}{}",
            Esc(&v.path).to_string(),
            Esc(&v.power).to_string(),
            v.cpus.map(|c| c.to_string()).unwrap_or_else(|| "?".into()),
            v.memory_mib.map(|m| m.to_string()).unwrap_or_else(|| "?".into()),
            Esc(v.guest.as_deref().unwrap_or("")),
            if v.template { " (template)" } else { "" }
        )
    }
}

/// Pick a VM of the vCenter: its inventory path. A running VM only with a snapshot export.
fn pick_vsphere(cli: &mut Cli) -> Result<PathBuf, Stop> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Stop::Failed(format!("cannot start the runtime: {e}")))?;
    eprintln!("hyperexport: reading the vCenter's inventory…");
    let (host, vms) = rt.block_on(crate::vsphere::inventory_of(&cli.vsphere)).map_err(Stop::Export)?;
    if vms.is_empty() {
        return Err(Stop::Export(crate::ExportError::BadInput(format!(
            "{} has no VM{} to export",
            Esc(&host),
            cli.vsphere.folder.as_deref().map(|f| format!(" below {}", Esc(f))).unwrap_or_default()
        ))));
    }
    loop {
        let VsVm(vm) = Select::new(&format!("VM on {}:", Esc(&host)), vms.iter().cloned().map(VsVm).collect())
            .with_page_size(15)
            .with_help_message("type to filter, Enter picks")
            .prompt()?;
        // Only a powered-off VM is exported as it is (a suspended one too needs the snapshot).
        if vm.power != "poweredOff" && !cli.allow_powered_on {
            let state = match vm.power.as_str() {
                "poweredOn" => "running",
                other => other,
            };
            let snapshot = Confirm::new(&format!(
                "{} is {}: export it from a snapshot (crash-consistent, as if its power were cut)?",
                Esc(&vm.path),
                Esc(state)
            ))
            .with_default(false)
            .with_help_message("no: pick another VM (or shut this one down first)")
            .prompt()?;
            if !snapshot {
                continue;
            }
            cli.allow_powered_on = true;
        }
        return Ok(PathBuf::from(vm.path));
    }
}

/// Ask, fill `cli`; `Ok(false)` when the user declines at the summary.
fn wizard(cli: &mut Cli) -> Result<bool, Stop> {
    eprintln!("hyperexport: export a VM to KVM (Ctrl-C or Esc cancels; nothing is written before the summary)");
    if cli.provider == "local" && crate::vsphere::configured(&cli.vsphere) {
        let source =
            Select::new("Source:", vec!["local files", "vSphere (the configured vCenter or ESXi)"]).prompt()?;
        if source.starts_with("vSphere") {
            cli.provider = "vsphere".into();
        }
    }
    if cli.provider == "vsphere" {
        let vm = match &cli.vm {
            Some(p)
                if Confirm::new(&format!("Export {} from vSphere?", Esc(&p.display().to_string())))
                    .with_default(true)
                    .prompt()? =>
            {
                p.clone()
            }
            _ => pick_vsphere(cli)?,
        };
        cli.vm = Some(vm);
        return settings_and_summary(cli);
    }
    let start = match &cli.vm {
        Some(p) if p.is_dir() => p.clone(),
        Some(p) => p.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from(".")),
        None => std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/")),
    };
    let vm = match &cli.vm {
        Some(p)
            if p.is_file()
                && Confirm::new(&format!("Export {}?", Esc(&p.display().to_string())))
                    .with_default(true)
                    .prompt()? =>
        {
            p.clone()
        }
        _ => browse(&start)?,
    };
    cli.vm = Some(vm);
    settings_and_summary(cli)
}

/// The questions after the VM, then the summary.
fn settings_and_summary(cli: &mut Cli) -> Result<bool, Stop> {
    let vm = cli.vm.clone().unwrap_or_default();

    let pipeline = Confirm::new("Convert to qcow2?").with_default(true).prompt()?;
    cli.pipeline = Some(pipeline);
    let mut daemon = false;
    if pipeline {
        let stages = MultiSelect::new("hyper2kvm stages besides convert:", vec!["inspect", "fix", "validate"])
            .with_help_message("Space toggles, Enter accepts (none: convert and check only)")
            .prompt()?;
        cli.hyper2kvm_stages = stages.into_iter().map(str::to_string).collect();
        let engine = Select::new("Engine:", vec!["auto", "qemu-img", "hyper2kvm"]).prompt()?;
        cli.engine = hyperfarm_shared::engine::EngineChoice::parse(engine);
        // The daemon phase stays hidden until asked for.
        daemon = Confirm::new("Convert on the conversion farm (hyper2kvm daemon phase)?")
            .with_default(true)
            .with_help_message("no: convert on this host")
            .prompt()?;
    }
    cli.hyper2kvm_daemon = Some(daemon);
    if daemon {
        let inst = Text::new("Agent instance (empty: the default):")
            .with_validator(|s: &str| {
                Ok(match s.trim() {
                    "" => Validation::Valid,
                    n => match hyperfarm_shared::instance::check_name(n) {
                        Ok(()) => Validation::Valid,
                        Err(e) => Validation::Invalid(e.into()),
                    },
                })
            })
            .prompt()?;
        let inst = Some(inst.trim().to_string()).filter(|s| !s.is_empty());
        cli.hyper2kvm_instance = inst.clone();
        // The defaults a command line would get: flags, then hyperexport.toml, then the instance's.
        let (watch_default, out_default) =
            crate::settings(cli).map(|s| (s.watch_dir, s.output_dir)).unwrap_or_else(|_| {
                (
                    hyperfarm_shared::instance::watch_dir(inst.as_deref()),
                    hyperfarm_shared::instance::output_dir(inst.as_deref()),
                )
            });
        cli.hyper2kvm_watch_dir = Some(dir_input("Watch (queue) directory:", Some(&watch_default), true)?);
        cli.hyper2kvm_output_dir = Some(dir_input("Output directory:", Some(&out_default), true)?);
        let poll = range("Poll interval (seconds):", "seconds", 1, 60, 5)?;
        cli.hyper2kvm_poll_interval = Some(std::time::Duration::from_secs(poll));
        let timeout = range("Timeout (minutes):", "minutes", 1, 240, 60)?;
        cli.hyper2kvm_daemon_timeout = Some(std::time::Duration::from_secs(timeout * 60));
    } else if pipeline {
        cli.output = Some(dir_input("Directory for the qcow2:", cli.output.as_deref(), true)?);
    } else {
        cli.output = Some(dir_input("Queue directory to publish into:", cli.output.as_deref(), true)?);
    }

    eprintln!();
    eprintln!("Summary");
    eprintln!("  VM:        {}", Esc(&vm.display().to_string()));
    if cli.provider == "vsphere" {
        eprintln!(
            "  Source:    vSphere{}",
            if cli.allow_powered_on { ", from a snapshot if it runs (crash-consistent)" } else { "" }
        );
    }
    let mode = match (pipeline, daemon) {
        (_, true) => "convert on the farm (daemon)",
        (true, false) => "convert on this host",
        (false, false) => "export only (publish into a queue)",
    };
    eprintln!("  Mode:      {mode}");
    if pipeline {
        let st = if cli.hyper2kvm_stages.is_empty() {
            "convert".to_string()
        } else {
            format!("{}, convert", cli.hyper2kvm_stages.join(", "))
        };
        eprintln!("  Stages:    {st}; engine {}", cli.engine.map(|e| e.as_str()).unwrap_or("auto"));
    }
    if daemon {
        eprintln!("  Instance:  {}", cli.hyper2kvm_instance.as_deref().unwrap_or("(default)"));
        eprintln!(
            "  Queue:     {}",
            Esc(&cli.hyper2kvm_watch_dir.as_ref().map(|p| p.display().to_string()).unwrap_or_default())
        );
        eprintln!(
            "  Output:    {}",
            Esc(&cli.hyper2kvm_output_dir.as_ref().map(|p| p.display().to_string()).unwrap_or_default())
        );
        eprintln!(
            "  Poll:      every {} s, time-out {} min",
            cli.hyper2kvm_poll_interval.map(|d| d.as_secs()).unwrap_or(5),
            cli.hyper2kvm_daemon_timeout.map(|d| d.as_secs() / 60).unwrap_or(60)
        );
    } else if let Some(o) = &cli.output {
        eprintln!("  Output:    {}", Esc(&o.display().to_string()));
    }
    Ok(Confirm::new("Start?").with_default(true).prompt()?)
}
