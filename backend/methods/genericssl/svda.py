"""SVDA: A&D's Sampling-based Volumetric Data Augmentation (sec. 3.2), batched on the tensors' device.

For every sample of a batch, ``n_aug`` (= 3) operations are drawn without replacement from the set
{rotation, scaling, Gaussian blur, brightness, contrast, gamma}; each drawn operation is then applied with
probability ``p`` (0.7 in the published code).  The random crop of the paper's set is the engine's patch crop
(``backend.engine.data`` crops ``patch_size`` patches at random before the batch reaches the method).

Parameter ranges are the published code's: rotation up to +-15 degrees, scaling factor in [0.7, 1.0] (coordinates
are multiplied by it, i.e. zooming in), blur sigma, brightness multiplier, contrast factor and gamma in
[0.7, 1.3].  Choices where the paper is silent and the published code is CPU/numpy specific:

* rotation is in the axial (H, W) plane, in voxel space (the published code rotates about its first array axis);
* rotation and scaling of one sample are composed into one affine resampling: trilinear for the image, nearest
  for the label (so label values stay valid), zeros outside the patch;
* operations run in a fixed order (geometry, blur, brightness, contrast, gamma) rather than in drawn order;
* contrast keeps the sample's value range (clipped), gamma keeps its mean and standard deviation
  (``retain_stats``), both as in batchgenerators; the scaling factor is uniform on its range.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from monai.networks.layers import separable_filtering
from monai.networks.layers.convutils import gaussian_1d

OPS = ("rotation", "scaling", "blur", "brightness", "contrast", "gamma")


@dataclasses.dataclass
class SVDAParams:
    """The augmentation set's ranges (the published code's values)."""

    n_aug: int = 3
    p: float = 0.7
    rotation_deg: float = 15.0
    scale_range: tuple[float, float] = (0.7, 1.0)
    blur_sigma: tuple[float, float] = (0.7, 1.3)
    brightness_range: tuple[float, float] = (0.7, 1.3)
    contrast_range: tuple[float, float] = (0.7, 1.3)
    gamma_range: tuple[float, float] = (0.7, 1.3)
    ops: tuple[str, ...] = OPS  # the augmentation set (tests restrict it)


def _uniform(lo_hi: tuple[float, float], n: int, device: torch.device) -> torch.Tensor:
    lo, hi = lo_hi
    return lo + (hi - lo) * torch.rand(n, device=device)


def draw_ops(batch: int, params: SVDAParams, device: torch.device) -> dict[str, torch.Tensor]:
    """Boolean ``[batch]`` mask per operation: sampled among ``n_aug`` of the set, then kept with prob. ``p``."""
    n_ops = len(params.ops)
    k = min(params.n_aug, n_ops)
    order = torch.rand(batch, n_ops, device=device).argsort(dim=1)
    chosen = torch.zeros(batch, n_ops, dtype=torch.bool, device=device)
    chosen.scatter_(1, order[:, :k], True)
    chosen &= torch.rand(batch, n_ops, device=device) < params.p
    return {name: chosen[:, i] for i, name in enumerate(params.ops)}


def _affine(angle: torch.Tensor, scale: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """``[B, 3, 4]`` affine_grid matrices: output coordinates -> input coordinates (normalised, x = W axis),
    a voxel-space rotation by ``angle`` in the (W, H) plane, times ``scale``."""
    d, h, w = shape
    b = angle.shape[0]
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.zeros(b, 3, 4, device=angle.device, dtype=torch.float32)
    # normalised -> voxel scaling is diag(w, h, d) / 2; R_norm = S^-1 R S keeps the rotation rigid in voxels
    theta[:, 0, 0] = cos * scale
    theta[:, 0, 1] = -sin * (h / w) * scale
    theta[:, 1, 0] = sin * (w / h) * scale
    theta[:, 1, 1] = cos * scale
    theta[:, 2, 2] = scale
    return theta


def _geometric(image: torch.Tensor, label: torch.Tensor | None, angle: torch.Tensor, scale: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    theta = _affine(angle, scale, tuple(image.shape[2:]))
    grid = F.affine_grid(theta, list(image.shape), align_corners=False).to(image.dtype)
    out = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    out_label = None
    if label is not None:
        out_label = F.grid_sample(label.to(image.dtype), grid, mode="nearest", padding_mode="zeros",
                                  align_corners=False).round().to(label.dtype)
    return out, out_label


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-sample isotropic Gaussian blur (MONAI's normalised sampled kernel, truncated at 4 sigma)."""
    out = []
    for b in range(x.shape[0]):
        kernel = gaussian_1d(sigma[b].float().cpu(), truncated=4.0, approx="sampled", normalize=True)
        out.append(separable_filtering(x[b:b + 1], kernel.to(x.device), mode="replicate"))
    return torch.cat(out)


