"""Per real preset, at real size with seeded random weights: what random configs hide (issue 31).

Run through `python benchmarks/gpu_check.py --families` (CUDA; about 4 minutes for the eight real
presets on an H100) or `--families --tiny --device cpu` (the tiny presets: a dry run of the
code). For each preset, built through agd's own random-weight load path in the preset's own
precision, text encoders included:

  dtypes     each text encoder's parameters by dtype; the layers transformers keeps in fp32
             (T5's `wo` in fp16 runs: PixArt-Σ) are fp32, the rest in the part's dtype
             (Sana's Gemma-2: bf16 beside the fp16 transformer)
  attention  what agd's fast-attention choice sets (xformers only for sd, sdxl, dit, sd3, where
             installed) and the attention processor classes the model then runs
  finite     prompt embeddings (cond and null), one CFG prediction, one adapter prediction and
             one decoded image hold no NaN / inf
  fallback   with hardware.assume(bf16=False) (an RTX 20xx): the precision agd trains in (fp16
             for the bf16 presets), and one adapter training step at batch 1 in it with the grad
             scaler: a finite loss and finite adapter weights after the update

and, per phase, the peak CUDA memory (reserved and allocated) and seconds.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter

REAL_PRESETS = ("sd15", "sd21", "sdxl", "dit", "pixart-sigma", "sana-1600m", "sd35-medium",
                "sd35-large")
TINY_PRESETS = ("tiny-sd", "tiny-sdxl", "tiny-dit", "tiny-pixart", "tiny-sana", "tiny-sd3")
PROMPTS = ["a red fox standing in fresh snow", "a lighthouse on a cliff at dusk"]
GiB = 2**30


class Phases:
    """Peak CUDA memory and seconds per named phase of one preset's check."""

    def __init__(self, device):
        self.device, self.out = device, {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        import torch

        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        yield
        if cuda:
            torch.cuda.synchronize(self.device)
        self.out[name] = {
            "seconds": round(time.perf_counter() - t0, 2),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved(self.device) / GiB, 2)
            if cuda else None,
            "peak_allocated_gib": round(torch.cuda.max_memory_allocated(self.device) / GiB, 2)
            if cuda else None}


def _finite(tensors) -> bool:
    return all(bool(t.isfinite().all()) for t in tensors if t.is_floating_point())


def _build(preset, device, dtype, text: bool):
    """The preset's base through agd's random-weight load (Denoiser.load: text encoders cast
    by transformers' keep-in-fp32 rule), built straight on `device` in `dtype`."""
    import torch

    from agd_cli.bench.memory import _default_dtype
    from agd_cli.families import FAMILY_CLASSES

    cls = FAMILY_CLASSES[preset.family]
    with torch.device(device), _default_dtype(dtype):
        return cls.load(preset, device=device, dtype=dtype, weights="random", text=text)


def text_dtypes_report(den) -> dict:
    """Per text encoder: parameter counts by dtype, and whether the layers transformers keeps in
    fp32 for the part's dtype (T5's `wo` in fp16) are fp32."""
    import torch

    from agd_cli.families.precision import NAMES, keep_in_fp32, part_dtype

    report = {}
    for name, module in den.text.items():
        if not isinstance(module, torch.nn.Module):
            continue
        dtype = part_dtype(den.preset, name, den.dtype, den.device)
        keep = keep_in_fp32(module, dtype)
        kept = [p.dtype for k in keep for p in module.get_submodule(k).parameters()]
        report[name] = {"dtype": NAMES[dtype],
                        "params_by_dtype": dict(Counter(str(p.dtype).replace("torch.", "")
                                                        for p in module.parameters())),
                        "keep_in_fp32_layers": len(keep),
                        "keep_in_fp32_ok": all(dt == torch.float32 for dt in kept)}
    return report


def _prompts(den) -> list:
    return ["1", "207"] if den.family == "dit" else PROMPTS


def check_inference(preset, device, phases: Phases) -> dict:
    """dtypes, attention, finite outputs of encode / CFG / adapters / decode, per phase."""
    import torch

    from agd_cli.families import resolve_dtype
    from agd_cli.families.attention import use_fast_attention
    from agd_cli.families.precision import NAMES

    dtype = resolve_dtype(preset.collect.get("dtype", "fp16"), device)
    with phases("load"):
        den = _build(preset, device, dtype, text=True)
    out = {"dtype": NAMES[dtype], "text_dtypes": text_dtypes_report(den)}
    out["attention"] = use_fast_attention(den)
    out["processors"] = dict(Counter(type(m.processor).__name__ for m in den.model.modules()
                                     if hasattr(m, "processor")))
    finite = {}
    with torch.inference_mode():
        with phases("encode"):
            cond, null = den.encode(_prompts(den)), den.encode_null(2)
        finite["conditions"] = _finite([*cond.values(), *null.values()])
        den.free_text_encoders()
        x = torch.randn(2, *den.latent_shape(), device=device, dtype=dtype)
        t = torch.tensor(500, device=device)  # mid-trajectory
        with phases("cfg_step"):
            finite["cfg"] = _finite([den.predict_cfg(x, t, cond, null, 4.0)])
        torch.manual_seed(0)
        den.new_adapters()
        with phases("adapter_step"):
            omega = torch.full((2,), 4.0, device=device)
            finite["adapters"] = _finite([den.predict(x, t, cond, omega=omega)])
        with phases("decode"):
            finite["decode"] = _finite([den.decode(x[:1])])
    out["finite"] = finite
    del den
    return out


