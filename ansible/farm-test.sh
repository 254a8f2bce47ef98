#!/usr/bin/env bash
# The two-server farm, provisioned and run as operators do (run as root; .ci/run runs it):
# three booted Debian containers (systemd PID 1) — storage, export host, conversion host — each
# in its own network namespace (joined by a bridge) with its own host name and machine id;
# ansible-playbook site.yml from inventory.example.ini, changed only in the host names (and
# Ansible's connection into the containers); everything installed from the .deb built now.
# Then: a VM exported on the export host comes back as a qcow2 converted by the agent on the
# conversion host, its progress seen by hyperctl on the export host over TLS; serve on the export
# host exports the seed's vSphere request from a vCenter in a fourth namespace (hf-vcenter, the
# simulator of tests/vcsim: Debian's golang-go and golang-github-vmware-govmomi-dev, qemu-img on
# this host for its disk) and the agent converts it; the agent restarted
# mid-job and the job finishing once; SIGSTOP of the agent and the watchdog restarting it;
# `systemctl stop hyper2kvm-agent.target` stopping every instance cleanly. Each step prints its time.
#
#   sudo ansible/farm-test.sh        # HYPERFARM_FARM_LOGS=DIR keeps the playbook logs
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
cd "$repo"
. scripts/lib/nspawn.sh
[[ $(id -u) -eq 0 ]] || { echo "run as root (systemd-nspawn, network namespaces)" >&2; exit 1; }
venv=${HYPERFARM_ANSIBLE_VENV:-/opt/hyperfarm-ansible-venv}

