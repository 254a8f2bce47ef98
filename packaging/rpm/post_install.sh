# hyperfarm: create the agent's user and directories; enable and start on first installation,
# restart what runs on upgrade ($1: 1 = install, 2 = upgrade).
systemd-sysusers hyperfarm.conf
systemd-tmpfiles --create hyperfarm.conf
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    if [ "$1" -eq 1 ]; then
        systemctl enable hyper2kvm-agent.service hyper2kvm-agent.target >/dev/null
        systemctl start hyper2kvm-agent.target hyper2kvm-agent.service || :
    else
        systemctl try-restart hyper2kvm-agent.service 'hyper2kvm-agent@*.service' hyperexport-serve.service || :
    fi
fi
