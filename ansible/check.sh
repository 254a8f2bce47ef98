#!/usr/bin/env bash
# Static checks of the Ansible roles. Touches nothing on this host outside the venv and a
# scratch directory. Run from anywhere: bash ansible/check.sh
#
#  1. A venv at ${HYPERFARM_ANSIBLE_VENV:-/opt/hyperfarm-ansible-venv} with the pinned
#     ansible/requirements.txt (created, or refreshed when that file changes).
#  2. ansible-lint --offline (production profile, ansible/.ansible-lint), HOME in a scratch dir.
#  3. ansible-playbook --syntax-check of site.yml and the test playbooks.
#  4. The roles' templates rendered on the controller (tests/render.yml, into the scratch dir)
#     and checked: agent.toml by `hyper2kvm-agent --check-config` (when a built agent is under
#     target/), the drop-ins by `systemd-analyze verify` beside the units, hyperexport.toml
#     against the keys hyperexport accepts, serve's drop-in with a vCenter by running its
#     command line with the built hyperexport (every flag parses; the settings check stops it).
#  5. The exporter role's serve and vSphere checks against good and bad values (tests/asserts.yml).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
venv=${HYPERFARM_ANSIBLE_VENV:-/opt/hyperfarm-ansible-venv}
python=${PYTHON:-python3}

