"""Hybrid drafting (lookup + EAGLE-3 head), the cost-curve rules (draft-length
stop, dtype auto): pure rules, sampled losslessness of mixed blocks on a tiny
target, block records naming each token's drafter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from service import costmodel, runtime
from service.blocklog.record import BlockObservation
from service.drafters.eagle3 import Eagle3Drafter
from service.drafters.hybrid import HybridDrafter, lookup_first, lookup_prefix, running_rate
from service.drafters.ngram import NgramDrafter, lookup, lookup_match
from service.engine import Engine
from service.llama import KVCache
from service.sampling import SamplingParams, target_probs

from .test_eagle3 import TINY, tiny_head, tiny_target
from .test_sampling import _chi2_ok

# ---- the rules -----------------------------------------------------------------


def test_stop_thresholds_follow_the_marginal_verify_cost():
    # t(1..5): rows 2 and 3 are nearly free, the 4th and 5th cost half a step each
    seconds = [0.010, 0.0101, 0.0102, 0.015, 0.020]
    thr = costmodel.stop_thresholds(seconds)
    assert thr == pytest.approx([0.01, 0.01, 0.48, 0.5])
    assert costmodel.stop_thresholds(seconds, draft_cost=0.002)[0] == pytest.approx(0.21)
    # a curve that dips is made non-decreasing; a marginal above one step clips at 1
    assert costmodel.stop_thresholds([1.0, 1.5, 1.4, 3.0]) == pytest.approx([0.5, 0.5, 1.0])
    assert costmodel.stop_thresholds([1.0]) == []


def test_threshold_at_and_the_setting():
    assert costmodel.threshold_at([], 3, 0.3) == 0.3  # no curve: the drafter's fallback
    assert costmodel.threshold_at([0.1, 0.2], 5, 0.3) == 0.2  # past the curve: its last value
    assert costmodel.resolve_thresholds("auto", [1.0, 1.2, 1.6], 4) == pytest.approx([0.2, 0.4])
    assert costmodel.resolve_thresholds("auto", None, 4) == []
    assert costmodel.resolve_thresholds("0.25", [1.0, 2.0], 3) == [0.25] * 3
    with pytest.raises(ValueError, match="DRAFTLOOP_MIN_CONFIDENCE"):
        costmodel.resolve_thresholds("high", None, 3)


def test_fastest_dtype_rule():
    assert costmodel.fastest_dtype({"float32": [0.020, 0.030], "bfloat16": [0.012, 0.013]}) == "bfloat16"
    assert costmodel.fastest_dtype({"float32": [0.012, 0.020], "bfloat16": [0.020, 0.021]}) == "float32"
    assert costmodel.fastest_dtype({"float32": [0.020, 0.030], "bfloat16": [0.0195, 0.029]}) == "float32"  # within the margin
    # faster for one row but slower to verify (a CPU without bf16 instructions, measured 2026-11-30)
    assert costmodel.fastest_dtype({"float32": [0.073, 0.113, 0.119], "bfloat16": [0.057, 0.084, 0.194]}) == "float32"
    # cheaper on the mean but 10 % dearer at 5 rows (Zen 4, AVX512-BF16: results/forward_cost_zen4.json, 1/2/5 rows)
    assert costmodel.fastest_dtype({"float32": [0.0573, 0.0656, 0.0526], "bfloat16": [0.0552, 0.0528, 0.0580]}) == "float32"
    # 17 % dearer at one row (the Zen 5's one-row steps, 32.1 vs 27.4 ms; the other widths illustrative)
    assert costmodel.fastest_dtype({"float32": [0.0274, 0.030, 0.045], "bfloat16": [0.0321, 0.028, 0.030]}) == "float32"
    # the same at one row, far cheaper to verify (a Xeon with AMX, results/forward_cost_spr_amx.json)
    assert costmodel.fastest_dtype({"float32": [0.0729, 0.0709, 0.0783], "bfloat16": [0.0720, 0.0660, 0.0653]}) == "bfloat16"


def test_dtype_auto_picks_the_faster_from_a_fake_measurement(tmp_path: Path, monkeypatch):
    """load_fastest_on_cpu with a fake clock: the faster dtype is served, and a
    second start reads both curves from the cache (no measurement)."""
    calls: list[torch.dtype] = []

    def fake_measure(models, widths, context=0, repeats=0):  # both in one interleaved measurement
        calls.extend(m.dtype for m in models.values())
        one = {name: 0.01 if m.dtype == torch.bfloat16 else 0.03 for name, m in models.items()}
        return {name: [one[name] * (1 + 0.1 * n) for n in range(len(widths))] for name in models}

    monkeypatch.setattr(costmodel, "measure_interleaved", fake_measure)
    monkeypatch.setattr(runtime, "load_llama", lambda *a, **kw: tiny_target().model)
    model, cost = runtime.load_fastest_on_cpu(tmp_path / "m", tmp_path, 256, 5)
    assert model.dtype == torch.bfloat16 and cost["dtype_auto"]["choice"] == "bfloat16"
    assert len(cost["verify_seconds"]) == 5 and calls == [torch.float32, torch.bfloat16]
    model, cost = runtime.load_fastest_on_cpu(tmp_path / "m", tmp_path, 256, 5)
    assert model.dtype == torch.bfloat16 and len(calls) == 2  # cached: measured once per machine


def test_measure_curve_shape():
    seconds = costmodel.measure_curve(tiny_target().model, 3, context=16, repeats=1)
    assert len(seconds) == 3 and all(s > 0 for s in seconds)
    a, b = tiny_target().model, tiny_target().model
    both = costmodel.measure_interleaved({"a": a, "b": b}, [1, 4], context=16, repeats=2)
    assert set(both) == {"a", "b"} and all(len(v) == 2 and min(v) > 0 for v in both.values())


def test_lookup_first_rule_and_prefix():
    assert running_rate(0, 0) == 0.5 and running_rate(3, 3) == 0.8
    assert lookup_first(2, 0.5, 0.5, 2) and not lookup_first(1, 0.9, 0.1, 2)
    assert not lookup_first(3, 0.3, 0.6, 2)  # lookup has done worse than the head in this sequence
    assert lookup_prefix([5, 6, 7], 0.5, [0.0, 0.2, 0.2]) == [5, 6]  # 0.5^3 < 0.2: the third is cut
    assert lookup_prefix([5], 0.01, [0.9]) == [5]  # the first is always drafted
    toks = torch.tensor([1, 2, 3, 9, 1, 2, 3]).numpy()
    assert lookup_match(toks, 2, 3, 1) == ([9, 1], 3) and lookup(toks, 2, 3, 1) == [9, 1]
    assert lookup_match(toks[:4], 2, 3, 1) == ([], 0)


# ---- the drafter on a tiny target --------------------------------------------------


def _hybrid(target, min_match: int = 1) -> HybridDrafter:
    head = Eagle3Drafter(tiny_head(target), target.model, min_confidence=0.0)
    return HybridDrafter(head, NgramDrafter(), min_match)


PROMPT = [7, 8, 9, 10, 11] * 3 + list(range(20, 40))  # repeats (lookup matches) and more


def test_blocks_mix_sources_and_records_name_them():
    target = tiny_target()
    records: list[BlockObservation] = []
    engine = Engine(target.model, _hybrid(target), set(), 4, block_sink=records.append)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    out = engine.generate(PROMPT, params)
    ref = Engine(target.model, NgramDrafter(), set(), 0).generate(PROMPT, params)
    assert out == ref  # greedy: the target's own output
    sources = [r.draft_sources for r in records]
    assert all(r.drafter_kind == "hybrid" and len(r.draft_sources) == len(r.draft_tokens) for r in records)
    assert any("n" in s and "e" in s for s in sources), sources  # lookup first, then the head after it
    assert all(s == "" or s.startswith("n") or set(s) == {"e"} for s in sources)


def test_a_head_that_drafts_nothing_after_lookup_tokens():
    """Lookup tokens go first and the head's first token then fails the stop rule:
    the head adds nothing to the block (it raised on an empty stack before)."""
    target = tiny_target()
    head = Eagle3Drafter(tiny_head(target), target.model, min_confidence=0.5)  # a tiny random head is never that sure
    engine = Engine(target.model, HybridDrafter(head, NgramDrafter(), 1), set(), 4)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    assert engine.generate(PROMPT, params) == Engine(target.model, NgramDrafter(), set(), 0).generate(PROMPT, params)


def _exact_marginals(model, prompt: list[int], params: SamplingParams, depth: int) -> list[torch.Tensor]:
    """The target's marginal distribution of generated tokens 1 .. depth (top-k keeps it small)."""
    out = [torch.zeros(TINY.vocab_size) for _ in range(depth)]
    frontier = [(list(prompt), 1.0)]
    for d in range(depth):
        nxt = []
        for ids, mass in frontier:
            cache = KVCache(model.cfg, len(ids), len(model.layers), model.dtype, model.device)
            logits, _, _ = model(torch.tensor(ids), cache)
            p = target_probs(logits[-1:], params)[0]  # (V,)
            out[d] += mass * p
            nxt += [(ids + [t], mass * float(p[t])) for t in torch.nonzero(p).flatten().tolist()]
        frontier = nxt
    return out


