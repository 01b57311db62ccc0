"""argparse types shared by every ``edgellm`` subcommand: a zero, negative or out-of-range value
is refused with the option's name at once, rather than starting a server that hangs every
request (``--max-batch 0``), fails every step (``--prefill-chunk 0``) or dies in a traceback
(``--port 99999``, ``--threads -2``). No torch here: argument errors must answer instantly."""

from __future__ import annotations

import argparse


def _number(text: str, kind: type[int] | type[float]) -> int | float:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: {text!r}") from None


def positive_int(text: str) -> int:
    """Counts and sizes: at least 1."""
    value = int(_number(text, int))
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """Counts where 0 means none (local workers, queue places)."""
    value = int(_number(text, int))
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def positive_float(text: str) -> float:
    """Timeouts and waits, in seconds: more than 0."""
    value = float(_number(text, float))
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def port_number(text: str) -> int:
    """A TCP port to listen on (0: any free one)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0-65535, got {text}")
    return value


def worker_addresses(text: str) -> list[str]:
    """Comma-separated ``host:port`` of running workers (``[::1]:port`` for IPv6); empty: none.
    Checked here: a missing or bad port, or an empty entry (``--workers ,``, which served one
    rank without a word), failed only after the connect timeout, or not at all."""
    if not text.strip():
        return []
    addresses = [part.strip() for part in text.split(",")]
    for address in addresses:
        host, colon, port = address.rpartition(":")
        if not address:
            raise argparse.ArgumentTypeError(f"an empty address in {text!r}")
        if not colon or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise argparse.ArgumentTypeError(f"not host:port (port 1-65535): {address!r}")
    return addresses