step() { printf '== %s\n' "$*"; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1fs", b - a }'; }

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

# --- 1. the venv ------------------------------------------------------------------------------
t=$(now)
stamp="$venv/.hyperfarm-requirements"
want=$(cat "$here/requirements.txt")
if [[ ! -x $venv/bin/ansible-lint || ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
    step "creating the venv $venv (ansible/requirements.txt)"
    if [[ ! -x $venv/bin/python ]]; then
        if ! "$python" -m venv "$venv" 2>"$scratch/venv.err"; then
            # Debian's python3 needs python3-venv for `-m venv`.
            if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
                apt-get update -qq
                DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
                rm -rf "$venv"
                "$python" -m venv "$venv"
            else
                cat "$scratch/venv.err" >&2
                echo "FAIL: cannot create a venv with $python (apt-get install python3-venv)" >&2
                exit 1
            fi
        fi
    fi
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$here/requirements.txt"
    printf '%s' "$want" >"$stamp"
    echo "venv ready in $(elapsed "$t")"
else
    echo "venv $venv is up to date"
fi
export PATH="$venv/bin:$PATH"

# Ansible and ansible-lint write caches under HOME and ~/.ansible: keep them in the scratch dir.
export HOME="$scratch/home"
mkdir -p "$HOME"
export ANSIBLE_LOCAL_TEMP="$scratch/ansible-tmp" ANSIBLE_REMOTE_TEMP="$scratch/ansible-tmp"
export ANSIBLE_CONFIG="$here/ansible.cfg" ANSIBLE_NOCOLOR=1 ANSIBLE_FORCE_COLOR=0 NO_COLOR=1
cd "$here"

# --- 2. lint ------------------------------------------------------------------------------------
t=$(now)
step "ansible-lint --offline ($(ansible-lint --version 2>/dev/null | head -n1))"
ansible-lint --offline --nocolor
echo "lint clean in $(elapsed "$t")"

# --- 3. syntax ----------------------------------------------------------------------------------
t=$(now)
step "ansible-playbook --syntax-check"
ansible-playbook --syntax-check -i inventory.example.ini site.yml
for p in tests/*.yml; do
    ansible-playbook --syntax-check -i localhost, "$p"
done
echo "syntax ok in $(elapsed "$t")"

# --- 4. templates -------------------------------------------------------------------------------
t=$(now)
step "rendering the templates (tests/render.yml)"
out="$scratch/render"
mkdir -p "$out"
# The newest built agent, if any.
agent=""
for candidate in "$repo/target/release/hyper2kvm-agent" "$repo/target/debug/hyper2kvm-agent"; do
    if [[ -x $candidate && (-z $agent || $candidate -nt $agent) ]]; then
        agent=$candidate
    fi
done
ansible-playbook -i localhost, -c local tests/render.yml -e "hyperfarm_render_dir=$out" \
    -e "ansible_python_interpreter=$venv/bin/python" \
    >"$scratch/render.log" 2>&1 || {
    cat "$scratch/render.log" >&2
    echo "FAIL: tests/render.yml" >&2
    exit 1
}

failures=0
fail() {
    echo "FAIL: $*" >&2
    failures=$((failures + 1))
}

if [[ -n $agent ]]; then
    for f in agent-default.toml agent-vsphere.toml; do
        if ! json=$("$agent" --config "$out/$f" --check-config 2>&1); then
            fail "$f is rejected by $agent --check-config:"
            printf '%s\n%s\n' "$json" "$(cat "$out/$f")" | sed 's/^/    /' >&2
        elif [[ $f == agent-vsphere.toml && $json != *'"watch_dir": "/srv/hyperfarm/queue"'* ]]; then
            fail "agent-vsphere.toml does not carry hyperfarm_agent_watch_dir: $json"
        elif [[ $f == agent-vsphere.toml && ($json != *'127.0.0.1:50072'* || $json != *'"ops.example.internal"'*) ]]; then
            fail "agent-vsphere.toml does not carry hyperfarm_agent_listen/extra_config: $json"
        else
            echo "ok: rendered $f passes $agent --check-config"
        fi
    done
else
    echo "skip: no built hyper2kvm-agent under target/, rendered agent.toml not checked"
fi

if command -v systemd-analyze >/dev/null; then
    root="$scratch/root"
    mkdir -p "$root/usr/local/bin" "$root/etc/systemd/system/hyper2kvm-agent@vsphere.service.d"
    printf '#!/bin/sh\nexit 0\n' >"$root/usr/local/bin/hyper2kvm-agent"
    chmod 0755 "$root/usr/local/bin/hyper2kvm-agent"
    cp "$repo/systemd/hyper2kvm-agent@.service" "$repo/systemd/hyper2kvm-agent.target" \
        "$root/etc/systemd/system/"
    cp "$out/50-hyperfarm-site.conf" "$root/etc/systemd/system/hyper2kvm-agent@vsphere.service.d/"
    v=$(systemd-analyze verify --root="$root" --recursive-errors=no hyper2kvm-agent@vsphere.service 2>&1) || v="$v (exit $?)"
    if [[ -n $v ]]; then
        fail "the rendered drop-in does not verify:"
        printf '%s\n' "$v" "$(cat "$out/50-hyperfarm-site.conf")" | sed 's/^/    /' >&2
    else
        echo "ok: rendered drop-in verifies with hyper2kvm-agent@vsphere.service"
    fi
fi

# serve's drop-in with a vCenter: it verifies beside the unit, and the built hyperexport accepts
# its command line (every flag parses; serve then stops at the password file, which the render
# does not write: exit 2 naming it).
exporter=""
for candidate in "$repo/target/release/hyperexport" "$repo/target/debug/hyperexport"; do
    if [[ -x $candidate && (-z $exporter || $candidate -nt $exporter) ]]; then
        exporter=$candidate
    fi
done
grep -q -- '--provider vsphere --vsphere-url https://vcenter.example.internal/sdk --vsphere-user svc-export@vsphere.local --vsphere-password-file /etc/hyper2kvm/vsphere.password --ca-file /etc/hyper2kvm/tls/vsphere-ca.crt "--folder=/DC1/vm/to migrate"$' \
    "$out/serve-vsphere.conf" || fail "the rendered serve drop-in lacks the vSphere flags: $(cat "$out/serve-vsphere.conf")"
grep -qx 'Group=farm-export' "$out/serve-vsphere.conf" ||
    fail "the rendered serve drop-in does not run serve in hyperfarm_exporter_group: $(cat "$out/serve-vsphere.conf")"
if command -v systemd-analyze >/dev/null; then
    root="$scratch/serve-root"
    mkdir -p "$root/usr/local/bin" "$root/etc/systemd/system/hyperexport-serve.service.d"
    printf '#!/bin/sh\nexit 0\n' >"$root/usr/local/bin/hyperexport"
    chmod 0755 "$root/usr/local/bin/hyperexport"
    cp "$here/roles/hyperfarm_exporter/files/hyperexport-serve.service" "$root/etc/systemd/system/"
    cp "$out/serve-vsphere.conf" "$root/etc/systemd/system/hyperexport-serve.service.d/50-hyperfarm-site.conf"
    v=$(systemd-analyze verify --root="$root" --recursive-errors=no hyperexport-serve.service 2>&1) || v="$v (exit $?)"
    if [[ -n $v ]]; then
        fail "the rendered serve drop-in does not verify: $v"
    else
        echo "ok: rendered serve drop-in (vSphere) verifies with hyperexport-serve.service"
    fi
fi
if [[ -n $exporter ]]; then
    # The ExecStart= line's arguments after the program, as systemd splits them (quotes kept whole).
    # The host's own files are never used: the password file, state directory and configuration
    # become paths in the scratch directory (the password file missing there).
    mapfile -t argv < <("$venv/bin/python" -c '
import shlex, sys
line = [l for l in open(sys.argv[1]) if l.startswith("ExecStart=") and l.strip() != "ExecStart="][0]
swap = {"/etc/hyper2kvm/vsphere.password": sys.argv[2] + "/no-vsphere.password",
        "/var/lib/hyperexport": sys.argv[2] + "/serve-state", "/etc/hyper2kvm/hyperexport.toml": "/dev/null"}
for a in shlex.split(line.split("=", 1)[1])[1:]:
    print(swap.get(a, a))' "$out/serve-vsphere.conf" "$scratch")
    rc=0
    # The settings are checked before serve touches its state directory or listens.
    if [[ ${#argv[@]} -lt 10 ]]; then
        got="no ExecStart= arguments read from serve-vsphere.conf"
        rc=-1
    else
        got=$(timeout 20 "$exporter" "${argv[@]}" 2>&1) || rc=$?
    fi
    if [[ $rc -eq 2 && $got == *"--vsphere-password-file $scratch/no-vsphere.password"* ]]; then
        echo "ok: $exporter accepts the rendered serve command line (and checks its password file at start)"
    else
        fail "the rendered serve command line, run by $exporter (exit $rc): $got"
    fi
else
    echo "skip: no built hyperexport under target/, the rendered serve command line not run"
fi

# The storage templates: the NFS export is synchronous and root-squashed, the mount unit verifies
# and mounts hard with a short attribute cache.
grep -Eq '^/srv/hyperfarm 10\.0\.0\.0/24\(rw,sync,no_subtree_check,root_squash\)$' "$out/hyperfarm.exports" ||
    fail "the rendered NFS export is not sync/root_squash: $(cat "$out/hyperfarm.exports")"
if command -v systemd-analyze >/dev/null; then
    v=$(cd "$out" && systemd-analyze verify ./srv-hyperfarm.mount 2>&1) || v="$v (exit $?)"
    if [[ -n $v ]]; then
        fail "the rendered mount unit does not verify: $v"
    fi
fi
grep -qx 'Options=hard,actimeo=1,_netdev' "$out/srv-hyperfarm.mount" && grep -qx 'Type=nfs' "$out/srv-hyperfarm.mount" ||
    fail "the rendered NFS mount unit lacks the required options: $(cat "$out/srv-hyperfarm.mount")"
echo "ok: rendered NFS export and mount unit"

# hyperexport has no --check-config: compare the keys with its FileConfig (exporter/src/cli.rs).
if ! "$venv/bin/python" - "$out/hyperexport.toml" "$repo/exporter/src/cli.rs" <<'EOF'; then
import re, sys, tomllib
src = open(sys.argv[2]).read()
body = re.search(r"pub struct FileConfig \{(.*?)\n\}", src, re.S).group(1)
accepted = set(re.findall(r"pub (\w+):", body))
assert {"watch_dir", "daemon_timeout"} <= accepted, accepted
with open(sys.argv[1], "rb") as f:
    doc = tomllib.load(f)
unknown = set(doc) - accepted
assert not unknown, f"keys hyperexport rejects: {sorted(unknown)}"
assert doc["watch_dir"] == "/var/lib/hyper2kvm/vsphere/queue", doc
assert doc["daemon_timeout"] == "90m", doc
assert doc["detect"] is False and doc["agent_domain"] == "convert01.example.internal", doc
EOF
    fail "the rendered hyperexport.toml is not what hyperexport accepts"
else
    echo "ok: rendered hyperexport.toml has only keys hyperexport accepts"
fi
echo "templates checked in $(elapsed "$t")"

# --- 5. the role's settings checks -----------------------------------------------------------------
t=$(now)
step "the exporter role's serve and vSphere checks against good and bad values (tests/asserts.yml)"
if ansible-playbook -i localhost, -c local tests/asserts.yml -e "ansible_python_interpreter=$venv/bin/python" \
    >"$scratch/asserts.log" 2>&1; then
    echo "ok: $(grep -c 'Compare with the expectation' "$scratch/asserts.log") cases as expected in $(elapsed "$t")"
else
    grep -E 'expected (to pass|a failure)|FAILED|ERROR' "$scratch/asserts.log" >&2 || tail -n 30 "$scratch/asserts.log" >&2
    fail "tests/asserts.yml: the role's checks do not refuse exactly the bad values"
fi

if [[ $failures -ne 0 ]]; then
    echo "ansible/check.sh: $failures check(s) failed" >&2
    exit 1
fi
echo "ansible/check.sh: all checks passed"
