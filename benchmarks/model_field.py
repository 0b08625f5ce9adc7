"""Micro-benchmark of model routing's body read: µs per call of ``model_of`` on request bodies.

Run: ``.venv/bin/python benchmarks/model_field.py`` (not a test; prints one line per case).
Compares with ``json.loads`` of the same body, which is what a full parse would cost.
"""

from __future__ import annotations

import json
import timeit
from pathlib import Path

from blyanproxy.core.modelfield import model_of

_PROSE = "lorem ipsum "


def _chat(prompt_bytes: int, model_first: bool, text: str = _PROSE) -> bytes:
    """An OpenAI chat body whose one message is ``prompt_bytes`` of text (the SDK puts ``model`` after it)."""
    message = {"role": "user", "content": (text * (prompt_bytes // len(text) + 1))[:prompt_bytes]}
    fields = {"messages": [message], "model": "meta-llama/Llama-3.1-8B-Instruct", "stream": True}
    if model_first:
        fields = {"model": fields.pop("model"), **fields}
    return json.dumps(fields).encode()

_README = Path(__file__).resolve().parent.parent / "README.rst"


def _per_call(function, body: bytes) -> float:
    timer = timeit.Timer(lambda: function(body))
    number, _ = timer.autorange()
    return min(timer.repeat(5, number)) / number * 1e6


def main() -> None:
    cases = [
        ("100 KB chat body, model after the prompt (openai SDK order)", _chat(100_000, False)),
        ("100 KB chat body, model first", _chat(100_000, True)),
        ("100 KB chat body of this README (newlines, quotes: escapes), model after it",
         _chat(100_000, False, _README.read_text())),
        ("1 KB chat body", _chat(1_000, False)),
        ("100 KB body without a model", json.dumps({"prompt": "x" * 100_000}).encode()),
    ]
    for name, body in cases:
        assert model_of(body) == json.loads(body).get("model")
        print(f"{name} ({len(body)} bytes): model_of {_per_call(model_of, body):.1f} µs, "
              f"json.loads {_per_call(json.loads, body):.1f} µs")


if __name__ == "__main__":
    main()
