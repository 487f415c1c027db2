"""`agd collect`: record the teacher's own CFG-guided sampling trajectories (AGD §3.2).

Lean where the official code is not: fp16 on disk, K kept steps instead of ~1000, prompt
embeddings stored once per prompt, text encoders freed after one encoding pass, no VAE, cond
and uncond in one batched call, several trajectories per batch, and resumable shards.

Reproducibility: trajectory id = prompt_index * num_per_prompt + j over the full prompt list;
its ω and initial noise come from generators seeded by (seed, id), so the data are the same
whatever the batch size, sharding or resume point.
"""

from __future__ import annotations

import logging
import time

import torch
from rich.progress import TextColumn

from agd_cli import __version__
from agd_cli.collect.plan import (
    ENCODE_CHUNK,
    CollectFlags,
    CollectSettings,
    plan_collection,
    resolve_settings,
)
from agd_cli.collect.store import (
    TrajectoryStore,
    keep_indices,
    trajectory_negative_only,
    trajectory_negatives,
    trajectory_omegas,
    trajectory_seed,
)
from agd_cli.config import checks
from agd_cli.config.presets import Preset
from agd_cli.config.workspace import TRAJECTORIES
from agd_cli.core.conditions import cond_cat, cond_select
from agd_cli.core.sampling import initial_noise, sample
from agd_cli.dry_run import collect_dry_run
from agd_cli.families import load_denoiser, warn_truncated
from agd_cli.families.attention import use_fast_attention
from agd_cli.infra import ui
from agd_cli.infra.errors import Interrupted
from agd_cli.infra.finite import StepWatch, check_conditions, nonfinite_trajectory
from agd_cli.infra.locks import run_lock, worker_lock_name

logger = logging.getLogger(__name__)

FP32_COND_KEYS = ("time_ids",)  # SDXL size/crop ids: exact integers, tiny, keep fp32


# --- 3. teacher and conditions -----------------------------------------------------------------
def _fast_attention(den) -> str:
    """xformers where it computes the same model (families/attention.py), else PyTorch SDPA."""
    return use_fast_attention(den)


def _for_storage(cond: dict) -> dict:
    """Conditions as stored (fp16 floats, on CPU); the teacher then sees exactly the stored values."""
    return {k: v.to("cpu", torch.float32 if k in FP32_COND_KEYS else torch.float16)
            if v.is_floating_point() else v.cpu() for k, v in cond.items()}


def encode_conditions(den, prompts: list, indices: list[int],
                      negatives: list = ()) -> tuple[dict, dict[int, int], dict]:
    """Encode each needed prompt once (chunked), the null condition and each negative once, then
    free the encoders.

    Returns (cond table (P, ...), prompt index -> table row, uncond table (1 + V, ...): row 0 the
    null condition, row 1 + j negative j).
    """
    texts = [prompts[i] for i in indices]
    warn_truncated(den, texts)
    warn_truncated(den, list(negatives), "negative prompts")
    chunks = [_for_storage(den.encode(texts[i:i + ENCODE_CHUNK]))
              for i in range(0, len(texts), ENCODE_CHUNK)]
    uncond = [_for_storage(den.encode_null(1))]
    uncond += [_for_storage(den.encode(list(negatives[i:i + ENCODE_CHUNK])))
               for i in range(0, len(negatives), ENCODE_CHUNK)]
    den.free_text_encoders()  # never needed again in this process
    table = cond_cat(chunks) if chunks else {}
    # data enter here: a text encoder that overflows (T5 in fp16) is named, not collected with
    check_conditions(table, [(i, prompts[i]) for i in indices])
    check_conditions(cond_cat(uncond), [(None, "the empty prompt"), *enumerate(negatives)],
                     "negative prompt")
    return table, {p: r for r, p in enumerate(indices)}, cond_cat(uncond)


