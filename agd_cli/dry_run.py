"""`agd collect --dry-run` and `agd train --dry-run`: the plan and "will it fit?", with no
weights loaded and nothing written (offline). The figures are phase_memory's meta-device
estimates, for the preset, dtype and batch the real command would use, against the card
(the GPU's free memory, else the preset's `[memory] profile`).
"""

from __future__ import annotations

import logging

from agd_cli.collect.plan import ENCODE_CHUNK, plan_collection
from agd_cli.collect.store import TrajectoryStore
from agd_cli.config.presets import load_preset
from agd_cli.config.workspace import TRAJECTORIES
from agd_cli.families import FAMILY_CLASSES, resolve_device
from agd_cli.infra import ui
from agd_cli.infra.errors import DataError, InputError
from agd_cli.train.phase_memory import (
    Card,
    Phase,
    card,
    choose_checkpointing,
    collect_phases,
    quiet_casts,
    training_step,
)
from agd_cli.train.settings import TrainSettings
from agd_cli.train.setup import locate, recorded_preset

logger = logging.getLogger(__name__)

METHOD = ("meta-device estimate at real size, no weights: live tensor storages, attention as "
          "CUDA's memory-efficient kernel; a phase fits when it leaves the headroom free")


def _device(device: str | None):
    return resolve_device(device)


def _estimated(make) -> tuple[list[Phase], str | None]:
    """(phases, None), or ([], why) when the parts cannot be built from configs here."""
    try:
        with quiet_casts():
            return make(), None
    except (InputError, DataError):
        raise
    except Exception as e:  # noqa: BLE001 - an estimate that cannot run is reported, not fatal
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        return [], f"could not estimate ({type(e).__name__}: {first})"


def memory_report(phases: list[Phase], c: Card, why: str | None = None,
                  fits: bool | None = None) -> dict:
    """The --json "memory" object: the card, each phase's peak and whether the run fits (by
    default: every phase does)."""
    if fits is None and phases:
        fits = all(p.peak_bytes <= c.budget for p in phases)
    return {"card": c.to_dict(), "phases": [p.to_dict(c.budget) for p in phases],
            "fits": fits, "method": METHOD, "note": why}


def show_memory(title: str, memory: dict) -> None:
    """The memory part of a dry run, for people (stdout: it is the command's answer)."""
    c = memory["card"]
    ui.result(f"{title}; card {c['gib']:.1f} GiB ({c['source']}): each phase must stay under "
              f"{c['budget_gib']:.1f} GiB")
    width = max([14, *(len(p["name"]) for p in memory["phases"])])
    for p in memory["phases"]:
        verdict = "fits" if p["fits"] else "DOES NOT FIT"
        ui.result(f"  {p['name']:<{width}} {p['peak_gib']:6.2f} GiB  {verdict:<12}  {p['note']}")
    if memory["note"]:
        ui.result(f"  {memory['note']}")
    elif memory["fits"] is not None and all(p["fits"] for p in memory["phases"]):
        ui.result("every phase fits")
    elif memory["fits"] is not None:
        ui.result("it fits, as set on the last line" if memory["fits"]
                  else "it does not fit this card")


# --- collect -------------------------------------------------------------------------------------
def collect_dry_run(s) -> dict:
    """The plan of `agd collect` (what is left, the disk) and each phase's peak memory."""
    store = TrajectoryStore(s.run / TRAJECTORIES)
    if store.exists() and not s.overwrite:
        store.check_same({**s.identity(), "prompts": s.prompts, "prompt_source": s.prompt_source,
                          "family": s.preset.family, "resolution": s.preset.resolution,
                          "preset_toml": s.preset.raw})
    disk_problem = None
    try:
        remaining = plan_collection(s, store)
    except InputError as e:  # the disk: said, not fatal to a dry run
        disk_problem, remaining = e.message, [i for i in s.ids if i not in store.completed()]
    logger.info("dry run: no weights loaded, nothing written; estimating memory on the meta device…")
    phases, why = _estimated(lambda: collect_phases(s.preset, s.dtype, s.batch_size, s.keep_steps,
                                                     ENCODE_CHUNK))
    total = len(s.prompts) * s.num_per_prompt
    return {"dry_run": True, "command": "collect", "preset": s.preset.name, "dtype": s.dtype,
            "batch_size": s.batch_size, "out": str(s.run),
            "plan": {"prompts": len(s.prompts), "prompt_source": s.prompt_source,
                     "trajectories": total, "to_do": len(remaining),
                     "done": len(s.ids) - len(remaining), "steps": s.steps,
                     "keep_steps": s.keep_steps, "scheduler": s.scheduler,
                     "disk_fits": disk_problem is None, "disk_problem": disk_problem},
            "memory": memory_report(phases, card(s.preset, _device(s.device)), why)}


