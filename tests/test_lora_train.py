"""`agd train --adapter-kind lora`: the shared trainer fits a guidance LoRA (base untouched,
checkpoints and resume as for adapters) and writes a kohya LoRA file; bad settings exit 2."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from agd_cli.collect.run import run_collect
from agd_cli.config.presets import load_preset
from agd_cli.infra.errors import InputError
from agd_cli.train.settings import TrainSettings
from tests.conftest import agd_here as agd

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    root = tmp_path_factory.mktemp("collect-lora")
    (root / "prompts.txt").write_text("a red fox in the snow\na lighthouse at dusk\n")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    run_collect("tiny-sd", out=str(root / "tiny-sd"), device="cpu", workdir=str(root),
                num_per_prompt=2, steps=4, prompts=str(root / "prompts.txt"))
    torch.set_num_threads(before)
    return root / "tiny-sd"


def test_train_lora_writes_a_kohya_file_and_resumes(collection, tmp_path, capsys):
    os.environ["AGD_NO_PROGRESS"] = "1"
    run = tmp_path / "lora"
    args = ["train", "--data", str(collection / "trajectories"), "--run", str(run),
            "--adapter-kind", "lora", "--lr", "1e-2", "--checkpoint-every", "3", "--device",
            "cpu", "--json"]
    code, out, err = agd(*args, "--steps", "6", capsys=capsys)
    assert code == 0, err
    first = json.loads(out)
    # rank 8 over q/k/v/out of every transformer-block attention of the tiny UNet
    with safe_open(first["adapter"], "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
        ups = [f.get_tensor(k) for k in keys if k.endswith(".lora_up.weight")]
        downs = [f.get_tensor(k) for k in keys if k.endswith(".lora_down.weight")]
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert first["params"] == sum(t.numel() for t in ups + downs)
    assert all(d.shape[0] == 8 == u.shape[1] for d, u in zip(downs, ups, strict=True))  # rank 8
    assert any(u.abs().max() > 0 for u in ups)  # trained away from peft's zero init of B
    w_ref = load_preset("tiny-sd").sampling["default_omega"]
    assert json.loads(meta["adapter_config"])["lora_w_ref"] == w_ref
    assert meta["agd_lora_w_ref"] == f"{w_ref:g}" and meta["modelspec.architecture"]

    code, out, err = agd(*args, "--steps", "9", capsys=capsys)  # the schedule grows: resumes
    assert code == 0, err
    assert json.loads(out)["resumed_from"] == 6


@pytest.mark.parametrize("w_ref", [1.0, 0.5])
def test_w_ref_must_be_above_one(w_ref):
    preset = load_preset("tiny-sd")
    preset.adapter.kind, preset.adapter.lora_w_ref = "lora", w_ref
    with pytest.raises(InputError, match="lora_w_ref must be a number > 1") as err:
        TrainSettings.resolve(preset, {})
    assert err.value.exit_code == 2


def test_adapter_kind_flag_keeps_the_presets_lora_keys():
    """mnist is a cross-attention preset whose [adapter] also sets lora_rank 16 and the feed-forward
    targets: `agd train --adapter-kind lora` must train that LoRA, not the rank-8 defaults."""
    preset = load_preset("mnist")
    assert preset.adapter.kind == "cross_attention"
    s = TrainSettings.resolve(preset, {"adapter_kind": "lora"})
    assert (s.adapter.kind, s.adapter.lora_rank, s.adapter.lora_targets) == ("lora", 16, "attention_ff")
    assert s.adapter.lora_w_ref == preset.sampling["default_omega"]
    assert preset.adapter.kind == "cross_attention" and preset.adapter.lora_w_ref is None  # not changed


def test_a_preset_with_a_bad_lora_key_is_refused(tmp_path):
    text = (REPO / "presets" / "tiny-sd.toml").read_text()
    assert 'kind = "cross_attention"' in text
    for bad, needle in [("lora_w_ref = 1.0", "lora_w_ref"), ("lora_rank = 0", "lora_rank"),
                        ('lora_targets = "everything"', "lora_targets")]:
        toml = tmp_path / "p.toml"
        toml.write_text(text.replace('kind = "cross_attention"', f'kind = "lora"\n{bad}'))
        with pytest.raises(InputError, match=needle):
            load_preset(str(toml))
    toml.write_text(text.replace('kind = "cross_attention"', 'kind = "lora"\nlora_rank = 4'))
    assert load_preset(str(toml)).adapter.lora_rank == 4


def test_parameter_count_of_a_lora_preset(tmp_path):
    from agd_cli.families import count_parameters

    text = (REPO / "presets" / "tiny-sd.toml").read_text()
    toml = tmp_path / "tiny-sd-lora.toml"
    toml.write_text(text.replace('kind = "cross_attention"', 'kind = "lora"\nlora_rank = 4'))
    lora, plain = count_parameters(load_preset(str(toml))), count_parameters(load_preset("tiny-sd"))
    assert lora["base_params"] == plain["base_params"]  # the LoRA's layers are not the base's
    # rank 4 × (in + out) over q/k/v/out of each transformer-block attention
    from agd_cli.families import load_denoiser

    den = load_denoiser(load_preset("tiny-sd"), "cpu", text=False)
    linears = [m for n, m in den.model.named_modules() if ".transformer_blocks." in n
               and n.endswith((".to_q", ".to_k", ".to_v", ".to_out.0"))]
    assert lora["adapter_params"] == sum(4 * (m.in_features + m.out_features) for m in linears)
    assert lora["adapter_sites"] == len(linears)
    # lora_targets = "attention_ff": the blocks' feed-forward Linears too
    toml.write_text(text.replace('kind = "cross_attention"',
                                 'kind = "lora"\nlora_rank = 4\nlora_targets = "attention_ff"'))
    ff = [m for n, m in den.model.named_modules() if ".transformer_blocks." in n
          and n.endswith((".ff.net.0.proj", ".ff.net.2"))]
    assert ff and count_parameters(load_preset(str(toml)))["adapter_params"] == sum(
        4 * (m.in_features + m.out_features) for m in linears + ff)
