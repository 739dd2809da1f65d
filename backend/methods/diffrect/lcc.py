"""DiffRect's Label Context Calibration module (LCC, paper section 2.2): colouring, guidance, B_sem.

* :func:`semantic_palette` / :class:`SemanticColoring`: the semantic colouring scheme (SCS, eq. 4), a map
  ``f: class -> RGB colour`` whose colours are as far apart from each other as possible.
* :func:`calibration_guidance`: the calibration guidance tau of eq. 6 (Dice of two hard label maps), and the
  alternatives of the paper's Table 5 (Jaccard, both, a fixed 0.5, a random value).
* :class:`SemanticContextEmbedding`: the block ``B_sem`` of eq. 5, which embeds a coloured label map (with the
  image's multi-scale features and the embedded tau) into a ``16 x 16 x 256`` latent for a ``256 x 256`` input.
* :class:`ImageEncoder`: the multi-scale image features that B_sem and the decoder are conditioned on.
"""
from __future__ import annotations

import functools
import itertools
import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from backend.methods.diffrect.dropout import FastDropout

# ---- the semantic colouring scheme (eq. 4) ---------------------------------------------------------------------

# Colours in [0, 1]^3 (RGB / 255) whose smallest pairwise distance is the largest possible for that many colours
# (the "spreading points in a cube" / maximin problem).  Class 0 (background) gets the colour nearest black.
#  C = 2: opposite corners, d = sqrt(3).  C = 3, 4: three / four corners no two of which share an edge (a regular
#  triangle / tetrahedron), d = sqrt(2); optimal because the squared distances of C points summed over all pairs
#  are at most 3 * floor(C^2 / 4) (per axis, C values in [0, 1] give at most floor(C^2 / 4) pairs at distance 1).
#  C = 5: d = sqrt(5) / 2, C = 6: d = 3 sqrt(2) / 4, C = 8: the cube's corners, d = 1 (Schaer 1966, "On the
#  densest packing of spheres in a cube", Canad. Math. Bull. 9).  C = 7: d = 1.0010013, the best known packing
#  (found by numerical maximin optimisation; no closed form is known), i.e. just above the d = 1 of 7 corners.
_OPTIMAL_PALETTES: dict[int, tuple[tuple[float, float, float], ...]] = {
    2: ((0, 0, 0), (1, 1, 1)),
    3: ((0, 0, 0), (1, 1, 0), (1, 0, 1)),
    4: ((0, 0, 0), (1, 1, 0), (1, 0, 1), (0, 1, 1)),
    5: ((0, 0, 0), (1, 1, 1), (0.5, 1, 0), (0, 0.5, 1), (1, 0, 0.5)),
    6: ((0, 0.25, 0), (1, 0.75, 1), (0, 1, 0.75), (0.25, 0, 1), (1, 0, 0.25), (0.75, 1, 0)),
    7: ((0.03165132814, 0.03165132814, 0), (0, 0, 1), (1, 1, 0.70079526233), (1, 0.285234574534, 0),
        (0.285234574534, 1, 0), (1, 0.044761737522, 1), (0.044761737522, 1, 1)),
    8: ((0, 0, 0), (1, 1, 1), (1, 0, 0), (0, 1, 0), (0, 0, 1), (0, 1, 1), (1, 0, 1), (1, 1, 0)),
}
GRID_LEVELS = 17  # per-axis levels of the grid the greedy colouring of C > 8 classes picks from (0, 16, ..., 255)


