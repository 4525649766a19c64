"""Exactness and invariants of the context methods on the tiny random-init models (fp32, CPU)."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from infllm_reference import DenseInfLLM, DenseWindow
from method_helpers import ARCHS, conf_params, hf_greedy, prompt, run, run_steps, tiny
from omegaconf import OmegaConf

from infllm_eval.engine import Engine
from infllm_eval.errors import UserError
from infllm_eval.methods import kernels, make_method
from infllm_eval.methods.full import FullAttention
from infllm_eval.methods.infllm import InfLLM, rank, top
from infllm_eval.methods.lminfinite import LMInfinite
from infllm_eval.methods.memory import SideStream, SlidingKV
from infllm_eval.methods.streamingllm import StreamingLLM

FULL, STREAMING, LMINFINITE = conf_params("full"), conf_params("streamingllm"), conf_params("lminfinite")
SMALL = dict(conf_params("infllm"), n_local=64, n_init=8, topk=3, block_size=16, repr_topk=2, exc_block_size=32,
             max_cached_block=4, cache_strategy="lru", score_decay=None, chunk_topk_calc=None, perhead=False,
             base=None, distance_scale=None, global_distance=None, prefill_mask_fix=True, offload=False)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("chunk", [1, 13, 64, 1000])
def test_full_reproduces_unpatched_model(arch, chunk):
    m = tiny(arch)
    ids = prompt(m, 150)
    ref_logits, ref_tokens = hf_greedy(m, ids, 8)
    logits, tokens = run(m, FullAttention(**FULL), ids, chunk, 8)
    assert (logits - ref_logits).abs().max() <= 1e-4
    assert tokens == ref_tokens


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-qwen2"])  # qwen2: q/k/v biases go through addmm
def test_engine_buffers_carry_nothing_between_samples(arch):
    """The engine reuses its activation buffers (`Workspace`) across chunks and samples: a short sample after a
    long one gives the unpatched model's logits, a repeat of the long one allocates no new buffer."""
    m = tiny(arch)
    eng = Engine(m, InfLLM(**SMALL), torch.device("cpu"), torch.float32)
    long, short = prompt(m, 300, seed=2), prompt(m, 40, seed=3)
    first = eng.generate(long, 4, 96, stop_ids=[]).tokens
    size = eng.ws.nbytes()
    assert size > 0
    logits = eng.prefill(eng.new_states(), short, 16)
    assert (logits - hf_greedy(m, short, 0)[0]).abs().max() <= 1e-4  # within the window: InfLLM == full == HF
    assert eng.generate(long, 4, 96, stop_ids=[]).tokens == first
    assert eng.ws.nbytes() == size


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", [
    InfLLM(**dict(SMALL, n_local=512, exc_block_size=64)),
    StreamingLLM(**dict(STREAMING, n_init=8, n_local=512)),
    LMInfinite(**dict(LMINFINITE, n_init=8, n_local=512)),
])
def test_window_covering_input_equals_full(arch, method):
    m = tiny(arch)
    ids = prompt(m, 300)
    full_logits, full_tokens = run(m, FullAttention(**FULL), ids, 64)
    logits, tokens = run(m, method, ids, 64)
    assert (logits - full_logits).abs().max() <= 1e-4
    assert tokens == full_tokens


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("fix", [True, False])
@pytest.mark.parametrize("chunk", [37, 96, 299])
def test_infllm_matches_dense_reference(arch, fix, chunk):
    """Input ~5x n_local: units are packed, retrieved, and the remainder is attended; the logits after the prompt
    and after every decoded token. Execution blocks start at each forward call's start, so chunk 37 moves their
    boundaries (and the units packed after them) against 96 and 299."""
    m = tiny(arch)
    ids = prompt(m, 300, seed=1)
    params = dict(SMALL, prefill_mask_fix=fix)
    logits, tokens = run_steps(m, InfLLM(**params), ids, chunk)
    ref_logits, ref_tokens = run_steps(m, DenseInfLLM(**params), ids, chunk)
    assert (logits - ref_logits).abs().max() <= 1e-4
    assert tokens == ref_tokens
    full_logits, _ = run(m, FullAttention(**FULL), ids, chunk)
    assert (logits[0] - full_logits).abs().max() > 1e-3  # the memory really is in play


#: InfLLM's switches that change what is attended, each against the dense reference (which implements them from
#: the spec), on a GQA and a non-GQA model, with a chunk that splits execution blocks (50) and one call (299)
SWITCHES = [
    ("perhead", dict(perhead=True), "tiny-mistral", 50),
    ("perhead", dict(perhead=True), "tiny-qwen2", 299),
    ("chunk_topk_calc", dict(chunk_topk_calc=128), "tiny-mistral", 299),
    ("chunk_topk_calc", dict(chunk_topk_calc=128), "tiny-qwen2", 50),
    ("chunk_topk_calc", dict(chunk_topk_calc=64, perhead=True), "tiny-llama", 299),
    ("head_reduce", dict(head_reduce="max"), "tiny-llama", 96),
    ("head_reduce", dict(head_reduce="max"), "tiny-qwen2", 50),
    ("base", dict(base=500.0), "tiny-mistral", 96),
    ("distance_scale", dict(distance_scale=0.25), "tiny-qwen2", 96),
]


@pytest.mark.parametrize("name,switch,arch,chunk", SWITCHES, ids=[f"{s[0]}-{s[2]}-{s[3]}" for s in SWITCHES])
def test_infllm_switches_match_dense_reference_and_change_outputs(name, switch, arch, chunk):
    """perhead: every query head retrieves its own topk units by its own score; chunk_topk_calc: the selections of
    several execution blocks are made at once from the units existing then (stale for units packed later in the
    group); head_reduce max; base and distance_scale reach every stage's rotation. Logits of every decoded
    position = the dense reference's, and the switch really changes them (> 1e-3)."""
    m = tiny(arch)
    ids = prompt(m, 300, seed=1)
    params = dict(SMALL, **switch)
    logits, tokens = run_steps(m, InfLLM(**params), ids, chunk)
    ref_logits, ref_tokens = run_steps(m, DenseInfLLM(**params), ids, chunk)
    assert (logits - ref_logits).abs().max() <= 1e-4 and tokens == ref_tokens
    plain, _ = run_steps(m, InfLLM(**dict(SMALL, **{k: v for k, v in switch.items() if k != name})), ids, chunk)
    assert (logits[0] - plain[0]).abs().max() > 1e-3  # without the switch (`name`)


