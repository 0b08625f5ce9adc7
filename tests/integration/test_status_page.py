"""The status page (``/_admin/ui``) in headless Chromium against a proxy with simulated nodes: it asks for
the token, shows what ``/_admin/status`` says, drains a node on a confirmed click, asks again on a 401,
renders a hostile node name as text, and calls nothing but the admin API."""

from __future__ import annotations

import base64
import json
from urllib.parse import urlsplit

import pytest
import pytest_twisted
import treq
from twisted.internet.threads import deferToThread

from .chromium import Chromium
from .test_admin import TOKEN, call
from .tools import require_program

#: A node name is operator input: this one would run script if the page ever parsed it as HTML.
HOSTILE_NAME = "<img src=x onerror=\"document.title='pwned'\">gpu-<b>c</b>"
TOKEN_KEY = "blyanproxy.adminToken"

#: Every node row of the page, as the test compares it with /_admin/status.
READ_ROWS = """[...document.querySelectorAll('#rows tr[data-node-id]')].map((row) => ({
  id: row.dataset.nodeId,
  name: row.querySelector('[data-column=node] strong').textContent,
  url: row.querySelector('[data-column=node] .url').textContent,
  active: row.querySelector('[data-column=node] .badge.active') !== null,
  badges: [...row.querySelectorAll('[data-column=state] .badge')].map((badge) => badge.textContent),
  ejection: row.querySelector('[data-column=ejection]').textContent,
  inFlight: row.querySelector('[data-column=inFlight]').textContent,
  weight: row.querySelector('[data-column=weight]').textContent,
  tags: [...row.querySelectorAll('[data-column=tags] .tag')].map((tag) => tag.textContent),
  actions: [...row.querySelectorAll('button')].map((button) => button.textContent),
}))"""

BASE_HEADINGS = ["Node", "State", "In flight", "Requests", "Latency", "Last check", "Ejection", "Weight", "Tags"]


def optional_headings(status: dict) -> list:
    """The headings of the columns shown only when some node's status has their field."""
    return [title for field, title in (("engine", "Engine"), ("models", "Models"), ("queue", "Queue"))
            if any(node.get(field) is not None for node in status["nodes"])]


#: Installed before the page's own script runs: records what the Content-Security-Policy refuses.
RECORD_VIOLATIONS = """window.policyViolations = [];
document.addEventListener('securitypolicyviolation', (event) => policyViolations.push(event.violatedDirective));"""


async def fleet_status(proxy) -> dict:
    response, status = await call(proxy, "GET", "/_admin/status")
    assert response.code == 200
    return status


def open_page(browser: Chromium, url: str) -> None:
    """Load the page with network and console events recorded; it shows the token form."""
    for domain in ("Page", "Network", "Runtime"):
        browser.call(f"{domain}.enable")
    browser.call("Page.addScriptToEvaluateOnNewDocument", source=RECORD_VIOLATIONS)
    browser.call("Page.navigate", url=url)
    browser.wait_until("document.readyState === 'complete' && !document.getElementById('login').hidden")


def sign_in(browser: Chromium, token: str, rows: int) -> None:
    """Type the token into the form, send it, and wait for ``rows`` node rows."""
    browser.evaluate("document.getElementById('token').focus()")
    browser.call("Input.insertText", text=token)
    browser.evaluate("document.querySelector('#login button[type=submit]').click()")
    browser.wait_until(f"document.querySelectorAll('#rows tr[data-node-id]').length === {rows}")


def click_and_confirm(browser: Chromium, node_id: str, action: str) -> str:
    """Click a row's action button, accept the confirmation; the question the page asked."""
    clicked = browser.send("Runtime.evaluate", expression=(
        f"document.querySelector('#rows tr[data-node-id=\"{node_id}\"] button[data-action=\"{action}\"]').click()"))
    question = browser.wait_for_event("Page.javascriptDialogOpening")
    browser.call("Page.handleJavaScriptDialog", accept=True)
    browser.answer(clicked)
    return question["message"]


