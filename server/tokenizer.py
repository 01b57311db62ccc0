"""Tokenizer, chat template and streaming detokenization for a checkpoint directory.

Uses the ``tokenizers`` library on ``tokenizer.json`` and renders the chat template from
``tokenizer_config.json`` (or ``chat_template.jinja``) with a sandboxed Jinja2, the way
transformers does, so the coordinator does not need transformers.
"""

from __future__ import annotations

import codecs
import json
import re
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from worker.config import CheckpointError


class ChatTemplateError(ValueError):
    """The model has no chat template, or it refused the messages."""


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # {"content": "<s>", ...} in older tokenizer configs
        return value.get("content")
    return value


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


class TextTokenizer:
    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(f"{model_dir}: no tokenizer.json (a fast tokenizer file is required)")
        self._tok = Tokenizer.from_file(str(path))
        cfg = _read_json(model_dir / "tokenizer_config.json")
        gen = _read_json(model_dir / "generation_config.json")
        model_cfg = _read_json(model_dir / "config.json")
        self.bos_token = _token_text(cfg.get("bos_token"))
        self.eos_token = _token_text(cfg.get("eos_token"))
        self.chat_template = self._find_template(model_dir, cfg)
        self.eos_ids = self._eos_ids(gen, model_cfg)
        self.vocab_size = self._tok.get_vocab_size()

    @staticmethod
    def _find_template(model_dir: Path, cfg: dict) -> str | None:
        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        jinja_file = model_dir / "chat_template.jinja"
        if template is None and jinja_file.is_file():
            template = jinja_file.read_text()
        return template

    def _eos_ids(self, gen: dict, model_cfg: dict) -> frozenset[int]:
        ids: set[int] = set()
        for source in (gen.get("eos_token_id"), model_cfg.get("eos_token_id")):
            if isinstance(source, list):
                ids.update(int(i) for i in source)
            elif source is not None:
                ids.add(int(source))
        if self.eos_token is not None and (tid := self._tok.token_to_id(self.eos_token)) is not None:
            ids.add(tid)
        return frozenset(ids)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_name(self, token: int) -> str:
        """The vocabulary entry of ``token`` (e.g. ``Ġthe`` or ``<0xE2>``)."""
        return self._tok.id_to_token(token) or f"<{token}>"

    @cached_property
    def longest_token_chars(self) -> int:
        """The most characters one token can stand for: its vocabulary entry's length (a byte-level
        symbol stands for one byte, so for at most one character; ``▁`` for one space)."""
        return max(len(self.token_name(t)) for t in range(self.vocab_size))

    @cached_property
    def token_bytes(self) -> TokenBytes:
        """The real bytes of every token, for logprobs: built on first use, once per tokenizer."""
        return TokenBytes.build(self._tok)

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise ChatTemplateError("this model has no chat template; use /v1/completions")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.filters["tojson"] = lambda v, indent=None: json.dumps(v, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except TemplateError as exc:
            raise ChatTemplateError(f"chat template failed: {exc}") from None

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        # The template already writes the BOS token where the model wants it.
        return self.encode(self.render_chat(messages), add_special_tokens=False)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table from each byte to the printable character byte-level BPE writes it as
    (a space is 'Ġ', byte 0x97 is 'Ĺ'): printable Latin-1 bytes stand for themselves, the
    others take the characters from U+0100 on, in byte order."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in kept}
    for n, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + n)
    return table


_BYTE_LEVEL = {char: byte for byte, char in _bytes_to_unicode().items()}  # stand-in character -> byte
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte tokens, e.g. <0x97>
# decoders whose effect on one token, out of context, TokenBytes knows (Fuse joins tokens; Strip, and
# Metaspace's prefix rule, only touch the first token of a whole text)
_KNOWN_DECODERS = frozenset({"ByteLevel", "ByteFallback", "Metaspace", "Replace", "Fuse", "Strip"})


def _flat_decoders(spec: dict | None) -> list[dict]:
    if not spec:
        return []
    if spec.get("type") == "Sequence":
        return [d for inner in spec.get("decoders", []) for d in _flat_decoders(inner)]
    return [spec]


