"""The second embedded model, Gemma-3-270M (issue 27, item 4): its GGUF assembled from chunk packages and checked
against the SHA-256 its package lists; through the engine it equals transformers' own forward of the same GGUF."""

from __future__ import annotations

import hashlib
import sys

import pytest
import torch

from infllm_eval import models
from infllm_eval.errors import UserError


def _fake_chunked_package(root, name="m.gguf", data=b"0123456789" * 1000, parts=3, sha=None):
    """`fakegguf` (data/SHA256SUMS) and `fakegguf_part1..parts`, each holding one `<name>.partNN` chunk."""
    (root / "fakegguf" / "data").mkdir(parents=True)
    (root / "fakegguf" / "__init__.py").write_text("raise RuntimeError('imported')\n")
    digest = sha or hashlib.sha256(data).hexdigest()
    (root / "fakegguf" / "data" / "SHA256SUMS").write_text(f"{digest}  {name}\n")
    step = -(-len(data) // parts)
    for i in range(parts):
        d = root / f"fakegguf_part{i + 1}"
        (d / "data").mkdir(parents=True)
        (d / "__init__.py").write_text("raise RuntimeError('imported')\n")
        (d / "data" / f"{name}.part{i:02d}").write_bytes(data[i * step : (i + 1) * step])
    return data


@pytest.fixture
def fake_site(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(models, "cache_dir", lambda: tmp_path / "cache")
    yield site
    for mod in [m for m in sys.modules if m.startswith("fakegguf")]:
        del sys.modules[mod]


def test_chunks_are_assembled_once_and_checked_without_importing(fake_site):
    data = _fake_chunked_package(fake_site)
    path = models.gguf_file("fakegguf")  # the packages raise on import: found by find_spec only
    assert path.read_bytes() == data and path.name == "m.gguf"
    assert path.parent.name == hashlib.sha256(data).hexdigest()[:12]
    mtime = path.stat().st_mtime_ns
    assert models.gguf_file("fakegguf") == path and path.stat().st_mtime_ns == mtime  # not assembled again


def test_a_damaged_chunk_is_refused_and_nothing_is_kept(fake_site, tmp_path):
    _fake_chunked_package(fake_site, sha="0" * 64)
    with pytest.raises(UserError, match="not 0000.*damaged"):
        models.gguf_file("fakegguf")
    assert not list((tmp_path / "cache").rglob("*.gguf"))


def test_a_missing_chunk_is_refused(fake_site):
    _fake_chunked_package(fake_site)
    (fake_site / "fakegguf_part2" / "data" / "m.gguf.part01").unlink()
    with pytest.raises(UserError, match="incomplete"):
        models.gguf_file("fakegguf")


def test_a_missing_package_says_how_to_install_it():
    with pytest.raises(UserError, match="not installed; run: bash runners/setup.sh"):
        models.gguf_file("no_such_gguf_package_xyz")


# ------------------------------------------------------------------------------------------- the real model


def test_gemma3_through_the_engine_equals_transformers_forward_of_the_gguf():
    """Logits after a 1K-token prompt: the embedded path (converted once, our engine, full attention, chunks that
    split the local window of 512) vs transformers loading the same GGUF file and running its own forward."""
    from transformers import AutoModelForCausalLM

    from infllm_eval.config import compose
    from infllm_eval.engine import Engine
    from infllm_eval.layout import layout
    from infllm_eval.methods import make_method

    cfg = compose(["model=gemma3", "method=full"])
    lm = models.load_model(cfg.model, device="cpu", dtype="float32")
    lay = layout(lm.model.config)
    assert lay.model_type == "gemma3_text" and lay.sliding_window == 512 and lay.global_layers == [5, 11, 17]
    text = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n" * 60
    ids = lm.tokenizer(text, return_tensors="pt").input_ids[0][:1024]
    assert ids.shape[0] == 1024 and int(ids[0]) == lm.tokenizer.bos_token_id == 2  # Gemma needs its <bos>
    src = models.gguf_file(cfg.model.gguf_package)
    ref_model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = ref_model(ids[None]).logits[0, -1]
    eng = Engine(lm.model, make_method(cfg.method), lm.device, lm.dtype)
    got = eng.prefill(eng.new_states(), ids, 300)
    # measured on the dev machine: 5.8e-5 (chunk 300), 1.1e-4 (one chunk of 1024), logits up to 29 (std 4.3)
    assert (got - ref).abs().max() <= 2e-4
    assert int(got.argmax()) == int(ref.argmax())
