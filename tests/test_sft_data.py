"""SFT data: the loss masks of the training-time test (reply anchors only, target
argmax inside the draft vocab) and the memory-mapped feature cache (content
addressing, resuming a killed generation, the same rows as in memory)."""

from __future__ import annotations

import torch

import worker.train.featstore as featstore
from service.drafters.eagle3 import Eagle3Config
from worker.train.data import collate
from worker.train.features import generate_batch
from worker.train.featstore import GenerationSettings, build_store, cache_layers
from worker.train.losses import step_masks, ttt_loss

from .test_eagle3 import TINY, tiny_head, tiny_target

LAYERS = Eagle3Config.for_target(TINY, 1).hidden_layers


def _prompts(n: int = 6, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(1, TINY.vocab_size, (int(k),), generator=gen).tolist() for k in torch.randint(3, 9, (n,), generator=gen)]


def _settings(**kw) -> GenerationSettings:
    base = dict(model_id="tiny", layers=cache_layers(LAYERS), max_new_tokens=6, eos_ids=(0,), bf16=False)
    return GenerationSettings(**{**base, **kw})


def test_masks_keep_reply_anchors_with_the_target_argmax_in_the_draft_vocab():
    target = tiny_target()
    data = generate_batch(target.model, _prompts(3), 8, {0}, LAYERS)
    batch = collate(data, [0, 1, 2])
    steps = 3
    plain = step_masks(batch, steps, on_prompt=True)
    reply = step_masks(batch, steps, on_prompt=False)
    in_vocab = torch.zeros(TINY.vocab_size, dtype=torch.bool)
    in_vocab[::2] = True
    masked = step_masks(batch, steps, on_prompt=False, in_vocab=in_vocab)
    t = torch.arange(batch.tokens.shape[1])
    for j in range(steps):
        for b in range(3):
            p, n = int(batch.prompt_lens[b]), int(batch.lengths[b])
            want_reply = (t >= p - 1) & (t + j + 1 <= n - 1)
            assert torch.equal(reply[j][b], want_reply) and bool((plain[j][b] >= reply[j][b]).all())
            for a in want_reply.nonzero().flatten().tolist():
                argmax = int(batch.next_ids[b, a + j + 1])  # the greedy token after the target position
                assert argmax == (int(batch.tokens[b, a + j + 2]) if a + j + 2 < n else int(data.last_next[b]))
                assert bool(masked[j][b, a]) == bool(in_vocab[argmax])
            assert not bool((masked[j][b] & ~want_reply).any())


def test_ttt_loss_is_finite_when_no_row_counts():
    target = tiny_target()
    head = tiny_head(target, draft_vocab=48)
    head.d2t.copy_(torch.arange(48) + 48)  # ids 48..95: the greedy tokens may all fall outside
    head.attach(target.model)
    data = generate_batch(target.model, _prompts(2), 4, {0}, LAYERS)
    batch = collate(data, [0, 1])
    batch.next_ids.fill_(0)  # every argmax outside the draft vocab: no row counts
    loss, losses, _ = ttt_loss(head, batch, 2)
    loss.backward()
    assert float(loss.detach()) == 0.0 and losses == []


def test_feature_cache_resumes_and_is_content_addressed(tmp_path, monkeypatch):
    target = tiny_target()
    prompts = _prompts(10)
    calls = {"n": 0}
    real = featstore.generate_batch

    def counting(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(featstore, "generate_batch", counting)
    try:
        build_store(target.model, prompts, _settings(), tmp_path, LAYERS, batch_size=1)
    except KeyboardInterrupt:
        pass
    assert calls["n"] == 3  # two shards written before the kill
    store = build_store(target.model, prompts, _settings(), tmp_path, LAYERS, batch_size=1)
    assert calls["n"] == 3 + 8 and len(store) == 10  # only the eight missing shards
    build_store(target.model, prompts[:8], _settings(), tmp_path, LAYERS, batch_size=1)
    assert calls["n"] == 11  # a prefix of whole groups of the prompts: its shards are cached
    build_store(target.model, prompts[:2], _settings(max_new_tokens=5), tmp_path, LAYERS, batch_size=1)
    assert calls["n"] == 13  # other settings: another folder
    assert len(list(tmp_path.glob("features-*"))) == 2


def test_feature_cache_rows_equal_the_generated_batch(tmp_path):
    target = tiny_target()
    prompts = _prompts(4)
    inputs = tuple(i - 1 for i in LAYERS)
    store = build_store(target.model, prompts, _settings(), tmp_path, inputs, batch_size=4)
    mem = generate_batch(target.model, [prompts[i] for i in featstore._generation_batches(prompts, 4)[0]], 6, {0}, LAYERS)
    memory_inputs = generate_batch(target.model, [prompts[i] for i in featstore._generation_batches(prompts, 4)[0]], 6, {0}, inputs)
    outputs = featstore.FeatureStore(store.shards, store.layers, LAYERS)
    for i in range(len(store)):
        assert torch.equal(store.rows(i)[0], memory_inputs.rows(i)[0]) and torch.equal(outputs.rows(i)[0], mem.rows(i)[0])
        assert torch.equal(store.rows(i)[1], mem.rows(i)[1])
    assert torch.equal(store.tokens, mem.tokens) and torch.equal(store.last_next, mem.last_next)
    assert torch.equal(store.response_tokens(), mem.response_tokens())
