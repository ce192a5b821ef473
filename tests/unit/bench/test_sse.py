from lightspeed.bench.sse import DONE, SseLineBuffer, carries_token, decode_chunk

CHUNK = b'{"id":"c","choices":[{"text":"hi","index":0}],"usage":null}'
FINISH = b'{"choices":[{"text":"","index":0,"finish_reason":"length"}],"usage":null}'
USAGE = (
    b'{"choices":[],"usage":{"prompt_tokens":64,"completion_tokens":16,"total_tokens":80,'
    b'"prompt_tokens_details":{"audio_tokens":null,"cached_tokens":32}}}'
)


def test_split_across_reads_and_done() -> None:
    buf = SseLineBuffer()
    stream = b"data: " + CHUNK + b"\n\n: keepalive comment\nevent: x\ndata: " + FINISH
    stream += b"\n\ndata: " + USAGE + b"\n\ndata: [DONE]\n\n"
    out: list[bytes] = []
    for i in range(0, len(stream), 7):  # 7-byte reads cut lines at arbitrary points
        out += buf.feed(stream[i : i + 7])
    assert out == [CHUNK, FINISH, USAGE, DONE]
    assert buf.flush() == []


def test_data_without_space_crlf_and_unterminated_tail() -> None:
    buf = SseLineBuffer()
    assert buf.feed(b"data:" + CHUNK + b"\r\n\r\ndata: [DO") == [CHUNK]
    assert buf.feed(b"NE]") == []
    assert buf.flush() == [DONE]


def test_decode_token_finish_and_usage_chunks() -> None:
    token, finish, usage = decode_chunk(CHUNK), decode_chunk(FINISH), decode_chunk(USAGE)
    assert carries_token(token) is True
    assert carries_token(finish) is False
    assert carries_token(usage) is False
    assert finish.choices[0].finish_reason == "length"
    assert usage.usage is not None
    assert usage.usage.prompt_tokens == 64
    assert usage.usage.completion_tokens == 16
    assert usage.usage.prompt_tokens_details is not None
    assert usage.usage.prompt_tokens_details.cached_tokens == 32


def test_empty_text_mid_stream_counts_as_token() -> None:
    # A token that ends inside a UTF-8 character detokenizes to "" but was still generated.
    assert carries_token(decode_chunk(b'{"choices":[{"text":"","index":0}]}')) is True
    # A text chunk that also finishes carries the last token.
    last = b'{"choices":[{"text":"x","finish_reason":"stop"}]}'
    assert carries_token(decode_chunk(last)) is True


def test_chat_deltas_and_error_chunk() -> None:
    role_only = decode_chunk(b'{"choices":[{"delta":{"role":"assistant"}}]}')
    content = decode_chunk(b'{"choices":[{"delta":{"content":"a"}}]}')
    assert carries_token(role_only) is False
    assert carries_token(content) is True
    err = decode_chunk(b'{"error":{"message":"worker lost","code":500}}')
    assert err.error_text == '{"message":"worker lost","code":500}'
    assert decode_chunk(CHUNK).error_text is None
    assert decode_chunk(b'{"choices":[],"error":null}').error_text is None
