"""The paper's key ablation (AGD, arXiv 2503.07274 §4) at our scale, on the shipped mnist teacher.

Same teacher, same collection budget, same training settings; only one thing changes per row:

    guided      adapters trained on CFG-guided trajectories (what `agd collect` records)
    diffusion   forward-diffusion samples instead: each stored (t, ω, prompt) keeps its place,
                but x_t is a real MNIST digit of the prompt's class noised to t, and the target
                is the teacher's CFG output at that point (the paper's "diffusion trajectories")
    xavier      Xavier-initialised adapter outputs instead of the preset's zero init
    wide        adapters twice as wide (hidden and context width)

Every row is scored like `agd bench --quality`: classifier accuracy and digit FID of agd samples
against CFG's from the same seeds. Paper (DiT-XL/2): FID 5.03 guided vs 5.54 diffusion
trajectories (CFG 5.11).

    python benchmarks/ablation.py --samples 300 --omegas 2,4,6 --json ablation.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("AGD_NO_PROGRESS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

# name -> (data, preset overrides by section); the first row is the preset as shipped
VARIANTS = {
    "guided": ("guided", {}),
    "diffusion": ("diffusion", {}),
    "xavier": ("guided", {"adapter": {"init": "xavier"}}),
    "wide": ("guided", {"adapter": {"hidden_dim": 128, "context_dim": 128}}),
}


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v))  # a JSON string is a valid TOML basic string


def write_preset(raw: dict, overrides: dict, path: Path) -> Path:
    """The preset's TOML with `overrides` ({section: {key: value}}) applied, written to `path`."""
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for section, values in overrides.items():
        data.setdefault(section, {}).update(values)
    top = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    tables = [f"\n[{k}]\n" + "\n".join(f"{kk} = {_toml_value(vv)}" for kk, vv in v.items())
              for k, v in data.items() if isinstance(v, dict)]
    path.write_text("\n".join(top) + "\n" + "\n".join(tables) + "\n", encoding="utf-8")
    return path


def diffusion_collection(guided: Path, out: Path, den, seed: int = 0) -> Path:
    """A copy of the guided collection where every stored x_t is a noised real digit of the
    trajectory's prompt class (same t, ω, prompt) and the target is the teacher's CFG there."""
    import torch
    from safetensors import safe_open

    from agd_cli.collect.store import TrajectoryStore
    from agd_cli.core.conditions import cond_select
    from agd_cli.core.sampling import make_scheduler
    from agd_cli.evaluation import mnist

    src, dst = TrajectoryStore(guided), TrajectoryStore(out)
    if dst.exists() and len(dst.shards()) == len(src.shards()):
        return out  # made before (the data depend only on the guided collection and seed)
    config = {**src.manifest()["config"], "trajectory_source": "forward diffusion of real digits"}
    dst.root.mkdir(parents=True, exist_ok=True)
    dst.init(config, overwrite=True)
    x_real, y_real, _, _ = mnist.load_digits_split()
    by_digit = [x_real[y_real == d] for d in range(10)]
    prompts = config["prompts"]
    sched = make_scheduler("ddpm", den.scheduler_config)  # add_noise: the forward process
    gen = torch.Generator().manual_seed(seed)
    for info in src.shards():
        with safe_open(str(src.root / info["file"]), "pt") as f:
            t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iterator
        b, k = t["x"].shape[:2]
        digits = [mnist.digit_of(prompts[int(i)]) for i in t["prompt_index"]]
        pick = [by_digit[d][torch.randint(len(by_digit[d]), (k,), generator=gen)] for d in digits]
        x0 = torch.stack(pick)                                          # (B, K, C, H, W)
        noise = torch.randn(x0.shape, generator=gen)
        steps = t["timesteps"]                                          # (B, K)
        x_t = sched.add_noise(x0.flatten(0, 1), noise.flatten(0, 1), steps.flatten().long())
        cond = cond_select({n[5:]: v for n, v in t.items() if n.startswith("cond.")}, t["cond_row"])
        uncond = cond_select({n[7:]: v for n, v in t.items() if n.startswith("uncond.")},
                             t["uncond_row"])
        target = torch.empty_like(x_t)
        assert bool((steps == steps[:1]).all()), "one schedule per shard, as collect stores"
        with torch.no_grad():
            for j in range(k):  # one kept step of every trajectory per call
                rows = torch.arange(b) * k + j
                target[rows] = den.predict_cfg(x_t[rows], steps[0, j], cond, uncond,
                                               t["omega"]).float().cpu()
        t["x"] = x_t.view(b, k, *x_t.shape[1:]).half()
        t["target"] = target.view(b, k, *x_t.shape[1:]).half()
        dst.write_shard(info["file"][len("shard-"):-len(".safetensors")], t,
                        info["trajectory_ids"])
    dst.finalize()
    return out


