#!/usr/bin/env bash
# The packages, proven as an operator uses them (run as root; .ci/run runs it):
#  1. scripts/package builds the .deb, the .rpm and the install.sh tarball (and a second .deb
#     with a higher version, for the upgrade).
#  2. The .rpm: file list, config files, requirements and scriptlets checked with rpm(8).
#  3. The .deb in a booted Debian container (systemd PID 1): installed with dpkg; the agent runs
#     from the package (active, READY, its STATUS line), `man hyper2kvm-agent` works, the
#     completions are in place, a VM is exported and converted by the packaged binaries; an
#     edited config survives the upgrade; removal leaves no agent process; purge keeps the user
#     unless asked (HYPERFARM_PURGE_USER=yes).
#  4. install.sh from the tarball in a second fresh container: installs and starts, a second run
#     changes nothing, --uninstall stops everything.
# Each step prints how long it took.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
cd "$repo"
. scripts/lib/nspawn.sh
[[ $(id -u) -eq 0 ]] || { echo "run as root (systemd-nspawn)" >&2; exit 1; }

work=$(mktemp -d /var/tmp/hyperfarm-packages.XXXXXX)
on_exit() {
    local rc=$?
    if [[ $rc -ne 0 ]]; then
        for m in "${!NSPAWN_PID1[@]}"; do nspawn_dump "$m" hyper2kvm-agent.service; done
    fi
    nspawn_poweroff_all
    rm -rf "$work"
    exit "$rc"
}
trap on_exit EXIT

