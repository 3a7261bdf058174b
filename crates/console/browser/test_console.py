"""The console in a real Chromium, against a `picloud-router dev` (.ci/console runs these).

Each test names what it checks. The data comes from conftest's `world`: dead letters of the
queue triggers `work` and `other`, a scheduled delivery of `work`, a retrying one of `slow`, and
a viewer. Tests that change dead letters pick their own, so that the order they run in does not
matter.
"""

import os
import re

import pytest

from conftest import ADMIN_TOKEN, APP, app_url, console_url, error_texts, wait_until
from playwright.sync_api import expect

PHONE = 390


def submit(form):
    """Clicks the submit button of `form` (a locator) and waits for the page it leads to."""
    page = form.page
    with page.expect_navigation():
        form.locator("button, input[type=submit]").first.click()


def only_logout_form(page, allowed=()):
    """Asserts that the page's only form is the sign-out form, but for the GET forms whose ids are
    `allowed` (a filter is no action)."""
    expect(page.locator("form#logout")).to_have_count(1)
    forms = page.locator("form").evaluate_all(
        "forms => forms.map(f => ({id: f.id, cls: f.className, method: f.method, action: f.getAttribute('action')}))")
    others = [f for f in forms if f["id"] != "logout" and not (f["id"] in allowed and f["method"] == "get")]
    assert not others, f"{page.url} shows a viewer forms besides #logout: {others}"


def text_of(locator):
    return " ".join(locator.inner_text().split())


def test_signing_in_with_the_admin_token_lists_the_app_with_its_unresolved_dead_letter_count(console, api, world):
    page = console.signed_in()
    row = page.locator(f'table#apps tr[data-app="{APP}"]')
    expect(row).to_be_visible()
    expect(row.locator(f'a[href$="/console/apps/{APP}"]')).to_have_count(1)
    expect(row.locator("[data-backlog]")).to_have_count(1)

    def badge():
        page.reload()
        return text_of(row.locator("[data-dead-letters]"))

    shown, count = api.settled(badge)
    assert count > 0
    assert shown == str(count), f"the apps page shows {shown!r} unresolved dead letters; the API counts {count}"

    row.locator(f'a[href$="/console/apps/{APP}"]').click()
    page.wait_for_url(app_url())
    expect(page.locator("table#triggers")).to_be_visible()


def test_a_bad_token_is_refused_with_an_error_and_no_session(console):
    # The refusal is a 401 page, which Chromium logs as a failed load.
    console.allow(r"Failed to load resource: the server responded with a status of 401")
    page = console.page()
    page.goto(console_url("/login"))
    token_field = page.locator("form#login input[name=token]")
    assert token_field.get_attribute("type") == "password"
    bad = "pcr_" + "x" * 40
    token_field.fill(bad)
    with page.expect_navigation():
        page.locator("form#login button").click()
    expect(page.locator(".error").first).to_be_visible()
    assert text_of(page.locator(".error").first), "the .error of a refused sign-in is empty"
    expect(page.locator("form#login")).to_be_visible()
    assert not any(c["value"] == bad for c in page.context.cookies()), "the refused token is kept in a cookie"
    page.goto(console_url())
    page.wait_for_url(console_url("/login"))
    expect(page.locator("table#apps")).to_have_count(0)


def test_signing_out_ends_the_session(console):
    page = console.signed_in()
    submit(page.locator("form#logout"))
    page.wait_for_url(console_url("/login"))
    page.goto(app_url())
    page.wait_for_url(console_url("/login"))


