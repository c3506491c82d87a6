"""The EAGLE-3 drafter: serving math equals the training unroll, the per-sequence
state survives accept/reject, greedy output equals target-only on the real
model, a short SFT run learns, checkpoints round-trip and bad ones are refused,
sampled mode is reproducible."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from service import checkpoints
from service.drafters.eagle3 import (
    CheckpointError,
    Eagle3Config,
    Eagle3Drafter,
    Eagle3Head,
    load_checkpoint,
    save_checkpoint,
    shifted_tokens,
)
from service.engine import Engine
from service.fileutil import sha256_file
from service.llama import LlamaConfig, LlamaModel
from worker.prompts import chat_ids, sharegpt_prompts
from service.sampling import SamplingParams
from worker.train.config import SFTConfig
from worker.train.features import generate_batch
from worker.train.sft import build_draft_vocab, collect_trajectories, train_head

from .reference import greedy_reference, heldout_prompt_ids, outputs_with

TINY = LlamaConfig(
    vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=4, num_heads=4, num_kv_heads=2,
    head_dim=8, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=256, tie_word_embeddings=True,
)


def tiny_target(seed: int = 0, model_id: str = "tiny") -> SimpleNamespace:
    torch.manual_seed(seed)
    model = LlamaModel(TINY, max_len=256)
    for p in model.parameters():
        torch.nn.init.normal_(p, 0.0, 0.3)
    return SimpleNamespace(model=model.eval().requires_grad_(False), model_id=model_id)


def tiny_head(target, draft_vocab: int = 48, seed: int = 1) -> Eagle3Head:
    head = Eagle3Head(Eagle3Config.for_target(target.model.cfg, draft_vocab))
    head.reset_parameters(torch.Generator().manual_seed(seed), std=0.3)
    head.d2t.copy_(torch.randperm(TINY.vocab_size, generator=torch.Generator().manual_seed(seed))[:draft_vocab].sort().values)
    return head.init_output_from(target.model).attach(target.model)


# ---- the math ---------------------------------------------------------------


def test_cached_steps_equal_training_unroll():
    """Serving (catch-up over verified anchors, then steps on the head's own
    hidden) computes exactly what the TTT unroll computes at every anchor."""
    target = tiny_target()
    head = tiny_head(target)
    d, steps, t = TINY.hidden_size, 4, 14
    feats = torch.randn(1, t, 3 * d)
    toks = torch.randint(0, TINY.vocab_size, (1, t))
    with torch.no_grad():
        want = head.unroll_hidden(feats, shifted_tokens(toks, steps))  # (S, 1, T, d)
        for a in range(t - steps):
            k = torch.zeros(TINY.num_kv_heads, 64, TINY.head_dim)
            v = torch.zeros_like(k)
            h = head.step(head.fuse(list(feats[0, : a + 1].split(d, -1))), toks[0, 1 : a + 2], k, v, 0)[-1:]
            for j in range(steps):
                torch.testing.assert_close(h[0], want[j, 0, a], rtol=1e-4, atol=1e-4)
                if j + 1 < steps:
                    h = head.step(h, toks[0, a + j + 2].view(1), k, v, a + 1 + j)


def test_state_after_accept_and_reject_equals_fresh_start():
    """Whatever the target accepts, the next proposal equals that of a drafter
    started from scratch on the same tokens (rollback and feature bookkeeping)."""
    target = tiny_target()
    model = target.model
    drafter = Eagle3Drafter(tiny_head(target), model, min_confidence=0.0)  # always k drafts
    greedy = SamplingParams(temperature=0.0)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, TINY.vocab_size, (7,), generator=gen).tolist()

    def fresh_proposal(tokens: list[int], k: int) -> list[int]:
        seq = SimpleNamespace(tokens=list(tokens), capacity=128, draft_state=None)
        cache = model.new_cache(128)
        with torch.inference_mode():
            _, _, taps = model(torch.tensor(tokens[:-1]), cache, hidden_layers=drafter.hidden_layers)
            drafter.begin(seq, taps)
            return drafter.propose(seq, k, greedy, gen).tokens

    seq = SimpleNamespace(tokens=list(prompt), capacity=128, draft_state=None)
    cache = model.new_cache(128)
    with torch.inference_mode():
        _, _, taps = model(torch.tensor(prompt), cache, hidden_layers=drafter.hidden_layers)
        seq.tokens.append(5)
        drafter.begin(seq, taps)
        for step, n in enumerate([0, 3, 1, 4, 2, 0, 4]):
            k = 4
            drafted = drafter.propose(seq, k, greedy, gen).tokens
            assert drafted == fresh_proposal(seq.tokens, k), f"step {step}"
            start = cache.length
            _, _, taps = model(torch.tensor([seq.tokens[-1], *drafted]), cache, hidden_layers=drafter.hidden_layers)
            cache.rollback(start + 1 + n)
            seq.tokens += [*drafted[:n], (7 * step + 3) % TINY.vocab_size]
            drafter.commit(seq, n, taps)


# ---- the real model -----------------------------------------------------------


@pytest.fixture(scope="module")
def trained(target, tmp_path_factory):
    """A head trained for a few dozen steps on a tiny trajectory set (fixed seed)."""
    torch.manual_seed(0)
    model = target.model
    cfg = SFTConfig(draft_vocab_size=4096, ttt_steps=3, train_steps=40, batch_tokens=768, lr=3e-3, warmup_steps=4, seed=0)
    prompts = [chat_ids(target.tokenizer, p) for p in sharegpt_prompts("train", limit=8)]
    layers = Eagle3Config.for_target(model.cfg, 1).hidden_layers
    data = collect_trajectories(
        model, prompts, 48, target.eos_token_ids, layers, tmp_path_factory.mktemp("sft"), batch_size=8, model_id="test"
    )
    d2t = build_draft_vocab(data.response_tokens(), data.tokens, model.cfg.vocab_size, cfg.draft_vocab_size)
    head = Eagle3Head(Eagle3Config.for_target(model.cfg, d2t.numel(), layers))
    head.reset_parameters(torch.Generator().manual_seed(0))
    head.d2t.copy_(d2t)
    head.init_output_from(model).attach(model)
    history = train_head(head, data, cfg)
    return head, history


@pytest.mark.slow
def test_short_training_lowers_loss_and_raises_accuracy(trained):
    _, history = trained
    first, last = history[:5], history[-5:]
    mean = lambda rows, f: sum(map(f, rows)) / len(rows)  # noqa: E731
    assert mean(last, lambda h: h["loss"]) < 0.7 * mean(first, lambda h: h["loss"])
    assert mean(last, lambda h: h["acc"][0]) > mean(first, lambda h: h["acc"][0]) + 0.1


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 4, 8])
def test_greedy_equals_target_only(target, trained, k):
    head, _ = trained
    ref = greedy_reference(target)
    outs, engine = outputs_with(target, Eagle3Drafter(head, target.model, version="test"), k)
    for i, (got, want) in enumerate(zip(outs, ref)):
        assert got == want, f"prompt {i}: outputs differ"
    assert engine.stats.num_drafts > 0 and engine.stats.num_accepted_tokens <= engine.stats.num_draft_tokens


@pytest.mark.slow
def test_sampled_mode_is_reproducible(target, trained):
    head, _ = trained
    engine = Engine(target.model, Eagle3Drafter(head, target.model), target.eos_token_ids, 4)
    prompt = list(heldout_prompt_ids(target.tokenizer)[0])
    params = SamplingParams(temperature=1.0, max_tokens=32, seed=1234)
    first = engine.generate(prompt, params)
    assert engine.generate(prompt, params) == first
    assert len(first) > 0 and engine.stats.num_drafts > 0


# ---- checkpoints -----------------------------------------------------------------


def _save(head, root: Path, model_id: str = "tiny", parent=None) -> Path:
    return save_checkpoint(head, root, model_id, parent_version=parent, trained_on={"sequences": 3, "tokens": 10})


def test_checkpoint_round_trip(tmp_path):
    target = tiny_target()
    head = tiny_head(target)
    path = _save(head, tmp_path)
    assert path == tmp_path / "eagle3" / "v1" and sorted(p.name for p in path.iterdir()) == ["manifest.json", "model.safetensors"]
    m = json.loads((path / "manifest.json").read_text())
    assert m["version"] == 1 and m["parent_version"] is None and m["target_model"] == "tiny"
    assert m["format_version"] == 2 and {"norm.weight", "lm_head.weight"} <= set(load_file(str(path / "model.safetensors")))
    assert m["hidden_layers"] == list(head.cfg.hidden_layers) and m["draft_vocab_size"] == 48
    assert m["weights_sha256"] == sha256_file(path / "model.safetensors") and m["created_at"]
    drafter = load_checkpoint(path, target)
    assert drafter.kind == "eagle3" and drafter.version == "1"
    for name, tensor in head.state_dict().items():
        assert torch.equal(drafter.head.state_dict()[name], tensor), name
    assert _save(head, tmp_path, parent=1).name == "v2"
    assert checkpoints.list_versions(tmp_path) == [1, 2]
    assert newest_drafter(tmp_path, target).version == "2"
    assert newest_drafter(tmp_path / "empty", target) is None
    assert not [p for p in (tmp_path / "eagle3").iterdir() if p.name.startswith(".tmp")]


def test_format_1_checkpoint_loads_with_the_targets_output_layer(tmp_path):
    """A format-1 checkpoint (no norm / LM head of its own) loads; those start as
    the target's final norm and its LM-head rows of the draft vocab."""
    target = tiny_target()
    head = tiny_head(target)
    path = _save(head, tmp_path)
    weights = path / "model.safetensors"
    state = {k: v for k, v in load_file(str(weights)).items() if k not in ("norm.weight", "lm_head.weight")}
    save_file(state, str(weights))
    m = json.loads((path / "manifest.json").read_text())
    m.update(format_version=1, weights_sha256=sha256_file(weights))
    (path / "manifest.json").write_text(json.dumps(m))
    loaded = load_checkpoint(path, target).head
    assert torch.equal(loaded.lm_head.weight, target.model.lm_head.weight[head.d2t])
    assert torch.equal(loaded.norm.weight, target.model.norm.weight)
    assert torch.equal(loaded.fc.weight, head.fc.weight)
    m["format_version"] = 3
    (path / "manifest.json").write_text(json.dumps(m))
    assert "format_version 3" in _refusal(path, target)


