"""The dashboard in real headless Chromium (Debian's chromium + chromedriver, driven by selenium).

Run by tests/web/run.sh, which starts a real agent and hyperexport serve. Screenshots go to the
directory given with --shots. Each step asserts; any failure exits non-zero with the page's text.
"""
import argparse
import json
import os
import sys
import time
import urllib.request

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

p = argparse.ArgumentParser()
p.add_argument("--url", required=True)
p.add_argument("--vm", required=True, help="a VM that converts")
p.add_argument("--bad-vm", required=True, help="a file that is not a VM")
p.add_argument("--output", required=True, help="the agent's output directory")
p.add_argument("--idle-queue", required=True, help="a queue no agent watches")
p.add_argument("--idle-output", required=True)
p.add_argument("--shots", required=True)
a = p.parse_args()
os.makedirs(a.shots, exist_ok=True)
BASE = a.url.rstrip("/")


def api(method, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(BASE + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


opts = webdriver.ChromeOptions()
opts.binary_location = "/usr/bin/chromium"
for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,900"):
    opts.add_argument(arg)
driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
driver.set_page_load_timeout(30)


def shot(name):
    path = os.path.join(a.shots, name + ".png")
    driver.save_screenshot(path)
    print(f"screenshot {path}")


def wait(what, cond, limit=90):
    start = time.time()
    while time.time() - start < limit:
        try:
            v = cond()
            if v:
                return v
        except Exception:  # the page is reloading
            pass
        time.sleep(0.2)
    shot("timeout")
    raise SystemExit(f"FAIL: timed out waiting for {what}; page text:\n{driver.find_element(By.TAG_NAME, 'body').text}")


def state():
    return driver.find_element(By.CSS_SELECTOR, "section.detail .state").text


def step(msg):
    print(f"== {msg}", flush=True)


try:
    step("submit through the form, with the daemon section; watch the job reach done and show its qcow2")
    driver.get(BASE + "/submit")
    daemon = driver.find_element(By.ID, "hyper2kvm_daemon")
    section = driver.find_element(By.ID, "daemon-section")
    assert daemon.is_selected() and section.is_displayed()
    daemon.click()
    assert not section.is_displayed(), "the daemon section hides when the daemon phase is off"
    daemon.click()
    assert section.is_displayed()
    driver.find_element(By.ID, "vm_path").send_keys(a.vm)
    driver.find_element(By.ID, "name").send_keys("browser-job")
    driver.find_element(By.ID, "hyper2kvm_poll_interval").send_keys("1")
    driver.find_element(By.ID, "hyper2kvm_daemon_timeout").send_keys("5")
    shot("01-form")
    driver.find_element(By.ID, "submit").click()
    wait("the job page", lambda: "/jobs/" in driver.current_url)
    wait("done", lambda: state() == "done")
    wait("the result path", lambda: driver.find_elements(By.CSS_SELECTOR, "code.result"))
    result = driver.find_element(By.CSS_SELECTOR, "code.result").text
    expected = os.path.join(a.output, os.path.splitext(os.path.basename(a.vm))[0] + ".qcow2")
    assert result == expected, f"{result!r} != {expected!r}"
    assert os.path.isfile(expected)
    shot("02-done")

    step("a validation error is shown, naming the field, and corrected")
    driver.get(BASE + "/submit")
    driver.find_element(By.ID, "vm_path").send_keys("/nonexistent/vm.ova")
    driver.find_element(By.ID, "submit").click()
    err = wait("the form's error", lambda: driver.find_element(By.ID, "form-error").text)
    assert "vm_path" in err, err
    shot("03-validation-error")
    box = driver.find_element(By.ID, "vm_path")
    box.clear()
    box.send_keys(a.vm)
    driver.find_element(By.ID, "vm_name").send_keys("corrected")
    driver.find_element(By.ID, "submit").click()
    wait("the corrected job's page", lambda: "/jobs/" in driver.current_url)
    wait("the corrected job done", lambda: state() == "done")

    step("a failing job shows its error")
    driver.get(BASE + "/submit")
    driver.find_element(By.ID, "vm_path").send_keys(a.bad_vm)
    driver.find_element(By.ID, "submit").click()
    wait("the job page", lambda: "/jobs/" in driver.current_url)
    wait("failed", lambda: state() == "failed")
    text = wait("the error text", lambda: driver.find_element(By.CSS_SELECTOR, "pre.error").text)
    assert os.path.basename(a.bad_vm) in text, text
    shot("04-failed")

    step("the job list updates live (server-sent events), without a reload")
    st, body = api("POST", "/api/v1/jobs", {"name": "live", "vm_path": a.vm, "options": {
        "enable_pipeline": True, "hyper2kvm_daemon": True, "hyper2kvm_watch_dir": a.idle_queue,
        "hyper2kvm_output_dir": a.idle_output, "hyper2kvm_poll_interval": 1, "hyper2kvm_daemon_timeout": 5}})
    assert st == 201, body
    live = body["jobs"][0]["id"]
    driver.get(BASE + "/")
    row = f'tr[data-job="{live}"] .state'
    wait("the live job queued", lambda: driver.find_element(By.CSS_SELECTOR, row).text == "queued")
    driver.execute_script("window.__marker = 42;")
    st, body = api("POST", f"/api/v1/jobs/{live}/cancel")
    assert st == 202, body
    wait("the row turns cancelled", lambda: driver.find_element(By.CSS_SELECTOR, row).text == "cancelled")
    assert driver.execute_script("return window.__marker;") == 42, "the page was reloaded instead of updated"
    shot("05-list-live")

    step("a cancel from the page stops the job")
    st, body = api("POST", "/api/v1/jobs", {"name": "to-cancel", "vm_path": a.vm, "options": {
        "enable_pipeline": True, "hyper2kvm_daemon": True, "hyper2kvm_watch_dir": a.idle_queue,
        "hyper2kvm_output_dir": a.idle_output, "hyper2kvm_poll_interval": 1, "hyper2kvm_daemon_timeout": 5}})
    jid = body["jobs"][0]["id"]
    driver.get(BASE + f"/jobs/{jid}")
    wait("queued", lambda: state() == "queued")
    driver.find_element(By.ID, "cancel").click()
    wait("cancelled", lambda: state() == "cancelled")
    qjob = os.path.join(a.idle_queue, "cancelled", body["jobs"][0]["queue_job_id"])
    assert os.path.isdir(qjob), f"the queue job was not withdrawn: {qjob}"
    shot("06-cancelled")

    step("agents and queue page")
    driver.get(BASE + "/agents")
    text = driver.find_element(By.TAG_NAME, "body").text
    assert "default" in text and "done" in text, text
    shot("07-agents")

    step("narrow screen: no horizontal scrolling")
    driver.set_window_size(390, 844)
    for path in ("/", f"/jobs/{jid}", "/submit"):
        driver.get(BASE + path)
        over = driver.execute_script("return document.documentElement.scrollWidth - window.innerWidth;")
        assert over <= 0, f"{path} scrolls sideways by {over}px on a narrow screen"
    driver.get(BASE + "/")
    shot("08-narrow")

    step("the lists read without JavaScript (server-rendered)")
    html = urllib.request.urlopen(BASE + "/", timeout=30).read().decode()
    assert "browser-job" in html and "s-done" in html and "s-cancelled" in html
    print("dashboard: all steps passed")
finally:
    driver.quit()
