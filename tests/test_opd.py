"""The Draft-OPD trainer (worker/train/): examples from hand-made blocks, the
replay at served block starts equals what the serving EAGLE-3 drafter computed
(on the real default model), the evaluation gives back the served τ, the loss
goes down, and the evaluation math on hand-computed values."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from service.blocklog import BlockRecord
from service.drafters import eagle3
from service.drafters.eagle3 import Eagle3Config, Eagle3Drafter, Eagle3Head
from service.engine import Engine
from worker.prompts import chat_ids, sharegpt_prompts
from service.sampling import SamplingParams
from worker.train.blocks import build_requests, context_vocab, contexts_from_prefixes
from worker.train.config import OPDConfig
from worker.train.data import collate_requests, is_heldout, split_heldout
from worker.train.evaluate import acceptance_beta, evaluate, expected_tau
from worker.train.features import compute_features
from worker.train.loop import OPTIMIZER_FILE, read_optimizer, trainable_copy
from worker.train.losses import block_accepted, exact_teacher_logp, replay_logq, target_logp
from worker.train.opd import opd_update, save_update, train_opd
from worker.train.rollouts import BlockCollector

V = 50  # target vocabulary of the hand-made blocks
D2T = torch.tensor([0, 2, 4, 6, 8, 10, 12, 14, 16, 18])  # draft vocab: even ids < 20


def block(rid="a", position=5, draft=(4, 6), accepted=1, nxt=8, version="3", target="t", k=3, top=None) -> BlockRecord:
    kk = len(draft)
    top = top or [[2 * j + 4 + i for i in range(k)] for j in range(kk + 1)]  # row j's top-k ids
    return BlockRecord(
        request_id=rid, step=1, drafter_version=version, target_model=target, temperature=0.0, position=position,
        draft_tokens=list(draft), draft_logprobs=[-0.5] * kk, num_accepted=accepted, next_token=nxt,
        target_top_ids=top, target_top_logprobs=[[-0.5, -1.5, -2.5]] * (kk + 1), target_draft_logprobs=[-0.7] * kk,
    )


# ---- examples from hand-made blocks ------------------------------------------------


def test_examples_replay_the_served_block_start():
    ctx = {"a": list(range(20, 28)), "b": [1, 2, -1, 4, 5, 6]}  # b has a hole at position 2
    recs = [
        block("a", position=5, draft=(4, 6), accepted=1, nxt=8),
        block("a", position=7, draft=(2, 3, 30), accepted=0, nxt=9, version="2"),  # one version older
        block("a", position=3, draft=(), accepted=0, nxt=7),  # K = 0: context only
        block("a", position=6, draft=(4,), version="9", accepted=0),  # age 3 - 9 < 0 -> age 0 (newer than trained)
        block("a", position=4, draft=(4,), version="1", accepted=0),  # age 2 > max_age 1: dropped
        block("a", position=4, draft=(4,), version="0", accepted=0),  # ngram / none log version "0": off-policy
        block("a", position=4, draft=(4,), version="first-4-layers", accepted=0),  # a draft model: off-policy
        block("a", position=1, draft=(4,), accepted=0),  # no anchor
        block("a", position=2, draft=(4,), target="other", accepted=0),  # another target model
        block("b", position=5, draft=(4,), accepted=0),  # prefix has a hole
        block("c", position=5, draft=(4,), accepted=0),  # no context at all
    ]
    cfg = OPDConfig(max_age=1, offpolicy_decay=0.5)
    reqs, stats = build_requests(recs, ctx, D2T, V, current_version=3, target_model="t", cfg=cfg)
    assert stats.as_dict() == {
        "records": 11, "used": 3, "empty": 1, "no_context": 2, "stale": 2, "too_short": 1, "off_policy": 2
    }
    (a,) = reqs
    assert a.request_id == "a" and a.tokens.tolist() == list(range(20, 27))  # up to the last block's prefix
    ex5, ex6, ex7 = a.examples
    # block at P: anchor P-2, fed [x_{P-1}, d_1..d_K]
    assert (ex5.anchor, ex5.step_tokens, ex5.num_draft, ex5.num_accepted, ex5.weight) == (3, [24, 4, 6], 2, 1, 1.0)
    assert (ex6.anchor, ex6.step_tokens, ex6.weight) == (4, [25, 4], 1.0)
    assert (ex7.anchor, ex7.step_tokens, ex7.weight) == (5, [26, 2, 3, 30], 0.5)
    # target ids mapped onto the draft vocab (even ids < 20 -> id/2), others -1
    assert ex5.top_ids.tolist() == [[2, -1, 3], [3, -1, 4], [4, -1, 5]]
    assert ex5.top_logprobs.shape == (3, 3) and ex5.served_logq == [-0.5, -0.5]
    # rows on the emitted context (exact teacher): row 0 and one per accepted draft
    assert (ex5.exact_rows, ex6.exact_rows, ex7.exact_rows) == (2, 1, 1)
    assert ex5.logged_top1 == [4, 6, 8]  # each row's logged top-1 target id


def test_exact_rows_stop_at_a_hole_and_extend_the_context():
    # a block at 4 with 3 accepted drafts: its exact rows read positions 3..6, so the context is kept to 7
    recs = [block("a", position=4, draft=(30, 31, 32), accepted=3, nxt=9)]
    (a,), _ = build_requests(recs, {"a": [1, 2, 3, 5, 30, 31, 32, 9]}, D2T, V, 3)
    assert a.examples[0].exact_rows == 4 and a.tokens.tolist() == [1, 2, 3, 5, 30, 31, 32]
    (b,), _ = build_requests(recs, {"a": [1, 2, 3, 5, 30, -1, 32, 9]}, D2T, V, 3)  # the second draft's token is lost
    assert b.examples[0].exact_rows == 2 and b.tokens.tolist() == [1, 2, 3, 5, 30]


def test_context_vocab_follows_the_serving_drafter():
    # ids outside the static vocab join in order of first occurrence; a block at P knows those before P
    ids, first = context_vocab(np.array([2, 31, 4, 33, 31, 35]), set(D2T.tolist()))
    assert (ids, first) == ([31, 33, 35], [1, 3, 5])
    ctx = {"a": [2, 31, 4, 33, 31, 35, 4]}
    top = [[31, 33, 35], [4, 35, 31]]
    recs = [block("a", position=4, draft=(4,), accepted=0, top=top), block("a", position=6, draft=(4,), accepted=0, top=top)]
    (a,), _ = build_requests(recs, ctx, D2T, V, 3)
    assert a.ctx_ids.tolist() == [31, 33, 35] and a.tokens.tolist() == [2, 31, 4, 33, 31, 35]
    # draft index: static 0..9, then 31 -> 10, 33 -> 11; 35 (first seen at 5) only for the block at 6
    assert a.examples[0].top_ids.tolist() == [[10, 11, -1], [2, -1, 10]]
    assert a.examples[1].top_ids.tolist() == [[10, 11, 12], [2, 12, 10]]
    (a2,), _ = build_requests(recs, ctx, D2T, V, 3, cfg=OPDConfig(context_vocab=False))
    assert a2.ctx_ids.numel() == 0 and a2.examples[0].top_ids.tolist() == [[-1, -1, -1], [2, -1, -1]]


def test_contexts_from_prefixes_merge_blocks():
    recs = [block("a", position=3, draft=(4, 6), accepted=1, nxt=8), block("a", position=5, draft=(), accepted=0, nxt=9)]
    ctx = contexts_from_prefixes(recs, [[1, 2, 3], [1, 2, 3, 4, 8]])
    assert ctx["a"].tolist() == [1, 2, 3, 4, 8, 9]
    assert contexts_from_prefixes(recs, [None, None]) == {}


def test_random_anchor_ablation_is_teacher_forced():
    # one request: prompt 0..3, then blocks emitting 10 11 | 12 | 13 14 15 (rows on the emitted path)
    ctx = {"a": [0, 1, 2, 3, 10, 11, 12, 13, 14, 15]}
    recs = [
        block("a", position=4, draft=(10, 40), accepted=1, nxt=11),
        block("a", position=6, draft=(), accepted=0, nxt=12),
        block("a", position=7, draft=(13, 14), accepted=2, nxt=15),
    ]
    cfg = OPDConfig(anchors="random", seed=1)
    reqs, stats = build_requests(recs, ctx, D2T, V, 3, cfg=cfg)
    (a,) = reqs
    assert stats.empty == 1 and len(a.examples) == 2
    for ex in a.examples:  # K = 2: fed x_{a+1..a+3}, rows at positions a+2..a+4 all logged
        assert ex.num_draft == ex.num_accepted == 2
        assert ex.step_tokens == ctx["a"][ex.anchor + 1 : ex.anchor + 4]
        assert 4 <= ex.anchor + 2 and ex.anchor + 4 <= 9


def test_heldout_split_is_fixed_and_never_empty():
    ids = [f"cmpl-{i}" for i in range(400)]
    held = [i for i in ids if is_heldout(i, 0.1)]
    assert 20 <= len(held) <= 60 and held == [i for i in ids if is_heldout(i, 0.1)]

    class R:
        def __init__(self, rid):
            self.request_id = rid

    for n in (2, 3):
        train, heldout = split_heldout([R(f"x{i}") for i in range(n)], 0.1)
        assert train and heldout and len(train) + len(heldout) == n
    assert split_heldout([R("only")], 0.1)[1] == [] or split_heldout([R("only")], 0.1)[0] == []


# ---- evaluation and target math --------------------------------------------------------


def test_target_logp_restricts_to_the_draft_vocab():
    ids = torch.tensor([[3, -1, 1]])  # draft ids; the middle one is outside the draft vocab
    lp = torch.tensor([[0.5, 0.3, 0.1]]).log()  # 0.1 of the mass was not logged
    renorm = target_logp(ids, lp, 5, "renorm").exp()
    torch.testing.assert_close(renorm, torch.tensor([[0.0, 1 / 6, 0.0, 5 / 6, 0.0]]))
    spread = target_logp(ids, lp, 5, "spread").exp()  # the unlogged 0.1 over draft ids 0, 2, 4; then renormalised
    z = 0.5 + 0.1 + 0.1
    torch.testing.assert_close(spread, torch.tensor([[0.1 / 3 / z, 0.1 / z, 0.1 / 3 / z, 0.5 / z, 0.1 / 3 / z]]))


def test_expected_tau_and_beta_by_hand():
    beta = torch.tensor([[0.5, 0.5, 0.5, 0.5], [1.0, 0.0, 1.0, 1.0], [0.9, 0.9, 0.9, 0.9]])
    k = torch.tensor([4, 4, 2])
    tau = expected_tau(beta, k)
    a = 0.5
    assert tau[0] == pytest.approx((1 - a**5) / (1 - a))  # i.i.d. acceptance: docs/architecture.md "The math"
    assert tau[1] == pytest.approx(2.0)  # stops at the first sure rejection
    assert tau[2] == pytest.approx(1 + 0.9 + 0.81)  # only K = 2 rows count

    logq = torch.tensor([[[0.6, 0.3, 0.1]]]).log()  # one block, one row, draft vocab 3
    ids = torch.tensor([[[1, 0, -1]]])  # target top-k: draft id 1 (p .5), draft id 0 (p .3), outside (p .2)
    lp = torch.tensor([[[0.5, 0.3, 0.2]]]).log()
    assert float(acceptance_beta(logq, ids, lp)) == pytest.approx(0.3 + 0.3)  # Σ min(p, q), T = 1
    assert float(acceptance_beta(logq, ids, lp, torch.tensor([0.0]))) == 0.0  # argmax q (id 0) != argmax p (id 1)
    ids2 = torch.tensor([[[0, 1, -1]]])
    assert float(acceptance_beta(logq, ids2, lp, torch.tensor([0.0]))) == 1.0


# ---- the real model: replay == serving ----------------------------------------------------


@pytest.fixture(scope="module")
def served(target):
    """A seeded, untrained head served by the real engine on the default model:
    greedy and sampled requests, every block collected as the block log would."""
    cfg = Eagle3Config.for_target(target.model.cfg, draft_vocab_size=8192)
    head = Eagle3Head(cfg)
    head.reset_parameters(torch.Generator().manual_seed(0), std=0.05)
    head.init_output_from(target.model).attach(target.model)
    drafter = Eagle3Drafter(head, target.model, version="1")
    collector = BlockCollector(target.model_id)
    engine = Engine(target.model, drafter, target.eos_token_ids, 4, block_sink=collector)
    prompts = [chat_ids(target.tokenizer, p) for p in sharegpt_prompts("train", limit=40)]
    prompts = sorted(prompts, key=len)[:4]
    for i, ids in enumerate(prompts[:3]):
        engine.generate(ids, SamplingParams(temperature=0.0, max_tokens=24), request_id=f"greedy-{i}")
    engine.generate(prompts[3], SamplingParams(temperature=0.8, max_tokens=24, seed=7), request_id="sampled-0")
    return head, collector


@pytest.mark.slow
def test_replay_equals_the_serving_drafter(target, served):
    head, col = served
    reqs, stats = build_requests(col.records, col.contexts, head.d2t, target.model.cfg.vocab_size, 1, target.model_id)
    assert stats.no_context == 0 and stats.used == sum(r.num_draft > 0 for r in col.records) > 20
    compute_features(target.model, reqs, head.cfg.hidden_layers)
    student = trainable_copy(head, target.model)
    assert all(r.ctx_ids.numel() > 0 for r in reqs)  # the drafter's context vocab is in play
    vd = head.d2t.numel()
    diffs = []
    with torch.no_grad():
        for req in reqs:
            logq = replay_logq(student, collate_requests([req], torch.device("cpu"), torch.float32))  # (N, S, Vd + C)
            t2d = torch.full((target.model.cfg.vocab_size,), -1, dtype=torch.long)
            t2d[head.d2t] = torch.arange(vd)
            t2d[req.ctx_ids] = vd + torch.arange(req.ctx_ids.numel())
            for i, ex in enumerate(req.examples):
                t = ex.temperature
                lq = logq[i] if t == 0 else torch.log_softmax(logq[i] / t, dim=-1)  # the request's transform
                for j in range(ex.num_draft):
                    d = int(t2d[ex.step_tokens[j + 1]])
                    assert d >= 0
                    diffs.append(abs(float(lq[j, d]) - ex.served_logq[j]))
                    if t == 0:  # greedy: the replayed argmax is the drafted token
                        assert int(lq[j].argmax()) == d, (req.request_id, ex.position, j)
    # float32 features of one full forward vs the serving's incremental passes: equal up to
    # rounding (almost all rows agree to 1e-4; rare rows differ by ~1e-2)
    diffs_t = torch.tensor(diffs)
    assert len(diffs) > 40 and float(diffs_t.median()) < 1e-4 and float(diffs_t.max()) < 0.05, diffs
    # the evaluation of the serving head on greedy blocks gives back the served τ exactly
    greedy = [r for r in reqs if r.request_id.startswith("greedy")]
    ev = evaluate(student, greedy)
    assert ev.tau == pytest.approx(ev.served_tau, abs=1e-6) and ev.blocks > 0
    assert 1.0 <= ev.tau_overlap <= 5.0 and all(0.0 <= b <= 1.0 for b in ev.beta)
    # and its recomputed accept mask is the served one on greedy blocks (the mask reads the head, not the log)
    with torch.no_grad():
        for req in greedy:
            batch = collate_requests([req], torch.device("cpu"), torch.float32)
            replayed = block_accepted(replay_logq(student, batch), batch, OPDConfig())
            assert replayed.tolist() == batch.num_accepted.tolist(), req.request_id


@pytest.mark.slow
def test_exact_teacher_rows_are_the_targets(target, served):
    """The exact rows: the target's own softmax over each block's draft vocab at
    the emitted positions, and the recomputed top-1 is the logged one."""
    head, col = served
    reqs, _ = build_requests(col.records, col.contexts, head.d2t, target.model.cfg.vocab_size, 1, target.model_id)
    compute_features(target.model, reqs, head.cfg.hidden_layers)
    match, rows = sum(r.replay_top1[0] for r in reqs), sum(r.replay_top1[1] for r in reqs)
    assert rows >= sum(r.num_blocks for r in reqs) and match == rows  # float32 replay: every top-1 as logged
    # teacher-forced anchors (the random-anchor ablation): every row of a block is on the emitted context
    forced, _ = build_requests(
        col.records, col.contexts, head.d2t, target.model.cfg.vocab_size, 1, target.model_id, OPDConfig(anchors="random")
    )
    compute_features(target.model, forced, head.cfg.hidden_layers)
    assert sum(r.replay_top1[0] for r in forced) == sum(r.replay_top1[1] for r in forced) > sum(r.num_blocks for r in forced)
    req = forced[0]
    batch = collate_requests([req], torch.device("cpu"), torch.float32)
    student = trainable_copy(head, target.model)
    n_idx, s_idx, logp = exact_teacher_logp(batch, student.frozen.lm_rows, None)
    assert n_idx.numel() == sum(min(ex.exact_rows, ex.num_draft + 1) for ex in req.examples) > len(req.examples)
    with torch.no_grad():
        for i, (n, j) in enumerate(zip(n_idx.tolist(), s_idx.tolist())):
            ex = req.examples[n]
            logits = target.model.lm_head(req.final[ex.position - 1 + j])  # (V,) the target at the emitted position
            ids = torch.cat([head.d2t, req.ctx_ids])
            torch.testing.assert_close(logp[i], torch.log_softmax(logits[ids].float(), -1), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_optimizer_state_travels_with_the_version(target, served, tmp_path):
    head, col = served
    cfg = OPDConfig(epochs=4, warmup_steps=2, batch_tokens=512, fast_bf16=False, heldout_fraction=0.25)
    first = opd_update(head, target.model, col.records, col.contexts, 1, target.model_id, cfg)
    assert not first.train.carried_optimizer and first.train.optimizer
    lrs = [h["lr"] for h in first.train.history]  # warm-up from fresh, then a cosine decay over the update
    assert lrs[0] == pytest.approx(cfg.lr / 2) and max(lrs) == pytest.approx(cfg.lr) and lrs[-1] < 0.9 * cfg.lr
    assert first.replay["rows"] > 0 and first.replay["top1_match"] == 1.0
    path = save_update(first, tmp_path, target.model_id, 1, {})
    manifest = eagle3.read_manifest(path)
    assert manifest["optimizer_file"] == OPTIMIZER_FILE and (path / OPTIMIZER_FILE).is_file()
    eagle3.load_head(path, target.model, target.model_id)  # servers load the version as before
    state = read_optimizer(path, manifest)
    assert state is not None and state.keys() == first.train.optimizer.keys()
    second = opd_update(head, target.model, col.records, col.contexts, 1, target.model_id, cfg, optimizer_state=state)
    assert second.train.carried_optimizer and second.train.history[0]["lr"] == pytest.approx(cfg.lr)  # no warm-up
    steps = [k for k in state if k.endswith(".step")]
    assert all(float(second.train.optimizer[k]) == float(state[k]) + second.train.steps for k in steps)
    # a state that does not fit (another shape), or a file whose hash is not the manifest's: AdamW starts fresh
    bad = {k: (v[:1] if v.dim() else v) for k, v in state.items()}
    assert not train_opd(trainable_copy(head, target.model), [], cfg, optimizer_state=bad).carried_optimizer
    (path / OPTIMIZER_FILE).write_bytes(b"x" + (path / OPTIMIZER_FILE).read_bytes()[1:])
    assert read_optimizer(path, manifest) is None


@pytest.mark.slow
def test_training_lowers_the_loss(target, served):
    head, col = served
    cfg = OPDConfig(epochs=4, batch_tokens=512, lr=1e-3, seed=0, fast_bf16=False)
    reqs, _ = build_requests(col.records, col.contexts, head.d2t, target.model.cfg.vocab_size, 1, target.model_id, cfg)
    compute_features(target.model, reqs, head.cfg.hidden_layers)
    student = trainable_copy(head, target.model)
    before = evaluate(student, reqs, cfg)
    result = train_opd(student, reqs, cfg)
    after = evaluate(student, reqs, cfg)
    assert result.steps >= 4 and not result.stopped_early
    assert all(math.isfinite(h["loss"]) and math.isfinite(h["grad_norm"]) for h in result.history)
    assert after.loss < before.loss - 0.05, (before.loss, after.loss, result.epoch_loss)
    assert result.epoch_loss[-1] < result.epoch_loss[0]
    # the serving head is untouched
    torch.testing.assert_close(head.fc.weight, trainable_copy(head, target.model).fc.weight)


@pytest.mark.slow
def test_steps_fix_the_number_of_optimizer_steps(target, served):
    """`OPDConfig.steps` (equal compute across benchmark arms): exactly that many
    steps, passes repeated past `epochs` as needed, the cosine planned over them."""
    head, col = served
    cfg = OPDConfig(epochs=1, batch_tokens=512, warmup_steps=0, fast_bf16=False)
    reqs, _ = build_requests(col.records, col.contexts, head.d2t, target.model.cfg.vocab_size, 1, target.model_id, cfg)
    compute_features(target.model, reqs, head.cfg.hidden_layers)
    batches = len(train_opd(trainable_copy(head, target.model), reqs, cfg).history)
    for steps in (1, 2 * batches + 1):
        result = train_opd(trainable_copy(head, target.model), reqs, replace(cfg, steps=steps))
        lrs = [h["lr"] for h in result.history]
        assert result.steps == steps and lrs[0] == pytest.approx(cfg.lr) and lrs == sorted(lrs, reverse=True)
    assert {h["epoch"] for h in result.history} == {0, 1, 2}
    assert lrs[-1] == pytest.approx(cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * (steps - 1) / steps))))


@pytest.mark.slow
def test_opd_update_end_to_end(target, served):
    head, col = served
    cfg = OPDConfig(epochs=1, heldout_fraction=0.25, fast_bf16=False)
    out = opd_update(head, target.model, col.records, col.contexts, 1, target.model_id, cfg)
    assert out.train_blocks > 0 and out.heldout_requests >= 1 and out.train_requests >= 1
    assert out.before.tau is not None and out.after.tau is not None
    assert out.offline_not_worse == (out.after.tau >= out.before.tau)
    assert out.heldout_ids and len(out.heldout_ids) == out.heldout_requests
    assert out.head is not head and out.stats.records == len(col.records)
    # ablations run through the same path
    for kw in ({"mode": "forward_kl_all"}, {"mode": "reverse_kl_all", "gamma": 1.0}, {"anchors": "random"}):
        res = opd_update(head, target.model, col.records, col.contexts, 1, target.model_id, OPDConfig(epochs=1, fast_bf16=False, **kw))
        assert res.train.steps >= 1 and all(np.isfinite(h["loss"]) for h in res.train.history), kw
        assert res.after.blocks == out.after.blocks  # always evaluated on the served held-out blocks


@pytest.mark.slow
def test_rollouts_draft_full_k_greedily(target, served):
    """Benchmark rollouts decode as the greedy evaluation does: every block drafts
    all K (no confidence stop) at temperature 0; the drafter's own rule comes back."""
    from worker.train.rollouts import serve_for_blocks

    head, _ = served
    drafter = Eagle3Drafter(head, target.model, version="1")
    drafter.min_confidence = 0.9  # an untrained head is rarely this sure: served, it stops early
    prompt = chat_ids(target.tokenizer, sharegpt_prompts("train", limit=1)[0])
    params = SamplingParams(temperature=1.0, max_tokens=20)
    col, stats = serve_for_blocks(target, drafter, 4, [prompt], params, 0, "roll")
    drafted = [r for r in col.records if r.num_draft > 0]
    assert stats["greedy_eval"] and all(r.temperature == 0.0 for r in col.records)
    # after the prefill step (nothing drafted), every step drafts what the engine allows: K, less near max_tokens
    room = [min(4, 20 - (r.position - len(prompt)) - 1) for r in col.records[1:]]
    assert len(drafted) >= 3 and [r.num_draft for r in col.records[1:]] == room
    assert drafter.min_confidence == 0.9
    stopped, _ = serve_for_blocks(target, drafter, 4, [prompt], params, 0, "served", greedy_eval=False)
    assert any(0 < r.num_draft < 4 for r in stopped.records) or any(r.num_draft == 0 for r in stopped.records)
