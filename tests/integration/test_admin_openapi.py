"""The admin API's OpenAPI document: served, and every response conforms (schemathesis, bounded)."""

import json
import os
import shutil
import sys

import pytest
import pytest_twisted
import treq
from twisted.internet.utils import getProcessOutputAndValue

from .test_admin import TOKEN

CHECKS = (
    "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,"
    "negative_data_rejection"
)


@pytest_twisted.ensureDeferred
async def test_the_document_is_served_without_a_token(proxy_factory):
    proxy = await proxy_factory([])
    response = await treq.get(proxy.url + "/_admin/openapi.json", timeout=5)
    document = json.loads(await response.content())
    assert response.code == 200 and document["openapi"].startswith("3.1")
    assert "/nodes/{id}" in document["paths"]


async def run_schemathesis(reactor, proxy_factory, tmp_path, examples: int, seconds: int) -> None:
    """Run schemathesis against a fresh proxy's admin API, bounded in examples and time."""
    proxy = await proxy_factory(["http://10.9.9.9:1"], persist=True, admin_token=TOKEN,
                                state_file=str(tmp_path / "state.json"))
    command = shutil.which("schemathesis", path=os.path.dirname(sys.executable))
    args = [
        "run", proxy.url + "/_admin/openapi.json", "--url", proxy.url + "/_admin",
        "-H", f"X-Admin-Token: {TOKEN}", "--checks", CHECKS,
        "--max-examples", str(examples), "--max-time", str(seconds), "--phases", "examples,coverage,fuzzing",
        "--seed", "1", "--workers", "1",
    ]
    out, err, code = await getProcessOutputAndValue(
        command, args, env=dict(os.environ, SCHEMATHESIS_HOOKS=""), path=str(tmp_path)
    ).addTimeout(seconds + 120, reactor)
    assert code == 0, (out + err).decode(errors="replace")[-6000:]


@pytest_twisted.ensureDeferred
async def test_schemathesis_finds_no_server_error_and_no_nonconforming_response(reactor, proxy_factory, tmp_path):
    await run_schemathesis(reactor, proxy_factory, tmp_path, examples=8, seconds=30)


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_schemathesis_at_a_larger_example_count(reactor, proxy_factory, tmp_path):
    await run_schemathesis(reactor, proxy_factory, tmp_path, examples=100, seconds=60)
