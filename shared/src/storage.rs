//! What the shared storage under a directory is, and whether it is mounted the way the protocol
//! needs (docs/protocol.md, "What the shared storage must provide"). The agent logs the advice at
//! start-up: it can see an NFS mount's options and the command line of a GlusterFS client on its
//! own host, not a gluster volume's server-side options.

use std::path::{Path, PathBuf};

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub mount_point: PathBuf,
    pub fstype: String,
    pub source: String,
    /// Per-mount and super-block options together.
    pub options: Vec<String>,
}

impl Mount {
    fn option(&self, key: &str) -> Option<&str> {
        self.options.iter().find_map(|o| o.strip_prefix(key)?.strip_prefix('='))
    }
    fn flag(&self, key: &str) -> bool {
        self.options.iter().any(|o| o == key)
    }
}

/// `\040`-style escapes of mountinfo (space, tab, newline, backslash).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8)
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parse mountinfo text.
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let l: Vec<&str> = left.split(' ').collect();
            let r: Vec<&str> = right.split(' ').collect();
            let (mount_point, mount_opts) = (l.get(4)?, l.get(5)?);
            let (fstype, source, super_opts) = (r.first()?, r.get(1)?, r.get(2).copied().unwrap_or(""));
            let options =
                mount_opts.split(',').chain(super_opts.split(',')).filter(|o| !o.is_empty()).map(str::to_string);
            Some(Mount {
                mount_point: PathBuf::from(unescape(mount_point)),
                fstype: fstype.to_string(),
                source: unescape(source),
                options: options.collect(),
            })
        })
        .collect()
}

/// The mount that holds `path` (the last-mounted of the longest matching mount points).
pub fn mount_of(path: &Path) -> Option<Mount> {
    let real = std::fs::canonicalize(path).ok()?;
    let text = crate::fsx::read_bounded(Path::new("/proc/self/mountinfo"), 16 << 20).ok()?;
    let mounts = parse_mountinfo(&String::from_utf8_lossy(&text));
    let mut best: Option<Mount> = None;
    for m in mounts {
        if real.starts_with(&m.mount_point)
            && best.as_ref().is_none_or(|b| m.mount_point.as_os_str().len() >= b.mount_point.as_os_str().len())
        {
            best = Some(m);
        }
    }
    best
}

/// The command line of the GlusterFS client process serving `mount_point` on this host.
fn gluster_client_args(mount_point: &Path) -> Option<Vec<String>> {
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        if !e.file_name().to_string_lossy().bytes().all(|c| c.is_ascii_digit()) {
            continue;
        }
        let Ok(raw) = crate::fsx::read_bounded(&e.path().join("cmdline"), 64 << 10) else { continue };
        let args: Vec<String> =
            raw.split(|b| *b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        let is_client = args.first().is_some_and(|a| a.rsplit('/').next().is_some_and(|n| n.starts_with("glusterfs")));
        if is_client && args.last().is_some_and(|l| Path::new(l) == mount_point) {
            return Some(args);
        }
    }
    None
}

/// What is wrong (or unknown) about how `m` is mounted, for a queue or output directory, as
/// sentences for the log. `gluster_args`: the client's command line, when found.
pub fn advice(m: &Mount, gluster_args: Option<&[String]>) -> Vec<String> {
    let mut out = Vec::new();
    let at = m.mount_point.display();
    if m.fstype.starts_with("nfs") {
        if m.flag("soft") || m.flag("softerr") {
            out.push(format!(
                "{at} is an NFS mount with `soft`: a timed-out write can be lost silently; mount it `hard`"
            ));
        }
        let dir_cache = m.option("actimeo").or_else(|| m.option("acdirmax")).and_then(|v| v.parse::<u64>().ok());
        let uncached = m.flag("noac") || m.option("lookupcache") == Some("none");
        if !uncached && dir_cache.is_none_or(|s| s > 2) {
            out.push(format!(
                "{at} is an NFS mount whose directory attributes may be cached for {} s: jobs from other hosts can be seen that late; mount it with actimeo=1 (or acdirmin=0,acdirmax=1)",
                dir_cache.unwrap_or(60)
            ));
        }
    } else if m.fstype == "fuse.glusterfs" {
        match gluster_args {
            // Under the agent's unit (ProtectProc=invisible, PrivateUsers=) other processes are
            // hidden: nothing to judge, and a warning every start would only teach operators to
            // ignore warnings. `check` says so in its description instead.
            None => {}
            Some(args) => {
                let mut missing: Vec<&str> = [
                    ("--attribute-timeout=0", "attribute-timeout=0"),
                    ("--entry-timeout=0", "entry-timeout=0"),
                    ("--negative-timeout=0", "negative-timeout=0"),
                ]
                .into_iter()
                .filter(|(arg, _)| !args.iter().any(|a| a == arg))
                .map(|(_, opt)| opt)
                .collect();
                // fopen-keep-cache is off unless asked for; mount.glusterfs 10.3 cannot even pass
                // `fopen-keep-cache=off` (it hands the client "==off", which it refuses), so only
                // a client that turned it on is advised against.
                let keeps_cache = args.iter().any(|a| {
                    a == "--fopen-keep-cache"
                        || a.strip_prefix("--fopen-keep-cache=")
                            .is_some_and(|v| !matches!(v, "off" | "false" | "no" | "0"))
                });
                if keeps_cache {
                    missing.push("fopen-keep-cache=off");
                }
                if !missing.is_empty() {
                    out.push(format!(
                        "{at} is a GlusterFS mount without {}: with the client's default caches another host's renames and new files show late (a renamed file under both names for about a second); mount with those options and turn the volume's performance caches off (docs/protocol.md)",
                        missing.join(",")
                    ));
                }
            }
        }
    }
    out
}

