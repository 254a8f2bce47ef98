#!/usr/bin/env bash
# Static checks of the agent's systemd units. Needs only systemd (systemd-analyze); no running
# systemd, no root, no build. Run from anywhere: bash systemd/check.sh
#
#  1. `systemd-analyze verify` of hyper2kvm-agent.service, hyper2kvm-agent@.service (as
#     hyper2kvm-agent@example.service) and hyper2kvm-agent.target, in a scratch root that holds
#     an executable at the ExecStart= path. verify exits 0 on many warnings ("Unknown key",
#     unparsable values), so ANY output is a failure.
#  2. `systemd-analyze security --offline=true` of both services: the exposure (0 best, 10
#     worst) must not exceed MAX_EXPOSURE (default 1.5; the units score 1.3).
#  3. Both services must be identical apart from the lines that name the instance.
#  4. If a built agent is at hand (target/{debug,release}/hyper2kvm-agent), agent.toml.example
#     with every key uncommented must pass `hyper2kvm-agent --check-config`.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
max_exposure=${MAX_EXPOSURE:-1.5}
failures=0

fail() {
    echo "FAIL: $*" >&2
    failures=$((failures + 1))
}

command -v systemd-analyze >/dev/null || {
    echo "FAIL: systemd-analyze not found (apt-get install systemd)" >&2
    exit 1
}

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

# A scratch root: the units under /etc/systemd/system, a stand-in executable at the ExecStart=
# path (verify checks that it exists and is executable, nothing more).
root=$scratch/root
mkdir -p "$root/etc/systemd/system" "$root/usr/local/bin"
for exe in hyper2kvm-agent hyperexport; do
    printf '#!/bin/sh\nexit 0\n' >"$root/usr/local/bin/$exe"
    chmod 0755 "$root/usr/local/bin/$exe"
done
cp "$here/hyper2kvm-agent.service" "$here/hyper2kvm-agent.target" "$here/hyperexport-serve.service" "$root/etc/systemd/system/"
cp "$here/hyper2kvm-agent@.service" "$root/etc/systemd/system/hyper2kvm-agent@.service"
cp "$here/hyper2kvm-agent@.service" "$root/etc/systemd/system/hyper2kvm-agent@example.service"

units=(hyper2kvm-agent.service hyper2kvm-agent@example.service hyper2kvm-agent.target hyperexport-serve.service)
for unit in "${units[@]}"; do
    rc=0
    out=$(systemd-analyze verify --root="$root" --recursive-errors=no "$unit" 2>&1) || rc=$?
    if [[ $rc -ne 0 || -n $out ]]; then
        fail "systemd-analyze verify $unit (exit $rc):"
        printf '%s\n' "$out" | sed 's/^/    /' >&2
    else
        echo "ok: verify $unit"
    fi
done

# The exposure figure, e.g. "→ Overall exposure level for x.service: 1.3 OK 🙂".
for unit in hyper2kvm-agent.service hyper2kvm-agent@example.service hyperexport-serve.service; do
    rc=0
    out=$(systemd-analyze security --offline=true --no-pager \
        "$root/etc/systemd/system/$unit" 2>&1) || rc=$?
    level=$(printf '%s\n' "$out" | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')
    if [[ -z $level ]]; then
        fail "systemd-analyze security $unit printed no exposure level (exit $rc):"
        printf '%s\n' "$out" | sed 's/^/    /' >&2
    elif awk -v l="$level" -v m="$max_exposure" 'BEGIN { exit !(l > m) }'; then
        fail "$unit: exposure $level is above $max_exposure; what it still allows:"
        printf '%s\n' "$out" | grep '✗' | sed 's/^/    /' >&2
    else
        echo "ok: security $unit: exposure $level (limit $max_exposure)"
    fi
done

# The template must differ from the default unit only where it names the instance.
normalise() {
    sed -e '/^#/d' -e '/^Description=/d' \
        -e 's/--instance default/--instance %i/' \
        -e 's|hyper2kvm/queue|hyper2kvm/%i/queue|g' \
        -e 's|hyper2kvm/output|hyper2kvm/%i/output|g' "$1"
}
if ! diff_out=$(diff <(normalise "$here/hyper2kvm-agent.service") \
    <(normalise "$here/hyper2kvm-agent@.service")); then
    fail "hyper2kvm-agent.service and hyper2kvm-agent@.service differ beyond the instance lines:"
    printf '%s\n' "$diff_out" | sed 's/^/    /' >&2
else
    echo "ok: template and default unit agree"
fi

# agent.toml.example must document exactly the keys the agent accepts: FileConfig in
# converter-agent/src/config.rs and, under [convert], ConvertOptions in shared/src/engine/qemu_img.rs.
struct_fields() { # FILE STRUCT
    sed -n "/^pub struct $2 {/,/^}/p" "$1" | sed -n 's/^ *pub \([a-z_0-9]*\):.*/\1/p' | sort
}
example_keys() { # SECTION: "top" or "convert"
    awk -v want="$1" '
        /^\[convert\]/ { section = "convert"; next }
        /^\[/ { section = "other"; next }
        { if (section == "") section = "top" }
        section == want && match($0, /^#?[a-z_0-9]+ = /) {
            k = substr($0, 1, RLENGTH); sub(/^#/, "", k); sub(/ = $/, "", k); print k
        }' "$here/agent.toml.example" | sort -u
}
config_rs="$repo/converter-agent/src/config.rs"
convert_rs="$repo/shared/src/engine/qemu_img.rs"
if [[ -f $config_rs && -f $convert_rs ]]; then
    before=$failures
    for pair in "top:$config_rs:FileConfig" "convert:$convert_rs:ConvertOptions"; do
        IFS=: read -r section file struct <<<"$pair"
        code=$(struct_fields "$file" "$struct" | grep -vx convert || true)
        doc=$(example_keys "$section")
        if [[ -z $code ]]; then
            fail "found no fields of $struct in $file (has it moved?)"
        elif [[ $code != "$doc" ]]; then
            fail "agent.toml.example ($section) and $struct differ (< only in the code, > only in the example):"
            { diff <(echo "$code") <(echo "$doc") || true; } | grep '^[<>]' | sed 's/^/    /' >&2
        fi
    done
    if [[ $failures -eq $before ]]; then
        echo "ok: agent.toml.example documents exactly the keys of FileConfig and ConvertOptions"
    fi
else
    echo "skip: agent sources not found, agent.toml.example keys not compared"
fi

# The newest built agent, if any (a stale release build must not judge a newer example).
agent=""
for candidate in "$repo/target/release/hyper2kvm-agent" "$repo/target/debug/hyper2kvm-agent"; do
    if [[ -x $candidate && (-z $agent || $candidate -nt $agent) ]]; then
        agent=$candidate
    fi
done
if [[ -n $agent ]]; then
    sed 's/^#\([a-z_]* = \)/\1/' "$here/agent.toml.example" >"$scratch/agent.toml"
    if out=$("$agent" --config "$scratch/agent.toml" --check-config 2>&1); then
        echo "ok: agent.toml.example (every key set) passes $agent --check-config"
    else
        fail "agent.toml.example with every key set is rejected by $agent --check-config:"
        printf '%s\n' "$out" | sed 's/^/    /' >&2
    fi
else
    echo "skip: no built hyper2kvm-agent under target/, agent.toml.example not checked"
fi

if [[ $failures -ne 0 ]]; then
    echo "systemd/check.sh: $failures check(s) failed" >&2
    exit 1
fi
echo "systemd/check.sh: all checks passed"