def test_the_app_overview_lists_the_triggers_with_admin_actions_and_a_dead_letter_badge(console, api, world):
    page = console.signed_in()
    page.goto(app_url())
    row = page.locator('table#triggers tr[data-trigger="work"]')
    expect(row).to_be_visible()
    expect(row.locator("form.toggle-trigger")).to_have_count(1)
    expect(row.locator("form.toggle-trigger button")).to_have_text(re.compile(r"^\s*Disable\s*$"))
    expect(row.locator("form.delete-trigger")).to_have_count(1)
    expect(page.locator(f'a[href$="/console/apps/{APP}/abandoned"]').first).to_be_visible()
    dead_link = page.locator(f'a[href$="/console/apps/{APP}/dead-letters"]').first
    expect(dead_link).to_be_visible()

    def badge():
        page.reload()
        return text_of(page.locator("#dead-letter-badge"))

    shown, count = api.settled(badge)
    assert shown == str(count), f"#dead-letter-badge shows {shown!r}; the API counts {count} unresolved"

    dead_link.click()
    page.wait_for_url(app_url("/dead-letters") + "*")
    expect(page.locator("table#dead-letters")).to_be_visible()
    page.goto(app_url())
    page.locator(f'a[href$="/console/apps/{APP}/abandoned"]').first.click()
    page.wait_for_url(app_url("/abandoned") + "*")
    expect(page.locator("table#abandoned")).to_be_attached()


def test_an_admin_disables_enables_and_deletes_a_trigger_from_the_app_overview(console, api, world):
    api.ensure_trigger({"name": "spare", "kind": "queue", "queue": "spare", "handler": {"function": "worker"}})
    api.ok("PATCH", f"/v1/apps/{APP}/triggers/spare", {"enabled": True})
    page = console.signed_in()
    page.goto(app_url())
    row = page.locator('table#triggers tr[data-trigger="spare"]')
    toggle = row.locator("form.toggle-trigger")
    expect(toggle.locator("button")).to_have_text(re.compile(r"^\s*Disable\s*$"))
    submit(toggle)
    assert api.get(f"/v1/apps/{APP}/triggers/spare")["enabled"] is False
    page.goto(app_url())
    expect(toggle.locator("button")).to_have_text(re.compile(r"^\s*Enable\s*$"))
    submit(toggle)
    assert api.get(f"/v1/apps/{APP}/triggers/spare")["enabled"] is True

    page.goto(app_url())
    submit(row.locator("form.delete-trigger"))
    status, _ = api.call("GET", f"/v1/apps/{APP}/triggers/spare")
    assert status == 404, f"the deleted trigger answers {status}"
    page.goto(app_url())
    expect(page.locator('table#triggers tr[data-trigger="work"]')).to_be_visible()
    expect(row).to_have_count(0)


def test_the_trigger_page_charts_each_window_and_lists_deliveries_and_failures(console, api, world):
    page = console.signed_in()
    for window in ("1h", "24h", "7d"):
        page.goto(app_url(f"/triggers/work?window={window}"))
        expect(page.locator("svg#chart-attempts")).to_be_visible()
        expect(page.locator("svg#chart-latency")).to_be_visible()
    scheduled = page.locator(f'table#deliveries tr[data-delivery="{world.scheduled}"]')
    expect(scheduled).to_be_visible()
    expect(scheduled.locator("form.cancel-delivery")).to_have_count(1)
    by_state = page.get_by_role("navigation", name="deliveries by state")
    by_state.get_by_role("link", name="scheduled").click()
    expect(scheduled).to_be_visible()
    by_state.get_by_role("link", name="in flight").click()
    expect(page.locator(f'tr[data-delivery="{world.scheduled}"]')).to_have_count(0)
    page.goto(app_url("/triggers/work"))
    expect(page.locator("table#failures")).to_be_visible()
    # Its newest unresolved dead letter is among its recent failures.
    newest = api.dead_letters("work")[0]["id"]
    page.reload()
    expect(page.locator(f'table#failures [data-dead-letter="{newest}"], table#failures a[href*="{newest}"]')
           .first).to_be_attached()


