"""Face augmentations (``data.augment``), drawn here and applied alike by both file loaders.

Per image, in this order, each step with its own probability:

1. random resized crop: a box of the decoded image (relative coordinates) is what gets
   resized, instead of the whole image;
2. low resolution: that resize goes to a side of r < S pixels instead of S (antialiased), and
   a second one back up to S;
3. Gaussian blur: separable, window ``2 * ceil(3 sigma) + 1``, borders reflected;
4. colour: brightness, contrast (about mid-grey 127.5) and saturation factors, then grayscale,
   folded into one affine map of each pixel's RGB (a 3 x 3 matrix and an offset).

Every parameter is drawn in Python, per batch, from a generator seeded by (seed, epoch, rank,
batch index) (:func:`batch_params`): a resumed loader draws what the original drew without
replaying anything, and both loaders draw the same parameters for batch i of a rank's epoch.
DALI applies them as per-sample inputs of its operators (:func:`dali_ops`, fed by
:func:`dali_inputs`; on the GPU when decoding is ``mixed``): ``resize`` with a relative region
of interest and a per-sample size, ``resize`` up, ``gaussian_blur``, ``coord_transform``. The
webdataset workers crop and lower with the resize that Pillow runs while decoding anyway
(:func:`decode_sample`) and apply the rest with torch (:func:`apply`). Both round to uint8
after each step, as DALI stores its intermediate images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dist_cosface.data.config import AugmentConfig, DataConfig
from dist_cosface.imageio import decode_image, to_uint8
from dist_cosface.seeding import stable_seed

_FULL_BOX = (0.0, 0.0, 1.0, 1.0)  # y0, x0, y1, x1: the whole image
_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601, as Pillow's convert("L")
_MID_GREY = 127.5
# uniforms drawn per sample; each step reads its own columns, so turning one step on or off
# never changes what another draws
_COLUMNS = 14
_AUGMENT_STREAM = 2  # the flips of the DALI loader use 1


@dataclass
class AugmentParams:
    """One batch's per-sample parameters (numpy, one row a sample); identity where not drawn."""

    crop: np.ndarray  # float32 [B, 4]: y0, x0, y1, x1 of the kept box, relative to the image
    cropped: np.ndarray  # bool [B]
    lowered: np.ndarray  # bool [B]
    low_res: np.ndarray  # int32 [B]: side of the intermediate image (S where not lowered)
    blur_sigma: np.ndarray  # float32 [B]: 0 where not drawn
    grayscale: np.ndarray  # bool [B]
    jitter: np.ndarray  # bool [B]
    factors: np.ndarray  # float32 [B, 3]: brightness, contrast, saturation (1: not drawn)
    colour: np.ndarray  # float32 [B, 3, 4]: [M | T], RGB -> M @ RGB + T (jitter and grayscale)

    @classmethod
    def identity(cls, batch_size: int, image_size: int) -> AugmentParams:
        return cls(
            crop=np.tile(np.array(_FULL_BOX, dtype=np.float32), (batch_size, 1)),
            cropped=np.zeros(batch_size, dtype=bool),
            lowered=np.zeros(batch_size, dtype=bool),
            low_res=np.full(batch_size, image_size, dtype=np.int32),
            blur_sigma=np.zeros(batch_size, dtype=np.float32),
            grayscale=np.zeros(batch_size, dtype=bool),
            jitter=np.zeros(batch_size, dtype=bool),
            factors=np.ones((batch_size, 3), dtype=np.float32),
            colour=np.tile(np.eye(3, 4, dtype=np.float32), (batch_size, 1, 1)),
        )

    @property
    def blur_window(self) -> np.ndarray:
        """int32 [B]: ``2 * ceil(3 sigma) + 1`` taps, 1 where there is no blur."""
        return (2 * np.ceil(3 * self.blur_sigma.astype(np.float64)) + 1).astype(np.int32)

    @property
    def recoloured(self) -> np.ndarray:
        return self.grayscale | self.jitter


def batch_params(
    cfg: DataConfig, loader_seed: int, index: int, batch_size: int
) -> AugmentParams | None:
    """Batch ``index``'s parameters; ``loader_seed`` is ``stable_seed(seed, epoch, rank)``.
    None when ``cfg.augment`` draws nothing (the loaders then run as without augmentation)."""
    if not cfg.augment.active:
        return None
    seed = stable_seed(loader_seed, index, _AUGMENT_STREAM)
    return draw(cfg.augment, batch_size, cfg.image_size, seed)


def _lerp(bounds: tuple[float, float], u: np.ndarray) -> np.ndarray:
    return bounds[0] + u * (bounds[1] - bounds[0])


