//! The built-in engine: `qemu-img convert` to qcow2 with progress, then `qemu-img check`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

use super::EngineError;
use super::process::{self, describe};
use super::sandbox::Confinement;
use crate::format::DiskFormat;

/// A source image as qemu-img is given it.
#[derive(Debug, Clone, Copy)]
pub enum Source<'a> {
    /// The agent's own verified descriptor, handed to qemu-img as its standard input and opened as
    /// `/proc/self/fd/0`: the very inode that was checked, whatever happens to its name (and no
    /// access to the agent's /proc entries, which a confined process is denied).
    Fd(&'a std::fs::File),
    /// A path (VMDK descriptors, whose extents qemu-img resolves next to the descriptor's name).
    Path(&'a str),
}

impl Source<'_> {
    /// The name qemu-img opens.
    pub fn name(&self) -> &str {
        match self {
            Source::Fd(_) => "/proc/self/fd/0",
            Source::Path(p) => p,
        }
    }
    fn stdin(&self) -> std::io::Result<Option<std::fs::File>> {
        match self {
            Source::Fd(f) => f.try_clone().map(Some),
            Source::Path(_) => Ok(None),
        }
    }
}

/// How qemu-img is told to open a source image: a `json:` spec that pins the driver to the format
/// that was inspected and forbids a backing file (`"backing": null`), so that a header rewritten
/// after the inspection cannot make qemu-img read another file as a backing image. (An external
/// data file cannot be forbidden this way; the process's confinement refuses to open it.)
pub fn source_spec(path: &str, format: DiskFormat) -> String {
    let spec = serde_json::json!({
        "driver": format.qemu_name(),
        "backing": null,
        "file": {"driver": "file", "filename": path},
    });
    format!("json:{spec}")
}

/// Tuning of `qemu-img convert`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConvertOptions {
    /// Parallel coroutines (`-m`, 1 to 16).
    pub coroutines: u32,
    /// Out-of-order writes (`-W`).
    pub out_of_order: bool,
    /// Source cache mode (`-T`), e.g. `none` or `writeback`.
    pub source_cache: Option<String>,
    /// Destination cache mode (`-t`).
    pub dest_cache: Option<String>,
    /// I/O rate limit (`-r`), such as `200M` (bytes per second, K/M/G/T suffixes): keeps a
    /// conversion from saturating shared storage.
    pub rate_limit: Option<String>,
}

impl ConvertOptions {
    /// Check values that reach qemu-img's command line.
    pub fn validate(&self) -> Result<(), String> {
        let mode_ok = |m: &str| matches!(m, "none" | "writeback" | "writethrough" | "directsync" | "unsafe");
        for (k, v) in [("source_cache", &self.source_cache), ("dest_cache", &self.dest_cache)] {
            if let Some(m) = v
                && !mode_ok(m)
            {
                return Err(format!(
                    "convert.{k} = {m:?} is not one of none, writeback, writethrough, directsync, unsafe"
                ));
            }
        }
        if let Some(r) = &self.rate_limit {
            let digits = r.trim_end_matches(['K', 'M', 'G', 'T', 'k', 'm', 'g', 't']);
            if digits.is_empty()
                || !digits.bytes().all(|b| b.is_ascii_digit())
                || r.len() - digits.len() > 1
                || digits == "0"
            {
                return Err(format!("convert.rate_limit = {r:?} is not a rate such as 200M (bytes per second)"));
            }
        }
        Ok(())
    }
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions { coroutines: 8, out_of_order: true, source_cache: None, dest_cache: None, rate_limit: None }
    }
}

/// Result of `qemu-img check`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckReport {
    pub corruptions: u64,
    pub leaks: u64,
    pub check_errors: u64,
}

/// A qemu-img program.
#[derive(Debug, Clone)]
pub struct QemuImg {
    pub program: PathBuf,
    /// Limit for `info` and `check` (a hostile image must not hang the agent).
    pub quick_timeout: Duration,
}

impl Default for QemuImg {
    fn default() -> Self {
        QemuImg { program: PathBuf::from("qemu-img"), quick_timeout: Duration::from_secs(120) }
    }
}

