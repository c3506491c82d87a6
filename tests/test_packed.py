"""Prepacked oneDNN linears (service/packed.py): the same outputs as F.linear
within float32 rounding, every row the same whatever the row count (what
greedy speculative decoding needs: a verify row must score as a one-row step),
copies and dtype moves that keep working, the frozen q/k/v and gate/up
projections fused into one GEMM each with the same outputs bit for bit, and
the real target packed and fused."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from service.llama import LlamaConfig, LlamaModel
from service.packed import PackedLinear, fuse_projections, is_packed, pack_linears, packing_available

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
    assert all(layer.self_attn.qkv_proj is not None and layer.mlp.gate_up_proj is not None for layer in model.layers)
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


SMALL = LlamaConfig(
    vocab_size=128, hidden_size=64, intermediate_size=160, num_layers=3, num_heads=4, num_kv_heads=2,
    head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=128, tie_word_embeddings=True,
)  # fmt: skip


def _small_target() -> LlamaModel:
    torch.manual_seed(0)
    return LlamaModel(SMALL, max_len=128).eval().requires_grad_(False)


def test_fused_projections_give_the_separate_gemms_outputs_bit_for_bit():
    fused, separate = _small_target(), _small_target()
    assert pack_linears(fused) > 0 and fuse_projections(fused) == 0  # already fused: idempotent
    pack_linears(separate, fuse=False)
    for layer in fused.layers:
        assert isinstance(layer.self_attn.qkv_proj, PackedLinear) and isinstance(layer.mlp.gate_up_proj, PackedLinear)
        # the originals are views of the fused weight: held once, state_dict names kept
        assert layer.self_attn.k_proj.weight.untyped_storage().data_ptr() == layer.self_attn.qkv_proj.weight.untyped_storage().data_ptr()
    assert set(fused.state_dict()) >= set(separate.state_dict())
    ids = torch.randint(0, SMALL.vocab_size, (40,), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        a, b = fused.new_cache(64), separate.new_cache(64)
        for lo, hi in ((0, 30), (30, 31), (31, 36)):  # a prefill, a one-row step, a 5-row verify
            la, ha, ta = fused(ids[lo:hi], a, hidden_layers=(0, 2))
            lb, hb, tb = separate(ids[lo:hi], b, hidden_layers=(0, 2))
            assert torch.equal(la, lb) and torch.equal(ha, hb) and all(map(torch.equal, ta, tb))


def test_trainable_or_non_float32_projections_are_not_fused():
    trainable = LlamaModel(SMALL, max_len=128)  # requires_grad: a head in training must keep its own Parameters
    assert fuse_projections(trainable) == 0
    half = _small_target().to(torch.bfloat16)
    assert fuse_projections(half) == 0
    assert all(layer.mlp.gate_up_proj is None for layer in trainable.layers + half.layers)
    fused = _small_target()
    pack_linears(fused)
    moved = copy.deepcopy(fused).to(torch.bfloat16)  # a fused model moved off float32 still runs, unpacked
    with torch.inference_mode():
        logits, _, _ = moved(torch.arange(5), moved.new_cache(8))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
