"""The one way every bench script hands over its result: JSON on stdout, and in ``--out`` if given."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def emit(result: Any, out: str | None) -> None:
    text = json.dumps(result, indent=2)
    print(text)  # the script's output: a bench prints JSON, its logs go to stderr
    if out:
        Path(out).write_text(text)
