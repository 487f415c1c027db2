"""Training memory at real size without a GPU (meta device), and the autocast rule."""

from __future__ import annotations

import json

import pytest
import torch

from agd_cli.train.estimate import LiveBytes
from agd_cli.train.probe import measure_in_process
from agd_cli.train.step import autocast_dtype


def test_live_bytes_counts_each_storage_once_until_it_is_freed():
    with LiveBytes() as tracker:
        a = torch.empty(1000, device="meta")        # 4000 bytes
        view = a[:10]                               # same storage: not counted again
        b = torch.empty(500, dtype=torch.bfloat16, device="meta")
        assert tracker.live == 4000 + 1000
        del a, view
        assert tracker.live == 1000
    assert tracker.peak == 5000 and b.numel() == 500


@pytest.fixture(scope="module")
def tiny_sdxl_steps():
    return {ckpt: measure_in_process("tiny-sdxl", "bf16", "adamw", ckpt, 2, "meta", 64)
            for ckpt in (True, False)}


def test_meta_estimate_sees_checkpointing_trade_memory_for_compute(tiny_sdxl_steps):
    on, off = tiny_sdxl_steps[True], tiny_sdxl_steps[False]
    assert on["device"] == "meta" and on["seconds_step"] is None
    # recomputing the forward costs FLOPs (about one more forward of the base: < 1.6×)...
    assert 1.05 < on["flops_per_sample"] / off["flops_per_sample"] < 1.6
    # ...and keeps fewer activations alive for the backward pass
    assert on["step_bytes"] < off["step_bytes"]
    # the base's weights, the fp32 adapters and their AdamW state are all counted
    assert on["baseline_bytes"] >= on["weights_bytes"] + 4 * on["adapter_params"]
    assert on["optimizer_state_bytes"] == 8 * on["adapter_params"]


def test_eight_bit_state_is_a_quarter_of_adamw_for_large_tensors():
    est = measure_in_process("tiny-sd", "bf16", "adamw8bit", True, 1, "meta", 32)
    assert est["optimizer"] == "adamw8bit"
    assert 2 * est["adapter_params"] <= est["optimizer_state_bytes"] < 8 * est["adapter_params"]


@pytest.mark.parametrize("precision,device,base,expected", [
    ("bf16", "cuda", torch.bfloat16, None),           # base already in the compute dtype
    ("fp16", "cuda", torch.float16, None),
    ("bf16", "cuda", torch.float32, torch.bfloat16),  # an fp32 base computes under autocast
    ("fp32", "cuda", torch.float32, None),
    ("bf16", "cpu", torch.float32, None),             # CPU computes in fp32
])
def test_autocast_only_where_the_base_is_not_in_the_compute_dtype(precision, device, base, expected):
    assert autocast_dtype(precision, torch.device(device), base) == expected


def test_bench_memory_of_the_shipped_mnist_base(capsys):
    """mnist's base is a shipped model folder, not an architecture to build: it is loaded."""
    from agd_cli.cli import main

    main(["bench", "--memory", "--preset", "mnist", "--device", "cpu", "--train-batch-size", "2",
          "--json"])  # returns on success
    out = capsys.readouterr()
    memory = json.loads(out.out)["memory"]
    assert memory["preset"] == "mnist" and memory["latent_shape"] == [1, 32, 32]
    assert memory["peak_bytes"] >= memory["baseline_bytes"] > 0 and memory["adapter_params"] > 0


def test_failed_measurement_says_why_in_one_line_and_prints_its_command(capsys):
    from agd_cli.cli import main

    with pytest.raises(SystemExit) as done:
        main(["bench", "--memory", "--preset", "mnist", "--device", "bogus", "--json"])
    assert done.value.code == 2
    report = json.loads(capsys.readouterr().out)
    assert report["error"].endswith("failed (exit 2): unknown device 'bogus'"), report
    assert "-m agd_cli.train.probe --preset mnist" in report["hint"] and "--device bogus" in report["hint"]
