"""State containers shared by the streaming methods (InfLLM, StreamingLLM, LM-Infinite).

`SlidingKV` holds the un-rotated K/V of recent tokens (the local window plus InfLLM's remainder) addressed by
absolute position, with the per-query-head representative scores InfLLM accumulates; dropping old tokens is O(1)
and the buffer compacts itself, so its size stays bounded by the window, not the context.

`UnitStore` holds InfLLM's memory units: K/V of `block_size` tokens each, plus one representative vector per unit
and query head. With `offload` the units live in host memory (pinned on CUDA) and only `max_cached_block` of them
per layer are resident on the device, in a cache with the reference's `lru` / `lru-s` policies. The policy decides
which units stay resident; it never changes which units are attended, so it changes speed, never outputs.
"""

from __future__ import annotations

import torch


def glibc():
    """glibc via ctypes, or None where there is none (loaded once)."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim, _LIBC.mallopt  # noqa: B018 - both must exist
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC or None


def release_freed_heap(freed_bytes: int) -> None:
    """Hands the heap's free pages back to the OS (glibc `malloc_trim`; no-op elsewhere) once 256 MB of replaced
    buffers have accumulated. The engine keeps freed memory in the heap so attention temporaries do not page-fault
    again; a memory-unit buffer replaced by a larger one would then stay resident for good. Measured, InfLLM on
    SmolLM2 at 32K: workspace 1151 MB without the trim, 998 MB with it, prefill speed within 1 %."""
    global _PENDING
    _PENDING += freed_bytes
    if _PENDING >= 256 * 2**20 and glibc():
        _PENDING = 0
        glibc().malloc_trim(0)


_LIBC = None
_PENDING = 0


class SlidingKV:
    def __init__(self, like_k: torch.Tensor, n_heads: int, capacity: int):
        B, Hkv, _, D = like_k.shape
        self.k = like_k.new_empty(B, Hkv, capacity, D)
        self.v = like_k.new_empty(B, Hkv, capacity, D)
        self.score = torch.zeros(B, n_heads, capacity, dtype=torch.float32, device=like_k.device)
        self.off = 0  # buffer index of position `start`
        self.start = 0  # absolute position of the oldest kept token
        self.end = 0  # absolute position after the newest token

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        n = k.shape[2]
        used = self.end - self.start
        if self.off + used + n > self.k.shape[2]:
            self._compact(used + n)
        i = self.off + used
        self.k[:, :, i : i + n] = k
        self.v[:, :, i : i + n] = v
        self.score[:, :, i : i + n] = 0
        self.end += n

    def _compact(self, need: int) -> None:
        used = self.end - self.start
        cap = max(self.k.shape[2], 2 * need)
        for name in ("k", "v", "score"):
            old = getattr(self, name)
            new = old.new_empty(*old.shape[:2], cap, *old.shape[3:]) if cap != old.shape[2] else old
            new[:, :, :used] = old[:, :, self.off : self.off + used].clone()
            setattr(self, name, new)
        self.off = 0

    def _idx(self, p0: int, p1: int) -> slice:
        assert self.start <= p0 <= p1 <= self.end, (self.start, p0, p1, self.end)
        return slice(self.off + p0 - self.start, self.off + p1 - self.start)

    def kv(self, p0: int, p1: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self._idx(p0, p1)
        return self.k[:, :, s], self.v[:, :, s]

    def scores(self, p0: int, p1: int) -> torch.Tensor:
        return self.score[:, :, self._idx(p0, p1)]

    def nbytes(self) -> int:
        """Bytes of the K/V of the tokens kept (not the buffer's capacity)."""
        return 2 * (self.end - self.start) * self.k[:, :, :1].numel() * self.k.element_size()

    def drop_before(self, p: int) -> None:
        p = min(max(p, self.start), self.end)
        self.off += p - self.start
        self.start = p


class UnitStore:
    """Memory units of one layer, unit-first: K/V [U, B, H_kv, block_size, D]; representative vectors [U, B, H, D]
    (on the compute device)."""

    def __init__(self, like_k, n_heads: int, block_size: int, offload: bool, max_cached_block: int,
                 cache_strategy: str, score_decay: float | None):
        B, Hkv, _, D = like_k.shape
        self.block_size, self.offload = block_size, offload
        self.device = like_k.device
        host = "cpu" if offload else like_k.device
        pin = offload and like_k.device.type == "cuda"
        self._k = torch.empty(16, B, Hkv, block_size, D, dtype=like_k.dtype, device=host, pin_memory=pin)
        self._v = torch.empty_like(self._k)
        self._repr = like_k.new_empty(16, B, n_heads, D)
        self.n = 0
        # device cache (only with offload): slot tensors + unit -> slot, unit -> lru value
        self.max_cached_block, self.cache_strategy, self.score_decay = max_cached_block, cache_strategy, score_decay
        if offload:
            self.slot_k = like_k.new_empty(max_cached_block, B, Hkv, block_size, D)
            self.slot_v = torch.empty_like(self.slot_k)
        self.slot_of: dict[int, int] = {}
        self.value: dict[int, float] = {}
        self.load_count = 0
        self.hits = self.misses = 0

    def add(self, k: torch.Tensor, v: torch.Tensor, rep: torch.Tensor) -> None:
        """k/v [B, H_kv, block_size, D], rep [B, H, D]."""
        if self.n == self._k.shape[0]:
            cap = self.n + max(16, self.n // 2)  # x1.5: at most a third of the buffer is unused
            freed = 2 * self._k.untyped_storage().nbytes()
            self._k = self._grow(self._k, cap)
            self._v = self._grow(self._v, cap)
            self._repr = self._grow(self._repr, cap)
            if self._k.device.type == "cpu":
                release_freed_heap(freed)
        self._k[self.n].copy_(k, non_blocking=True)
        self._v[self.n].copy_(v, non_blocking=True)
        self._repr[self.n] = rep
        self.n += 1

    @staticmethod
    def _grow(t: torch.Tensor, cap: int) -> torch.Tensor:
        new = torch.empty((cap, *t.shape[1:]), dtype=t.dtype, device=t.device, pin_memory=t.is_pinned())
        new[: t.shape[0]] = t
        return new

    @property
    def reprs(self) -> torch.Tensor:
        return self._repr[: self.n]  # [U, B, H, D]

    def nbytes_host(self) -> int:
        """Bytes of the stored units' K/V (in host memory with offload, else on the device)."""
        return 2 * self.n * self._k[0].numel() * self._k.element_size()

    def nbytes(self) -> int:
        """Bytes on the compute device: the representative vectors, plus the units' K/V (without offload) or the
        occupied cache slots (with offload)."""
        reprs = self.n * self._repr[0].numel() * self._repr.element_size()
        if not self.offload:
            return reprs + self.nbytes_host()
        return reprs + 2 * len(self.slot_of) * self.slot_k[0].numel() * self.slot_k.element_size()

    def gather(self, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V of the selected units concatenated along tokens: [B, H_kv, len(ids)*block_size, D]."""
        if not self.offload:
            idx = torch.tensor(ids, device=self._k.device)
            k, v = self._k.index_select(0, idx), self._v.index_select(0, idx)
        else:
            slots = self._load(ids)
            idx = torch.tensor(slots, device=self.device)
            k, v = self.slot_k.index_select(0, idx), self.slot_v.index_select(0, idx)
        # [n, B, H_kv, bs, D] -> [B, H_kv, n*bs, D]
        n, B, Hkv, bs, D = k.shape
        return (k.permute(1, 2, 0, 3, 4).reshape(B, Hkv, n * bs, D),
                v.permute(1, 2, 0, 3, 4).reshape(B, Hkv, n * bs, D))

    # -- device cache (reference §2.8) -----------------------------------------------------------------------------
    def _load(self, ids: list[int]) -> list[int]:
        self.load_count += 1
        missing = [u for u in ids if u not in self.slot_of]
        n_remove = len(self.slot_of) - self.max_cached_block + len(missing)
        if n_remove > 0:
            victims = sorted((u for u in self.slot_of if u not in set(ids)), key=lambda u: self.value[u])[:n_remove]
            for u in victims:
                del self.slot_of[u], self.value[u]
        free = sorted(set(range(self.max_cached_block)) - set(self.slot_of.values()))
        for u in missing:
            s = free.pop(0)
            self.slot_k[s].copy_(self._k[u], non_blocking=True)
            self.slot_v[s].copy_(self._v[u], non_blocking=True)
            self.slot_of[u] = s
        self.hits += len(ids) - len(missing)
        self.misses += len(missing)
        for u in ids:  # lru: recency counter; lru-s: reset, then decayed and credited with attention mass
            self.value[u] = self.load_count if self.cache_strategy == "lru" else 0.0
        return [self.slot_of[u] for u in ids]

    def credit(self, ids: list[int], mass: torch.Tensor) -> None:
        """lru-s: decay every cached unit's value and add the attention mass [len(ids)] of the selected ones."""
        if not self.offload or self.cache_strategy != "lru-s":
            return
        for u in self.value:
            self.value[u] *= self.score_decay
        for u, m in zip(ids, mass.tolist()):
            self.value[u] += m
