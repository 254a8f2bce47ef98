//! Durable, NFS-safe file-system steps (see `docs/protocol.md`, "Rules we rely on").
//!
//! Every function here is synchronous and may block for as long as the storage does (a cut NFS link
//! blocks uninterruptibly): async callers run them on a blocking thread, never on the thread that
//! must keep answering gRPC, heartbeating or handling signals.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use rustix::fs::{Mode, OFlags, RenameFlags, ResolveFlags};

/// fsync a directory so that the names created, renamed or removed in it are durable.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    retry_stale(&[dir], || File::open(dir))?.sync_all()
}

/// Is this "stale file handle" (ESTALE)? NFS and FUSE clients (gluster) report it when a name
/// they had looked up was renamed or replaced through another host; it was measured on the
/// cross-host bed for a rename of a directory another host had just moved.
pub fn is_stale(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ESTALE)
}

/// Run a path-based step; on ESTALE, look the `dirs` up again (list them, which makes the
/// client drop its stale handles) and retry, at most 6 tries in all over about 1.5 s (gluster's
/// default caches kept one stale for about a second on the bed; docs/protocol.md rule 9).
/// ESTALE is reported before the step is carried out, so a retry never does it twice.
pub fn retry_stale<T>(dirs: &[&Path], step: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    retry_stale_for(dirs, std::time::Duration::from_millis(1500), step)
}

/// [`retry_stale`] with a time budget of its own, for steps that are worth waiting for (the move
/// of a finished job to its final state). Waits double from 50 ms, at most 1 s.
pub fn retry_stale_for<T>(
    dirs: &[&Path],
    budget: std::time::Duration,
    mut step: impl FnMut() -> io::Result<T>,
) -> io::Result<T> {
    let t0 = std::time::Instant::now();
    let mut wait = std::time::Duration::from_millis(50);
    loop {
        match step() {
            Err(e) if is_stale(&e) && t0.elapsed() + wait <= budget => {
                for d in dirs {
                    let _ = fs::symlink_metadata(d);
                    if let Ok(rd) = fs::read_dir(d) {
                        rd.take(100_000).for_each(drop);
                    }
                }
                std::thread::sleep(wait);
                wait = (wait * 2).min(std::time::Duration::from_secs(1));
            }
            other => return other,
        }
    }
}

/// Write `bytes` to a new file at `path` (which must not exist): write, fsync, close. The caller
/// renames or links it into place and fsyncs the directory.
pub fn write_new_file(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut f =
        retry_stale(&[parent_of(path)], || OpenOptions::new().write(true).create_new(true).mode(0o644).open(path))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    // On NFS, close reports deferred write errors; std's drop ignores them, so the fsync above is
    // what surfaces them.
    drop(f);
    Ok(())
}

/// Replace the content of `path` atomically: write `path.tmp-<pid>`, fsync, rename over `path`,
/// fsync the directory. Only for files that one writer owns and that readers re-read on ENOENT.
pub fn replace_file(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = sibling_tmp(path);
    let _ = fs::remove_file(&tmp);
    write_new_file(&tmp, bytes)?;
    retry_stale(&[parent_of(path)], || fs::rename(&tmp, path))?;
    fsync_dir(parent_of(path))
}

/// Publish a new file at `path` that must not exist yet: write a temporary sibling, fsync, then
/// `link` it to `path` (which fails with EEXIST instead of replacing) and remove the temporary.
/// Returns `Ok(false)` if `path` already existed; it is never overwritten.
pub fn create_file_noreplace(path: &Path, bytes: &[u8]) -> io::Result<bool> {
    let tmp = sibling_tmp(path);
    let _ = fs::remove_file(&tmp);
    write_new_file(&tmp, bytes)?;
    let linked = link_noreplace(&tmp, path);
    let _ = fs::remove_file(&tmp);
    let linked = linked?;
    if linked {
        fsync_dir(parent_of(path))?;
    }
    Ok(linked)
}

/// `link(from, to)`: gives `to` the file `from` names unless `to` exists. Returns `Ok(false)` when
/// `to` already names another file. An EEXIST that NFS reports for a retried request that did
/// succeed is recognised by comparing the inode of both names.
pub fn link_noreplace(from: &Path, to: &Path) -> io::Result<bool> {
    match retry_stale(&[parent_of(from), parent_of(to)], || fs::hard_link(from, to)) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(same_file(from, to)?),
        Err(e) => Err(e),
    }
}