def _greedy_palette(num_classes: int) -> np.ndarray:
    """Greedy farthest-point colours for ``num_classes > 8``: the 8 cube corners (the optimal 8), then, one at a
    time, the grid colour farthest from every colour taken so far (ties: the first in grid order).  Integer
    arithmetic on 8-bit levels, so the result is the same on every machine.  Farthest-point selection keeps the
    smallest distance within a factor 2 of the optimum (Gonzalez 1985)."""
    levels = np.rint(np.arange(GRID_LEVELS) * 255.0 / (GRID_LEVELS - 1)).astype(np.int64)
    grid = np.array(list(itertools.product(levels, repeat=3)), dtype=np.int64)  # [G^3, 3]
    chosen = [np.array(c, dtype=np.int64) * 255 for c in _OPTIMAL_PALETTES[8]]
    nearest = np.min([((grid - c) ** 2).sum(1) for c in chosen], axis=0)
    while len(chosen) < num_classes:
        pick = grid[int(np.argmax(nearest))]
        chosen.append(pick)
        nearest = np.minimum(nearest, ((grid - pick) ** 2).sum(1))
    return np.stack(chosen).astype(np.float64) / 255.0


REFINE_MAX_CLASSES = 24  # above this, the greedy colours are kept as they are (refinement would take seconds)


def _min_sq_distance(points: np.ndarray) -> float:
    d = ((points[:, None] - points[None]) ** 2).sum(-1)
    d[np.diag_indices(len(points))] = np.inf
    return float(d.min())


def _refine_maximin(points: np.ndarray) -> np.ndarray:
    """Local maximin optimisation of colours in the unit cube: maximise s subject to ``|p_i - p_j|^2 >= s`` for
    every pair (SLSQP from ``points``).  Returns the better of the start and the result."""
    from scipy.optimize import minimize

    n = len(points)
    rows, cols = np.triu_indices(n, 1)
    pairs = np.arange(len(rows))

    def constraint(z: np.ndarray) -> np.ndarray:
        x = z[:-1].reshape(n, 3)
        return ((x[rows] - x[cols]) ** 2).sum(1) - z[-1]

    def constraint_jac(z: np.ndarray) -> np.ndarray:
        x = z[:-1].reshape(n, 3)
        grad = np.zeros((len(rows), 3 * n + 1))
        diff = 2.0 * (x[rows] - x[cols])
        for k in range(3):
            grad[pairs, 3 * rows + k] = diff[:, k]
            grad[pairs, 3 * cols + k] = -diff[:, k]
        grad[:, -1] = -1.0
        return grad

    start = np.append(points.ravel(), _min_sq_distance(points))
    result = minimize(lambda z: -z[-1], start, jac=lambda z: np.append(np.zeros(3 * n), -1.0), method="SLSQP",
                      constraints=[{"type": "ineq", "fun": constraint, "jac": constraint_jac}],
                      bounds=[(0.0, 1.0)] * (3 * n) + [(0.0, 3.0)], options={"maxiter": 500, "ftol": 1e-12})
    refined = np.clip(result.x[:-1].reshape(n, 3), 0.0, 1.0)
    return refined if _min_sq_distance(refined) > _min_sq_distance(points) else points


@functools.lru_cache(maxsize=None)
def _palette_array(num_classes: int) -> np.ndarray:
    if num_classes < 2:
        raise ValueError(f"the semantic colouring needs at least 2 classes (got {num_classes})")
    if num_classes in _OPTIMAL_PALETTES:
        return np.asarray(_OPTIMAL_PALETTES[num_classes], dtype=np.float64)
    points = _greedy_palette(num_classes)
    if num_classes <= REFINE_MAX_CLASSES:
        points = _refine_maximin(points)
    # background (class 0) gets the colour nearest black; the rest keep their order
    first = int(np.argmin((points ** 2).sum(1)))
    return np.concatenate([points[first:first + 1], np.delete(points, first, axis=0)])


def semantic_palette(num_classes: int) -> torch.Tensor:
    """The colour set ``M_C`` of eq. 4: ``[num_classes, 3]`` float RGB in [0, 1] (RGB / 255), row c = class c.

    For C <= 8 the colours are an optimal (maximin) packing of C points in the RGB cube (see the table above);
    for larger C, greedy farthest-point colours, locally optimised (SLSQP on the maximin problem) up to
    ``REFINE_MAX_CLASSES``.  The published code has fixed colours for 2 to 4 classes only
    (black plus primaries: a smallest distance of 1 for 4 classes, where sqrt(2) is possible).  Colours are kept
    as floats because some optimal packings need half levels (0.5 = 127.5 / 255)."""
    return torch.from_numpy(_palette_array(num_classes).copy()).float()


