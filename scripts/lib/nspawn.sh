# Booted Debian containers (systemd as PID 1) for the deployment tests: packaging/test-packages.sh
# and ansible/farm-test.sh. Several machines at once, each in its own network namespace (or
# --private-network) and with its own host name. Needs root, systemd-nspawn and debootstrap.
#
#   . scripts/lib/nspawn.sh
#   nspawn_require                              # installs systemd-container/debootstrap if missing
#   tar=$(nspawn_root_tarball "pkg1,pkg2")       # cached Debian root (debootstrap once)
#   nspawn_restore "$tar" ROOT NAME
#   nspawn_boot NAME ROOT [systemd-nspawn args]  # waits for systemd "running"/"degraded"
#   nspawn_in NAME command...                    # runs inside (nsenter into all namespaces)
#   nspawn_poweroff NAME ; nspawn_poweroff_all
#
# Facts this relies on (../shared/notes/testing-systemd-ansible.md, measured): --register=no and
# --keep-unit are required here; nspawn then makes payload/ and supervisor/ cgroups inside the
# caller's cgroup, so each machine's launcher first moves into a cgroup of its own
# (hyperfarm-nspawn-NAME) in every hierarchy, which lets several run at once and is removed after.

NSPAWN_CACHE=${HYPERFARM_CACHE:-/var/cache/hyperfarm}
NSPAWN_SUITE=bookworm
# One root for every deployment test (cached once): systemd, Ansible's python, the agent's
# qemu-img, man, GlusterFS server and client, ip and pgrep.
NSPAWN_FARM_INCLUDE=systemd,systemd-sysv,dbus,python3,python3-apt,qemu-utils,man-db,glusterfs-server,glusterfs-client,iproute2,procps
declare -gA NSPAWN_LAUNCHER=() NSPAWN_PID1=()

# The deployment tests' steps: `step "what"` prints the total and the previous step's time.
NSPAWN_T0=$(date +%s)
NSPAWN_LAP=$NSPAWN_T0
step() {
    local now
    now=$(date +%s)
    printf '== [%4ds total, previous step %3ds] %s\n' $((now - NSPAWN_T0)) $((now - NSPAWN_LAP)) "$*"
    NSPAWN_LAP=$now
}
fail() {
    echo "FAIL: $*" >&2
    exit 1
}

nspawn_log() { printf '== [%s] %s\n' "$(date +%T)" "$*" >&2; }

