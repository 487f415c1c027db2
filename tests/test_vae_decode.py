"""VAE decode at real sizes: one image at a time (slicing), tiles only where the VAE tiles;
`vae_decode` says which (generate's and bench's `--json` carry it: see their tests)."""

from __future__ import annotations

import torch

from agd_cli.config.presets import load_preset
from agd_cli.families import load_denoiser


def decoder_inputs(den, x: torch.Tensor) -> tuple[torch.Tensor, list[tuple]]:
    """Decode `x`; returns the images and the shape of every latent the VAE's decoder saw."""
    seen: list[tuple] = []
    hook = den.vae_model().decoder.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    try:
        return den.decode(x), seen
    finally:
        hook.remove()


def test_decode_is_one_image_at_a_time_and_equals_the_batched_decode():
    den = load_denoiser(load_preset("tiny-sd"), "cpu")
    x = torch.randn(3, *den.latent_shape(), generator=torch.Generator().manual_seed(0))
    assert den.vae_decode() == {"slicing": True, "tiling": False, "tile_size": 32}
    images, seen = decoder_inputs(den, x)
    assert seen == [(1, 4, 16, 16)] * 3  # three calls of one latent each
    den.vae_model().disable_slicing()
    batched, seen = decoder_inputs(den, x)
    assert seen == [(3, 4, 16, 16)]
    torch.testing.assert_close(images, batched, rtol=1e-5, atol=1e-5)


def test_tiling_is_reported_only_where_the_vae_really_tiles():
    preset = load_preset("tiny-sd")
    preset.memory["vae_tiling"] = True
    den = load_denoiser(preset, "cpu")
    assert den.vae_decode(32, 32)["tiling"] is False  # the VAE's own size: one tile
    assert den.vae_decode(64, 48) == {"slicing": True, "tiling": True, "tile_size": 32}
    x = torch.randn(2, 4, 32, 24, generator=torch.Generator().manual_seed(0))
    images, seen = decoder_inputs(den, x)
    assert images.shape == (2, 3, 64, 48)
    assert len(seen) > 2 and all(s[0] == 1 and max(s[2:]) <= 16 for s in seen)  # tiles of ≤ 16²
    pixel = load_denoiser(load_preset("mnist"), "cpu", text=False)
    assert pixel.vae_decode() is None  # pixel space: nothing to decode
