"""A small line-plot writer on Pillow alone (no matplotlib dependency): panels side by side, optional log y axis."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageFont


PALETTE = [
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#ff7f0e",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
    # more series than ten (the paper table with its merge rows) stay distinct
    "#393b79",
    "#843c39",
    "#637939",
    "#e7ba52",
    "#7b4173",
]


@dataclass
class Series:
    label: str
    x: list[float]
    y: list[float]
    color: str | None = None
    dashed: bool = False


@dataclass
class Panel:
    title: str
    xlabel: str
    ylabel: str
    series: list[Series] = field(default_factory=list)
    log_y: bool = False


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    if high <= low:
        high = low + 1.0
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = min((m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw), default=10 * magnitude)
    start = math.ceil(low / step) * step
    ticks = []
    value = start
    while value <= high + 1e-9 * step:
        ticks.append(round(value, 12))
        value += step
    return ticks


def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1e4 or abs(value) < 1e-2:
        return f"{value:.0e}"
    return f"{value:g}"


def save_line_plot(panels: list[Panel], path, panel_size: tuple[int, int] = (560, 420), title: str | None = None):
    """Write the panels side by side to a PNG at `path`."""
    width, height = panel_size
    top = 36 if title else 0
    image = Image.new("RGB", (width * len(panels), height + top), "white")
    draw = ImageDraw.Draw(image)
    small, normal = _font(12), _font(15)
    if title:
        draw.text((10, 8), title, fill="black", font=normal)
    for index, panel in enumerate(panels):
        _draw_panel(draw, panel, index * width, top, width, height, small, normal)
    image.save(path)
    return path


def _draw_panel(draw, panel: Panel, x0: int, y0: int, width: int, height: int, small, normal):
    left, right, top, bottom = x0 + 70, x0 + width - 20, y0 + 34, y0 + height - 55
    points = [(x, y) for s in panel.series for x, y in zip(s.x, s.y) if y is not None and math.isfinite(y)]
    if panel.log_y:
        points = [(x, y) for x, y in points if y > 0]
    if not points:
        return
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x_low, x_high = min(xs), max(xs)
    if x_high == x_low:
        x_high = x_low + 1
    if panel.log_y:
        y_low, y_high = math.floor(math.log10(min(ys))), math.ceil(math.log10(max(ys)))
        if y_high == y_low:
            y_high += 1
        y_ticks = [float(v) for v in range(int(y_low), int(y_high) + 1)]
    else:
        y_low, y_high = min(0.0, min(ys)), max(ys) * 1.05
        y_ticks = _nice_ticks(y_low, y_high)
        y_high = max(y_high, y_ticks[-1])

    def to_px(x, y):
        yv = math.log10(y) if panel.log_y else y
        px = left + (x - x_low) / (x_high - x_low) * (right - left)
        py = bottom - (yv - y_low) / (y_high - y_low) * (bottom - top)
        return px, py

    draw.text((x0 + 70, y0 + 8), panel.title, fill="black", font=normal)
    # grid and ticks
    for tick in _nice_ticks(x_low, x_high):
        px = left + (tick - x_low) / (x_high - x_low) * (right - left)
        draw.line([(px, top), (px, bottom)], fill="#e6e6e6")
        draw.text((px - 10, bottom + 5), _fmt(tick), fill="black", font=small)
    for tick in y_ticks:
        py = bottom - (tick - y_low) / (y_high - y_low) * (bottom - top)
        draw.line([(left, py), (right, py)], fill="#e6e6e6")
        label = f"1e{int(tick)}" if panel.log_y else _fmt(tick)
        draw.text((x0 + 8, py - 7), label, fill="black", font=small)
    draw.rectangle([left, top, right, bottom], outline="black")
    draw.text(((left + right) / 2 - 40, bottom + 25), panel.xlabel, fill="black", font=small)
    draw.text((x0 + 8, top - 18), panel.ylabel, fill="black", font=small)
    # series
    for number, series in enumerate(panel.series):
        color = series.color or PALETTE[number % len(PALETTE)]
        coords = [to_px(x, y) for x, y in zip(series.x, series.y) if y is not None and (y > 0 or not panel.log_y)]
        if len(coords) > 1:
            if series.dashed:
                for a, b in zip(coords[::2], coords[1::2]):
                    draw.line([a, b], fill=color, width=2)
            else:
                draw.line(coords, fill=color, width=2)
        for px, py in coords:
            draw.ellipse([px - 2.5, py - 2.5, px + 2.5, py + 2.5], fill=color)
    # legend
    legend_y = top + 8
    for number, series in enumerate(panel.series):
        color = series.color or PALETTE[number % len(PALETTE)]
        draw.line([(right - 170, legend_y + 7), (right - 145, legend_y + 7)], fill=color, width=3)
        draw.text((right - 140, legend_y), series.label, fill="black", font=small)
        legend_y += 17


def save_bar_chart(
    groups: list[str],
    series: list[tuple[str, list[float], list[float]]],
    path,
    title: str | None = None,
    size: tuple[int, int] = (1100, 520),
    y_range: tuple[float, float] | None = None,
):
    """Grouped bars: one group per entry of `groups`, one bar per `(label, values, errors)` of `series` (errors are
    drawn as ± whiskers; 0 draws none), the legend on the right. The y axis starts below the smallest bar so that
    differences of a few hundredths stay visible; its range is printed on the axis. Writes a PNG at `path`."""
    width, height = size
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    small, normal = _font(12), _font(15)
    legend_width = 330
    left, right, top, bottom = 60, width - legend_width - 10, 40 if title else 15, height - 40
    if title:
        draw.text((10, 10), title, fill="black", font=normal)
    values = [v - e for _, vs, es in series for v, e in zip(vs, es)] + [
        v + e for _, vs, es in series for v, e in zip(vs, es)
    ]
    if y_range is None:
        y_low, y_high = max(0.0, min(values) - 0.02), max(values) + 0.01
        ticks = _nice_ticks(y_low, y_high)
    else:
        y_low, y_high = y_range
        ticks = _nice_ticks(y_low, y_high)

    def py(value: float) -> float:
        return bottom - (value - y_low) / (y_high - y_low) * (bottom - top)

    for tick in ticks:
        draw.line([(left, py(tick)), (right, py(tick))], fill="#e6e6e6")
        draw.text((8, py(tick) - 7), _fmt(tick), fill="black", font=small)
    group_width = (right - left) / len(groups)
    bar_width = group_width * 0.8 / max(1, len(series))
    for g, group in enumerate(groups):
        x_start = left + g * group_width + group_width * 0.1
        for s, (_, vs, es) in enumerate(series):
            color = PALETTE[s % len(PALETTE)]
            x0 = x_start + s * bar_width
            draw.rectangle([x0, min(py(vs[g]), bottom), x0 + bar_width - 2, bottom], fill=color)
            if es[g] > 0:
                cx = x0 + bar_width / 2 - 1
                draw.line([(cx, py(vs[g] - es[g])), (cx, py(vs[g] + es[g]))], fill="black", width=1)
                for end in (vs[g] - es[g], vs[g] + es[g]):
                    draw.line([(cx - 3, py(end)), (cx + 3, py(end))], fill="black", width=1)
        draw.text((x_start + group_width * 0.3, bottom + 8), group, fill="black", font=normal)
    draw.rectangle([left, top, right, bottom], outline="black")
    for s, (label, _, _) in enumerate(series):
        y = top + 10 + 20 * s
        draw.rectangle([right + 15, y, right + 30, y + 12], fill=PALETTE[s % len(PALETTE)])
        draw.text((right + 36, y - 1), label[:48], fill="black", font=small)
    image.save(path)
    return path