def test_rank_orders_equal_scores_by_lower_index_first():
    """The one ranking every unit lookup and representative-token choice uses: best score first, equal scores
    lower index first (torch.topk orders ties as its kernel happens to: on this CPU zeros(13).topk(3) is not
    [0, 1, 2])."""
    score = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, -0.0, 0.0], [0.0] * 7])
    assert rank(score).tolist() == [[1, 2, 4, 3, 0, 5, 6], list(range(7))]
    assert top(score, 3).tolist() == [[1, 2, 4], [0, 1, 2]]
    assert top(torch.zeros(2, 4, 300), 5).tolist() == [[list(range(5))] * 4] * 2  # [nb, H, U]: per head (perhead)
    method = InfLLM(**SMALL)
    Engine(tiny("tiny-llama"), method, torch.device("cpu"), torch.float32)
    keys = torch.randn(1, 2, 16, 16, generator=torch.Generator().manual_seed(0))
    score = torch.zeros(1, 4, 16)
    score[0, 1, [3, 9, 12]] = 1.0  # head 1: three tied best tokens, repr_topk 2 takes 3 and 9
    want = torch.stack([keys[0, 0, :2].mean(0), keys[0, 0, [3, 9]].mean(0), keys[0, 1, :2].mean(0),
                        keys[0, 1, :2].mean(0)])
    assert torch.allclose(method._representative(keys, score)[0], want)


def _tied_in_layer_0(arch: str):
    """The tiny model with layer 0's query projection zeroed: every global query there is 0, so every memory unit
    scores exactly 0 (an exact tie of all units, in fp32 and in the reference's fp64 alike)."""
    m = copy.deepcopy(tiny(arch))
    q_proj = m.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        q_proj.weight.zero_()
        if q_proj.bias is not None:
            q_proj.bias.zero_()
    return m


@pytest.mark.parametrize("switch", [{}, dict(perhead=True), dict(chunk_topk_calc=96), dict(head_reduce="max"),
                                    dict(neighbor_units=1)], ids=["shared", "perhead", "chunk_topk_calc",
                                                                  "head_reduce", "neighbor_units"])
def test_tied_unit_scores_select_the_lower_units_as_the_dense_reference(switch):
    """Every lookup of layer 0 ties all units: each path (shared selection, per head, several blocks at once,
    max over heads, with neighbours) takes units 0..topk-1, and the outputs equal the reference's, which breaks
    ties the same way."""
    m = _tied_in_layer_0("tiny-llama")
    ids = prompt(m, 300, seed=1)
    params = dict(SMALL, **switch)
    method = InfLLM(**params)
    seen = []
    method.observer = lambda event, layer, **d: seen.extend(d["selection"]) if (event, layer) == ("lookup", 0) \
        else None
    logits, tokens = run_steps(m, method, ids, 96)
    first = list(range(SMALL["topk"]))
    assert seen and all((sel.tolist() == [first] * 4) if switch.get("perhead") else sel == first for sel in seen)
    if "neighbor_units" not in switch:  # the reference has no neighbours (an addition beyond the paper)
        ref_logits, ref_tokens = run_steps(m, DenseInfLLM(**params), ids, 96)
        assert (logits - ref_logits).abs().max() <= 1e-4 and tokens == ref_tokens


def test_base_and_distance_scale_set_the_rotation_angles():
    """Rope's angles from first principles: position p * distance_scale times base^(-2i/d) (HF/NeoX halves), with
    the model's theta when base is null; and a method's own Rope takes both from its params."""
    from infllm_eval.rope import Rope

    m = tiny("tiny-llama")
    D = m.config.hidden_size // m.config.num_attention_heads
    pos = torch.tensor([0, 1, 7, 300, 5000])
    for base, scale in [(None, None), (500.0, None), (None, 0.25), (2e6, 0.5)]:
        inv = 1.0 / (base or 10000.0) ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
        angle = (pos.double() * (scale or 1.0))[:, None] * inv
        cos, sin = Rope(m, base=base, distance_scale=scale).cos_sin(pos, torch.zeros(1))
        assert (cos.double() - torch.cat([angle.cos()] * 2, -1)).abs().max() <= 1e-4, (base, scale)
        assert (sin.double() - torch.cat([angle.sin()] * 2, -1)).abs().max() <= 1e-4, (base, scale)
        method = InfLLM(**dict(SMALL, base=base, distance_scale=scale))
        Engine(m, method, torch.device("cpu"), torch.float32)
        assert torch.equal(method.rope.cos_sin(pos, torch.zeros(1))[0], cos)


PAPER_PRESETS = ["mistral-infbench", "llama3-infbench", "mistral-longbench-6k", "mistral-longbench-12k",
                 "passkey-1m"]


@pytest.mark.parametrize("preset", [*PAPER_PRESETS, "infllm-original"])
def test_paper_presets_run_the_reference_masking_under_their_own_name(preset):
    """The paper presets reproduce the released code, its prefill masking included, and name their results
    `infllm-original`; `method=infllm` stays the corrected masking, named `infllm`, with the result key it had."""
    from infllm_eval.config import compose

    cfg = compose(["model=mistral", "method=infllm", f"preset={preset}"])
    assert cfg.method.name == InfLLM.ORIGINAL_NAME and cfg.run_name == "mistral/infllm-original/passkey"
    assert make_method(cfg.method).describe()["prefill_mask_fix"] is False
    plain = compose(["model=mistral", "method=infllm"])
    assert plain.method.name == "infllm" and make_method(plain.method).describe()["prefill_mask_fix"] is True


def test_a_method_name_that_hides_the_masking_is_refused():
    """`infllm` is the corrected masking and `infllm-original` the reference's: a config whose name says the other
    one is refused in one sentence (other names are free, e.g. infllm-maxhead)."""
    from infllm_eval.config import compose

    with pytest.raises(UserError, match="method.name=infllm-original"):
        make_method(compose(["method=infllm", "method.params.prefill_mask_fix=false"]).method)
    with pytest.raises(UserError, match="method.name=infllm "):
        make_method(compose(["method=infllm", "preset=passkey-1m", "method.params.prefill_mask_fix=true"]).method)
    for ok in (["preset=passkey-1m", "method.params.prefill_mask_fix=true", "method.name=infllm"],
               ["preset=infllm-maxhead", "method.params.prefill_mask_fix=false"]):
        make_method(compose(["method=infllm", *ok]).method)


def test_a_report_shows_the_corrected_and_the_reference_masking_as_two_rows(tmp_path):
    """Both variants run on one model and task: two run directories, records and report rows."""
    from infllm_eval.commands.report import cells, load_runs
    from infllm_eval.config import compose
    from infllm_eval.runner import run_cell

    base = ["model=tiny-llama", "method=infllm", "task.lengths=[200]", "task.depths=[0.5]", "task.samples=1",
            "progress=false", f"output_dir={tmp_path}", "model.tiny.initializer_range=0.2",
            "method.params.n_local=64", "method.params.n_init=8", "method.params.topk=2",
            "method.params.block_size=16", "method.params.exc_block_size=32", "method.params.max_cached_block=4",
            "chunk_size=64"]
    for extra in ([], ["preset=infllm-original"]):
        run_cell(compose([*base, *extra]))
    assert {p.name for p in (tmp_path / "tiny-llama").iterdir()} == {"infllm", "infllm-original"}
    df = load_runs(tmp_path)
    table = cells(df, ["model", "method", "task"])
    assert sorted(table["method"]) == ["infllm", "infllm-original"] and (table["n"] == 1).all()


