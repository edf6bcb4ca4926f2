"""A dependency-free PNG line plot of training curves (reward, KL, ...) for the run directory.

    write_curves_png("run/curves.png", {"reward": [(step, value), ...], "kl": [...]})

One panel per curve, stacked in the order given, each scaled to its own min..max; the panels
carry no text (the trainer prints their names and ranges when it writes the file).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]


def write_curves_png(
    path: str | Path,
    curves: Mapping[str, Sequence[tuple[float, float]]],
    width: int = 640,
    panel_height: int = 160,
) -> None:
    names = [n for n, points in curves.items() if points]
    image = np.full((panel_height * max(len(names), 1), width, 3), 255, dtype=np.uint8)
    for panel, name in enumerate(names):
        top = panel * panel_height
        image[top + panel_height - 1, :] = 200  # panel separator
        xs, ys = (np.array(v, dtype=np.float64) for v in zip(*curves[name], strict=True))
        ys = np.where(np.isfinite(ys), ys, np.nan)
        if np.all(np.isnan(ys)):
            continue
        x0, x1 = xs.min(), max(xs.max(), xs.min() + 1e-12)
        y0, y1 = np.nanmin(ys), max(np.nanmax(ys), np.nanmin(ys) + 1e-12)
        px = ((xs - x0) / (x1 - x0) * (width - 21) + 10).astype(int)
        py = top + panel_height - 11 - ((ys - y0) / (y1 - y0) * (panel_height - 22))
        colour = COLOURS[panel % len(COLOURS)]
        for i in range(len(px) - 1):
            if np.isnan(py[i]) or np.isnan(py[i + 1]):
                continue
            steps = max(abs(px[i + 1] - px[i]), abs(int(py[i + 1]) - int(py[i])), 1)
            for t in np.linspace(0.0, 1.0, steps + 1):
                x = round(float(px[i] + t * (px[i + 1] - px[i])))
                y = round(float(py[i] + t * (py[i + 1] - py[i])))
                image[max(y - 1, top) : y + 1, max(x - 1, 0) : x + 1] = colour
    _write_png(Path(path), image)


def _write_png(path: Path, image: np.ndarray) -> None:
    height, width, _ = image.shape
    raw = b"".join(b"\x00" + image[row].tobytes() for row in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
           + chunk(b"IEND", b""))  # fmt: skip
    path.write_bytes(png)