def test_an_admin_cancels_a_scheduled_delivery_from_the_trigger_page(console, api, world):
    job = api.enqueue("jobs", {"n": "to cancel"}, delay_ms=3_600_000)
    page = console.signed_in()
    page.goto(app_url("/triggers/work"))
    submit(page.locator(f'table#deliveries tr[data-delivery="{job}"] form.cancel-delivery'))
    # A cancelled delivery is a dead letter resolved at once (`ignored`).
    cancelled = wait_until("the cancelled delivery to be a dead letter",
                           lambda: [d for d in api.dead_letters("work", resolution=None) if d["delivery_id"] == job])
    assert cancelled[0]["reason"] == "cancelled"
    status, _ = api.call("GET", f"/v1/apps/{APP}/deliveries/{job}")
    assert status == 404, f"the cancelled delivery is still in the outbox ({status})"
    page.goto(app_url("/triggers/work"))
    expect(page.locator(f'table#deliveries tr[data-delivery="{job}"]')).to_have_count(0)


def test_the_keyboard_reaches_a_cancel_button_and_keeps_it_while_the_deliveries_refresh(console, api, world):
    job = api.enqueue("jobs", {"n": "by keyboard"}, delay_ms=3_600_000)
    page = console.signed_in()
    page.goto(app_url("/triggers/work"))
    button = page.locator(f'table#deliveries tr[data-delivery="{job}"] form.cancel-delivery button')
    expect(button).to_be_visible()
    page.evaluate("() => { window.refreshes = 0;"
                  " document.addEventListener('htmx:beforeRequest', () => { window.refreshes += 1; }); }")
    for _ in range(300):
        page.keyboard.press("Tab")
        if button.evaluate("b => b === document.activeElement"):
            break
    else:
        pytest.fail("Tab never reached the delivery's Cancel button")
    page.wait_for_function("() => window.refreshes > 0", timeout=15_000)
    assert button.evaluate("b => b === document.activeElement"), "a refresh of the deliveries took the focus away"
    with page.expect_navigation():
        page.keyboard.press("Enter")
    wait_until("the delivery cancelled by keyboard to be a dead letter",
               lambda: [d for d in api.dead_letters("work", resolution=None) if d["delivery_id"] == job])


def test_replaying_a_dead_letter_from_its_page_resolves_it_replayed(console, api, world):
    dead = world.work_dead[0]
    assert api.dead_letter(dead)["resolution"] is None
    page = console.signed_in()
    page.goto(app_url("/dead-letters"))
    row = page.locator(f'table#dead-letters tr[data-dead-letter="{dead}"]')
    expect(row).to_be_visible()
    expect(row.locator("form.replay")).to_have_count(1)
    expect(row.locator("form.ignore")).to_have_count(1)
    row.locator(f'a[href$="/dead-letters/{dead}"]').first.click()
    page.wait_for_url(app_url(f"/dead-letters/{dead}"))
    expect(page.locator("pre#payload")).to_contain_text('"n"')
    expect(page.locator("#last-error")).to_have_text(re.compile(r"\S"))
    submit(page.locator("form.replay"))
    wait_until("the dead letter to be replayed", lambda: api.dead_letter(dead)["resolution"] == "replayed")


def test_bulk_ignoring_the_dead_letters_of_one_trigger_after_its_dry_run(console, api, world):
    others = [d["id"] for d in api.dead_letters("other")]
    works = [d["id"] for d in api.dead_letters("work")]
    assert others and works
    page = console.signed_in()
    page.goto(app_url("/dead-letters"))
    filter_form = page.locator("form#dead-letter-filter")
    trigger_field = filter_form.locator("[name=trigger]")
    if trigger_field.evaluate("e => e.tagName") == "SELECT":
        trigger_field.select_option("other")
    else:
        trigger_field.fill("other")
    submit(filter_form)
    assert "trigger=other" in page.url
    expect(page.locator(f'table#dead-letters tr[data-dead-letter="{others[0]}"]')).to_be_visible()
    expect(page.locator(f'table#dead-letters tr[data-dead-letter="{works[0]}"]')).to_have_count(0)

    bulk = page.locator("form#bulk")
    expect(bulk.locator("input[name=trigger]")).to_have_value("other")
    with page.expect_navigation():
        bulk.locator("button[name=action][value=ignore]").click()
    expect(page.locator("#bulk-count")).to_have_text(re.compile(rf"^\s*{len(others)}\s*$"))
    assert api.dead_letters("other") and len(api.dead_letters("other")) == len(others), "the dry run changed something"
    submit(page.locator("form#bulk-confirm"))
    expect(page.locator("#notice")).to_be_visible()
    assert text_of(page.locator("#notice")), "#notice is empty"

    resolutions = {d: api.dead_letter(d)["resolution"] for d in others}
    assert set(resolutions.values()) == {"ignored"}, resolutions
    untouched = {d: api.dead_letter(d)["resolution"] for d in works}
    assert set(untouched.values()) == {None}, untouched


