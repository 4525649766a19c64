"""Issue 28: InfLLM's memory units in a storage dtype of their own (`method.params.unit_dtype`) and in file-backed
memory maps under `offload_dir`, the OS paging them; `plan` counting them on disk; per-sample peak memory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from method_helpers import conf_params, prompt, run_steps, tiny

from infllm_eval.engine import Engine, _peak_rss_bytes, _reset_peak_rss
from infllm_eval.errors import UserError
from infllm_eval.methods.infllm import InfLLM
from infllm_eval.methods.memory import FileSlab, UnitStore

# several units per layer (topk 3 of ~20), a chunk that splits units and execution blocks
SMALL = dict(conf_params("infllm"), n_local=64, n_init=8, topk=3, block_size=16, repr_topk=2, exc_block_size=32,
             max_cached_block=4, offload=False)
N, CHUNK = 400, 48


def _steps(m, ids, offload_dir=None, **params):
    method = InfLLM(**dict(SMALL, **params))
    eng = Engine(m, method, torch.device("cpu"), torch.float32, offload_dir=offload_dir)
    states = eng.new_states()
    n = ids.shape[0]
    with torch.no_grad():
        logits = [eng.prefill(states, ids, CHUNK)]
        for i in range(5):
            t = int(torch.argmax(logits[-1]))
            logits.append(eng.forward(states, torch.tensor([[t]]), n + i, logits=True))
    return torch.stack(logits), method.memory_stats(eng.method_states(states)), states


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-qwen2"])
@pytest.mark.parametrize("offload", [False, True])
def test_default_storage_and_file_backed_units_give_bit_identical_outputs(arch, offload, tmp_path):
    """unit_dtype null (the compute dtype) and float32 spelt out, units in memory or in files under offload_dir,
    with and without the offload path's slot cache: every decoded position's logits are bit-identical."""
    m = tiny(arch)
    ids = prompt(m, N, seed=5)
    base, stats, _ = _steps(m, ids, offload=offload)
    per_layer = stats["units"] // m.config.num_hidden_layers
    assert per_layer > 5 * SMALL["topk"] and stats["unit_storage"] == "memory"  # lookups chose among many units
    for kw in (dict(unit_dtype="float32"), dict(offload_dir=str(tmp_path)),
               dict(unit_dtype="float32", offload_dir=str(tmp_path))):
        logits, st, _ = _steps(m, ids, offload=offload, **kw)
        assert torch.equal(logits, base), kw
        assert st["unit_bytes"] == stats["unit_bytes"]
    assert st["unit_storage"] == "files"
    # the same numbers as the plain `run_steps` path the exactness tests use
    assert torch.equal(run_steps(m, InfLLM(**dict(SMALL, offload=offload)), ids, CHUNK)[0], base)


@pytest.mark.parametrize("unit_dtype", ["bfloat16", "float16"])
def test_narrow_units_halve_their_bytes_and_change_logits_by_their_rounding_only(unit_dtype, tmp_path):
    """bfloat16 / float16 units: half the bytes; the logits move (the units really are rounded) but only by
    rounding: equal, to fp32 precision, to an fp32 run whose keys and values are rounded the same way before
    they are stored (a model whose k_proj / v_proj outputs are rounded would round the window too, so the
    comparison is against the stored units: a re-run with the unit store's writes rounded by hand)."""
    m = tiny("tiny-llama")
    ids = prompt(m, N, seed=5)
    base, stats, _ = _steps(m, ids)
    narrow, nstats, states = _steps(m, ids, unit_dtype=unit_dtype, offload_dir=str(tmp_path))
    assert nstats["unit_bytes"] * 2 == stats["unit_bytes"] and nstats["unit_dtype"] == unit_dtype
    store = states[0]["units"]
    assert store.slabs[0][0].dtype == getattr(torch, unit_dtype)
    diff = (narrow - base).abs().max().item()
    assert diff > 0  # the rounding is real

    # reference: fp32 storage whose writes are rounded through the narrow dtype (what bf16 storage must equal)
    dt = getattr(torch, unit_dtype)
    add = UnitStore.add

    def rounded_add(self, k, v, rep):
        add(self, k.to(dt).to(k.dtype), v.to(dt).to(v.dtype), rep)

    UnitStore.add = rounded_add
    try:
        ref, _, _ = _steps(m, ids)
    finally:
        UnitStore.add = add
    assert (narrow - ref).abs().max().item() <= 1e-5 < diff


def test_file_backed_units_leave_the_resident_set_and_the_disk_when_freed(tmp_path):
    """Units under offload_dir are in unnamed files there (nothing is left on disk, even while running); their
    pages leave the resident set once written and after each read; freeing the states frees the files."""
    m = tiny("tiny-llama")
    ids = prompt(m, 1200, seed=5)
    # units of 128 tokens: 4 pages each on the tiny model (1 kv head x 32 dims x 4 bytes per token), so whole
    # pages can leave (a unit smaller than a page stays resident, as a partial page at a unit's edge does)
    _, stats, states = _steps(m, ids, offload_dir=str(tmp_path), block_size=128, n_local=128)
    assert list(tmp_path.iterdir()) == []  # unlinked at once
    maps = _mapped(tmp_path)
    assert maps, "no file-backed map under offload_dir"
    slab_bytes = sum(size for size, _ in maps)
    resident = sum(rss for _, rss in maps)
    assert slab_bytes >= stats["unit_bytes"] > 0
    assert resident <= stats["unit_bytes"] // 8, (resident, stats["unit_bytes"])
    del states
    import gc

    gc.collect()
    assert _mapped(tmp_path) == []


def _mapped(folder: Path) -> list[tuple[int, int]]:
    """(size, Rss) in bytes of this process's mappings of files under `folder` (/proc/self/smaps)."""
    out, cur = [], None
    with open("/proc/self/smaps") as f:
        for line in f:
            parts = line.split()
            if "-" in parts[0] and len(parts) >= 5 and ":" in parts[3]:  # a mapping's header line
                path = " ".join(parts[5:])
                cur = path.startswith(str(folder)) and [0, 0]
                if cur:
                    out.append(cur)
            elif cur and parts[0] == "Size:":
                cur[0] = int(parts[1]) * 1024
            elif cur and parts[0] == "Rss:":
                cur[1] = int(parts[1]) * 1024
    return [tuple(x) for x in out]


def test_file_slab_release_keeps_the_data(tmp_path):
    slab = FileSlab((4, 1024), torch.float32, str(tmp_path))
    slab.tensor.copy_(torch.arange(4096, dtype=torch.float32).view(4, 1024))
    before = _mapped(tmp_path)[0][1]
    slab.release(0, 4 * 4096)
    assert _mapped(tmp_path)[0][1] < before
    assert torch.equal(slab.tensor.flatten(), torch.arange(4096, dtype=torch.float32))


def test_unit_dtype_and_offload_dir_are_checked_before_anything_runs(tmp_path):
    with pytest.raises(UserError, match="unit_dtype must be null"):
        InfLLM(**dict(SMALL, unit_dtype="bf16")).validate()
    from infllm_eval.methods.full import FullAttention

    with pytest.raises(UserError, match="keeps no memory units"):
        FullAttention(**conf_params("full")).check_offload_dir(str(tmp_path), "cpu")
    with pytest.raises(UserError, match="offload=false"):
        InfLLM(**dict(SMALL, offload=False)).check_offload_dir(str(tmp_path), "cuda")
    InfLLM(**dict(SMALL, offload="auto")).check_offload_dir(str(tmp_path), "cuda")


@pytest.mark.parametrize("args, message", [
    (["offload_dir={tmp}/missing"], "is not an existing writable directory"),
    (["method=full", "offload_dir={tmp}"], "keeps no memory units"),
    (["method=infllm", "method.params.unit_dtype=fp8"], "unit_dtype must be null"),
])
def test_cli_refuses_bad_storage_settings_in_one_sentence_and_writes_nothing(tmp_path, args, message):
    out = tmp_path / "out"
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    r = subprocess.run([sys.executable, "-m", "infllm_eval.cli", "run", "model=tiny-llama", "method=infllm",
                        *args, f"output_dir={out}", "task.lengths=[256]", "task.depths=[0.5]"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


def test_plan_puts_units_on_disk_with_offload_dir_and_counts_them_in_their_dtype(tmp_path):
    from infllm_eval.commands.plan import GIB, plan_cells, plan_markdown

    base = ["model=smollm2", "method=infllm", "task.lengths=[1048576]", "task.depths=[0.5]"]
    mem, = plan_cells([base], host_budget_gb=24)
    assert not mem["fits_host"] and mem["kv_disk"] == 0
    assert "offload_dir=DIR puts its units on disk" in plan_markdown([mem])
    disk, = plan_cells([[*base, f"offload_dir={tmp_path}"]], host_budget_gb=24)
    half, = plan_cells([[*base, f"offload_dir={tmp_path}", "method.params.unit_dtype=bfloat16"]], host_budget_gb=24)
    # SmolLM2: 30 layers x 3 kv heads x 64 dims x 2 (k, v) x 4 bytes = 45 KiB per token of units
    units = 1048576 + 32 - 2048 - 128
    assert disk["kv_disk"] == units * 30 * 3 * 64 * 2 * 4 and half["kv_disk"] * 2 == disk["kv_disk"]
    assert disk["fits_host"] and disk["peak"] < 3 * GIB < mem["peak"] - 40 * GIB
    # the representative vectors stay in memory: 9 heads x 64 x 4 bytes per unit and layer
    assert disk["kv_device"] - half["kv_device"] == 0
    assert disk["kv_device"] >= units // 128 * 9 * 64 * 4 * 30


def test_per_sample_peak_is_the_samples_own():
    """The peak a sample records is the process's peak since the sample started (VmHWM, reset at its start), not
    the process's since it began: a 64 MB spike before the reset does not show after it."""
    import mmap

    if not _reset_peak_rss():
        pytest.skip("this kernel cannot reset the peak resident set")
    base = _peak_rss_bytes()
    spike = mmap.mmap(-1, 64 * 2**20)  # fresh pages (the heap may hold freed memory that is already resident)
    spike.write(b"x" * (64 * 2**20))
    high = _peak_rss_bytes()
    assert high >= base + 60 * 2**20
    spike.close()
    assert _reset_peak_rss()
    assert _peak_rss_bytes() < high - 32 * 2**20


def test_release_covers_the_kernels_fault_around_window_on_a_map_not_aligned_to_it(tmp_path):
    """A read fault maps the cached pages of the 64 KiB-aligned (virtual address) window around it; a map is only
    page-aligned, so `release` must widen by addresses, not by offsets into the map (seen: a third of the units
    read stayed resident in a 128K run when it widened by offsets)."""
    slabs = [FileSlab((4 * 65536 + 4096 * (i + 1),), torch.uint8, str(tmp_path)) for i in range(16)]
    slab = next((s for s in slabs if s.tensor.data_ptr() % FileSlab.FAULT_AROUND), None)
    if slab is None:
        pytest.skip("every map happened to start on a fault-around boundary")
    n = slab.tensor.numel()
    slab.tensor.fill_(1)  # every page written: in the page cache, so a read fault maps its neighbours
    slab.release(0, n)
    shift = slab.tensor.data_ptr() % FileSlab.FAULT_AROUND
    for at in range(65536, n - 65536, 65536):  # read one byte inside each window, then release that byte
        assert int(slab.tensor[at - shift + 100]) == 1
        slab.release(at - shift + 100, at - shift + 101)
    mine = [rss for size, rss in _mapped(tmp_path) if size == n]
    assert mine == [0], mine
