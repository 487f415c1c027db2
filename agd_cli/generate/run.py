"""`agd generate`: sample with trained guidance adapters, one forward pass per step.

    run_generate(["a red fox"], omega=6)          # agd: adapters get ω, 1 NFE per step
    run_generate(["a red fox"], omega=6, cfg=True)  # real CFG on the same base: 2 NFE per step

Every flag is checked before any weights load (like diffusers' `check_inputs`). One base model
is loaded and the adapters attach to it; `--cfg` runs the same base with the adapters disabled,
so a second copy of the UNet is never held. Each image gets its own seed (seed, seed+1, … per
prompt), so an image does not depend on the batch it was made in.

A rerun resumes: each PNG records the settings that determine it ("settings" metadata), and an
image already there with the same settings is skipped; a file from other settings is never
overwritten (a folder's new image gets a -2, -3… suffix; an existing --out FILE.png is refused).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from agd_cli import __version__
from agd_cli.config import checks, workspace
from agd_cli.config.presets import Preset
from agd_cli.core import sampling
from agd_cli.core.adapter_file import AdapterFile
from agd_cli.core.compiling import check_compile
from agd_cli.core.conditions import cond_select
from agd_cli.core.guidance_rules import GuidanceRule
from agd_cli.families import (
    resolve_device,
    warn_truncated,
)
from agd_cli.families.precision import preset_half_precision
from agd_cli.families.spec import FamilySpec
from agd_cli.generate.files import (
    folder_lock,
    image_path,
    image_stem,
    interrupted,
    negative_mode,
    still_free,
)
from agd_cli.generate.loading import load_generator
from agd_cli.infra import ui
from agd_cli.infra.errors import InputError
from agd_cli.infra.images import read_png_metadata, save_png

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 4
MAX_IMAGES = 100_000  # per command: each is listed (and checked on disk) before sampling


@dataclass
class Job:
    """One image to make: its prompt (or DiT class), its seed, and where it goes."""

    prompt: str
    seed: int
    path: Path | None = None
    done: bool = False  # its image is written (by this run, or by an earlier one: resumed)
    settings: str = ""  # what determines its image (image_settings), set with its path


@dataclass
class GenerateFlags:
    """`agd generate`'s flags as given; None takes the adapter's preset's value."""

    prompts: Sequence[str] = ()
    omega: float | None = None
    adapter: str | None = None
    run: str | None = None
    preset: str | None = None
    steps: int | None = None
    scheduler: str | None = None
    seed: int = 0
    num_images: int = 1
    batch_size: int | None = None
    size: str | None = None
    out: str | None = None
    cfg: bool = False
    negative_prompt: str | None = None
    offload: bool = False
    device: str | None = None
    dtype: str | None = None
    workdir: str = "agd-runs"
    guidance: str | None = None  # --mode cfg's rule [the adapter's, whose output it learned]
    guidance_params: dict | None = None
    compile: bool | None = None  # --compile / --no-compile; None: the preset's


# --- 1. checks that need nothing loaded ------------------------------------------------------
def check_inputs(f: GenerateFlags) -> None:
    """Validate the flags that need no model and no adapter file."""
    if not f.prompts:
        raise InputError("no prompt given", hint='e.g. agd generate "a red fox" -w 6 '
                                                  "(for DiT: class ids or names)")
    if f.omega is not None:
        checks.omega(f.omega)
    checks.optional_integer("--steps", f.steps)
    if f.scheduler is not None:
        checks.scheduler(f.scheduler)
    checks.integer("-n/--num-images", f.num_images)
    if len(f.prompts) * f.num_images > MAX_IMAGES:
        raise InputError(f"-n {f.num_images} makes {len(f.prompts) * f.num_images:,} images, more "
                         f"than one command makes ({MAX_IMAGES:,})",
                         hint="ask for fewer, e.g. -n 4; a rerun skips the images already made")
    checks.optional_integer("--batch-size", f.batch_size)
    if f.dtype is not None:
        checks.dtype(f.dtype)
    checks.seed(f.seed)