impl QemuImg {
    pub fn new(program: impl Into<PathBuf>) -> Self {
        QemuImg { program: program.into(), ..Default::default() }
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new(&self.program);
        c.env("LC_ALL", "C");
        c
    }

    async fn run_quick(
        &self,
        cmd: Command,
        confine: Option<&Confinement>,
        stdin: Option<std::fs::File>,
    ) -> Result<(std::process::ExitStatus, String, String), EngineError> {
        let mut out = Vec::new();
        let fin = process::run(
            cmd,
            &self.program,
            process::Spawn { confine, stdin, pidfile: None },
            Some(self.quick_timeout),
            &CancellationToken::new(),
            |b| {
                if out.len() < 16 << 20 {
                    out.extend_from_slice(b)
                }
            },
            |_| {},
        )
        .await?;
        Ok((fin.status, String::from_utf8_lossy(&out).into_owned(), fin.stderr))
    }

    /// `qemu-img --version`, first line.
    pub async fn version(&self) -> Result<String, EngineError> {
        let mut c = self.cmd();
        c.arg("--version");
        let (status, out, err) = self.run_quick(c, None, None).await?;
        if !status.success() {
            return Err(EngineError::Failed {
                program: "qemu-img --version".into(),
                status: describe(&status),
                stderr: err,
            });
        }
        Ok(out.lines().next().unwrap_or_default().trim().to_string())
    }

    /// `qemu-img info --output=json -f <format> <source spec>` (see [`source_spec`]), confined.
    pub async fn info(
        &self,
        src: Source<'_>,
        format: DiskFormat,
        confine: &Confinement,
    ) -> Result<serde_json::Value, EngineError> {
        let mut c = self.cmd();
        c.args(["info", "--output=json", "-f", format.qemu_name()]).arg(source_spec(src.name(), format));
        let (status, out, err) = self.run_quick(c, Some(confine), src.stdin()?).await?;
        if !status.success() {
            return Err(EngineError::Failed {
                program: "qemu-img info".into(),
                status: describe(&status),
                stderr: err,
            });
        }
        serde_json::from_str(&out)
            .map_err(|e| EngineError::Output(format!("qemu-img info printed something that is not JSON: {e}")))
    }

    /// Convert `src` (a path qemu-img opens through [`source_spec`]; see the worker for how it is
    /// made safe) to a new qcow2 file `dst`, confined, its pid noted in `pidfile`. `on_progress`
    /// receives the percentage qemu-img prints (`-p`).
    #[allow(clippy::too_many_arguments)]
    pub async fn convert(
        &self,
        src: Source<'_>,
        format: DiskFormat,
        dst: &Path,
        opts: &ConvertOptions,
        confine: &Confinement,
        pidfile: Option<&Path>,
        cancel: &CancellationToken,
        mut on_progress: impl FnMut(f64),
    ) -> Result<(), EngineError> {
        let mut c = self.cmd();
        c.args(["convert", "-p", "-f", format.qemu_name(), "-O", "qcow2", "-o", "compat=1.1"]);
        let m = opts.coroutines.clamp(1, 16);
        c.arg("-m").arg(m.to_string());
        if opts.out_of_order {
            c.arg("-W");
        }
        if let Some(t) = &opts.source_cache {
            c.arg("-T").arg(t);
        }
        if let Some(t) = &opts.dest_cache {
            c.arg("-t").arg(t);
        }
        if let Some(r) = &opts.rate_limit {
            c.arg("-r").arg(r);
        }

        // The source is a `json:` spec and the destination an absolute path: nothing can be read
        // as an option or a protocol prefix.
        c.arg(source_spec(src.name(), format)).arg(dst);
        let mut parser = ProgressParser::default();
        let fin = process::run(
            c,
            &self.program,
            process::Spawn { confine: Some(confine), stdin: src.stdin()?, pidfile: pidfile.map(Path::to_path_buf) },
            None,
            cancel,
            |chunk| {
                for p in parser.feed(chunk) {
                    on_progress(p);
                }
            },
            |_| {},
        )
        .await?;
        if !fin.status.success() {
            return Err(EngineError::Failed {
                program: "qemu-img convert".into(),
                status: describe(&fin.status),
                stderr: fin.stderr,
            });
        }
        Ok(())
    }

