"""``frugal export``: adapter / merged round trips with plain transformers + peft, the model card, the Hub
push (dry run and a recorded fake client), clear errors, and secrets never written anywhere."""

import json
import os
from pathlib import Path

import pytest
import torch

from conftest import TINY, compose_train
from frugal.train.export import AdapterMismatchError, ExportConfig, export, resolve_source
from frugal.conf import CONF_DIR

FAKE_HF_TOKEN = "hf_FakeTokenForFrugalTests0123456789abcd"
FAKE_WANDB_KEY = "fakewandbkey0123456789abcdef0123456789ab"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One 2-step tiny run with W&B offline, trained while fake secrets sit in the environment."""
    from frugal.recipes.train import run

    path = tmp_path_factory.mktemp("run")
    saved = {k: os.environ.get(k) for k in ("HF_TOKEN", "WANDB_API_KEY", "WANDB_MODE")}
    os.environ.update(HF_TOKEN=FAKE_HF_TOKEN, WANDB_API_KEY=FAKE_WANDB_KEY)
    try:
        run(compose_train(TINY + ["max_steps=2", "save_every=1", "logger=wandb", "logger.mode=offline",
                                  "logger.completions_every=1"]), run_dir=path)
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    return path


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("exp") / "adapter"
    report = export(ExportConfig(source=str(run_dir), output_dir=str(out), merge=True))
    return out, report


def _inputs():
    from frugal.inference.models import load_tokenizer

    tok = load_tokenizer("builtin:tiny-random")
    enc = tok(["What is 3 + 4?", "Compute 12 * 7, then add 5."], return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def _logits(model):
    ids, mask = _inputs()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.fixture(scope="module")
def plain_base_dir(tmp_path_factory):
    """builtin:tiny-random written as an ordinary transformers folder, so the round trip below uses
    nothing from Frugal to load the base."""
    from frugal.inference.models import load_model, ModelConfig

    base, tok = load_model(ModelConfig(name_or_path="builtin:tiny-random", dtype="float32"), torch.device("cpu"))
    path = tmp_path_factory.mktemp("base")
    base.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_adapter_round_trip_with_plain_transformers_and_peft(run_dir, exported, plain_base_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from frugal.inference.models import ModelConfig, load_model

    out, report = exported
    assert report["kind"] == "adapter" and report["source"] == str(run_dir / "final")
    # The model as Frugal trained it: its own loader plus the run's final adapter.
    trained, _ = load_model(ModelConfig(name_or_path="builtin:tiny-random", dtype="float32",
                                        adapter=str(run_dir / "final")), torch.device("cpu"))
    trained.eval()
    # The exported adapter through plain transformers + peft.
    plain_base = AutoModelForCausalLM.from_pretrained(plain_base_dir)
    base_logits = _logits(plain_base)
    reloaded = PeftModel.from_pretrained(plain_base, str(out)).eval()
    want, got = _logits(trained), _logits(reloaded)
    assert torch.equal(got, want)
    assert not torch.equal(got, base_logits), "the adapter changes nothing; the round trip proves nothing"
    adapter_cfg = json.loads((out / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == "builtin:tiny-random"
    assert (out / "tokenizer.json").exists() and (out / "chat_template.jinja").exists()


def test_merged_model_matches_base_plus_adapter(exported, plain_base_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, report = exported
    assert report["merged"] and (out / "merged" / "model.safetensors").exists()
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(plain_base_dir), str(out)).eval()
    base_logits = _logits(AutoModelForCausalLM.from_pretrained(plain_base_dir))
    got, want = _logits(merged), _logits(adapted)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - base_logits).abs().max() > 1e-4  # merging really added the adapter


def test_card_contents(run_dir, exported):
    from huggingface_hub import ModelCard

    out, _ = exported
    card = ModelCard.load(out / "README.md")
    assert card.data.license == "apache-2.0" and card.data.library_name == "peft"
    assert "sgrpo" in card.data.tags and "lora" in card.data.tags
    text = card.text
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "`builtin:tiny-random`" in text and "| task | `arith` |" in text
    assert "`sgrpo` (critic-free RL, group size 4)" in text
    assert f"| held-out greedy accuracy (after RL) | {summary['accuracy_after']:.4f} |" in text
    assert "| `algo.k_early` | `16` |" in text and "| `lora.r` | `16` |" in text
    assert "PeftModel.from_pretrained(base," in text and "frugal eval model.name_or_path=builtin:tiny-random" in text
    merged_card = ModelCard.load(out / "merged" / "README.md")
    assert merged_card.data.library_name is None and 'subfolder="merged"' in merged_card.text
    assert (out / "frugal_config.yaml").exists()


def test_eval_summary_goes_into_the_table(run_dir, tmp_path):
    summary = tmp_path / "summary.json"
    row = {"strategy": "best_of_n", "budget": 4, "problems": 8, "accuracy": 0.625, "flops_total": 1.5e12}
    summary.write_text(json.dumps({"rows": [row, {**row, "budget": 8, "accuracy": 0.75}], "extra": {"x": 0.5}}))
    out = tmp_path / "out"
    export(ExportConfig(source=str(run_dir), output_dir=str(out), verify=False, eval_summary=str(summary)))
    text = (out / "README.md").read_text()
    assert "| best_of_n accuracy at N=4 (8 problems, 1.5e+12 FLOPs) | 0.6250 |" in text
    assert "| best_of_n accuracy at N=8 (8 problems, 1.5e+12 FLOPs) | 0.7500 |" in text
    assert "| extra.x | 0.5000 |" in text


def test_checkpoint_source(run_dir, tmp_path):
    from safetensors.torch import load_file

    src = resolve_source(run_dir / "checkpoints" / "step_1")
    assert src.step == 1 and src.folder == run_dir / "checkpoints" / "step_1" / "adapter"
    report = export(ExportConfig(source=str(run_dir / "checkpoints" / "step_1"), output_dir=str(tmp_path / "o")))
    out = Path(report["output_dir"])
    want = load_file(str(run_dir / "checkpoints" / "step_1" / "adapter" / "adapter_model.safetensors"))
    got = load_file(str(out / "adapter_model.safetensors"))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert (out / "tokenizer_config.json").exists()  # checkpoints hold no tokenizer: saved from the base
    assert "| checkpoint step | 1 |" in (out / "README.md").read_text()


def test_clear_errors(run_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such run dir"):
        resolve_source(tmp_path / "nope")
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(FileNotFoundError, match="found no adapter"):
        resolve_source(tmp_path / "empty_run")
    broken = tmp_path / "checkpoints" / "step_3"
    broken.mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        resolve_source(broken)
    with pytest.raises(ValueError, match="source is required"):
        ExportConfig()

    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=true"):
        export(ExportConfig(source=str(run_dir), output_dir=str(target), verify=False))
    assert (target / "keep.txt").read_text() == "mine"
    export(ExportConfig(source=str(run_dir), output_dir=str(target), verify=False, overwrite=True))
    assert not (target / "keep.txt").exists() and (target / "adapter_model.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".taken.")], "temporary folder left behind"


def test_adapter_base_mismatch(run_dir, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from frugal.inference.models import load_tokenizer

    other = tmp_path / "other_base"
    LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(other)
    load_tokenizer("builtin:tiny-random").save_pretrained(other)
    with pytest.raises(AdapterMismatchError, match="does not fit base model"):
        export(ExportConfig(source=str(run_dir), output_dir=str(tmp_path / "o"), base_model=str(other)))
    assert not (tmp_path / "o").exists()


class _RecordingApi:
    calls: list = []

    def __init__(self, *args, **kwargs):
        _RecordingApi.calls.append(("init", args, kwargs))

    def create_repo(self, *args, **kwargs):
        _RecordingApi.calls.append(("create_repo", args, kwargs))

    def create_branch(self, *args, **kwargs):
        _RecordingApi.calls.append(("create_branch", args, kwargs))

    def upload_folder(self, **kwargs):
        _RecordingApi.calls.append(("upload_folder", (), kwargs))
        return type("Commit", (), {"commit_url": "https://huggingface.co/org/name/commit/abc"})()


def test_dry_run_push_lists_files_without_network(run_dir, tmp_path, monkeypatch):
    import huggingface_hub

    def no_network(*a, **k):
        raise AssertionError("dry_run must not touch the Hub")

    monkeypatch.setattr(huggingface_hub, "HfApi", no_network)
    report = export(ExportConfig(source=str(run_dir), output_dir=str(tmp_path / "o"), verify=False,
                                 push_to_hub="my-org/frugal-tiny", dry_run=True, revision="v1", private=False))
    push = report["push"]
    assert push["dry_run"] and push["url"] == "https://huggingface.co/my-org/frugal-tiny"
    assert push["revision"] == "v1" and push["private"] is False
    assert "adapter_model.safetensors" in push["files"] and "README.md" in push["files"]
    assert "PeftModel.from_pretrained(base, \"my-org/frugal-tiny\")" in (tmp_path / "o" / "README.md").read_text()


def test_push_uses_huggingface_hub_without_passing_a_token(run_dir, tmp_path, monkeypatch):
    import huggingface_hub

    _RecordingApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", _RecordingApi)
    monkeypatch.setenv("HF_TOKEN", FAKE_HF_TOKEN)
    report = export(ExportConfig(source=str(run_dir), output_dir=str(tmp_path / "o"), verify=False,
                                 push_to_hub="my-org/frugal-tiny", revision="exp", commit_message="first"))
    names = [c[0] for c in _RecordingApi.calls]
    assert names == ["init", "create_repo", "create_branch", "upload_folder"]
    create, branch, upload = (_RecordingApi.calls[i][2] for i in (1, 2, 3))
    assert create["private"] is True and create["exist_ok"] is True
    assert branch == {"branch": "exp", "exist_ok": True}
    assert upload["revision"] == "exp" and upload["commit_message"] == "first"
    assert upload["folder_path"] == str(tmp_path / "o")
    assert all("token" not in c[2] for c in _RecordingApi.calls), "the token must come from huggingface_hub itself"
    assert report["push"]["commit_url"].endswith("/commit/abc")


def test_no_secret_in_any_written_file(run_dir, exported, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", FAKE_HF_TOKEN)
    monkeypatch.setenv("WANDB_API_KEY", FAKE_WANDB_KEY)
    export(ExportConfig(source=str(run_dir), output_dir=str(tmp_path / "o"), verify=False,
                        push_to_hub="org/name", dry_run=True))
    files = [p for root in (run_dir, exported[0], tmp_path / "o") for p in Path(root).rglob("*") if p.is_file()]
    assert any("wandb" in str(p) for p in files), "the W&B offline files should be among those checked"
    assert len(files) > 20
    for path in files:
        data = path.read_bytes()
        for secret in (FAKE_HF_TOKEN, FAKE_WANDB_KEY):
            assert secret.encode() not in data, f"{path} contains a secret"


def test_refuses_to_export_a_leaked_secret(run_dir, tmp_path, monkeypatch):
    from frugal.train.export import assert_no_secrets

    monkeypatch.setenv("HF_TOKEN", FAKE_HF_TOKEN)
    (tmp_path / "notes.txt").write_text(f"token={FAKE_HF_TOKEN}")
    with pytest.raises(RuntimeError, match="notes.txt contains the value of a secret"):
        assert_no_secrets(tmp_path)


def test_frugal_export_recipe_composes_and_runs(run_dir, tmp_path):
    from hydra import compose, initialize_config_dir

    from frugal.recipes import export as export_recipe

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("export", overrides=[f"source={run_dir}", f"output_dir={tmp_path / 'o'}", "verify=false",
                                           "push_to_hub=org/name", "dry_run=true"])
        with pytest.raises(Exception, match="bogus"):
            export_recipe.run(compose("export", overrides=[f"source={run_dir}", "+bogus=1"]))
    report = export_recipe.run(cfg)
    assert report["push"]["dry_run"] and (tmp_path / "o" / "adapter_config.json").exists()


def test_prm_folder_round_trip(tmp_path):
    from frugal.train.lora import LoraConfig
    from frugal.inference.models import ModelConfig
    from frugal.train.prm import PRMConfig, build_prm, load_prm

    prm = build_prm(ModelConfig(name_or_path="builtin:tiny-random", dtype="float32"), LoraConfig(r=4),
                    PRMConfig(), torch.device("cpu"))
    with torch.no_grad():  # a trained-looking adapter: LoRA B is zero at init
        for name, p in prm.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    folder = prm.save(tmp_path / "prm_run" / "final")
    prompts, steps = ["What is 3 + 4 * 5?"], [["4 * 5 = 20", "3 + 20 = 23"]]
    want = load_prm(folder).score(prompts, steps)

    report = export(ExportConfig(source=str(tmp_path / "prm_run"), output_dir=str(tmp_path / "out")))
    assert report["kind"] == "prm" and report["base_model"] == "builtin:tiny-random"
    got = load_prm(tmp_path / "out").score(prompts, steps)
    assert got == want and len(got[0]) == 2
    card = (tmp_path / "out" / "README.md").read_text()
    assert "process reward model" in card and "load_prm(" in card and "frugal eval prm_path=" in card
    with pytest.raises(ValueError, match="PRM folder"):
        export(ExportConfig(source=str(folder), output_dir=str(tmp_path / "o2"), merge=True))