fn same_file(a: &Path, b: &Path) -> io::Result<bool> {
    let (ma, mb) = (fs::symlink_metadata(a)?, fs::symlink_metadata(b)?);
    Ok(ma.dev() == mb.dev() && ma.ino() == mb.ino())
}

/// The outcome of a rename that another host may race.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Moved {
    /// We moved it.
    Yes,
    /// The source was gone: somebody else moved or removed it first.
    SourceGone,
    /// The destination already exists and was not replaced.
    DestinationExists,
}

/// Rename `from` to `to`, where `to` must not exist, interpreting failures the NFS way: a rename that
/// reports failure may still have happened (a retried request), so both names are checked.
///
/// Never replaces an existing `to`: `renameat2(RENAME_NOREPLACE)` where the file system supports
/// it; elsewhere (some NFS clients answer EINVAL) an existence check then a plain rename, which is
/// safe because every destination we use has exactly one possible writer (see the protocol).
pub fn rename_noreplace(from: &Path, to: &Path) -> io::Result<Moved> {
    rename_noreplace_for(from, to, std::time::Duration::from_millis(1500))
}

/// [`rename_noreplace`], waiting out ESTALE for up to `stale_budget`.
pub fn rename_noreplace_for(from: &Path, to: &Path, stale_budget: std::time::Duration) -> io::Result<Moved> {
    let dirs = [parent_of(from), parent_of(to)];
    let result = match retry_stale_for(&dirs, stale_budget, || {
        rustix::fs::renameat_with(rustix::fs::CWD, from, rustix::fs::CWD, to, RenameFlags::NOREPLACE)
            .map_err(io::Error::from)
    }) {
        Ok(()) => Ok(()),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOSYS)) => {
            if fs::symlink_metadata(to).is_ok() {
                return Ok(Moved::DestinationExists);
            }
            retry_stale_for(&dirs, stale_budget, || fs::rename(from, to))
        }
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => Ok(Moved::Yes),
        Err(e) => {
            let from_exists = fs::symlink_metadata(from).is_ok();
            let to_exists = fs::symlink_metadata(to).is_ok();
            match (e.kind(), from_exists, to_exists) {
                (io::ErrorKind::AlreadyExists, true, true) => Ok(Moved::DestinationExists),
                (_, true, true) if e.raw_os_error() == Some(libc::ENOTEMPTY) => Ok(Moved::DestinationExists),
                (io::ErrorKind::NotFound, false, _) => Ok(Moved::SourceGone),
                // NFS: the first attempt of a retried rename succeeded; only our unique source name
                // could have produced the destination, so we won.
                (_, false, true) => Ok(Moved::Yes),
                _ => Err(e),
            }
        }
    }
}

/// Writes a growing file back to disk while another process writes it (`fdatasync` every
/// 200 ms from a thread of its own), so that the final `fsync` before publication has little left
/// to do: the disk works during the conversion instead of after it. Stops when dropped.
pub struct Flusher {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Flusher {
    pub fn start(path: PathBuf) -> Flusher {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("flush".into())
            .spawn(move || {
                let mut file = None;
                // Until the sender is dropped: flush every 200 ms.
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    rx.recv_timeout(std::time::Duration::from_millis(200))
                {
                    if file.is_none() {
                        file = File::open(&path).ok();
                    }
                    if let Some(f) = &file {
                        let _ = f.sync_data();
                    }
                }
            })
            .ok();
        Flusher { stop: Some(tx), thread }
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Remove a directory tree, treating "already gone" as success.
pub fn remove_tree(path: &Path) -> io::Result<()> {
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Remove a file, treating "already gone" as success.
pub fn remove_file(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Open a regular file for reading without following a symlink in its last component and without
/// blocking on a FIFO; anything but a regular file is refused with `InvalidInput`.
pub fn open_regular(path: &Path) -> io::Result<File> {
    let f =
        OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(path).map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                io::Error::new(io::ErrorKind::InvalidInput, "is a symbolic link")
            } else {
                e
            }
        })?;
    ensure_regular(&f)?;
    Ok(f)
}

/// Read a small file that anyone with write access to the queue (or the output directory) could
/// have planted: opened without following a symlink and without blocking on a FIFO, refused unless
/// it is a regular file, and read up to `max` bytes. A longer file is an error (`InvalidData`), never
/// a partial read taken for the whole.
pub fn read_bounded(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    let f = open_regular(path)?;
    let mut buf = Vec::new();
    io::Read::read_to_end(&mut io::Read::take(f, max + 1), &mut buf)?;
    if buf.len() as u64 > max {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("is larger than {max} bytes")));
    }
    Ok(buf)
}

