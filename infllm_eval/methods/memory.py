"""State containers shared by the streaming methods (InfLLM, StreamingLLM, LM-Infinite).

`SlidingKV` holds the un-rotated K/V of recent tokens (the local window plus InfLLM's remainder) addressed by
absolute position, with the per-query-head representative scores InfLLM accumulates; dropping old tokens is O(1)
and the buffer compacts itself, so its size stays bounded by the window, not the context.

`UnitStore` holds InfLLM's memory units: K/V of `block_size` tokens each, plus one representative vector per unit
and query head. With `offload` the units live in host memory (pinned on CUDA with `pin_memory`) and only
`max_cached_block` of them per layer are resident on the device, in a cache with the reference's `lru` / `lru-s`
policies. The policy decides which units stay resident; it never changes which units are attended, so it changes
speed, never outputs. `SideStream` (the reference's `async_global_stream`) moves those copies to a second CUDA
stream.

Unit storage past RAM (`UnitStore(unit_dtype=, scratch=)`): units may be stored in a narrower dtype than the one
attention computes in (`unit_dtype`, e.g. bfloat16 for an fp32 run: half the bytes; a gather converts them back),
and their slabs may be memory maps of files under a scratch directory (`scratch`, the run's `offload_dir`) instead
of anonymous memory: the operating system then writes them to disk and pages them in when read. A unit's pages
leave the process's resident set as soon as it is written and after each read (`madvise(MADV_DONTNEED)`: for a
shared file map that drops the mapping, never the data), so the process's peak memory no longer grows with the
context; the page cache, which the kernel reclaims under pressure, holds what was recently used.
"""

from __future__ import annotations

import math
import mmap

import torch