# --- 4. trajectories ---------------------------------------------------------------------------
def collect_batch(den, s: CollectSettings, ids: list[int], table: dict, row_of: dict[int, int],
                  uncond: dict, keep: list[int], on_step=None) -> dict:
    """Run CFG sampling for a batch of trajectories; the shard tensors of the kept steps."""
    b = len(ids)
    # CFG's unconditional branch: the trajectory's negative, else the null condition (row 0)
    negative_index = trajectory_negatives(s.seed, ids, len(s.negatives), s.empty_negative_probability)
    alone = trajectory_negative_only(s.seed, ids, negative_index, s.negative_only_probability)
    prompt_index = torch.tensor([i // s.num_per_prompt for i in ids]).masked_fill(alone, -1)
    shard_cond, cond_row = _shard_conditions(table, row_of, uncond, prompt_index)
    cond = cond_select(shard_cond, cond_row)                                      # (B, ...)
    used = sorted({0, *(negative_index + 1).tolist()})
    uncond_row = torch.tensor([used.index(r) for r in (negative_index + 1).tolist()])
    shard_uncond = cond_select(uncond, torch.tensor(used))                         # (V, ...)
    uncond_b = cond_select(shard_uncond, uncond_row)                              # (B, ...)
    omega = trajectory_omegas(s.seed, ids, s.omega_min, s.omega_max, s.omega_skew)  # (B,)
    noise = initial_noise(den.latent_shape(), [trajectory_seed(s.seed, i, "noise") for i in ids])

    slot = {step: k for k, step in enumerate(keep)}
    shape = (b, len(keep), *noise.shape[1:])                                      # (B, K, C, H, W)
    xs = torch.empty(shape, dtype=torch.float16, device=den.device)
    targets = torch.empty_like(xs)
    timesteps = torch.empty(len(keep), dtype=torch.float64)
    watch = StepWatch(b, den.device)  # a NaN or inf at any step, kept or not

    def record(info: dict) -> None:
        watch.update(info["i"], info["model_input"], info["output"])
        k = slot.get(info["i"])
        if k is not None:
            xs[:, k] = info["model_input"]
            targets[:, k] = info["output"]
            timesteps[k] = float(info["t"])
        if on_step is not None:
            on_step(b)

    res = sample(den, cond, uncond_b, omega.to(den.device), noise, mode="cfg", steps=s.steps,
                 scheduler=s.scheduler, callback=record, guidance=s.guidance)
    x_final = res.x.to(torch.float16)
    refuse_nonfinite(watch, s, ids, prompt_index, omega,
                     [(xs, keep), (targets, keep), (x_final[:, None], [s.steps - 1])])
    # Integer schedules (DDIM, DDPM, trailing Euler/DPM) store int64 as the layout says
    ts = timesteps.long() if bool((timesteps == timesteps.round()).all()) else timesteps.float()
    return {"x": xs.cpu(), "target": targets.cpu(), "x_final": x_final.cpu(),
            "timesteps": ts.expand(b, -1).clone(), "omega": omega.float(),
            "prompt_index": prompt_index, "trajectory_id": torch.tensor(ids), "cond_row": cond_row,
            "uncond_row": uncond_row, "negative_index": negative_index,
            **{f"cond.{k}": v for k, v in shard_cond.items()},
            **{f"uncond.{k}": v for k, v in shard_uncond.items()}}


def refuse_nonfinite(watch: StepWatch, s: CollectSettings, ids: list[int], prompt_index,
                     omega, stored: list) -> None:
    """Raise NonFiniteError, naming the trajectory, when any of the batch went non-finite: at a
    sampling step (watched) or in its tensors as stored (fp16)."""
    found = watch.first_bad(stored)
    if found is None:
        return
    row, step = found
    p = int(prompt_index[row])
    raise nonfinite_trajectory(ids[row], p, s.prompts[p] if p >= 0 else "", s.seed, step,
                               s.steps, float(omega[row]), ids)


def _shard_conditions(table: dict, row_of: dict[int, int], uncond: dict, prompt_index):
    """(each distinct prompt's condition (U, ...), each trajectory's row in it): prompt index -1,
    the empty prompt of a negative-only trajectory, is the null condition, stored last."""
    distinct = sorted(p for p in set(prompt_index.tolist()) if p >= 0)
    parts = [cond_select(table, torch.tensor([row_of[p] for p in distinct]))] if distinct else []
    if (prompt_index < 0).any():
        parts.append(cond_select(uncond, torch.tensor([0])))
        distinct.append(-1)
    cond_row = torch.tensor([distinct.index(p) for p in prompt_index.tolist()])
    return cond_cat(parts), cond_row


def shard_tag(s: CollectSettings, first_id: int) -> str:
    """Unique per batch; the worker prefix keeps workers' partial-file cleanup apart."""
    return f"w{s.shard_index}-{first_id:08d}"


def _open_store(s: CollectSettings, store, config: dict) -> None:
    """Create or check the manifest (atomically) and remove this worker's partial leftovers."""
    if s.accelerate_state is not None and s.overwrite:
        # only the main process deletes the old collection; the others wait for it
        if s.accelerate_state.is_main_process:
            store.init(config, overwrite=True)
        s.accelerate_state.wait_for_everyone()
    store.init(config, overwrite=s.overwrite and s.accelerate_state is None)
    # A lone worker may clean everything; parallel workers only their own files, since another
    # worker's shard may sit between its rename and its sidecar right now.
    store.clean_partial("" if s.num_shards == 1 else f"w{s.shard_index}-")


def manifest_config(s: CollectSettings, den, keep: list[int], source: str) -> dict:
    """The manifest's config: identity keys plus what train/bench need to use the data."""
    return {**s.identity(), "agd_version": __version__, "family": s.preset.family,
            "base_model_source": source, "dtype": s.dtype, "storage_dtype": "float16",
            "prompts": s.prompts, "prompt_source": s.prompt_source,
            "total_trajectories": len(s.prompts) * s.num_per_prompt,
            "kept_step_indices": keep, "resolution": s.preset.resolution,
            "negative_prompts": s.negatives, "negative_source": s.negative_source,
            "latent_shape": list(den.latent_shape()),
            "prediction_type": den.scheduler_config.get("prediction_type", "epsilon"),
            "learned_sigma": den.model.config.get("out_channels", den.in_channels) > den.in_channels,
            "preset_toml": s.preset.raw}


def _collect_all(den, s: CollectSettings, store, remaining: list[int], table, row_of, uncond,
                 keep: list[int], meta: dict) -> tuple[int, float]:
    """All remaining batches, one atomic shard each, under a progress bar; (trajectories, seconds)."""
    start, steps_done = time.perf_counter(), 0
    batches = [remaining[i:i + s.batch_size] for i in range(0, len(remaining), s.batch_size)]
    with ui.progress(TextColumn("{task.fields[rate]}")) as bar:
        task = bar.add_task("collecting trajectories", total=len(remaining), rate="")

        def on_step(n: int) -> None:
            nonlocal steps_done
            steps_done += n
            rate = steps_done / max(time.perf_counter() - start, 1e-9)
            bar.update(task, rate=f"{rate:.1f} steps/s")

        for ids in batches:
            tensors = collect_batch(den, s, ids, table, row_of, uncond, keep, on_step)
            store.write_shard(shard_tag(s, ids[0]), tensors, ids, meta)
            bar.advance(task, len(ids))
    return len(remaining), time.perf_counter() - start


def _finalize(store) -> dict:
    """Rewrite the manifest's shard list; parallel workers may finish at once, so re-check."""
    for _ in range(5):
        m = store.finalize()
        if len(store.shards()) == len(m["shards"]):
            break
    return m


def run_collect(preset: str | Preset | CollectFlags, **flags) -> dict:
    """Collect (or resume) CFG-guided trajectories; returns the summary `--json` prints.

    `run_collect("tiny-sd", steps=10)` takes CollectFlags' fields as keywords."""
    request = preset if isinstance(preset, CollectFlags) else CollectFlags(preset, **flags)
    t0 = time.perf_counter()
    # 1. Check inputs: flags, prompts and the existing run folder, before anything loads
    settings = resolve_settings(request)
    if request.dry_run:
        return collect_dry_run(settings)
    return collect(settings, t0)


def collect(s: CollectSettings, t0: float | None = None) -> dict:
    """The stage, from its plan: plan the disk, record what is left, summarise."""
    t0 = time.perf_counter() if t0 is None else t0
    store = TrajectoryStore(s.run / TRAJECTORIES)
    damaged = []
    if store.exists() and not s.overwrite:
        store.check_same({**s.identity(), "prompts": s.prompts, "prompt_source": s.prompt_source,
                          "family": s.preset.family, "resolution": s.preset.resolution,
                          "preset_toml": s.preset.raw})
        damaged = _damaged_shards(store)
    # 2. Plan: what is left, and whether the disk can hold it
    # a damaged shard's trajectories are redone, unless a sound shard holds them (a copied sidecar)
    redo = {i for _, ids in damaged for i in ids} - store.completed([p for p, _ in damaged])
    remaining = plan_collection(s, store, redo)
    new, seconds, attention = 0, 0.0, None
    if remaining or damaged:
        with run_lock(s.run, "collect", worker_lock_name(s.shard_index, s.num_shards)):
            if damaged:
                aside = store.set_aside([sidecar for sidecar, _ in damaged])
                logger.warning(f"moved {len(damaged)} damaged shard(s) to {aside}"
                        + ("; redoing their trajectories" if redo else ""))
            if remaining:
                new, seconds, attention = _record(s, store, remaining)
    # 6. Summary
    m = _finalize(store) if store.exists() else {"trajectories": 0, "bytes_on_disk": 0, "shards": []}
    return _summary(s, store, m, new, seconds, attention, time.perf_counter() - t0)


def _damaged_shards(store) -> list:
    """Check every stored shard against its checksum; name the bad ones (resume trusts the rest)."""
    bad = store.damaged()
    for sidecar, reason, _ in bad:
        logger.warning(f"shard {sidecar.with_suffix('.safetensors')} is damaged ({reason}); "
                "it will be redone")
    return [(sidecar, ids) for sidecar, _, ids in bad]


def _record(s: CollectSettings, store, remaining: list[int]) -> tuple[int, float, str]:
    """Load the teacher, open the store and record the remaining trajectories (run locked)."""
    # 3. Teacher (no VAE) and conditions, encoded once; the text encoders are then freed
    den = load_denoiser(s.preset, device=s.device, dtype=s.dtype, text=True)
    checks.sampling_steps(s.steps, den.scheduler_config)  # hub bases: first known now
    attention = _fast_attention(den)
    needed = sorted({i // s.num_per_prompt for i in remaining})
    table, row_of, uncond = encode_conditions(den, s.prompts, needed, s.negatives)
    keep = keep_indices(s.steps, s.keep_steps)
    config = manifest_config(s, den, keep, den.source)
    # 4. Store: manifest + cleanup of this worker's partial writes; a failed start leaves none
    _open_store(s, store, config)
    remaining = [i for i in remaining if i not in store.completed()]
    meta = {k: config[k] for k in ("preset", "family", "base_model", "agd_version", "seed",
                                   "steps", "keep_steps", "scheduler", "prediction_type")}
    # 5. Trajectories, one atomic shard per batch
    try:
        with torch.inference_mode():
            new, seconds = _collect_all(den, s, store, remaining, table, row_of, uncond, keep, meta)
    except KeyboardInterrupt:
        done = len(store.completed())
        raise Interrupted(f"interrupted: {done} of {len(s.prompts) * s.num_per_prompt} "
                          f"trajectories are stored in {store.root}",
                          hint="rerun the same command to resume: it continues with the "
                               f"{len(s.prompts) * s.num_per_prompt - done} not yet stored") from None
    except BaseException:
        store.discard_if_empty()
        raise
    return new, seconds, attention


def _summary(s: CollectSettings, store, m: dict, new: int, seconds: float, attention,
             wall: float) -> dict:
    total = len(s.prompts) * s.num_per_prompt
    n = m["trajectories"]
    return {"out": str(s.run), "trajectories_dir": str(store.root),
            "manifest": str(store.manifest_path), "preset": s.preset.name,
            "trajectories": n, "expected_trajectories": total, "complete": n == total,
            "new_trajectories": new, "steps_per_trajectory": s.keep_steps,
            "sampling_steps": s.steps, "bytes_on_disk": m["bytes_on_disk"],
            "bytes_per_trajectory": round(m["bytes_on_disk"] / n) if n else 0,
            "shards": len(m["shards"]), "shard_index": s.shard_index, "num_shards": s.num_shards,
            "seed": s.seed, "dtype": s.dtype, "attention": attention,
            "negative_prompts": len(s.negatives),
            "empty_negative_probability": s.empty_negative_probability,
            "negative_only_probability": s.negative_only_probability,
            "omega_skew": s.omega_skew, "guidance": s.guidance.record(),
            "collect_seconds": round(seconds, 3), "wall_seconds": round(wall, 3),
            "trajectories_per_s": round(new / seconds, 4) if seconds else None,
            "steps_per_s": round(new * s.steps / seconds, 2) if seconds else None}