def _stats_dims(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(2, x.ndim))


def _contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    dims = _stats_dims(x)
    f = factor.view(-1, *([1] * (x.ndim - 1)))
    mean = x.mean(dim=dims, keepdim=True)
    lo, hi = x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)
    return torch.minimum(torch.maximum((x - mean) * f + mean, lo), hi)


def _gamma(x: torch.Tensor, gamma: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    dims = _stats_dims(x)
    g = gamma.view(-1, *([1] * (x.ndim - 1)))
    mean, std = x.mean(dim=dims, keepdim=True), x.std(dim=dims, keepdim=True)
    lo = x.amin(dim=dims, keepdim=True)
    rng = x.amax(dim=dims, keepdim=True) - lo + eps
    y = ((x - lo) / rng).clamp_min(0).pow(g) * rng + lo
    y_mean, y_std = y.mean(dim=dims, keepdim=True), y.std(dim=dims, keepdim=True)
    return (y - y_mean) / (y_std + 1e-8) * std + mean


@torch.no_grad()
def svda(image: torch.Tensor, label: torch.Tensor | None = None, params: SVDAParams | None = None,
         ops: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Augment a batch ``image [B, C, D, H, W]`` (and its ``label [B, 1, D, H, W]``) with SVDA.

    ``ops`` (from :func:`draw_ops`) fixes which operations each sample gets; drawn when None.  Geometric
    operations move image and label together; intensity operations touch the image only.
    """
    params = params or SVDAParams()
    b, device = image.shape[0], image.device
    ops = ops if ops is not None else draw_ops(b, params, device)
    none = torch.zeros(b, dtype=torch.bool, device=device)
    rot, scl = ops.get("rotation", none), ops.get("scaling", none)
    image = image.clone()
    label = None if label is None else label.clone()

    geo = (rot | scl).nonzero().flatten()
    if geo.numel():
        max_angle = math.radians(params.rotation_deg)
        angle = torch.where(rot[geo], (torch.rand(geo.numel(), device=device) * 2 - 1) * max_angle, 0.0)
        scale = torch.where(scl[geo], _uniform(params.scale_range, geo.numel(), device), 1.0)
        img_g, lab_g = _geometric(image[geo], None if label is None else label[geo], angle, scale)
        image[geo] = img_g
        if label is not None:
            label[geo] = lab_g

    idx = ops.get("blur", none).nonzero().flatten()
    if idx.numel():
        image[idx] = _blur(image[idx], _uniform(params.blur_sigma, idx.numel(), device))
    idx = ops.get("brightness", none).nonzero().flatten()
    if idx.numel():
        m = _uniform(params.brightness_range, idx.numel(), device)
        image[idx] = image[idx] * m.view(-1, *([1] * (image.ndim - 1))).to(image.dtype)
    idx = ops.get("contrast", none).nonzero().flatten()
    if idx.numel():
        image[idx] = _contrast(image[idx], _uniform(params.contrast_range, idx.numel(), device).to(image.dtype))
    idx = ops.get("gamma", none).nonzero().flatten()
    if idx.numel():
        image[idx] = _gamma(image[idx], _uniform(params.gamma_range, idx.numel(), device).to(image.dtype))
    return image, label