def newest_drafter(checkpoint_dir: Path, target) -> Eagle3Drafter | None:
    """The newest version that loads (what a server without a pointer starts with)."""
    found = checkpoints.load_newest(checkpoint_dir, lambda path: load_checkpoint(path, target))
    return None if found is None else found.value


def _refusal(path: Path, target) -> str:
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, target)
    return str(err.value)


def test_refuses_mismatched_target(tmp_path):
    target = tiny_target()
    path = _save(tiny_head(target), tmp_path)
    msg = _refusal(path, SimpleNamespace(model=target.model, model_id="other-model"))
    assert "trained for target 'tiny'" in msg and "'other-model'" in msg
    wider = dict(vars(TINY), hidden_size=48, head_dim=12)
    msg = _refusal(path, SimpleNamespace(model=LlamaModel(LlamaConfig(**wider), max_len=64), model_id="tiny"))
    assert "target_hidden_size" in msg


def test_refuses_bad_sha256_and_truncated_file(tmp_path, caplog):
    target = tiny_target()
    head = tiny_head(target)
    good, bad = _save(head, tmp_path), _save(head, tmp_path)
    m = json.loads((bad / "manifest.json").read_text())
    m["weights_sha256"] = "0" * 64
    (bad / "manifest.json").write_text(json.dumps(m))
    assert "does not match the manifest" in _refusal(bad, target)
    with caplog.at_level(logging.WARNING):
        assert newest_drafter(tmp_path, target).version == "1"  # v2 refused, v1 still serves
    assert "skipping eagle3 checkpoint" in caplog.text
    weights = good / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    msg = _refusal(good, target)
    assert "sha256" in msg and "corrupt or partially written" in msg


