//! The cross-host test bed: real shared storage between "hosts" on one machine.
//!
//! A GlusterFS volume is served by `glusterd` and its brick in a *storage* network namespace and
//! mounted with the FUSE client in each *host* namespace (an exporter host, agent hosts); the
//! namespaces share one bridge. Every host runs its programs as a host of its own would: its own
//! hostname (`unshare --uts`) and, in a mount namespace of its own, its own `/etc/machine-id` and
//! boot id (bind-mounted over the machine's), so that nothing a program uses to tell hosts apart
//! is shared. (The pid namespace is shared, as it is not something a program can tell hosts apart
//! by anyway; a kill -9 of an agent leaves its children running, as on a real host.) Facts behind
//! it: `../shared/notes/shared-fs-across-namespaces.md`.
//!
//! - **Set up from scratch and torn down**: its own namespaces, addresses, glusterd working
//!   directory and socket (the system's gluster state is never touched), volume, mounts; all gone
//!   on drop. Names carry this process's id, so a leftover of a killed run never collides.
//! - **Bounded waits** everywhere; **processes ended by PID** (glusterd is our child; clients and
//!   bricks by their pid files), never by name.
//! - **Two cache settings**: [`Cache::Strict`] (what the Ansible role and the docs require: kernel
//!   timeouts 0, `fopen-keep-cache` off, the client caches off) and [`Cache::Default`] (gluster's
//!   own defaults, with which another client can see a renamed file under both names for a second
//!   or more and read new files as empty). `network.ping-timeout` is 10 s in both.
//!
//! Needs root, `ip` (iproute2), `nsenter`/`unshare` (util-linux), `nft` (nftables) and
//! `glusterfs-server` + `glusterfs-client`; `.ci/run` installs them.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{Proc, Run};

/// How the clients cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cache {
    Strict,
    Default,
}

impl Cache {
    pub fn name(self) -> &'static str {
        match self {
            Cache::Strict => "strict",
            Cache::Default => "default",
        }
    }
}

/// The client options the strict setting mounts with.
pub const STRICT_MOUNT: &[&str] =
    &["--attribute-timeout=0", "--entry-timeout=0", "--negative-timeout=0", "--fopen-keep-cache=off"];
/// The volume's client-side caches the strict setting turns off.
pub const STRICT_VOLUME_OFF: &[&str] =
    &["stat-prefetch", "quick-read", "io-cache", "read-ahead", "write-behind", "open-behind", "readdir-ahead"];

/// One host of the bed.
#[derive(Debug)]
pub struct Host {
    /// Short name (`ex`, `a1`…).
    pub name: String,
    /// Its hostname (`unshare --uts`).
    pub hostname: String,
    pub netns: String,
    pub addr: String,
    /// Where it mounts the volume.
    pub mount: PathBuf,
    veth: String,
    client_pidfile: PathBuf,
    machine_id: PathBuf,
    boot_id: PathBuf,
}

impl Host {
    /// The queue directory as this host sees it.
    pub fn queue(&self) -> PathBuf {
        self.mount.join("queue")
    }
    pub fn output(&self) -> PathBuf {
        self.mount.join("output")
    }
}

/// The bed.
pub struct Bed {
    pub dir: tempfile::TempDir,
    pub cache: Cache,
    pub volume: String,
    storage_ns: String,
    storage_addr: String,
    sock: PathBuf,
    glusterd: Option<Child>,
    pub hosts: Vec<Host>,
    /// How long setting it up took.
    pub setup: Duration,
}

fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ip(args: &[&str]) {
    run(Command::new("ip").args(args), &format!("ip {}", args.join(" ")));
}

fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < limit, "the bed: timed out after {limit:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn kill_pid(pid: i32, sig: rustix::process::Signal) {
    if let Some(p) = rustix::process::Pid::from_raw(pid) {
        let _ = rustix::process::kill_process(p, sig);
    }
}

fn alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default().contains(") Z ")
}

/// SIGTERM, up to 5 s, then SIGKILL.
fn end_pid(pid: i32) {
    kill_pid(pid, rustix::process::Signal::TERM);
    let t0 = Instant::now();
    while alive(pid) && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(50));
    }
    kill_pid(pid, rustix::process::Signal::KILL);
}

