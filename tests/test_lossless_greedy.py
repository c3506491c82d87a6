"""Temperature 0 is lossless: each drafter reproduces target-only greedy
decoding token for token on the real default model (20 held-out prompts x 64
new tokens, K in {1, 4, 8})."""

import pytest
import torch

from service.drafters import eagle3
from service.drafters.draft_model import DraftModelDrafter
from service.drafters.hybrid import HybridDrafter
from service.drafters.ngram import NgramDrafter

from .reference import greedy_reference, outputs_with


def _first_difference(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 4, 8])
@pytest.mark.parametrize("kind", ["ngram", "draft_model"])
def test_greedy_equals_target_only(target, kind, k):
    ref = greedy_reference(target)
    drafter = NgramDrafter() if kind == "ngram" else DraftModelDrafter(target.model, num_layers=4)
    outs, engine = outputs_with(target, drafter, k)
    for i, (got, want) in enumerate(zip(outs, ref)):
        assert got == want, f"prompt {i}: first difference at token {_first_difference(got, want)}"
    assert engine.stats.num_drafts > 0  # the drafter really drafted
    assert engine.stats.num_accepted_tokens <= engine.stats.num_draft_tokens


def _hybrid(target, min_match: int) -> HybridDrafter:
    """Lookup + an untrained head that never stops early (every slot drafted):
    exactness must not depend on the head's quality, and long mixed blocks
    (lookup tokens, then head tokens after them) are the case to check."""
    cfg = eagle3.Eagle3Config.for_target(target.model.cfg, draft_vocab_size=2048)
    head = eagle3.Eagle3Head(cfg)
    head.reset_parameters(torch.Generator().manual_seed(0))
    head.d2t.copy_(torch.arange(cfg.draft_vocab_size))
    drafter = eagle3.Eagle3Drafter(head, target.model, min_confidence=0.0)
    return HybridDrafter(drafter, NgramDrafter(), min_match)


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 4, 8])
def test_hybrid_greedy_equals_target_only(target, k):
    ref = greedy_reference(target)
    outs, engine = outputs_with(target, _hybrid(target, min_match=1), k)
    for i, (got, want) in enumerate(zip(outs, ref)):
        assert got == want, f"prompt {i}: first difference at token {_first_difference(got, want)}"
    assert engine.stats.num_drafts > 0
