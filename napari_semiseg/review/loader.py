"""Loading a case: everything is read and computed in a napari worker thread (:func:`_load_case`); the main thread
then updates the case's layers a few at a time (a new layer costs napari 50-300 ms, so at most one is made per turn
of the event loop) and offers a draft left from an earlier session."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import QObject, QTimer

from backend.io.volume import Volume
from backend.project import Project
from backend.review.corrections import discard_draft, load_draft
from backend.review.views import disagreement_by_method, read_views, slice_profile
from napari_semiseg import _state
from napari_semiseg._dock import show_error
from napari_semiseg._layers import geometry_metadata, label_colormap, layer_scale, set_if_changed, single_colormap
from napari_semiseg._plot import DISAGREEMENT_BAR
from napari_semiseg._state import alive, start_worker

if TYPE_CHECKING:
    from napari_semiseg.review import ReviewDock

DISAGREEMENT = "disagreement"
OUTLINE = 1  # the disagreement layer's contour width (napari Labels ``contour``; 0 would fill)


class CaseLoader(QObject):
    """Reads a case off the main thread and shows it in the viewer's layers (reused from case to case)."""

    def __init__(self, dock: "ReviewDock"):
        super().__init__(dock)
        self.dock = dock
        self.layers: dict[str, Any] = {}  # the layers the dock made, by role
        self._token = 0
        self.pending: str | None = None

    def live(self, key: str):
        """The dock's layer ``key`` (None when there is none or the user deleted it)."""
        layer = self.layers.get(key)
        if layer is not None and layer not in self.dock.viewer.layers:
            del self.layers[key]
            layer = None
        return layer

    def remove_layers(self) -> None:
        """Remove every layer the dock made (another project was opened)."""
        for layer in list(self.layers.values()):
            if layer in self.dock.viewer.layers:
                self.dock.viewer.layers.remove(layer)
        self.layers = {}

    def load(self, project: Project, case: str, runs: dict[str, str] | None) -> None:
        """Start reading ``case``; a later call wins over one still in flight."""
        self._token += 1
        token = self._token
        self.pending = case
        start_worker(self.dock, _load_case, project, case, runs,
                     on_done=lambda payload: self._show_case(token, payload),
                     on_error=lambda exc: self._load_failed(token, exc))

    def _load_failed(self, token: int, exc: BaseException) -> None:
        if token == self._token:
            self.pending = None
            self.dock._set_busy(False)
        show_error(f"Cannot open the case: {exc}")

    def _show_case(self, token: int, payload: dict[str, Any]) -> None:
        if token != self._token:
            return  # a later selection won
        self.dock.clear_case()
        self._run_steps(token, self._layer_steps(payload), lambda: self._case_shown(payload))

    def _run_steps(self, token: int, steps: list, done) -> None:
        """Run ``steps`` a few at a time (at least one, then until 30 ms passed) per turn of the event loop."""
        t0 = time.perf_counter()
        while steps:
            if token != self._token:
                return
            steps.pop(0)()
            if time.perf_counter() - t0 > 0.03:
                break
        if steps:
            QTimer.singleShot(0, lambda: self._run_steps(token, steps, done) if alive(self.dock) else None)
        elif token == self._token:
            done()

    def _sync(self, key: str, data: np.ndarray | None, kind: str, **props: Any) -> None:
        """Show ``data`` in layer ``key``: its data set in place when the layer exists (a few ms), else a new one;
        ``None``: the case has no such layer, which is hidden and emptied (removing one costs more than a new one)."""
        layer = self.live(key)
        if data is None:
            if layer is not None:
                set_if_changed(layer, "visible", False)
                layer.data = np.zeros((1, 1, 1), np.uint8)
                set_if_changed(layer, "name", f"{key} (none for this case)")
            return
        cmap_key = props.pop("cmap_key", None)
        contour = props.pop("contour", None)
        if layer is not None and layer._type_string == kind:
            layer.data = data
            colormap = props.pop("colormap", None)
            if colormap is not None and getattr(layer, "_semiseg_cmap", None) != cmap_key:
                layer.colormap = colormap
            for name, value in props.items():
                set_if_changed(layer, name, value)
        else:
            viewer = self.dock.viewer
            layer = (viewer.add_image if kind == "image" else viewer.add_labels)(data, **props)
            self.layers[key] = layer
        if kind == "labels":
            layer._semiseg_cmap = cmap_key
            layer.editable = False
            if contour is not None:
                set_if_changed(layer, "contour", contour)

    def _layer_steps(self, payload: dict[str, Any]) -> list:
        project, case, image = self.dock.project, payload["case"], payload["image"]
        scale = layer_scale(image)
        meta = geometry_metadata(image, project.image_path(case))
        label_meta = {**meta, "image_layer": case, "label_names": dict(project.labels)}
        classes = ("classes", project.num_classes)
        sync = self._sync
        steps = [lambda: sync("image", image.array, "image", name=case, scale=scale, metadata=meta,
                              contrast_limits=payload["contrast"]),
                 lambda: sync("accepted label", payload["label"], "labels", name="accepted label", scale=scale,
                              metadata=label_meta, visible=False, cmap_key=classes,
                              colormap=label_colormap(project.num_classes))]
        for i, (name, array) in enumerate(payload["views"].items()):
            steps.append(lambda name=name, array=array, i=i: sync(
                name, array, "labels", name=name, scale=scale, metadata=label_meta, opacity=0.5,
                visible=i == 0, cmap_key=classes, colormap=label_colormap(project.num_classes)))
        for key in [k for k in self.layers if ":" in k and k not in payload["views"]]:
            steps.append(lambda key=key: sync(key, None, "labels"))
        by_method = payload["disagreement"]
        shown = self.dock.compare.choice(by_method)
        steps.append(lambda: sync(DISAGREEMENT, None if shown is None else by_method[shown], "labels",
                                  name=DISAGREEMENT, scale=scale, metadata=label_meta, opacity=1.0,
                                  visible=self.dock.compare.outline_wanted(), contour=OUTLINE, cmap_key="single",
                                  colormap=single_colormap(DISAGREEMENT_BAR)))
        return steps

    def _case_shown(self, payload: dict[str, Any]) -> None:
        dock = self.dock
        self.pending = None
        dock._set_busy(False)
        case, image = payload["case"], payload["image"]
        dock.case, dock.image, dock.views = case, image, payload["views"]
        dock.compare.show_case(payload["disagreement"], payload["profiles"])
        dock.editor.show_case(payload)
        first_view = self.live(next(iter(dock.views), "image"))
        if first_view is not None:
            dock.viewer.layers.selection.active = first_view
        dock.viewer.dims.set_point(0, image.shape[0] * layer_scale(image)[0] / 2)
        dock.viewer.reset_view()
        dock.compare.apply()
        dock._say(f"{case}: {len(dock.views)} pseudo-label view(s)" + dock.compare.summary())
        dock._update_buttons()
        dock.queue.fill_table()
        dock.case_loaded.emit(case)
        draft = payload.get("draft")
        if draft is not None:
            self._offer_draft(*draft)

    def _offer_draft(self, volume: Volume, info: dict[str, Any]) -> None:
        dock = self.dock
        answer = _state.ask(dock, "Unsaved correction found",
                            f"A draft correction of {dock.case} was saved {info.get('time', '')[:19]} "
                            f"(started from {info.get('started_from', '?')}). Restore it?",
                            ["Restore", "Discard draft", "Not now"], default="Restore")
        if answer == "Restore":
            dock.editor.restore_draft(volume.array.astype(np.uint8), info)
            dock._say(f"{dock.case}: draft restored")
        elif answer == "Discard draft":
            discard_draft(dock.project, dock.case)
            dock.refresh()


def _load_case(project: Project, case: str, runs: dict[str, str] | None) -> dict[str, Any]:
    """Worker: everything the dock shows for ``case``, read and computed off the main thread."""
    version = project.label_version(case)  # before reading: a later write shows up
    image = project.read_image(case)
    label = project.read_label(case)
    views = read_views(project, case, runs, image=image)
    by_method = disagreement_by_method(views)
    low, high = (float(v) for v in np.percentile(image.array[::2, ::2, ::2], [0.5, 99.5]))
    return {
        "case": case,
        "image": image,
        "label": None if label is None or image.geometry_mismatch(label) else label.array.astype(np.uint8),
        "views": views,
        "disagreement": by_method,
        "profiles": {key: slice_profile(mask) for key, mask in by_method.items()},
        "contrast": (low, high if high > low else low + 1.0),
        "draft": load_draft(project, case),
        "label_version": version,
    }