def min_pairwise_distance(colors: torch.Tensor) -> float:
    """Smallest Euclidean distance between two rows of ``colors`` ``[C, 3]``."""
    d = torch.cdist(colors.double(), colors.double())
    d.fill_diagonal_(math.inf)
    return float(d.min())


class SemanticColoring(nn.Module):
    """``labels [B, H, W] (int) -> m [B, 3, H, W]``: the SCS map f of eq. 4, one table look-up per pixel.

    The colour table is a persistent buffer, so a checkpoint carries the colours its B_sem was trained on."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.register_buffer("palette", semantic_palette(num_classes))

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if labels.dim() == 4:
            labels = labels[:, 0]
        return self.palette[labels.long()].permute(0, 3, 1, 2)


# ---- calibration guidance (eq. 6, Table 5) -----------------------------------------------------------------------

GUIDANCE_CHOICES = ("dice", "jaccard", "both", "fixed", "random", "none")
_SMOOTH = 1e-5


def _confusion(a: torch.Tensor, b: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-sample confusion counts ``[B, C, C]`` of two label maps ``[B, H, W]`` (one bincount, no one-hots)."""
    batch = a.shape[0]
    offsets = torch.arange(batch, device=a.device).view(-1, *([1] * (a.dim() - 1))) * num_classes * num_classes
    index = (offsets + a.long() * num_classes + b.long()).reshape(-1)
    counts = torch.bincount(index, minlength=batch * num_classes * num_classes)
    return counts.view(batch, num_classes, num_classes).double()


def label_overlap(a: torch.Tensor, b: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample Dice and Jaccard ``[B]`` of two hard label maps: the mean over all C classes (background
    included, as in the published code) of ``(2|A∩B| + s) / (|A| + |B| + s)`` and ``(|A∩B| + s) / (|A∪B| + s)``
    with ``s = 1e-5`` (a class absent from both maps scores 1)."""
    conf = _confusion(a, b, num_classes)
    inter = torch.diagonal(conf, dim1=1, dim2=2)
    size_a, size_b = conf.sum(2), conf.sum(1)
    dice = ((2 * inter + _SMOOTH) / (size_a + size_b + _SMOOTH)).mean(1)
    jaccard = ((inter + _SMOOTH) / (size_a + size_b - inter + _SMOOTH)).mean(1)
    return dice.float(), jaccard.float()


def calibration_guidance(a: torch.Tensor, b: torch.Tensor, num_classes: int, kind: str = "dice") -> torch.Tensor:
    """tau of eq. 6 for each sample ``[B]``: ``tau_u = Dice(y_s, y_w)``, ``tau_l = Dice(y_w, y_l)``.

    ``kind`` is one of the paper's guidance choices (Table 5): ``dice`` (the paper's), ``jaccard``, ``both``
    (Dice + Jaccard), ``fixed`` (0.5), ``random`` (uniform in [0, 1)); ``none`` gives 0 (the "w/o CG" ablation of
    Table 4, where the embedding is switched off).  The published code embeds the Dice *loss* (1 - Dice) of the
    whole batch; here each sample gets its own Dice, as eq. 6 writes it."""
    batch = a.shape[0]
    if kind == "fixed":
        return torch.full((batch,), 0.5, device=a.device)
    if kind == "random":
        return torch.rand(batch, device=a.device)
    if kind == "none":
        return torch.zeros(batch, device=a.device)
    dice, jaccard = label_overlap(a, b, num_classes)
    if kind == "dice":
        return dice
    if kind == "jaccard":
        return jaccard
    if kind == "both":
        return dice + jaccard
    raise ValueError(f"unknown calibration guidance '{kind}' (choices: {', '.join(GUIDANCE_CHOICES)})")


# ---- B_sem and the image encoder ---------------------------------------------------------------------------------


class ConvBlock(nn.Module):
    """Two (3x3 conv, BatchNorm, LeakyReLU); with ``emb_dim``, a projection of an embedding (tau or t) is added
    after the first (the DDPM way of conditioning a conv stage on a scalar), and ``dropout`` before the second."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        self.conv0 = nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch),
                                   nn.LeakyReLU(0.01, inplace=True))
        self.conv1 = nn.Sequential(FastDropout(dropout) if dropout > 0 else nn.Identity(),
                                   nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch),
                                   nn.LeakyReLU(0.01, inplace=True))
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_ch)) if emb_dim else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        x = self.conv0(x)
        if self.emb is not None and emb is not None:
            x = x + self.emb(emb)[:, :, None, None].to(x.dtype)
        return self.conv1(x)


