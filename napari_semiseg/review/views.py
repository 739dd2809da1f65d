"""Comparing the views of a case: the class legend, *Next view* (one view at a time), the disagreement of one method's
views (or of all views) as an outline (hidden in 3D, where napari cannot draw an outline) and its per-slice profile
(:class:`~napari_semiseg._plot.ProfilePlot`), with *Worst slice* and a click on a slice to go there."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtWidgets import QCheckBox, QComboBox, QGridLayout, QGroupBox, QLabel, QPushButton

from backend.project import Project
from backend.review.views import ALL_METHODS, worst_slice
from napari_semiseg._layers import label_rgb, layer_scale, set_if_changed
from napari_semiseg._plot import DISAGREEMENT_BAR, ProfilePlot
from napari_semiseg._state import alive
from napari_semiseg.review.loader import DISAGREEMENT

if TYPE_CHECKING:
    from napari_semiseg.review import ReviewDock


class Legend(QGroupBox):
    """One swatch and name per class (the colours every layer uses), then the disagreement outline."""

    def __init__(self, parent=None):
        super().__init__("Classes", parent)
        self.grid = QGridLayout(self)
        self.grid.setHorizontalSpacing(10)
        self.entries: list[tuple[str, tuple[float, float, float]]] = []

    def fill(self, project: Project | None) -> None:
        while self.grid.count():
            item = self.grid.takeAt(0)
            if item.widget() is not None:
                item.widget().deleteLater()
        self.entries = []
        if project is None:
            return
        entries = [(f"{value} {name}", label_rgb(value)) for value, name in project.labels.items() if value != 0]
        entries.append(("views disagree (outline)", DISAGREEMENT_BAR))
        for i, (text, rgb) in enumerate(entries):
            swatch = QLabel()
            swatch.setFixedSize(14, 14)
            r, g, b = (int(round(255 * c)) for c in rgb)
            swatch.setStyleSheet(f"background-color: rgb({r}, {g}, {b}); border: 1px solid #888;")
            name = QLabel(text)
            name.setObjectName("legend_entry")
            row, col = divmod(i, 3)
            self.grid.addWidget(swatch, row, 2 * col)
            self.grid.addWidget(name, row, 2 * col + 1)
            self.entries.append((text, rgb))


class ViewsPanel(QGroupBox):
    """*Compare views*: the outline toggle and whose disagreement it shows, *Next view*, *Worst slice*, the profile."""

    def __init__(self, dock: "ReviewDock"):
        super().__init__("Compare views", dock)
        self.dock = dock
        self.disagreement: dict[str, np.ndarray] = {}  # per method (and all methods) of the open case
        self.profiles: dict[str, np.ndarray] = {}      # their per-slice voxel counts
        self._wanted: str | None = None                # whose disagreement the reviewer chose (kept across cases)
        grid = QGridLayout(self)
        self.disagreement_check = QCheckBox("Disagreement outline  [Shift+D]")
        self.disagreement_check.setChecked(True)
        self.disagreement_check.setToolTip("Outline where the views of the chosen method differ (not drawn in 3D)")
        self.disagreement_check.toggled.connect(lambda _on: self.apply())
        self.disagreement_combo = QComboBox()
        self.disagreement_combo.setToolTip("Whose views the outline and the slice profile compare")
        self.disagreement_combo.currentIndexChanged.connect(self._on_chosen)
        self.cycle_button = QPushButton("Next view  [Shift+V]")
        self.cycle_button.setToolTip("Show the next pseudo-label view alone (the others hidden)")
        self.cycle_button.clicked.connect(lambda: self.cycle_view())
        self.worst_button = QPushButton("Worst slice  [Shift+W]")
        self.worst_button.setToolTip("Go to the slice where the views disagree most")
        self.worst_button.clicked.connect(lambda: self.go_to_worst_slice())
        self.profile_plot = ProfilePlot()
        self.profile_plot.slice_clicked.connect(self.go_to_slice)
        grid.addWidget(self.disagreement_check, 0, 0)
        grid.addWidget(self.disagreement_combo, 0, 1)
        grid.addWidget(self.cycle_button, 1, 0)
        grid.addWidget(self.worst_button, 1, 1)
        grid.addWidget(self.profile_plot, 2, 0, 1, 2)
        dims = getattr(dock.viewer, "dims", None)
        if dims is not None:
            dims.events.ndisplay.connect(self._on_ndisplay)
            dims.events.current_step.connect(self._on_step)

    def update_buttons(self, has_case: bool) -> None:
        self.cycle_button.setEnabled(has_case and len(self.dock.views) > 0)
        self.worst_button.setEnabled(has_case and bool(self.disagreement))

    def clear(self) -> None:
        self.disagreement, self.profiles = {}, {}
        self.disagreement_combo.blockSignals(True)
        self.disagreement_combo.clear()
        self.disagreement_combo.blockSignals(False)
        self.profile_plot.set_profile([])

    def show_case(self, by_method: dict[str, np.ndarray], profiles: dict[str, np.ndarray]) -> None:
        self.disagreement, self.profiles = by_method, profiles
        shown = self.choice(by_method)
        self.disagreement_combo.blockSignals(True)
        self.disagreement_combo.clear()
        for key in by_method:
            self.disagreement_combo.addItem(f"of {key}" if key == ALL_METHODS else f"of {key}'s views", key)
        self.disagreement_combo.setCurrentIndex(max(0, self.disagreement_combo.findData(shown)))
        self.disagreement_combo.blockSignals(False)

    def summary(self) -> str:
        """The status line's end for the case just shown: how many voxels the shown views disagree on."""
        if not self.dock.views:
            return ", no pseudo labels yet"
        shown = self.choice(self.disagreement)
        n_dis = int(self.profiles[shown].sum()) if shown is not None else 0
        where = "" if shown is None else f" ({'all methods' if shown == ALL_METHODS else shown})"
        return f", views disagree on {n_dis} voxels{where}"

    # ---- the disagreement outline ----------------------------------------------------------------------------
    def choice(self, by_method: dict[str, np.ndarray]) -> str | None:
        """The disagreement to show: the one the reviewer chose when the case has it, else the first method's."""
        if self._wanted in by_method:
            return self._wanted
        return next(iter(by_method), None)

    def _on_chosen(self, _index: int) -> None:
        self._wanted = self.disagreement_combo.currentData()
        self.apply(data=True)

    def outline_wanted(self) -> bool:
        """The disagreement outline is drawn when asked for and the canvas is 2D (no outline in 3D)."""
        dims = getattr(self.dock.viewer, "dims", None)
        return self.disagreement_check.isChecked() and (dims is None or dims.ndisplay == 2)

    def shown(self) -> str | None:
        """Whose disagreement the outline and the slice profile show (None: the case has none)."""
        key = self.disagreement_combo.currentData()
        return key if key in self.disagreement else None

    def apply(self, data: bool = False) -> None:
        """Show the chosen disagreement (``data``: swap the layer's data to it) when wanted, its profile."""
        key = self.shown()
        layer = self.dock.loader.live(DISAGREEMENT)
        if layer is not None and key is not None:
            if data:
                layer.data = self.disagreement[key]
            set_if_changed(layer, "visible", self.outline_wanted())
        elif layer is not None:
            set_if_changed(layer, "visible", False)
        self.profile_plot.set_profile([] if key is None else self.profiles[key], self.current_slice())

    def _on_ndisplay(self, _event: Any = None) -> None:
        if alive(self):
            self.apply()

    def _on_step(self, _event: Any = None) -> None:
        if alive(self) and self.profiles:
            self.profile_plot.set_current(self.current_slice())

    # ---- slices -----------------------------------------------------------------------------------------------
    def current_slice(self) -> int | None:
        """The axial slice on screen (index into the case's ``[z, y, x]`` arrays)."""
        image = self.dock.image
        if image is None:
            return None
        z = int(round(float(self.dock.viewer.dims.point[0]) / layer_scale(image)[0]))
        return min(max(z, 0), image.shape[0] - 1)

    def go_to_slice(self, z: int) -> None:
        """Show axial slice ``z`` of the open case."""
        image = self.dock.image
        if image is None:
            return
        z = min(max(int(z), 0), image.shape[0] - 1)
        self.dock.viewer.dims.set_point(0, z * layer_scale(image)[0])
        self.profile_plot.set_current(z)

    def go_to_worst_slice(self) -> int | None:
        """Go to the slice where the shown disagreement is largest; returns it (None when the views agree)."""
        key, case = self.shown(), self.dock.case
        z = None if key is None else worst_slice(self.profiles[key])
        if z is None:
            self.dock._say(f"{case}: the views agree on every slice" if case else "No case open")
            return None
        self.go_to_slice(z)
        self.dock._say(f"{case}: slice {z}, {int(self.profiles[key][z])} voxels of disagreement "
                       f"({'all methods' if key == ALL_METHODS else key})")
        return z

    # ---- one view at a time ------------------------------------------------------------------------------------
    def visible_view(self) -> str | None:
        """The view shown when exactly one is visible, else None."""
        live = self.dock.loader.live
        shown = [name for name in self.dock.views if (layer := live(name)) is not None and layer.visible]
        return shown[0] if len(shown) == 1 else None

    def cycle_view(self) -> str | None:
        """Show the next pseudo-label view alone (after the visible one, in layer order); returns its name."""
        names = list(self.dock.views)
        if not names:
            return None
        current = self.visible_view()
        nxt = names[(names.index(current) + 1) % len(names)] if current in names else names[0]
        for name in names:
            layer = self.dock.loader.live(name)
            if layer is not None:
                set_if_changed(layer, "visible", name == nxt)
        self.dock._say(f"{self.dock.case}: showing {nxt} ({names.index(nxt) + 1} of {len(names)})")
        return nxt