def draw(cfg: AugmentConfig, batch_size: int, image_size: int, seed: int) -> AugmentParams:
    """Per-sample parameters of ``batch_size`` images from a generator seeded by ``seed``."""
    u = np.random.default_rng(seed).random((batch_size, _COLUMNS))
    params = AugmentParams.identity(batch_size, image_size)

    # crop: area share and log-uniform aspect; a side longer than the image is cut to it
    params.cropped = u[:, 0] < cfg.crop_prob
    area = _lerp(cfg.crop_scale, u[:, 1])
    ratio = np.exp(_lerp(np.log(cfg.crop_ratio), u[:, 2]))
    width, height = np.minimum(1, np.sqrt(area * ratio)), np.minimum(1, np.sqrt(area / ratio))
    x0, y0 = u[:, 3] * (1 - width), u[:, 4] * (1 - height)
    box = np.clip(np.stack([y0, x0, y0 + height, x0 + width], axis=1), 0, 1)  # float error
    params.crop[params.cropped] = box[params.cropped]

    params.lowered = u[:, 5] < cfg.low_res_prob
    side = np.clip(np.rint(_lerp(cfg.low_res_scale, u[:, 6]) * image_size), 1, image_size)
    params.low_res[params.lowered] = side[params.lowered]

    blur = u[:, 7] < cfg.blur_prob
    params.blur_sigma[blur] = _lerp(cfg.blur_sigma, u[:, 8])[blur]

    params.grayscale = u[:, 9] < cfg.grayscale_prob
    params.jitter = u[:, 10] < cfg.jitter_prob
    ranges = (cfg.brightness, cfg.contrast, cfg.saturation)
    factors = np.stack([_lerp(r, u[:, 11 + k]) for k, r in enumerate(ranges)], axis=1)
    params.factors[params.jitter] = factors[params.jitter]
    params.colour = colour_maps(params.factors.astype(np.float64), params.grayscale)
    return params


def colour_maps(factors: np.ndarray, grayscale: np.ndarray) -> np.ndarray:
    """float32 [B, 3, 4] affine RGB maps: brightness b, contrast c, saturation s, then grey.

    ``b: x -> b x``; ``c: x -> c (x - 127.5) + 127.5``; ``s: x -> s x + (1 - s) luma(x)``;
    grey is ``s = 0``. Each keeps grey pixels grey.
    """
    n = len(factors)
    b, c, s = (factors[:, k, None, None] for k in range(3))
    eye, to_grey = np.eye(3), np.outer(np.ones(3), _LUMA)
    matrix = c * b * np.broadcast_to(eye, (n, 3, 3))
    offset = np.broadcast_to((1 - c[:, :, 0]) * _MID_GREY, (n, 3))
    saturate = s * eye + (1 - s) * to_grey
    saturate[grayscale] = to_grey
    matrix = saturate @ matrix
    offset = np.einsum("bij,bj->bi", saturate, offset)
    return np.concatenate([matrix, offset[:, :, None]], axis=2).astype(np.float32)


# ------------------------------------------------------------------ torch (webdataset workers)


def decode_sample(data: bytes, size: int, params: AugmentParams, i: int) -> torch.Tensor:
    """Encoded bytes -> uint8 RGB ``[3, size, size]`` of sample ``i``'s box, resized by
    Pillow's bilinear filter (as ``decode_resized`` resizes the whole image) to its low
    resolution side, then back up to ``size`` if that is smaller."""
    from PIL import Image

    image = decode_image(data)
    width, height = image.size
    y0, x0, y1, x1 = (float(v) for v in params.crop[i])
    side = int(params.low_res[i])
    box = (x0 * width, y0 * height, x1 * width, y1 * height)
    pixels = to_uint8(image.resize((side, side), Image.BILINEAR, box=box), side)
    if side == size:
        return pixels
    up = F.interpolate(pixels[None].float(), size=(size, size), mode="bilinear")
    return _rounded(up)[0]


def _rounded(x: torch.Tensor) -> torch.Tensor:
    """float pixels (a temporary: changed in place) -> uint8, halves rounded up (as DALI's
    saturating conversion); the conversion truncates, the floor once clamped to [0, 255]."""
    return x.add_(0.5).clamp_(0, 255).to(torch.uint8)


def _blur(images: torch.Tensor, sigma: np.ndarray) -> torch.Tensor:
    """uint8 ``[n, 3, S, S]`` blurred with per-image ``sigma``: one grouped convolution per
    axis, every kernel padded with zero taps to the widest window. Reflected padding of the
    widest radius gives each narrower kernel the values its own padding would."""
    n, channels, height, width = images.shape
    radius = int(np.ceil(3 * sigma.astype(np.float64).max()))
    offsets = np.arange(-radius, radius + 1)
    own = offsets[None, :] ** 2 <= (np.ceil(3 * sigma.astype(np.float64)) ** 2)[:, None]
    taps = np.exp(-(offsets[None, :] ** 2) / (2 * sigma[:, None].astype(np.float64) ** 2)) * own
    kernel = torch.from_numpy(np.repeat(taps / taps.sum(1, keepdims=True), channels, axis=0))
    kernel = kernel.float()  # [n * 3, window]: one per image and channel
    x = images.float().view(1, n * channels, height, width)
    x = F.pad(x, (radius, radius, 0, 0), mode="reflect")
    x = F.conv2d(x, kernel.view(n * channels, 1, 1, -1), groups=n * channels)
    x = F.pad(x, (0, 0, radius, radius), mode="reflect")
    x = F.conv2d(x, kernel.view(n * channels, 1, -1, 1), groups=n * channels)
    return _rounded(x.view(n, channels, height, width))