def _dropouts(dropout: Sequence[float] | float, n: int) -> list[float]:
    if isinstance(dropout, (int, float)):
        return [float(dropout)] * n
    values = [float(d) for d in dropout]
    if len(values) != n:
        raise ValueError(f"need {n} dropout rates (got {len(values)})")
    return values


class ImageEncoder(nn.Module):
    """The image's multi-scale features ``[f_0 .. f_4]``: four (ConvBlock, 2x max-pool) stages and a last
    ConvBlock, with the channels of B_sem so that ``f_k`` can be added to B_sem's stage ``k``.

    The paper embeds "the multi-scale image feature" into the rectification model (section 3.1); the published
    code adds the features of such an image encoder to every stage of B_sem (and hence to the decoder's skips).
    It is not fed tau, so one pass serves every label map of the same image."""

    def __init__(self, in_channels: int, channels: Sequence[int], dropout: Sequence[float] | float = 0.0):
        super().__init__()
        channels = list(channels)
        drops = _dropouts(dropout, len(channels))
        ins = [in_channels] + channels[:-1]
        self.blocks = nn.ModuleList(ConvBlock(i, o, None, d) for i, o, d in zip(ins, channels, drops))

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        x = image
        for k, block in enumerate(self.blocks):
            if k > 0:
                x = F.max_pool2d(x, 2)
            x = block(x)
            feats.append(x)
        return feats


class SemanticContextEmbedding(nn.Module):
    """B_sem (eq. 5): a coloured label map ``m [B, 3, H, W]`` (with the image ``[B, C_in, H, W]`` concatenated,
    the image's multi-scale features added stage by stage, and the embedded calibration guidance tau added in
    every ConvBlock) to the latent ``z [B, 256, H/16, W/16]``.

    Four stages of (two 3x3 conv + BN + LeakyReLU, then 2x down-sampling) (section 3.1) with ``channels[:4]``
    features, then one more ConvBlock to ``channels[4]`` (256) at H/16: a 256 x 256 slice gives 16 x 16 x 256.
    Returns ``(z, skips)``: the four pre-pooling stage outputs are the skips of :class:`LabelDecoder`."""

    def __init__(self, in_channels: int, channels: Sequence[int] = (16, 32, 64, 128, 256), emb_dim: int = 512,
                 dropout: Sequence[float] | float = 0.0):
        super().__init__()
        channels = list(channels)
        if len(channels) != 5:
            raise ValueError("B_sem needs 5 channel counts: four stages and the latent")
        drops = _dropouts(dropout, 5)
        ins = [3 + in_channels] + channels[:-1]
        self.blocks = nn.ModuleList(ConvBlock(i, o, emb_dim, d) for i, o, d in zip(ins, channels, drops))
        self.latent_channels = channels[-1]

    def forward(self, colored: torch.Tensor, image: torch.Tensor, image_feats: Sequence[torch.Tensor],
                emb: torch.Tensor | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = torch.cat([image.to(colored.dtype), colored], dim=1)
        skips = []
        for k, block in enumerate(self.blocks):
            if k > 0:
                x = F.max_pool2d(x, 2)
            x = block(x, emb) + image_feats[k]
            if k < len(self.blocks) - 1:
                skips.append(x)
        return x, skips