def shown_like_status(rows: list, status: dict) -> None:
    """The rows show the nodes of ``status``, in order: state, drain and ejection, load, weight and tags."""
    assert [row["id"] for row in rows] == [node["id"] for node in status["nodes"]]
    for row, node in zip(rows, status["nodes"]):
        assert (row["name"], row["url"]) == (node["name"], node["baseURL"])
        assert row["active"] == (node["id"] == status["activeId"])
        assert row["badges"][0] == node["state"]
        assert ("draining" in row["badges"]) == node["draining"]
        ejected = node.get("ejected", node["ejectedUntil"] is not None)
        assert ("ejected" in row["badges"]) == ejected
        assert (node["ejectReason"] in row["ejection"]) if ejected else row["ejection"].startswith("–")
        assert ("Undrain" if node["draining"] else "Drain") in row["actions"]
        assert (row["inFlight"], row["weight"], row["tags"]) == (str(node["inFlight"]), str(node["weight"]),
                                                                  node["tags"])


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_the_status_page_shows_the_fleet_and_drains_a_node(devnode_factory, proxy_factory, tmp_path):
    program = require_program("chromium")
    first, second, failing, gone = (devnode_factory(), devnode_factory(), devnode_factory(health_status=503),
                                    devnode_factory())
    # Probes only when the test asks (so no state changes while it compares), ejections that outlast the test.
    proxy = await proxy_factory([first.url, second.url], persist=True, admin_token=TOKEN,
                                state_file=str(tmp_path / "state.json"), eject_cooldown=600.0, eject_cooldown_max=600.0)
    for name, url, tags in ((HOSTILE_NAME, failing.url, ["a100", "eu-west"]), ("gpu-d", gone.url, [])):
        added, _ = await call(proxy, "POST", "/_admin/nodes", {"name": name, "baseURL": url, "tags": tags, "weight": 3})
        assert added.code == 200
    await call(proxy, "POST", "/_admin/health-check")
    await gone.stop()
    refused = await treq.get(proxy.url + "/_devnode/echo?api=gpu-d", timeout=10)  # a refused connection ejects it
    assert refused.code in (502, 503)
    await refused.content()
    status = await fleet_status(proxy)
    assert [node["state"] for node in status["nodes"]] == ["up", "up", "down", "ejected"]
    assert status["nodes"][3]["ejectReason"] == "refused" and status["nodes"][3]["ejectedUntil"]
    await call(proxy, "PUT", "/_admin/active", {"id": status["nodes"][1]["id"]})
    status = await fleet_status(proxy)
    profile = tmp_path / "chromium-profile"
    profile.mkdir()

    browser = await deferToThread(Chromium, program, profile)
    try:
        await deferToThread(open_page, browser, proxy.url + "/_admin/ui")
        await deferToThread(sign_in, browser, TOKEN, 4)
        shown_like_status(await deferToThread(browser.evaluate, READ_ROWS), status)
        headings = await deferToThread(browser.evaluate, "[...document.querySelectorAll('#columns th')]"
                                                         ".map((th) => th.textContent)")
        assert headings == [*BASE_HEADINGS, *optional_headings(status), ""]
        summary = await deferToThread(browser.evaluate, "document.getElementById('summary').textContent")
        assert f"Policy {status['policy']}" in summary and "Active node1" in summary and "Usable 2 of 4" in summary
        assert await deferToThread(browser.evaluate, "[document.title, document.querySelectorAll('#rows img, "
                                                     "#rows b').length]") == ["blyanproxy status", 0]

        drained = status["nodes"][0]
        question = await deferToThread(click_and_confirm, browser, drained["id"], "drain")
        assert question.startswith("Drain node0?")
        await deferToThread(browser.wait_until, "document.getElementById('message').textContent === "
                                                "'node0 is draining.'")
        status = await fleet_status(proxy)
        assert [node["draining"] for node in status["nodes"]] == [True, False, False, False]
        await deferToThread(browser.wait_until, f"({READ_ROWS})[0].badges.includes('draining')")
        shown_like_status(await deferToThread(browser.evaluate, READ_ROWS), status)
        await deferToThread(browser.screenshot, tmp_path / "statuspage.png")

        sent = [event["request"] for event in browser.events("Network.requestWillBeSent")]
        assert [(request["method"], urlsplit(request["url"]).path) for request in sent if request["method"] != "GET"
                ] == [("POST", f"/_admin/nodes/{drained['id']}/drain")]
        page_load, *api_calls = sent
        assert urlsplit(page_load["url"]).path == "/_admin/ui" and "X-Admin-Token" not in page_load["headers"]
        assert api_calls and all(request["headers"].get("X-Admin-Token") == TOKEN for request in api_calls)

        await deferToThread(browser.evaluate, f"sessionStorage.setItem('{TOKEN_KEY}', 'a-token-that-is-wrong')")
        problem = await deferToThread(browser.wait_until, "!document.getElementById('login').hidden && "
                                                          "document.getElementById('login-problem').textContent")
        assert "refused" in problem
        assert await deferToThread(browser.evaluate, f"sessionStorage.getItem('{TOKEN_KEY}')") is None

        assert await deferToThread(browser.evaluate, "policyViolations") == []
        assert browser.events("Runtime.exceptionThrown") == []
        await deferToThread(browser.evaluate, "document.body.append(Object.assign("
                                              "document.createElement('script'), {textContent: 'window.ran = 1'}))")
        assert await deferToThread(browser.evaluate, "[window.ran, policyViolations]") == [None, ["script-src-elem"]]
    finally:
        await deferToThread(browser.close)

    every_url = [urlsplit(event["request"]["url"]) for event in browser.events("Network.requestWillBeSent")]
    assert {(url.scheme, url.netloc) for url in every_url} == {("http", urlsplit(proxy.url).netloc)}
    assert all(url.path.startswith("/_admin/") for url in every_url)
    assert (tmp_path / "statuspage.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def sign_in_with_status_rewritten(browser: Chromium, token: str, rewrite) -> list:
    """Sign in while the page's first ``/_admin/status`` answer passes through ``rewrite(document)``;
    the headings and first row the page then shows. Later answers are held, so the page stays as it is."""
    browser.call("Fetch.enable", patterns=[{"urlPattern": "*/_admin/status", "requestStage": "Response"}])
    browser.evaluate("document.getElementById('token').focus()")
    browser.call("Input.insertText", text=token)
    browser.evaluate("document.querySelector('#login button[type=submit]').click()")
    paused = browser.wait_for_event("Fetch.requestPaused")
    answer = browser.call("Fetch.getResponseBody", requestId=paused["requestId"])
    text = base64.b64decode(answer["body"]) if answer["base64Encoded"] else answer["body"].encode()
    body = json.dumps(rewrite(json.loads(text))).encode()
    browser.call("Fetch.fulfillRequest", requestId=paused["requestId"], responseCode=200,
                 responseHeaders=[{"name": "Content-Type", "value": "application/json"}],
                 body=base64.b64encode(body).decode())
    return browser.wait_until("document.querySelector('#rows tr[data-node-id]') && ["
                              "[...document.querySelectorAll('#columns th')].map((th) => th.textContent),"
                              "[...document.querySelector('#rows tr').cells].map((td) => td.textContent)]")


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_engine_models_and_queue_columns_appear_when_the_status_has_them(proxy_factory, tmp_path):
    program = require_program("chromium")
    proxy = await proxy_factory(["http://10.9.9.9:1"], admin_token=TOKEN)
    profile = tmp_path / "chromium-profile"
    profile.mkdir()

    def with_engine_figures(status):
        status["nodes"][0].update(engine="vllm", models=["llama-3-8b", "qwen-7b"], queue={"waiting": 2, "cap": 8})
        return status

    browser = await deferToThread(Chromium, program, profile)
    try:
        await deferToThread(open_page, browser, proxy.url + "/_admin/ui")
        headings, cells = await deferToThread(sign_in_with_status_rewritten, browser, TOKEN, with_engine_figures)
    finally:
        await deferToThread(browser.close)
    assert headings == [*BASE_HEADINGS, "Engine", "Models", "Queue", ""]
    assert cells[-4:-1] == ["vllm", "llama-3-8b, qwen-7b", "waiting: 2, cap: 8"]