def plan_output(out: str | None, adapter_path: Path, n_images: int) -> tuple[Path, Path | None]:
    """(folder, single file or None): --out FOLDER, --out FILE.png (one image) or run/samples."""
    if out is None:
        folder = adapter_path.resolve().parent / "samples"
        checks.writable_folder(folder, "the samples folder")
        return folder, None
    path = Path(out)
    if path.suffix.lower() == ".png":
        if n_images != 1:
            raise InputError(f"--out '{out}' is one file, but {n_images} images will be made",
                             hint="give a folder for --out, or make one image (one prompt, -n 1)")
        if path.is_dir():
            raise InputError(f"--out '{out}' is a folder", hint="drop the .png suffix or pick a file name")
        checks.writable_folder(path.parent, "--out")
        return path.parent, path
    if path.exists() and not path.is_dir():
        raise InputError(f"--out '{out}' is an existing file, not a folder",
                         hint="give a folder, or a name ending in .png for one image")
    checks.writable_folder(path, "--out")
    return path, None


# --- 2. checks that need the adapter's preset --------------------------------------------------
def check_size(size: tuple[int, int] | None, preset: Preset) -> tuple[int, int]:
    """(height, width) in pixels, defaulting to the preset's resolution."""
    if size is None:
        return preset.resolution, preset.resolution
    h, w = size
    m = FamilySpec(preset).size_multiple
    if w % m or h % m:
        raise InputError(f"--size {w}x{h} does not fit {preset.name}: width and height must be "
                         f"multiples of {m}",
                         hint=f"e.g. --size {max(m, w - w % m)}x{max(m, h - h % m)}")
    return h, w


def check_omega_range(omega: float, file: AdapterFile) -> tuple[float, float]:
    """Warn (and go on) when ω lies outside the range the adapter was trained on."""
    lo, hi = file.omega_range
    if not lo <= omega <= hi:
        logger.warning(f"ω = {omega:g} is outside the range this adapter was trained on "
                f"[{lo:g}, {hi:g}]; the result may not match CFG")
    return lo, hi


# --- 4. sampling ------------------------------------------------------------------------------
def encode_conditions(den, prompts: Sequence[str], negative_prompt: str | None,
                      size: tuple[int, int]) -> tuple[dict, dict]:
    """Conditions of the distinct prompts (row i = prompts[i]) and the one unconditional row:
    the negative prompt, else the null condition (CFG's branch; adapters trained with
    negatives read it too)."""
    warn_truncated(den, prompts)
    warn_truncated(den, [negative_prompt] if negative_prompt else [], "negative prompts")
    cond = den.encode(list(prompts), size=size)
    uncond = den.encode_negative(negative_prompt, size=size)
    den.free_text_encoders()  # encoded once; frees memory for the sampling loop
    return cond, uncond


def _batch_conditions(cond: dict, uncond: dict, rows: list[int]):
    index = torch.tensor(rows, device=next(iter(cond.values())).device)
    return cond_select(cond, index), cond_select(uncond, torch.zeros_like(index))


def sample_jobs(den, jobs: list[Job], prompts: list[str], cond: dict, uncond: dict, *,
                omega: float, mode: str, steps: int, scheduler: str, batch_size: int,
                height: int, width: int, guidance: GuidanceRule | None = None):
    """Yield (job, image (C, H, W) in [0, 1], nfe per image, seconds) batch by batch."""
    shape = den.latent_shape(height, width)
    batches = [[jobs[i] for i in r] for r in sampling.batch_ranges(len(jobs), batch_size)]
    with ui.progress() as bar:
        task = bar.add_task(f"{mode} ω={omega:g}", total=len(batches) * steps)
        for batch in batches:
            c, u = _batch_conditions(cond, uncond, [prompts.index(j.prompt) for j in batch])
            noise = sampling.initial_noise(shape, [j.seed for j in batch])
            got = sampling.sample_images(den, c, u, omega, noise, mode=mode, steps=steps,
                                         scheduler=scheduler, callback=lambda _: bar.advance(task),
                                         guidance=guidance)
            for job, image in zip(batch, got.images, strict=True):
                yield job, image, got.nfe, got.seconds / len(batch)


# --- the stage ----------------------------------------------------------------------------------
@dataclass
class Plan:
    """Everything decided before any weights load."""

    adapter: Path
    file: AdapterFile
    base: Preset
    jobs: list[Job]
    prompts: list[str]
    omega: float
    omega_range: tuple[float, float]
    mode: str
    steps: int
    scheduler: str
    batch_size: int
    height: int
    width: int
    folder: Path
    single: Path | None
    negative_prompt: str | None = None
    dtype: str = "fp16"
    note: str | None = None  # said once the prompts are known to be valid (DiT: after loading)
    guidance: GuidanceRule = GuidanceRule()  # mode cfg's two-pass rule
    compile: bool = False  # torch.compile the model (agd_cli.core.compiling)


