"""Export to / import from the speculators (vLLM) and SGLang formats
(`service.drafters.eagle3.formats`, `service.export`, `worker.importer`):
the layer-id conventions, the tensor names, a round trip export -> import
giving the same head and the same drafts on the real target, the refusals,
and the import command's gate on a real (throwaway) Redis."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from service.cli import main as cli_main
from service.drafters import eagle3
from service.drafters.eagle3 import formats
from service.drafters.eagle3.formats import FormatError
from service.export import export_drafter
from service.llama import LlamaConfig
from worker.importer import ImportFailed, convert, fetch_source

TINY = LlamaConfig(
    vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=8, num_heads=4, num_kv_heads=2,
    head_dim=4, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=128, tie_word_embeddings=False,
)  # fmt: skip
SPECULATORS_LAYER_NAMES = {
    "layers.0.self_attn.q_proj.weight", "layers.0.self_attn.k_proj.weight", "layers.0.self_attn.v_proj.weight",
    "layers.0.self_attn.o_proj.weight", "layers.0.mlp.gate_proj.weight", "layers.0.mlp.up_proj.weight",
    "layers.0.mlp.down_proj.weight", "layers.0.input_layernorm.weight", "layers.0.hidden_norm.weight",
    "layers.0.post_attention_layernorm.weight",
}  # fmt: skip


def random_head(cfg: eagle3.Eagle3Config, seed: int = 0) -> eagle3.Eagle3Head:
    """Every weight random (norm weights too, so a dropped or swapped norm shows),
    and a shuffled draft vocabulary (so d2t offsets are not all zero)."""
    gen = torch.Generator().manual_seed(seed)
    head = eagle3.Eagle3Head(cfg)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05 + (1.0 if p.ndim == 1 else 0.0))
        head.d2t.copy_(torch.randperm(cfg.target_vocab_size, generator=gen)[: cfg.draft_vocab_size])
    return head


# ---------------------------------------------------------------------------
# pure mapping


def test_layer_ids_follow_each_engines_convention():
    ours = (2, 15, 27)  # outputs of these layers of a 30-layer target
    assert formats.layer_ids_out(ours, "speculators", 30) == [3, 16, 28]  # vLLM: captured before layer id
    assert formats.layer_ids_out(ours, "sglang", 30) == [2, 15, 27]  # SGLang: captured before layer id + 1
    for fmt in formats.FORMATS:
        assert formats.layer_ids_in(formats.layer_ids_out(ours, fmt, 30), fmt, 30) == ours
        assert formats.layer_ids_in(None, fmt, 30) == (1, 14, 26)  # both engines' default: before 2, 15, 27
    with pytest.raises(FormatError, match="last"):
        formats.layer_ids_out((2, 15, 29), "speculators", 30)
    with pytest.raises(FormatError, match="embedding"):
        formats.layer_ids_in([0, 15, 27], "speculators", 30)


@pytest.mark.parametrize("fmt", formats.FORMATS)
@pytest.mark.parametrize("fc_norm", [True, False])
def test_tensor_names_and_round_trip(fmt, fc_norm):
    cfg = eagle3.Eagle3Config.for_target(TINY, draft_vocab_size=24, fc_norm=fc_norm)
    head = random_head(cfg)
    out = formats.export_tensors(head.state_dict(), cfg, fmt)
    layer = {n.replace("layers.0.", formats.LAYER[fmt]) for n in SPECULATORS_LAYER_NAMES}
    norms = {f"fc_norm.{i}.weight" for i in range(3)} if fc_norm else set()
    assert set(out) == layer | norms | {"fc.weight", "norm.weight", "lm_head.weight", "d2t", "t2d"}
    assert out["fc.weight"].shape == (16, 48) and out["lm_head.weight"].shape == (24, 16)
    assert out["d2t"].dtype == torch.int64 and torch.equal(out["d2t"] + torch.arange(24), head.d2t)
    assert out["t2d"].dtype == torch.bool and int(out["t2d"].sum()) == 24 and bool(out["t2d"][head.d2t].all())
    back = formats.import_tensors(out, cfg)
    assert back.keys() == head.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in head.state_dict().items())


def test_import_tensors_refuses_what_the_head_cannot_hold():
    cfg = eagle3.Eagle3Config.for_target(TINY, draft_vocab_size=24)
    out = formats.export_tensors(random_head(cfg).state_dict(), cfg, "speculators")
    with pytest.raises(FormatError, match="no place"):
        formats.import_tensors({**out, "layers.1.mlp.up_proj.weight": torch.zeros(1)}, cfg)
    with pytest.raises(FormatError, match="no place"):
        formats.import_tensors({**out, "fc.bias": torch.zeros(16)}, cfg)
    dup = out["d2t"].clone()
    dup[1] = dup[0] - 1  # draft ids 0 and 1 -> the same target id
    with pytest.raises(FormatError, match="distinct"):
        formats.import_tensors({**out, "d2t": dup}, cfg)
    with pytest.raises(FormatError, match="t2d"):
        formats.import_tensors({**out, "t2d": torch.ones(64, dtype=torch.bool)}, cfg)


def _config(fmt: str, **over) -> dict:
    cfg = eagle3.Eagle3Config.for_target(TINY, draft_vocab_size=24)
    config = formats.export_config(cfg, fmt, 4, "verifier", ["LlamaForCausalLM"], 128, "float32", {})
    layer = config["transformer_layer_config"] if fmt == "speculators" else config
    for key, value in over.items():
        (config if key in config and key != "hidden_size" else layer)[key] = value
    return config


@pytest.mark.parametrize("fmt", formats.FORMATS)
def test_import_config_reads_back_and_refuses(fmt):
    fmt_read, cfg = formats.import_config(_config(fmt), TINY)
    assert fmt_read == fmt
    assert cfg == eagle3.Eagle3Config.for_target(TINY, draft_vocab_size=24)
    assert _config(fmt)["norm_before_residual"] is False  # explicit: vLLM's default is True
    refusals = {
        "norm_before_residual": (True, "norm_before_residual"),
        "norm_output": (True, "norm_output"),
        "num_hidden_layers": (2, "decoder layers"),
        "hidden_size": (32, "hidden_size"),
        "model_type": ("qwen3", "qwen3"),
        "rope_theta": (5e5, "rope_theta"),
        "intermediate_size": (64, "intermediate_size"),
    }
    for key, (value, match) in refusals.items():
        with pytest.raises(FormatError, match=match):
            formats.import_config(_config(fmt, **{key: value}), TINY)
    with pytest.raises(FormatError, match="neither"):
        formats.import_config({"model_type": "llama"}, TINY)


# ---------------------------------------------------------------------------
# on the real target


@pytest.fixture(scope="module")
def exported(target, settings, tmp_path_factory) -> dict:
    """A random head for the real target saved as a version, exported in both formats."""
    ckdir = tmp_path_factory.mktemp("export-ck")
    cfg = eagle3.Eagle3Config.for_target(target.model.cfg, draft_vocab_size=2048)
    head = random_head(cfg, seed=1)
    eagle3.save_checkpoint(head, ckdir, target.model_id)
    local = settings.model_copy(update={"checkpoint_dir": ckdir})
    out = {fmt: export_drafter(local, fmt, tmp_path_factory.mktemp(fmt) / "head") for fmt in formats.FORMATS}
    return {"head": head.attach(target.model), "settings": local, **out}


@pytest.mark.parametrize("fmt", formats.FORMATS)
def test_export_writes_the_format(exported, fmt):
    folder: Path = exported[fmt]
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert (
        config["norm_before_residual"] is False
        and config["fc_norm"] is True
        and config["norm_output"] is False
    )
    if fmt == "speculators":
        assert config["speculators_model_type"] == "eagle3"
        assert config["eagle_aux_hidden_state_layer_ids"] == [3, 16, 28]  # our (2, 15, 27), vLLM's convention
        assert (
            config["speculators_config"]["verifier"]["name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
        )
        assert config["transformer_layer_config"]["num_hidden_layers"] == 1
    else:
        assert config["architectures"] == ["LlamaForCausalLMEagle3"]
        assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [2, 15, 27]
    text = (folder / "README.md").read_text()
    assert "context vocabulary" in text and str(folder) in text


@pytest.mark.parametrize("fmt", formats.FORMATS)
def test_round_trip_gives_the_same_head_and_drafts(exported, target, fmt):
    original: eagle3.Eagle3Head = exported["head"]
    head, info = convert(exported[fmt], target)
    assert info["format"] == fmt and info["hidden_layers"] == [2, 15, 27]
    assert head.cfg == original.cfg
    for key, value in original.state_dict().items():
        assert torch.equal(head.state_dict()[key], value), key
    ids = torch.tensor(target.tokenizer.encode("The quick brown fox jumps over the lazy dog because"))
    cache = target.model.new_cache(64)
    _, _, taps = target.model(ids, cache, hidden_layers=head.cfg.hidden_layers, logits=False)
    features = torch.cat(taps, dim=-1).unsqueeze(0)
    want = original.unroll(features, ids.unsqueeze(0), steps=3)
    got = head.unroll(features, ids.unsqueeze(0), steps=3)
    for step, (a, b) in enumerate(zip(want, got)):
        assert torch.equal(a.argmax(-1), b.argmax(-1)), f"step {step}: different drafts"
        assert torch.equal(a, b), f"step {step}: different logits"


def test_cli_export_and_refusals(exported, tmp_path, monkeypatch):
    monkeypatch.setenv("DRAFTLOOP_CHECKPOINT_DIR", str(exported["settings"].checkpoint_dir))
    monkeypatch.setenv("DRAFTLOOP_CACHE_DIR", str(exported["settings"].cache_dir))
    out = tmp_path / "sg"
    assert (
        cli_main(["export-drafter", "--format", "sglang", "--version", "1", "--dtype", "bfloat16", str(out)])
        == 0
    )
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert cli_main(["export-drafter", "--format", "sglang", str(out)]) == 2  # not empty: refused
    assert cli_main(["export-drafter", "--format", "sglang", "--version", "9", str(tmp_path / "x")]) == 2


def test_export_refuses_the_last_layer(target, settings, tmp_path):
    layers = (2, 15, target.model.cfg.num_layers - 1)
    cfg = eagle3.Eagle3Config.for_target(target.model.cfg, draft_vocab_size=256, hidden_layers=layers)
    eagle3.save_checkpoint(random_head(cfg), tmp_path / "ck", target.model_id)
    local = settings.model_copy(update={"checkpoint_dir": tmp_path / "ck"})
    with pytest.raises(FormatError, match="last"):
        export_drafter(local, "speculators", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_import_refuses_a_foreign_embedding(exported, target, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "emb"
    folder.mkdir()
    (folder / "config.json").write_text((exported["speculators"] / "config.json").read_text())
    tensors = load_file(str(exported["speculators"] / "model.safetensors"))
    own = target.model.embed_tokens.weight.detach().clone()
    save_file({**tensors, "embed_tokens.weight": own}, str(folder / "model.safetensors"))
    convert(folder, target)  # the target's own embedding: accepted
    save_file({**tensors, "embed_tokens.weight": own + 0.1}, str(folder / "model.safetensors"))
    with pytest.raises(FormatError, match="embedding"):
        convert(folder, target)


def test_import_hub_id_unreachable_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ImportFailed, match="download it where the hub is reachable"):
        fetch_source("someone/some-eagle3-head")
    with pytest.raises(ImportFailed, match="not a folder"):
        fetch_source("no/such/folder")


@pytest.mark.slow  # decodes with both drafters
def test_import_command_gates_before_publishing(exported, target, settings, tmp_path):
    """The import goes through the publish gate against the serving drafter on a
    throwaway Redis: a random head loses to prompt lookup, so it is saved,
    staged under unpublished/, reported, and the pointer is not moved."""
    from tests.conftest import free_port
    from tests.throwaway_redis import AVAILABLE, start_redis, stop_redis
    from worker.importer import publish_imported

    if not AVAILABLE:
        pytest.skip("redis-server is not installed")
    port = free_port()
    client = start_redis(port, tmp_path)
    try:
        local = settings.model_copy(update={
            "checkpoint_dir": tmp_path / "ck", "redis_url": f"redis://127.0.0.1:{port}/0", "drafter": "auto",
            "opd_train": {"gate_requests": 2, "gate_max_tokens": 8, "gate_resamples": 200},
        })  # fmt: skip
        head, info = convert(exported["sglang"], target)
        report = publish_imported(local, target, head, info)
        assert report["kind"] == "import" and report["imported_from"]["format"] == "sglang"
        assert report["gate"]["incumbent"].startswith("ngram") and report["gate"]["requests"] == 2
        assert report["published"] is False and report["status"] == "not_published"
        assert "unpublished" in report["checkpoint"] and Path(report["checkpoint"], "manifest.json").is_file()
        assert client.get("draftloop:drafter:current") is None
        assert list((tmp_path / "ck" / "reports").iterdir())
    finally:
        stop_redis(client)


def test_config_dataclass_reads_old_manifests():
    """Manifests written before fc_norm existed still load (as fc_norm heads)."""
    cfg = eagle3.Eagle3Config.for_target(TINY, draft_vocab_size=24)
    old = {k: v for k, v in cfg.to_dict().items() if k != "fc_norm"}
    assert eagle3.Eagle3Config.from_dict(old) == dataclasses.replace(cfg, fc_norm=True)


def test_a_plain_eagle3_head_imports_saves_loads_and_serves(target, tmp_path):
    """A head without per-tap norms (plain EAGLE-3, `fc_norm` false) in the SGLang
    layout: imported, saved as a version, loaded by the serving loader, and
    decoding with it stays lossless."""
    from safetensors.torch import save_file

    from service.drafters.none import NoDrafter
    from service.engine import Engine
    from service.sampling import SamplingParams

    cfg = eagle3.Eagle3Config.for_target(target.model.cfg, draft_vocab_size=512, fc_norm=False)
    head = random_head(cfg, seed=3)
    folder = tmp_path / "plain"
    folder.mkdir()
    save_file(formats.export_tensors(head.state_dict(), cfg, "sglang"), str(folder / "model.safetensors"))
    config = formats.export_config(cfg, "sglang", 4, "x", [], 8192, "float32", {})
    (folder / "config.json").write_text(json.dumps(config))
    imported, info = convert(folder, target)
    assert info["fc_norm"] is False and not any(k.startswith("feature_norms") for k in imported.state_dict())
    path = eagle3.save_checkpoint(imported, tmp_path / "ck", target.model_id)
    drafter = eagle3.load_checkpoint(path, target)
    for key, value in head.state_dict().items():
        assert torch.equal(drafter.head.state_dict()[key], value), key
    prompt = target.tokenizer.encode("Name three rivers in Europe and say where they flow.")
    greedy = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    want = Engine(target.model, NoDrafter(), target.eos_token_ids, 0).generate(prompt, greedy)
    drafter.min_confidence, drafter.stop_thresholds = 0.0, ()
    engine = Engine(target.model, drafter, target.eos_token_ids, 4)
    assert engine.generate(prompt, greedy) == want
    assert engine.stats.num_draft_tokens > 0
