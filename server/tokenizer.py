"""Tokenizer, chat template and streaming detokenization for a checkpoint directory.

Uses the ``tokenizers`` library on ``tokenizer.json`` and renders the chat template from
``tokenizer_config.json`` (or ``chat_template.jinja``) with a sandboxed Jinja2, the way
transformers does, so the coordinator does not need transformers.
"""

from __future__ import annotations

import json
from datetime import datetime
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

    def __init__(self, tokenizer: TextTokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0
        self._read = 0

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
