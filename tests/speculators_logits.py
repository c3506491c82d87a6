"""Run in a separate environment that has the `speculators` package (not the
server's: its pins differ; docs/deployment.md says how to make one). Loads an
exported folder with speculators' own Eagle3 model class and writes its draft
logits for given inputs, for tests/test_export_speculators.py to compare.

    python tests/speculators_logits.py FOLDER INPUTS.safetensors OUT.safetensors STEPS

INPUTS holds `hidden_states` (1, T, 3d): the target's taps at positions 0..T-1,
and `input_ids` (1, T): the token after each position. OUT gets `logits`
(STEPS, 1, T, Vd): the lm_head output of each training-time-test step, where
step j feeds the true tokens shifted by j (teacher forcing). Imports nothing
of draftloop."""

from __future__ import annotations

import sys

import torch
from safetensors.torch import load_file, save_file
from speculators.models.eagle3 import Eagle3DraftModel, Eagle3SpeculatorConfig


def main(folder: str, inputs_path: str, out_path: str, steps: int) -> None:
    torch.set_num_threads(1)
    config = Eagle3SpeculatorConfig.from_pretrained(folder)
    config.transformer_layer_config._attn_implementation = "eager"  # CPU: no flex attention
    model = Eagle3DraftModel.from_pretrained(folder, config=config)
    # the export ships no embedding (engines share the verifier's); from_pretrained leaves
    # the missing one randomly initialised rather than NaN, so it keeps it: load it explicitly
    model._load_verifier_weights(overwrite_embed_tokens=True)
    model = model.float().eval()
    inputs = load_file(inputs_path)
    logits: list[torch.Tensor] = []
    hook = model.lm_head.register_forward_hook(lambda _m, _i, out: logits.append(out.detach()))
    with torch.no_grad():
        model(
            hidden_states=inputs["hidden_states"].float(),
            input_ids=inputs["input_ids"],
            document_ids=torch.zeros_like(inputs["input_ids"]),
            ttt_steps=steps,
        )
    hook.remove()
    save_file({"logits": torch.stack(logits).contiguous()}, out_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
