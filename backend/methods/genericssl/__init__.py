"""A&D / GenericSSL: Aggregating & Decoupling (Wang & Li, "Towards Generic Semi-Supervised Framework for Volumetric
Medical Image Segmentation", NeurIPS 2023), a 3D method.

One training iteration (Algorithm 1):

1. EMA transfer ``theta = 0.99 theta + 0.01 (xi + psi) / 2`` (sec. 3.3; done first, as in the published code);
2. SVDA on the labeled and unlabeled batches (:mod:`backend.methods.genericssl.svda`);
3. noisy label ``y_t`` of the one-hot label (eq. 1); ``L_deno`` on ``D(xi)`` (eq. 2);
4. DRS weights from ``D(xi)``'s per-class Dice (eq. 3-5) and ``L_diff`` on ``D(psi)`` (eq. 6);
5. the domain-unbiased map by DDIM (10 steps, x0-prediction) and the class-unbiased map ``D(psi)`` on the
   unlabeled batch, combined by Reparameterize & Smooth into the pseudo label (eq. 7);
6. ``L_u`` on ``D(theta)`` (eq. 8); ``L = L_deno + L_diff + mu(t) L_u`` (eq. 9, mu = 10 with a Gaussian ramp-up).

Speed and memory, at the same mathematics as the published implementation:

* the DDIM loop runs without autograd; the image half of the diffusion stem's convolution is computed once per
  batch and reused by all steps (:meth:`backend.methods.genericssl.diffvnet.DiffVNet.diffusion_context`) -- nothing deeper is
  step-invariant, since every encoder stage adds the embedding of ``t`` and the stem mixes ``y_t`` in before
  its norm and ReLU;
* ``D(psi)``'s class-unbiased map of the unlabeled batch is decoded (without gradient) from the same encoder pass
  that trains ``D(theta)``, instead of a second encoder pass over the same input;
* each of the three flows is back-propagated as soon as its loss is known (``L_deno``, then ``L_diff``, then
  ``mu L_u``), so only one flow's autograd graph is alive at a time; gradients add up, so the update is the same
  as one backward of eq. 9 (``split_backward``, on by default);
* on CPU, batch-1 3x3x3 convolutions go to oneDNN instead of PyTorch's slow im2col path
  (:func:`backend.methods.genericssl.diffvnet.prefer_onednn`), and on CPUs with native bfloat16 the gradient-free DDIM loop
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
  :func:`backend.methods.layers.diffusion.ddim_timesteps`).
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
  ranges are the published ones (:mod:`backend.methods.genericssl.svda` lists each choice).
* DRS keeps the published running averages (``drs_mode = "ema"``); ``"window"`` is the exact last-``tau`` sums
  of eq. 3 (:class:`backend.methods.genericssl.losses.DifficultyWeights`).
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
from backend.methods.genericssl.config import GenericSSLConfig
from backend.methods.genericssl.method import GenericSSL

METHODS = [GenericSSL]

__all__ = ["GenericSSL", "GenericSSLConfig", "METHODS"]