step "installing what the test needs (systemd-nspawn, debootstrap, rpm)"
nspawn_require
need=()
command -v rpm >/dev/null || need+=(rpm)
command -v cpio >/dev/null || need+=(cpio)
if [[ ${#need[@]} -gt 0 ]]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

step "scripts/package"
out=$(scripts/package)
deb=$(grep '\.deb$' <<<"$out")
rpm=$(grep '\.rpm$' <<<"$out")
tarball=$(grep '\.tar\.gz$' <<<"$out")
version=$(dpkg-deb -f "$deb" Version)
deb2=$(scripts/package --deb-version "${version%-*}-2" | grep '\.deb$')
echo "$deb ($(du -h "$deb" | cut -f1)), $rpm ($(du -h "$rpm" | cut -f1)), $tarball, upgrade: $deb2"

step "the .rpm: files, config files, requirements, scriptlets"
files=$(rpm -qlp "$rpm" 2>/dev/null)
for f in /usr/bin/hyper2kvm-agent /usr/bin/hyperexport /usr/bin/hyperctl \
    /usr/lib/systemd/system/hyper2kvm-agent.service /usr/lib/systemd/system/hyper2kvm-agent@.service \
    /usr/lib/systemd/system/hyper2kvm-agent.target /usr/lib/systemd/system/hyperexport-serve.service \
    /usr/lib/sysusers.d/hyperfarm.conf /usr/lib/tmpfiles.d/hyperfarm.conf /etc/hyper2kvm/agent.toml /etc/hyper2kvm/hyperexport.toml \
    /usr/share/man/man1/hyper2kvm-agent.1.gz /usr/share/man/man1/hyperctl-jobs.1.gz \
    /usr/share/bash-completion/completions/hyperctl /usr/share/zsh/site-functions/_hyperexport \
    /usr/share/fish/vendor_completions.d/hyper2kvm-agent.fish; do
    grep -qxF "$f" <<<"$files" || fail "the .rpm lacks $f"
done
conf=$(rpm -qp --configfiles "$rpm" 2>/dev/null)
grep -qxF /etc/hyper2kvm/agent.toml <<<"$conf" || fail "agent.toml is not a config file in the .rpm: $conf"
reqs=$(rpm -qpR "$rpm" 2>/dev/null)
grep -q '^qemu-img' <<<"$reqs" || fail "the .rpm does not require qemu-img: $reqs"
scripts=$(rpm -qp --scripts "$rpm" 2>/dev/null)
grep -q 'systemd-sysusers hyperfarm.conf' <<<"$scripts" || fail "no user creation in the .rpm's scriptlets"
grep -q 'preuninstall scriptlet' <<<"$scripts" && grep -q 'systemctl stop hyper2kvm-agent.target' <<<"$scripts" ||
    fail "the .rpm's removal does not stop the agents: $scripts"
# Debian's rpm2cpio (rpm 4.18) writes a zstd payload whole but exits 1: judge by what cpio gets.
rpm2cpio "$rpm" >"$work/payload.cpio" || true
(cd "$work" && cpio -idm --quiet ./usr/lib/systemd/system/hyper2kvm-agent.service <payload.cpio) ||
    fail "cannot unpack the .rpm's unit"
unit=$(cat "$work/usr/lib/systemd/system/hyper2kvm-agent.service")
grep -q '^ExecStart=/usr/bin/hyper2kvm-agent ' <<<"$unit" || fail "the packaged unit does not start /usr/bin/hyper2kvm-agent"
echo "rpm: $(wc -l <<<"$files") files, config files and scriptlets as expected"

tar=$(nspawn_root_tarball "$NSPAWN_FARM_INCLUDE")

step "the .deb in a booted container"
root="$work/deb"
nspawn_restore "$tar" "$root" hf-pkg
mkdir -p "$root/opt/pkgs"
cp "$deb" "$root/opt/pkgs/hyperfarm.deb"
cp "$deb2" "$root/opt/pkgs/hyperfarm-upgrade.deb"
nspawn_boot hf-pkg "$root" --private-network
pk() { nspawn_in hf-pkg "$@"; }
pk dpkg -i /opt/pkgs/hyperfarm.deb >"$work/dpkg-install.log" 2>&1 || { cat "$work/dpkg-install.log" >&2; fail "dpkg -i"; }
for _ in $(seq 1 100); do
    [[ $(pk systemctl is-active hyper2kvm-agent.service || true) == active ]] && break
    sleep 0.1
done
status=$(pk systemctl status --no-pager hyper2kvm-agent.service || true)
echo "$status" | head -n 12
grep -q 'Active: active (running)' <<<"$status" || fail "the agent from the package is not running"
grep -q 'Status: "' <<<"$status" || fail "no STATUS line from the agent (Type=notify)"
[[ $(pk systemctl show -p Type --value hyper2kvm-agent.service) == notify ]] || fail "not Type=notify"
[[ $(pk systemctl is-enabled hyper2kvm-agent.service hyper2kvm-agent.target | sort -u) == enabled ]] ||
    fail "the agent or its target is not enabled"
# (Output captured before grep -q: an early exit of grep must not fail the writer under pipefail.)
page=$(pk man -P cat hyper2kvm-agent 2>/dev/null || true)
grep -q -- 'watch-dir' <<<"$page" || fail "man hyper2kvm-agent: $page"
page=$(pk man -P cat hyperctl-jobs 2>/dev/null || true)
grep -qi 'jobs' <<<"$page" || fail "man hyperctl-jobs: $page"
pk test -f /usr/share/bash-completion/completions/hyperctl || fail "no bash completion"
[[ $(pk stat -c '%a %U %G' /var/lib/hyper2kvm/queue) == "2775 hyperfarm hyperfarm" ]] || fail "queue directory mode"
pk useradd --create-home --groups hyperfarm exporter1
pk truncate -s 8M /home/exporter1/disk.raw
pk sh -c 'printf "hyperfarm package test" | dd of=/home/exporter1/disk.raw bs=1 seek=2097152 conv=notrunc status=none'
pk chown exporter1:exporter1 /home/exporter1/disk.raw
res=$(pk runuser -u exporter1 -- timeout 120 hyperexport -q --json --vm /home/exporter1/disk.raw \
    --name pkgvm --pipeline --hyper2kvm-daemon --hyper2kvm-daemon-timeout 90s) || fail "hyperexport: $res"
[[ $res == *'"state":"done"'* ]] || fail "hyperexport: $res"
pk qemu-img compare -q /home/exporter1/disk.raw /var/lib/hyper2kvm/output/pkgvm.qcow2 || fail "converted disk differs"
# The listing is served from memory; finished jobs are re-listed every 10 s (docs/grpc.md).
for _ in $(seq 1 30); do
    list=$(pk runuser -u exporter1 -- hyperctl jobs list 2>&1 || true)
    grep -q 'pkgvm' <<<"$list" && break
    sleep 0.5
done
grep -q 'done.*pkgvm\|pkgvm.*done' <<<"$list" || fail "hyperctl jobs list does not show pkgvm done: $list"
echo "converted pkgvm with the packaged binaries; hyperctl lists it"

step "hyperexport serve under its hardened unit: a job submitted over HTTP is converted"
[[ $(pk systemctl is-enabled hyperexport-serve.service || true) == disabled ]] || fail "hyperexport-serve is enabled by the package (it is opt-in)"
pk systemctl start hyperexport-serve.service
[[ $(pk systemctl is-active hyperexport-serve.service || true) == active ]] || fail "hyperexport-serve did not start: $(pk systemctl status --no-pager hyperexport-serve.service || true)"
pk mkdir -p /srv/vms
pk truncate -s 8M /srv/vms/served.raw
pk sh -c 'printf "served by the API" | dd of=/srv/vms/served.raw bs=1 seek=1048576 conv=notrunc status=none'
pk chmod 0644 /srv/vms/served.raw
served=$(pk python3 - /srv/vms/served.raw served "" 2 <scripts/lib/serve-job.py) || fail "the API client: $served"
[[ $served == *'"state": "done"'* || $served == *'"state":"done"'* ]] || fail "the served job did not end done: $served"
pk qemu-img compare -q /srv/vms/served.raw /var/lib/hyper2kvm/output/served.qcow2 || fail "the served conversion differs"
[[ $(pk stat -c '%U' /var/lib/hyperexport/jobs.sqlite) == hyperfarm ]] || fail "job history not in /var/lib/hyperexport"
pk systemctl stop hyperexport-serve.service
echo "hyperexport serve (hardened unit) converted served.raw; history in /var/lib/hyperexport/jobs.sqlite"

step "upgrade keeps an edited config and restarts the agent"
pk sed -i 's/^#max_concurrent = 2$/max_concurrent = 3/' /etc/hyper2kvm/agent.toml
before=$(pk systemctl show -p MainPID --value hyper2kvm-agent.service)
pk dpkg -i /opt/pkgs/hyperfarm-upgrade.deb >"$work/dpkg-upgrade.log" 2>&1 || { cat "$work/dpkg-upgrade.log" >&2; fail "upgrade"; }
pk grep -qx 'max_concurrent = 3' /etc/hyper2kvm/agent.toml || fail "the upgrade replaced the edited agent.toml"
[[ $(pk dpkg-query -W -f '${Version}' hyperfarm) == "${version%-*}-2" ]] || fail "not upgraded"
for _ in $(seq 1 100); do
    after=$(pk systemctl show -p MainPID --value hyper2kvm-agent.service)
    [[ $after != 0 && $after != "$before" && $(pk systemctl is-active hyper2kvm-agent.service) == active ]] && break
    sleep 0.1
done
[[ $after != 0 && $after != "$before" ]] || fail "the agent was not restarted by the upgrade ($before -> $after)"
journal=$(pk journalctl --no-pager -u hyper2kvm-agent.service)
grep -q 'max_concurrent=3' <<<"$journal" || fail "the restarted agent did not read the kept config"

step "removal stops every agent; purge keeps the user unless asked"
pk sh -c 'echo "listen = \"127.0.0.1:50072\"" >/etc/hyper2kvm/agent-extra.toml'
pk systemctl start hyper2kvm-agent@extra.service
[[ $(pk systemctl is-active hyper2kvm-agent@extra.service) == active ]] || fail "hyper2kvm-agent@extra did not start"
pk dpkg -r hyperfarm >"$work/dpkg-remove.log" 2>&1 || { cat "$work/dpkg-remove.log" >&2; fail "dpkg -r"; }
if pk pgrep -x hyper2kvm-agent >/dev/null; then fail "an agent still runs after removal: $(pk pgrep -a hyper2kvm-agent)"; fi
pk test ! -e /usr/lib/systemd/system/hyper2kvm-agent.service || fail "unit left after removal"
pk dpkg --purge hyperfarm >/dev/null
pk getent passwd hyperfarm >/dev/null || fail "purge removed the user without being asked"
pk test ! -e /etc/hyper2kvm/agent.toml || fail "purge left /etc/hyper2kvm/agent.toml"
pk dpkg -i /opt/pkgs/hyperfarm.deb >/dev/null 2>&1
pk systemctl stop hyper2kvm-agent.service
pk gpasswd -d exporter1 hyperfarm >/dev/null
pk env HYPERFARM_PURGE_USER=yes dpkg --purge hyperfarm >/dev/null
if pk getent passwd hyperfarm >/dev/null; then fail "HYPERFARM_PURGE_USER=yes did not remove the user"; fi
nspawn_poweroff hf-pkg

step "install.sh from the tarball in a fresh container"
root="$work/inst"
nspawn_restore "$tar" "$root" hf-inst
mkdir -p "$root/opt/src"
tar -C "$root/opt/src" -xzf "$tarball"
nspawn_boot hf-inst "$root" --private-network
src=$(cd "$root/opt/src" && ls -d hyperfarm-*)
first=$(nspawn_in hf-inst "/opt/src/$src/packaging/install.sh" 2>&1) || fail "install.sh: $first"
tail -n 3 <<<"$first"
[[ $(nspawn_in hf-inst systemctl is-active hyper2kvm-agent.service) == active ]] || fail "install.sh did not start the agent"
page=$(nspawn_in hf-inst man -P cat hyperexport 2>/dev/null || true)
grep -q -- 'vm' <<<"$page" || fail "man hyperexport after install.sh: $page"
second=$(nspawn_in hf-inst "/opt/src/$src/packaging/install.sh" 2>&1) || fail "install.sh (again): $second"
[[ $second == *"nothing changed"* ]] || fail "the second install.sh changed something: $second"
nspawn_in hf-inst "/opt/src/$src/packaging/install.sh" --uninstall >/dev/null
if nspawn_in hf-inst pgrep -x hyper2kvm-agent >/dev/null; then fail "an agent runs after install.sh --uninstall"; fi
nspawn_poweroff hf-inst

step "packages proven"