def test_prefill_mask_bug_changes_outputs_and_block_aligned_chunks_agree():
    """Chunks that keep the execution blocks where they were (multiples of exc_block_size, or the whole prompt)
    give the same logits, with either masking; the reference's masking changes them."""
    m = tiny("tiny-llama")
    ids = prompt(m, 300, seed=2)
    for fix in (True, False):
        got = [run(m, InfLLM(**dict(SMALL, prefill_mask_fix=fix)), ids, c)[0] for c in (32, 96, 299)]
        assert all((g - got[0]).abs().max() <= 1e-5 for g in got)
        if fix:
            fixed = got[0]
    assert (got[0] - fixed).abs().max() > 1e-3
    assert InfLLM(**dict(SMALL, prefill_mask_fix=False)).describe()["prefill_mask_fix"] is False


@pytest.mark.parametrize("scheme,cls", [("in-cache", StreamingLLM), ("ceiling", LMInfinite)])
@pytest.mark.parametrize("chunk", [17, 299])
def test_window_methods_match_dense_reference(scheme, cls, chunk):
    m = tiny("tiny-llama")
    ids = prompt(m, 200, seed=3)
    params = dict(STREAMING if cls is StreamingLLM else LMINFINITE, n_init=8, n_local=48)
    logits, tokens = run_steps(m, cls(**params), ids, chunk)
    ref_logits, ref_tokens = run_steps(m, DenseWindow(**dict(params, scheme=scheme)), ids, chunk)
    assert (logits - ref_logits).abs().max() <= 1e-4
    assert tokens == ref_tokens


@pytest.mark.parametrize("policy", [dict(cache_strategy="lru"), dict(cache_strategy="lru-s", score_decay=0.1)])
@pytest.mark.parametrize("slots", [3, 5, 40])
def test_cache_policy_and_size_change_speed_not_outputs(policy, slots):
    m = tiny("tiny-llama")
    ids = prompt(m, 400, seed=4)
    base_logits, base_tokens = run(m, InfLLM(**SMALL), ids, 64)
    method = InfLLM(**dict(SMALL, offload=True, max_cached_block=slots, **policy))
    eng = Engine(m, method, torch.device("cpu"), torch.float32)
    states = eng.new_states()
    logits = eng.prefill(states, ids, 64)
    stats = method.memory_stats(states)
    assert stats["cache_misses"] > 0  # the offload path really ran
    assert torch.equal(logits, base_logits)
    assert run(m, method, ids, 64)[1] == base_tokens


class _LateSide(SideStream):
    """A side stream as late as a GPU may run it, on CPU: `copy` only queues its copies, in order; they run when the
    compute stream waits for their event (`wait`), the queue up to that event. A consumer that reads copied memory
    without waiting, or a writer that overwrites a queued copy's source first, sees other data."""

    def __init__(self):
        self.queue: list[tuple[int, list]] = []
        self.issued = self.waits = 0

    def copy(self, pairs):
        self.issued += 1
        self.queue.append((self.issued, list(pairs)))
        return self.issued

    def wait(self, event):
        if event is None:
            return
        self.waits += 1
        while self.queue and self.queue[0][0] <= event:
            for dst, src in self.queue.pop(0)[1]:
                dst.copy_(src)


@pytest.mark.parametrize("slots", [3, 40])
def test_async_global_stream_waits_where_the_copies_are_used(slots):
    """async_global_stream's protocol with copies that run as late as possible: the units written to the host and
    loaded into device slots on the side stream give exactly the synchronous result (prefill and decoding), so
    every read of copied memory waited for its copy and no source was overwritten before its copy ran."""
    m = tiny("tiny-llama")
    ids = prompt(m, 400, seed=4)
    params = dict(SMALL, offload=True, max_cached_block=slots)
    base_logits, base_tokens = run(m, InfLLM(**params), ids, 64)
    method = InfLLM(**dict(params, async_global_stream=True))
    eng = Engine(m, method, torch.device("cpu"), torch.float32)
    method.side = side = _LateSide()  # InfLLM makes a real one on CUDA only
    logits = eng.prefill(eng.new_states(), ids, 64)
    tokens = eng.generate(ids, 6, 64, stop_ids=[]).tokens
    assert side.issued > 0 and side.waits > 0  # the copies went through the side stream
    assert torch.equal(logits, base_logits) and tokens == base_tokens


def test_window_compaction_calls_before_overwrite_while_dropped_tokens_are_intact():
    """SlidingKV: compaction may overwrite tokens just dropped, the source of a unit copy still queued on the side
    stream; `before_overwrite` (InfLLM: wait for those copies) runs first, while they still hold their values."""
    kv = SlidingKV(torch.zeros(1, 1, 1, 2), n_heads=1, capacity=8)
    intact = []
    pending = {}

    def hook():
        intact.append(torch.equal(pending["view"], pending["want"]))

    kv.before_overwrite = hook
    for step in range(6):
        k = torch.arange(3 * step, 3 * step + 3, dtype=torch.float32).view(1, 1, 3, 1).expand(1, 1, 3, 2)
        kv.append(k, -k)
        if kv.end - kv.start > 3:  # drop the oldest 3 tokens, as InfLLM packs a unit: their view stays "in flight"
            view = kv.kv(kv.start, kv.start + 3)[0]
            pending.update(view=view, want=view.clone())
            kv.drop_before(kv.start + 3)
    assert intact and all(intact)
    assert torch.equal(kv.kv(15, 18)[0][0, 0, :, 0], torch.tensor([15.0, 16.0, 17.0]))


class _RecordingCuda:
    """torch.cuda's stream calls that SideStream makes, recorded in order (CPU stand-in)."""

    def __init__(self):
        self.log: list[str] = []
        self.on_side = False
        outer = self

        class Stream:
            def __init__(self, device=None):
                self.name = "main" if device == "main" else "side"

            def wait_stream(self, other):
                outer.log.append(f"{self.name} waits {other.name}")

            def wait_event(self, event):
                outer.log.append(f"{self.name} waits event {event.n}")

        class Event:
            count = 0

            def record(self, stream):
                Event.count += 1
                self.n = Event.count
                outer.log.append(f"event {self.n} on {stream.name}" + (" (inside)" if outer.on_side else ""))

        self.Stream, self.Event, self.main = Stream, Event, Stream("main")

    def current_stream(self, device):
        return self.main

    @contextlib.contextmanager
    def stream(self, s):
        self.on_side = True
        self.log.append(f"enter {s.name}")
        yield
        self.on_side = False
        self.log.append(f"exit {s.name}")


def test_side_stream_waits_for_queued_work_then_marks_its_copies():
    """SideStream: the side stream first waits for the compute stream, copies inside the side-stream context,
    marks them with an event recorded there; `wait` makes the compute stream wait for that event."""
    cuda = _RecordingCuda()
    side = SideStream("cpu", cuda=cuda)
    src, dst = torch.arange(6.0), torch.zeros(6)
    ev = side.copy([(dst, src)])
    assert torch.equal(dst, src)
    side.wait(ev)
    side.wait(None)
    assert cuda.log == ["side waits main", "enter side", "event 1 on side (inside)", "exit side", "main waits event 1"]