/// The advice for the storage under `dir`: (file-system type and mount point, sentences).
pub fn check(dir: &Path) -> Option<(String, Vec<String>)> {
    let m = mount_of(dir)?;
    let gluster = m.fstype == "fuse.glusterfs";
    let args = gluster.then(|| gluster_client_args(&m.mount_point)).flatten();
    let unseen = if gluster && args.is_none() { " (its client's options are not visible to this process)" } else { "" };
    Some((format!("{} at {}{unseen}", m.fstype, m.mount_point.display()), advice(&m, args.as_deref())))
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
40 22 0:35 / /mnt/nfs\\040share rw,relatime shared:2 - nfs4 srv:/export rw,vers=4.2,soft,proto=tcp
41 22 0:36 / /mnt/nfs/fast rw,relatime shared:3 - nfs srv:/q rw,vers=3,hard,actimeo=1
42 22 0:37 / /mnt/gl rw,relatime shared:4 - fuse.glusterfs srv:/vol rw,user_id=0,group_id=0,allow_other
";

    fn mounts() -> Vec<Mount> {
        parse_mountinfo(INFO)
    }

    #[test]
    fn mountinfo_lines_are_parsed_with_their_escapes() {
        let m = mounts();
        assert_eq!(m.len(), 4);
        assert_eq!(m[1].mount_point, PathBuf::from("/mnt/nfs share"));
        assert_eq!(m[1].fstype, "nfs4");
        assert!(m[1].flag("soft") && m[1].flag("relatime"));
        assert_eq!(m[2].option("actimeo"), Some("1"));
    }

    #[test]
    fn nfs_soft_and_long_attribute_caches_are_advised_against() {
        let m = mounts();
        let soft = advice(&m[1], None);
        assert_eq!(soft.len(), 2, "{soft:?}");
        assert!(soft[0].contains("mount it `hard`") && soft[1].contains("actimeo=1"), "{soft:?}");
        assert!(advice(&m[2], None).is_empty(), "hard with actimeo=1 is right");
        assert!(advice(&m[0], None).is_empty(), "a local file system needs nothing");
    }

    #[test]
    fn gluster_clients_without_the_strict_timeouts_are_advised_against() {
        let m = &mounts()[3];
        let strict: Vec<String> = [
            "glusterfs",
            "--attribute-timeout=0",
            "--entry-timeout=0",
            "--negative-timeout=0",
            "--fopen-keep-cache=off",
            "/mnt/gl",
        ]
        .map(String::from)
        .to_vec();
        assert!(advice(m, Some(&strict)).is_empty());
        let defaults: Vec<String> = ["glusterfs", "--volfile-server=srv", "/mnt/gl"].map(String::from).to_vec();
        let a = advice(m, Some(&defaults));
        assert_eq!(a.len(), 1);
        assert!(a[0].contains("without attribute-timeout=0,entry-timeout=0,negative-timeout=0:"), "{a:?}");
        // What mount.glusterfs starts for the strict mount options (it cannot pass fopen-keep-cache=off).
        let helper: Vec<String> = [
            "glusterfs",
            "--attribute-timeout=0",
            "--entry-timeout=0",
            "--negative-timeout=0",
            "--process-name",
            "fuse",
            "/mnt/gl",
        ]
        .map(String::from)
        .to_vec();
        assert!(advice(m, Some(&helper)).is_empty(), "the kernel timeouts 0 without fopen-keep-cache are right");
        let mut kept = strict.clone();
        kept[4] = "--fopen-keep-cache=on".into();
        assert!(advice(m, Some(&kept))[0].contains("without fopen-keep-cache=off:"), "{:?}", advice(m, Some(&kept)));
        assert!(advice(m, None).is_empty(), "a client that cannot be seen is not judged");
    }
}
