# hyperfarm: after removal ($1 = 0) the cache goes; the queue, the output and the user stay
# unless asked (HYPERFARM_PURGE_STATE=yes, HYPERFARM_PURGE_USER=yes), as with the .deb's purge.
if [ "$1" -eq 0 ]; then
    [ -d /run/systemd/system ] && systemctl daemon-reload || :
    rm -rf /var/cache/hyperfarm
    if [ "${HYPERFARM_PURGE_STATE:-no}" = yes ]; then rm -rf /var/lib/hyper2kvm; fi
    if [ "${HYPERFARM_PURGE_USER:-no}" = yes ]; then
        getent passwd hyperfarm >/dev/null && userdel hyperfarm || :
        getent group hyperfarm >/dev/null && groupdel hyperfarm || :
    fi
fi
