"""Unit tests of DiffRect's building blocks: colouring (eq. 4), guidance (eq. 6), B_sem (eq. 5), the latent
diffusion (eq. 1, 7, 9, 11, 12) and the weak / strong perturbations."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from backend.methods.diffrect.aug import gaussian_blur, strong_perturb, warp_image, warp_label, weak_grid, weak_perturb
from backend.methods.diffrect.lcc import (GUIDANCE_CHOICES, ImageEncoder, SemanticColoring, SemanticContextEmbedding,
                                       _palette_array, _refine_maximin, calibration_guidance, label_overlap,
                                       min_pairwise_distance, semantic_palette)
from backend.methods.diffrect.lfr import LabelDecoder, LatentDenoiser, latent_loss
from backend.methods.layers.diffusion import ddim_reverse, ddim_timesteps
from backend.methods.layers.diffusion import make_schedulers, q_sample
from backend.methods.layers.embeddings import SinusoidalEmbedding

# Largest possible smallest distance between C points of the unit cube (see backend.methods.diffrect.lcc):
# sqrt(3), sqrt(2), sqrt(2) (bound below), sqrt(5)/2 and 3 sqrt(2)/4 (Schaer 1966), 1.0010013 (best known), 1.
KNOWN_OPTIMUM = {2: math.sqrt(3), 3: math.sqrt(2), 4: math.sqrt(2), 5: math.sqrt(5) / 2, 6: 3 * math.sqrt(2) / 4,
                 7: 1.0010013, 8: 1.0}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---- semantic colouring scheme ---------------------------------------------------------------------------------

@pytest.mark.parametrize("num_classes", range(2, 9))
def test_palette_is_injective_and_maximally_separated(num_classes):
    colors = semantic_palette(num_classes)
    assert colors.shape == (num_classes, 3)
    assert float(colors.min()) >= 0.0 and float(colors.max()) <= 1.0
    assert len({tuple(c) for c in colors.tolist()}) == num_classes  # injective
    d = min_pairwise_distance(torch.from_numpy(_palette_array(num_classes)))
    assert d >= KNOWN_OPTIMUM[num_classes] - 1e-6
    # background is the colour nearest black
    assert int(torch.argmin((colors ** 2).sum(1))) == 0


@pytest.mark.parametrize("num_classes", [2, 3, 4])
def test_palette_meets_the_pair_sum_upper_bound(num_classes):
    # per axis, C values in [0, 1] have squared differences summing to at most floor(C^2 / 4) over all pairs,
    # so min d^2 <= 3 floor(C^2 / 4) / (C (C - 1) / 2): reached means optimal
    bound = math.sqrt(3 * (num_classes ** 2 // 4) / (num_classes * (num_classes - 1) / 2))
    assert min_pairwise_distance(semantic_palette(num_classes)) == pytest.approx(bound, abs=1e-6)


@pytest.mark.parametrize("num_classes", [5, 6, 7])
def test_palette_is_not_beaten_by_a_multistart_search(num_classes):
    rng = np.random.default_rng(num_classes)
    ours = min_pairwise_distance(torch.from_numpy(_palette_array(num_classes)))
    found = max(min_pairwise_distance(torch.from_numpy(_refine_maximin(rng.random((num_classes, 3)))))
                for _ in range(6))
    assert found <= ours + 1e-6


def test_palette_beyond_eight_classes():
    for num_classes in (9, 10, 12, 16, 30):
        colors = semantic_palette(num_classes)
        assert len({tuple(c) for c in colors.tolist()}) == num_classes
        assert min_pairwise_distance(colors) > 0.3
    assert min_pairwise_distance(semantic_palette(9)) == pytest.approx(math.sqrt(3) / 2, abs=5e-3)  # 8 corners + centre
    assert torch.equal(semantic_palette(12), semantic_palette(12))  # deterministic
    with pytest.raises(ValueError):
        semantic_palette(1)


def test_published_palette_is_worse_for_four_classes():
    published = torch.tensor([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.float64)
    assert min_pairwise_distance(published) == pytest.approx(1.0)
    assert min_pairwise_distance(semantic_palette(4)) > 1.4


def test_coloring_maps_every_pixel_and_is_invertible():
    coloring = SemanticColoring(5)
    labels = torch.randint(0, 5, (3, 17, 19))
    m = coloring(labels)
    assert m.shape == (3, 3, 17, 19)
    assert torch.equal(m[1, :, 4, 7], coloring.palette[labels[1, 4, 7]])
    decoded = torch.cdist(m.permute(0, 2, 3, 1).reshape(-1, 3), coloring.palette).argmin(1).view(3, 17, 19)
    assert torch.equal(decoded, labels)
    assert "palette" in coloring.state_dict()


# ---- calibration guidance ------------------------------------------------------------------------------------

def test_dice_and_jaccard_by_hand():
    a = torch.zeros(2, 4, 4, dtype=torch.long)
    b = torch.zeros(2, 4, 4, dtype=torch.long)
    a[0, :2] = 1  # 8 pixels of class 1
    b[0, :1] = 1  # 4 of them
    a[1], b[1] = 2, 2  # identical maps
    dice, jac = label_overlap(a, b, 3)
    s = 1e-5
    d_bg = (2 * 8 + s) / (8 + 12 + s)
    d_1 = (2 * 4 + s) / (8 + 4 + s)
    assert float(dice[0]) == pytest.approx((d_bg + d_1 + 1.0) / 3, rel=1e-5)
    j_bg = (8 + s) / (12 + s)
    j_1 = (4 + s) / (8 + s)
    assert float(jac[0]) == pytest.approx((j_bg + j_1 + 1.0) / 3, rel=1e-5)
    assert float(dice[1]) == pytest.approx(1.0) and float(jac[1]) == pytest.approx(1.0)


def test_guidance_choices():
    a = torch.randint(0, 3, (4, 8, 8))
    b = torch.randint(0, 3, (4, 8, 8))
    dice, jac = label_overlap(a, b, 3)
    assert torch.allclose(calibration_guidance(a, b, 3, "dice"), dice)
    assert torch.allclose(calibration_guidance(a, b, 3, "jaccard"), jac)
    assert torch.allclose(calibration_guidance(a, b, 3, "both"), dice + jac)
    assert torch.equal(calibration_guidance(a, b, 3, "fixed"), torch.full((4,), 0.5))
    rnd = calibration_guidance(a, b, 3, "random")
    assert rnd.shape == (4,) and float(rnd.min()) >= 0 and float(rnd.max()) < 1
    assert torch.equal(calibration_guidance(a, b, 3, "none"), torch.zeros(4))
    assert set(GUIDANCE_CHOICES) == {"dice", "jaccard", "both", "fixed", "random", "none"}
    with pytest.raises(ValueError):
        calibration_guidance(a, b, 3, "hausdorff")


def test_tau_embedding_separates_values():
    emb = SinusoidalEmbedding(128, 512, scale=999.0)
    taus = torch.tensor([0.5, 0.51, 0.9, 0.5])
    e = emb(taus)
    assert e.shape == (4, 512)
    assert torch.allclose(e[0], e[3])
    assert not torch.allclose(e[0], e[1], atol=1e-4)
    assert not torch.allclose(e[0], e[2], atol=1e-4)


# ---- B_sem and LFR nets ----------------------------------------------------------------------------------------

def test_bsem_latent_is_16x16x256_for_256_input():
    torch.manual_seed(0)
    channels = (16, 32, 64, 128, 256)
    encoder = ImageEncoder(1, channels)
    bsem = SemanticContextEmbedding(1, channels, emb_dim=512)
    image = torch.randn(1, 1, 256, 256)
    colored = SemanticColoring(4)(torch.randint(0, 4, (1, 256, 256)))
    emb = SinusoidalEmbedding(128, 512, scale=999.0)(torch.tensor([0.7]))
    with torch.no_grad():
        z, skips = bsem(colored, image, encoder(image), emb)
        z_other, _ = bsem(colored, image, encoder(image), SinusoidalEmbedding(128, 512)(torch.tensor([0.1])))
    assert z.shape == (1, 256, 16, 16)
    assert [tuple(s.shape[1:]) for s in skips] == [(16, 256, 256), (32, 128, 128), (64, 64, 64), (128, 32, 32)]
    assert not torch.allclose(z, z_other)  # tau changes the latent
    decoder = LabelDecoder(4, channels, emb_dim=512)
    with torch.no_grad():
        assert decoder(z, skips, emb).shape == (1, 4, 256, 256)


def test_denoiser_shapes_and_conditioning():
    torch.manual_seed(0)
    net = LatentDenoiser(32, (48, 64), emb_dim=32, emb_hidden=64).eval()
    z_t, cond = torch.randn(2, 32, 8, 8), torch.randn(2, 32, 8, 8)
    t = torch.tensor([0, 9])
    with torch.no_grad():
        out = net(z_t, t, cond)
        assert out.shape == z_t.shape
        assert not torch.allclose(out, net(z_t, t, torch.randn_like(cond)))  # the condition matters
        assert not torch.allclose(out, net(z_t, torch.tensor([5, 5]), cond))  # so does t


# ---- diffusion closed forms -------------------------------------------------------------------------------------

def _cosine_alpha_bar(T: int, s: float = 8e-3) -> list[float]:
    """Nichol & Dhariwal's cosine schedule by hand: f(t) = cos^2(((t / T) + s) / (1 + s) * pi / 2),
    beta_t = min(1 - f(t + 1) / f(t), 0.999), abar_t = prod (1 - beta_i)."""
    f = [math.cos(((t / T) + s) / (1 + s) * math.pi / 2) ** 2 for t in range(T + 1)]
    abar, prod = [], 1.0
    for t in range(T):
        beta = min(1 - f[t + 1] / f[t], 0.999)
        prod *= 1 - beta
        abar.append(prod)
    return abar


def test_q_sample_matches_the_closed_form():
    ddpm, _ = make_schedulers(10, "cosine")
    abar = _cosine_alpha_bar(10)
    assert torch.allclose(ddpm.alphas_cumprod.double(), torch.tensor(abar, dtype=torch.float64), atol=1e-6)
    x0 = torch.randn(4, 3, 2, 2)
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 3, 7, 9])
    out = q_sample(ddpm, x0, t, noise)
    for i, ti in enumerate(t.tolist()):
        expected = math.sqrt(abar[ti]) * x0[i] + math.sqrt(1 - abar[ti]) * noise[i]
        assert torch.allclose(out[i], expected, atol=1e-5)
    assert abar[-1] < 1e-4  # t = T - 1 is (almost) pure noise


def test_ddim_reverse_matches_the_closed_form():
    abar = _cosine_alpha_bar(10)
    ddpm, _ = make_schedulers(10, "cosine")
    assert ddim_timesteps(10, 2) == [9, 0]
    assert ddim_timesteps(10, 10) == list(range(9, -1, -1))
    seen = []

    def predict(x, t):
        seen.append(t.tolist())
        return 0.5 * x + 0.1 * t.float().view(-1, 1, 1, 1)

    x_T = torch.randn(2, 3, 4, 4)
    out = ddim_reverse(ddpm.alphas_cumprod, predict, x_T, [9, 0])
    assert seen == [[9, 9], [0, 0]]
    # by hand: x0 = 0.5 x_9 + 0.9, eps = (x_9 - sqrt(a9) x0) / sqrt(1 - a9), x_0 = sqrt(a0) x0 + sqrt(1 - a0) eps,
    # output = the prediction at t = 0
    a9, a0 = abar[9], abar[0]
    x0 = 0.5 * x_T + 0.9
    eps = (x_T - math.sqrt(a9) * x0) / math.sqrt(1 - a9)
    x_prev = math.sqrt(a0) * x0 + math.sqrt(1 - a0) * eps
    assert torch.allclose(out, 0.5 * x_prev, atol=1e-5)

    # eta = 1: the stochastic step adds sigma n with sigma^2 = (1 - a0) / (1 - a9) * (1 - a9 / a0)
    gen = torch.Generator().manual_seed(3)
    out_eta = ddim_reverse(ddpm.alphas_cumprod, predict, x_T, [9, 0], eta=1.0, generator=gen)
    noise = torch.randn(x_T.shape, generator=torch.Generator().manual_seed(3))
    sigma = math.sqrt((1 - a0) / (1 - a9) * (1 - a9 / a0))
    x_prev = math.sqrt(a0) * x0 + math.sqrt(max(1 - a0 - sigma ** 2, 0.0)) * eps + sigma * noise
    assert torch.allclose(out_eta, 0.5 * x_prev, atol=1e-5)


def test_latent_losses_vanish_at_the_target():
    z = torch.randn(3, 8, 4, 4)
    assert float(latent_loss(z, z.clone())) == 0.0  # eq. 9 / 11
    assert float(latent_loss(z + 1.0, z)) == pytest.approx(1.0)


# ---- perturbations -----------------------------------------------------------------------------------------------

def test_flips_are_exact_and_labels_follow_images():
    torch.manual_seed(0)
    labels = torch.randint(0, 4, (8, 1, 16, 20))
    image = labels.float()
    grid = weak_grid(8, 16, 20, torch.device("cpu"), flip_p=0.5, rotate_p=0.0)
    warped_img = warp_image(image, grid)
    warped_lab = warp_label(labels, grid)
    assert torch.allclose(warped_img, warped_lab.float(), atol=1e-4)  # bilinear on pixel centres = exact
    # each sample is one of the four flips of the original
    for i in range(8):
        options = [labels[i], labels[i].flip(-1), labels[i].flip(-2), labels[i].flip(-1).flip(-2)]
        assert any(torch.equal(warped_lab[i], o) for o in options)


def test_rotation_keeps_image_and_label_aligned():
    torch.manual_seed(1)
    labels = torch.zeros(6, 1, 32, 32, dtype=torch.long)
    labels[:, :, 8:24, 10:20] = 1
    labels[:, :, 12:16, 12:16] = 2
    image = labels.float() + 5.0  # background 5, outside filled with the minimum (5)
    out_img, out_lab = weak_perturb(image, labels, flip_p=0.5, rotate_p=1.0)
    assert out_img.shape == image.shape and out_lab.shape == labels.shape
    assert set(out_lab.unique().tolist()) <= {0, 1, 2}
    agree = (out_img.round() - 5.0 == out_lab.float()).float().mean()
    assert float(agree) > 0.95  # disagreement only on interpolated boundaries
    assert float(out_img.min()) >= 5.0 - 1e-4
    assert not torch.equal(out_lab, labels)


def test_weak_perturb_only_first_labels():
    torch.manual_seed(0)
    image = torch.randn(5, 1, 8, 8)
    labels = (image[:2, 0] > 0).long()  # the labels of the first two images
    out_img, out_lab = weak_perturb(image, labels, flip_p=1.0, rotate_p=0.0)  # both flips: a half turn
    assert torch.allclose(out_img, image.flip(-1, -2), atol=1e-5)
    assert torch.equal(out_lab, labels.flip(-1, -2))
    for _ in range(4):  # random flips (pixel centres onto pixel centres): each label moves with its own image
        out_img, out_lab = weak_perturb(image, labels, rotate_p=0.0)
        assert torch.equal(out_lab, (out_img[:2, 0] > 0).long())


def test_strong_perturbation():
    torch.manual_seed(0)
    x = torch.randn(4, 1, 24, 24)
    assert torch.allclose(strong_perturb(x, enhance_p=0.0, blur_p=0.0), x, atol=1e-6)  # nothing switched on
    s1 = strong_perturb(x, deterministic=True)
    assert torch.equal(s1, strong_perturb(x, deterministic=True))
    assert s1.shape == x.shape and not torch.allclose(s1, x, atol=1e-3)
    assert float(s1.std()) < float(x.std()) * 1.1  # blur with sigma 1 smooths white noise
    assert torch.isfinite(strong_perturb(x)).all()


def test_gaussian_blur_per_sample_sigma():
    x = torch.randn(3, 2, 16, 16)
    out = gaussian_blur(x, torch.tensor([0.0, 1.0, 2.0]), radius=6)
    assert torch.allclose(out[0], x[0], atol=1e-6)  # sigma 0: unchanged
    assert float(out[2].std()) < float(out[1].std()) < float(x[1].std())
    const = torch.full((1, 1, 9, 9), 3.0)
    assert torch.allclose(gaussian_blur(const, torch.tensor([1.5]), radius=4), const, atol=1e-5)


def test_colours_are_precomputed_buffers():
    coloring = SemanticColoring(3)
    ids = {id(coloring.palette)}
    coloring(torch.zeros(1, 4, 4, dtype=torch.long))
    assert {id(coloring.palette)} == ids  # the table is built once, not per call
    assert isinstance(coloring.palette, torch.Tensor) and not coloring.palette.requires_grad


# ---- speed helpers: fast dropout, BatchNorm folding --------------------------------------------------------------

def test_fast_dropout_is_unbiased_dropout():
    from backend.methods.diffrect.dropout import FastDropout, use_fast_dropout

    torch.manual_seed(0)
    drop = FastDropout(0.3)
    x = torch.ones(4, 8, 64, 64)
    out = drop(x)
    dropped = float((out == 0).float().mean())
    assert dropped == pytest.approx(0.3, abs=0.01)
    assert float(out.mean()) == pytest.approx(1.0, abs=0.02)  # kept elements scaled by 1 / (1 - p)
    values = torch.unique(out).tolist()
    assert len(values) == 2 and values[0] == 0.0 and values[1] == pytest.approx(1 / (1 - drop.threshold / 65536))
    cl = drop(x.contiguous(memory_format=torch.channels_last))
    assert cl.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(drop.eval()(x), x)
    assert torch.equal(FastDropout(0.0).train()(x), x)
    net = use_fast_dropout(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Dropout(0.2)))
    assert isinstance(net[1], FastDropout) and net[1].p == 0.2


def test_batchnorm_folding_keeps_the_function():
    from backend.methods.diffrect.fuse import fused_for_inference
    from backend.methods.diffrect.model import Rectifier
    from backend.methods.layers.unet2d import unet2d

    torch.manual_seed(0)
    seg = unet2d(1, 3, features=(8, 8, 16, 16, 32, 8))
    rect = Rectifier(3, 1, bsem_channels=(8, 8, 16, 16, 32), denoiser_channels=(48, 64), emb_dim=32, emb_hidden=64)
    x = torch.randn(2, 1, 64, 64)
    for module in (seg, rect):  # give BatchNorm non-trivial running statistics
        module.train()
        with torch.no_grad():
            if module is seg:
                module(x)
            else:
                feats = module.image_encoder(x)
                module.encode(torch.randint(0, 3, (2, 64, 64)), x, feats, module.embed_tau(torch.rand(2)))
        module.eval()
    fused_seg, fused_rect = fused_for_inference(seg), fused_for_inference(rect)
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in fused_seg.modules())
    assert n_bn == 0
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in seg.modules()) > 0  # the original is untouched
    with torch.no_grad():
        assert torch.allclose(fused_seg(x), seg(x), atol=1e-4)
        labels = torch.randint(0, 3, (2, 64, 64))
        emb = rect.embed_tau(torch.tensor([0.3, 0.8]))
        z, skips = rect.encode(labels, x, rect.image_encoder(x), emb)
        z_f, skips_f = fused_rect.encode(labels, x, fused_rect.image_encoder(x), emb)
        assert torch.allclose(z, z_f, atol=1e-4)
        t = torch.tensor([3, 7])
        assert torch.allclose(rect.denoiser(z, t, z), fused_rect.denoiser(z, t, z), atol=1e-4)
        assert torch.allclose(rect.decoder(z, skips, emb), fused_rect.decoder(z_f, skips_f, emb), atol=1e-4)


def test_rectify_decodes_the_clamped_reverse_process(monkeypatch):
    """Eq. 12: y_r = Upsample(r_0), r_0 from pure noise by DDIM steps conditioned on z_w, every x0 prediction
    clamped to [-1, 1] (the published sampler's clip_denoised)."""
    from backend.methods.diffrect.model import Rectifier

    torch.manual_seed(0)
    rect = Rectifier(3, 1, bsem_channels=(8, 8, 16, 16, 32), denoiser_channels=(48, 64), emb_dim=32,
                     emb_hidden=64).eval()
    ddpm, _ = make_schedulers(10, "cosine")
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        emb = rect.embed_tau(torch.tensor([0.6, 0.6]))
        z, skips = rect.encode(torch.randint(0, 3, (2, 64, 64)), x, rect.image_encoder(x), emb)
        conds = []

        def denoiser(z_t, t, cond):
            conds.append(cond)
            return 3.0 * z_t + cond  # predictions well outside [-1, 1]

        monkeypatch.setattr(rect.denoiser, "forward", denoiser)
        decoder, latents = rect.decoder, []

        class Recorder(torch.nn.Module):
            def forward(self, latent, skips_, emb_):
                latents.append(latent)
                return decoder(latent, skips_, emb_)

        monkeypatch.setattr(rect, "decoder", Recorder())
        noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(5))
        for clamp in (1.0, None):
            out = rect.rectify(z, skips, emb, ddpm.alphas_cumprod, [9, 0], generator=torch.Generator().manual_seed(5),
                               clamp=clamp)
            predict = (lambda a, t: (3.0 * a + z).clamp(-1, 1)) if clamp else (lambda a, t: 3.0 * a + z)
            feature = ddim_reverse(ddpm.alphas_cumprod, predict, noise, [9, 0])
            assert torch.allclose(latents[-1], feature, atol=1e-5)  # the decoder gets r_0 ...
            assert torch.allclose(out, decoder(feature, skips, emb), atol=1e-5)  # ... with the condition's skips
            assert (float(feature.abs().max()) <= 1.0) == (clamp is not None)
        assert len(conds) == 4 and all(c is z for c in conds)  # conditioned on the given latent
