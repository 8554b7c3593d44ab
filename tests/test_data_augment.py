"""Face augmentations (data.augment): config checks, parameter draws, both loaders alike, resume.

The loader tests read shards whose every image is the same planted pattern (red = x ramp,
green = y ramp, blue = noise), so sample i of batch k is the same input on both loaders and
gets the same drawn parameters: their outputs must agree image by image, and the pattern
lets each image tell which box was cropped (the ramps), whether it is grey (channel spread)
and how sharp it is (the noise's high frequencies).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from dist_cosface.config import load_config
from dist_cosface.configtools import ConfigError
from dist_cosface.data import DataConfig, build_loader
from dist_cosface.data.augment import (
    apply,
    batch_params,
    colour_maps,
    dali_inputs,
    dali_ops,
    draw,
)
from dist_cosface.data.config import AugmentConfig
from dist_cosface.distributed import DistContext
from dist_cosface.seeding import stable_seed
from tests.data_common import loader_config, write_dataset

SOURCE = 96  # side of the planted pattern
SIZE = 32  # loader output
BATCH = 32
EVERY_STEP = AugmentConfig(
    crop_prob=0.5, low_res_prob=0.3, blur_prob=0.3, grayscale_prob=0.2, jitter_prob=0.4
)


@pytest.mark.parametrize(
    "override, message",
    [
        ("crop_prob=1.5", "data.augment.crop_prob must be a probability in [0, 1], got 1.5"),
        ("blur_prob=-0.1", "data.augment.blur_prob must be a probability"),
        ("crop_scale=[0.9, 0.5]", "data.augment.crop_scale must be a range [low, high] with"),
        ("crop_scale=[0.5, 1.2]", "data.augment.crop_scale must be a range"),
        ("crop_ratio=[0, 1]", "data.augment.crop_ratio must be a range"),
        ("low_res_scale=[0.0, 0.5]", "data.augment.low_res_scale must be a range"),
        ("blur_sigma=[1]", "data.augment.blur_sigma must be a range [low, high], got [1.0]"),
        ("brightness=[1.2, 0.8]", "data.augment.brightness must be a range"),
        ("contrast=[-1, 1]", "data.augment.contrast must be a range"),
        ("saturation=[0, 1, 2]", "data.augment.saturation must be a range [low, high], got"),
        ("grayscale_prob=yes", "data.augment.grayscale_prob: expected a number"),
        ("hue=0.1", "unknown config key(s) ['data.augment.hue']"),
        ("jitter_prob=.nan", "data.augment.jitter_prob: expected a finite number"),
    ],
)
def test_bad_values_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, ["data.backend=webdataset", "data.path=x", f"data.augment.{override}"])
    assert message in str(info.value)


def test_defaults_are_off_and_cross_checks_name_the_key():
    assert not DataConfig().augment.active
    assert batch_params(DataConfig(), 0, 0, 4) is None  # loaders run exactly as without
    cfg = load_config(None, ["data.augment.saturation=[0, 1]", "data.augment.blur_prob=0"])
    assert cfg.data.augment.saturation == (0.0, 1.0) and not cfg.data.augment.active
    with pytest.raises(ConfigError, match=r"augment.blur_sigma up to 6.0 .* image_size=16"):
        load_config(
            None,
            ["data.backend=dali", "data.path=x", "data.image_size=16"]
            + ["data.augment.blur_prob=1", "data.augment.blur_sigma=[1, 6]"],
        )
    with pytest.raises(ConfigError, match=r"augment.\*_prob > 0 needs backend dali or webdata"):
        load_config(None, ["data.augment.grayscale_prob=0.1"])  # synthetic backend


def test_draws_are_seeded_independent_per_step_and_distributed_as_configured():
    n = 20000
    cfg = AugmentConfig(
        crop_prob=0.3, low_res_prob=0.2, blur_prob=0.1, grayscale_prob=0.25, jitter_prob=0.6
    )
    p = draw(cfg, n, 112, seed=7)
    again, other = draw(cfg, n, 112, seed=7), draw(cfg, n, 112, seed=8)
    assert all(np.array_equal(getattr(p, f), getattr(again, f)) for f in vars(p))
    assert not np.array_equal(p.crop, other.crop)
    # turning the other steps off leaves a step's draws as they were
    blur_only = draw(AugmentConfig(blur_prob=0.1), n, 112, seed=7)
    assert np.array_equal(blur_only.blur_sigma, p.blur_sigma) and not blur_only.cropped.any()

    for share, prob in [
        (p.cropped.mean(), 0.3),
        (p.lowered.mean(), 0.2),
        ((p.blur_sigma > 0).mean(), 0.1),
        (p.grayscale.mean(), 0.25),
        (p.jitter.mean(), 0.6),
    ]:
        assert abs(share - prob) < 5 * np.sqrt(prob * (1 - prob) / n), (share, prob)
    box = p.crop[p.cropped].astype(np.float64)
    height, width = box[:, 2] - box[:, 0], box[:, 3] - box[:, 1]
    assert box.min() >= 0 and box.max() <= 1
    whole = (width < 1) & (height < 1)  # boxes not cut to the image keep area and aspect
    area, aspect = (width * height)[whole], (width / height)[whole]
    assert area.min() >= 0.2 - 1e-5 and area.max() <= 1 + 1e-5
    assert aspect.min() >= 0.75 - 1e-5 and aspect.max() <= 4 / 3 + 1e-5
    assert abs(np.log(aspect).mean()) < 0.01  # log-uniform about 1
    assert np.array_equal(p.crop[~p.cropped], np.tile([0, 0, 1, 1], (n - len(box), 1)))
    sides = p.low_res[p.lowered]
    assert np.all(p.low_res[~p.lowered] == 112)
    assert sides.min() >= round(0.2 * 112) and abs(sides.mean() - 0.6 * 112) < 1.5
    sigma = p.blur_sigma[p.blur_sigma > 0]
    assert sigma.min() >= 0.5 and sigma.max() <= 1.5 and abs(sigma.mean() - 1.0) < 0.02
    factors = p.factors[p.jitter]
    assert factors.min() >= 0.5 and factors.max() <= 1.5 and abs(factors.mean() - 1) < 0.01
    assert np.all(p.factors[~p.jitter] == 1)


def test_colour_maps_match_the_steps_applied_one_by_one():
    rng = np.random.default_rng(0)
    factors = rng.uniform(0.3, 1.7, (6, 3))
    grey = np.array([False, True] * 3)
    maps = colour_maps(factors, grey).astype(np.float64)
    pixels = rng.uniform(0, 255, (6, 3))
    for i, (b, c, s) in enumerate(factors):
        x = pixels[i] * b
        x = c * (x - 127.5) + 127.5
        luma = 0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]
        x = s * x + (1 - s) * luma
        if grey[i]:
            x = np.full(3, 0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])
        np.testing.assert_allclose(maps[i, :, :3] @ pixels[i] + maps[i, :, 3], x, atol=1e-3)


def test_blur_and_colour_identical_on_dali_and_torch():
    """The same uint8 images through DALI's operators and the torch steps, pixel for pixel
    (sigma up to 2.5: windows of 3 to 17 taps in one batch; grey, jitter and both)."""
    from nvidia.dali import fn, pipeline_def, types

    n = 16
    cfg = AugmentConfig(blur_prob=0.6, grayscale_prob=0.3, jitter_prob=0.6, blur_sigma=(0.3, 2.5))
    params = draw(cfg, n, SIZE, seed=5)
    assert 4 < (params.blur_sigma > 0).sum() < n and 4 < params.recoloured.sum() < n
    images = np.random.default_rng(1).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)

    @pipeline_def(
        batch_size=n,
        num_threads=1,
        device_id=None,
        prefetch_queue_depth=1,
        enable_conditionals=True,
    )
    def pipeline():
        x = fn.external_source(name="images", dtype=types.UINT8, ndim=3, layout="HWC")
        return dali_ops(x, cfg, SIZE)

    pipe = pipeline()
    pipe.build()
    pipe.feed_input("images", list(images))
    for name, values in dali_inputs(cfg, params).items():
        pipe.feed_input(name, values)
    (out,) = pipe.run()
    by_dali = np.stack([np.asarray(out[i]) for i in range(n)])
    by_torch = apply(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), params)
    assert np.array_equal(by_dali, by_torch.permute(0, 2, 3, 1).numpy())
    assert not np.array_equal(by_dali, images)


# ------------------------------------------------------------------ both loaders


@pytest.fixture(scope="module")
def pattern_shards(tmp_path_factory):
    """256 copies of the planted pattern (PNG: both loaders decode it bit for bit)."""
    from PIL import Image

    cols = (np.arange(SOURCE) + 0.5) * 256 / SOURCE
    pattern = np.empty((SOURCE, SOURCE, 3), dtype=np.uint8)
    pattern[..., 0] = cols[None, :]
    pattern[..., 1] = cols[:, None]
    pattern[..., 2] = np.random.default_rng(0).integers(0, 256, (SOURCE, SOURCE))
    buf = io.BytesIO()
    Image.fromarray(pattern).save(buf, "PNG")
    out = tmp_path_factory.mktemp("pattern")
    samples = [{"png": buf.getvalue(), "cls": str(i % 4).encode()} for i in range(256)]
    write_dataset(out, samples, 64, num_classes=4)
    return out


def _epoch(path, backend, resume_at=None, ctx=None, **kw):
    """All images of epoch 1 (or of a loader restored at batch ``resume_at``) in pixel units."""
    kw = {"batch_size": BATCH, "image_size": SIZE, "num_workers": 2, "augment": EVERY_STEP, **kw}
    loader = build_loader(loader_config(backend, path, **kw), ctx or DistContext())
    if resume_at is not None:
        loader.load_state_dict({"epoch": 1, "batches_consumed": resume_at})
    loader.set_epoch(1)
    return torch.cat([x.cpu() for x, _ in loader]).double().add(1).mul(127.5)


@pytest.fixture(scope="module")
def epochs(pattern_shards):
    """Epoch 1 of both loaders (webdataset with 2 workers: batches alternate streams)."""
    return {backend: _epoch(pattern_shards, backend) for backend in ("dali", "webdataset")}


def _measure(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """What each image shows of its steps: channel spread, crop box (ramps), sharpness."""
    spread = (images.amax(1) - images.amin(1)).mean((1, 2))
    # red runs 256 * x - 0.5 over the source (x relative): fit it along the columns
    centres = (torch.arange(SIZE, dtype=torch.float64) + 0.5) / SIZE
    inner = slice(3, SIZE - 3)  # border pixels carry the blur's and low-res's edge effects

    def span(profile):
        slope, start = np.polyfit(centres[inner], (profile[:, inner].T + 0.5) / 256, 1)
        return torch.from_numpy(np.stack([start, start + slope], 1))

    x = span(images[:, 0].mean(1))
    y = span(images[:, 1].mean(2))
    blue = images[:, 2]
    laplace = 4 * blue[:, 1:-1, 1:-1] - blue[:, :-2, 1:-1] - blue[:, 2:, 1:-1]
    laplace = laplace - blue[:, 1:-1, :-2] - blue[:, 1:-1, 2:]
    sharpness = laplace.pow(2).mean((1, 2)).sqrt()
    box = torch.stack([y[:, 0], x[:, 0], y[:, 1], x[:, 1]], 1)
    return {"spread": spread, "box": box, "sharpness": sharpness}


def _epoch_params(num_batches: int):
    cfg = DataConfig(backend="dali", path="x", image_size=SIZE, seed=0, augment=EVERY_STEP)
    params = [batch_params(cfg, stable_seed(0, 1, 0), k, BATCH) for k in range(num_batches)]
    return {
        name: np.concatenate([getattr(p, name) for p in params])
        for name in ("crop", "cropped", "lowered", "low_res", "blur_sigma", "grayscale", "jitter")
    }


def test_both_loaders_apply_the_same_transforms(epochs):
    """Same parameters per sample, same images, and the images show the drawn steps."""
    dali, wds = epochs["dali"], epochs["webdataset"]
    assert dali.shape == wds.shape == (256, 3, SIZE, SIZE)
    # image by image: DALI's resizes differ from Pillow's and torch's by under a grey level
    per_image = (dali - wds).abs().mean((1, 2, 3))
    assert float(per_image.max()) < 1.5, float(per_image.max())

    p = _epoch_params(256 // BATCH)
    plain = ~(p["grayscale"] | p["jitter"])
    sharp = plain & ~p["cropped"] & (p["low_res"] == SIZE) & (p["blur_sigma"] == 0)
    soft = plain & ~p["cropped"] & ((p["low_res"] <= SIZE // 2) | (p["blur_sigma"] >= 1))
    assert sharp.sum() > 20 and soft.sum() > 10 and p["grayscale"].mean() > 0.1
    for images in (dali, wds):
        seen = _measure(images)
        # grayscale: exactly the samples that drew it have no colour left
        assert torch.equal(seen["spread"] < 1.0, torch.from_numpy(p["grayscale"]))
        # crop: the ramps show the drawn box (samples whose colours were not changed)
        error = (seen["box"][plain] - torch.from_numpy(p["crop"][plain])).abs()
        assert float(error.max()) < 0.02, float(error.max())
        # resolution: low-res and blurred samples lost most of the noise's high frequencies
        assert float(seen["sharpness"][soft].max()) < 0.2 * float(seen["sharpness"][sharp].min())
    stats = [_measure(images) for images in (dali, wds)]
    for key in ("spread", "sharpness"):
        means = [float(s[key].mean()) for s in stats]
        assert abs(means[0] - means[1]) < 0.01 * means[0], (key, means)


def test_low_res_without_crop_agrees(pattern_shards):
    """Low resolution alone (DALI's first resize then has no region of interest)."""
    augment = AugmentConfig(low_res_prob=0.5, low_res_scale=(0.2, 0.5))
    dali, wds = (_epoch(pattern_shards, b, augment=augment) for b in ("dali", "webdataset"))
    per_image = (dali - wds).abs().mean((1, 2, 3))
    assert float(per_image.max()) < 1.5, float(per_image.max())
    assert float((dali - dali[:1]).abs().mean((1, 2, 3)).gt(2).float().mean()) > 0.3


@pytest.mark.parametrize("backend", ["dali", "webdataset"])
def test_augmented_epochs_resume_exactly(pattern_shards, epochs, backend):
    """A loader restored at batch 3 gives the original's augmented batches bit for bit (odd
    start: the webdataset workers swap streams)."""
    resumed = _epoch(pattern_shards, backend, resume_at=3)
    assert torch.equal(resumed, epochs[backend][3 * BATCH :])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_dali_mixed_augments_like_cpu(pattern_shards, epochs):
    """On the GPU (decoding ``mixed``, the steps on the device) the images match the CPU's."""
    pytest.importorskip("nvidia.dali")
    ctx = DistContext(device=torch.device("cuda", 0))
    on_gpu = _epoch(pattern_shards, "dali", ctx=ctx, dali_device="mixed")
    assert float((on_gpu - epochs["dali"]).abs().mean((1, 2, 3)).max()) < 1.5