    /// `qemu-img check -f <format>` of a source image. `Ok(false)`: the format has no check
    /// (raw, vpc); `Ok(true)`: consistent (leaks allowed); `Err`: damaged, with qemu-img's words.
    pub async fn check_source(
        &self,
        src: Source<'_>,
        format: DiskFormat,
        confine: &Confinement,
    ) -> Result<bool, EngineError> {
        let mut c = self.cmd();
        c.args(["check", "-q", "-f", format.qemu_name()]).arg(source_spec(src.name(), format));
        let (status, out, err) = self.run_quick(c, Some(confine), src.stdin()?).await?;
        match status.code() {
            Some(0) | Some(3) => Ok(true),
            Some(63) => Ok(false),
            _ => Err(EngineError::Failed {
                program: "qemu-img check".into(),
                status: describe(&status),
                stderr: format!("{}{}", out.trim(), err.trim()).trim().to_string(),
            }),
        }
    }

    /// `qemu-img check` of a qcow2 file. Leaked clusters are harmless (reported); corruptions
    /// and failures to check are errors.
    pub async fn check(&self, path: &Path) -> Result<CheckReport, EngineError> {
        let mut c = self.cmd();
        c.args(["check", "--output=json", "-f", "qcow2"])
            .arg(source_spec(&path.display().to_string(), DiskFormat::Qcow2));
        // Our own output, read only.
        let confine = Confinement::new().read(path);
        let (status, out, err) = self.run_quick(c, Some(&confine), None).await?;
        let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        let n = |k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
        let report = CheckReport { corruptions: n("corruptions"), leaks: n("leaks"), check_errors: n("check-errors") };
        match status.code() {
            Some(0) | Some(3) if report.corruptions == 0 && report.check_errors == 0 => Ok(report),
            _ => Err(EngineError::Failed {
                program: "qemu-img check".into(),
                status: format!(
                    "{}, {} corruption(s), {} check error(s)",
                    describe(&status),
                    report.corruptions,
                    report.check_errors
                ),
                stderr: err,
            }),
        }
    }
}

/// Parses qemu-img's `-p` output: `    (12.34/100%)\r` repeated.
#[derive(Debug, Default)]
pub struct ProgressParser {
    buf: Vec<u8>,
}

impl ProgressParser {
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<f64> {
        self.buf.extend_from_slice(chunk);
        let mut out = Vec::new();
        while let Some(pos) = self.buf.iter().position(|&b| b == b'\r' || b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=pos).collect();
            if let Some(p) = parse_progress(&line) {
                out.push(p);
            }
        }
        if self.buf.len() > 4096 {
            self.buf.clear();
        }
        out
    }
}

fn parse_progress(line: &[u8]) -> Option<f64> {
    let s = std::str::from_utf8(line).ok()?.trim();
    let inner = s.strip_prefix('(')?.strip_suffix("/100%)")?;
    let v: f64 = inner.parse().ok()?;
    (0.0..=100.0).contains(&v).then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates_options_that_reach_the_command_line() {
        let ok =
            ConvertOptions { rate_limit: Some("200M".into()), source_cache: Some("none".into()), ..Default::default() };
        assert!(ok.validate().is_ok());
        for bad in ["", "0", "12MB", "-r", "1 M", "M"] {
            let o = ConvertOptions { rate_limit: Some(bad.into()), ..Default::default() };
            assert!(o.validate().is_err(), "{bad:?}");
        }
        let o = ConvertOptions { dest_cache: Some("--help".into()), ..Default::default() };
        assert!(o.validate().is_err());
    }

    #[test]
    fn parses_progress_across_chunks() {
        let mut p = ProgressParser::default();
        assert_eq!(p.feed(b"    (0.00/100%)\r    (12.5"), vec![0.0]);
        assert_eq!(p.feed(b"0/100%)\r    (100.00/100%)\r\n"), vec![12.5, 100.0]);
        assert!(p.feed(b"garbage\r(200/100%)\r").is_empty());
    }
}