def apply(images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
    """Blur and colour on uint8 ``[B, 3, S, S]`` (in place; crop and low resolution were
    applied while decoding). Only the samples that drew a step run it."""
    blurred = np.flatnonzero(params.blur_sigma > 0)
    if len(blurred):
        index = torch.from_numpy(blurred)
        images[index] = _blur(images[index], params.blur_sigma[blurred])
    recolour = torch.from_numpy(np.flatnonzero(params.recoloured))
    if len(recolour):
        maps = torch.from_numpy(params.colour)[recolour]
        x = images[recolour].float().flatten(2)  # [n, 3, S * S]
        x = torch.baddbmm(maps[:, :, 3:], maps[:, :, :3], x)
        images[recolour] = _rounded(x).view(-1, *images.shape[1:])
    return images


# ------------------------------------------------------------------ DALI (decoder pipeline)


def dali_ops(images, cfg: AugmentConfig, size: int):
    """DALI operators resizing decoded HWC ``images`` to ``size`` x ``size`` with ``cfg``'s
    steps; their per-sample parameters are external sources fed by :func:`dali_inputs`.
    With nothing to draw this is the plain resize.

    The steps after the first resize run under DALI conditionals (the pipeline needs
    ``enable_conditionals``), on the samples that drew them only: a DALI CPU operator costs
    0.2-0.5 ms per 112 x 112 image whatever its parameters (docs/data.md, Augmentation).
    """
    from nvidia.dali import fn, types

    def param(name: str, ndim: int, dtype=types.FLOAT):
        return fn.external_source(name=f"augment_{name}", dtype=dtype, ndim=ndim)

    def drawn(step: str):
        return param(f"{step}_drawn", 0, types.BOOL)

    if cfg.crop_prob == 0 and cfg.low_res_prob == 0:
        images = fn.resize(images, resize_x=size, resize_y=size)
    else:  # to the low-res side (S where not lowered); ROI in shape order: (y, x)
        box = {}
        if cfg.crop_prob > 0:
            box = dict(roi_start=param("crop_start", 1), roi_end=param("crop_end", 1))
        images = fn.resize(images, size=param("side", 1), roi_relative=True, **box)
    # per-sample `if`s (DALI splits the batch and merges it back in order); a branch must
    # assign the same name as the other one, hence the `else` copies
    if cfg.low_res_prob > 0:
        if drawn("low_res"):
            images = fn.resize(images, size=[size, size])
        else:
            images = images
    if cfg.blur_prob > 0:
        sigma, window = param("blur_sigma", 0), param("blur_window", 0, types.INT32)
        if drawn("blur"):
            images = fn.gaussian_blur(images, sigma=sigma, window_size=window)
        else:
            images = images
    if cfg.jitter_prob > 0 or cfg.grayscale_prob > 0:  # HWC: each pixel's RGB is a 3-D point
        matrix, offset = param("colour_matrix", 2), param("colour_offset", 1)
        if drawn("colour"):
            images = fn.coord_transform(images, M=matrix, T=offset, dtype=types.UINT8)
        else:
            images = images
    return images


def dali_inputs(cfg: AugmentConfig, params: AugmentParams | None) -> dict[str, np.ndarray]:
    """The external-source batches :func:`dali_ops` built for ``cfg``, by name."""
    if params is None:
        return {}
    inputs = {}
    if cfg.crop_prob > 0 or cfg.low_res_prob > 0:
        inputs["augment_side"] = np.repeat(params.low_res[:, None], 2, axis=1).astype(np.float32)
    if cfg.crop_prob > 0:
        inputs["augment_crop_start"] = np.ascontiguousarray(params.crop[:, :2])
        inputs["augment_crop_end"] = np.ascontiguousarray(params.crop[:, 2:])
    if cfg.low_res_prob > 0:
        inputs["augment_low_res_drawn"] = params.lowered
    if cfg.blur_prob > 0:  # sigma 0 is refused by DALI even where the sample is not blurred
        inputs["augment_blur_sigma"] = np.where(params.blur_sigma > 0, params.blur_sigma, 1.0)
        inputs["augment_blur_sigma"] = inputs["augment_blur_sigma"].astype(np.float32)
        inputs["augment_blur_window"] = params.blur_window
        inputs["augment_blur_drawn"] = params.blur_sigma > 0
    if cfg.jitter_prob > 0 or cfg.grayscale_prob > 0:
        inputs["augment_colour_matrix"] = np.ascontiguousarray(params.colour[:, :, :3])
        inputs["augment_colour_offset"] = np.ascontiguousarray(params.colour[:, :, 3])
        inputs["augment_colour_drawn"] = params.recoloured
    return inputs
