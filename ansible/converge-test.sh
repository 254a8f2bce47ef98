#!/usr/bin/env bash
# Converge test of the roles on a real systemd, without touching this host's /etc, users or
# services: a Debian 12 root booted with systemd-nspawn (PID 1 = systemd), the playbook
# tests/converge.yml applied through the community.docker.nsenter connection, then the real
# agent converts a disk submitted by the real hyperexport running as an exporter account.
#
#   sudo bash ansible/converge-test.sh
#
# Needs root, systemd-nspawn and debootstrap (installed with apt-get when missing), the venv of
# ansible/check.sh plus requirements-converge.txt, and built binaries (target/release or
# target/debug; or HYPERFARM_AGENT_BIN and HYPERFARM_EXPORT_BIN).
#
# Steps: --check on the fresh root (must not fail), apply, apply again (must change nothing),
# then check the units, the directories' modes, a conversion through each agent instance, and a
# clean stop of hyper2kvm-agent.target.
#
# HYPERFARM_CONVERGE_LOGS=DIR keeps the playbook logs (with per-task timings) there.
#
# The Debian root is made once with debootstrap (minutes, from the Debian mirror) and cached as
# a tar in ${HYPERFARM_CACHE:-/var/cache/hyperfarm}; later runs restore it in seconds.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
cache=${HYPERFARM_CACHE:-/var/cache/hyperfarm}
venv=${HYPERFARM_ANSIBLE_VENV:-/opt/hyperfarm-ansible-venv}
# The Debian archive: this machine's own apt configuration (or HYPERFARM_DEBIAN_MIRROR).
. "$repo/scripts/lib/apt-mirror.sh"
mirror=${HYPERFARM_DEBIAN_MIRROR:-$(apt_mirror)}
suite=bookworm
include=systemd,systemd-sysv,dbus,python3,python3-apt,qemu-utils
machine=hyperfarm-converge
start=$(date +%s.%N)

log() { printf '== [%5.1fs] %s\n' "$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { print b - a }')" "$*"; }
die() {
    echo "FAIL: $*" >&2
    exit 1
}

[[ $(id -u) -eq 0 ]] || die "run as root (systemd-nspawn, debootstrap)"

pick_bin() {
    local name=$1 var=$2
    if [[ -n ${!var:-} ]]; then
        echo "${!var}"
        return
    fi
    local found="" d
    for d in release debug; do # the newest build
        if [[ -x $repo/target/$d/$name && (-z $found || $repo/target/$d/$name -nt $found) ]]; then
            found=$repo/target/$d/$name
        fi
    done
    [[ -n $found ]] || die "no built $name under target/ (cargo build), or set $var"
    echo "$found"
}
agent_bin=$(pick_bin hyper2kvm-agent HYPERFARM_AGENT_BIN)
export_bin=$(pick_bin hyperexport HYPERFARM_EXPORT_BIN)

