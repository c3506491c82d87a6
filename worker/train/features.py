"""Target features for the trainers, from the target's padded batched forward
(`service.llama.batched_forward`): greedy SFT trajectories with their taps and
final hidden states, and the taps and final hidden states of Draft-OPD request
contexts (with the check that the recomputed target matches the logged one)."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor

from service.llama import LlamaModel, batched_forward, new_padded_cache

from .data import RequestBlocks, Trajectories
from .loop import autocast


def bf16_copy(model: LlamaModel) -> LlamaModel:
    """A bfloat16 copy of the target for generating training trajectories (RoPE
    tables stay float32)."""
    fast = copy.deepcopy(model).to(torch.bfloat16)
    fast.cos, fast.sin = model.cos, model.sin
    return fast


def _left_padded(prompts: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor, Tensor]:
    """-> ids (B, W) left-padded with 0, prompt lengths (B,), left padding (B,)."""
    lens = torch.tensor([len(p) for p in prompts])
    width = int(lens.max())
    pad = width - lens
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, int(pad[i]) :] = torch.tensor(list(p), dtype=torch.long)
    return ids, lens, pad


@torch.inference_mode()
def generate_batch(
    model: LlamaModel,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_ids: set[int],
    hidden_layers: tuple[int, ...],
) -> Trajectories:
    """Greedy continuations of `prompts` in one left-padded batch. A trajectory
    holds the prompt and the generated tokens that were fed back, up to (not
    including) its first EOS; every such position carries its taps (bfloat16)
    and final hidden, so the last one's final hidden still predicts the EOS
    (kept as `last_next`, the argmax after the last position)."""
    ids, lens, pad = _left_padded(prompts)
    dev = model.device
    ids, pad = ids.to(dev), pad.to(dev)
    batch, width = ids.shape
    k_cache, v_cache = new_padded_cache(model, batch, width + max_new_tokens)
    final, feats = batched_forward(model, ids, k_cache, v_cache, 0, pad, hidden_layers)
    finals, featss, fed = [final.bfloat16()], [feats.bfloat16()], [ids]
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=dev)
    nxt = model.lm_head(final[:, -1]).max(-1).indices  # (B,) first maximum, as argmax (faster in bf16)
    done = torch.isin(nxt, eos)
    last_next = torch.where(done, nxt, -1)  # (B,) set when a row stops
    n_fed = torch.zeros(batch, dtype=torch.long, device=dev)  # generated tokens fed before the first EOS
    for step in range(max_new_tokens - 1):
        if bool(done.all()):
            break
        n_fed += (~done).long()
        final, feats = batched_forward(model, nxt.unsqueeze(1), k_cache, v_cache, width + step, pad, hidden_layers)
        finals.append(final.bfloat16())
        featss.append(feats.bfloat16())
        fed.append(nxt.unsqueeze(1))
        nxt = model.lm_head(final[:, -1]).max(-1).indices
        stops = torch.isin(nxt, eos) & ~done
        last_next = torch.where(stops, nxt, last_next)
        done |= stops
    last_next = torch.where(done, last_next, nxt)  # rows cut at max_new_tokens: the next greedy token
    # the store and the trainer read host memory: one copy each, off the decode loop
    all_ids, all_final, all_feats = torch.cat(fed, 1).cpu(), torch.cat(finals, 1).cpu(), torch.cat(featss, 1).cpu()
    pad, n_fed, last_next = pad.cpu(), n_fed.cpu(), last_next.cpu()
    rows = [slice(int(pad[i]), width + int(n_fed[i])) for i in range(batch)]
    return Trajectories.from_parts(
        [all_ids[i, sl] for i, sl in enumerate(rows)],
        [all_feats[i, sl] for i, sl in enumerate(rows)],
        [all_final[i, sl] for i, sl in enumerate(rows)],
        prompt_lens=lens,
        last_next=last_next,
    )


@torch.inference_mode()
def compute_features(
    model: LlamaModel, requests: Sequence[RequestBlocks], hidden_layers: Sequence[int], fast_bf16: bool = False
) -> None:
    """One target forward per request over its context; fills `features` (T, 3d)
    with the residual streams after `hidden_layers` (the serving taps), `final`
    (T, d), the final normed hidden (the exact teacher rows), `ctx_rows`, the
    LM-head rows of the request's context vocabulary, and `replay_top1`."""
    layers = tuple(hidden_layers)
    for req in requests:
        if req.features is not None:
            continue
        ids = req.tokens.to(model.device)[None, :]  # (1, T)
        k_cache, v_cache = new_padded_cache(model, 1, ids.shape[1])
        with autocast(model.device, fast_bf16):
            final, taps = batched_forward(model, ids, k_cache, v_cache, 0, torch.zeros(1, dtype=torch.long, device=model.device), layers)
        req.features = taps[0].to(model.dtype)
        req.final = final[0].to(model.dtype)
        req.ctx_rows = model.lm_head.weight.detach()[req.ctx_ids.to(model.device)]
        req.replay_top1 = replay_top1(model, req)


def replay_top1(model: LlamaModel, req: RequestBlocks) -> tuple[int, int]:
    """Replay matches serving: of the blocks' exact rows (on the emitted context),
    how many have the recomputed target argmax over the whole vocabulary equal
    to the logged top-1 -> (matching rows, rows). Rows logging no top-1 are left out."""
    pos, want = [], []
    for ex in req.examples:
        for j in range(min(ex.exact_rows, ex.num_draft + 1, len(ex.logged_top1))):
            if ex.logged_top1[j] >= 0:
                pos.append(ex.position - 1 + j)
                want.append(ex.logged_top1[j])
    if not pos:
        return 0, 0
    rows = req.final[torch.tensor(pos, device=req.final.device)]
    top = torch.cat([model.lm_head(chunk).argmax(-1) for chunk in rows.split(256)])  # (R,) over the full V, in chunks
    return int((top.cpu() == torch.tensor(want)).sum()), len(pos)


@torch.inference_mode()
def forced_batch(model: LlamaModel, sequences: Sequence[tuple[Sequence[int], Sequence[int]]], hidden_layers: tuple[int, ...]) -> Trajectories:
    """Teacher-forced trajectories of given (prompt, completion) pairs -- served
    requests' own tokens -- in one left-padded forward: the same arrays as
    `generate_batch`, with `prompt_lens` the prompts' lengths. The loss reads the
    target's distribution at every position, so a sampled completion trains the
    head as well as a greedy one; only the OOV-argmax mask then sees the sampled
    token instead of the argmax (`last_next`: the argmax after the last position)."""
    full = [list(p) + list(c) for p, c in sequences]
    ids, lens, pad = _left_padded(full)
    batch, width = ids.shape
    k_cache, v_cache = new_padded_cache(model, batch, width)
    final, feats = batched_forward(model, ids, k_cache, v_cache, 0, pad, hidden_layers)
    last_next = model.lm_head(final[:, -1]).max(-1).indices
    rows = [slice(int(pad[i]), width) for i in range(batch)]
    return Trajectories.from_parts(
        [ids[i, sl] for i, sl in enumerate(rows)],
        [feats[i, sl].bfloat16() for i, sl in enumerate(rows)],
        [final[i, sl].bfloat16() for i, sl in enumerate(rows)],
        prompt_lens=torch.tensor([len(p) for p, _ in sequences], dtype=torch.long),
        last_next=last_next,
    )
