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

. "$repo/scripts/lib/nspawn.sh"
nspawn_require
mkdir -p "$cache"
# One converge test at a time (it names its machine hyperfarm-converge).
exec 9>"$cache/converge.lock"
flock -w 600 9 || die "another converge test holds $cache/converge.lock"

# --- the venv ------------------------------------------------------------------------------------
. "$repo/scripts/lib/ansible-venv.sh"
ansible_venv "$venv" "$here/requirements-converge.txt" || die "no Ansible venv"

# --- the cached Debian root (shared with the other deployment tests) ------------------------------
tarball=$(nspawn_root_tarball "$NSPAWN_FARM_INCLUDE") || die "no Debian root"

work=$(mktemp -d /var/tmp/hyperfarm-converge.XXXXXX)
root="$work/root"

in_machine() { nspawn_in "$machine" "$@"; }

on_exit() {
    local rc=$?
    if [[ $rc -ne 0 && -n ${NSPAWN_PID1[$machine]:-} ]]; then
        nspawn_dump "$machine" hyper2kvm-agent.service hyper2kvm-agent@share.service
    fi
    nspawn_poweroff_all
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
nspawn_restore "$tarball" "$root" "$machine"
# Fixtures that exist before Ansible runs, like on a real export host: an exporter account with a
# small disk to convert.
chroot "$root" useradd --create-home --shell /bin/bash exporter1
truncate -s 4M "$root/home/exporter1/disk.raw"
printf 'hyperfarm converge test' | dd of="$root/home/exporter1/disk.raw" bs=1 seek=1048576 conv=notrunc status=none
chroot "$root" chown exporter1:exporter1 /home/exporter1/disk.raw

# --- boot -----------------------------------------------------------------------------------------
log "booting it with systemd-nspawn"
nspawn_boot "$machine" "$root" --private-network || die "the container did not boot"
pid1=${NSPAWN_PID1[$machine]}
log "container up (PID 1 = $pid1)"

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
nspawn_poweroff "$machine"
log "converge test passed"
