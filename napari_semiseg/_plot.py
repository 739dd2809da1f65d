"""The docks' small plots, drawn by pyqtgraph in napari's theme colours: line curves (training losses, validation
Dice) with a legend below them, and the review dock's per-slice disagreement profile (a click goes to a slice)."""
from __future__ import annotations

import html
import math

import numpy as np
import pyqtgraph as pg
from qtpy.QtCore import QPoint, QRectF, Qt, Signal
from qtpy.QtWidgets import QLabel, QSizePolicy, QVBoxLayout, QWidget

from backend.review.colors import label_color

MAX_POINTS = 2000  # per series; older points are thinned to keep drawing cheap
DISAGREEMENT_BAR = (1.0, 0.0, 1.0)  # the review dock's disagreement outline colour


def theme_colors() -> tuple[str, str]:
    """``(background, text)`` hex colours of napari's current theme (``dark`` when it cannot be read)."""
    from napari.utils.theme import get_system_theme, get_theme

    try:
        from napari.settings import get_settings

        theme_id = get_settings().appearance.theme
        theme = get_theme(get_system_theme() if theme_id == "system" else theme_id)
    except Exception:  # noqa: BLE001 - a theme plugin gone: fall back to napari's default
        theme = get_theme("dark")
    return theme.background.as_hex(), theme.text.as_hex()


def _hex(rgb: tuple[float, float, float]) -> str:
    return "#" + "".join(f"{int(round(255 * c)):02x}" for c in rgb[:3])


def _static(plot: pg.PlotItem) -> None:
    """No pan, zoom, context menu or auto-range button: the plots show what the dock puts in them."""
    plot.setMouseEnabled(x=False, y=False)
    plot.setMenuEnabled(False)
    plot.hideButtons()


class CurvePlot(QWidget):
    """Named series of ``(x, y)`` points drawn as lines, the legend (each series' latest value) below the plot.

    ``log_y`` draws y on a log axis (losses span decades); ``y_range`` fixes the axis (Dice lies in 0..1).  At most
    ``max_series`` series are kept (the first ones added; the rest are counted in :attr:`left_out`).  The legend is
    a word-wrapped label under the plot, so it never covers the curves or itself and grows by the rows it needs.
    """

    def __init__(self, title: str, *, log_y: bool = False, y_range: tuple[float, float] | None = None,
                 max_series: int = 6, parent: QWidget | None = None):
        super().__init__(parent)
        self.title, self.log_y, self.y_range, self.max_series = title, log_y, y_range, max_series
        self.series: dict[str, list[tuple[float, float]]] = {}
        self.left_out: set[str] = set()
        self._curves: dict[str, pg.PlotDataItem] = {}
        background, self._text = theme_colors()
        self.plot = pg.PlotWidget(background=background)
        self.plot.setMinimumHeight(110)
        item = self.plot.getPlotItem()
        _static(item)
        item.setTitle(html.escape(title), color=self._text, size="9pt")
        item.setLogMode(y=log_y)
        item.setLabel("bottom", "step")
        if y_range is not None:
            item.setYRange(*y_range, padding=0)
        self.legend = QLabel()
        self.legend.setWordWrap(True)
        self.legend.setTextFormat(Qt.TextFormat.RichText)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(2)
        layout.addWidget(self.plot)
        layout.addWidget(self.legend)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)
        self._show_legend()

    def clear(self) -> None:
        self.series.clear()
        self.left_out.clear()
        for curve in self._curves.values():
            self.plot.removeItem(curve)
        self._curves.clear()
        self._show_legend()

    def add_point(self, name: str, x: float, y: float) -> None:
        if y is None or not math.isfinite(float(y)) or (self.log_y and y <= 0):
            return
        if name not in self.series:
            if len(self.series) >= self.max_series:
                self.left_out.add(name)
                self._show_legend()
                return
            self.series[name] = []
            color = _hex(label_color(len(self._curves) + 1))
            self._curves[name] = self.plot.plot([], [], pen=pg.mkPen(color, width=1.6), symbolBrush=color,
                                                symbolPen=None, symbolSize=5)
        points = self.series[name]
        points.append((float(x), float(y)))
        if len(points) > MAX_POINTS:
            del points[1::2]  # halve, keeping the first and the latest points
        xs, ys = zip(*points)
        self._curves[name].setData(xs, ys, symbol="o" if len(points) == 1 else None)
        self._show_legend()

    def legend_entries(self) -> list[str]:
        """The legend's texts: each series with its latest value, then how many were left out."""
        out = [f"{name} {pts[-1][1]:.3g}" if pts else name for name, pts in self.series.items()]
        if self.left_out:
            out.append(f"+{len(self.left_out)} more not drawn")
        return out

    def _show_legend(self) -> None:
        entries = self.legend_entries()
        if not entries:
            self.legend.setText(f'<span style="color:{self._text}">no data yet</span>')
            return
        parts = []
        for i, text in enumerate(entries):
            swatch = (f'<span style="color:{_hex(label_color(i + 1))}">&#9632;</span>&nbsp;'
                      if i < len(self.series) else "")
            parts.append(swatch + html.escape(text).replace(" ", "&nbsp;"))
        self.legend.setText(f'<span style="color:{self._text}">' + " &nbsp; ".join(parts) + "</span>")