def test_sampled_hybrid_is_lossless():
    """Tokens 2 and 3 (drafted in mixed lookup/head blocks) follow the target's
    exact marginals (chi-square, 0.1%)."""
    torch.set_num_threads(1)
    target = tiny_target()
    engine = Engine(target.model, _hybrid(target), set(), 4)
    # max_tokens 4: after the first token, one step may draft 2 (K is capped at remaining - 1)
    base = SamplingParams(temperature=1.0, top_k=3, max_tokens=4, ignore_eos=True)
    with torch.inference_mode():
        want = _exact_marginals(target.model, PROMPT, base, 3)
    n = 3000
    counts = [torch.zeros(TINY.vocab_size) for _ in range(3)]
    for seed in range(n):
        params = SamplingParams(**{**base.__dict__, "seed": seed})
        for d, tok in enumerate(engine.generate(PROMPT, params)[:3]):
            counts[d][tok] += 1
    assert engine.stats.num_draft_tokens > n  # the later tokens were drafted, not plainly decoded
    for d in (1, 2):
        df = int((want[d] * n >= 5).sum())
        assert _chi2_pooled(counts[d], want[d]) < _chi2_critical(df), f"token {d + 1}"


def _chi2_pooled(counts: torch.Tensor, probs: torch.Tensor, n_min: float = 5.0) -> float:
    """Chi-square of counts against probs, cells expecting fewer than n_min pooled into one."""
    exp = probs * counts.sum()
    small = exp < n_min
    cells_c = torch.cat([counts[~small], counts[small].sum().view(1)])
    cells_p = torch.cat([probs[~small], probs[small].sum().view(1)])
    return _chi2_ok(cells_c, cells_p)


def _chi2_critical(df: int, z: float = 3.09) -> float:
    """0.1% critical value of chi-square with df degrees of freedom (Wilson-Hilferty)."""
    a = 2.0 / (9.0 * max(df, 1))
    return max(df, 1) * (1.0 - a + z * a**0.5) ** 3