def glibc():
    """glibc via ctypes, or None where there is none (loaded once)."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.mallopt  # noqa: B018 - must exist
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC or None


_LIBC = None
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest M_MMAP_THRESHOLD on 64-bit; the engine sets it on CPU
SLAB_BYTES = 64 * 2**20  # CPU memory-unit slabs (virtual: only written units are resident)


def host_slab(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor in its own anonymous memory map: pages become resident when written and go back
    to the OS when the tensor (and every view of it) is freed. glibc would serve a large block from free heap
    memory that is already resident (the engine keeps freed memory in the heap), tail included. (`FileSlab`: the
    same in a map of a file.)"""
    return _frombuffer(mmap.mmap(-1, max(_nbytes(shape, dtype), 1)), shape, dtype)


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def _frombuffer(buf, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.frombuffer(buf, dtype=dtype, count=math.prod(shape)).view(shape)


class FileSlab:
    """A CPU tensor in a shared memory map of an unnamed file under `scratch` (`tempfile.TemporaryFile`: unlinked
    at once, so a killed run leaves nothing on disk; its blocks are freed when the map is). `release(a, b)` drops
    bytes [a, b) of the tensor, and the pages around them that a read may have mapped, from the process's resident
    set; the data stay in the file and the page cache (for a shared file map MADV_DONTNEED drops the mapping, not
    the contents), and the next read pages them in again."""

    PAGE = mmap.PAGESIZE
    #: Linux maps up to this many bytes of cached pages around a read fault (`fault_around_bytes`, default 64 KiB,
    #: aligned to it): `release` widens its range to that alignment, so neighbours mapped by a read go too
    FAULT_AROUND = 65536

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, scratch: str):
        import tempfile

        nbytes = max(_nbytes(shape, dtype), 1)
        with tempfile.TemporaryFile(dir=scratch, prefix="infllm-eval-units-") as f:
            f.truncate(nbytes)  # sparse: blocks are allocated as pages are written
            self.map = mmap.mmap(f.fileno(), nbytes)  # the map keeps its own descriptor
        self.tensor = _frombuffer(self.map, shape, dtype)

    def release(self, start: int, end: int) -> None:
        """Bytes [start, end) widened to FAULT_AROUND alignment of their virtual addresses (the kernel aligns its
        fault-around window there; the map itself is only page-aligned) leave the resident set."""
        base, fa = self.tensor.data_ptr(), self.FAULT_AROUND
        a = max(0, (base + start) // fa * fa - base)
        b = min(-(-(base + end) // fa) * fa - base, len(self.map) // self.PAGE * self.PAGE)
        if b > a:
            self.map.madvise(mmap.MADV_DONTNEED, a, b - a)


def _buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A long-lived window buffer: on CPU in its own memory map (`host_slab`), so it never sits between the heap's
    per-chunk temporaries, else a plain tensor. Measured on SmolLM2 InfLLM (probes/memory_probe.py 32768): with
    the 30 layers' windows in the heap, memory beyond the stored K/V grew 252 -> 327 MB from the first 8K chunk to
    the second; in maps it stays flat (353, 349, 345, 341)."""
    return host_slab(shape, dtype) if device.type == "cpu" else torch.empty(shape, dtype=dtype, device=device)


class SideStream:
    """`async_global_stream`: copies between host memory and the device run on a second CUDA stream, so they overlap
    with the work queued on the compute stream. `copy` first makes the side stream wait for everything queued so far
    on the compute stream (the sources are written, and no queued kernel still reads a destination about to be
    overwritten) and returns an event; the compute stream waits for that event (`wait`) only where it next touches
    the copied memory. `cuda` is the torch.cuda module (tests pass a stand-in that records the order of calls)."""

    def __init__(self, device: torch.device, cuda=torch.cuda):
        self.cuda, self.device = cuda, device
        self.stream = cuda.Stream(device)

    def copy(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]):
        """dst.copy_(src) for each (dst, src) on the side stream; returns the event that marks them done."""
        self.stream.wait_stream(self.cuda.current_stream(self.device))
        with self.cuda.stream(self.stream):
            for dst, src in pairs:
                dst.copy_(src, non_blocking=True)
                if src.is_cuda:  # the caching allocator must not hand src's memory out before the copy has run
                    src.record_stream(self.stream)
            event = self.cuda.Event()
            event.record(self.stream)
        return event

    def wait(self, event) -> None:
        """The compute stream waits for `event` (from `copy`) before its next kernel; None: nothing to wait for."""
        if event is not None:
            self.cuda.current_stream(self.device).wait_event(event)


class SlidingKV:
    def __init__(self, like_k: torch.Tensor, n_heads: int, capacity: int):
        B, Hkv, _, D = like_k.shape
        self.k, self.v = (_buffer((B, Hkv, capacity, D), like_k.dtype, like_k.device) for _ in range(2))
        self.score = _buffer((B, n_heads, capacity), torch.float32, like_k.device).zero_()
        self.off = 0  # buffer index of position `start`
        self.start = 0  # absolute position of the oldest kept token
        self.end = 0  # absolute position after the newest token
        self.before_overwrite = None  # called before compaction overwrites dropped tokens (side-stream readers)

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
        if self.before_overwrite is not None:
            self.before_overwrite()
        cap = max(self.k.shape[2], 2 * need)
        for name in ("k", "v", "score"):
            old = getattr(self, name)
            new = _buffer((*old.shape[:2], cap, *old.shape[3:]), old.dtype, old.device) if cap != old.shape[2] else old
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

    def copy(self, capacity: "int | str | None" = None) -> "SlidingKV":
        """An independent copy holding the kept tokens (and their scores) only, in buffers of `capacity` tokens
        (None: the same capacity; "kept": just the kept tokens, for a snapshot); `before_overwrite` is not carried (the
        owner sets it)."""
        new = object.__new__(SlidingKV)
        used = self.end - self.start
        cap = max(used, 1) if capacity == "kept" else (capacity or self.k.shape[2])
        for name in ("k", "v", "score"):
            old = getattr(self, name)
            buf = _buffer((*old.shape[:2], max(cap, used), *old.shape[3:]), old.dtype, old.device)
            buf[:, :, :used] = old[:, :, self.off : self.off + used]
            setattr(new, name, buf)
        new.off, new.start, new.end, new.before_overwrite = 0, self.start, self.end, None
        return new


class UnitStore:
    """Memory units of one layer: each unit's K and V [B, H_kv, block_size, D] in slabs of `slab_units` units (in
    host memory with offload; `unit_kv(u)` finds them), and the representative vectors of all units in one tensor
    [U, B, H, D] on the compute device.

    A unit is written once into a slab and never moved: no buffer is regrown and copied as the context grows.
    CPU slabs are anonymous memory maps (`host_slab`): a slab's unwritten tail is not resident, and the heap's
    temporaries cannot fragment around units. Pinned (CUDA offload) and device slabs hold 64 units. Measured on
    SmolLM2, 8K -> 24K tokens, host memory beyond the stored K/V: +270 MB with one buffer per layer regrown x1.5,
    +260 MB with one heap tensor per unit (fragmentation), flat with mapped slabs (README, *bench*)."""

    def __init__(self, like_k, n_heads: int, block_size: int, offload: bool, max_cached_block: int,
                 cache_strategy: str, score_decay: float | None, pin_memory: bool = True,
                 side: SideStream | None = None, repr_on_host: bool = False, unit_dtype: torch.dtype | None = None,
                 scratch: str | None = None):
        B, Hkv, _, D = like_k.shape
        self.block_size, self.offload = block_size, offload
        self.device = like_k.device
        self.dtype = like_k.dtype  # what gather returns (attention's dtype)
        self.unit_dtype = unit_dtype or like_k.dtype  # what the slabs store
        # file-backed slabs under `scratch` hold units that live in host memory (CPU, or CUDA with offload)
        self.scratch = scratch if (offload or like_k.device.type == "cpu") else None
        self.pin = offload and like_k.device.type == "cuda" and pin_memory and self.scratch is None
        # with offload: unit copies on the side stream (InfLLM makes one on CUDA); `written` / `loaded` mark the
        # last copies of new units to the host and of units into device slots
        self.side = side if offload else None
        self.written = self.loaded = None
        self.staged: tuple[list[int], list[int]] | None = None  # (ids, slots) of the last `load`
        self.unit_shape = (B, Hkv, block_size, D)
        self.mapped = (offload and not self.pin) or like_k.device.type == "cpu"
        unit_bytes = _nbytes(self.unit_shape, self.unit_dtype)
        self.slab_units = max(64, SLAB_BYTES // unit_bytes) if self.mapped else 64
        self.slabs: list[tuple[torch.Tensor, torch.Tensor]] = []  # (K, V) [slab_units, B, H_kv, block_size, D]
        self.files: list[tuple[FileSlab, FileSlab]] = []  # with scratch: the slabs' file maps (to release pages)
        self.unit_bytes = 2 * unit_bytes  # K and V
        # faiss (reference): the representative vectors in host memory, scored there
        self._repr = _buffer((16, B, n_heads, D), like_k.dtype,
                             torch.device("cpu") if repr_on_host else self.device)
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
        """k/v [B, H_kv, block_size, D] (copied: callers pass views of their window), rep [B, H, D]."""
        i = self.n % self.slab_units
        if i == 0:
            shape, dt = (self.slab_units, *self.unit_shape), self.unit_dtype
            if self.scratch is not None:
                files = (FileSlab(shape, dt, self.scratch), FileSlab(shape, dt, self.scratch))
                self.files.append(files)
                self.slabs.append((files[0].tensor, files[1].tensor))
            else:
                self.slabs.append(tuple(host_slab(shape, dt) if self.mapped else
                                        torch.empty(shape, dtype=dt, device="cpu" if self.offload else self.device,
                                                    pin_memory=self.pin) for _ in range(2)))
        sk, sv = self.slabs[-1]
        if self.side is not None:
            self.written = self.side.copy([(sk[i], k), (sv[i], v)])
        else:
            sk[i].copy_(k, non_blocking=True)
            sv[i].copy_(v, non_blocking=True)
            self._release([self.n])  # (a side-stream copy may still be writing: its pages leave on the next read)
        if self.n == self._repr.shape[0]:  # x1.5; a few KB per unit. On CPU a memory map (`_buffer`): its unwritten
            # tail is not resident and the old one goes back to the OS, where heap tensors left their unused tail and
            # the freed old one behind (probes/memory_probe.py 65536 topk=16: workspace +29 MB at 49K tokens)
            new = _buffer((self.n + max(16, self.n // 2), *self._repr.shape[1:]), self._repr.dtype, self._repr.device)
            new[: self.n] = self._repr
            self._repr = new
        self._repr[self.n] = rep
        self.n += 1

    def rewind(self, n: int) -> None:
        """Back to the first `n` units (prefix reuse: units are written once and never changed, so the first n are
        what they were when n had been stored); later `add`s overwrite the units after them. Slabs beyond the n
        units' are dropped, and the device cache forgets every unit (it changes speed, never outputs)."""
        assert 0 <= n <= self.n, (n, self.n)
        self.n = n
        keep = -(-n // self.slab_units)
        del self.slabs[keep:]
        del self.files[keep:]
        self.slot_of.clear()
        self.value.clear()
        self.staged = None

    @property
    def reprs(self) -> torch.Tensor:
        return self._repr[: self.n]  # [U, B, H, D]

    def nbytes_host(self) -> int:
        """Bytes of the stored units' K/V in their storage dtype (in host memory or files with offload, else on
        the device)."""
        return self.n * self.unit_bytes

    def _release(self, ids: list[int]) -> None:
        """File-backed slabs: units `ids` leave the process's resident set (their data stay in the files)."""
        if not self.files:
            return
        per = self.unit_bytes // 2
        for u in ids:
            fk, fv = self.files[u // self.slab_units]
            a = (u % self.slab_units) * per
            fk.release(a, a + per)
            fv.release(a, a + per)

    def unit_kv(self, u: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit u's stored K, V [B, H_kv, block_size, D] (views into its slab)."""
        sk, sv = self.slabs[u // self.slab_units]
        return sk[u % self.slab_units], sv[u % self.slab_units]

    def nbytes(self) -> int:
        """Bytes on the compute device: the representative vectors, plus the units' K/V (without offload, unless
        they are in files under `scratch`) or the occupied cache slots (with offload)."""
        reprs = self.n * self._repr[0].numel() * self._repr.element_size() if self._repr.device == self.device else 0
        if not self.offload:
            return reprs + (0 if self.scratch is not None else self.nbytes_host())
        return reprs + 2 * len(self.slot_of) * self.slot_k[0].numel() * self.slot_k.element_size()

    def gather(self, ids: list[int], tail: tuple[torch.Tensor, torch.Tensor] | None = None):
        """K/V of the selected units concatenated along tokens, then `tail` (K, V [B, H_kv, T, D]) if given:
        [B, H_kv, len(ids)*block_size (+ T), D], in one copy."""
        if self.offload:
            staged, self.staged = self.staged, None
            slots = staged[1] if staged is not None and staged[0] == list(ids) else self._load(ids)
            if self.side is not None:
                self.side.wait(self.loaded)
            ks, vs = [self.slot_k[s] for s in slots], [self.slot_v[s] for s in slots]  # compute dtype
        elif self.unit_dtype != self.dtype:  # narrower storage: one conversion into the compute dtype
            n, T = len(ids) * self.block_size, 0 if tail is None else tail[0].shape[2]
            out = []
            for i in range(2):
                o = torch.empty((*self.unit_shape[:2], n + T, self.unit_shape[3]), dtype=self.dtype,
                                device=self.device)
                if ids:
                    torch.cat([self.unit_kv(u)[i] for u in ids], dim=2, out=o[:, :, :n])
                if T:
                    o[:, :, n:] = tail[i]
                out.append(o)
            self._release(ids)
            return out[0], out[1]
        else:
            pairs = [self.unit_kv(u) for u in ids]
            ks, vs = [k for k, _ in pairs], [v for _, v in pairs]
        if tail is not None:
            ks, vs = ks + [tail[0]], vs + [tail[1]]
        k, v = torch.cat(ks, dim=2), torch.cat(vs, dim=2)
        if not self.offload:
            self._release(ids)
        return k, v

    def settle_writes(self) -> None:
        """The compute stream waits for the side stream's copies of new units (before their source is overwritten)."""
        if self.side is not None:
            self.side.wait(self.written)

    # -- device cache (reference §2.8) -----------------------------------------------------------------------------
    def load(self, ids: list[int]) -> None:
        """Bring the units `ids` into device slots now (with a side stream the copies start here and `gather(ids)`
        waits for them), so they overlap with the work queued before the gather."""
        if self.offload:
            self.staged = (list(ids), self._load(ids))

    def _load(self, ids: list[int]) -> list[int]:
        self.load_count += 1
        missing = [u for u in ids if u not in self.slot_of]
        n_remove = len(self.slot_of) - self.max_cached_block + len(missing)
        if n_remove > 0:
            victims = sorted((u for u in self.slot_of if u not in set(ids)), key=lambda u: self.value[u])[:n_remove]
            for u in victims:
                del self.slot_of[u], self.value[u]
        free = sorted(set(range(self.max_cached_block)) - set(self.slot_of.values()))
        pairs = []
        for u in missing:
            s = free.pop(0)
            k, v = self.unit_kv(u)
            pairs += [(self.slot_k[s], k), (self.slot_v[s], v)]
            self.slot_of[u] = s
        if self.side is not None:
            self.loaded = self.side.copy(pairs) if pairs else self.loaded
        else:
            for dst, src in pairs:
                dst.copy_(src, non_blocking=True)
            self._release(missing)
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