def test_the_live_tail_shows_an_outcome_as_it_happens(console, api, world):
    page = console.signed_in()
    page.goto(app_url("/triggers/work"))
    expect(page.locator("#tail-status")).to_have_text(re.compile(r"^\s*live\s*$"))
    job = api.enqueue("jobs", {"n": "tail"})
    expect(page.locator(f'ol#tail-events li[data-delivery="{job}"]').first).to_be_visible()


def test_a_viewer_sees_no_actions_and_a_forged_action_is_refused(console, api, world):
    dead = world.work_dead[-1]
    assert api.dead_letter(dead)["resolution"] is None
    page = console.signed_in(world.viewer_token)
    only_logout_form(page)
    expect(page.locator(f'table#apps tr[data-app="{APP}"]')).to_be_visible()

    page.goto(app_url())
    expect(page.locator('table#triggers tr[data-trigger="work"]')).to_be_visible()
    only_logout_form(page)
    page.goto(app_url("/triggers/work"))
    expect(page.locator(f'table#deliveries tr[data-delivery="{world.scheduled}"]')).to_be_visible()
    only_logout_form(page)
    page.goto(app_url("/dead-letters"))
    expect(page.locator(f'table#dead-letters tr[data-dead-letter="{dead}"]')).to_be_visible()
    only_logout_form(page, allowed=("dead-letter-filter",))
    page.goto(app_url(f"/dead-letters/{dead}"))
    expect(page.locator("pre#payload")).to_be_visible()
    only_logout_form(page)

    csrf = page.locator("form#logout input[name=csrf]").input_value()
    assert csrf
    response = page.request.post(app_url(f"/dead-letters/{dead}/ignore"), form={"csrf": csrf}, max_redirects=0)
    assert response.status == 403, f"a viewer's ignore answered {response.status}"
    assert any(error_texts(response.text())), "the refusal has no .error saying why"
    assert api.dead_letter(dead)["resolution"] is None, "the viewer's forged ignore changed the dead letter"


def test_an_action_without_the_csrf_token_is_refused(console, api, world):
    dead = world.work_dead[-2]
    assert api.dead_letter(dead)["resolution"] is None
    page = console.signed_in()
    page.goto(app_url(f"/dead-letters/{dead}"))
    expect(page.locator("form.ignore")).to_have_count(1)
    url = app_url(f"/dead-letters/{dead}/ignore")
    for form in ({"note": "no csrf field"}, {"csrf": "pcr_not-the-session-form-token"}):
        response = page.request.post(url, form=form, max_redirects=0)
        assert response.status == 403, f"an ignore with {form} answered {response.status}"
        assert any(error_texts(response.text())), f"the refusal of {form} has no .error saying why"
    assert api.dead_letter(dead)["resolution"] is None, "an ignore without the csrf token changed the dead letter"


def main_pages(world):
    """(name, path, a selector of what it shows) of every main page."""
    return [
        ("apps", "", "table#apps"),
        ("app", f"/apps/{APP}", "table#triggers"),
        ("trigger", f"/apps/{APP}/triggers/work", "svg#chart-attempts"),
        ("dead letters", f"/apps/{APP}/dead-letters", "table#dead-letters"),
        ("dead letter", f"/apps/{APP}/dead-letters/{world.work_dead[-1]}", "pre#payload"),
        ("delivery", f"/apps/{APP}/deliveries/{world.retrying}", "pre#envelope"),
    ]


