"""The dashboard driven in a real headless Chromium (Debian's chromium + chromium-driver, through Selenium) against a
real `python -m worker web` and a real worker: log in, see a queue, open a failed job, retry it and see it run,
pause and resume a queue, and a hostile argument that stays text. `UPDATE_SCREENSHOT=1` saves docs/dashboard.png.

In CI (CI=true) a missing browser fails the test: the CI script installs it. Elsewhere it is skipped with the reason.
"""
import json
import os
import shutil
import tempfile
import time

import pytest

from tests.conftest import REPO
from tests.support import free_port, wait_until
from worker.keys import Keys

K = Keys("worker")
PASSWORD = "browser-test-password"
HOSTILE = "<img src=x onerror=alert(1)>"
CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
MODULES = "worker.sample,tests.jobs,tests.jobs_dashboard"


def _need_browser():
    missing = [p for p in (CHROMIUM, DRIVER) if not os.path.exists(p)]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install -r requirements-dev.txt)")
    if missing:
        why = f"needs {', '.join(missing)} (apt-get install chromium chromium-driver)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true and the browser test {why}: .ci/run installs them")
        pytest.skip(why)


@pytest.fixture
def browser():
    _need_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="dash-chromium-")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                "--window-size=1400,1000", f"--user-data-dir={profile}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _click(driver, xpath):
    """Click and wait for the page it leads to (a form's POST-redirect-GET included)."""
    from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    el = driver.find_element(By.XPATH, xpath)
    el.click()

    def gone(_):
        try:
            el.is_enabled()
            return False
        except StaleElementReferenceException:
            return True
        except WebDriverException as exc:  # Chromium, mid-navigation: "Node with given id does not belong to the
            if "does not belong to the document" in str(exc):  # document" (seen once in a full run) is gone too
                return True
            raise

    WebDriverWait(driver, 15).until(gone)


@pytest.mark.timeout(180)
def test_a_person_logs_in_retries_a_failed_job_pauses_a_queue_and_sees_hostile_text(r, spawn, cli, browser,
                                                                                     tmp_path):
    from selenium.webdriver.common.by import By
    port = free_port()
    worker = spawn(QUEUES="default", JOB_MODULES=MODULES, LOG_LEVEL="INFO")
    web = spawn("web", PORT=port, DASHBOARD_PASSWORD=PASSWORD, JOB_MODULES=MODULES)
    web.wait_for(r"dashboard on http://0\.0\.0\.0:%d/" % port, timeout=30)
    assert cli("enqueue", "fail_once", "--args", '["ev"]', JOB_MODULES=MODULES).returncode == 0
    wait_until(lambda: r.zcard(K.failed) == 1, 30, "the job to fail")
    failed_id = r.zrange(K.failed, 0, 0)[0]
    held = cli("enqueue", "push", "--queue", "held", "--args", json.dumps(["out", HOSTILE]), JOB_MODULES=MODULES)
    assert held.returncode == 0, held.stderr

    base = f"http://127.0.0.1:{port}"
    browser.get(f"http://admin:{PASSWORD}@127.0.0.1:{port}/")  # log in (HTTP Basic; the browser keeps it)
    browser.get(base + "/")
    assert browser.find_element(By.TAG_NAME, "h1").text == "Overview"

    # see a queue, with the hostile argument as text
    _click(browser, "//a[text()='held']")
    assert browser.find_element(By.TAG_NAME, "h1").text == "Queue held"
    assert HOSTILE in browser.find_element(By.TAG_NAME, "table").text
    assert browser.find_elements(By.CSS_SELECTOR, "main img") == []
    alerts = browser.execute_script("return typeof window.__alerted")  # nothing ran: no dialog is open either
    assert alerts == "undefined"

    # open the failed job, retry it, see it run
    _click(browser, "//nav/a[starts-with(normalize-space(.), 'Failed')]")
    assert browser.find_element(By.TAG_NAME, "h1").text == "Failed jobs"
    _click(browser, f"//a[text()='{failed_id}']")
    assert "first run fails <b>on purpose</b>" in browser.find_element(By.TAG_NAME, "main").text
    _click(browser, "//button[text()='Retry']")
    assert "retried 1 failed job(s)" in browser.find_element(By.CLASS_NAME, "flash").text
    assert json.loads(r.blpop("ev", 30)[1])["event"] == "done"

    def shown_status():
        browser.get(f"{base}/jobs/{failed_id}")
        return browser.find_element(By.CSS_SELECTOR, '[data-live="status"]').text == "done"
    wait_until(shown_status, 20, "the job page to show done")

    # pause and resume a queue from the overview
    browser.get(base + "/")
    _click(browser, "//a[text()='default']/ancestor::tr//button[text()='Pause']")
    assert "paused queue default" in browser.find_element(By.CLASS_NAME, "flash").text
    assert r.smembers(K.paused) == {"default"}
    wait_until(lambda: b'"state"' and r.hget(K.worker(_worker_name(r)), "state") == "paused", 15, "worker paused")
    _click(browser, "//a[text()='default']/ancestor::tr//button[text()='Resume']")
    assert not r.smembers(K.paused)

    # live figures: the page polls its JSON twin while visible
    browser.get(base + "/")
    wait_until(lambda: browser.find_element(By.TAG_NAME, "body").get_attribute("data-polled"), 15, "a live poll")
    # the README's screenshot: refreshed on request only, so a test run never dirties the checkout
    shot = REPO / "docs" / "dashboard.png" if os.environ.get("UPDATE_SCREENSHOT") == "1" else tmp_path / "dashboard.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 0
    worker.signal(15)
    assert worker.wait(15) == 0


def _worker_name(r):
    return r.zrange(K.workers, 0, 0)[0]
