# hyperfarm: stop every agent instance on removal ($1 = 0), not on upgrade.
if [ "$1" -eq 0 ] && [ -d /run/systemd/system ]; then
    systemctl stop hyper2kvm-agent.target hyper2kvm-agent.service 'hyper2kvm-agent@*.service' hyperexport-serve.service || :
    systemctl disable hyper2kvm-agent.service hyper2kvm-agent.target hyperexport-serve.service >/dev/null 2>&1 || :
fi
