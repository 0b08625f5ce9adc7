"""The status page route (``GET /_admin/ui``): served without a token, with a strict policy, holding no secret
and calling nothing but the admin API. How it renders and acts is tested in Chromium
(tests/integration/test_status_page.py)."""

import base64
import configparser
import hashlib
import re
from pathlib import Path

import pytest

from blyanproxy.admin.ui import inline_source, status_page

from .test_api import AUTH, TOKEN, build, node

ADMIN_PACKAGE = Path(__file__).resolve().parents[2] / "blyanproxy" / "admin"
SETUP_CFG = ADMIN_PACKAGE.parents[1] / "setup.cfg"


def get_page(admin, headers=None):
    """``(status, headers, body text)`` of ``GET /_admin/ui``."""
    stub, answers = admin.stub, []
    requested = stub.request("GET", "http://proxy.test/ui", headers=headers or {})
    requested.addCallback(lambda response: stub.content(response).addCallback(
        lambda content: answers.append((response.code, response.headers, content.decode("utf-8")))))
    stub.flush()
    return answers[0]


def policy_of(headers):
    """The Content-Security-Policy as ``{directive: [sources]}``."""
    [policy] = headers.getRawHeaders("content-security-policy")
    directives = [part.split() for part in policy.split(";")]
    return {words[0]: words[1:] for words in directives}


def inline(body, tag):
    [text] = re.findall(rf"<{tag}>(.*?)</{tag}>", body, re.DOTALL)
    return text


def sha256_source(text):
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


@pytest.fixture
def admin():
    return build([node(1), node(2)])


@pytest.mark.parametrize("headers", [{}, {"X-Admin-Token": "guess"}, AUTH])
def test_the_page_is_served_whatever_token_comes_with_it(admin, headers):
    code, response_headers, body = get_page(admin, headers)
    assert code == 200 and body.startswith("<!DOCTYPE html>")
    assert response_headers.getRawHeaders("content-type") == ["text/html; charset=utf-8"]


def test_the_page_is_served_to_an_address_the_api_refuses_for_now(admin):
    for _ in range(10):
        admin.call("GET", "/status", headers={"X-Admin-Token": "guess"})
    assert admin.call("GET", "/status")[0] == 429
    assert get_page(admin)[0] == 200


def test_the_page_comes_with_headers_that_keep_it_out_of_frames_caches_and_referrers(admin):
    _, headers, _ = get_page(admin)
    assert headers.getRawHeaders("x-frame-options") == ["DENY"]
    assert headers.getRawHeaders("cache-control") == ["no-store"]
    assert headers.getRawHeaders("referrer-policy") == ["no-referrer"]
    assert headers.getRawHeaders("x-content-type-options") == ["nosniff"]


def test_the_policy_allows_the_pages_own_script_and_style_and_calls_to_this_origin_only(admin):
    _, headers, body = get_page(admin)
    assert policy_of(headers) == {
        "default-src": ["'none'"],
        "script-src": [sha256_source(inline(body, "script"))],
        "style-src": [sha256_source(inline(body, "style"))],
        "connect-src": ["'self'"],
        "img-src": ["data:"],
        "base-uri": ["'none'"],
        "form-action": ["'none'"],
        "frame-ancestors": ["'none'"],
    }


def test_the_page_is_the_package_file_as_it_is_and_holds_no_token(admin):
    body = get_page(admin)[2]
    assert body == (ADMIN_PACKAGE / "ui.html").read_text(encoding="utf-8")  # nothing filled in when served
    assert TOKEN not in body
    assert "sessionStorage" in body and "X-Admin-Token" in body  # it asks, and sends what it was given


def test_the_page_loads_nothing_and_renders_data_as_text_only(admin):
    body = get_page(admin)[2]
    assert len(re.findall(r"<script\b", body)) == 1 and len(re.findall(r"<style\b", body)) == 1
    assert re.findall(r"\b(?:src|href)=\"([^\"]*)\"", body) == ["data:,"]  # the empty icon
    assert not re.search(r"https?:|//[a-z]", inline(body, "script"), re.IGNORECASE)
    for writes_html in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "Function("):
        assert writes_html not in body
    assert body.count("fetch(") == 1  # one way out: the admin API call, by paths relative to /_admin/ui


def test_inline_source_wants_exactly_one_plain_element():
    assert inline_source("<p><script>go()</script></p>", "script") == sha256_source("go()")
    with pytest.raises(ValueError, match="exactly one <script>"):
        inline_source("<script>a()</script><script>b()</script>", "script")
    with pytest.raises(ValueError, match="exactly one <script>"):
        inline_source('<script src="x.js"></script>', "script")
    with pytest.raises(ValueError, match="exactly one <style>"):
        status_page("<script>go()</script>")


def test_every_data_file_of_the_admin_package_is_installed_with_it():
    config = configparser.ConfigParser()
    config.read(SETUP_CFG)
    listed = {name.strip() for name in config["options.package_data"]["blyanproxy.admin"].split(",")}
    data = {path.name for path in ADMIN_PACKAGE.iterdir() if path.is_file() and path.suffix not in (".py", ".pyc")}
    assert {"ui.html", "openapi.json"} <= data and listed == data

