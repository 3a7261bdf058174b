"""Fixtures of the console's browser tests: the API of the router under test, the data the tests
need (made through that API), and Chromium pages that sign in through the console's own form.

Run by .ci/console, which starts `picloud-router dev` and passes its URL and admin token in
PICLOUD_URL and PICLOUD_TOKEN; PICLOUD_CONSOLE_SCREENSHOTS names where screenshots go and
PICLOUD_CHROMIUM the browser (Debian's /usr/bin/chromium by default).
"""

import html.parser
import json
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

import pytest
from playwright.sync_api import expect, sync_playwright

BASE = os.environ["PICLOUD_URL"].rstrip("/")
ADMIN_TOKEN = os.environ["PICLOUD_TOKEN"]
APP = "demo"
CHROMIUM = os.environ.get("PICLOUD_CHROMIUM", "/usr/bin/chromium")
# How long an outcome may take to show (a relay's delivery, a page's load): generous for a busy
# 2-core machine, and only ever waited in full when something is broken.
TIMEOUT_S = 20

expect.set_options(timeout=TIMEOUT_S * 1000)


def console_url(path=""):
    """The console's URL of `path` (relative to /console)."""
    return f"{BASE}/console{path}"


def app_url(path=""):
    """The console's URL of `path` under the app's pages."""
    return console_url(f"/apps/{APP}{path}")


def wait_until(what, check, timeout=TIMEOUT_S):
    """Polls `check` until it returns something truthy, which it returns; fails naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)


class Api:
    """The router's HTTP API, as one bearer token."""

    def __init__(self, token):
        self.token = token

    def call(self, method, path, body=None):
        """(status, parsed JSON or None) of one request."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{BASE}{path}", data=data, method=method)
        request.add_header("Authorization", f"Bearer {self.token}")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
                status, text = response.status, response.read()
        except urllib.error.HTTPError as e:
            status, text = e.code, e.read()
        return status, (json.loads(text) if text else None)

    def ok(self, method, path, body=None):
        status, answer = self.call(method, path, body)
        assert 200 <= status < 300, f"{method} {path} answered {status}: {answer}"
        return answer

    def get(self, path):
        return self.ok("GET", path)

    def post(self, path, body=None):
        return self.ok("POST", path, body)

    def dead_letters(self, trigger=None, resolution="unresolved"):
        """The app's dead letters (newest first) of `trigger`, with `resolution`."""
        query = {"limit": 500}
        if trigger:
            query["trigger"] = trigger
        if resolution:
            query["resolution"] = resolution
        return self.get(f"/v1/apps/{APP}/dead-letters?{urllib.parse.urlencode(query)}")["items"]

    def dead_letter(self, dead_letter_id):
        return self.get(f"/v1/apps/{APP}/dead-letters/{dead_letter_id}")

    def unresolved_count(self):
        return self.get(f"/v1/apps/{APP}/dead-letters/count?resolution=unresolved")["count"]

    def enqueue(self, queue, payload, **options):
        """The id of a new job on `queue` (its delivery's id: a queue has one trigger)."""
        return self.post(f"/v1/apps/{APP}/queues/{queue}/jobs", {"payload": payload, **options})["id"]

    def ensure_trigger(self, spec):
        """Registers `spec`, or leaves the trigger of its name as it is (a rerun on one dev)."""
        status, answer = self.call("POST", f"/v1/apps/{APP}/triggers", spec)
        assert status in (201, 409), f"registering {spec['name']} answered {status}: {answer}"

    def settled(self, read):
        """Calls `read(value)` with the app's unresolved dead-letter count, until the count was
        the same before and after `read` (replays and jobs of other tests may still be dying);
        returns what `read` returned then, with the count."""
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            before = self.unresolved_count()
            shown = read()
            after = self.unresolved_count()
            if before == after or time.monotonic() >= deadline:
                return shown, after
            time.sleep(0.2)


@dataclass
class World:
    """What the set-up made."""

    viewer_token: str
    # Unresolved dead letters of `work` and of `other` (ids, newest first) right after set-up.
    work_dead: list
    other_dead: list
    # A job of `work` due in an hour: a scheduled delivery on the trigger page.
    scheduled: str
    # A job of `slow` that failed once and waits an hour for its second attempt.
    retrying: str


@pytest.fixture(scope="session")
def api():
    return Api(ADMIN_TOKEN)


