"""Small plots drawn with QPainter (no plotting library): line curves (training losses, validation Dice) and the
per-slice disagreement profile of the review dock."""
from __future__ import annotations

import math

from qtpy.QtCore import QPointF, QRectF, Qt, Signal
from qtpy.QtGui import QColor, QPainter, QPainterPath, QPen
from qtpy.QtWidgets import QSizePolicy, QWidget

from backend.review.colors import label_color

MAX_POINTS = 2000  # per series; older points are thinned to keep painting cheap
BACKGROUND = (38, 41, 48)
LEGEND_ROW = 16  # pixels per legend row, below the plot area
DISAGREEMENT_BAR = (1.0, 0.0, 1.0)  # the review dock's disagreement outline colour


class CurvePlot(QWidget):
    """Named series of ``(x, y)`` points, drawn as lines with a legend and the y range.

    ``log_y`` draws ``log10(y)`` (losses span decades); ``y_range`` fixes the axis (Dice lies in 0..1).  At most
    ``max_series`` series are kept (the first ones added; the rest are counted in :attr:`left_out`), and the legend
    sits below the plot area, one entry after the other, wrapping to as many rows as it needs (the widget grows),
    so it never covers the curves or itself.
    """

    def __init__(self, title: str, *, log_y: bool = False, y_range: tuple[float, float] | None = None,
                 max_series: int = 6, parent: QWidget | None = None):
        super().__init__(parent)
        self.title = title
        self.log_y = log_y
        self.y_range = y_range
        self.max_series = max_series
        self.series: dict[str, list[tuple[float, float]]] = {}
        self.left_out: set[str] = set()
        self.setMinimumHeight(110)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)

    def clear(self) -> None:
        self.series.clear()
        self.left_out.clear()
        self._fit_legend()
        self.update()

    def add_point(self, name: str, x: float, y: float) -> None:
        if y is None or not math.isfinite(float(y)) or (self.log_y and y <= 0):
            return
        if name not in self.series:
            if len(self.series) >= self.max_series:
                self.left_out.add(name)
                return
            self.series[name] = []
            self._fit_legend()
        points = self.series[name]
        points.append((float(x), float(y)))
        if len(points) > MAX_POINTS:
            del points[1::2]  # halve, keeping the first and the latest points
        self.update()

    def legend_entries(self) -> list[str]:
        """The legend's texts: each series with its latest value, then how many were left out."""
        out = [f"{name} {pts[-1][1]:.3g}" if pts else name for name, pts in self.series.items()]
        if self.left_out:
            out.append(f"+{len(self.left_out)} more not drawn")
        return out

    def _legend_layout(self, width: float) -> list[tuple[int, QRectF]]:
        """``(series index, box)`` of each legend entry, placed left to right, wrapping at ``width``."""
        metrics = self.fontMetrics()
        x, row, out = 6.0, 0, []
        for i, text in enumerate(self.legend_entries()):
            w = metrics.horizontalAdvance(text) + 22
            if x + w > width - 4 and x > 6:
                x, row = 6.0, row + 1
            out.append((i, QRectF(x, row * LEGEND_ROW, w, LEGEND_ROW)))
            x += w + 6
        return out

    def legend_rows(self, width: float | None = None) -> int:
        boxes = self._legend_layout(self.width() if width is None else width)
        return 0 if not boxes else int(boxes[-1][1].top() // LEGEND_ROW) + 1

    def _fit_legend(self) -> None:
        self.setMinimumHeight(110 + LEGEND_ROW * self.legend_rows())

    def resizeEvent(self, event) -> None:  # noqa: N802 (Qt name)
        super().resizeEvent(event)
        self._fit_legend()

    def _ty(self, y: float) -> float:
        return math.log10(y) if self.log_y else y

    def paintEvent(self, _event) -> None:  # noqa: N802 (Qt name)
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        legend_h = LEGEND_ROW * self.legend_rows()
        rect = QRectF(self.rect()).adjusted(44, 18, -8, -16 - legend_h)
        painter.fillRect(self.rect(), QColor(*BACKGROUND))
        painter.setPen(QColor(200, 200, 200))
        painter.drawText(QPointF(6, 13), self.title)
        painter.setPen(QPen(QColor(110, 110, 120), 1))
        painter.drawRect(rect)
        points = [p for pts in self.series.values() for p in pts]
        if not points:
            painter.drawText(rect, Qt.AlignmentFlag.AlignCenter, "no data yet")
            painter.end()
            return
        xs = [p[0] for p in points]
        ys = [self._ty(p[1]) for p in points]
        x0, x1 = min(xs), max(xs)
        if self.y_range is not None:
            y0, y1 = self.y_range
        else:
            y0, y1 = min(ys), max(ys)
        if x1 - x0 < 1e-12:
            x0, x1 = x0 - 1, x1 + 1
        if y1 - y0 < 1e-12:
            y0, y1 = y0 - 0.5, y1 + 0.5

        def to_px(x: float, y: float) -> QPointF:
            return QPointF(rect.left() + (x - x0) / (x1 - x0) * rect.width(),
                           rect.bottom() - (self._ty(y) - y0) / (y1 - y0) * rect.height())

        painter.setPen(QColor(170, 170, 170))
        label = (lambda v: f"{10 ** v:.3g}") if self.log_y else (lambda v: f"{v:.3g}")
        painter.drawText(QRectF(0, rect.top() - 6, 42, 14), Qt.AlignmentFlag.AlignRight, label(y1))
        painter.drawText(QRectF(0, rect.bottom() - 8, 42, 14), Qt.AlignmentFlag.AlignRight, label(y0))
        painter.drawText(QRectF(rect.left(), rect.bottom() + 1, 80, 14), Qt.AlignmentFlag.AlignLeft, f"{x0:g}")
        painter.drawText(QRectF(rect.right() - 80, rect.bottom() + 1, 80, 14), Qt.AlignmentFlag.AlignRight,
                         f"step {x1:g}")
        for i, (name, pts) in enumerate(self.series.items()):
            r, g, b = label_color(i + 1)
            color = QColor.fromRgbF(r, g, b)
            painter.setPen(QPen(color, 1.6))
            if len(pts) == 1:
                painter.drawEllipse(to_px(*pts[0]), 2.5, 2.5)
            else:
                path = QPainterPath(to_px(*pts[0]))
                for p in pts[1:]:
                    path.lineTo(to_px(*p))
                painter.drawPath(path)
        top = rect.bottom() + 16
        entries = self.legend_entries()
        for i, box in self._legend_layout(self.width()):
            box = box.translated(0, top)
            if i < len(self.series):
                r, g, b = label_color(i + 1)
                painter.fillRect(QRectF(box.left(), box.center().y() - 1, 14, 3), QColor.fromRgbF(r, g, b))
            painter.setPen(QColor(200, 200, 200))
            painter.drawText(box.adjusted(18, 0, 0, 0), Qt.AlignmentFlag.AlignVCenter | Qt.AlignmentFlag.AlignLeft,
                             entries[i])
        painter.end()


class ProfilePlot(QWidget):
    """A bar per axial slice (the views' disagreement per slice); the current slice is marked.  A click on a bar
    emits ``slice_clicked(z)``."""

    slice_clicked = Signal(int)

    def __init__(self, title: str = "disagreement per slice", parent: QWidget | None = None):
        super().__init__(parent)
        self.title = title
        self.profile: list[int] = []
        self.current: int | None = None
        self.setMinimumHeight(70)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.setToolTip("Voxels where the views disagree, per axial slice: click a slice to go there")

    def set_profile(self, profile, current: int | None = None) -> None:
        self.profile = [int(v) for v in profile]
        self.current = current
        self.update()

    def set_current(self, z: int | None) -> None:
        if z != self.current:
            self.current = z
            self.update()

    def _plot_rect(self) -> QRectF:
        return QRectF(self.rect()).adjusted(4, 16, -4, -3)

    def slice_at(self, x: float) -> int | None:
        """The slice under widget x coordinate ``x`` (None without a profile)."""
        if not self.profile:
            return None
        rect = self._plot_rect()
        frac = (x - rect.left()) / max(rect.width(), 1.0)
        return int(min(max(frac, 0.0), 0.999999) * len(self.profile))

    def mousePressEvent(self, event) -> None:  # noqa: N802 (Qt name)
        z = self.slice_at(event.position().x() if hasattr(event, "position") else event.x())
        if z is not None:
            self.slice_clicked.emit(z)

    def paintEvent(self, _event) -> None:  # noqa: N802 (Qt name)
        painter = QPainter(self)
        painter.fillRect(self.rect(), QColor(*BACKGROUND))
        rect = self._plot_rect()
        painter.setPen(QColor(200, 200, 200))
        peak = max(self.profile) if self.profile else 0
        worst = self.profile.index(peak) if peak else None
        text = self.title if worst is None else f"{self.title}: worst {worst} ({peak} voxels)"
        painter.drawText(QPointF(6, 12), text)
        if self.current is not None:
            painter.drawText(QRectF(0, 0, self.width() - 6, 15), Qt.AlignmentFlag.AlignRight, f"now {self.current}")
        if not peak:
            painter.drawText(rect, Qt.AlignmentFlag.AlignCenter, "the views agree" if self.profile else "no views")
            painter.end()
            return
        n = len(self.profile)
        w = rect.width() / n
        bar = QColor(*[int(255 * c) for c in DISAGREEMENT_BAR])
        for z, value in enumerate(self.profile):
            if value:
                h = rect.height() * value / peak
                painter.fillRect(QRectF(rect.left() + z * w, rect.bottom() - h, max(w, 1.0), h), bar)
        if self.current is not None and 0 <= self.current < n:
            painter.setPen(QPen(QColor(255, 255, 255), 1.5))
            x = rect.left() + (self.current + 0.5) * w
            painter.drawLine(QPointF(x, rect.top()), QPointF(x, rect.bottom()))
        painter.end()