nspawn_require() {
    local missing=()
    command -v systemd-nspawn >/dev/null || missing+=(systemd-container)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    if [[ ${#missing[@]} -gt 0 ]]; then
        nspawn_log "installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
    mkdir -p "$NSPAWN_CACHE"
}

# The tarball of a minbase Debian root with these packages (comma-separated), made once from
# this machine's own apt archive and kept in $NSPAWN_CACHE. Prints its path.
nspawn_root_tarball() {
    local include=$1 here mirror key tarball build
    here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
    . "$here/apt-mirror.sh"
    mirror=${HYPERFARM_DEBIAN_MIRROR:-$(apt_mirror)} || return 1
    key=$(printf '%s %s %s' "$NSPAWN_SUITE" "$include" "$mirror" | sha256sum | cut -c1-12)
    tarball="$NSPAWN_CACHE/debian-$NSPAWN_SUITE-$key.tar"
    if [[ ! -f $tarball ]]; then
        nspawn_log "debootstrap $NSPAWN_SUITE with $include (once; cached as $tarball)"
        build=$(mktemp -d "$NSPAWN_CACHE/build.XXXXXX")
        if ! debootstrap --variant=minbase --include="$include" "$NSPAWN_SUITE" "$build/root" "$mirror" \
            >"$build/debootstrap.log" 2>&1; then
            tail -n 30 "$build/debootstrap.log" >&2
            rm -rf "$build"
            echo "debootstrap failed" >&2
            return 1
        fi
        # The apt lists and archives are not needed inside: smaller and faster to restore.
        rm -rf "$build/root/var/cache/apt/archives/"*.deb "$build/root/var/lib/apt/lists/"*_Packages
        tar -C "$build/root" -cf "$build/root.tar" --exclude='./proc/*' --exclude='./sys/*' --exclude='./dev/*' .
        mv "$build/root.tar" "$tarball"
        rm -rf "$build"
    fi
    printf '%s\n' "$tarball"
}

# Unpack the root for a machine: its host name, and a machine id of its own (machines restored
# from one tarball are different hosts, not clones; an empty /etc/machine-id is not enough under
# nspawn --register=no, which hands every container the same one).
nspawn_restore() { # TARBALL ROOT NAME
    mkdir -p "$2"
    tar -C "$2" -xf "$1"
    echo "$3" >"$2/etc/hostname"
    od -An -tx1 -N16 /dev/urandom | tr -d ' \n' >"$2/etc/machine-id"
    echo >>"$2/etc/machine-id"
}

_nspawn_cgroups() { # NAME: the per-machine cgroup directories, one per mounted hierarchy
    local name=$1 h
    for h in /sys/fs/cgroup/systemd /sys/fs/cgroup/unified /sys/fs/cgroup; do
        if [[ -f $h/cgroup.procs ]]; then
            printf '%s\n' "$h/hyperfarm-nspawn-$name"
        fi
    done
}

_nspawn_cleanup_cgroups() { # NAME
    local d
    while read -r d; do
        [[ -d $d ]] && find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null
    done < <(_nspawn_cgroups "$1")
    rm -rf "/run/systemd/nspawn/propagate/$1" 2>/dev/null || true
}

# Boot ROOT as machine NAME (its host name too). Extra arguments go to systemd-nspawn, e.g.
# --network-namespace-path=/run/netns/X or --private-network, --bind=...
nspawn_boot() {
    local name=$1 root=$2 log pid1="" state="" launcher
    shift 2
    log="$root.nspawn.log"
    _nspawn_cleanup_cgroups "$name"
    (
        local d
        while read -r d; do
            mkdir -p "$d"
            echo "$BASHPID" >"$d/cgroup.procs"
        done < <(_nspawn_cgroups "$name")
        # systemd-nspawn 252's own seccomp filter refuses the Landlock calls (a host does not):
        # allow them, or the agent (require_confinement) refuses to start in the container.
        exec setsid systemd-nspawn --quiet --register=no --keep-unit --console=passive \
            --system-call-filter='landlock_create_ruleset landlock_add_rule landlock_restrict_self' \
            -M "$name" -D "$root" "$@" -b
    ) >"$log" 2>&1 </dev/null &
    launcher=$!
    NSPAWN_LAUNCHER[$name]=$launcher
    for _ in $(seq 1 200); do
        pid1=$(pgrep -P "$launcher" -x systemd || true)
        [[ -n $pid1 ]] && break
        if ! kill -0 "$launcher" 2>/dev/null; then
            cat "$log" >&2
            echo "systemd-nspawn for $name exited" >&2
            return 1
        fi
        sleep 0.1
    done
    [[ -n $pid1 ]] || { echo "no systemd in $name after 20 s" >&2; return 1; }
    NSPAWN_PID1[$name]=$pid1
    for _ in $(seq 1 300); do
        state=$(nsenter -t "$pid1" -a systemctl is-system-running 2>/dev/null || true)
        [[ $state == running || $state == degraded ]] && break
        sleep 0.1
    done
    [[ $state == running || $state == degraded ]] || { echo "$name: systemd is '$state' after 30 s" >&2; return 1; }
    nspawn_log "$name up (systemd $state, PID 1 = $pid1)"
}

nspawn_in() { # NAME command...
    local name=$1
    shift
    nsenter -t "${NSPAWN_PID1[$name]}" -a "$@"
}

nspawn_poweroff() { # NAME
    local name=$1 launcher=${NSPAWN_LAUNCHER[$1]:-}
    [[ -n $launcher ]] || return 0
    if kill -0 "$launcher" 2>/dev/null; then
        nspawn_in "$name" systemctl poweroff >/dev/null 2>&1 || true
        for _ in $(seq 1 150); do
            kill -0 "$launcher" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$launcher" 2>/dev/null; then
            kill -TERM "$launcher" 2>/dev/null || true
            sleep 1
            kill -KILL "$launcher" 2>/dev/null || true
        fi
    fi
    wait "$launcher" 2>/dev/null || true
    unset "NSPAWN_LAUNCHER[$name]" "NSPAWN_PID1[$name]"
    _nspawn_cleanup_cgroups "$name"
}

nspawn_poweroff_all() {
    local name
    for name in "${!NSPAWN_LAUNCHER[@]}"; do
        nspawn_poweroff "$name"
    done
}

# Print the journal and failed units of a machine (for a failing test's output).
nspawn_dump() { # NAME [units...]
    local name=$1
    shift
    echo "---- $name: failed units ----" >&2
    nspawn_in "$name" systemctl --no-pager --failed >&2 || true
    echo "---- $name: journal ----" >&2
    nspawn_in "$name" journalctl --no-pager -n 80 "${@/#/-u}" >&2 || true
}