@pytest.mark.parametrize("cls,params", [(FullAttention, FULL), (StreamingLLM, dict(STREAMING, n_init=8, n_local=64)),
                                        (InfLLM, SMALL)])
def test_fattn_false_runs_the_explicit_path_with_the_same_outputs(monkeypatch, cls, params):
    """fattn (every method): false sends every stage through the explicit tiled path (no fused kernel, no SDPA),
    with the fused route's outputs; it is recorded in provenance only when it is not the default."""
    m = tiny("tiny-llama")
    ids = prompt(m, 300, seed=6)
    fast_logits, fast_tokens = run(m, cls(**params), ids, 64)
    fused_calls = []
    real_fused, real_sdpa = kernels._fused_stage, kernels._single_stage_sdpa
    monkeypatch.setattr(kernels, "_fused_stage", lambda *a: fused_calls.append(1) or real_fused(*a))
    monkeypatch.setattr(kernels, "_single_stage_sdpa", lambda *a: fused_calls.append(1) or real_sdpa(*a))
    method = cls(**dict(params, fattn=False))
    logits, tokens = run(m, method, ids, 64)
    assert fused_calls == []
    assert (logits - fast_logits).abs().max() <= 1e-4 and tokens == fast_tokens
    assert method.attention_backend(torch.device("cpu"), torch.float32) == "explicit"
    assert method.describe()["fattn"] is False and "fattn" not in cls(**dict(params, fattn=True)).describe()
    run(m, cls(**dict(params, fattn=True)), ids[:100], 64)
    assert fused_calls  # the spies do see the fused route


def test_faiss_puts_the_representative_vectors_in_host_memory_off_the_compute_device(monkeypatch):
    """faiss (reference option): InfLLM asks its unit stores for host-resident representative vectors, and a store
    on another device (here `meta`, standing in for CUDA: on CPU host and device are one) keeps them in host
    memory, out of its device bytes, while without faiss they stay on the compute device. The outputs on a GPU:
    `test_cuda_matches_cpu`."""
    from infllm_eval.methods import infllm, memory

    asked = []
    real = memory.UnitStore

    def spy(*a, **kw):
        asked.append(kw["repr_on_host"])
        return real(*a, **kw)

    monkeypatch.setattr(infllm, "UnitStore", spy)
    m = tiny("tiny-llama")
    for faiss in (True, False):
        asked.clear()
        run(m, InfLLM(**dict(SMALL, faiss=faiss)), prompt(m, 120, seed=6), 64, new_tokens=1)
        assert asked and set(asked) == {faiss}
    like = torch.empty(1, 2, 0, 16, device="meta")
    for on_host, where in ((True, "cpu"), (False, "meta")):
        store = real(like, 4, 16, False, 4, "lru", None, repr_on_host=on_host)
        assert store.reprs.device.type == where
        store.n = 3  # three units' representative vectors: counted on the device only when they live there
        assert store.nbytes() - 2 * 3 * 2 * 16 * 16 * 4 == (0 if on_host else 3 * 4 * 16 * 4)


def test_perhead_equals_shared_selection_when_every_unit_fits():
    m = tiny("tiny-llama")
    ids = prompt(m, 200, seed=5)
    many = dict(SMALL, topk=20, max_cached_block=20)  # <= 20 units exist: all are used either way
    a, _ = run(m, InfLLM(**many), ids, 64)
    b, _ = run(m, InfLLM(**dict(many, perhead=True)), ids, 64)
    assert (a - b).abs().max() <= 1e-5
    c, _ = run(m, InfLLM(**dict(SMALL, perhead=True)), ids, 64)  # real per-head retrieval runs and differs
    assert torch.isfinite(c).all() and (c - a).abs().max() > 1e-5


def test_chunk_topk_calc_of_one_execution_block_is_the_default():
    """chunk_topk_calc = exc_block_size plans one block at a time: bit-identical to null. (Its stale selections
    against the dense reference: `test_infllm_switches_match_dense_reference_and_change_outputs`.)"""
    m = tiny("tiny-llama")
    ids = prompt(m, 400, seed=6)
    a, _ = run(m, InfLLM(**SMALL), ids, 128)
    same, _ = run(m, InfLLM(**dict(SMALL, chunk_topk_calc=32)), ids, 128)
    assert torch.equal(a, same)


@pytest.mark.parametrize("method,bounded", [
    (InfLLM(**SMALL), True), (StreamingLLM(**dict(STREAMING, n_init=8, n_local=64)), True),
    (LMInfinite(**dict(LMINFINITE, n_init=8, n_local=64)), True), (FullAttention(**FULL), False),
])
def test_attention_workspace_is_bounded(monkeypatch, method, bounded):
    """Largest score workspace (query tile x keys of all stages) inside attention, at two context lengths."""
    m = tiny("tiny-llama")
    seen = []
    real = kernels.multi_stage_attention

    def spy(stages, q_pos, scale, q_tile=256, fused=True, out=None, softcap=None):
        seen.append(min(q_tile, stages[0].q.shape[2]) * sum(s.k.shape[2] for s in stages))
        return real(stages, q_pos, scale, q_tile, fused, out, softcap)

    for mod in ("infllm_eval.methods.infllm", "infllm_eval.methods.window", "infllm_eval.methods.full"):
        monkeypatch.setattr(f"{mod}.multi_stage_attention", spy)
    peaks = []
    for n in (600, 1800):
        seen.clear()
        run(m, method, prompt(m, n), 64, new_tokens=2)
        peaks.append(max(seen))
    assert (peaks[1] == peaks[0]) if bounded else (peaks[1] > 2 * peaks[0])


def test_infllm_window_buffer_depends_on_neither_chunk_size_nor_length():
    """The remainder buffer (local window + not-yet-packed tokens) is sized by n_local, block_size and
    exc_block_size: a larger prefill chunk or a longer context must not enlarge it."""
    m = tiny("tiny-llama")
    caps = set()
    for n, chunk in ((600, 64), (1800, 64), (1800, 1800)):
        eng = Engine(m, InfLLM(**SMALL), torch.device("cpu"), torch.float32)
        states = eng.new_states()
        eng.prefill(states, prompt(m, n), chunk)
        caps.add(states[0]["rem"].k.shape[2])
    bound = 2 * (SMALL["n_local"] + SMALL["block_size"] + SMALL["exc_block_size"])
    assert len(caps) == 1 and caps.pop() <= bound


@pytest.mark.parametrize("bad,match", [
    (dict(n_local=16, exc_block_size=32), "exc_block_size"),
    (dict(topk=8, max_cached_block=4), "max_cached_block"),
    (dict(repr_topk=32, block_size=16), "repr_topk"),
    (dict(block_size=0), "block_size"),
    (dict(n_local=-5), "n_local"),
    (dict(cache_strategy="fifo"), "cache_strategy"),
    (dict(cache_strategy="lru-s", score_decay=None), "score_decay"),
    (dict(head_reduce="mean"), "head_reduce"),
    (dict(fattn="yes"), "fattn"),
    (dict(async_global_stream=1), "async_global_stream"),
    (dict(faiss=None), "faiss"),
])
def test_invalid_infllm_parameters_rejected(bad, match):
    cfg = {"name": "infllm", "impl": "infllm", "params": dict(SMALL, **bad)}
    with pytest.raises(UserError, match=match):
        make_method(cfg)