/// A UUID-shaped id, different per bed and per host.
fn uuid_like(tag: u32, i: usize) -> String {
    let h = blake3::hash(format!("hyperfarm-bed-{tag}-{i}-{:?}", Instant::now()).as_bytes()).to_hex();
    let x = h.as_str();
    format!("{}-{}-{}-{}-{}", &x[0..8], &x[8..12], &x[12..16], &x[16..20], &x[20..32])
}

fn pid_from(file: &Path) -> Option<i32> {
    fs::read_to_string(file).ok()?.trim().parse().ok()
}

impl Bed {
    /// Set up a bed with these hosts (`(short name, hostname)`), every client mounted.
    pub fn up(cache: Cache, hosts: &[(&str, &str)]) -> Bed {
        for tool in ["glusterd", "glusterfs", "gluster", "nsenter", "unshare", "ip", "nft"] {
            assert!(
                std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
                    .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
                    .any(|d| d.join(tool).is_file()),
                "the cross-host bed needs {tool} (apt-get install glusterfs-server glusterfs-client nftables util-linux iproute2; .ci/run does)"
            );
        }
        let t0 = Instant::now();
        let tag = std::process::id() % 100_000;
        let dir = tempfile::Builder::new().prefix("hyperfarm-bed-").tempdir().expect("tempdir");
        let net = 1 + tag % 250;
        let storage_ns = format!("hf{tag}s");
        let storage_addr = format!("10.214.{net}.1");
        let mut bed = Bed {
            volume: format!("hfv{tag}"),
            sock: dir.path().join("glusterd.sock"),
            dir,
            cache,
            storage_ns: storage_ns.clone(),
            storage_addr: storage_addr.clone(),
            glusterd: None,
            hosts: Vec::new(),
            setup: Duration::ZERO,
        };
        // Network: a bridge in the storage namespace, one veth per host.
        ip(&["netns", "add", &storage_ns]);
        ip(&["-n", &storage_ns, "link", "set", "lo", "up"]);
        ip(&["-n", &storage_ns, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &storage_ns, "link", "set", "br0", "up"]);
        ip(&["-n", &storage_ns, "addr", "add", &format!("{storage_addr}/24"), "dev", "br0"]);
        for (i, (name, hostname)) in hosts.iter().enumerate() {
            let ns = format!("hf{tag}{name}");
            let (veth, peer) = (format!("hv{tag}{i}"), format!("hp{tag}{i}"));
            let addr = format!("10.214.{net}.{}", 10 + i);
            ip(&["netns", "add", &ns]);
            ip(&["link", "add", &veth, "type", "veth", "peer", "name", &peer]);
            ip(&["link", "set", &veth, "netns", &ns]);
            ip(&["link", "set", &peer, "netns", &storage_ns]);
            ip(&["-n", &storage_ns, "link", "set", &peer, "master", "br0"]);
            ip(&["-n", &storage_ns, "link", "set", &peer, "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            ip(&["-n", &ns, "addr", "add", &format!("{addr}/24"), "dev", &veth]);
            ip(&["-n", &ns, "link", "set", &veth, "up"]);
            let mount = bed.dir.path().join("mnt").join(name);
            fs::create_dir_all(&mount).expect("mkdir");
            let ids = bed.dir.path().join("ids").join(name);
            fs::create_dir_all(&ids).expect("mkdir");
            let (machine_id, boot_id) = (ids.join("machine-id"), ids.join("boot_id"));
            let u = uuid_like(tag, i);
            fs::write(&machine_id, format!("{}\n", u.replace('-', ""))).expect("write machine-id");
            fs::write(&boot_id, format!("{u}\n")).expect("write boot_id");
            bed.hosts.push(Host {
                name: name.to_string(),
                hostname: hostname.to_string(),
                netns: ns,
                addr,
                mount,
                veth,
                client_pidfile: bed.dir.path().join(format!("client-{name}.pid")),
                machine_id,
                boot_id,
            });
        }
        bed.start_glusterd();
        bed.create_volume();
        for i in 0..bed.hosts.len() {
            bed.mount(i);
        }
        let first = &bed.hosts[0];
        for d in ["queue", "output"] {
            fs::create_dir_all(first.mount.join(d)).expect("mkdir on the volume");
        }
        bed.setup = t0.elapsed();
        bed
    }

    fn gluster(&self, args: &[&str]) -> String {
        let mut c = Command::new("timeout");
        c.args(["30", "gluster", "--mode=script"]).arg(format!("--glusterd-sock={}", self.sock.display())).args(args);
        run(&mut c, &format!("gluster {}", args.join(" ")))
    }

    fn start_glusterd(&mut self) {
        let d = self.dir.path();
        let work = d.join("glusterd");
        fs::create_dir_all(&work).expect("mkdir");
        let base = fs::read_to_string("/etc/glusterfs/glusterd.vol").expect("/etc/glusterfs/glusterd.vol");
        let vol = base
            .replace("/var/lib/glusterd", &work.display().to_string())
            .replace("end-volume", &format!("    option glusterd-sockfile {}\nend-volume", self.sock.display()));
        let volfile = d.join("glusterd.vol");
        fs::write(&volfile, vol).expect("write glusterd.vol");
        let log = fs::File::create(d.join("glusterd.out")).expect("log");
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.storage_ns))
            .args(["glusterd", "-N", "-f"])
            .arg(&volfile)
            .arg("-p")
            .arg(d.join("glusterd.pid"))
            .arg("-l")
            .arg(d.join("glusterd.log"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup"))
            .stderr(log)
            .spawn()
            .expect("start glusterd");
        self.glusterd = Some(child);
        let sock = self.sock.clone();
        wait_until("glusterd to answer", Duration::from_secs(30), || {
            Command::new("gluster")
                .args(["--mode=script", &format!("--glusterd-sock={}", sock.display()), "volume", "list"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        });
    }

    fn create_volume(&self) {
        let brick = self.dir.path().join("brick");
        fs::create_dir_all(&brick).expect("mkdir brick");
        let spec = format!("{}:{}", self.storage_addr, brick.display());
        self.gluster(&["volume", "create", &self.volume, &spec, "force"]);
        self.gluster(&["volume", "set", &self.volume, "network.ping-timeout", "10"]);
        if self.cache == Cache::Strict {
            for x in STRICT_VOLUME_OFF {
                self.gluster(&["volume", "set", &self.volume, &format!("performance.{x}"), "off"]);
            }
        }
        self.gluster(&["volume", "start", &self.volume]);
    }

    fn mount(&self, i: usize) {
        let h = &self.hosts[i];
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", h.netns))
            .arg("glusterfs")
            .arg(format!("--volfile-server={}", self.storage_addr))
            .arg(format!("--volfile-id={}", self.volume));
        if self.cache == Cache::Strict {
            c.args(STRICT_MOUNT);
        }
        c.arg("-p").arg(&h.client_pidfile).arg("-l").arg(self.dir.path().join(format!("client-{}.log", h.name)));
        c.arg(&h.mount);
        run(&mut c, &format!("mounting the volume on {}", h.name));
        let m = h.mount.display().to_string();
        wait_until(&format!("the mount on {}", h.name), Duration::from_secs(20), || {
            fs::read_to_string("/proc/mounts")
                .unwrap_or_default()
                .lines()
                .any(|l| l.split(' ').nth(1) == Some(m.as_str()))
                && fs::read_dir(&h.mount).is_ok()
        });
    }

    pub fn host(&self, name: &str) -> &Host {
        self.hosts.iter().find(|h| h.name == name).unwrap_or_else(|| panic!("no host {name} in the bed"))
    }

    /// Give two hosts the same hostname (a misconfiguration the farm must survive).
    pub fn set_hostname(&mut self, host: &str, hostname: &str) {
        let h = self.hosts.iter_mut().find(|h| h.name == host).expect("host");
        h.hostname = hostname.to_string();
    }

    /// Make `host` a clone of `of` (a copied VM image: same host name, same machine id; its own
    /// boot id), a misconfiguration the agent must refuse.
    pub fn make_clone(&mut self, host: &str, of: &str) {
        let (hostname, machine_id) = {
            let o = self.host(of);
            (o.hostname.clone(), o.machine_id.clone())
        };
        let h = self.hosts.iter_mut().find(|h| h.name == host).expect("host");
        h.hostname = hostname;
        h.machine_id = machine_id;
    }

    /// The command line that runs `program args` on `host`: its network namespace, its hostname,
    /// its machine id and boot id.
    fn on(&self, host: &str, program: &Path, args: &[String]) -> (PathBuf, Vec<String>) {
        let h = self.host(host);
        let mut a = vec![
            format!("--net=/run/netns/{}", h.netns),
            "unshare".into(),
            "--uts".into(),
            "--mount".into(),
            "--propagation".into(),
            "slave".into(),
            "/bin/sh".into(),
            "-c".into(),
            "hostname \"$0\" && mount --bind \"$1\" /etc/machine-id && mount --bind \"$2\" /proc/sys/kernel/random/boot_id && shift 2 && exec \"$@\"".into(),
            h.hostname.clone(),
            h.machine_id.display().to_string(),
            h.boot_id.display().to_string(),
            program.display().to_string(),
        ];
        a.extend(args.iter().cloned());
        (PathBuf::from("nsenter"), a)
    }

    /// Run a command on a host to completion.
    pub fn run(&self, host: &str, program: &Path, args: &[String]) -> Run {
        let (p, a) = self.on(host, program, args);
        Run::new(&p, &a)
    }

    /// Start a long-running program on a host (its log in the bed's directory).
    pub fn spawn(&self, host: &str, program: &Path, args: &[String], env: &[(&str, &str)]) -> Proc {
        let (p, a) = self.on(host, program, args);
        Proc::spawn(&p, &a, self.dir.path(), env)
    }

    /// Cut (or restore) a host's link: its gRPC and its share both stop answering.
    pub fn link(&self, host: &str, up: bool) {
        let h = self.host(host);
        ip(&["-n", &h.netns, "link", "set", &h.veth, if up { "up" } else { "down" }]);
    }

    /// Silently drop (or stop dropping) TCP connections to `port` on a host: a firewall in front of
    /// its gRPC port, the share untouched.
    pub fn block_port(&self, host: &str, port: u16, blocked: bool) {
        let h = self.host(host);
        let nft = |args: &str| {
            run(
                Command::new("nsenter").arg(format!("--net=/run/netns/{}", h.netns)).args(["nft", args]),
                &format!("nft {args}"),
            )
        };
        if blocked {
            nft("add table inet hfbed");
            nft("add chain inet hfbed input { type filter hook input priority 0 ; policy accept ; }");
            nft(&format!("add rule inet hfbed input tcp dport {port} drop"));
        } else {
            nft("delete table inet hfbed");
        }
    }

    fn teardown(&mut self) {
        for h in &self.hosts {
            let _ = Command::new("umount").arg("-l").arg(&h.mount).stderr(Stdio::null()).status();
            if let Some(pid) = pid_from(&h.client_pidfile) {
                end_pid(pid);
            }
        }
        let _ = Command::new("timeout")
            .args(["20", "gluster", "--mode=script"])
            .arg(format!("--glusterd-sock={}", self.sock.display()))
            .args(["volume", "stop", &self.volume, "force"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        // Brick processes write their pid files under /var/run/gluster/vols/<volume>/.
        let run_dir = Path::new("/var/run/gluster/vols").join(&self.volume);
        if let Ok(rd) = fs::read_dir(&run_dir) {
            for e in rd.flatten() {
                if let Some(pid) = pid_from(&e.path()) {
                    end_pid(pid);
                }
            }
        }
        if let Some(mut g) = self.glusterd.take() {
            end_pid(g.id() as i32);
            let _ = g.wait();
        }
        let _ = fs::remove_dir_all(&run_dir);
        for ns in self.hosts.iter().map(|h| h.netns.clone()).chain([self.storage_ns.clone()]) {
            let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        }
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- bed {} ({}) ---", self.dir.path().display(), self.cache.name());
            let text = fs::read_to_string(self.dir.path().join("glusterd.log")).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(20).collect();
            eprintln!("glusterd.log (last lines):\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
        }
        self.teardown();
    }
}