/// Largest small protocol file we read (leases, cancel requests, events, origins, records).
pub const SMALL_FILE_MAX: u64 = 64 * 1024;

/// What a file looked like at one moment: a later look that differs means it was written to,
/// truncated, grown or replaced. (Every write moves mtime and ctime; ctime cannot be set back.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    dev: u64,
    ino: u64,
    pub len: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl Stamp {
    pub fn of(md: &fs::Metadata) -> Stamp {
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        Stamp {
            dev: md.dev(),
            ino: md.ino(),
            len: md.len(),
            mtime_ns: ns(md.mtime(), md.mtime_nsec()),
            ctime_ns: ns(md.ctime(), md.ctime_nsec()),
        }
    }

    pub fn of_file(f: &File) -> io::Result<Stamp> {
        Ok(Stamp::of(&f.metadata()?))
    }

    /// How `f` (the same open file) changed since this stamp, if it did.
    pub fn changed(&self, f: &File) -> Option<String> {
        let now = match Stamp::of_file(f) {
            Ok(s) => s,
            Err(e) => return Some(format!("it can no longer be examined ({e})")),
        };
        if now == *self {
            None
        } else if now.len != self.len {
            Some(format!("its size changed from {} to {} bytes", self.len, now.len))
        } else {
            Some("it was written to".into())
        }
    }
}

/// Open `rel` below the directory `root` for reading, refusing any path that leaves `root`, that
/// crosses a symbolic link, or that is not a regular file. Uses `openat2(RESOLVE_BENEATH |
/// RESOLVE_NO_SYMLINKS)`, which the kernel enforces atomically; on kernels without it, a lexical
/// check plus `O_NOFOLLOW` on every component.
pub fn open_beneath(root: &Path, rel: &Path) -> io::Result<File> {
    check_relative(rel)?;
    let dir = File::open(root)?;
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
    let resolve = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
    match rustix::fs::openat2(&dir, rel, flags, Mode::empty(), resolve) {
        Ok(fd) => {
            let f = File::from(fd);
            ensure_regular(&f)?;
            Ok(f)
        }
        Err(e) if e == rustix::io::Errno::NOSYS => open_beneath_fallback(root, rel),
        Err(e) if e == rustix::io::Errno::XDEV || e == rustix::io::Errno::LOOP => {
            Err(io::Error::new(io::ErrorKind::InvalidInput, "leaves its directory or crosses a symbolic link"))
        }
        Err(e) => Err(e.into()),
    }
}

fn open_beneath_fallback(root: &Path, rel: &Path) -> io::Result<File> {
    let mut cur = root.to_path_buf();
    let comps: Vec<_> = rel.components().collect();
    for (i, c) in comps.iter().enumerate() {
        cur.push(c.as_os_str());
        let md = fs::symlink_metadata(&cur)?;
        if md.file_type().is_symlink() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "crosses a symbolic link"));
        }
        if i + 1 < comps.len() && !md.is_dir() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "a path component is not a directory"));
        }
    }
    open_regular(&cur)
}

/// A relative path made only of normal components (no `..`, no root, no `.` tricks, not empty).
pub fn check_relative(rel: &Path) -> io::Result<()> {
    if rel.as_os_str().is_empty() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty path"));
    }
    for c in rel.components() {
        match c {
            Component::Normal(_) => {}
            Component::CurDir => {}
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "must be a relative path inside the job without `..`",
                ));
            }
        }
    }
    Ok(())
}

fn ensure_regular(f: &File) -> io::Result<()> {
    let md = f.metadata()?;
    if !md.file_type().is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("is not a regular file ({})", describe_type(&md)),
        ));
    }
    // The file was opened non-blocking so that a FIFO could not hang us; regular files ignore the
    // flag, but clear it anyway so later reads behave normally.
    let fl = rustix::fs::fcntl_getfl(f)?;
    rustix::fs::fcntl_setfl(f, fl & !OFlags::NONBLOCK)?;
    Ok(())
}

fn describe_type(md: &fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = md.file_type();
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_symlink() {
        "a symbolic link"
    } else {
        "not a regular file"
    }
}

