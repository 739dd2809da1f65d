"""File > Open Sample: the labeled case of each real sample project (image + its label) as layer data tuples.

The full review loop on a sample starts from the review dock's "Open sample..." button, which copies the sample
project to a folder of the user's (the installed sample data is never written to).
"""
from __future__ import annotations

from backend.project import Project
from backend.project.sample import sample_root
from napari_semiseg._layers import geometry_metadata, label_colormap, layer_scale


def case_layers(project: Project, case: str) -> list[tuple]:
    """Image and (when it has one) label layer data tuples of ``case``."""
    image = project.read_image(case)
    image_meta = {"name": case, "scale": layer_scale(image),
                  "metadata": geometry_metadata(image, project.image_path(case))}
    layers: list[tuple] = [(image.array, image_meta, "image")]
    label = project.read_label(case)
    if label is not None:
        meta = {"name": f"{case} label", "scale": layer_scale(label), "colormap": label_colormap(project.num_classes),
                "metadata": {**geometry_metadata(label, project.label_path(case)), "image_layer": case,
                             "label_names": project.labels}}
        layers.append((label.array.astype("uint8"), meta, "labels"))
    return layers


def _sample(task: str) -> list[tuple]:
    project = Project.open(sample_root() / task)
    layers: list[tuple] = []
    for case in project.labeled_cases():
        layers.extend(case_layers(project, case))
    return layers


def brain_tissue() -> list[tuple]:
    """Brain tissue sample: the MNI152 T1 template with its grey/white matter label."""
    return _sample("brain_tissue")


def lesions() -> list[tuple]:
    """Lesion sample: the labeled MR brain tumour case."""
    return _sample("lesions")