def show_collect(summary: dict) -> None:
    plan = summary["plan"]
    ui.result(f"dry run of agd collect --preset {summary['preset']}: {plan['to_do']} of "
              f"{plan['trajectories']} trajectories to do ({plan['prompts']} prompts from "
              f"{plan['prompt_source']}), {plan['keep_steps']} of {plan['steps']} steps kept")
    if plan["disk_problem"]:
        ui.result(f"disk: DOES NOT FIT: {plan['disk_problem']}")
    show_memory(f"estimated peak GPU memory ({summary['dtype']}, batch {summary['batch_size']})",
                summary["memory"])


# --- train ---------------------------------------------------------------------------------------
def train_dry_run(run: str | None, data, preset: str | None, flags: dict, device: str,
                  workdir: str) -> dict:
    """The settings of `agd train` and its training step's peak memory (and, where it does not
    fit, what gradient checkpointing would make of it: the choice a CUDA run makes itself)."""
    try:
        run_path, roots = locate(run, data, workdir)
        preset_obj = recorded_preset(roots, preset)
    except DataError:
        if preset is None:  # no collection, and nothing else says which model
            raise
        run_path, roots, preset_obj = None, [], load_preset(preset)
    settings = TrainSettings.resolve(preset_obj, flags)
    family = FAMILY_CLASSES[preset_obj.family]
    family.check_adapter_kind(family, settings.adapter.kind)
    c = card(preset_obj, _device(device))
    logger.info("dry run: no weights loaded, nothing written; estimating memory on the meta device…")

    def estimate(on: bool) -> Phase:
        return training_step(preset_obj, settings.precision, settings.optimizer, on,
                             settings.batch_size)

    choice, why = None, None
    with quiet_casts():
        try:
            choice = choose_checkpointing(estimate, c, settings.gradient_checkpointing,
                                          flags.get("gradient_checkpointing"))
        except Exception as e:  # noqa: BLE001 - reported, as _estimated does
            why = f"could not estimate ({type(e).__name__}: {str(e).strip()[:200]})"
    phases, fits = [], None
    if choice is not None:
        phases = [choice.asked, choice.phase] if choice.asked else [choice.phase]
        fits = choice.action != "refuse"
        if choice.asked:
            choice.phase.name = "training step (checkpointing)"
    return {"dry_run": True, "command": "train", "preset": preset_obj.name,
            "run": None if run_path is None else str(run_path),
            "collections": [str(r) for r in roots],
            "settings": {"steps": settings.steps, "batch_size": settings.batch_size,
                         "grad_accum": settings.grad_accum, "lr": settings.lr,
                         "optimizer": settings.optimizer, "precision": settings.precision,
                         "gradient_checkpointing": settings.gradient_checkpointing},
            "checkpointing": None if choice is None else choice.to_dict(),
            "memory": memory_report(phases, c, why, fits)}


def show_train(summary: dict) -> None:
    s = summary["settings"]
    data = ", ".join(summary["collections"]) or "no collection yet (--preset only)"
    ui.result(f"dry run of agd train --preset {summary['preset']}: {s['steps']} steps, batch "
              f"{s['batch_size']} × accum {s['grad_accum']}, lr {s['lr']:g}, {s['optimizer']}, "
              f"{s['precision']}, gradient checkpointing "
              f"{'on' if s['gradient_checkpointing'] else 'off'}; data: {data}")
    show_memory(f"estimated peak GPU memory of one training step ({s['precision']}, batch "
                f"{s['batch_size']})", summary["memory"])
    choice = summary["checkpointing"]
    if choice and choice["action"] == "turn on":
        ui.result(f"agd train on this card: {choice['message']}")
    elif choice and choice["action"] == "refuse":
        ui.result(f"agd train on this card refuses: {choice['message']}; {choice['hint']}")
