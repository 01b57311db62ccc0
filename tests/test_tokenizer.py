"""Tokenizer, chat template, streaming detokenization and stop strings."""

from __future__ import annotations

import pytest

from server.tokenizer import ChatTemplateError, IncrementalDecoder, StopMatcher, TextTokenizer


@pytest.fixture(scope="module")
def tokenizer(checkpoints) -> TextTokenizer:
    return TextTokenizer(checkpoints("llama"))


def test_encode_adds_bos_and_decode_round_trips(tokenizer: TextTokenizer) -> None:
    ids = tokenizer.encode("Hello world! über café")
    assert ids[0] == tokenizer.encode("", add_special_tokens=True)[0]
    assert tokenizer.decode(ids) == "Hello world! über café"
    assert tokenizer.eos_ids  # from generation_config / config / tokenizer_config


def test_incremental_decoder_equals_full_decode(tokenizer: TextTokenizer) -> None:
    text = "Tensor parallelism: ünïcödé ✓ splits 日本語 layers."
    ids = tokenizer.encode(text, add_special_tokens=False)
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_chat_template_renders_roles_and_generation_prompt(tokenizer: TextTokenizer) -> None:
    rendered = tokenizer.render_chat([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}])
    assert rendered == "<s><|system|>S</s><|user|>U</s><|assistant|>"
    ids = tokenizer.encode_chat([{"role": "user", "content": "U"}])
    assert ids.count(tokenizer.encode("", add_special_tokens=True)[0]) == 1  # BOS from the template only


def test_missing_chat_template_is_a_clear_error(tokenizer: TextTokenizer) -> None:
    tokenizer_copy = TextTokenizer.__new__(TextTokenizer)
    tokenizer_copy.__dict__.update(tokenizer.__dict__, chat_template=None)
    with pytest.raises(ChatTemplateError, match="no chat template"):
        tokenizer_copy.render_chat([{"role": "user", "content": "x"}])


@pytest.mark.parametrize(("deltas", "stops", "emitted", "hit"), [
    (["Hello", " wor", "ld"], ["world"], "Hello ", True),
    (["ab", "c##", "d"], ["##"], "abc", True),
    (["no", " stop", " here"], ["zzz"], "no stop here", False),
    (["x", "y"], [], "xy", False),
    (["a", "b", "STO", "P"], ["OP", "bS"], "a", True),  # the earliest stop wins
])
def test_stop_matcher(deltas: list[str], stops: list[str], emitted: str, hit: bool) -> None:
    matcher = StopMatcher(stops)
    out, found = "", False
    for d in deltas:
        piece, found = matcher.feed(d)
        out += piece
        if found:
            break
    if not found:
        out += matcher.flush()
    assert (out, found) == (emitted, hit)
