"""The adapter side of a denoiser: where the adapters sit in a family's model, what condition
they read, and making, attaching, describing and loading them (checked against this base)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from agd_cli.core.adapter_config import AdapterConfig
from agd_cli.core.adapter_file import AdapterFile
from agd_cli.core.adapters import AdapterSet, Site
from agd_cli.core.conditions import cond_to
from agd_cli.core.lora import LORA, LORA_UNSUPPORTED, build_adapters
from agd_cli.infra.errors import DataError, InputError

logger = logging.getLogger(__name__)


class AdapterHost:
    """Adapters on a frozen base: a family supplies `model`, `preset`, `family`, `source`,
    `checkpoint`, `device`, `dtype`, `adapter_kinds`, `omega_kwarg(_routed)`, `_model_kwargs`."""

    adapters: AdapterSet | None = None

    def cond_spec(self) -> dict:
        raise NotImplementedError

    def adapter_sites(self, kind: str) -> list[Site]:
        """Attention modules that get an adapter: attn2 (cross-attention) or attn1 (offset)."""
        leaf = "attn2" if kind == "cross_attention" else "attn1"
        return [Site(name, m.to_out[0].out_features) for name, m in self.model.named_modules()
                if name.endswith("." + leaf)]

    def extract_adapter_cond(self, arguments: dict) -> tuple[int, dict]:
        raise NotImplementedError

    def adapter_cond(self, cond: dict, x: torch.Tensor) -> dict:
        """A condition dict in the form the adapters read (as the model call would pass it)."""
        kwargs = self._model_kwargs(cond_to(cond, self.device, self.dtype))
        return self.extract_adapter_cond({"sample": x, "hidden_states": x, **kwargs})[1]

    def check_adapter_kind(self, kind: str) -> None:
        if kind not in self.adapter_kinds:
            raise InputError(f"adapter kind '{kind}' does not fit family '{self.family}'"
                             + (LORA_UNSUPPORTED if kind == LORA else ""),
                             hint=f"family '{self.family}' supports: {', '.join(self.adapter_kinds)}")

    def new_adapters(self, cfg: AdapterConfig | None = None) -> AdapterSet:
        """Fresh adapters (fp32) attached to this base."""
        cfg = cfg or self.preset.adapter
        self.check_adapter_kind(cfg.kind)
        aset = build_adapters(cfg, self.model, self.adapter_sites, self.cond_spec()).to(self.device)
        self.attach(aset)
        return aset

    def attach(self, aset: AdapterSet) -> None:
        if self.adapters is not None:
            self.adapters.detach()
        aset.attach(self.model, self.extract_adapter_cond, self.omega_kwarg, self.omega_kwarg_routed)
        self.adapters = aset

    def adapter_metadata(self, train_steps: int = 0, **extra) -> dict:
        """What an adapter file says about where it came from (see AdapterSet.save)."""
        lo, hi = self.preset.omega_range
        where = ({"base_checkpoint_file": self.checkpoint["file"],
                  "base_checkpoint_sha256": self.checkpoint["sha256"]} if self.checkpoint else {})
        return {"family": self.family, "base_model": self.source, "preset": self.preset.name,
                "preset_toml": self.preset.raw, "omega_min": lo, "omega_max": hi,
                "train_steps": train_steps, **where, **extra}

    def load_adapters(self, file: str | Path | AdapterFile,
                      dtype: torch.dtype | None = None) -> AdapterSet:
        """Load an adapter file written by `agd train` and attach it; refuse one made for
        another base."""
        mine = self.read_adapters(file, dtype)
        self.attach(mine)
        return mine

    def read_adapters(self, file: str | Path | AdapterFile,
                      dtype: torch.dtype | None = None) -> AdapterSet:
        """An adapter file's adapters, checked against this base and loaded, not attached yet
        (a refused file leaves whatever is attached in place)."""
        file = AdapterFile.open(file)
        path, meta = file.path, file.meta
        cfg = AdapterConfig(**meta["adapter_config"])
        mine = build_adapters(cfg, self.model, self.adapter_sites, self.cond_spec())
        if meta.get("family") == self.family and meta.get("base_model") == self.source \
                and meta["signature"] != mine.signature():
            raise DataError(f"adapter {path} does not fit the blocks of '{self.source}': it was "
                            f"trained on an architecture with other attention sites or condition "
                            f"sizes (signature {meta['signature']}, this base {mine.signature()})",
                            hint="the preset's architecture changed since; retrain the adapter")
        if meta.get("signature") != mine.signature() or meta.get("family") != self.family:
            raise DataError(
                f"adapter {path} was trained for '{meta.get('base_model')}' "
                f"(family {meta.get('family')}), which does not match the loaded base "
                f"'{self.source}' (family {self.family})",
                hint="use the adapter with the base it was trained on, or train a new one")
        try:
            mine.load_state_dict(file.tensors())
        except RuntimeError as e:
            raise DataError(f"adapter {path} does not match this agd version's adapter layout: "
                            f"{str(e).splitlines()[0][:200]}",
                            hint="retrain it with `agd train` (the base was not changed)") from None
        mine.to(self.device, dtype or self.dtype).requires_grad_(False).eval()
        mine.metadata = meta
        self._warn_other_checkpoint(path, meta)
        return mine

    def _warn_other_checkpoint(self, path, meta: dict) -> None:
        """Same architecture, other weights: it runs, but the adapter learned another teacher."""
        trained = meta.get("base_checkpoint_sha256")
        mine = (self.checkpoint or {}).get("sha256")
        if trained and mine and trained != mine:
            logger.warning(f"adapter {path} was trained on checkpoint "
                    f"{meta.get('base_checkpoint_file')} (sha256 {trained[:12]}…), but the base "
                    f"is {self.checkpoint['file']} (sha256 {mine[:12]}…); results may not match CFG")