missing=()
command -v systemd-nspawn >/dev/null || missing+=(systemd-container)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [[ ${#missing[@]} -gt 0 ]]; then
    log "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

mkdir -p "$cache"
# One converge test at a time: nspawn's cgroups (payload/, supervisor/) are per calling cgroup.
exec 9>"$cache/converge.lock"
flock -w 600 9 || die "another converge test holds $cache/converge.lock"

# --- the venv ------------------------------------------------------------------------------------
. "$repo/scripts/lib/ansible-venv.sh"
ansible_venv "$venv" "$here/requirements-converge.txt" || die "no Ansible venv"

# --- the cached Debian root -----------------------------------------------------------------------
key=$(printf '%s %s %s' "$suite" "$include" "$mirror" | sha256sum | cut -c1-12)
tarball="$cache/debian-$suite-converge-$key.tar"
if [[ ! -f $tarball ]]; then
    log "debootstrap $suite into the cache (once; a few minutes)"
    build=$(mktemp -d "$cache/build.XXXXXX")
    if ! debootstrap --variant=minbase --include="$include" "$suite" "$build/root" "$mirror" \
        >"$build/debootstrap.log" 2>&1; then
        tail -n 30 "$build/debootstrap.log" >&2
        rm -rf "$build"
        die "debootstrap failed"
    fi
    tar -C "$build/root" -cf "$build/root.tar" --exclude='./proc/*' --exclude='./sys/*' \
        --exclude='./dev/*' .
    mv "$build/root.tar" "$tarball"
    rm -rf "$build"
fi

work=$(mktemp -d /var/tmp/hyperfarm-converge.XXXXXX)
root="$work/root"
nspawn_pid=""
pid1=""

cleanup_cgroups() {
    # nspawn --keep-unit leaves payload/ and supervisor/ in our cgroup; the next boot needs them gone.
    local d
    for d in /sys/fs/cgroup/*/payload /sys/fs/cgroup/*/supervisor /sys/fs/cgroup/payload /sys/fs/cgroup/supervisor; do
        if [[ -d $d ]]; then
            find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null || true
        fi
    done
    rm -rf "/run/systemd/nspawn/propagate/$machine" 2>/dev/null || true
}

in_machine() { nsenter -t "$pid1" -a "$@"; }

poweroff_machine() {
    [[ -n $nspawn_pid ]] || return 0
    if kill -0 "$nspawn_pid" 2>/dev/null; then
        if [[ -n $pid1 ]]; then
            in_machine systemctl poweroff >/dev/null 2>&1 || true
        fi
        for _ in $(seq 1 100); do
            kill -0 "$nspawn_pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$nspawn_pid" 2>/dev/null; then
            kill -TERM "$nspawn_pid" 2>/dev/null || true
            sleep 1
            kill -KILL "$nspawn_pid" 2>/dev/null || true
        fi
    fi
    wait "$nspawn_pid" 2>/dev/null || true
    nspawn_pid=""
}

on_exit() {
    local rc=$?
    if [[ $rc -ne 0 && -n $pid1 ]] && kill -0 "$pid1" 2>/dev/null; then
        echo "---- journal of the agent units (container) ----" >&2
        in_machine journalctl --no-pager -n 120 >&2 || true
        echo "---- failed units ----" >&2
        in_machine systemctl --no-pager --failed >&2 || true
    fi
    poweroff_machine
    cleanup_cgroups
    if [[ -n ${HYPERFARM_CONVERGE_LOGS:-} ]]; then
        mkdir -p "$HYPERFARM_CONVERGE_LOGS"
        cp "$work"/*.log "$HYPERFARM_CONVERGE_LOGS"/ 2>/dev/null || true
    fi
    rm -rf "$work"
    exit "$rc"
}
trap on_exit EXIT

# Snapshot the binaries: a rebuild during the test must not look like a non-idempotent role.
mkdir -p "$work/bin"
cp "$agent_bin" "$work/bin/hyper2kvm-agent"
cp "$export_bin" "$work/bin/hyperexport"
log "agent: $agent_bin; exporter: $export_bin"
agent_bin="$work/bin/hyper2kvm-agent"
export_bin="$work/bin/hyperexport"

# --- restore and prepare the root ---------------------------------------------------------------
log "restoring the Debian root"
mkdir -p "$root"
tar -C "$root" -xf "$tarball"
echo "$machine" >"$root/etc/hostname"
# Fixtures that exist before Ansible runs, like on a real export host: an exporter account with a
# small disk to convert.
chroot "$root" useradd --create-home --shell /bin/bash exporter1
truncate -s 4M "$root/home/exporter1/disk.raw"
printf 'hyperfarm converge test' | dd of="$root/home/exporter1/disk.raw" bs=1 seek=1048576 conv=notrunc status=none
chroot "$root" chown exporter1:exporter1 /home/exporter1/disk.raw

# --- boot -----------------------------------------------------------------------------------------
cleanup_cgroups
log "booting it with systemd-nspawn"
setsid systemd-nspawn --quiet --register=no --keep-unit --console=passive --private-network \
    -M "$machine" -D "$root" -b >"$work/nspawn.log" 2>&1 </dev/null &
nspawn_pid=$!
for _ in $(seq 1 200); do
    pid1=$(pgrep -P "$nspawn_pid" -x systemd || true)
    [[ -n $pid1 ]] && break
    kill -0 "$nspawn_pid" 2>/dev/null || { cat "$work/nspawn.log" >&2; die "systemd-nspawn exited"; }
    sleep 0.1
done
[[ -n $pid1 ]] || die "no systemd in the container after 20s"
state=""
for _ in $(seq 1 300); do
    state=$(in_machine systemctl is-system-running 2>/dev/null || true)
    [[ $state == running || $state == degraded ]] && break
    sleep 0.1
done
[[ $state == running || $state == degraded ]] || die "container systemd is '$state' after 30s"
log "container up (systemd $state, PID $pid1)"

# --- Ansible --------------------------------------------------------------------------------------
export HOME="$work/home" ANSIBLE_CONFIG="$here/ansible.cfg" ANSIBLE_NOCOLOR=1
export ANSIBLE_LOCAL_TEMP="$work/ansible-tmp"
export ANSIBLE_CALLBACKS_ENABLED=ansible.posix.profile_tasks
mkdir -p "$HOME"
playbook() {
    "$venv/bin/ansible-playbook" -i "$machine," -c community.docker.nsenter \
        -e "ansible_nsenter_pid=$pid1" -e ansible_python_interpreter=/usr/bin/python3 \
        -e "hyperfarm_agent_binary_src=$agent_bin" -e "hyperfarm_exporter_binary_src=$export_bin" \
        "$here/tests/converge.yml" "$@"
}
recap() { grep -E "^$machine +: " "$1" | tail -n1; }

log "ansible-playbook --check on the fresh root"
playbook --check >"$work/check.log" 2>&1 || { cat "$work/check.log" >&2; die "--check failed"; }
log "  $(recap "$work/check.log")"

log "ansible-playbook (apply)"
playbook >"$work/apply.log" 2>&1 || { cat "$work/apply.log" >&2; die "apply failed"; }
log "  $(recap "$work/apply.log")"

log "ansible-playbook (apply again: must change nothing)"
playbook >"$work/again.log" 2>&1 || { cat "$work/again.log" >&2; die "second apply failed"; }
log "  $(recap "$work/again.log")"
if ! recap "$work/again.log" | grep -q ' changed=0 '; then
    grep -B3 -E '^changed:' "$work/again.log" >&2 || cat "$work/again.log" >&2
    die "the second run changed something: the roles are not idempotent"
fi

# --- the result -----------------------------------------------------------------------------------
log "checking the units and directories"
for unit in hyper2kvm-agent.service hyper2kvm-agent@share.service hyper2kvm-agent.target; do
    s=$(in_machine systemctl is-active "$unit" || true)
    e=$(in_machine systemctl is-enabled "$unit" || true)
    [[ $s == active && $e == enabled ]] || die "$unit is $s/$e, expected active/enabled"
done
for d in /var/lib/hyper2kvm/queue /var/lib/hyper2kvm/output /srv/hyperfarm/queue /srv/hyperfarm/output; do
    got=$(in_machine stat -c '%a %U %G' "$d")
    [[ $got == "2775 hyperfarm hyperfarm" ]] || die "$d is '$got', expected '2775 hyperfarm hyperfarm'"
done
in_machine id -nG exporter1 | grep -qw hyperfarm || die "exporter1 is not in group hyperfarm"
# The drop-in of the share instance reached systemd.
rw=$(in_machine systemctl show -p ReadWritePaths --value hyper2kvm-agent@share.service)
[[ $rw == *"/srv/hyperfarm/queue"* ]] || die "hyper2kvm-agent@share.service ReadWritePaths='$rw'"

convert() { # $1 VM name, then hyperexport flags
    local vm=$1
    shift
    local out
    out=$(in_machine runuser -u exporter1 -- timeout 120 /usr/local/bin/hyperexport -q --json \
        --vm /home/exporter1/disk.raw --name "$vm" --pipeline --hyper2kvm-daemon \
        --hyper2kvm-daemon-timeout 90s "$@") || die "hyperexport $vm failed: $out"
    [[ $out == *'"state":"done"'* ]] || die "hyperexport $vm: $out"
    echo "$out"
}
log "converting through the default instance (dirs from /etc/hyper2kvm/hyperexport.toml)"
convert converge-default
in_machine runuser -u exporter1 -- qemu-img compare -q /home/exporter1/disk.raw \
    /var/lib/hyper2kvm/output/converge-default.qcow2 || die "converted disk differs from its source"

log "converting through the share instance"
convert converge-share --hyper2kvm-watch-dir /srv/hyperfarm/queue \
    --hyper2kvm-output-dir /srv/hyperfarm/output
in_machine runuser -u exporter1 -- qemu-img compare -q /home/exporter1/disk.raw \
    /srv/hyperfarm/output/converge-share.qcow2 || die "converted disk differs from its source"

log "stopping hyper2kvm-agent.target (graceful stop of both agents)"
in_machine systemctl stop hyper2kvm-agent.target
for unit in hyper2kvm-agent.service hyper2kvm-agent@share.service; do
    for _ in $(seq 1 100); do
        s=$(in_machine systemctl is-active "$unit" || true)
        [[ $s == inactive || $s == failed ]] && break
        sleep 0.1
    done
    r=$(in_machine systemctl show -p Result --value "$unit")
    [[ $s == inactive && $r == success ]] || die "$unit after stop: $s, result $r"
done

log "powering off"
poweroff_machine
log "converge test passed"
