"""Per-rank KV cache: this rank's KV heads for a fixed number of sequence slots.

Preallocated once; a slot is reused by simply writing from position 0 again, so freeing a
finished sequence costs nothing on the data plane.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, num_slots: int, max_len: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32):
        shape = (num_layers, num_slots, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype)  # (L, S, kh, max_len, hd)
        self.v = torch.zeros(shape, dtype=dtype)
        self.num_slots = num_slots
        self.max_len = max_len

    def write(self, layer: int, slot: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k``/``v`` of shape (n, kh, hd) at positions ``[start, start + n)``."""
        n = k.shape[0]
        self.k[layer, slot, :, start:start + n] = k.transpose(0, 1)
        self.v[layer, slot, :, start:start + n] = v.transpose(0, 1)

    def write_tokens(self, layer: int, slots: torch.Tensor, positions: torch.Tensor, k: torch.Tensor,
                     v: torch.Tensor) -> None:
        """Store one token per sequence: ``k[i]``/``v[i]`` (B, kh, hd) at (``slots[i]``, ``positions[i]``)."""
        self.k[layer, slots, :, positions] = k
        self.v[layer, slots, :, positions] = v

    def batch_view(self, layer: int, slots: torch.Tensor, first_slot: int | None,
                   length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of positions ``[0, length)`` of several slots, each (B, kh, length, hd):
        a view when the slots are consecutive from ``first_slot``, else a gathered copy."""
        if first_slot is not None:
            rows = slice(first_slot, first_slot + slots.shape[0])
            return self.k[layer, rows, :, :length], self.v[layer, rows, :, :length]
        return (self.k[layer, :, :, :length].index_select(0, slots),
                self.v[layer, :, :, :length].index_select(0, slots))

    def view(self, layer: int, slot: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of positions ``[0, length)``, each (kh, length, hd)."""
        return self.k[layer, slot, :, :length], self.v[layer, slot, :, :length]

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()
