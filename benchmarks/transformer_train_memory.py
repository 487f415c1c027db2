"""Training memory of the large diffusion transformers (SD 3.5, PixArt-Σ, Sana) on a machine
without the memory (or the GPU) to build them whole.

The preset's base is cut to 1 and to 2 blocks (real width, real resolution, random weights;
text encoders shrunk, since training reads stored conditions), one training step is measured
on each in a fresh process (agd_cli.train.probe: forward with adapters, L2, backward, optimizer
step, twice), and what training adds is extended linearly over the blocks, which are identical:
adds(L) = adds(1) + (L − 1)·(adds(2) − adds(1)). The base's weights are counted exactly on the
meta device. CPU peaks are peak RSS, so CUDA's context (0.3–0.5 GiB) and allocator slack
are not in them.

    python benchmarks/transformer_train_memory.py --preset sd35-large --device cpu
    python benchmarks/transformer_train_memory.py --preset sana-1600m --batch-size 8
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agd_cli.config.presets import from_dict, load_preset  # noqa: E402
from agd_cli.families import count_parameters  # noqa: E402

GiB = 2**30
TINY_TEXT = {"hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1,
             "num_key_value_heads": 1, "head_dim": 8, "d_model": 8, "d_ff": 8, "d_kv": 4,
             "num_heads": 1, "num_layers": 1}  # CLIP, T5 and Gemma size keys; vocab kept


def cut(raw: dict, blocks: int) -> dict:
    """The preset's TOML with `blocks` transformer blocks and tiny text encoders."""
    raw = copy.deepcopy(raw)
    arch = raw["architecture"]
    arch["transformer"]["num_layers"] = blocks
    if "dual_attention_layers" in arch["transformer"]:  # SD3.5 Medium: keep the costlier kind
        arch["transformer"]["dual_attention_layers"] = list(range(blocks))
    for part in ("text_encoder", "text_encoder_2", "text_encoder_3"):  # unused in training
        if part in arch:
            arch[part] = {k: TINY_TEXT.get(k, v) for k, v in arch[part].items()}
    raw["name"] = f"{raw['name']}-{blocks}-blocks"
    return raw


def measure(raw: dict, blocks: int, a) -> dict:
    """One step on the cut base, in a fresh process."""
    cmd = [sys.executable, __file__, "--child", json.dumps(cut(raw, blocks)), "--device", a.device,
           "--batch-size", str(a.batch_size), "--precision", a.precision, "--optimizer", a.optimizer]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    """Measure 1 and 2 blocks, extend to the preset's depth, print one JSON object."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="sd35-large")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--precision", default="bf16")
    p.add_argument("--optimizer", default="adamw8bit")
    p.add_argument("--device", default="cpu")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        from agd_cli.train.probe import measure_in_process

        print(json.dumps(measure_in_process(from_dict(json.loads(a.child)), a.precision, a.optimizer, True,
                                  a.batch_size, a.device, None)))
        return
    preset = load_preset(a.preset)
    one, two = measure(preset.raw, 1, a), measure(preset.raw, 2, a)
    blocks = preset.architecture["transformer"]["num_layers"]
    adds = one["step_bytes"] + (blocks - 1) * (two["step_bytes"] - one["step_bytes"])
    counts = count_parameters(preset)
    weights = counts["base_params"] * (2 if a.precision in ("bf16", "fp16") else 4)
    adapters = counts["adapter_params"] * 4  # fp32
    out = {"preset": preset.name, "resolution": preset.resolution, "batch_size": a.batch_size,
           "precision": a.precision, "optimizer": one["optimizer"], "gradient_checkpointing": True,
           "blocks": blocks, "weights_gib": weights / GiB, "adapters_gib": adapters / GiB,
           "training_adds_gib": adds / GiB, "estimate_gib": (weights + adapters + adds) / GiB,
           "measured": {"1": one, "2": two}, "method": one["method"] + ", extended over blocks"}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
