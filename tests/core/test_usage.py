"""Reading token usage from the end of JSON bodies, SSE streams and Ollama lines."""

from blyanproxy.core.usage import TAIL_BYTES, Usage, UsageTail, usage_in


def test_openai_json_body():
    body = (b'{"id":"x","choices":[{"message":{"content":"hi"}}],'
            b'"usage":{"prompt_tokens":12,"completion_tokens":7,"total_tokens":19}}')
    assert usage_in(body) == Usage(12, 7)
    assert usage_in(body).total == 19


def test_sse_last_chunk_wins_and_null_usage_ignored():
    tail = UsageTail()
    tail.feed(b'data: {"choices":[{"delta":{"content":"a"}}],"usage":null}\n\n')
    for _ in range(500):  # a long stream: only the bounded tail is kept
        tail.feed(b'data: {"choices":[{"delta":{"content":"b"}}],"usage":null}\n\n')
    tail.feed(b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":501}}\n\n')
    tail.feed(b"data: [DONE]\n\n")
    assert tail.usage() == Usage(3, 501)


def test_ollama_counts_and_big_pieces():
    tail = UsageTail()
    tail.feed(b"x" * (TAIL_BYTES * 3))
    tail.feed(b'{"done":true,"context":[1,2,3],"prompt_eval_count":26,"eval_count":290}\n')
    assert tail.usage() == Usage(26, 290)


def test_no_usage_and_quoted_text():
    assert usage_in(b'{"choices":[{"message":{"content":"say \\"prompt_tokens\\": 5"}}]}') is None
    assert UsageTail().usage() is None