def plan_generation(f: GenerateFlags) -> Plan:
    """Check every input and decide what to make, reading only the adapter file's metadata."""
    check_inputs(f)
    hw = checks.size(f.size)
    path = workspace.find_adapter(f.workdir, f.adapter, f.run, f.preset)
    file = AdapterFile.open(path)  # the metadata only: tensors load with the model
    base = file.base_for(f.preset)
    height, width = check_size(hw, base)
    if f.steps is not None:
        checks.sampling_steps(f.steps, checks.preset_scheduler_config(base))
    distinct = list(dict.fromkeys(str(p) for p in f.prompts))
    jobs = [Job(p, f.seed + k) for p in f.prompts for k in range(f.num_images)]
    folder, single = plan_output(f.out, path, len(jobs))
    omega = float(base.sampling["default_omega"] if f.omega is None else f.omega)
    mode, note = "cfg" if f.cfg else "agd", None
    negative = f.negative_prompt if (f.negative_prompt or "").strip() else None  # "": none
    if negative is not None and not f.cfg:
        mode, note = negative_mode(file)
    plan = Plan(path, file, base, jobs, distinct, omega, check_omega_range(omega, file),
                mode, f.steps or int(base.sampling["steps"]),
                f.scheduler or base.sampling["scheduler"], f.batch_size or DEFAULT_BATCH_SIZE,
                height, width, folder, single, negative, f.dtype or preset_half_precision(base), note,
                compile=plan_compile(f, base))
    plan.guidance = GuidanceRule.at_inference(f.guidance, f.guidance_params, file.guidance,
                                              base.collect)
    if f.guidance is not None and mode == "agd" and plan.guidance != file.guidance:
        logger.warning(f"--guidance {f.guidance}: agd samples the rule its adapter learned, "
                       f"{file.guidance.label()}; add --mode cfg to run {f.guidance} itself")
    place_jobs(plan)
    return plan


def plan_compile(f: GenerateFlags, base: Preset) -> bool:
    """--compile / --no-compile, else the preset's `sampling.compile`; checked before loading."""
    wanted = base.sampling.get("compile", False) if f.compile is None else f.compile
    if wanted and f.offload:
        raise InputError("--compile and --offload do not go together: offloading moves the "
                         "weights during every call, a compiled graph needs them in place",
                         hint="drop one of them (--no-compile where the preset compiles)")
    if wanted:
        check_compile(resolve_device(f.device))
    return bool(wanted)


def image_settings(plan: Plan, job: Job) -> str:
    """What determines an image, as recorded in its PNG: equal settings, the same image (batch
    size, device and offload change rounding only)."""
    adapter = plan.file.raw.get("tensors_sha256") or str(plan.adapter.resolve())
    return json.dumps({"prompt": job.prompt, "seed": job.seed, "omega": plan.omega,
                       "mode": plan.mode, "steps": plan.steps, "scheduler": plan.scheduler,
                       "size": [plan.width, plan.height], "negative_prompt": plan.negative_prompt,
                       "preset": plan.base.name, "base_model": plan.base.base_model,
                       "dtype": plan.dtype, "adapter": adapter,
                       **({"guidance": plan.guidance.record()} if plan.mode == "cfg" else {})},
                      sort_keys=True)


def place_jobs(plan: Plan) -> None:
    """Give each job its file; mark done those whose image an earlier run already wrote."""
    taken: set[Path] = set()
    for job in plan.jobs:
        job.settings = image_settings(plan, job)
        job.path, job.done = image_path(plan.folder, plan.single,
                                        image_stem(job, plan.omega, plan.mode), taken, job.settings)


def _png_metadata(plan: Plan, job: Job, nfe: int, den) -> dict:
    meta = {"prompt": job.prompt, "omega": plan.omega, "seed": job.seed, "steps": plan.steps,
            "scheduler": plan.scheduler, "mode": plan.mode, "nfe": nfe,
            "adapter": str(plan.adapter), "base_model": den.source, "preset": plan.base.name,
            "size": f"{plan.width}x{plan.height}", "software": f"agd {__version__}",
            "settings": job.settings}
    if plan.negative_prompt is not None:
        meta["negative_prompt"] = plan.negative_prompt
    return meta


