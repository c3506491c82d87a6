"""The start-up warm-up (service/warmup.py): a full batch of dummy sequences
through the real batched loop, leaving nothing behind on the serving engine."""

import pytest

from service.drafters.ngram import NgramDrafter
from service.engine import Engine
from service.sampling import SamplingParams
from service.warmup import dummy_prompts, warm_up

pytestmark = pytest.mark.slow


def test_dummy_prompts_differ_in_length_and_repeat_a_span():
    prompts = dummy_prompts(8, vocab_size=1000)
    assert len({len(p) for p in prompts}) == 8
    assert all(p[:8] == p[8:16] for p in prompts)  # prompt lookup finds a match
    assert all(0 <= t < 1000 for p in prompts for t in p)


def test_warm_up_runs_the_batch_and_leaves_the_serving_engine_untouched(target):
    drafter = NgramDrafter()
    serving = Engine(target.model, drafter, target.eos_token_ids, max_num_seqs=4)
    prompt = dummy_prompts(1, target.model.cfg.vocab_size)[0]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    before = serving.generate(prompt, params)
    drafts = serving.stats.num_drafts

    seconds = warm_up(target.model, drafter, num_speculative_tokens=4, max_num_seqs=4, prefill_chunk=32)

    assert seconds > 0
    assert serving.stats.num_drafts == drafts  # no dummy token reached the serving engine's counters
    assert serving.generate(prompt, params) == before  # and serving output is unchanged


def test_load_state_warms_up_before_ready_without_counting_it(settings, target, caplog):
    from service.runtime import load_state

    caplog.set_level("INFO", logger="service.warmup")
    state = load_state(settings.model_copy(update={"warmup": True, "max_num_seqs": 4}), target=target)
    try:
        assert any("warm-up: 4 sequences" in r.getMessage() for r in caplog.records)
        assert state.engine.stats.num_drafts == 0
        assert state.metrics.drafts._value.get() == 0  # nor /metrics
    finally:
        state.close()
