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


# --- token bytes for logprobs ------------------------------------------------------------------

_MIXED_TEXT = "The quick 日本語 😀😀 émoji ñ ü 中文 end"
_SP_LEAD = {"sp_replace": " ", "sp_metaspace": " "}  # SentencePiece encodes a leading '▁' the decoder drops


def _sentencepiece_dir(out_dir, style: str):
    """A tiny Llama-2 (``sp_replace``: Replace/ByteFallback/Fuse/Strip decoder) or newer Mistral
    (``sp_metaspace``: Metaspace) style tokenizer.json: '▁' for a space, '<0xHH>' byte fallback tokens."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for piece in ["▁", *"abcdefghijklmnopqrstuvwxyzTé日"]:
        vocab[piece] = len(vocab)
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("▁", "q"), ("u", "i"), ("c", "k"), ("▁q", "ui"),
              ("▁qui", "ck"), ("▁", "é"), ("T", "he")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    if style == "sp_replace":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        tok.decoder = decoders.Sequence([decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False),
                                         decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    return out_dir


@pytest.fixture(scope="module", params=["byte_level", "default_model", "sp_replace", "sp_metaspace"])
def any_tokenizer(request, checkpoints, tmp_path_factory) -> tuple[str, TextTokenizer]:
    from pathlib import Path

    if request.param == "byte_level":
        return request.param, TextTokenizer(checkpoints("llama"))
    if request.param == "default_model":
        return request.param, TextTokenizer(Path(__file__).resolve().parents[1] / "server" / "default_model")
    return request.param, TextTokenizer(_sentencepiece_dir(tmp_path_factory.mktemp(request.param), request.param))


def test_token_bytes_concatenate_to_the_texts_utf8(any_tokenizer) -> None:
    kind, tokenizer = any_tokenizer
    table = tokenizer.token_bytes
    ids = tokenizer.encode(_MIXED_TEXT, add_special_tokens=False)
    assert tokenizer.decode(ids) == _MIXED_TEXT
    assert b"".join(table.token_bytes(i) for i in ids) == (_SP_LEAD.get(kind, "") + _MIXED_TEXT).encode()
    texts = [table.text(i) for i in ids]
    assert any(t.startswith("bytes:\\x") for t in texts), "the text should need byte tokens"
    for i, text in zip(ids, texts, strict=True):
        assert not {"Ġ", "▁", "Ċ"} & set(text) and "<0x" not in text, (i, tokenizer.token_name(i), text)
        if text.startswith("bytes:"):  # part of a character: OpenAI's form, the bytes escaped
            assert text == "bytes:" + "".join(f"\\x{b:02x}" for b in table.token_bytes(i))
        else:
            assert text.encode() == table.token_bytes(i)
    assert tokenizer.token_bytes is table  # built once per tokenizer


def test_token_bytes_agree_with_decoding_every_token_after_another(any_tokenizer) -> None:
    """Round trip over the whole vocabulary: decoding any token after a plain one adds exactly the
    token's bytes (as lossy UTF-8, for a token holding part of a character)."""
    _, tokenizer = any_tokenizer
    table = tokenizer.token_bytes
    anchor = tokenizer.encode("a", add_special_tokens=False)[-1]
    base = tokenizer.decode([anchor])
    checked = 0
    for token in range(tokenizer.vocab_size):
        if not table.adds_text(token):
            continue
        expected = table.token_bytes(token).decode("utf-8", errors="replace")
        assert tokenizer.decode([anchor, token]) == base + expected, (token, tokenizer.token_name(token))
        checked += 1
    assert checked > 250


def test_special_tokens_show_their_name_and_add_no_text(any_tokenizer) -> None:
    _, tokenizer = any_tokenizer
    table = tokenizer.token_bytes
    eos = tokenizer.encode("</s>", add_special_tokens=False)
    assert len(eos) == 1 and tokenizer.decode(eos) == ""  # skipped when output text is decoded
    assert (table.text(eos[0]), table.token_bytes(eos[0]), table.adds_text(eos[0])) == ("</s>", b"</s>", False)
    ids = tokenizer.encode("ab", add_special_tokens=False)
    offsets = table.offsets()
    pushed = [offsets.push(t) for t in [ids[0], eos[0], *ids[1:], eos[0]]]
    assert pushed[1] == pushed[2] and pushed[-1] == offsets.chars
    assert offsets.chars == len(b"".join(table.token_bytes(t) for t in ids).decode())


