"""A&D / GenericSSL: Aggregating & Decoupling (Wang & Li, "Towards Generic Semi-Supervised Framework for Volumetric
Medical Image Segmentation", NeurIPS 2023), a 3D method.

One training iteration (Algorithm 1):

1. EMA transfer ``theta = 0.99 theta + 0.01 (xi + psi) / 2`` (sec. 3.3; done first, as in the published code);
2. SVDA on the labeled and unlabeled batches (:mod:`backend.nets.genericssl_svda`);
3. noisy label ``y_t`` of the one-hot label (eq. 1); ``L_deno`` on ``D(xi)`` (eq. 2);
4. DRS weights from ``D(xi)``'s per-class Dice (eq. 3-5) and ``L_diff`` on ``D(psi)`` (eq. 6);
5. the domain-unbiased map by DDIM (10 steps, x0-prediction) and the class-unbiased map ``D(psi)`` on the
   unlabeled batch, combined by Reparameterize & Smooth into the pseudo label (eq. 7);
6. ``L_u`` on ``D(theta)`` (eq. 8); ``L = L_deno + L_diff + mu(t) L_u`` (eq. 9, mu = 10 with a Gaussian ramp-up).

Speed and memory, at the same mathematics as the published implementation:

* the DDIM loop runs without autograd; the image half of the diffusion stem's convolution is computed once per
  batch and reused by all steps (:meth:`backend.nets.diffvnet.DiffVNet.diffusion_context`) -- nothing deeper is
  step-invariant, since every encoder stage adds the embedding of ``t`` and the stem mixes ``y_t`` in before
  its norm and ReLU;
* ``D(psi)``'s class-unbiased map of the unlabeled batch is decoded (without gradient) from the same encoder pass
  that trains ``D(theta)``, instead of a second encoder pass over the same input;
* each of the three flows is back-propagated as soon as its loss is known (``L_deno``, then ``L_diff``, then
  ``mu L_u``), so only one flow's autograd graph is alive at a time; gradients add up, so the update is the same
  as one backward of eq. 9 (``split_backward``, on by default);
* on CPU, batch-1 3x3x3 convolutions go to oneDNN instead of PyTorch's slow im2col path
  (:func:`backend.nets.diffvnet.prefer_onednn`), and on CPUs with native bfloat16 the gradient-free DDIM loop
  runs under bf16 autocast (``cpu_bf16_sampling``; the published code samples under fp16 autocast on GPU);
  ``cpu_amp`` (opt-in) extends bf16 autocast to the whole step and inference.

Paper presets (``la``, ``synapse``, ``mmwhs``, ``mms``): Table 8's patch, learning rate and F, and the published
runs' lengths (``_OfficialRun``: ``train.sh -n 300`` runs 301 epochs of ``len(split) // batch`` iterations --
LASeg 5 % 5719, Synapse 20 % 2408, MMWHS 2408, M&Ms to-A 2 % 33110), mu ramped over 300 epochs (M&Ms: 100,
``-cr 100``), validation every epoch as published, so that the engine's ``best.pt`` is the published
``best_model.pth``.  ``rampup_steps`` is a run-length field: ``--steps`` shortens the ramp-up with the run.
LASeg infers with the published sliding-window strides (16 in-plane, 4 along z, ``sw_overlap`` per axis).

Remaining differences from the published code or the paper, each with its reason:

* Network, where the shared V-Net blocks decide: conv-norm-ReLU stages that add the time embedding once per stage
  (the published blocks are conv-ReLU-norm-dropout(0.1) with the embedding added after most convolutions), hence
  55.4 M parameters for LASeg instead of 57.9 M.  DDIM visits the published respaced timesteps (999, 888, ..., 0;
  :func:`backend.nets.diffusion.ddim_timesteps`).
* Loss scale: ``L_DiceCE`` is the published ``CE + Dice``; the paper writes ``(CE + Dice) / 2`` (eq. 2), which
  ``lambda_ce = lambda_dice = 0.5`` gives.  MONAI's Dice loss (``1 - Dice``, smoothing 1e-5) stands for the
  published ``-Dice`` (smoothing 1): same gradients up to the smoothing.
* Schedules per iteration, not per epoch: the published code sets the poly learning rate and mu once per epoch
  (one epoch late: epoch ``e`` trains with the values of ``e - 1``); here both follow the iteration count, the
  ramp-up spanning ``rampup_epochs x iterations`` steps.  The largest difference is one epoch's worth of ramp-up.
* Early stopping: the published runs stop after 50 (LASeg), 100 (Synapse, MMWHS) or 80 (M&Ms) epochs without a
  better validation Dice; here the run goes to its end and ``best.pt`` keeps the best weights -- the same model,
  at the cost of the remaining epochs.  Stop the job by hand to save them.
* Validation: the published code scores ``D(theta)`` on one centre-cropped patch of each validation case (LASeg
  and M&Ms: the labeled cases; Synapse and MMWHS: a separate split); the engine scores whole volumes by sliding
  windows on its own validation cases (the labeled ones, as the paper presets hold none out).
* Batch: Synapse uses batch 2, the published ``config.py``'s, against Table 8's 4, because the published runs --
  whose length the preset copies -- were made with it.  Learning rates are Table 8's (the README's single command
  line shows ``-l 1e-2`` as an example).
* The ``mms`` preset's length is the to-A, 2 % setting's (440 unlabeled volumes); the other M&Ms settings have
  other split sizes: their run is ``--steps 301 * (N_unlabeled // 4)``.
* Preprocessing: the published loaders min-max the intensities to [0, 1] after a clip (Synapse: [-75, 275] HU,
  set here as ``intensity_window``; M&Ms: the 0.5-99.5 percentiles, MMWHS: [0, 98th percentile] then z-score);
  the engine z-scores MR and windows CT, an affine change of the input.  The published preprocessing also resizes
  every case to a fixed shape (Synapse 80x160x160; MMWHS 144^3 after a crop around the labeled heart; M&Ms
  32x144x144 after a crop), which is not a voxel spacing (the grid differs per case), so ``target_spacing``
  stays None; LASeg's data are used as distributed (0.625 mm, cropped, by UA-MT).  To reproduce Synapse,
  MMWHS and M&Ms exactly, import the published preprocessed volumes (``bench/reproduce.md``).
* Sliding-window inference blends windows with Gaussian weights (MONAI), the published code averages them
  uniformly; Synapse, MMWHS and M&Ms keep overlap 0.5 because the published strides (16, 4) were meant for the
  resized volumes and on native grids mean thousands of windows per case.
* Pseudo labels: ``D(psi)``'s class-unbiased map of the unlabeled batch is decoded from the encoder pass that
  trains ``D(theta)`` (see above), so the two share one bottleneck-dropout draw, where the published code runs a
  second forward pass with its own draw.
* SVDA runs batched on the device, with axial-plane rotation, one affine resampling for rotation and scaling
  and a fixed operation order (the published batchgenerators pipeline is per-sample numpy on the CPU); the
  ranges are the published ones (:mod:`backend.nets.genericssl_svda` lists each choice).
* DRS keeps the published running averages (``drs_mode = "ema"``); ``"window"`` is the exact last-``tau`` sums
  of eq. 3 (:class:`backend.nets.genericssl_losses.DifficultyWeights`).
* Mixed precision: CUDA autocast (bf16 where supported, else fp16 with a grad scaler) where the published code
  uses fp16 throughout; CPU runs are fp32 unless ``cpu_amp``.

Views for review: the two terms of eq. 7 and their sum, computed the way the training targets are
(``review_mode = "train"``: norms on batch statistics, their running statistics left alone, and dropout on, as in
the published training loop): ``diffusion`` (argmax of ``Smooth(GumbelSoftmax(p^{u;xi}))``, the DDIM map of
``D(xi)``: domain-unbiased), ``difficulty`` (argmax of ``Softmax(p^{u;psi})``: class-unbiased) and ``combined``
(argmax of their sum: the RS pseudo label of eq. 7 that trains ``D(theta)``), one Gumbel draw for both, each map
blended across sliding windows before the argmax (training makes them per patch).  The published code has no
review views.  ``primary_view`` is ``combined``; :meth:`GenericSSL.predict` returns the paper's inference path
instead, ``D(theta)`` on the shared encoder ("only the diffusion encoder and D(theta) are used to generate the
predictions", sec. 3.3), which is the network the pseudo labels train.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, ClassVar, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from backend.methods.base import BaseConfig, Method, argmax_uint8
from backend.methods.rampups import gaussian_warmup
from backend.nets.diffusion import ddim_sample, make_schedulers, q_sample, sample_timesteps, to_signed
from backend.nets.diffvnet import DiffVNet, ema_transfer
from backend.nets.genericssl_losses import DifficultyWeights, dice_ce, hard_dice
from backend.nets.genericssl_rs import rs_pseudo_label, rs_terms
from backend.nets.genericssl_svda import SVDAParams, svda


@dataclasses.dataclass(frozen=True)
class _OfficialRun:
    """The length of a published training run (xmed-lab/GenericSSL ``train_diffusion.py`` run by ``train.sh`` with
    the README's ``-n 300``): ``for epoch in range(max_epoch + 1)`` -- 301 epochs -- of ``iterations`` batches each
    (the shorter of the zipped labeled / unlabeled loaders: ``len(unlabeled split) // batch`` with ``drop_last``,
    the labeled split for MMWHS), mu ramped up over ``rampup_epochs`` epochs."""

    iterations: int  # per epoch
    rampup_epochs: int = 300
    epochs: int = 300  # -n (max_epoch)

    @property
    def steps(self) -> int:
        return (self.epochs + 1) * self.iterations

    @property
    def rampup_steps(self) -> int:
        return self.rampup_epochs * self.iterations


_LA = _OfficialRun(iterations=76 // 4)  # la_0.05: unlabeled_0.05.txt holds 76 cases, batch 4 (la_0.1: 72 // 4)
_SYNAPSE = _OfficialRun(iterations=16 // 2)  # synapse_0.2: unlabeled_0.2.txt holds 16 cases, batch 2 (config.py)
_MMWHS = _OfficialRun(iterations=16 // 2)  # mmwhs_ct2mr / mr2ct: the labeled split (16 cases) sets the length
_MMS = _OfficialRun(iterations=440 // 4, rampup_epochs=100)  # mnms_A_0.02: 440 unlabeled volumes; -cr 100


def _official(run: _OfficialRun) -> dict[str, Any]:
    """Preset fields of a published run: its length, ramp-up and the validation cadence (every epoch)."""
    return {"max_steps": run.steps, "rampup_steps": run.rampup_steps, "val_every": run.iterations}


def _overlap(patch: tuple[int, int, int], stride: tuple[int, int, int]) -> tuple[float, float, float]:
    """MONAI's per-axis sliding-window overlap for the published strides (test.py: 16 in-plane, 4 along z)."""
    return tuple((p - s) / p for p, s in zip(patch, stride))


@dataclasses.dataclass
class GenericSSLConfig(BaseConfig):
    """A&D hyper-parameters.  Defaults: the paper's (LASeg row of Table 8 for patch/lr/batch), and the published
    code's where the paper is silent.  ``patch_size`` is ``(D, H, W)``: the paper's 112x112x80 (x, y, z) for
    LASeg is ``(80, 112, 112)`` here."""

    # data / optimisation (Table 8, LASeg; sec. 4.1: SGD, Nesterov, momentum 0.9, poly decay)
    patch_size: tuple[int, ...] = (80, 112, 112)
    batch_labeled: int = 4
    batch_unlabeled: int = 4
    lr: float = 1e-2
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 3e-5  # published code
    # Diff-VNet
    features: int = 32  # F (Table 8)
    norm: str = "batch"  # published code
    time_embed_dim: int = 128  # sinusoidal size, lifted to emb_dim by Linear-SiLU-Linear (published code)
    emb_dim: int = 512
    encoder_dropout: float = 0.5  # on the deepest encoder feature (published code: has_dropout)
    decoder_dropout: float = 0.5  # before each decoder's output convolution
    # diffusion (published code: T = 1000 linear betas, x0-prediction, DDIM 10 steps, x0 clipped to [-1, 1])
    diffusion_steps: int = 1000
    beta_schedule: str = "linear_beta"
    ddim_steps: int = 10
    clip_x0: bool = True
    # SVDA (sec. 3.2: N_aug = 3; published ranges, defined once in SVDAParams)
    svda: bool = True
    n_aug: int = SVDAParams.n_aug
    aug_prob: float = SVDAParams.p
    rotation_deg: float = SVDAParams.rotation_deg
    scale_range: tuple[float, float] = SVDAParams.scale_range
    blur_sigma: tuple[float, float] = SVDAParams.blur_sigma
    brightness_range: tuple[float, float] = SVDAParams.brightness_range
    contrast_range: tuple[float, float] = SVDAParams.contrast_range
    gamma_range: tuple[float, float] = SVDAParams.gamma_range
    # losses: L_DiceCE = lambda_ce CE + lambda_dice Dice: the published code's CE + Dice by default; 0.5 and 0.5
    # give the paper's (CE + Dice) / 2 of eq. 2.  DRS (eq. 3-6); total (eq. 9)
    lambda_ce: float = 1.0
    lambda_dice: float = 1.0
    dice_include_background: bool = False  # published code: Dice over foreground classes
    drs_tau: int = 50
    drs_alpha: float = 0.2  # 1/5
    drs_mode: str = "ema"  # "ema": the published running average over ~tau iterations; "window": exact sums
    drs_absent_dice: float = 0.5  # Dice of a class absent from prediction and label (published SoftDiceLoss: 1/2)
    mu: float = 10.0
    # Gaussian ramp-up length of mu (eq. 9), in iterations: the published run ramps over all its 300 epochs (M&Ms:
    # 100, train.sh -cr 100); a run-length field, so --steps scales it with max_steps
    rampup_steps: int = _LA.epochs * _LA.iterations
    # RS (eq. 7) and EMA transfer
    gumbel_tau: float = 1.0
    smooth_kernel: int = 3
    smooth_sigma: float = 1.0
    ema_w: float = 0.99
    # review views: "train" computes them as the training targets are made (norms on batch statistics, without
    # updating the running ones, and dropout on), "eval" with the networks in eval mode
    review_mode: str = "train"
    # implementation
    split_backward: bool = True  # back-propagate each flow's loss on its own (same gradients, 1/3 of the graphs)
    cpu_bf16_sampling: bool = True  # DDIM sampling under bfloat16 autocast on CPUs with native bf16 (with amp)
    cpu_amp: bool = False  # opt-in: bf16 autocast for the whole step and inference on CPUs with native bf16
    # the run length (LASeg 5 %: 301 epochs of 19 iterations, see _OfficialRun) and the validation cadence (the
    # published code validates every epoch and keeps the best model; the engine keeps best.pt)
    max_steps: int = _LA.steps
    val_every: int = _LA.iterations

    run_length_fields: ClassVar[tuple[str, ...]] = ("rampup_steps",)


_PRESETS: dict[str, dict[str, Any]] = {
    # Table 8 (patch sizes in (D, H, W) = (z, y, x) order) and the published runs' lengths; like the paper, train
    # on every labeled case.  Preprocessing: see the module docstring ("Paper presets").
    "la": {"num_classes": 2, "patch_size": (80, 112, 112), "lr": 1e-2, "batch_labeled": 4, "batch_unlabeled": 4,
           "hold_out_from": None, "sw_overlap": _overlap((80, 112, 112), (4, 16, 16)), **_official(_LA)},
    # batch 2: the published config.py (Table 8 prints 4); CT window [-75, 275] HU as the published data loader
    "synapse": {"num_classes": 14, "patch_size": (64, 128, 128), "lr": 3e-2, "batch_labeled": 2,
                "batch_unlabeled": 2, "hold_out_from": None, "intensity_window": (-75.0, 275.0),
                **_official(_SYNAPSE)},
    "mmwhs": {"num_classes": 5, "patch_size": (128, 128, 128), "lr": 5e-3, "batch_labeled": 2,
              "batch_unlabeled": 2, "hold_out_from": None, **_official(_MMWHS)},
    "mms": {"num_classes": 4, "patch_size": (32, 128, 128), "lr": 1e-2, "batch_labeled": 4, "batch_unlabeled": 4,
            "hold_out_from": None, **_official(_MMS)},
    # a few CPU minutes on a small project (~2 s per step on one core, 200 steps)
    "quick": {"features": 8, "patch_size": (32, 64, 64), "batch_labeled": 1, "batch_unlabeled": 1,
              "time_embed_dim": 32, "emb_dim": 128, "ddim_steps": 5, "drs_tau": 20, "max_steps": 200,
              "rampup_steps": 100, "checkpoint_every": 100, "val_every": 50, "sw_batch_size": 2},
    # unit / learning tests
    "tiny": {"features": 8, "patch_size": (32, 32, 32), "batch_labeled": 1, "batch_unlabeled": 1, "lr": 3e-2,
             "time_embed_dim": 16, "emb_dim": 32, "ddim_steps": 3, "drs_tau": 10, "max_steps": 100,
             "rampup_steps": 40, "encoder_dropout": 0.0, "decoder_dropout": 0.1, "checkpoint_every": 50,
             "val_every": 50, "sw_batch_size": 4},
}


class GenericSSL(Method):
    """A&D (Aggregating & Decoupling) on a Diff-VNet; see the module docstring."""

    name = "genericssl"
    dims = 3
    config_class = GenericSSLConfig
    presets = _PRESETS
    views = ("diffusion", "difficulty", "combined")
    primary_view = "combined"

    def __init__(self, config: GenericSSLConfig, device: torch.device | str = "cpu"):
        if config.rampup_steps is None:  # configs of runs made before it was a run-length field: the whole run
            config.rampup_steps = config.max_steps
        super().__init__(config, device)
        c = config
        self.net = self.to_device(DiffVNet(
            c.in_channels, c.num_classes, c.features, c.norm, c.time_embed_dim, c.emb_dim,
            c.encoder_dropout, c.decoder_dropout,
        ))
        self.optimizer = torch.optim.SGD(self.net.parameters(), lr=c.lr, momentum=c.momentum,
                                         weight_decay=c.weight_decay, nesterov=c.nesterov)
        self.ddpm, self.ddim = make_schedulers(c.diffusion_steps, c.beta_schedule)
        if c.review_mode not in ("train", "eval"):
            raise ValueError(f"unknown review_mode '{c.review_mode}' (train, eval)")
        self.drs = DifficultyWeights(c.num_classes, c.drs_tau, c.drs_alpha, c.drs_mode, device=self.device)
        self.svda_params = SVDAParams(c.n_aug, c.aug_prob, c.rotation_deg, tuple(c.scale_range),
                                      tuple(c.blur_sigma), tuple(c.brightness_range), tuple(c.contrast_range),
                                      tuple(c.gamma_range))

    # ---- contract --------------------------------------------------------------------------------------------
    def modules(self) -> dict[str, torch.nn.Module]:
        return {"diffvnet": self.net}

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.optimizer]

    def extra_state(self) -> dict[str, Any]:
        return {"drs": self.drs.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if "drs" in state:
            self.drs.load_state_dict(state["drs"])

    def mu_at(self, step: int) -> float:
        """mu(t) of eq. 9: ``mu * exp(-5 (1 - t / L)^2)``, the Gaussian ramp-up."""
        c = self.config
        return gaussian_warmup(step, c.rampup_steps, c.mu)

    @property
    def amp_dtype(self) -> torch.dtype | None:
        """The base contract's (CUDA autocast) plus, opt-in (``cpu_amp``), bfloat16 on CPUs with native bf16:
        the CPU counterpart of the published code's mixed-precision training."""
        c = self.config
        if self.device.type == "cpu":
            return torch.bfloat16 if c.amp and c.cpu_amp and _cpu_bf16_supported() else None
        return super().amp_dtype

    # ---- pieces of the iteration -----------------------------------------------------------------------------
    def _augment(self, image: torch.Tensor, label: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.config.svda:
            return image, label
        return svda(image, label, self.svda_params)

    def _loss(self, logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None
              ) -> torch.Tensor:
        c = self.config
        return dice_ce(logits, target, weights, c.lambda_dice, c.lambda_ce, c.dice_include_background)

    def _partial_backward(self, loss: torch.Tensor) -> None:
        """Backward of a part of eq. 9 (through the grad scaler when fp16 autocasting); the step comes later."""
        if self.amp_dtype == torch.float16:
            if self._scaler is None:
                self._scaler = torch.amp.GradScaler(self.device.type)
            self._scaler.scale(loss).backward()
        else:
            loss.backward()

    def sampling_autocast(self) -> contextlib.AbstractContextManager:
        """Autocast for the gradient-free DDIM loop: the method's CUDA autocast is already active around it; on a
        CPU with native bfloat16 (oneDNN), bf16 autocast when ``amp`` and ``cpu_bf16_sampling`` are on.  The
        published code samples under fp16 autocast; the map only feeds the Gumbel-softmax of eq. 7."""
        c = self.config
        if self.device.type == "cpu" and c.amp and c.cpu_bf16_sampling and _cpu_bf16_supported():
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.no_grad()
    def ddim_x0(self, image: torch.Tensor) -> torch.Tensor:
        """The domain-unbiased map ``p^{u;xi}``: DDIM from pure noise with ``D(xi)`` predicting x0 (clamped to
        [-1, 1] each step, as the published sampler's ``clip_denoised``), ``[B, K, ...]`` float32."""
        c, net = self.config, self.net
        with self.sampling_autocast():
            context = net.diffusion_context(image)  # step-invariant: computed once for all DDIM steps

            def predict_x0(y_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                x0 = net.denoise_from_context(context, y_t, t).float()
                return x0.clamp(-1.0, 1.0) if c.clip_x0 else x0

            x_T = torch.randn((image.shape[0], c.num_classes, *image.shape[2:]), device=image.device)
            return ddim_sample(self.ddim, predict_x0, x_T, c.ddim_steps)

    def pseudo_label(self, x0: torch.Tensor, logits_psi: torch.Tensor) -> torch.Tensor:
        """The RS pseudo label of eq. 7 (``[B, 1, ...]`` int64)."""
        c = self.config
        return rs_pseudo_label(x0, logits_psi, c.gumbel_tau, c.smooth_kernel, c.smooth_sigma)

    # ---- training --------------------------------------------------------------------------------------------
    def train_step(self, labeled: dict[str, torch.Tensor], unlabeled: dict[str, torch.Tensor],
                   step: int) -> dict[str, float]:
        c, net = self.config, self.net
        ema_transfer(net.decoder_theta, net.decoder_xi, net.decoder_psi, c.ema_w)
        self.optimizer.zero_grad(set_to_none=True)

        x_l, y_l = self._augment(labeled["image"], labeled["label"].long())
        x_u, _ = self._augment(unlabeled["image"])

        # labeled flows: denoising (eq. 1-2) and difficulty-aware (eq. 3-6)
        split = c.split_backward
        with self.autocast():
            y0 = to_signed(F.one_hot(y_l[:, 0], c.num_classes).movedim(-1, 1).float())
            t = sample_timesteps(self.ddpm, y0.shape[0], y0.device)
            y_t = q_sample(self.ddpm, y0, t)
            p_l_xi = net.denoise(x_l, y_t, t)
            loss_deno = self._loss(p_l_xi, y_l)
            dice_xi = hard_dice(p_l_xi.detach(), y_l, absent=c.drs_absent_dice)
            weights = self.drs.update(dice_xi)
        if split:
            self._partial_backward(loss_deno)
            del p_l_xi
        with self.autocast():
            p_l_psi = net.psi(x_l)
            loss_diff = self._loss(p_l_psi, y_l, weights)
        if split:
            self._partial_backward(loss_diff)
            del p_l_psi

        # unlabeled flow: pseudo labels (eq. 7) and D(theta) (eq. 8)
        mu = self.mu_at(step)
        with self.autocast():
            x0_u = self.ddim_x0(x_u)
            feats_u = net.encode_image(x_u)
            with torch.no_grad():
                p_u_psi = net.decoder_psi([f.detach() for f in feats_u])
                pseudo = self.pseudo_label(x0_u, p_u_psi)
            p_u_theta = net.decoder_theta(feats_u)
            loss_u = self._loss(p_u_theta, pseudo)
            loss_last = mu * loss_u if split else loss_deno + loss_diff + mu * loss_u
        self.backward_and_step(loss_last, self.optimizer)

        out = {
            "loss": float(loss_deno.detach() + loss_diff.detach() + mu * loss_u.detach()),
            "loss_deno": float(loss_deno.detach()),
            "loss_diff": float(loss_diff.detach()),
            "loss_u": float(loss_u.detach()),
            "mu": mu,
        }
        for k, (w, d) in enumerate(zip(weights.tolist(), dice_xi.tolist())):
            out[f"drs_w_{k}"] = w
            out[f"dice_xi_{k}"] = d
        return out

    # ---- inference -------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _evaluating(self) -> Iterator[None]:
        was_training = self.net.training
        self.net.eval()
        try:
            yield
        finally:
            self.net.train(was_training)

    @contextlib.contextmanager
    def _as_training_targets(self) -> Iterator[None]:
        """The networks as they are when the training targets are made: train mode (dropout on, norms on the
        batch's statistics) without touching the running statistics, which inference and checkpoints keep."""
        norms = [m for m in self.net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        tracked = [m.track_running_stats for m in norms]
        was_training = self.net.training
        self.net.train()
        for m in norms:
            m.track_running_stats = False  # batch statistics, running ones neither used nor updated
        try:
            yield
        finally:
            for m, t in zip(norms, tracked):
                m.track_running_stats = t
            self.net.train(was_training)

    def _review_maps(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """The terms of eq. 7 as they enter the pseudo label: ``Smooth(GumbelSoftmax(p^{u;xi}))`` (the DDIM map of
        ``D(xi)``), ``Softmax(p^{u;psi})`` and their sum (one Gumbel draw for both views)."""
        c = self.config
        domain, klass = rs_terms(self.ddim_x0(batch), self.net.psi(batch), c.gumbel_tau, c.smooth_kernel,
                                 c.smooth_sigma)
        return {"diffusion": domain, "difficulty": klass, "combined": domain + klass}

    def pseudo_labels(self, volume: torch.Tensor) -> dict[str, np.ndarray]:
        """The three views of one volume, computed the way the training targets are (``review_mode`` "train"):
        ``diffusion`` (domain-unbiased), ``difficulty`` (class-unbiased) and ``combined`` (the RS pseudo label of
        eq. 7), each map blended across sliding windows before its argmax."""
        mode = self._as_training_targets() if self.config.review_mode == "train" else self._evaluating()
        with mode, torch.no_grad():
            maps = self.infer_volume(volume, self._review_maps)
        return {view: argmax_uint8(maps[view]) for view in self.views}

    def predict(self, volume: torch.Tensor) -> np.ndarray:
        """``D(theta)`` on the shared encoder: the paper's inference path (not the ``combined`` view)."""
        with self._evaluating(), torch.no_grad():
            maps = self.infer_volume(volume, lambda b: {"theta": torch.softmax(self.net.theta(b).float(), dim=1)})
        return argmax_uint8(maps["theta"])


def _cpu_bf16_supported() -> bool:
    """Whether oneDNN runs bfloat16 natively here (AVX512-BF16 / AMX); emulated bf16 would be slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


METHOD = GenericSSL
