"""LoRA (peft) fine-tuning with train.py: adapter-only training, merging, resuming, loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers_models import make_published_model
from helpers_train import MARKERS

import predict
import train
from utils.cli import InputError
from utils.models.cell_model import CellSentenceModel
from utils.models.lora import DEFAULT_TARGET_MODULES, is_adapter_dir, target_modules

LORA = ["--prompt_format", "c2s_scale", "--tasks", "cell_type_prediction", "--top_k_genes", "6",
        "--per_device_train_batch_size", "8", "--learning_rate", "5e-3", "--disable_tqdm", "True",
        "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0.0", "--seed", "2"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_published_model(tmp_path_factory.mktemp("hub") / "C2S-tiny", seed=1)


@pytest.fixture(scope="module")
def lora_run(one_thread, base: Path, data_dir: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    return train.main(train.parse_args([
        "--data_dir", str(data_dir), "--output_dir", str(out), "--run_name", "lora", "--model_name", str(base),
        "--max_steps", "8", "--save_steps", "4", "--merge_lora", "True", *LORA]))


def test_run_folder_holds_the_adapter_and_only_adapters_changed(lora_run: Path, base: Path) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    names = {p.name for p in lora_run.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "train_args.json",
            "merged"} <= names and "config.json" not in names
    assert is_adapter_dir(lora_run) and not is_adapter_dir(lora_run / "merged")
    config = json.loads((lora_run / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base.resolve()) and config["r"] == 4
    assert sorted(config["target_modules"]) == sorted(DEFAULT_TARGET_MODULES["gpt_neox"])
    record = json.loads((lora_run / "train_args.json").read_text())
    assert record["lora"]["r"] == 4 and record["lora"]["merged"] is True
    saved = load_file(str(lora_run / "adapter_model.safetensors"))
    assert saved and all("lora_" in k for k in saved)  # the adapter only, no base weights
    original = AutoModelForCausalLM.from_pretrained(base)
    before = {k: v.clone() for k, v in original.state_dict().items()}
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(lora_run))
    for name, value in peft_model.base_model.model.state_dict().items():
        if "lora_" in name:
            continue
        key = name.replace(".base_layer", "")
        assert torch.equal(value, before[key]), name  # frozen
    lora_b = [v for k, v in saved.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # trained (initialized at zero)


def test_merged_and_unmerged_give_the_same_logits(lora_run: Path, base: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(lora_run)
    ids = torch.tensor([tok("Cell sentence: CD14 LYZ S100A8.\nThe cell type is:")["input_ids"]])
    unmerged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(lora_run)).eval()
    merged = AutoModelForCausalLM.from_pretrained(lora_run / "merged").eval()
    plain = AutoModelForCausalLM.from_pretrained(base).eval()
    with torch.no_grad():
        a, b, c = unmerged(ids).logits, merged(ids).logits, plain(ids).logits
    assert torch.allclose(a, b, atol=1e-4)
    assert not torch.allclose(a, c, atol=1e-3)  # the adapter does change the model


def test_adapter_and_merged_folders_load_alike_with_their_recipe(lora_run: Path, data_dir: Path,
                                                                  tmp_path: Path) -> None:
    # merged/ carries the run's records, so it is used exactly as the adapter folder
    for name in ("recipe.json", "train_args.json"):
        assert (lora_run / "merged" / name).read_text() == (lora_run / name).read_text()
    recipe = json.loads((lora_run / "recipe.json").read_text())
    assert recipe["prompt_format"] == "c2s_scale" and recipe["top_k_genes"] == 6
    assert recipe["tasks"] == ["cell_type_prediction"] and recipe["task_weights"] == [1.0]
    assert recipe["label_columns"] == {"cell_type": sorted(MARKERS)}
    model = CellSentenceModel.load(lora_run, device="cpu")
    merged = CellSentenceModel.load(lora_run / "merged", device="cpu")
    cells = ["CD14 LYZ S100A8 S100A9 FCN1 VCAN", "CD79A MS4A1 CD79B BANK1 IGHM CD74"]
    for m in (model, merged):
        assert m.prompt_format.name == "c2s_scale" and m.top_k_genes == 6
    assert model.predict_cell_types(cells) == merged.predict_cell_types(cells)
    assert torch.allclose(torch.from_numpy(model.embed_cells(cells)), torch.from_numpy(merged.embed_cells(cells)),
                          atol=1e-4)
    metrics = predict.main(predict.parse_args([
        "--model_dir", str(lora_run), "--data_dir", str(data_dir), "--output_dir", str(tmp_path / "p"),
        "--max_cells", "8"]))
    assert metrics["n_cells"] == 8
    used = json.loads((tmp_path / "p" / "predict_args.json").read_text())["recipe"]
    assert used["prompt_format"] == "c2s_scale" and used["top_k_genes"] == 6


def test_resume_a_lora_run(lora_run: Path, base: Path, data_dir: Path) -> None:
    checkpoint = lora_run / "checkpoints" / "checkpoint-4"
    assert (checkpoint / "adapter_model.safetensors").is_file()
    resumed = train.main(train.parse_args([
        "--data_dir", str(data_dir), "--output_dir", str(lora_run.parent), "--run_name", "resumed",
        "--model_name", str(base), "--checkpoint", str(checkpoint), "--max_steps", "8", *LORA]))
    log = json.loads((resumed / "train_log.json").read_text())
    steps = [h["step"] for h in log if "loss" in h or "train_loss" in h]
    assert steps[-1] == 8
    results = json.loads((resumed / "train_results.json").read_text())
    assert results["global_step"] == 8
    # Resuming at step 4 reproduces the uninterrupted run's adapter.
    from safetensors.torch import load_file

    a = load_file(str(lora_run / "adapter_model.safetensors"))
    b = load_file(str(resumed / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_lora_flags_are_checked(base: Path, data_dir: Path) -> None:
    assert target_modules("gpt2", None) == ["c_attn", "c_proj", "c_fc"]
    assert target_modules("anything", "q_proj, v_proj") == ["q_proj", "v_proj"]
    with pytest.raises(InputError, match="--lora_target_modules"):
        target_modules("mamba", None)
    with pytest.raises(InputError, match="LoRA adapts a pretrained model"):
        train.check_args(train.parse_args(["--init_from_scratch", "True", "--lora_r", "4"]))
    with pytest.raises(InputError, match="--merge_lora"):
        train.check_args(train.parse_args(["--merge_lora", "True"]))
    with pytest.raises(InputError, match="c2s_scale"):
        train.check_args(train.parse_args(["--init_from_scratch", "True", "--prompt_format", "c2s_scale"]))


def _copy_adapter(lora_run: Path, to: Path) -> Path:
    import shutil

    to.mkdir()
    for p in lora_run.iterdir():
        if p.is_file():
            shutil.copy(p, to / p.name)
    return to


def test_broken_adapter_folder_fails_with_one_sentence(lora_run: Path, base: Path, tmp_path: Path) -> None:
    import re

    from utils.models.loading import load_model_and_tokenizer

    no_weights = _copy_adapter(lora_run, tmp_path / "no_weights")
    (no_weights / "adapter_model.safetensors").unlink()
    with pytest.raises(InputError) as err:
        CellSentenceModel.load(no_weights, device="cpu")
    assert str(err.value) == (
        f"{no_weights} is a LoRA adapter folder whose adapter weights {no_weights / 'adapter_model.safetensors'} "
        "are missing; the folder is an incomplete copy or an unfinished save: copy the whole run folder or "
        "train it again.")
    cut = _copy_adapter(lora_run, tmp_path / "cut")
    weights = cut / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(InputError, match=rf"^{re.escape(str(weights))} is truncated or damaged"):
        load_model_and_tokenizer(cut, "cpu")
    moved = _copy_adapter(lora_run, tmp_path / "moved")
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone" / "C2S-tiny")
    (moved / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(InputError) as err:
        load_model_and_tokenizer(moved, "cpu")
    assert str(err.value) == (
        f"{moved} is a LoRA adapter of the base model {tmp_path / 'gone' / 'C2S-tiny'}, which does not exist "
        f"here; put the base model there or set base_model_name_or_path in {moved / 'adapter_config.json'} "
        "to where it is.")
    # Without tokenizer files of its own, the adapter takes the base model's tokenizer.
    bare = _copy_adapter(lora_run, tmp_path / "bare")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"):
        (bare / name).unlink(missing_ok=True)
    model, tok = load_model_and_tokenizer(bare, "cpu")
    assert tok.get_vocab() == load_model_and_tokenizer(lora_run, "cpu")[1].get_vocab()
    assert model.config.model_type == "gpt_neox"
