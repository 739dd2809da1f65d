"""A small line plot drawn with QPainter (training loss and validation Dice curves; no plotting library)."""
from __future__ import annotations

import math

from qtpy.QtCore import QPointF, QRectF, Qt
from qtpy.QtGui import QColor, QPainter, QPainterPath, QPen
from qtpy.QtWidgets import QSizePolicy, QWidget

from backend.colors import label_color

MAX_POINTS = 2000  # per series; older points are thinned to keep painting cheap


class CurvePlot(QWidget):
    """Named series of ``(x, y)`` points, drawn as lines with a legend and the y range.

    ``log_y`` draws ``log10(y)`` (losses span decades); ``y_range`` fixes the axis (Dice lies in 0..1).
    """

    def __init__(self, title: str, *, log_y: bool = False, y_range: tuple[float, float] | None = None,
                 parent: QWidget | None = None):
        super().__init__(parent)
        self.title = title
        self.log_y = log_y
        self.y_range = y_range
        self.series: dict[str, list[tuple[float, float]]] = {}
        self.setMinimumHeight(110)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)

    def clear(self) -> None:
        self.series.clear()
        self.update()

    def add_point(self, name: str, x: float, y: float) -> None:
        if y is None or not math.isfinite(float(y)) or (self.log_y and y <= 0):
            return
        points = self.series.setdefault(name, [])
        points.append((float(x), float(y)))
        if len(points) > MAX_POINTS:
            del points[1::2]  # halve, keeping the first and the latest points
        self.update()

    def _ty(self, y: float) -> float:
        return math.log10(y) if self.log_y else y

    def paintEvent(self, _event) -> None:  # noqa: N802 (Qt name)
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        rect = QRectF(self.rect()).adjusted(44, 18, -8, -16)
        painter.fillRect(self.rect(), QColor(38, 41, 48))
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
            text = f"{name} {pts[-1][1]:.3g}"
            width = painter.fontMetrics().horizontalAdvance(text) + 6
            box = QRectF(rect.right() - width - 3, rect.top() + 2 + 14 * i, width, 14)
            painter.fillRect(box, QColor(38, 41, 48, 210))
            painter.drawText(box, Qt.AlignmentFlag.AlignCenter, text)
        painter.end()