@pytest.fixture(scope="session")
def world(api):
    """A viewer and its token; dead letters of two queue triggers nobody serves (`work`, `other`,
    one attempt each); a scheduled delivery of `work`; a retrying delivery of `slow`."""
    viewer = api.post("/v1/principals", {"name": "viewer"})
    api.ok("PUT", f"/v1/apps/{APP}/members/{viewer['id']}", {"role": "viewer"})
    viewer_token = api.post("/v1/tokens", {"principal_id": viewer["id"]})["token"]

    for name, queue in (("work", "jobs"), ("other", "other")):
        api.ensure_trigger({"name": name, "kind": "queue", "queue": queue,
                            "handler": {"function": "worker"}, "retry": {"max_attempts": 1}})
    hour = 3_600_000
    api.ensure_trigger({"name": "slow", "kind": "queue", "queue": "slow", "handler": {"function": "worker"},
                        "retry": {"max_attempts": 5, "backoff_base_ms": hour, "backoff_max_ms": hour}})

    work_jobs = [api.enqueue("jobs", {"n": n}) for n in range(1, 5)]
    other_jobs = [api.enqueue("other", {"n": n, "other": True}) for n in range(1, 4)]
    scheduled = api.enqueue("jobs", {"n": "later"}, delay_ms=hour)
    retrying = api.enqueue("slow", {"n": "slow"})

    def dead_of(trigger, jobs):
        dead = api.dead_letters(trigger)
        return dead if {d["delivery_id"] for d in dead} >= set(jobs) else None

    work_dead = wait_until("the jobs of work to be dead letters", lambda: dead_of("work", work_jobs))
    other_dead = wait_until("the jobs of other to be dead letters", lambda: dead_of("other", other_jobs))
    wait_until("the job of slow to fail once",
               lambda: api.get(f"/v1/apps/{APP}/deliveries/{retrying}")["attempt_history"])
    return World(viewer_token=viewer_token, work_dead=[d["id"] for d in work_dead],
                 other_dead=[d["id"] for d in other_dead], scheduled=scheduled, retrying=retrying)


@pytest.fixture(scope="session")
def browser():
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        yield browser
        browser.close()


@dataclass
class Console:
    """Opens Chromium pages on the console, each in a context of its own (its own cookies), and
    records every console error and uncaught exception of them: a test that saw any fails."""

    browser: object
    errors: list = field(default_factory=list)
    allowed: list = field(default_factory=list)
    contexts: list = field(default_factory=list)

    def page(self, width=1280, height=800):
        context = self.browser.new_context(viewport={"width": width, "height": height})
        context.set_default_timeout(TIMEOUT_S * 1000)
        self.contexts.append(context)
        page = context.new_page()
        page.on("console", lambda m: m.type == "error" and self._error(
            page, f"console: {m.text} (at {m.location.get('url')})"))
        page.on("pageerror", lambda e: self._error(page, f"uncaught: {e}"))
        # A confirm() before a destructive action is the user's to accept.
        page.on("dialog", lambda dialog: dialog.accept())
        return page

    def signed_in(self, token=ADMIN_TOKEN, width=1280, height=800):
        """A page signed in with `token` through the sign-in form, on the apps page."""
        page = self.page(width, height)
        page.goto(console_url("/login"))
        page.locator("form#login input[name=token]").fill(token)
        page.locator("form#login button").click()
        page.wait_for_url(console_url())
        return page

    def allow(self, pattern):
        """Lets console errors matching `pattern` (a regular expression) pass."""
        self.allowed.append(re.compile(pattern))

    def _error(self, page, text):
        if not any(p.search(text) for p in self.allowed):
            self.errors.append(f"{page.url}: {text}")

    def close(self):
        for context in self.contexts:
            context.close()


@pytest.fixture
def console(browser, request):
    console = Console(browser)
    yield console
    console.close()
    # Only a test that passed is failed for its pages' errors (a failed one already says more).
    report = getattr(request.node, "report_call", None)
    if console.errors and report is not None and report.passed:
        pytest.fail("the pages logged errors:\n" + "\n".join(console.errors))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "call":
        item.report_call = report
    return report


@pytest.fixture(scope="session")
def screenshots():
    """Where screenshots go (.ci/console names a temporary folder unless asked for docs/)."""
    folder = os.environ.get("PICLOUD_CONSOLE_SCREENSHOTS")
    if not folder:
        pytest.skip("PICLOUD_CONSOLE_SCREENSHOTS is not set")
    os.makedirs(folder, exist_ok=True)
    return folder


class _Errors(html.parser.HTMLParser):
    """The text of every element whose class includes `error`."""

    def __init__(self):
        super().__init__()
        self.stack = []  # per open element: whether it is an error
        self.texts = []

    def handle_starttag(self, tag, attrs):
        if tag in ("br", "hr", "img", "input", "meta", "link", "area", "base", "col", "embed",
                   "source", "track", "wbr"):
            return
        classes = (dict(attrs).get("class") or "").split()
        self.stack.append("error" in classes)
        if self.stack[-1]:
            self.texts.append("")

    def handle_endtag(self, tag):
        if self.stack:
            self.stack.pop()

    def handle_data(self, data):
        if any(self.stack):
            self.texts[-1] += data


def error_texts(page_html):
    """The texts of the `.error` elements of `page_html`, stripped."""
    parser = _Errors()
    parser.feed(page_html)
    return [" ".join(t.split()) for t in parser.texts]
