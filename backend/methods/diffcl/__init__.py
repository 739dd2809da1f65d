"""Diff-CL (Guo et al.): cross pseudo supervision between a diffusion (DS) and a convolution (CS) segmentation
network, a high-frequency Mamba module in CS, and label propagation by contrastive learning.  3D, V-Net backbones.

One training step is Algorithm 1:

1. CS forward on labeled + unlabeled images: softmax ``\\hat P``, pseudo labels ``\\hat Y = argmax \\hat P``.
2. ``Y_0^l = y^l`` and ``Y_0^u = \\hat Y^u`` as one-hot maps, noised to step ``t`` (eq. 5).
3. DS forward on ``(x, Y_t, t)``: softmax ``\\tilde P`` (its x0 prediction), pseudo labels ``\\tilde Y``.
4. Losses: supervised ``L_s^d`` (eq. 18) and ``L_s^c`` (eq. 19), cross pseudo supervision ``L_p^d`` (eq. 6) and
   ``L_p^c`` (eq. 7), label propagation ``L_cl`` (eq. 15); totals ``L^d = L_s^d + mu1 L_p^d`` (eq. 16) and
   ``L^c = L_s^c + mu2 (L_p^c + eta L_cl)`` (eq. 17, 22); one SGD step for each network.

Review views per volume: ``cs`` (CS softmax, sliding window) and ``ds`` (DS labels sampled by DDIM, Sec. 3.1,
conditioned on the image, started from pure noise).  ``predict`` returns ``cs``: Algorithm 1's output is "trained CS
for inference", and the paper reports CS results.

There is no official code of Diff-CL (none published or found); the settings below follow the paper, and where
it is silent the SSL4MIS / SegMamba code its baselines and modules come from.  Every remaining deviation from the
paper, with its reason (see also :class:`DiffCLConfig`):

* Training batches are augmented here, in the method, by one random in-plane rotation by k x 90 degrees and an
  optional flip per sample (Sec. 5.1 "random cropping, flipping, and rotation"; the crop is the engine's
  sampler).  Image and label get the same transform; unlabeled images their own.  The transform is drawn
  uniformly from the 8 symmetries of the (y, x) plane (SSL4MIS's ``RandomRotFlip`` always flips, i.e. draws only
  the 4 reflections; the paper does not say which); a non-square plane is rotated by 0 or 180 degrees only.
* During training DS's pseudo labels are its single x0 prediction from ``Y_t`` (Algorithm 1, step 7), with ``t``
  uniform in [0, T) per sample; DDIM's iterations are used only for the ``ds`` review view.  The paper gives
  no diffusion schedule: T = 1000 linear betas, DDIM with ``ddim_steps`` (chosen).
* Table 2 ramps only the supervised CE weights (beta = 0.1 lambda(t)); mu, lambda and eta are constant from the
  first step, as written.  lambda(t)'s t_max is the run's end, as the paper's t_max = its last epoch; the paper
  counts epochs, this code steps (``max_steps`` of the paper presets is the base class's 30000: the paper gives
  300 epochs without an epoch size).
* ``L_cl`` is eq. 15's sum over classes, anchors and positives divided by the number of terms
  (``cl_reduction="mean"``; ``"sum"`` is eq. 15 literally). The paper gives neither p, q, k, tau, d nor code, and
  the sum's scale is ~C p k log(1 + k) at initialisation: 34650 with the chosen p = k = 64 (mean 4.2), so Table 2's
  eta = 0.7 for LA would weigh it 24000 against Dice + CE terms of ~1. Measured on the tiny preset (a labeled and an
  unlabeled synthetic 32^3 ball, 30 steps from the same seed): eta 0.7 with the sum drove CS's supervised loss from
  0.53 up to 1.09 (labeled Dice 0.00: CS collapsed onto L_cl), with the mean down to 0.07 (Dice 0.95); eta 0.007
  with the sum: 0.45 (Dice 0.00). With the mean, eta x L_cl is ~3 (LA) to ~0.001 (Pancreas 12/50) at initialisation,
  a weight in the range the other terms live in, which is how we read "the paper's eta". More numbers in
  :func:`backend.methods.diffcl.contrast.label_propagation_loss`.
* HFM runs on the CS encoder's levels 1/2 to 1/16 (``hfm_levels``), SegMamba's stages, and its output is added
  to the features (see :class:`backend.methods.diffcl.nets.CSNet` for why not the bottleneck alone).
* Network details the paper leaves open are chosen (see :class:`DiffCLConfig` and :mod:`backend.methods.diffcl.nets`):
  the 2 + 2 split of the batch of 4, dropout 0.5 before V-Net's output conv, DS's sinusoidal timestep embedding,
  the projection head (Linear-ReLU-Linear on the last decoder features), HF read as a radius in normalised
  frequency, SA's sigmoid gate.  The CPU presets ``tiny`` and ``quick`` run HFM on levels 1/4-1/16 only (level 1
  doubles a CPU step); the paper presets on 1/2-1/16.
* The memory bank holds projected (``F``), L2-normalised DS features of correctly predicted labeled voxels,
  ``bank_update`` random voxels per class and step, FIFO; it is not synchronised across data-parallel ranks
  (each rank fills its own from its own patches; rank 0's is checkpointed).
* Sliding-window inference uses MONAI's Gaussian-weighted blending; SSL4MIS's ``test_all_case`` averages the
  windows uniformly.  The strides are the paper's, per axis: LA 18 x 18 x 4 (x, y, z) of 112 x 112 x 80,
  Pancreas 16 of 96, BraTS 64 of 96 (``sw_overlap`` per (z, y, x) axis).
* Preprocessing (preset fields): LA none beyond the per-volume z-score (the dataset is already at 0.625 mm
  isotropic); Pancreas the CT window [-120, 240] HU (Sec. 5.1) and 1 mm isotropic resampling (the paper follows
  Luo et al. 2021, whose Pancreas data are resampled to 1 x 1 x 1 mm); BraTS 1 mm isotropic (Sec. 5.1).  The
  crops around the heart / pancreas (with a 25-voxel margin) need the label and are not reproduced: inference
  runs on the whole volume.
"""
from backend.methods.diffcl.config import DiffCLConfig
from backend.methods.diffcl.method import DiffCL, random_rot_flip

METHODS = [DiffCL]

__all__ = ["DiffCL", "DiffCLConfig", "random_rot_flip", "METHODS"]