def test_refuses_wrong_shapes(tmp_path):
    target = tiny_target()
    path = _save(tiny_head(target), tmp_path)
    weights = path / "model.safetensors"
    state = load_file(str(weights))
    state["fc.weight"] = torch.zeros(TINY.hidden_size, 2 * TINY.hidden_size)
    save_file(state, str(weights))
    m = json.loads((path / "manifest.json").read_text())
    m["weights_sha256"] = sha256_file(weights)  # a consistent but wrongly shaped checkpoint
    (path / "manifest.json").write_text(json.dumps(m))
    msg = _refusal(path, target)
    assert "wrong tensor shapes" in msg and "fc.weight" in msg


def test_killed_training_resumes_where_it_stopped(tmp_path, monkeypatch):
    """Optimizer state saved on the way: a run killed after 3 steps and rerun
    ends with the same weights as an uninterrupted run."""
    import worker.train.sft as sft

    target = tiny_target()
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, TINY.vocab_size, (n,), generator=gen).tolist() for n in (5, 7, 9, 6)]
    layers = Eagle3Config.for_target(TINY, 1).hidden_layers
    data = generate_batch(target.model, prompts, 12, {0}, layers)
    cfg = SFTConfig(
        train_steps=6, train_minutes=None, batch_tokens=40, ttt_steps=2, warmup_steps=2, save_every_s=0.0, fast_bf16=False,
        loss_on_prompt=True,
    )  # fmt: skip

    def fresh() -> Eagle3Head:
        return tiny_head(target, seed=3)

    straight = fresh()
    sft.train_head(straight, data, cfg)

    real_collate, calls = sft.collate, {"n": 0}

    def dying_collate(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt("killed")
        return real_collate(*args, **kwargs)

    state = tmp_path / "state"
    monkeypatch.setattr(sft, "collate", dying_collate)
    with pytest.raises(KeyboardInterrupt):
        sft.train_head(fresh(), data, cfg, state)
    monkeypatch.setattr(sft, "collate", real_collate)
    assert json.loads((state / "state.json").read_text())["spent"]["step"] == 3
    resumed = fresh()
    history = sft.train_head(resumed, data, cfg, state)
    assert [h["step"] for h in history] == list(range(6))
    for name, tensor in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_min_confidence_shortens_drafts():
    """The chain-confidence rule: the first token is always drafted; with a
    threshold of 1 nothing more, with 0 all k."""
    target = tiny_target()
    model = target.model
    greedy = SamplingParams(temperature=0.0)
    lengths = {}
    for conf in (0.0, 1.0):
        drafter = Eagle3Drafter(tiny_head(target), model, min_confidence=conf)
        seq = SimpleNamespace(tokens=[3, 1, 4, 1, 5], capacity=64, draft_state=None)
        with torch.inference_mode():
            _, _, taps = model(torch.tensor(seq.tokens[:-1]), model.new_cache(64), hidden_layers=drafter.hidden_layers)
            drafter.begin(seq, taps)
            proposal = drafter.propose(seq, 5, greedy, None)
        assert len(proposal.logprobs) == len(proposal.tokens)
        lengths[conf] = len(proposal.tokens)
    assert lengths == {0.0: 5, 1.0: 1}