class ProfilePlot(pg.PlotWidget):
    """A bar per axial slice (the views' disagreement per slice), the current slice marked by a line.  A click on
    the plot emits ``slice_clicked(z)`` for the slice under the pointer."""

    slice_clicked = Signal(int)

    def __init__(self, title: str = "disagreement per slice", parent: QWidget | None = None):
        background, self._text = theme_colors()
        super().__init__(parent, background=background)
        self.title = title
        self.profile: list[int] = []
        self.current: int | None = None
        item = self.getPlotItem()
        _static(item)
        item.hideAxis("left")
        item.hideAxis("bottom")
        self._bars = pg.BarGraphItem(x0=[], height=[], width=1.0, brush=_hex(DISAGREEMENT_BAR), pen=None)
        self._marker = pg.InfiniteLine(angle=90, pen=pg.mkPen("w", width=1.5))
        item.addItem(self._bars)
        item.addItem(self._marker)
        self.setFixedHeight(96)  # a strip under the buttons: the case table keeps the dock's height
        self.setToolTip("Voxels where the views disagree, per axial slice: click a slice to go there")
        self.scene().sigMouseClicked.connect(self._on_click)
        self._redraw()

    def set_profile(self, profile, current: int | None = None) -> None:
        self.profile = [int(v) for v in profile]
        self.current = current
        self._redraw()

    def set_current(self, z: int | None) -> None:
        if z != self.current:
            self.current = z
            self._redraw(bars=False)

    def title_text(self) -> str:
        """The line above the bars: the worst slice and its voxels, the slice on screen."""
        peak = max(self.profile) if self.profile else 0
        if not peak:
            text = f"{self.title}: {'the views agree' if self.profile else 'no views'}"
        else:
            text = f"{self.title}: worst {self.profile.index(peak)} ({peak} voxels)"
        return text if self.current is None else f"{text}, now {self.current}"

    def _redraw(self, bars: bool = True) -> None:
        item = self.getPlotItem()
        item.setTitle(html.escape(self.title_text()), color=self._text, size="8pt")
        n = len(self.profile)
        if bars:
            self._bars.setOpts(x0=np.arange(n), height=np.asarray(self.profile, float), width=1.0)
            item.setXRange(0, max(n, 1), padding=0)
            item.setYRange(0, max(max(self.profile, default=0), 1), padding=0)
        shown = self.current is not None and 0 <= self.current < n
        self._marker.setVisible(shown)
        if shown:
            self._marker.setPos(self.current + 0.5)

    def _plot_rect(self) -> QRectF:
        """The bars' area in viewport coordinates (where clicks land)."""
        return QRectF(self.mapFromScene(self.getPlotItem().vb.sceneBoundingRect()).boundingRect())

    def _slice_at_scene(self, pos) -> int | None:
        if not self.profile:
            return None
        x = self.getPlotItem().vb.mapSceneToView(pos).x()
        return int(min(max(math.floor(x), 0), len(self.profile) - 1))

    def slice_at(self, x: float) -> int | None:
        """The slice under viewport x coordinate ``x`` (None without a profile)."""
        return self._slice_at_scene(self.mapToScene(QPoint(int(x), 0)))

    def _on_click(self, event) -> None:
        if event.button() != Qt.MouseButton.LeftButton:
            return
        z = self._slice_at_scene(event.scenePos())
        if z is not None:
            self.slice_clicked.emit(z)
