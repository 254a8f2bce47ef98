#!/bin/sh
# Installs hyperfarm on a host without a package manager we build for (no .deb/.rpm): the three
# binaries into /usr/local/bin, the units into /etc/systemd/system, the user and directories
# (sysusers.d/tmpfiles.d), example configs (never overwriting an edited one), man pages and shell
# completions; then enables and starts the agent. Idempotent: a second run changes nothing and
# says so. Run as root from a checkout after `scripts/package`, or from the unpacked
# target/packages/hyperfarm-<version>-<arch>.tar.gz that scripts/package also writes (same layout).
#
#   sudo packaging/install.sh [--no-start]
#   sudo packaging/install.sh --uninstall      # stops and removes; keeps configs, queue, user
set -eu

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
prefix=/usr/local
start=yes
mode=install
while [ $# -gt 0 ]; do
    case $1 in
        --no-start) start=no ;;
        --uninstall) mode=uninstall ;;
        -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
        *) echo "install.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
[ "$(id -u)" -eq 0 ] || { echo "install.sh: run as root" >&2; exit 1; }
systemd_up=no
[ -d /run/systemd/system ] && systemd_up=yes

changed=0
# put SRC DEST MODE: copy only when the content or mode differs, and count the change.
put() {
    if [ -f "$2" ] && cmp -s "$1" "$2" && [ "$(stat -c %a "$2")" = "$3" ]; then
        return 0
    fi
    mkdir -p "$(dirname "$2")"
    install -m "$3" "$1" "$2.hyperfarm-new"
    mv -f "$2.hyperfarm-new" "$2"
    echo "installed $2"
    changed=$((changed + 1))
}
# A config is installed once; an edited one is never replaced.
put_config() {
    if [ -e "$2" ]; then
        return 0
    fi
    put "$1" "$2" 644
}

units="hyper2kvm-agent.service hyper2kvm-agent@.service hyper2kvm-agent.target hyperexport-serve.service"
bins="hyper2kvm-agent hyperexport hyperctl"

if [ $mode = uninstall ]; then
    if [ $systemd_up = yes ]; then
        systemctl stop hyper2kvm-agent.target hyper2kvm-agent.service 'hyper2kvm-agent@*.service' hyperexport-serve.service 2>/dev/null || true
        systemctl disable hyper2kvm-agent.service hyper2kvm-agent.target hyperexport-serve.service >/dev/null 2>&1 || true
    fi
    for u in $units; do rm -f "/etc/systemd/system/$u"; done
    for b in $bins; do
        rm -f "$prefix/bin/$b" "$prefix/share/man/man1/$b.1.gz" "$prefix/share/bash-completion/completions/$b" \
            "$prefix/share/zsh/site-functions/_$b" "$prefix/share/fish/vendor_completions.d/$b.fish"
    done
    rm -f "$prefix"/share/man/man1/hyperctl-*.1.gz /etc/sysusers.d/hyperfarm.conf /etc/tmpfiles.d/hyperfarm.conf
    rm -rf "$prefix/share/doc/hyperfarm"
    [ $systemd_up = no ] || systemctl daemon-reload
    echo "removed hyperfarm; kept /etc/hyper2kvm, /var/lib/hyper2kvm and the user hyperfarm"
    exit 0
fi

bindir=$here/build/bin gen=$here/build etc=$here
for b in $bins; do
    [ -x "$bindir/$b" ] || { echo "install.sh: $bindir/$b is missing: run scripts/package first" >&2; exit 1; }
done
[ -d "$gen/man" ] || { echo "install.sh: $gen/man is missing: run scripts/package first" >&2; exit 1; }

for b in $bins; do put "$bindir/$b" "$prefix/bin/$b" 755; done
# The repository's units name /usr/local paths: exactly this layout.
for u in $units; do put "$repo/systemd/$u" "/etc/systemd/system/$u" 644; done
put "$etc/sysusers.conf" /etc/sysusers.d/hyperfarm.conf 644
put "$etc/tmpfiles.conf" /etc/tmpfiles.d/hyperfarm.conf 644
put_config "$repo/systemd/agent.toml.example" /etc/hyper2kvm/agent.toml
put_config "$etc/hyperexport.toml" /etc/hyper2kvm/hyperexport.toml
for m in "$gen"/man/*.1.gz; do put "$m" "$prefix/share/man/man1/$(basename "$m")" 644; done
for f in "$gen"/completions/bash/*; do put "$f" "$prefix/share/bash-completion/completions/$(basename "$f")" 644; done
for f in "$gen"/completions/zsh/*; do put "$f" "$prefix/share/zsh/site-functions/$(basename "$f")" 644; done
for f in "$gen"/completions/fish/*; do put "$f" "$prefix/share/fish/vendor_completions.d/$(basename "$f")" 644; done
put "$repo/systemd/README.md" "$prefix/share/doc/hyperfarm/systemd/README.md" 644

if command -v systemd-sysusers >/dev/null; then
    systemd-sysusers hyperfarm.conf
elif ! getent passwd hyperfarm >/dev/null; then
    groupadd --system hyperfarm 2>/dev/null || true
    useradd --system --gid hyperfarm --home-dir /var/lib/hyper2kvm --shell /usr/sbin/nologin hyperfarm
fi
if command -v systemd-tmpfiles >/dev/null; then
    systemd-tmpfiles --create hyperfarm.conf
fi

if [ $systemd_up = yes ]; then
    [ $changed -eq 0 ] || systemctl daemon-reload
    if [ "$(systemctl is-enabled hyper2kvm-agent.service 2>/dev/null || true)" != enabled ]; then
        systemctl enable hyper2kvm-agent.service hyper2kvm-agent.target >/dev/null 2>&1
        echo "enabled hyper2kvm-agent.service"
        changed=$((changed + 1))
    fi
    if [ $start = yes ]; then
        if [ "$(systemctl is-active hyper2kvm-agent.service || true)" != active ]; then
            systemctl start hyper2kvm-agent.target hyper2kvm-agent.service
            echo "started hyper2kvm-agent.service"
            changed=$((changed + 1))
        elif [ $changed -gt 0 ]; then
            systemctl try-restart hyper2kvm-agent.service 'hyper2kvm-agent@*.service'
            echo "restarted the running agents (files changed)"
        fi
    fi
fi
if [ $changed -eq 0 ]; then
    echo "hyperfarm is installed and up to date: nothing changed"
else
    echo "hyperfarm installed: $changed change(s)"
fi