def test_every_method_takes_fattn_and_checks_it():
    for name, impl, params in [("full", "full", FULL),
                               ("streamingllm", "streamingllm", dict(STREAMING, n_init=4, n_local=64))]:
        assert make_method({"name": name, "impl": impl, "params": dict(params, fattn=False)}).params["fattn"] is False
        with pytest.raises(UserError, match="fattn must be true"):
            make_method({"name": name, "impl": impl, "params": dict(params, fattn="false")})


def test_unknown_method_parameter_rejected():
    cfg = {"name": "streamingllm", "impl": "streamingllm", "params": dict(STREAMING, n_init=4, n_local=64, topk=3)}
    with pytest.raises(UserError, match="topk"):
        make_method(cfg)


def test_impl_is_a_registered_name_never_an_import_path(tmp_path, monkeypatch):
    """`method.impl` names a class in the METHODS registry; a module path is refused and imports nothing."""
    import sys

    (tmp_path / "impl_probe_module.py").write_text("class Thing:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for impl in ("impl_probe_module:Thing", "os:system", "infllm_eval.methods.full:FullAttention"):
        with pytest.raises(UserError, match=f"Unknown method.impl '{impl}'"):
            make_method({"name": "x", "impl": impl, "params": FULL})
    assert "impl_probe_module" not in sys.modules
    with pytest.raises(UserError, match="Did you mean 'infllm'"):
        make_method({"name": "infllm", "impl": "infllmm", "params": SMALL})
    assert type(make_method({"name": "ntk", "impl": "full", "params": FULL})) is FullAttention


def test_every_method_config_names_a_registered_class():
    from infllm_eval.config import compose, group_options
    from infllm_eval.methods import METHODS

    assert set(METHODS.names()) >= {"full", "streamingllm", "lminfinite", "infllm"}
    for name in group_options("method"):
        make_method(compose([f"method={name}"]).method)


def test_base_method_config_is_shared_not_a_method():
    """conf/method/_base.yaml holds the keys every method shares; it is neither listed nor selectable."""
    from infllm_eval.config import compose, group_options

    assert "_base" not in group_options("method") and "full" in group_options("method")
    with pytest.raises(UserError, match="Unknown method '_base'"):
        compose(["method=_base"])
    for name in ("full", "streamingllm", "infllm"):
        assert {"base", "distance_scale", "fattn", "q_tile"} <= set(compose([f"method={name}"]).method.params)


@pytest.mark.parametrize("cls,params,key", [(FullAttention, FULL, "q_tile"), (StreamingLLM, STREAMING, "fattn"),
                                            (InfLLM, SMALL, "neighbor_units"), (InfLLM, SMALL, "pin_memory")])
def test_a_missing_parameter_is_refused_not_defaulted(cls, params, key):
    """Defaults live in conf/ only: a key the config did not give is an error, not a value the code picks."""
    with pytest.raises(UserError, match=f"method.params.{key} is missing"):
        cls(**{k: v for k, v in params.items() if k != key}).validate()


def test_q_tile_comes_from_the_config_and_stays_out_of_result_keys(monkeypatch):
    """The tile the attention runs with is `method.params.q_tile`; it changes speed only, so describe() (the
    result keys) is the same at any value."""
    from infllm_eval.config import compose

    tiles = []
    real = kernels.multi_stage_attention

    def spy(stages, q_pos, scale, q_tile, fused=True, out=None, softcap=None):
        tiles.append(q_tile)
        return real(stages, q_pos, scale, q_tile, fused, out, softcap)

    monkeypatch.setattr("infllm_eval.methods.full.multi_stage_attention", spy)
    m = tiny("tiny-llama")
    methods = {t: make_method(compose(["method=full", f"method.params.q_tile={t}"]).method) for t in (16, 64)}
    run(m, methods[16], prompt(m, 40), 40, new_tokens=1)
    assert set(tiles) == {16}
    assert methods[16].describe() == methods[64].describe() and "q_tile" not in methods[16].describe()
    with pytest.raises(UserError, match="q_tile must be a positive integer"):
        make_method(compose(["method=full", "method.params.q_tile=0"]).method)


def test_describe_of_the_shipped_methods_is_unchanged():
    """Result keys of finished runs: describe() of the packaged configs, as recorded before conf/method/_base.yaml
    and the q_tile key (a change here makes finished runs miss their resume)."""
    from infllm_eval.config import compose

    def described(*overrides):
        return make_method(compose(["model=mistral", *overrides]).method).describe()

    assert described("method=full") == {"name": "full", "position_scheme": "true", "base": None,
                                        "distance_scale": None}
    assert described("method=streamingllm") == {
        "name": "streamingllm", "position_scheme": "in-cache (init at 0..n_init-1, query at n_local+n_init-1)",
        "n_init": 128, "n_local": 6144, "base": 1000000, "distance_scale": None}  # conf/per_model/mistral_*
    assert described("method=infllm") == {
        "name": "infllm", "position_scheme": "local: true distance; init + units + remainder: fixed distance",
        "n_init": 128, "n_local": 4096, "topk": 16, "block_size": 128, "repr_topk": 4, "exc_block_size": 512,
        "max_cached_block": 32, "cache_strategy": "lru", "score_decay": None, "chunk_topk_calc": None,
        "perhead": False, "global_distance": None, "prefill_mask_fix": True, "neighbor_units": 0, "offload": "auto",
        "base": 1000000, "distance_scale": None}


@pytest.mark.slow
@pytest.mark.parametrize("chunk", [37, 128, 4096])
def test_full_reproduces_unpatched_smollm2(chunk):
    """The real embedded model: same greedy tokens as transformers' own forward, whatever the chunk size."""
    m = tiny("smollm2")
    ids = prompt(m, 320, seed=7)
    ref_logits, ref_tokens = hf_greedy(m, ids, 8)
    logits, tokens = run(m, FullAttention(**FULL), ids, chunk, 8)
    assert (logits - ref_logits).abs().max() <= 1e-3  # 30 layers of fp32; tokens must match exactly
    assert tokens == ref_tokens


@pytest.mark.gpu
@pytest.mark.parametrize("method", [
    FullAttention(**FULL), FullAttention(**dict(FULL, fattn=False)), InfLLM(**dict(SMALL, offload=True)),
    InfLLM(**dict(SMALL, offload=True, async_global_stream=True)),
    InfLLM(**dict(SMALL, offload=True, pin_memory=False, faiss=True)),
    StreamingLLM(**dict(STREAMING, n_init=8, n_local=64))])
def test_cuda_matches_cpu(method):
    """CUDA path (SDPA / pinned host units with a device cache; unit copies on a side stream; unpinned units with
    the representative vectors in host memory) gives the CPU result in fp32."""
    m = tiny("tiny-llama")
    ids = prompt(m, 300, seed=8)
    cpu_logits, cpu_tokens = run(m, method, ids, 64)
    gpu = Engine(m.to("cuda"), method, torch.device("cuda"), torch.float32)
    try:
        logits = gpu.prefill(gpu.new_states(), ids, 64).cpu()
        tokens = gpu.generate(ids, 6, 64, stop_ids=[]).tokens
    finally:
        m.to("cpu")
    assert (logits - cpu_logits).abs().max() <= 1e-3 and tokens == cpu_tokens


def test_neighbor_units_keeps_topk_and_brings_both_sides():
    m = tiny("tiny-llama")
    method = InfLLM(**dict(SMALL, topk=6, neighbor_units=2))
    Engine(m, method, torch.device("cpu"), torch.float32)
    sel = method._with_neighbors([10, 3, 7, 0, 12, 5], n_units=13, n_centers=2)
    assert sel == sorted({9, 10, 11, 2, 3, 4})  # the two best with both neighbours fill all six slots
    edge = method._with_neighbors([0, 12, 6, 5, 4, 3], n_units=13, n_centers=2)
    assert edge == [0, 1, 5, 6, 11, 12]  # no unit -1 or 13; the next by rank fill the rest
    ids = prompt(m, 400, seed=7)
    a, _ = run(m, InfLLM(**SMALL), ids, 64)
    b, _ = run(m, InfLLM(**dict(SMALL, neighbor_units=1)), ids, 64)  # really changes which units are attended
    assert torch.isfinite(b).all() and (a - b).abs().max() > 1e-6


def test_head_reduce_is_recorded_only_when_not_the_reference():
    """(Against the dense reference: `test_infllm_switches_match_dense_reference_and_change_outputs`.)"""
    assert InfLLM(**dict(SMALL, head_reduce="max")).describe()["head_reduce"] == "max"
    assert "head_reduce" not in InfLLM(**dict(SMALL, head_reduce="sum")).describe()  # neutral: old keys hold


def test_neighbor_extra_adds_neighbours_on_top_of_topk():
    m = tiny("tiny-llama")
    method = InfLLM(**dict(SMALL, topk=6, neighbor_units=2, neighbor_extra=True, max_cached_block=10))
    Engine(m, method, torch.device("cpu"), torch.float32)
    sel = method._with_neighbors([10, 3, 7, 0, 12, 5, 8, 1], n_units=13, n_centers=2)
    assert sel == sorted({10, 3, 7, 0, 12, 5} | {9, 11, 2, 4})  # the six best kept, both centres' sides added
    assert method.describe()["neighbor_extra"] is True
    assert "neighbor_extra" not in InfLLM(**dict(SMALL, neighbor_extra=False)).describe()  # neutral default: earlier results keep their keys


def test_neighbor_units_rejected_when_they_cannot_fit_in_topk():
    with pytest.raises(UserError, match="neighbor_units"):
        InfLLM(**dict(SMALL, topk=3, neighbor_units=2)).validate()
    InfLLM(**dict(SMALL, topk=3, neighbor_units=2, neighbor_extra=True, max_cached_block=7)).validate()  # fits
    with pytest.raises(UserError, match="max_cached_block"):
        InfLLM(**dict(SMALL, topk=3, neighbor_units=2, neighbor_extra=True, max_cached_block=6)).validate()


@pytest.mark.parametrize("kw", [{}, {"base": 50000.0}, {"distance_scale": 0.5}])
def test_rope_table_gives_the_same_angles_as_per_call(kw):
    """`rotate_range` serves contiguous positions from a cached table: bit-identical to computing them per call,
    also after the table has grown, and past its size."""
    from infllm_eval.rope import Rope

    r = Rope(tiny("tiny-llama"), **kw)
    x = torch.randn(1, 2, 300, 16, generator=torch.Generator().manual_seed(0))
    for start in (0, 5, 4000, Rope.TABLE_MAX - 100):
        assert torch.equal(r.rotate_range(x, start), r.rotate(x, torch.arange(start, start + 300))), start


def test_units_spanning_several_slabs_give_the_same_outputs(monkeypatch):
    """A store that fills more than one slab (64 units each here) attends exactly as one that fits in one."""
    from infllm_eval.methods import memory

    m = tiny("tiny-llama")
    ids = prompt(m, 1800)
    one = run(m, InfLLM(**SMALL), ids, 256)
    monkeypatch.setattr(memory, "SLAB_BYTES", 1)
    eng = Engine(m, InfLLM(**SMALL), torch.device("cpu"), torch.float32)
    states = eng.new_states()
    logits = eng.prefill(states, ids, 256)
    assert len(states[0]["units"].slabs) >= 2
    assert torch.equal(logits, one[0]) and run(m, InfLLM(**SMALL), ids, 256)[1] == one[1]


def _random_stages(device, dtype, L=70, H=6, H_kv=2, D=32, seed=3):
    """InfLLM's three stage kinds: a banded local window with scores, an unmasked stage (units + init) with scores,
    and a banded remainder; queries at positions 200..200+L-1."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    p0 = 200
    q = r(1, H, L, D)
    return [kernels.Stage(q, r(1, H_kv, 80, D), r(1, H_kv, 80, D), k_start=p0 - 10, band=(0, 63), want_scores=True),
            kernels.Stage(r(1, H, L, D), r(1, H_kv, 96, D), r(1, H_kv, 96, D), want_scores=True),
            kernels.Stage(r(1, H, L, D), r(1, H_kv, 150, D), r(1, H_kv, 150, D), k_start=0, band=(64, kernels.INF))
            ], torch.arange(p0, p0 + L, device=device)


def _stages_both_ways(stages, pos):
    out_f, sc_f = kernels.multi_stage_attention(stages, pos, 32**-0.5, 16)
    out_e, sc_e = kernels.multi_stage_attention(stages, pos, 32**-0.5, 16, fused=False)
    return (out_f, sc_f), (out_e, sc_e)


def test_fused_stage_joins_the_softmax_exactly(monkeypatch):
    """CPU: the unmasked stage through the fused kernel (log-sum-exp merge) = the explicit tiled path, output and
    per-key scores of every stage; and the fused path did run (its backend is named)."""
    assert kernels.fused_backend(torch.device("cpu"), torch.float32) == "cpu-flash"
    stages, pos = _random_stages("cpu", torch.float32)
    fused = []
    real = kernels._fused_stage

    def spy(st, scale):
        r = real(st, scale)
        fused.append(r is not None)
        return r

    monkeypatch.setattr(kernels, "_fused_stage", spy)
    (out_f, sc_f), (out_e, sc_e) = _stages_both_ways(stages, pos)
    assert fused == [True, False]  # the unmasked stage tried the fused kernel, the remainder (banded) did not
    assert (out_f - out_e).abs().max() <= 1e-5
    for a, b in zip(sc_f, sc_e):
        assert (a is None) == (b is None) and (a is None or (a - b).abs().max() <= 1e-4)


def _attention_with_lse(q, k, v, scale):
    """Plain attention, q [B, H, L, D], k/v [B, H_kv, S, D] (query head h reads KV head h // (H / H_kv)):
    (output, log-sum-exp [B, H, L]) in fp32. The stand-ins below wrap it in each CUDA kernel's calling convention."""
    G = q.shape[1] // k.shape[1]
    lg = q.float() @ k.float().repeat_interleave(G, dim=1).transpose(-1, -2) * scale
    return lg.softmax(-1) @ v.float().repeat_interleave(G, dim=1), lg.logsumexp(-1)


def _fake_flash_attn(q, k, v, softmax_scale, causal, return_attn_probs):
    """flash_attn_func's contract: [B, L, H, D] layout, GQA by head groups, (out, softmax_lse [B, H, L], probs)."""
    assert not causal and return_attn_probs
    o, lse = _attention_with_lse(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale)
    return o.transpose(1, 2).to(q.dtype), lse, None


def _fake_efficient_attention(q, k, v, scale):
    """torch's memory-efficient kernel: equal head counts, lse padded along the query axis to a multiple of 32
    (the padding is garbage: NaN here, so reading it would show)."""
    assert q.shape[1] == k.shape[1]
    o, lse = _attention_with_lse(q, k, v, scale)
    L = q.shape[2]
    pad = torch.full((*lse.shape[:-1], -L % 32 + 32), float("nan"))
    return o.to(q.dtype), torch.cat([lse, pad], dim=-1)


@pytest.mark.parametrize("backend", ["flash-attn", "sdpa-efficient"])
def test_cuda_fused_branches_join_the_softmax_with_cpu_stand_ins(monkeypatch, backend):
    """The CUDA fused branches' own code (layout transposes, GQA folding, lse unpadding, merge), run on CPU with
    stand-ins that follow each kernel's calling convention: equal to the explicit path, and each stand-in ran.
    The kernels themselves are checked only on a GPU (`test_cuda_fused_stage_matches_cpu`)."""
    calls = []

    def counted(fake):
        def f(*a, **kw):
            calls.append(fake.__name__)
            return fake(*a, **kw)
        return f

    monkeypatch.setattr(kernels, "fused_backend", lambda device, dtype: backend)
    monkeypatch.setattr(kernels, "_flash_attn", lambda: counted(_fake_flash_attn))
    monkeypatch.setattr(kernels, "_efficient_attention", counted(_fake_efficient_attention))
    for L in (70, 1):  # prefill and a decoding step (G * L = 3 query rows: lse padding)
        stages, pos = _random_stages("cpu", torch.float32, L=L)
        calls.clear()
        (out_f, sc_f), (out_e, sc_e) = _stages_both_ways(stages, pos)
        assert calls == ["_fake_flash_attn" if backend == "flash-attn" else "_fake_efficient_attention"]
        assert (out_f - out_e).abs().max() <= 1e-5
        for a, b in zip(sc_f, sc_e):
            assert (a is None) == (b is None) and (a is None or (a - b).abs().max() <= 1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_fused_stage_matches_cpu(dtype):
    """CUDA: SDPA's memory-efficient kernel (fp32; bf16 without flash-attn) or flash-attn (bf16 with the `gpu`
    extra) joins the softmax like the CPU path."""
    want = "flash-attn" if dtype == torch.bfloat16 and kernels._flash_attn() else "sdpa-efficient"
    assert kernels.fused_backend(torch.device("cuda"), dtype) == want
    stages, pos = _random_stages("cpu", dtype)
    ref, ref_sc = kernels.multi_stage_attention(stages, pos, 32**-0.5, 16)
    gpu = [kernels.Stage(s.q.cuda(), s.k.cuda(), s.v.cuda(), s.k_start, s.band, s.want_scores) for s in stages]
    assert kernels._fused_stage(gpu[1], 32**-0.5) is not None  # the fused kernel takes these inputs
    out, sc = kernels.multi_stage_attention(gpu, pos.cuda(), 32**-0.5, 16)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert (out.float().cpu() - ref.float()).abs().max() <= tol
    assert (sc[0].cpu() - ref_sc[0]).abs().max() <= tol * 10


def test_band_mask_on_edge_columns_equals_the_full_mask():
    """The explicit path masks only the edge columns of a tile; for bands with and without an upper bound, tiles
    inside, across and beyond the band's edges, that equals masking every (query, key) pair by its distance."""
    g = torch.Generator().manual_seed(0)
    for band in [(0, 7), (0, kernels.INF), (5, kernels.INF), (3, 40), (0, 0)]:
        for _ in range(40):
            q0 = int(torch.randint(0, 100, (1,), generator=g))
            tq = int(torch.randint(1, 20, (1,), generator=g))
            k0 = int(torch.randint(0, 100, (1,), generator=g))
            nk = int(torch.randint(1, 60, (1,), generator=g))
            lg = torch.randn(2, 3, tq, nk, generator=g)
            ok = kernels._tile_mask(q0, q0 + tq, k0, k0 + nk, band, "cpu")
            want = lg if ok is None else lg.masked_fill(~ok, -kernels.INF)
            got = lg.clone()
            kernels._mask_band_edges(got, q0, q0 + tq, k0, k0 + nk, band)
            assert torch.equal(got, want), (band, q0, tq, k0, nk)


def test_logits_scratch_is_reused_and_carries_nothing_between_calls():
    """The explicit path writes its logits into long-lived per-stage buffers: a call with other inputs in between
    (larger, so the buffers grow) leaves a repeated call's outputs and scores bit-identical, and same-sized calls
    reuse the buffers instead of allocating new ones."""
    a, pos_a = _random_stages("cpu", torch.float32, seed=3)
    b, pos_b = _random_stages("cpu", torch.float32, L=90, seed=4)
    out1, sc1 = kernels.multi_stage_attention(a, pos_a, 32**-0.5, 16)
    ptrs = {key: buf.data_ptr() for key, buf in kernels._SCRATCH.items()}
    kernels.multi_stage_attention(a, pos_a, 32**-0.5, 16)
    assert ptrs and {key: buf.data_ptr() for key, buf in kernels._SCRATCH.items()} == ptrs
    kernels.multi_stage_attention(b, pos_b, 32**-0.5, 32)
    out2, sc2 = kernels.multi_stage_attention(a, pos_a, 32**-0.5, 16)
    assert torch.equal(out1, out2)
    assert all((x is None and y is None) or torch.equal(x, y) for x, y in zip(sc1, sc2))


def _dense_joint_attention(stages, pos, scale):
    """One softmax over the concatenated stages, every (query, key) pair masked by its stage's band: output and,
    per stage, the summed probabilities per key and query head."""
    G = stages[0].q.shape[1] // stages[0].k.shape[1]
    lgs, vs = [], []
    for st in stages:
        lg = st.q.float() @ st.k.float().repeat_interleave(G, dim=1).transpose(-1, -2) * scale
        if st.band is not None:
            dist = pos[:, None] - (st.k_start + torch.arange(st.k.shape[2]))[None, :]
            lg = lg.masked_fill(~((dist >= st.band[0]) & (dist <= st.band[1])), -kernels.INF)
        lgs.append(lg)
        vs.append(st.v.float().repeat_interleave(G, dim=1))
    p = torch.cat(lgs, dim=-1).softmax(-1)
    out = p @ torch.cat(vs, dim=2)
    sizes = [st.k.shape[2] for st in stages]
    return out, [pi.sum(dim=2) for pi in p.split(sizes, dim=-1)]


@pytest.mark.parametrize("r_start", [0, 170])
def test_joint_softmax_equals_dense_attention_over_the_concatenated_stages(r_start):
    """The tiled joint softmax (explicit and fused) = dense attention over all stages' keys at once, output and
    per-key scores. The banded local stage takes the in-place row softmax joined by its log-sum-exp; the remainder
    (band >= 64, queries at 200..269) has tiles where some queries see none of its keys with r_start 170 (the
    shared-max branch; whole tiles see none, so the stage is skipped there) and every query sees some with 0."""
    stages, pos = _random_stages("cpu", torch.float32)
    stages[2].k_start = r_start
    want, want_sc = _dense_joint_attention(stages, pos, 32**-0.5)
    for fused in (True, False):
        out, sc = kernels.multi_stage_attention(stages, pos, 32**-0.5, 16, fused=fused)
        assert (out - want).abs().max() <= 1e-5
        for st, got, ref in zip(stages, sc, want_sc):
            assert (got is None) == (not st.want_scores)
            assert got is None or (got - ref).abs().max() <= 1e-5


def test_attention_writes_into_a_strided_out_and_methods_fill_the_engines_buffer():
    """`out=` takes a non-contiguous [B, H, L, D] view (the engine's [L, H * D] buffer) and gets the same
    values as a fresh output, on the fused and the explicit path; every method returns the engine's view
    itself, so no chunk-sized output is allocated per layer (it used to fragment the heap), with the same
    logits as a method that returns its own output for the engine to copy."""
    stages, pos = _random_stages("cpu", torch.float32)
    B, H, L, D = stages[0].q.shape
    for fused in (True, False):
        want, _ = kernels.multi_stage_attention(stages, pos, 32**-0.5, 16, fused=fused)
        flat = torch.full((L, H * D), float("nan"))
        view = flat.view(B, L, H, D).transpose(1, 2)
        got, _ = kernels.multi_stage_attention(stages, pos, 32**-0.5, 16, fused=fused, out=view)
        assert got is view and torch.equal(view, want)
    m = tiny("tiny-llama")
    ids = prompt(m, 200, seed=5)
    for method in (FullAttention(**FULL), StreamingLLM(**dict(STREAMING, n_init=8, n_local=64)),
                   LMInfinite(**dict(LMINFINITE, n_init=8, n_local=64)),
                   InfLLM(**SMALL)):
        eng = Engine(m, method, torch.device("cpu"), torch.float32)
        real, same = method.attend, []
        method.attend = lambda state, q, k, v, pos, out=None, real=real: real(state, q, k, v, pos)  # its own
        ref = eng.prefill(eng.new_states(), ids, 64)  # the engine copies it into its buffer

        def spy(state, q, k, v, pos, out=None, real=real):
            o = real(state, q, k, v, pos, out=out)
            buf = eng.ws.bufs["o"]
            same.append(o is out and out.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr())
            return o

        method.attend = spy
        logits = eng.prefill(eng.new_states(), ids, 64)
        del method.attend
        assert same and all(same), type(method).__name__
        assert torch.equal(logits, ref)


@pytest.mark.parametrize("threads", [2, 4])
def test_row_split_for_odd_kv_heads_equals_dense_attention(monkeypatch, threads):
    """3 KV heads on 2 or 4 threads: the explicit path cuts each head's query rows into 2 or 4 bmm problems (K/V
    copied per part); the short last tile (6 queries, 18 rows) is split in 2 but not in 4 (18 % 4 != 0) and then
    runs unsplit; outputs and scores = dense attention."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    assert kernels._row_split(3, 3 * 64, torch.device("cpu")) == threads
    assert kernels._row_split(3, 3 * 1, torch.device("cpu")) == 1  # decoding: no split
    assert kernels._row_split(4, 3 * 64, torch.device("cpu")) == 1  # an even spread already
    assert kernels._row_split(2, 3 * 64, torch.device("cpu")) == threads // 2
    stages, pos = _random_stages("cpu", torch.float32, H=9, H_kv=3)
    want, want_sc = _dense_joint_attention(stages, pos, 32**-0.5)
    calls = []
    real_bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda a, b, **kw: calls.append(a.shape[0]) or real_bmm(a, b, **kw))
    for fused in (True, False):
        out, sc = kernels.multi_stage_attention(stages, pos, 32**-0.5, 64, fused=fused)
        assert (out - want).abs().max() <= 1e-5
        for st, got, ref in zip(stages, sc, want_sc):
            assert got is None or (got - ref).abs().max() <= 1e-5
    assert 3 * threads in calls and (3 in calls) == (threads == 4)


def test_rows_that_see_no_key_of_a_stage_are_found_from_positions_without_a_host_read(monkeypatch):
    """A tile's rows that see none of a banded stage's keys (the remainder, for queries whose window still covers
    it) have a -inf row max, on which torch's row softmax gives NaN; the explicit path tells them from positions
    (`_all_rows_see_a_key`), so the tile loop reads no device tensor on the host. The test: the predicate = "every
    row of the band mask has a visible key", for bands with and without an upper bound; and with Tensor.__bool__
    and .item() refused, attention where a tile is split between rows that see the remainder and rows that do
    not (queries 232..247 with q_tile 16: 232 and 233 see none of it) = dense attention, without NaN."""
    g = torch.Generator().manual_seed(1)
    for band in [(0, 7), (0, kernels.INF), (5, kernels.INF), (3, 40), (0, 0)]:
        for _ in range(60):
            q0, tq, k0, nk = (int(torch.randint(lo, hi, (1,), generator=g)) for lo, hi in [(0, 99), (1, 40)] * 2)
            ok = kernels._tile_mask(q0, q0 + tq, k0, k0 + nk, band, "cpu")
            want = ok is None or bool(ok.any(dim=1).all())
            assert kernels._all_rows_see_a_key(q0, q0 + tq, k0, k0 + nk, band) == want, (band, q0, tq, k0, nk)
    stages, pos = _random_stages("cpu", torch.float32)
    stages[2].k_start = 170
    want, want_sc = _dense_joint_attention(stages, pos, 32**-0.5)

    def refused(*a):
        raise AssertionError("a device tensor read on the host")

    monkeypatch.setattr(torch.Tensor, "__bool__", refused)
    monkeypatch.setattr(torch.Tensor, "item", refused)
    for fused in (True, False):
        out, sc = kernels.multi_stage_attention(stages, pos, 32**-0.5, 16, fused=fused)
        assert not out.isnan().any().tolist() and (out - want).abs().max().tolist() <= 1e-5
        for got, ref in zip(sc, want_sc):
            assert got is None or (got - ref).abs().max().tolist() <= 1e-5
