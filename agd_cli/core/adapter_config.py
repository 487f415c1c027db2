"""The adapters' configuration, the method's core type: a preset's [adapter] table, recorded in
every adapter file and checkpoint. Pure data (no torch), so presets and checks can read it."""

from __future__ import annotations

from dataclasses import dataclass, field

from agd_cli.config.vocab import ADAPTER_INPUTS


@dataclass
class AdapterConfig:
    """What the guidance adapters look like (built by core.adapter_layers, attached by core.adapters)."""

    kind: str = "cross_attention"
    hidden_dim: int = 128
    context_dim: int = 256
    heads: int = 2
    inputs: list[str] = field(default_factory=lambda: list(ADAPTER_INPUTS))
    init: str = "xavier"
    omega_gain: bool = True  # adapter outputs scaled by (ω − 1): exact base at ω = 1, like CFG
    negatives: bool = False  # also fed CFG's unconditional branch (a negative prompt / class)
    # with negatives, cross_attention only: each adapter also reads the frozen base attention's
    # output for the negative's keys and values at its site (core.negative_attention)
    negative_attention: bool = False
    # the ω range the adapters were trained on (set by `agd train` from the collection): the ω
    # embedding sees ω clamped to it, so beyond the range only the (ω − 1) gain extrapolates,
    # as CFG does; None (files from before) feeds ω unclamped
    omega_range: list[float] | None = None
    # kind "lora" (core.lora): the LoRA's rank, and the ω its strength 1 stands for (None: the
    # preset's default ω, set by `agd train`); λ = (ω − 1)/(w_ref − 1)
    lora_rank: int = 8
    lora_w_ref: float | None = None
    lora_targets: str = "attention"  # or "attention_ff": the feed-forward Linears too

    def to_dict(self) -> dict:
        d = {"kind": self.kind, "hidden_dim": self.hidden_dim,
             "context_dim": self.context_dim, "heads": self.heads,
             "inputs": list(self.inputs), "init": self.init, "omega_gain": self.omega_gain}
        if self.negatives:  # absent otherwise: files and checkpoints from before stay identical
            d["negatives"] = True
        if self.negative_attention:  # likewise
            d["negative_attention"] = True
        if self.omega_range is not None:  # likewise
            d["omega_range"] = [float(w) for w in self.omega_range]
        if self.kind == "lora":  # likewise: only LoRA files and checkpoints carry these
            d["lora_rank"] = self.lora_rank
            d["lora_w_ref"] = None if self.lora_w_ref is None else float(self.lora_w_ref)
            if self.lora_targets != "attention":  # likewise
                d["lora_targets"] = self.lora_targets
        return d
