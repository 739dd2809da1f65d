"""Review-loop logic behind the plugin's review dock (no Qt here): the review queue, the pseudo-label views of a
case, majority vote and voxel-wise disagreement of the views, drafts of unsaved corrections, flags, and accepting
a correction into the labeled set with its review history.

On disk (inside the project's ``semiseg/`` folder)::

    pseudo/<method>/<run>/<case>/<view>.nii.gz    pseudo labels (written by the engine)
    drafts/<case>.nii.gz, drafts/<case>.json      the unsaved correction of a case and what it started from
    flags.json                                    {case: {"time", "user", "reason"}}: cases put aside for a second look

Before a label is accepted the dock asks :func:`accept_warnings` whether it needs a confirmation (empty, or a class
the views or the accepted label have is gone), and :func:`slice_profile` gives the per-slice disagreement the
clinician jumps through, worst slice first.

Modules: :mod:`~backend.review.queue` (which runs, the order), :mod:`~backend.review.views` (views, vote,
disagreement), :mod:`~backend.review.corrections` (checks, drafts, flags, accept), :mod:`~backend.review.export`,
:mod:`~backend.review.colors`.
"""
