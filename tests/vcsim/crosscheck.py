#!/usr/bin/env python3
"""An independent vSphere client (pyvmomi) checks the simulator hyperfarm's vSphere tests use.

Usage: crosscheck.py URL CA_FILE USER PASSWORD VM_NAME DISK_FILE...

Checks, and prints one JSON object with what it saw:
- login with the password works, with a wrong one fails with InvalidLogin;
- the VM is found by name, with its CPUs, memory, firmware, disks and NICs;
- ExportVm gives a lease that becomes ready, whose device URLs download exactly DISK_FILE...
  (sha256 compared), and HttpNfcLeaseComplete is accepted;
- ExportVm of the powered-on VM 'running-vm' is refused with InvalidPowerState.
Exits 1 with a message on the first check that fails.
"""

import hashlib
import json
import ssl
import sys
import time
import urllib.parse
import urllib.request

from pyVim.connect import Disconnect, SmartConnect
from pyVmomi import vim


def fail(msg):
    print(f"crosscheck: {msg}", file=sys.stderr)
    sys.exit(1)


def main():
    url, ca, user, password, vm_name, *disks = sys.argv[1:]
    u = urllib.parse.urlparse(url)
    ctx = ssl.create_default_context(cafile=ca)
    try:
        SmartConnect(host=u.hostname, port=u.port, user=user, pwd=password + "-wrong", sslContext=ctx)
        fail("a wrong password was accepted")
    except vim.fault.InvalidLogin:
        pass
    si = SmartConnect(host=u.hostname, port=u.port, user=user, pwd=password, sslContext=ctx)
    content = si.RetrieveContent()
    view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
    vms = {vm.name: vm for vm in view.view}
    if vm_name not in vms:
        fail(f"VM {vm_name} not in the inventory: {sorted(vms)}")
    vm = vms[vm_name]
    hw = vm.config.hardware
    vdisks = [d for d in hw.device if isinstance(d, vim.vm.device.VirtualDisk)]
    nics = [d for d in hw.device if isinstance(d, vim.vm.device.VirtualEthernetCard)]
    seen = {
        "cpus": hw.numCPU,
        "memory_mb": hw.memoryMB,
        "firmware": vm.config.firmware,
        "power": str(vm.runtime.powerState),
        "disks": len(vdisks),
        "nics": [{"mac": n.macAddress, "type": type(n).__name__.split(".")[-1]} for n in nics],
    }

    lease = vm.ExportVm()
    for _ in range(100):
        if lease.state != vim.HttpNfcLease.State.initializing:
            break
        time.sleep(0.1)
    if lease.state != vim.HttpNfcLease.State.ready:
        fail(f"the lease is {lease.state}, not ready: {lease.error}")
    urls = [d for d in lease.info.deviceUrl if d.disk]
    if len(urls) != len(disks):
        fail(f"the lease has {len(urls)} disk URLs, the VM was given {len(disks)} disks")
    # The lease's order is not the VM's (vSphere does not promise it): compare as sets, and check
    # each URL's key names a disk of the VM by controller and unit.
    got = []
    for dev in urls:
        target = dev.url.replace("*", u.netloc)
        with urllib.request.urlopen(target, context=ctx) as r:
            got.append(hashlib.sha256(r.read()).hexdigest())
    want = []
    for path in disks:
        with open(path, "rb") as f:
            want.append(hashlib.sha256(f.read()).hexdigest())
    if sorted(got) != sorted(want):
        fail(f"downloaded sha256 {sorted(got)}, the disks given were {sorted(want)}")
    controllers = {d.key: d for d in hw.device if isinstance(d, vim.vm.device.VirtualController)}
    slots = {f"{type(controllers[d.controllerKey]).__name__.split('.')[-1]}{controllers[d.controllerKey].busNumber}:{d.unitNumber}" for d in vdisks}
    for dev in urls:
        if dev.key.rsplit("/", 1)[-1] not in slots:
            fail(f"the lease's key {dev.key} names no disk of the VM ({sorted(slots)})")
    digests = got
    lease.HttpNfcLeaseProgress(100)
    lease.HttpNfcLeaseComplete()
    seen["downloaded_sha256"] = digests

    running = vms.get("running-vm")
    if running is not None:
        try:
            running.ExportVm()
            fail("ExportVm of a powered-on VM was accepted")
        except vim.fault.InvalidPowerState:
            seen["powered_on_refused"] = True
    view.Destroy()
    Disconnect(si)
    print(json.dumps(seen))


if __name__ == "__main__":
    main()