def train_variant(name: str, collection: Path, preset_path: Path, runs: Path) -> dict:
    """`agd train` on one collection with one preset file; the summary it prints."""
    from agd_cli.train.run import run_train

    run = runs / name
    if (run / "adapter.safetensors").is_file() and (run / "summary.json").is_file():
        return json.loads((run / "summary.json").read_text())  # trained before: reused
    run.mkdir(parents=True, exist_ok=True)
    summary = run_train(run=str(run), data=(str(collection),), preset=str(preset_path),
                        resume=False, device="cpu")
    (run / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    return summary


def score(adapter: Path, methods: list[str], omegas: list[float], samples: int, seed: int,
          cache: dict | None = None) -> dict:
    """{method: {ω: {accuracy, fid}}} as `agd bench --quality` computes them (same sampling
    function, same evaluator); CFG rows come from `cache` when there (they ignore the adapter)."""
    from agd_cli.bench.quality import sample_for_quality
    from agd_cli.evaluation import mnist
    from agd_cli.families import load_with_adapters

    den = load_with_adapters(adapter, device="cpu")
    sp = den.preset.sampling
    plan = SimpleNamespace(quality_batch=100, steps=sp["steps"], scheduler=sp["scheduler"],
                           quality_seed=seed)
    evaluator = mnist.load_evaluator("cpu")
    prompts = [mnist.PROMPTS[i % len(mnist.PROMPTS)] for i in range(samples)]
    digits = [mnist.digit_of(p) for p in prompts]
    out: dict = {}
    for method in methods:
        for w in omegas:
            key = (method, w, samples, seed)
            if cache is not None and method == "cfg" and key in cache:
                out.setdefault(method, {})[f"{w:g}"] = cache[key]
                continue
            images, _, _ = sample_for_quality(den, method, w, prompts, plan)
            row = {"accuracy": evaluator.accuracy(images, digits), "fid": evaluator.fid(images)}
            out.setdefault(method, {})[f"{w:g}"] = row
            if cache is not None and method == "cfg":
                cache[key] = row
    return out


def print_table(rows: dict, omegas: list[float]) -> None:
    """One line per variant: accuracy / FID at each ω, then training seconds and gap closed."""
    head = f"{'variant':<12}" + "".join(f"{'ω ' + format(w, 'g'):>16}" for w in omegas)
    print(head + f"{'gap closed':>12}{'train s':>9}")
    for name, r in rows.items():
        cells = "".join(f"{r['quality'][format(w, 'g')]['accuracy']:>8.3f} /{r['quality'][format(w, 'g')]['fid']:>6.2f}"
                        for w in omegas)
        gap, secs = r.get("gap_closed"), r.get("train_seconds")
        print(f"{name:<12}{cells}{'' if gap is None else format(gap, '.3f'):>12}"
              f"{'' if secs is None else format(secs, '.0f'):>9}")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="agd-runs/ablation", help="collections and runs go here")
    ap.add_argument("--collection", default=None,
                    help="an existing `agd collect --preset mnist` run folder to reuse")
    ap.add_argument("--omegas", default="2,4,6")
    ap.add_argument("--samples", type=int, default=500, help="samples per row")
    ap.add_argument("--seed", type=int, default=0, help="sample i uses seed SEED + i")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"of {', '.join(VARIANTS)}")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--json", dest="json_path", default=None, help="also write the table here")
    args = ap.parse_args(argv)

    import torch

    from agd_cli.collect.run import run_collect
    from agd_cli.config.presets import load_preset
    from agd_cli.families import load_denoiser

    torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)  # also when --collection brings the data
    omegas = [float(w) for w in args.omegas.split(",")]
    preset = load_preset("mnist")
    # 1. The data: the preset's guided collection, then its forward-diffusion twin
    guided = Path(args.collection) if args.collection else work / "guided"
    if not args.collection:
        run_collect("mnist", out=str(guided))
    data = {"guided": guided / "trajectories"}
    names = args.variants.split(",")
    if any(VARIANTS[n][0] == "diffusion" for n in names):
        teacher = load_denoiser(preset, device="cpu", text=False)
        data["diffusion"] = diffusion_collection(data["guided"], work / "diffusion" / "trajectories",
                                                 teacher)
    # 2. One training run and one quality score per variant; CFG's rows once
    cache: dict = {}
    cfg = None
    rows: dict = {}
    for name in names:
        source, overrides = VARIANTS[name]
        path = write_preset(preset.raw, overrides, work / f"preset-{name}.toml")
        summary = train_variant(name, data[source], path, work / "runs")
        q = score(Path(summary["adapter"]), ["agd"] if cfg else ["cfg", "agd"], omegas,
                  args.samples, args.seed, cache)
        cfg = cfg or q["cfg"]
        rows[name] = {"quality": q["agd"], "gap_closed": summary["gap_closed"],
                      "train_seconds": summary["seconds"], "data": source, "overrides": overrides}
        print(json.dumps({name: rows[name], "cfg": cfg}), flush=True)  # each row as it is done
    table = {"CFG (2 NFE)": {"quality": cfg}, **rows}
    print(f"\nablation: mnist teacher, {args.samples} samples per cell (seeds {args.seed}–"
          f"{args.seed + args.samples - 1}); accuracy / digit FID")
    print_table(table, omegas)
    report = {"samples": args.samples, "seeds": [args.seed, args.seed + args.samples - 1],
              "omegas": omegas, "rows": table}
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(report, indent=2), encoding="utf-8")
    return report


if __name__ == "__main__":
    main()