/// `dir` exists, is a directory, and we can create and remove a file in it.
pub fn probe_writable(dir: &Path) -> io::Result<()> {
    let md = fs::metadata(dir)?;
    if !md.is_dir() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "is not a directory"));
    }
    let probe = dir.join(format!(".hyperfarm-probe-{}-{}", host_id(), std::process::id()));
    let _ = fs::remove_file(&probe);
    // No fsync: on ext4 (data=ordered) every fsync commits the journal and with it every other
    // file's dirty data, so a probe every few seconds would slow the conversions it watches.
    // Creating and writing proves the directory is writable; free space is checked separately.
    let written =
        fs::OpenOptions::new().write(true).create_new(true).open(&probe).and_then(|mut f| f.write_all(b"probe"));
    let removed = fs::remove_file(&probe);
    written.and(removed)
}

/// Free bytes available to unprivileged users on the file system holding `path`.
pub fn free_bytes(path: &Path) -> io::Result<u64> {
    space(path).map(|(free, _)| free)
}

/// Free (for unprivileged users) and total bytes of the file system holding `path`.
pub fn space(path: &Path) -> io::Result<(u64, u64)> {
    let st = rustix::fs::statvfs(path)?;
    Ok((st.f_bavail.saturating_mul(st.f_frsize), st.f_blocks.saturating_mul(st.f_frsize)))
}

/// This host's identity on shared storage: `<hostname>-<8 hex digits>`, the digits derived from the
/// machine id (`/etc/machine-id`) and the host name together. Two hosts that share a host name
/// (clones, containers, network namespaces of one machine) or a machine id (a cloned VM image)
/// still differ unless they share both — which the agent detects at start-up. Used wherever one
/// host must tell its own things from another's: staging names, lease ownership, probe files.
/// Only letters, digits and `-` (it is part of file names split on `.`).
pub fn host_id() -> String {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        let name = hostname();
        let machine = ["/etc/machine-id", "/var/lib/dbus/machine-id"]
            .iter()
            .find_map(|p| read_bounded(Path::new(p), 256).ok())
            .map(|b| String::from_utf8_lossy(&b).trim().to_string())
            .unwrap_or_default();
        host_id_of(&name, &machine)
    })
    .clone()
}

/// [`host_id`] from a host name and a machine id.
pub fn host_id_of(hostname: &str, machine_id: &str) -> String {
    let mut h = blake3::Hasher::new();
    h.update(b"hyperfarm-host-id-v1\0");
    h.update(machine_id.as_bytes());
    h.update(b"\0");
    h.update(hostname.as_bytes());
    let hex = h.finalize().to_hex();
    let short: String = hostname
        .split('.')
        .next()
        .unwrap_or_default()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '-' })
        .take(40)
        .collect();
    let short = if short.is_empty() { "host".to_string() } else { short };
    format!("{short}-{}", &hex.as_str()[..8])
}

/// This host's name (from `uname`), for people (logs, records); [`host_id`] tells hosts apart.
pub fn hostname() -> String {
    let uname = rustix::system::uname();
    let name = uname.nodename().to_string_lossy().into_owned();
    if name.is_empty() { "localhost".to_string() } else { name }
}

/// This boot's identity, to tell a process of a previous boot from a live one with the same pid.
pub fn boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|s| s.trim().to_string()).unwrap_or_default()
}

/// Whether a process with this pid exists on this host.
pub fn pid_alive(pid: u32) -> bool {
    let Some(pid) = i32::try_from(pid).ok().and_then(rustix::process::Pid::from_raw) else {
        return false;
    };
    match rustix::process::test_kill_process(pid) {
        Ok(()) => true,
        Err(e) => e == rustix::io::Errno::PERM,
    }
}

fn sibling_tmp(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    parent_of(path).join(format!(".{name}.tmp-{}-{}", host_id(), std::process::id()))
}

fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn a_stale_handle_is_retried_after_a_fresh_lookup_and_other_errors_are_not() {
        let d = tempfile::tempdir().expect("tempdir");
        let stale = || io::Error::from_raw_os_error(libc::ESTALE);
        let mut calls = 0;
        let got = retry_stale(&[d.path()], || {
            calls += 1;
            if calls < 3 { Err(stale()) } else { Ok(calls) }
        });
        assert_eq!(got.expect("third try"), 3);
        let mut calls = 0;
        let got: io::Result<()> = retry_stale(&[d.path()], || {
            calls += 1;
            Err(stale())
        });
        assert!(is_stale(&got.expect_err("still stale")));
        assert_eq!(calls, 5, "bounded: 50+100+200+400 ms waited, the next 800 would pass 1.5 s");
        let mut calls = 0;
        let got: io::Result<()> = retry_stale(&[d.path()], || {
            calls += 1;
            Err(io::Error::from_raw_os_error(libc::EACCES))
        });
        assert_eq!(got.expect_err("denied").raw_os_error(), Some(libc::EACCES));
        assert_eq!(calls, 1);
    }

    #[test]
    fn create_noreplace_never_overwrites() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("a");
        assert!(create_file_noreplace(&p, b"one").expect("first"));
        assert!(!create_file_noreplace(&p, b"two").expect("second"));
        assert_eq!(fs::read(&p).expect("read"), b"one");
        // No temporary leftovers.
        assert_eq!(fs::read_dir(d.path()).expect("ls").count(), 1);
    }

    #[test]
    fn rename_noreplace_reports_who_won() {
        let d = tempfile::tempdir().expect("tempdir");
        let (a, b, c) = (d.path().join("a"), d.path().join("b"), d.path().join("c"));
        fs::create_dir(&a).expect("mkdir a");
        fs::create_dir(&c).expect("mkdir c");
        fs::write(c.join("x"), b"x").expect("write");
        assert_eq!(rename_noreplace(&a, &b).expect("move"), Moved::Yes);
        assert_eq!(rename_noreplace(&a, &d.path().join("z")).expect("gone"), Moved::SourceGone);
        assert_eq!(rename_noreplace(&b, &c).expect("exists"), Moved::DestinationExists);
        assert!(b.is_dir() && c.join("x").is_file());
    }

    #[test]
    fn open_beneath_refuses_escapes_symlinks_and_special_files() {
        let d = tempfile::tempdir().expect("tempdir");
        let root = d.path().join("job");
        fs::create_dir_all(root.join("disks")).expect("mkdir");
        fs::write(root.join("disks/ok.raw"), b"data").expect("write");
        fs::write(d.path().join("secret"), b"secret").expect("write");
        symlink(d.path().join("secret"), root.join("disks/link")).expect("symlink");
        symlink(d.path(), root.join("dirlink")).expect("symlink");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            root.join("fifo"),
            rustix::fs::FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .expect("mkfifo");

        assert!(open_beneath(&root, Path::new("disks/ok.raw")).is_ok());
        for bad in ["../secret", "/etc/passwd", "disks/link", "dirlink/secret", "fifo", "disks", ""] {
            assert!(open_beneath(&root, Path::new(bad)).is_err(), "{bad} must be refused");
        }
        assert!(open_beneath_fallback(&root, Path::new("disks/link")).is_err());
        assert!(open_beneath_fallback(&root, Path::new("dirlink/secret")).is_err());
        assert!(open_beneath_fallback(&root, Path::new("disks/ok.raw")).is_ok());
    }

    #[test]
    fn bounded_reads_refuse_fifos_symlinks_devices_and_oversized_files() {
        let d = tempfile::tempdir().expect("tempdir");
        let ok = d.path().join("ok");
        fs::write(&ok, b"1234").expect("write");
        assert_eq!(read_bounded(&ok, 4).expect("read"), b"1234");
        assert_eq!(read_bounded(&ok, 3).expect_err("too big").kind(), io::ErrorKind::InvalidData);
        let fifo = d.path().join("fifo");
        rustix::fs::mknodat(rustix::fs::CWD, &fifo, rustix::fs::FileType::Fifo, Mode::from_raw_mode(0o600), 0)
            .expect("mkfifo");
        // Would block for ever with a plain open.
        assert_eq!(read_bounded(&fifo, 4).expect_err("fifo").kind(), io::ErrorKind::InvalidInput);
        let zero = d.path().join("zero");
        symlink("/dev/zero", &zero).expect("symlink");
        assert_eq!(read_bounded(&zero, 4).expect_err("symlink").kind(), io::ErrorKind::InvalidInput);
        assert_eq!(read_bounded(Path::new("/dev/zero"), 4).expect_err("device").kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn host_ids_tell_hosts_apart_by_name_and_machine() {
        let a = host_id_of("conv01.example.com", "aaaa");
        assert!(a.starts_with("conv01-") && a.len() == "conv01-".len() + 8, "{a}");
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'), "{a}");
        assert_ne!(a, host_id_of("conv01.example.com", "bbbb"), "same name, other machine");
        assert_ne!(a, host_id_of("conv02.example.com", "aaaa"), "same machine id (a clone), other name");
        assert_eq!(a, host_id_of("conv01.example.com", "aaaa"));
        assert_eq!(host_id(), host_id(), "stable");
    }

    #[test]
    fn pid_checks() {
        assert!(pid_alive(std::process::id()));
        assert!(!pid_alive(0));
        assert!(!boot_id().is_empty());
    }
}