@dataclass
class Made:
    """What the sampling run measured (absent when every image was there already)."""

    den: object
    nfe: int
    seconds: float
    load_seconds: float


def make_images(plan: Plan, todo: list[Job], device: str | None, offload: bool) -> Made:
    """Load the base with the adapters, then sample and write each job's image (atomically)."""
    t0 = time.perf_counter()
    den = load_generator(plan.file, plan.base, device, plan.dtype, offload,
                         plan.height, plan.width)
    prompts = list(dict.fromkeys(j.prompt for j in todo))
    cond, uncond = encode_conditions(den, prompts, plan.negative_prompt, (plan.height, plan.width))
    if plan.note:
        logger.info(plan.note)
    if plan.compile:
        den.compile()
    made = Made(den, 0, 0.0, time.perf_counter() - t0)
    for job, image, nfe, secs in sample_jobs(
            den, todo, prompts, cond, uncond, omega=plan.omega, mode=plan.mode,
            steps=plan.steps, scheduler=plan.scheduler, batch_size=plan.batch_size,
            height=plan.height, width=plan.width, guidance=plan.guidance):
        with folder_lock(job.path.parent):  # one writer at a time per folder, a few ms each
            job.path = still_free(job.path, job.settings,
                                  image_stem(job, plan.omega, plan.mode), plan.single is not None)
            save_png(image, job.path, _png_metadata(plan, job, nfe, den))
        job.done, made.nfe, made.seconds = True, nfe, made.seconds + secs
    return made


def run_generate(prompts: Sequence[str] | GenerateFlags, **flags) -> dict:
    """Generate images with an agd adapter (1 NFE per step), or with real CFG for comparison.

    `run_generate(["a red fox"], omega=6)` takes GenerateFlags' fields as keywords. Returns the
    summary printed by `--json`: images, nfe (per image), seconds, omega, skipped, …
    """
    f = prompts if isinstance(prompts, GenerateFlags) else GenerateFlags(list(prompts), **flags)
    plan = plan_generation(f)
    todo = [j for j in plan.jobs if not j.done]
    if len(todo) < len(plan.jobs):
        logger.info(f"resuming: {len(plan.jobs) - len(todo)} of {len(plan.jobs)} image(s) are in "
                f"{plan.single or plan.folder} already (same settings); skipping them")
    try:
        made = make_images(plan, todo, f.device, f.offload) if todo else None
    except KeyboardInterrupt:
        raise interrupted(plan) from None
    return summary(plan, made, len(plan.jobs) - len(todo))


def summary(plan: Plan, made: Made | None, skipped: int) -> dict:
    """The --json object; without `made` (nothing left to make) the model facts are recorded
    ones (base model, NFE) or null (device, dtype, VAE decode: no model was loaded)."""
    den = made.den if made else None
    recorded = {} if made else read_png_metadata(plan.jobs[0].path)
    n_made = len(plan.jobs) - skipped
    seconds = made.seconds if made else 0.0
    return {"images": [str(j.path) for j in plan.jobs], "skipped": skipped,
            "nfe": made.nfe if made else int(recorded.get("nfe", 0)),
            "seconds": round(seconds, 4), "seconds_per_image": round(seconds / max(n_made, 1), 4),
            "load_seconds": round(made.load_seconds if made else 0.0, 3),
            "omega": plan.omega, "omega_range": list(plan.omega_range), "mode": plan.mode,
            "steps": plan.steps, "scheduler": plan.scheduler, "seeds": [j.seed for j in plan.jobs],
            "prompts": [j.prompt for j in plan.jobs], "adapter": str(plan.adapter),
            "base_model": den.source if den else recorded.get("base_model"),
            "device": str(den.device) if den else None,
            "dtype": str(den.dtype).replace("torch.", "") if den else None,
            "size": [plan.width, plan.height], "batch_size": plan.batch_size,
            "vae_decode": den.vae_decode(plan.height, plan.width) if den else None,
            "negative_prompt": plan.negative_prompt,
            "guidance": (plan.guidance if plan.mode == "cfg" else plan.file.guidance).record(),
            "compile": plan.compile,
            "compile_seconds": round(den.compiled.warmup_seconds, 3)
            if den is not None and den.compiled is not None else 0.0}
