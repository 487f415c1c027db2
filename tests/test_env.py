"""`agd env`: one JSON object a bug report can carry."""

from __future__ import annotations

import json

import torch

from tests.test_generate import agd as agd_here


def test_env_json_is_one_object_with_what_a_bug_report_needs(tmp_path, capsys):
    code, out, err = agd_here(capsys, "env", "--json", "--workdir", str(tmp_path / "runs"))
    assert code == 0, err
    facts = json.loads(out)  # exactly one JSON object on stdout
    v = facts["versions"]
    assert v["torch"] == torch.__version__ and v["agd"] and v["diffusers"] and v["transformers"]
    assert {"accelerate", "bitsandbytes", "xformers"} <= set(v)
    assert facts["cuda"]["available"] == torch.cuda.is_available()
    assert len(facts["cuda"]["gpus"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert isinstance(facts["bitsandbytes"]["adamw8bit_runs"], bool)
    assert facts["xformers"]["imports"] in (True, False)
    assert facts["disk"]["free_bytes"] > 0 and facts["disk"]["workdir"].endswith("runs")
    # tests run with HF_HUB_OFFLINE=1: no network attempt, and that is a normal answer
    assert facts["hub"]["offline_mode"] and facts["hub"]["reachable"] is None
    assert facts["hub"]["cache"]


def test_env_human_output_names_each_part(tmp_path, capsys):
    code, out, err = agd_here(capsys, "env", "--workdir", str(tmp_path))
    assert code == 0, err
    for part in ("versions:", "torch", "cuda:", "bitsandbytes AdamW8bit", "xformers:",
                 "workspace:", "hub: cache"):
        assert part in out
