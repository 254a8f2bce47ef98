"""Submit one export to a hyperexport serve on this host and wait for its end (deployment tests).

usage: python3 serve-job.py VM_PATH NAME [VM_NAME] [TIMEOUT_MINUTES]
       (or python3 - ARGS < serve-job.py, inside a container)
Daemon mode; the serve at $HYPEREXPORT_SERVE_URL (default http://127.0.0.1:8470); the request's
"provider" from $HYPEREXPORT_SERVE_PROVIDER (local, vsphere; unset: serve's default). Prints the
job as JSON, with its log lines joined in "log". Standard library only.
"""
import json
import os
import sys
import time
import urllib.request

base = os.environ.get("HYPEREXPORT_SERVE_URL", "http://127.0.0.1:8470").rstrip("/")
vm, name = sys.argv[1], sys.argv[2]
vm_name = sys.argv[3] if len(sys.argv) > 3 and sys.argv[3] else None
timeout_min = int(sys.argv[4]) if len(sys.argv) > 4 else 10
request = {"name": name, "vm_path": vm, "options": {
    "enable_pipeline": True, "hyper2kvm_daemon": True, "hyper2kvm_poll_interval": 1,
    "hyper2kvm_daemon_timeout": timeout_min}}
if vm_name:
    request["vm_name"] = vm_name
if os.environ.get("HYPEREXPORT_SERVE_PROVIDER"):
    request["provider"] = os.environ["HYPEREXPORT_SERVE_PROVIDER"]
req = urllib.request.Request(base + "/api/v1/jobs", data=json.dumps(request).encode(),
                             headers={"Content-Type": "application/json"})
job = json.load(urllib.request.urlopen(req, timeout=10))["jobs"][0]
deadline = time.time() + timeout_min * 60 + 30
while time.time() < deadline:
    job = json.load(urllib.request.urlopen(base + "/api/v1/jobs/" + job["id"], timeout=10))
    if job["state"] in ("done", "failed", "cancelled", "interrupted"):
        break
    time.sleep(0.3)
log = json.load(urllib.request.urlopen(base + "/api/v1/jobs/" + job["id"] + "/log?lines=200", timeout=10))
job["log"] = "\n".join(line["line"] for line in log["lines"])
print(json.dumps(job))
