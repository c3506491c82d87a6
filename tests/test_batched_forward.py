"""`service.llama.batched_forward`, the trainers' left-padded batched target
forward, against the serving forward run on each sequence alone: prefill
(SDPA over the written columns) and few-query decode steps (`grouped_attention`
over the whole zeroed capacity, unwritten columns masked)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from service.llama import batched_forward, grouped_attention, new_padded_cache, padded_mask
from tests.test_eagle3 import TINY, tiny_target

LAYERS = (0, 1)


def test_grouped_attention_equals_sdpa_with_gqa():
    gen = torch.Generator().manual_seed(0)
    b, h, kv, t, width, hd = 3, 6, 2, 2, 11, 8
    q = torch.randn(b, h, t, hd, generator=gen)
    k, v = torch.randn(b, kv, width, hd, generator=gen), torch.randn(b, kv, width, hd, generator=gen)
    mask = padded_mask(torch.tensor([7, 8]), torch.tensor([0, 2, 5]), width)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(grouped_attention(q, k, v, mask), want, rtol=1e-5, atol=1e-6)


def test_prefill_and_decode_match_each_sequence_alone():
    target = tiny_target()
    model = target.model
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, TINY.vocab_size, (n,), generator=gen) for n in (5, 9, 3)]
    steps = 4
    nexts = torch.randint(0, TINY.vocab_size, (len(prompts), steps), generator=gen)
    width = max(len(p) for p in prompts)
    pad = torch.tensor([width - len(p) for p in prompts])
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, int(pad[i]) :] = p
    k_cache, v_cache = new_padded_cache(model, len(prompts), width + steps + 3)  # spare columns stay masked
    finals, taps = [], []
    with torch.inference_mode():
        final, tap = batched_forward(model, ids, k_cache, v_cache, 0, pad, LAYERS)
        finals.append(final)
        taps.append(tap)
        for s in range(steps):
            final, tap = batched_forward(model, nexts[:, s : s + 1], k_cache, v_cache, width + s, pad, LAYERS)
            finals.append(final)
            taps.append(tap)
        final, tap = torch.cat(finals, 1), torch.cat(taps, 1)
        for i, p in enumerate(prompts):
            seq = torch.cat([p, nexts[i]])
            cache = model.new_cache(len(seq))
            _, want_final, want_taps = model(seq, cache, hidden_layers=LAYERS, logits=False)
            rows = slice(int(pad[i]), None)
            torch.testing.assert_close(final[i, rows], want_final, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(tap[i, rows], torch.cat(want_taps, -1), rtol=1e-4, atol=1e-4)
