"""Prepacked oneDNN linears (service/packed.py): the same outputs as F.linear
within float32 rounding, every row the same whatever the row count (what
greedy speculative decoding needs: a verify row must score as a one-row step),
copies and dtype moves that keep working, and the real target packed."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from service.packed import PackedLinear, is_packed, pack_linears, packing_available

pytestmark = pytest.mark.skipif(not packing_available(), reason="this torch build has no oneDNN linear")


def test_packed_linear_matches_and_is_row_invariant():
    gen = torch.Generator().manual_seed(0)
    lin = nn.Linear(64, 96, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(96, 64, generator=gen) * 0.1)
    packed = PackedLinear(lin.weight)
    x = torch.randn(9, 64, generator=gen)
    with torch.inference_mode():
        many = packed(x)
        ones = torch.cat([packed(x[i : i + 1]) for i in range(9)])
        torch.testing.assert_close(many, F.linear(x, lin.weight), rtol=1e-5, atol=1e-5)
        assert torch.equal(many, ones)  # bit-identical rows: no dependence on the row count
        assert packed(x.view(3, 3, 64)).shape == (3, 3, 96)


def test_copies_dtype_moves_and_grad_fall_back_cleanly():
    lin = nn.Linear(32, 16, bias=False)
    packed = PackedLinear(lin.weight)
    clone = copy.deepcopy(packed)  # the packed tensor is opaque: the copy repacks
    x = torch.randn(4, 32)
    torch.testing.assert_close(clone(x), packed(x))
    assert clone.weight.data_ptr() != packed.weight.data_ptr()
    half = copy.deepcopy(packed).to(torch.bfloat16)
    assert half._packed is None and half(x.bfloat16()).dtype == torch.bfloat16
    x.requires_grad_(True)
    packed(x).sum().backward()  # autograd takes the plain path
    assert x.grad is not None and x.grad.shape == x.shape


def test_real_target_is_packed_and_ties_stay_shared(target):
    model = target.model
    assert is_packed(model)
    assert pack_linears(model) == 0  # idempotent: nothing left to swap
    if model.cfg.tie_word_embeddings:
        assert model.lm_head.weight is model.embed_tokens.weight


def test_every_target_linear_computes_a_row_the_same_at_any_row_count(target):
    """The batched serving loop relies on it (a row's logits must not depend on
    its batch): a one-row call, where oneDNN's one-row kernel sums otherwise,
    runs as two rows."""
    gen = torch.Generator().manual_seed(1)
    linears = [m for m in target.model.modules() if isinstance(m, PackedLinear)]
    assert linears
    with torch.inference_mode():
        for lin in {id(m): m for m in linears}.values():
            x = torch.randn(37, lin.in_features, generator=gen)  # (37, in)
            full = lin(x)
            for rows in (slice(5, 6), slice(5, 7), slice(5, 10)):
                assert torch.equal(lin(x[rows]), full[rows]), f"{lin}: rows {rows}"