def test_text_offsets_point_into_the_decoded_text(any_tokenizer) -> None:
    """A token is at the character its first byte belongs to; a whole-character token's text starts there."""
    kind, tokenizer = any_tokenizer
    table = tokenizer.token_bytes
    ids = tokenizer.encode(_MIXED_TEXT, add_special_tokens=False)
    text = _SP_LEAD.get(kind, "") + _MIXED_TEXT
    offsets = table.offsets()
    start = 0
    for token in ids:
        data = table.token_bytes(token)
        before = (_SP_LEAD.get(kind, "") + _MIXED_TEXT).encode()[:start]
        offset = offsets.push(token)
        assert offset == len(before.decode("utf-8", errors="ignore")), (token, table.text(token))
        if not table.text(token).startswith("bytes:"):
            assert text[offset:].startswith(table.text(token))
        start += len(data)
    assert offsets.chars == len(text)


def test_text_offsets_count_invalid_bytes_as_the_decoder_does(tokenizer: TextTokenizer) -> None:
    """An unfinished character followed by a plain token is one U+FFFD, before that token."""
    table = tokenizer.token_bytes
    lead = next(t for t in range(tokenizer.vocab_size) if table.adds_text(t) and table.token_bytes(t) == b"\xe2")
    plain = tokenizer.encode("A", add_special_tokens=False)
    ids = [lead, *plain, lead, lead]
    offsets = table.offsets()
    assert tokenizer.decode(ids) == "\ufffdA\ufffd\ufffd"
    assert [offsets.push(t) for t in ids] == [0, 1, 2, 3]
    assert table.text(lead) == "bytes:\\xe2"


def test_logprob_formatter_streamed_offsets_equal_the_whole_texts(tokenizer: TextTokenizer) -> None:
    from server.protocol import LogprobFormatter
    from server.sampler import TokenLogprob

    ids = tokenizer.encode(_MIXED_TEXT, add_special_tokens=False)
    entries = [TokenLogprob(t, -1.0, [(t, -1.0)]) for t in ids]
    fmt = LogprobFormatter(tokenizer)
    whole = fmt.completion(entries)
    count = fmt.offsets()
    chunks = [fmt.completion([e], count) for e in entries]
    assert [c["text_offset"][0] for c in chunks] == whole["text_offset"]
    assert [c["tokens"][0] for c in chunks] == whole["tokens"]
    assert _MIXED_TEXT[whole["text_offset"][-1]:] == whole["tokens"][-1]  # the end of "end"
    assert "".join(whole["tokens"]).startswith("The quick ")
    chat = fmt.chat(entries)["content"]
    assert b"".join(bytes(c["bytes"]) for c in chat) == _MIXED_TEXT.encode()
    assert all(bytes(c["bytes"]) == bytes(c["top_logprobs"][0]["bytes"]) for c in chat)


@pytest.mark.parametrize("style", ["sp_replace", "sp_metaspace"])
def test_the_first_output_token_keeps_its_leading_space(style: str, tmp_path) -> None:
    """SentencePiece decoders strip the leading space of the first token they decode: output
    decoded alone turned " quick" after the prompt "the" into "quick" (and every logprob
    text_offset after it was one character off). The prompt's tail is decoded ahead of it now."""
    tokenizer = TextTokenizer(_sentencepiece_dir(tmp_path, style))
    ids = tokenizer.encode("the quick", add_special_tokens=False)
    prompt, output = ids[:1], ids[1:]
    assert tokenizer.decode(prompt) == "the"
    decoder = IncrementalDecoder(tokenizer, prompt)
    text = "".join(decoder.push(t) for t in output) + decoder.flush()
    assert text == " quick"


def test_a_prompt_context_changes_nothing_for_byte_level_text(tokenizer: TextTokenizer) -> None:
    prompt = tokenizer.encode("Tensor parallelism:", add_special_tokens=True)
    ids = tokenizer.encode(" ünïcödé ✓ splits 日本語 layers.", add_special_tokens=False)
    decoder = IncrementalDecoder(tokenizer, prompt)
    assert "".join([decoder.push(i) for i in ids] + [decoder.flush()]) == tokenizer.decode(ids)