def check_fallback(preset, device, phases: Phases) -> dict:
    """One adapter training step as agd trains on a card without bf16."""
    import torch

    from agd_cli.bench.memory import batch_losses, random_inputs
    from agd_cli.families.precision import TORCH_DTYPES, resolve_precision
    from agd_cli.infra import hardware
    from agd_cli.train.step import AdapterStep

    with hardware.assume(bf16=False):
        precision = resolve_precision(preset.train["precision"], device)
    dtype = TORCH_DTYPES[precision] if device.type == "cuda" else torch.float32
    with phases("train_step"):
        den = _build(preset, device, dtype, text=False)
        if preset.train.get("gradient_checkpointing"):
            den.model.enable_gradient_checkpointing()
        torch.manual_seed(0)
        params = [p for p in den.new_adapters().train().parameters() if p.requires_grad]
        update = AdapterStep(params, torch.optim.AdamW(params, lr=1e-4), precision, device, dtype)
        loss = update(batch_losses(den, update, random_inputs(den, 1, preset.resolution)))
    return {"preset_precision": preset.train["precision"], "precision": precision,
            "grad_scaler": update.scaler is not None, "loss": loss,
            "loss_finite": bool(torch.isfinite(torch.tensor(loss))),
            "adapters_finite": _finite([p.detach() for p in params])}


def check_preset(name: str, device, make_preset) -> dict:
    """Both checks for one preset; an exception is reported, not raised (the next preset runs)."""
    import torch

    phases = Phases(device)
    result: dict = {}
    try:
        preset = make_preset(name)
        result["inference"] = check_inference(preset, device, phases)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        result["fallback"] = check_fallback(preset, device, phases)
    except Exception as e:  # noqa: BLE001 - one preset's failure is a result of the check
        result["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    result["phases"] = phases.out
    if device.type == "cuda":
        torch.cuda.empty_cache()
    result["ok"] = "error" not in result and _all_ok(result)
    return result


def _all_ok(result: dict) -> bool:
    inf, fb = result["inference"], result["fallback"]
    dtypes_ok = all(v["keep_in_fp32_ok"] for v in inf["text_dtypes"].values())
    return (dtypes_ok and all(inf["finite"].values()) and fb["loss_finite"]
            and fb["adapters_finite"])


def run_family_checks(names, device: str, make_preset, log=print) -> dict:
    """Every named preset in turn on `device`; one dict of results, each logged as it ends."""
    import json

    import torch

    dev = torch.device(device)
    results = {}
    for name in names:
        log(f"[family_checks] {name} …")
        results[name] = check_preset(name, dev, make_preset)
        log(f"[family_checks] {name} done: {json.dumps(results[name], default=str)}")
    return results


def table(results: dict) -> str:
    """A plain-text summary: one line per preset."""
    lines = [f"{'preset':14s} {'ok':3s} {'dtype':5s} {'attention':9s} {'T5/Gemma':18s} "
             f"{'finite (cond/cfg/agd/img)':26s} {'fallback':16s} peak GiB (load/enc/step/dec/train)"]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"{name:14s} NO  {r['error']}")
            continue
        inf, fb, ph = r["inference"], r["fallback"], r["phases"]
        big = {k: v for k, v in inf["text_dtypes"].items() if v["keep_in_fp32_layers"]
               or k == "text_encoder_3" or "bf16" in v["params_by_dtype"]}
        te = ",".join(f"{k[-1] if k[-1].isdigit() else '1'}:{'+'.join(v['params_by_dtype'])}"
                      for k, v in big.items()) or "-"
        fin = "/".join("y" if inf["finite"][k] else "N" for k in ("conditions", "cfg", "adapters", "decode"))
        fall = f"{fb['precision']}{'+scaler' if fb['grad_scaler'] else ''}"
        peaks = "/".join(str(ph.get(k, {}).get("peak_reserved_gib")) for k in
                         ("load", "encode", "cfg_step", "decode", "train_step"))
        lines.append(f"{name:14s} {'yes' if r['ok'] else 'NO':3s} {inf['dtype']:5s} "
                     f"{inf['attention']:9s} {te:18s} {fin:26s} {fall:16s} {peaks}")
    return "\n".join(lines)