def test_every_main_page_fits_a_390_pixel_phone_without_scrolling_sideways(console, world):
    page = console.signed_in(width=PHONE, height=844)
    too_wide = []
    for name, path, shows in main_pages(world):
        page.goto(console_url(path))
        expect(page.locator(shows)).to_be_visible()
        width = page.evaluate("document.documentElement.scrollWidth")
        if width > PHONE:
            too_wide.append(f"{name} ({path or '/'}): {width} px")
    assert not too_wide, "pages wider than the phone: " + "; ".join(too_wide)


def test_every_page_loads_at_1280_by_800_without_console_errors(console, world):
    page = console.page()
    page.goto(console_url("/login"))
    expect(page.locator("form#login")).to_be_visible()
    page = console.signed_in()
    pages = main_pages(world) + [
        ("trigger 24h", f"/apps/{APP}/triggers/work?window=24h", "svg#chart-latency"),
        ("trigger 7d", f"/apps/{APP}/triggers/work?window=7d", "svg#chart-latency"),
        ("filtered dead letters", f"/apps/{APP}/dead-letters?resolution=ignored&trigger=other", "table#dead-letters"),
        ("abandoned", f"/apps/{APP}/abandoned", "table#abandoned"),
    ]
    for name, path, shows in pages:
        page.goto(console_url(path))
        expect(page.locator(shows)).to_be_visible()
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 1280, f"{name} is {width} px wide at 1280×800"
    # The retrying delivery's failed attempt.
    page.goto(app_url(f"/deliveries/{world.retrying}"))
    expect(page.locator("ol#attempts > li").first).to_be_visible()
    # The bulk confirmation, left unconfirmed.
    page.goto(app_url("/dead-letters?trigger=work"))
    with page.expect_navigation():
        page.locator("form#bulk button[name=action][value=replay]").click()
    expect(page.locator("#bulk-count")).to_have_text(re.compile(r"^\s*\d+\s*$"))
    expect(page.locator("form#bulk-confirm")).to_be_visible()
    assert not console.errors, "\n".join(console.errors)


def test_signing_in_works_with_the_keyboard_alone(console):
    page = console.page()
    page.goto(console_url("/login"))
    focused_name = "document.activeElement && document.activeElement.getAttribute('name')"
    # Autofocus or not, Tab must reach the field from wherever the focus is.
    page.evaluate("document.activeElement && document.activeElement.blur()")
    for _ in range(15):
        page.keyboard.press("Tab")
        if page.evaluate(focused_name) == "token":
            break
    assert page.evaluate(focused_name) == "token", "Tab never reaches the token field"
    page.keyboard.type(ADMIN_TOKEN)
    with page.expect_navigation():
        page.keyboard.press("Enter")
    page.wait_for_url(console_url())
    expect(page.locator(f'table#apps tr[data-app="{APP}"]')).to_be_visible()


def test_screenshots_of_the_main_pages(console, api, world, screenshots):
    """Not a check of its own: the documented way to regenerate docs/console/*.png
    (`.ci/console --screenshots`); otherwise they go to a temporary folder."""
    page = console.signed_in()
    shots = [
        ("apps.png", ""),
        ("app.png", f"/apps/{APP}"),
        ("dead-letters.png", f"/apps/{APP}/dead-letters"),
        ("delivery.png", f"/apps/{APP}/deliveries/{world.retrying}"),
    ]
    for file, path in shots:
        page.goto(console_url(path))
        page.screenshot(path=os.path.join(screenshots, file), full_page=True)
    page.goto(app_url("/triggers/work"))
    expect(page.locator("#tail-status")).to_have_text(re.compile(r"^\s*live\s*$"))
    job = api.enqueue("jobs", {"n": "screenshot"})
    expect(page.locator(f'ol#tail-events li[data-delivery="{job}"]').first).to_be_visible()
    page.screenshot(path=os.path.join(screenshots, "trigger.png"), full_page=True)

    phone = console.signed_in(width=PHONE, height=844)
    phone.goto(app_url("/dead-letters"))
    phone.screenshot(path=os.path.join(screenshots, "phone-dead-letters.png"), full_page=True)