hosts=(hf-storage hf-export hf-convert)
declare -A addr=([hf-storage]=10.232.7.1 [hf-export]=10.232.7.2 [hf-convert]=10.232.7.3)
work=$(mktemp -d /var/tmp/hyperfarm-farm.XXXXXX)
vcsim_pid=""
cleanup_net() {
    local h
    for h in "${hosts[@]}" hf-vcenter hf-switch; do ip netns del "$h" 2>/dev/null || true; done
}
on_exit() {
    local rc=$?
    if [[ $rc -ne 0 ]]; then
        for m in "${!NSPAWN_PID1[@]}"; do nspawn_dump "$m" hyper2kvm-agent.service glusterd.service srv-hyperfarm.mount; done
    fi
    nspawn_poweroff_all
    [[ -z $vcsim_pid ]] || kill "$vcsim_pid" 2>/dev/null || true
    cleanup_net
    if [[ -n ${HYPERFARM_FARM_LOGS:-} ]]; then
        mkdir -p "$HYPERFARM_FARM_LOGS"
        cp "$work"/*.log "$HYPERFARM_FARM_LOGS"/ 2>/dev/null || true
    fi
    rm -rf "$work"
    exit "$rc"
}
trap on_exit EXIT

step "what the test needs: systemd-nspawn, debootstrap, the Ansible venv, the packages"
nspawn_require
. scripts/lib/ansible-venv.sh
ansible_venv "$venv" "$here/requirements-converge.txt"
scripts/package >"$work/package.log" 2>&1 || { cat "$work/package.log" >&2; fail "scripts/package"; }
[[ -f target/packages/hyperfarm.deb ]] || fail "scripts/package made no target/packages/hyperfarm.deb"
tar=$(nspawn_root_tarball "$NSPAWN_FARM_INCLUDE")

step "TLS: a CA and the conversion host's certificate (openssl)"
tls="$work/tls"
mkdir -p "$tls"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj "/CN=hyperfarm test CA" \
    -keyout "$tls/ca.key" -out "$tls/ca.crt" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=hf-convert" \
    -keyout "$tls/hf-convert.key" -out "$tls/hf-convert.csr" 2>/dev/null
printf 'subjectAltName=DNS:hf-convert\nextendedKeyUsage=serverAuth\n' >"$tls/ext"
openssl x509 -req -in "$tls/hf-convert.csr" -CA "$tls/ca.crt" -CAkey "$tls/ca.key" -CAcreateserial \
    -days 2 -extfile "$tls/ext" -out "$tls/hf-convert.crt" 2>/dev/null

step "network: one namespace per host on a bridge"
cleanup_net
ip netns add hf-switch
ip -n hf-switch link add hfbr0 type bridge
ip -n hf-switch link set hfbr0 up
for h in "${hosts[@]}"; do
    ip netns add "$h"
    ip link add "v-$h" type veth peer name "p-$h"
    ip link set "v-$h" netns "$h"
    ip link set "p-$h" netns hf-switch
    ip -n hf-switch link set "p-$h" master hfbr0 up
    ip -n "$h" addr add "${addr[$h]}/24" dev "v-$h"
    ip -n "$h" link set lo up
    ip -n "$h" link set "v-$h" up
done
# The vCenter: govmomi's simulator with the export half (tests/vcsim), on a host of its own.
ip netns add hf-vcenter
ip link add v-hf-vcenter type veth peer name p-hf-vcenter
ip link set v-hf-vcenter netns hf-vcenter
ip link set p-hf-vcenter netns hf-switch
ip -n hf-switch link set p-hf-vcenter master hfbr0 up
ip -n hf-vcenter addr add 10.232.7.4/24 dev v-hf-vcenter
ip -n hf-vcenter link set lo up
ip -n hf-vcenter link set v-hf-vcenter up

step "a vCenter on hf-vcenter (10.232.7.4): the VM ubuntu-server, its disk a stream-optimized VMDK"
tests/vcsim/build.sh "$repo/target/hfvcsim/farm-hfvcsim" "$repo/target/hfvcsim" >"$work/vcsim-build.log" 2>&1 ||
    { cat "$work/vcsim-build.log" >&2; fail "building tests/vcsim (golang-go, golang-github-vmware-govmomi-dev)"; }
mkdir -p "$work/vcsim"
truncate -s 48M "$work/vc.raw"
head -c 12M /dev/urandom | dd of="$work/vc.raw" bs=1M seek=2 conv=notrunc status=none
printf 'exported from the vCenter' | dd of="$work/vc.raw" bs=1 seek=40000000 conv=notrunc status=none
qemu-img convert -f raw -O vmdk -o subformat=streamOptimized "$work/vc.raw" "$work/vc.vmdk"
ip netns exec hf-vcenter "$repo/target/hfvcsim/farm-hfvcsim" -dir "$work/vcsim" -disks "$work/vc.vmdk" \
    -listen 10.232.7.4:18443 -cert-ip 10.232.7.4 >"$work/vcsim.log" 2>&1 &
vcsim_pid=$!
for _ in $(seq 1 300); do [[ -s $work/vcsim/url ]] && break; sleep 0.1; done
[[ $(cat "$work/vcsim/url" 2>/dev/null) == https://10.232.7.4:18443/sdk ]] ||
    fail "the simulator did not start: $(cat "$work/vcsim.log")"

step "three containers: restore the root, host files, boot"
for h in "${hosts[@]}"; do
    root="$work/$h"
    nspawn_restore "$tar" "$root" "$h"
    {
        echo "127.0.0.1 localhost"
        for o in "${hosts[@]}"; do echo "${addr[$o]} $o"; done
    } >"$root/etc/hosts"
done
# The export host's people and the VM they export (fixtures, like a real host).
for u in alice svc-export; do chroot "$work/hf-export" useradd --create-home --shell /bin/bash "$u"; done
truncate -s 1G "$work/hf-export/home/alice/vm.raw"
head -c 400M /dev/urandom | dd of="$work/hf-export/home/alice/vm.raw" bs=1M seek=100 conv=notrunc status=none
chroot "$work/hf-export" chown alice:alice /home/alice/vm.raw
for h in "${hosts[@]}"; do
    extra=(--network-namespace-path="/run/netns/$h")
    [[ $h == hf-storage ]] || extra+=(--bind=/dev/fuse)
    nspawn_boot "$h" "$work/$h" "${extra[@]}"
done
for h in "${hosts[@]}"; do
    [[ $(nspawn_in "$h" hostname) == "$h" ]] || fail "$h has host name $(nspawn_in "$h" hostname)"
done
ids=$(for h in "${hosts[@]}"; do nspawn_in "$h" cat /etc/machine-id; done | sort -u | wc -l)
[[ $ids -eq 3 ]] || fail "the containers share a machine id"

step "ansible-playbook site.yml (inventory.example.ini with these host names)"
sed -e "s/^storage01\.example\.internal$/hf-storage ansible_nsenter_pid=${NSPAWN_PID1[hf-storage]}/" \
    -e "s/^export01\.example\.internal$/hf-export ansible_nsenter_pid=${NSPAWN_PID1[hf-export]}/" \
    -e "s/^convert01\.example\.internal$/hf-convert ansible_nsenter_pid=${NSPAWN_PID1[hf-convert]}/" \
    -e "s|^hyperfarm_tls_dir=.*|hyperfarm_tls_dir=$tls|" \
    "$here/inventory.example.ini" >"$work/inventory.ini"
diff <(grep -v -e '^hf-' -e '^hyperfarm_tls_dir' "$work/inventory.ini") \
    <(grep -v -e 'example\.internal$' -e '^hyperfarm_tls_dir' "$here/inventory.example.ini") >/dev/null ||
    fail "the test's inventory differs from the example in more than the host names and the TLS directory"
export HOME="$work/home" ANSIBLE_CONFIG="$here/ansible.cfg" ANSIBLE_NOCOLOR=1 ANSIBLE_LOCAL_TEMP="$work/ansible-tmp"
export ANSIBLE_CALLBACKS_ENABLED=ansible.posix.profile_tasks
mkdir -p "$HOME"
playbook() {
    # The containers have no route to a package mirror: everything the roles install is in the
    # root already (or is the .deb), so apt's cache is not refreshed. Ansible enters them as root;
    # `become` goes through su (a minimal Debian has no sudo).
    "$venv/bin/ansible-playbook" -i "$work/inventory.ini" -c community.docker.nsenter \
        -e ansible_python_interpreter=/usr/bin/python3 -e ansible_become_method=su \
        -e hyperfarm_storage_apt_cache_valid_time=0 -e hyperfarm_storage_client_apt_cache_valid_time=0 \
        -e hyperfarm_agent_apt_cache_valid_time=0 -e hyperfarm_exporter_apt_cache_valid_time=0 \
        -e "@$work/vsphere-vars.yml" "$here/site.yml" "$@"
}
# serve's vCenter, as a vaulted vars file would give it (the password never on a command line).
install -m 0600 /dev/null "$work/vsphere-vars.yml"
printf '%s\n' "hyperfarm_exporter_vsphere_url: https://10.232.7.4:18443/sdk" "hyperfarm_exporter_vsphere_user: hf-user" \
    "hyperfarm_exporter_vsphere_password: hf-secret" "hyperfarm_exporter_vsphere_ca_src: $work/vcsim/ca.pem" \
    >"$work/vsphere-vars.yml"
playbook >"$work/apply.log" 2>&1 || { tail -n 60 "$work/apply.log" >&2; fail "site.yml"; }
grep -E '^hf-[a-z]+ +: ' "$work/apply.log"

step "ansible-playbook site.yml again: nothing changes"
playbook >"$work/again.log" 2>&1 || { tail -n 60 "$work/again.log" >&2; fail "site.yml (second run)"; }
grep -E '^hf-[a-z]+ +: ' "$work/again.log"
if grep -E '^hf-[a-z]+ +: ' "$work/again.log" | grep -vq ' changed=0 '; then
    grep -B2 -E '^changed:' "$work/again.log" >&2
    fail "the second run changed something"
fi

step "the farm as provisioned"
conv() { nspawn_in hf-convert "$@"; }
expo() { nspawn_in hf-export "$@"; }
for h in hf-export hf-convert; do
    [[ $(nspawn_in "$h" findmnt -n -o FSTYPE /srv/hyperfarm) == fuse.glusterfs ]] || fail "$h: /srv/hyperfarm is not the volume"
done
for h in hf-export hf-convert; do
    client=$(nspawn_in "$h" ps -eo args | grep '^/usr/sbin/glusterfs ' || true)
    for o in --attribute-timeout=0 --entry-timeout=0 --negative-timeout=0; do
        [[ " $client " == *" $o "* ]] || fail "$h: the GlusterFS client runs without $o: $client"
    done
done
for o in performance.write-behind performance.stat-prefetch performance.quick-read performance.io-cache \
    performance.read-ahead performance.open-behind performance.readdir-ahead; do
    v=$(nspawn_in hf-storage gluster --mode=script volume get hyperfarm "$o" | awk -v o="$o" '$1 == o {print $2}')
    [[ $v == off ]] || fail "volume option $o is '$v'"
done
[[ $(nspawn_in hf-storage gluster --mode=script volume get hyperfarm network.ping-timeout | awk '$1 == "network.ping-timeout" {print $2}') == 10 ]] ||
    fail "network.ping-timeout is not 10"
echo "mounts and volume have the settings docs/protocol.md requires"
status=$(conv systemctl status --no-pager hyper2kvm-agent.service || true)
grep -q 'Active: active (running)' <<<"$status" && grep -q 'Status: "' <<<"$status" ||
    fail "the agent on hf-convert is not running and READY: $status"
grep -q '^ *Status: ' <<<"$status" && grep '^ *Status: ' <<<"$status"
journal=$(conv journalctl --no-pager -u hyper2kvm-agent.service)
grep -q 'storage=fuse.glusterfs' <<<"$journal" || fail "the agent does not see the volume"
if grep -q 'storage: ' <<<"$journal"; then fail "the agent warns about the mount the roles made: $(grep 'storage: ' <<<"$journal")"; fi
[[ $(expo systemctl is-active hyper2kvm-agent.service || true) != active ]] || fail "an agent runs on the export host"
metrics=$(conv python3 -c 'import urllib.request; print(urllib.request.urlopen("http://127.0.0.1:9471/metrics", timeout=10).read().decode())' 2>&1 || true)
grep -qx 'hyperfarm_storage_ok{dir="queue"} 1' <<<"$metrics" || fail "the packaged agent's /metrics: $metrics"
echo "the packaged agent serves /metrics on 127.0.0.1:9471 (queue and output usable)"
[[ $(conv dpkg-query -W -f '${Status}' hyperfarm) == "install ok installed" ]] || fail "hyperfarm is not installed from the package"
expo runuser -u alice -- hyperctl daemon list
st=$(expo runuser -u alice -- hyperctl --json daemon status 2>&1 || true)
python3 -c '
import json, sys
rows = json.loads(sys.argv[1])
assert any(r.get("url") == "https://hf-convert:50071" and r.get("status") == "running" and r.get("serving") is True
           and (r.get("host") or "").startswith("hf-convert") for r in rows), rows
' "$st" || fail "hyperctl on hf-export does not reach hf-convert's agent over TLS: $st"

export_vm() { # NAME: exports alice's VM in the background, output in $work/export-NAME.log
    expo runuser -u alice -- hyperexport --vm /home/alice/vm.raw --name "$1" --pipeline --hyper2kvm-daemon \
        --hyper2kvm-daemon-timeout 10m >"$work/export-$1.out" 2>"$work/export-$1.log" &
}
job_info() { # NAME: "id state phase percent" of the VM's job, as hyperctl on hf-export shows it
    expo runuser -u alice -- hyperctl jobs list --json 2>/dev/null | python3 -c '
import json, sys
for j in json.load(sys.stdin).get("jobs", []):
    if j.get("vm") == sys.argv[1]:
        print(j["id"], j["state"], j["phase"], round(j["percent"], 1))
        break' "$1" || true
}
until_converting() { # NAME PID: wait until hyperctl shows the job converting; prints what it saw
    local info=""
    for _ in $(seq 1 600); do
        info=$(job_info "$1")
        [[ $info == *" converting converting "* ]] && { echo "$info"; return 0; }
        kill -0 "$2" 2>/dev/null || break
        sleep 0.2
    done
    return 1
}

step "export on hf-export, convert on hf-convert, progress in hyperctl over TLS"
export_vm farmvm
pid=$!
seen=$(until_converting farmvm "$pid") || true
wait "$pid" || { cat "$work/export-farmvm.log" >&2; fail "hyperexport farmvm"; }
echo "hyperctl on hf-export during the conversion (id state phase percent): $seen"
[[ -n $seen ]] || fail "hyperctl never showed farmvm converting"
grep -q 'daemon mode with live progress' "$work/export-farmvm.log" || fail "the exporter did not follow over gRPC: $(cat "$work/export-farmvm.log")"
grep -qx '/srv/hyperfarm/output/farmvm.qcow2' "$work/export-farmvm.out" || fail "hyperexport printed $(cat "$work/export-farmvm.out")"
expo qemu-img compare -q /home/alice/vm.raw /srv/hyperfarm/output/farmvm.qcow2 || fail "farmvm.qcow2 differs from the VM"

step "hyperexport serve on hf-export (from site.yml): a job submitted over HTTP converts on hf-convert"
[[ $(expo systemctl is-active hyperexport-serve.service || true) == active ]] ||
    fail "hyperexport serve is not running on hf-export: $(expo systemctl status --no-pager hyperexport-serve.service || true)"
expo mkdir -p /srv/vms
expo truncate -s 16M /srv/vms/api.raw
expo sh -c 'printf "submitted over HTTP" | dd of=/srv/vms/api.raw bs=1 seek=4194304 conv=notrunc status=none'
expo chmod 0644 /srv/vms/api.raw
served=$(expo python3 - /srv/vms/api.raw api apivm 10 <scripts/lib/serve-job.py) ||
    fail "the API client on hf-export: $served"
python3 -c '
import json, sys
j = json.loads(sys.argv[1])
assert j["state"] == "done", j
assert j["files"] == ["/srv/hyperfarm/output/apivm.qcow2"], j
assert "the agent answers over gRPC" in j["log"], j["log"]
' "$served" || fail "the job submitted to hyperexport serve: $served"
expo qemu-img compare -q /srv/vms/api.raw /srv/hyperfarm/output/apivm.qcow2 || fail "apivm.qcow2 differs from the VM"
echo "hyperexport serve on hf-export: apivm converted on hf-convert, followed over gRPC with TLS"

step "hyperexport serve on hf-export, its vCenter set by the role: the seed's vSphere request converts on hf-convert"
[[ $(expo stat -c '%a %U %G' /etc/hyper2kvm/vsphere.password) == "640 root hyperfarm" ]] ||
    fail "the vCenter password file: $(expo stat -c '%a %U %G' /etc/hyper2kvm/vsphere.password)"
served=$(expo env HYPEREXPORT_SERVE_PROVIDER=vsphere python3 - /DC0/vm/ubuntu-server vsapi vsvm 10 <scripts/lib/serve-job.py) ||
    fail "the API client on hf-export: $served"
python3 -c '
import json, sys
j = json.loads(sys.argv[1])
assert j["state"] == "done", j
assert j["files"] == ["/srv/hyperfarm/output/vsvm.qcow2"], j
assert "logged into vSphere" in j["log"] and "the agent answers over gRPC" in j["log"], j["log"]
' "$served" || fail "the vSphere job submitted to hyperexport serve: $served"
cp "$work/vc.raw" "$work/hf-export/srv/vms/vc.raw"
expo qemu-img compare -q /srv/vms/vc.raw /srv/hyperfarm/output/vsvm.qcow2 || fail "vsvm.qcow2 differs from the vCenter's disk"
grep -q '"event":"HttpNfcLeaseComplete"' "$work/vcsim/events.jsonl" || fail "the lease was not completed: $(cat "$work/vcsim/events.jsonl")"
echo "hyperexport serve on hf-export: /DC0/vm/ubuntu-server downloaded from hf-vcenter, converted on hf-convert"

step "restart the agent mid-job: the job finishes once"
export_vm restartvm
pid=$!
until_converting restartvm "$pid" >/dev/null || fail "restartvm never showed converting"
before=$(conv systemctl show -p MainPID --value hyper2kvm-agent.service)
conv systemctl restart hyper2kvm-agent.service
after=$(conv systemctl show -p MainPID --value hyper2kvm-agent.service)
[[ $after != "$before" && $after != 0 ]] || fail "the agent did not restart"
wait "$pid" || { cat "$work/export-restartvm.log" >&2; fail "hyperexport restartvm"; }
expo qemu-img compare -q /home/alice/vm.raw /srv/hyperfarm/output/restartvm.qcow2 || fail "restartvm.qcow2 differs"
id=$(job_info restartvm | cut -d" " -f1)
dones=$(conv sh -c "ls /srv/hyperfarm/queue/done/$id/events/ | grep -c -- '-done-'" || true)
[[ $dones == 1 ]] || fail "job $id of restartvm ended $dones times"
echo "restartvm ($id): one done event after the restart ($before -> $after)"

step "SIGSTOP the agent: the watchdog restarts it"
before=$(conv systemctl show -p MainPID --value hyper2kvm-agent.service)
restarts=$(conv systemctl show -p NRestarts --value hyper2kvm-agent.service)
wd=$(conv systemctl show -p WatchdogUSec --value hyper2kvm-agent.service)
conv kill -STOP "$before"
t=$(date +%s)
for _ in $(seq 1 1200); do
    now=$(conv systemctl show -p MainPID --value hyper2kvm-agent.service)
    [[ $now != "$before" && $now != 0 && $(conv systemctl is-active hyper2kvm-agent.service) == active ]] && break
    sleep 0.1
done
[[ $now != "$before" && $now != 0 ]] || fail "the stopped agent was not restarted"
[[ $(conv systemctl show -p NRestarts --value hyper2kvm-agent.service) -gt $restarts ]] || fail "no restart counted"
journal=$(conv journalctl --no-pager -u hyper2kvm-agent.service)
grep -qi 'watchdog timeout' <<<"$journal" || fail "the restart was not the watchdog's"
echo "watchdog ($wd) restarted the stopped agent after $(($(date +%s) - t)) s ($before -> $now)"

step "systemctl stop hyper2kvm-agent.target stops every instance"
conv sh -c 'printf "listen = \"127.0.0.1:50072\"\n" >/etc/hyper2kvm/agent-extra.toml'
conv systemctl start hyper2kvm-agent@extra.service
[[ $(conv systemctl is-active hyper2kvm-agent@extra.service) == active ]] || fail "hyper2kvm-agent@extra did not start"
conv systemctl stop hyper2kvm-agent.target
for u in hyper2kvm-agent.service hyper2kvm-agent@extra.service; do
    # The target's stop job returns first; the agents finish theirs within TimeoutStopSec (45 s).
    for _ in $(seq 1 500); do
        s=$(conv systemctl is-active "$u" || true)
        [[ $s == deactivating ]] || break
        sleep 0.1
    done
    r=$(conv systemctl show -p Result --value "$u")
    [[ $s == inactive && $r == success ]] || fail "$u after stopping the target: $s, result $r"
done
if conv pgrep -x hyper2kvm-agent >/dev/null; then fail "an agent process is left"; fi

step "farm proven"
