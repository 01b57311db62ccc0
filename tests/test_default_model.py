"""The README's first command: a local cluster on the embedded model answers in words."""

from __future__ import annotations

import re

import httpx
import pytest

from server.cli import DEFAULT_MODEL
from tests.processes import served

pytestmark = pytest.mark.cluster


def test_embedded_model_on_three_ranks_answers_in_english() -> None:
    # the same command as `make serve`, on another port
    with served(DEFAULT_MODEL, "--local-workers", "2") as url:
        body = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
            "model": "default_model", "max_tokens": 40, "temperature": 0,
            "messages": [{"role": "user", "content": "What does the json module do?"}]}).json()
    text = body["choices"][0]["message"]["content"]
    words = re.findall(r"[A-Za-z]{2,}", text)
    assert len(words) >= 4, text
    common = {"the", "a", "of", "to", "is", "for", "return", "and", "in"}
    assert common & {w.lower() for w in words}, text
