"""The speculators export against speculators' own Eagle3 model class: the
same head, exported, loaded by `speculators.models.eagle3.Eagle3DraftModel`
in its own environment (tests/speculators_logits.py), gives the same draft
logits as ours on the same inputs: the target's taps on a real prompt, three
training-time-test steps, float32.

speculators pins another transformers than the server, so it runs in a
separate environment: `make venv-spec` makes `.venv-spec`;
DRAFTLOOP_SPECULATORS_PYTHON names another interpreter. Skipped when neither
imports speculators."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from service.drafters import eagle3
from service.export import export_drafter
from tests.test_export import random_head

ROOT = Path(__file__).resolve().parents[1]
SPEC_PYTHON = Path(os.environ.get("DRAFTLOOP_SPECULATORS_PYTHON") or ROOT / ".venv-spec" / "bin" / "python")
STEPS = 3
ATOL = 1e-4  # float32 through one layer and three steps; measured max |diff| ~2.5e-6 on logits of size ~5


def _speculators_available() -> bool:
    if not SPEC_PYTHON.exists():
        return False
    probe = [str(SPEC_PYTHON), "-c", "import speculators.models.eagle3"]
    return subprocess.run(probe, capture_output=True, timeout=300).returncode == 0


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not _speculators_available(),
        reason=f"no speculators environment at {SPEC_PYTHON} (make venv-spec; DRAFTLOOP_SPECULATORS_PYTHON)",
    ),
]


def test_speculators_eagle3_gives_our_draft_logits(target, settings, tmp_path):
    cfg = eagle3.Eagle3Config.for_target(target.model.cfg, draft_vocab_size=2048)
    head = random_head(cfg, seed=2)
    eagle3.save_checkpoint(head, tmp_path / "ck", target.model_id)
    local = settings.model_copy(update={"checkpoint_dir": tmp_path / "ck"})
    # the verifier is the local target folder, so speculators loads the same embedding offline
    folder = export_drafter(
        local, "speculators", tmp_path / "head", verifier=str(target.path), dtype="float32"
    )
    head.attach(target.model)
    ids = torch.tensor(
        target.tokenizer.encode("Speculative decoding drafts a few tokens, and the target checks")
    )
    _, _, taps = target.model(ids, target.model.new_cache(64), hidden_layers=cfg.hidden_layers, logits=False)
    features = torch.cat(taps, dim=-1).unsqueeze(0)  # (1, T, 3d)
    next_ids = torch.cat([ids[1:], ids.new_zeros(1)]).unsqueeze(
        0
    )  # the token after each position, 0 past the end
    save_file(
        {"hidden_states": features.contiguous(), "input_ids": next_ids.contiguous()}, str(tmp_path / "in.st")
    )
    run = [str(SPEC_PYTHON), str(ROOT / "tests" / "speculators_logits.py"), str(folder),
           str(tmp_path / "in.st"), str(tmp_path / "out.st"), str(STEPS)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(run, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = load_file(str(tmp_path / "out.st"))["logits"]  # (S, 1, T, Vd)
    ours = torch.stack(head.unroll(features, ids.unsqueeze(0), steps=STEPS))
    assert theirs.shape == ours.shape
    for step in range(STEPS):
        diff = (theirs[step] - ours[step]).abs().max().item()
        assert diff < ATOL, f"step {step}: max |logit diff| {diff}"
        assert torch.equal(theirs[step].argmax(-1), ours[step].argmax(-1)), f"step {step}: different drafts"