class TokenBytes:
    """What each token of a vocabulary adds to decoded text, as raw bytes, for logprobs.

    Decoding one token alone cannot say: byte-level BPE (GPT-2, Llama 3, Qwen) writes bytes as
    stand-in characters ('Ġ' for a space, 'âĢ' for the bytes e2 80) and its tokens may hold part of a
    UTF-8 character; SentencePiece (Llama 2, Mistral) writes '▁' for a space and '<0x97>' for a byte.
    So the table follows the tokenizer's decoder from tokenizer.json: ByteLevel inverts GPT-2's table
    (a token with a character outside it is its own UTF-8, as the decoder does); ByteFallback turns
    '<0xHH>' into that byte; Replace and Metaspace ('▁' -> ' ') apply in order. A token's bytes are its
    own, out of context: the leading space that Metaspace or Strip drop from the first token of a
    whole text is kept. A tokenizer with any other decoder (or none) gets each token's lone decode.

    Special tokens are skipped when output text is decoded (``TextTokenizer.decode`` skips them), so
    they add no text; so do ids the vocabulary lacks. Their ``text`` is their name, and their
    ``token_bytes`` its UTF-8.
    """

    def __init__(self, pieces: list[bytes | None], names: list[str]):
        self._pieces = pieces  # token id -> its bytes in decoded text; None: adds no text
        self._names = names

    @classmethod
    def build(cls, tok: Tokenizer) -> TokenBytes:
        vocab = tok.get_vocab(with_added_tokens=True)
        size = max(vocab.values(), default=-1) + 1
        names = [f"<{i}>" for i in range(size)]
        for name, i in vocab.items():
            names[i] = name
        special = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        steps = _flat_decoders(json.loads(tok.decoder.__getstate__()) if tok.decoder is not None else None)
        types = {d.get("type") for d in steps}
        if "ByteLevel" in types:
            def piece(name: str, i: int) -> bytes:
                if all(c in _BYTE_LEVEL for c in name):
                    return bytes(_BYTE_LEVEL[c] for c in name)
                return name.encode()
        elif steps and types <= _KNOWN_DECODERS:
            byte_fallback = "ByteFallback" in types

            def piece(name: str, i: int) -> bytes:
                if byte_fallback and (m := _BYTE_FALLBACK.fullmatch(name)):
                    return bytes([int(m.group(1), 16)])
                for d in steps:
                    if d["type"] == "Metaspace":
                        name = name.replace(d.get("replacement", "▁"), " ")
                    elif d["type"] == "Replace":
                        pattern, content = d.get("pattern", {}), d.get("content", "")
                        if "String" in pattern:
                            name = name.replace(pattern["String"], content)
                        elif "Regex" in pattern:
                            name = re.sub(pattern["Regex"], content.replace("\\", "\\\\"), name)
                return name.encode()
        else:
            def piece(name: str, i: int) -> bytes:
                return tok.decode([i], skip_special_tokens=False).encode()
        pieces: list[bytes | None] = [None] * size
        for name, i in vocab.items():
            if i not in special:
                pieces[i] = piece(name, i)
        return cls(pieces, names)

    def _piece(self, token: int) -> bytes | None:
        return self._pieces[token] if 0 <= token < len(self._pieces) else None

    def adds_text(self, token: int) -> bool:
        """Whether ``token`` adds to decoded text (special tokens and unknown ids do not)."""
        return self._piece(token) is not None

    def token_bytes(self, token: int) -> bytes:
        """The bytes ``token`` adds to decoded text (a special token: its name's UTF-8)."""
        piece = self._piece(token)
        return piece if piece is not None else self.text(token).encode()

    def text(self, token: int) -> str:
        """The token's text: its bytes decoded; for a token holding part of a UTF-8 character,
        OpenAI's ``bytes:\\xe2\\x80`` form; for a token that adds no text, its name (``</s>``)."""
        piece = self._piece(token)
        if piece is None:
            return self._names[token] if 0 <= token < len(self._names) else f"<{token}>"
        try:
            return piece.decode()
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in piece)

    def offsets(self) -> TextOffsets:
        return TextOffsets(self)


class TextOffsets:
    """Character offsets of successive tokens in the text they decode to: a completion's
    ``text_offset``, kept across the chunks of a stream.

    A token's offset is the number of characters of the text before its first byte. A character
    made of several byte tokens is at its first token's offset, and the tokens that continue it
    (up to the one completing it) share that offset: the count moves only once the character is
    complete. Tokens that add no text (special tokens) do not move it. Bytes that are not valid
    UTF-8 count as the U+FFFD characters the decoder writes for them: an unfinished character
    that the next token does not continue is one U+FFFD, before that token.
    """

    def __init__(self, table: TokenBytes):
        self._table = table
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.chars = 0

    def push(self, token: int) -> int:
        """The offset of ``token``, which follows the tokens pushed before it."""
        if not self._table.adds_text(token):
            return self.chars
        data = self._table.token_bytes(token)
        if data and not 0x80 <= data[0] <= 0xBF and self._utf8.getstate()[0]:
            self.chars += len(self._utf8.decode(b"", final=True))  # the unfinished character: U+FFFD
        offset = self.chars
        self.chars += len(self._utf8.decode(data))
        return offset


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas.

    Decodes from a few tokens back (``prefix``) so tokenizers that drop a leading space or
    emit partial UTF-8 for a lone byte token still produce the right text.
    """

    CONTEXT_TOKENS = 4  # prompt tokens decoded ahead of the first output token

    def __init__(self, tokenizer: TextTokenizer, context: list[int] | None = None):
        """``context``: the prompt. Its last tokens are decoded ahead of the output, so the first
        output token keeps its leading space: SentencePiece decoders (Llama 2, Mistral) strip it
        from the first token of whatever they decode (" Paris" after "The capital of France is"
        came out "Paris"). A context ending inside a UTF-8 character is not used."""
        self.tokenizer = tokenizer
        tail = list(context or [])[-self.CONTEXT_TOKENS:]
        if tail and tokenizer.decode(tail).endswith("\ufffd"):
            tail = []
        self.ids: list[int] = tail
        self._prefix = 0
        self._read = len(tail)

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self._prefix:self._read])
        after = self.tokenizer.decode(self.ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """Text still held back (an incomplete character at the end), emitted as is."""
        before = self.tokenizer.decode(self.ids[self._prefix:self._read])
        after = self.tokenizer.decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return after[len(before):]


class StopMatcher:
    """Finds stop strings in generated text and holds back a tail that could begin one."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self._hold = max((len(s) - 1 for s in self.stops), default=0)
        self.text = ""
        self._emitted = 0

    def feed(self, delta: str) -> tuple[str, bool]:
        """Add ``delta``; return (text safe to emit now, whether a stop string was hit)."""
        self.text += delta
        search_from = max(0, self._emitted - self._hold)
        hits = [i for s in self.stops if (i := self.text.find(s, search_from)) != -1]
        if hits:
            self.text = self.text[: min(hits)]
            out = self.text[self._emitted:]
            self._emitted = len(self.text)
            return out, True
        safe_end = max(self._emitted, len(self.text) - self._hold)
        out = self.text[self._emitted:safe_end]
        self._emitted = safe_end
        return out, False

    def flush(self) -> str:
        out = self.text[self._emitted:]
        self._emitted = len(self.text)
        return out
