//! hyperfarm-gen-assets: writes what the packages ship besides the binaries, from the sources
//! that define it, so a package never carries a stale copy:
//!
//! - `build/man/<bin>.1`: man pages from each binary's clap definition (`clap_mangen`), and one per
//!   `hyperctl` subcommand (`hyperctl-jobs.1`, ...);
//! - `build/completions/{bash,zsh,fish}/`: shell completions (`clap_complete`);
//! - `build/units/`: the units of `systemd/` with the packaged paths (`/usr/bin`, `/usr/share/doc`)
//!   in place of the ones `install.sh` and Ansible use (`/usr/local/...`).
//!
//! Usage: `hyperfarm-gen-assets [OUT_DIR]` (default: `packaging/build` of this checkout).

use std::fs;
use std::path::{Path, PathBuf};

use clap::{Command, CommandFactory};
use clap_complete::Shell;

fn main() {
    let out = std::env::args_os().nth(1).map(PathBuf::from).unwrap_or_else(|| crate_dir().join("build"));
    if let Err(e) = run(&out) {
        eprintln!("hyperfarm-gen-assets: {e}");
        std::process::exit(1);
    }
}

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The three binaries' command definitions, named as installed.
fn commands() -> Vec<Command> {
    vec![
        hyperexport::cli::Cli::command().name("hyperexport"),
        hyper2kvm_agent::config::Cli::command().name("hyper2kvm-agent"),
        hyperctl::Cli::command().name("hyperctl"),
    ]
}

fn run(out: &Path) -> Result<(), String> {
    let io = |what: &Path, e: std::io::Error| format!("{}: {e}", what.display());
    for sub in ["man", "completions/bash", "completions/zsh", "completions/fish", "units"] {
        let d = out.join(sub);
        // Regenerated from scratch: a renamed subcommand leaves no old page behind.
        if d.exists() {
            fs::remove_dir_all(&d).map_err(|e| io(&d, e))?;
        }
        fs::create_dir_all(&d).map_err(|e| io(&d, e))?;
    }
    let mut pages = 0;
    for cmd in commands() {
        pages += man_pages(cmd.clone(), &out.join("man"))?;
        completions(cmd, out)?;
    }
    let units = units(&crate_dir().join("../systemd"), &out.join("units"))?;
    println!("wrote {pages} man pages, {} completions and {units} units into {}", 3 * 3, out.display());
    Ok(())
}

/// `<name>.1` for the command, then `<name>-<sub>.1` for each visible subcommand, recursively.
fn man_pages(cmd: Command, dir: &Path) -> Result<usize, String> {
    let mut cmd = cmd;
    cmd.build();
    write_pages(&cmd, dir)
}

fn write_pages(cmd: &Command, dir: &Path) -> Result<usize, String> {
    let name = cmd.get_display_name().unwrap_or(cmd.get_name()).to_string();
    let mut buf = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .title(name.to_uppercase())
        .render(&mut buf)
        .map_err(|e| format!("{name}: {e}"))?;
    let path = dir.join(format!("{name}.1"));
    fs::write(&path, buf).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut n = 1;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set() && s.get_name() != "help") {
        n += write_pages(sub, dir)?;
    }
    Ok(n)
}

fn completions(mut cmd: Command, out: &Path) -> Result<(), String> {
    let name = cmd.get_name().to_string();
    for (shell, sub, file) in [
        (Shell::Bash, "bash", name.clone()),
        (Shell::Zsh, "zsh", format!("_{name}")),
        (Shell::Fish, "fish", format!("{name}.fish")),
    ] {
        let mut buf = Vec::new();
        clap_complete::generate(shell, &mut cmd, &name, &mut buf);
        let path = out.join("completions").join(sub).join(file);
        fs::write(&path, buf).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

/// The units with the packaged paths. Refuses a unit that names neither path: the rewrite would
/// then silently do nothing and the package would start a binary that is not there.
fn units(src: &Path, dst: &Path) -> Result<usize, String> {
    let mut n = 0;
    for name in
        ["hyper2kvm-agent.service", "hyper2kvm-agent@.service", "hyper2kvm-agent.target", "hyperexport-serve.service"]
    {
        let path = src.join(name);
        let text = fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let packaged =
            packaged_unit(&text).ok_or_else(|| format!("{}: names no /usr/local path to rewrite", path.display()))?;
        fs::write(dst.join(name), packaged).map_err(|e| format!("{}: {e}", dst.join(name).display()))?;
        n += 1;
    }
    Ok(n)
}

fn packaged_unit(text: &str) -> Option<String> {
    text.contains("/usr/local/")
        .then(|| text.replace("/usr/local/bin/", "/usr/bin/").replace("/usr/local/share/doc/", "/usr/share/doc/"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn units_get_the_packaged_paths_and_a_unit_without_them_is_refused() {
        let u = "Documentation=file:///usr/local/share/doc/hyperfarm/x\nExecStart=/usr/local/bin/hyper2kvm-agent --instance default\n";
        let p = packaged_unit(u).unwrap();
        assert!(p.contains("ExecStart=/usr/bin/hyper2kvm-agent --instance default"), "{p}");
        assert!(p.contains("file:///usr/share/doc/hyperfarm/x"), "{p}");
        assert!(!p.contains("/usr/local"), "{p}");
        assert_eq!(packaged_unit("ExecStart=/opt/x\n"), None);
    }

    #[test]
    fn every_binary_gets_pages_and_completions() {
        let out = std::env::temp_dir().join(format!("hyperfarm-gen-assets-{}", std::process::id()));
        run(&out).unwrap();
        for page in ["hyperexport.1", "hyper2kvm-agent.1", "hyperctl.1", "hyperctl-jobs.1"] {
            let text = fs::read_to_string(out.join("man").join(page)).unwrap();
            assert!(text.starts_with(".ie") || text.contains(".TH"), "{page} is not a man page: {text:.200}");
        }
        let agent = fs::read_to_string(out.join("man/hyper2kvm-agent.1")).unwrap();
        assert!(agent.contains("watch\\-dir"), "the agent's page documents --watch-dir");
        let bash = fs::read_to_string(out.join("completions/bash/hyperctl")).unwrap();
        assert!(bash.contains("jobs") && bash.contains("complete"), "{bash:.300}");
        assert!(out.join("completions/zsh/_hyperexport").is_file());
        assert!(out.join("completions/fish/hyper2kvm-agent.fish").is_file());
        let unit = fs::read_to_string(out.join("units/hyper2kvm-agent@.service")).unwrap();
        assert!(unit.contains("ExecStart=/usr/bin/hyper2kvm-agent"), "{unit}");
        fs::remove_dir_all(&out).unwrap();
    }
}
