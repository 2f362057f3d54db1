"""Pictures: the appendix Fig. S1 pipeline strip (input, heatmap overlay, Otsu binary map, contours,
chosen box), one row per (prompt, method)."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from camloc.evaluators import binarize, candidate_boxes, heatmap_to_uint8, largest_box
from camloc.evaluators.boxes import outer_contours

STAGES = ("input", "heatmap", "binary map", "contours", "box")
FIGURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".pdf", ".svg")
DISPLAY_SIDE = 1024
"""Pictures are drawn from copies no larger than this (boxes and IoUs still come from the full-size
maps): a 10000 x 10000 photo would otherwise take gigabytes and minutes to draw."""


def display_scale(size: tuple[int, int]) -> float:
    return min(1.0, DISPLAY_SIDE / max(size))


def _small(array: np.ndarray, scale: float, nearest: bool = False) -> np.ndarray:
    if scale >= 1:
        return array
    h, w = array.shape[:2]
    return cv2.resize(array, (max(1, round(w * scale)), max(1, round(h * scale))),
                      interpolation=cv2.INTER_NEAREST if nearest else cv2.INTER_AREA)


def _legend(fig, with_gt: bool) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color="lime", lw=2, label="predicted box")]
    if with_gt:
        handles.append(Line2D([], [], color="white", lw=2, ls="--", label="ground truth"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, facecolor="0.35",
               labelcolor="white", framealpha=1)


def _colorbar(fig, axes) -> None:
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    mappable = ScalarMappable(norm=Normalize(0, 1), cmap="jet")
    fig.colorbar(mappable, ax=axes, fraction=0.015, pad=0.01, label="heatmap (min-max)")


def _constant(heatmap: np.ndarray) -> bool:
    finite = heatmap[np.isfinite(heatmap)]
    return finite.size == 0 or float(finite.max()) == float(finite.min())


def _box_label(box, gt_boxes) -> str:
    from camloc.evaluators import best_iou

    text = f"box {list(box)}"
    return text + (f"  IoU {best_iou(box, gt_boxes):.3f}" if gt_boxes else "")


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """RGB uint8 image blended with the jet-coloured heatmap."""
    colored = cv2.applyColorMap(heatmap_to_uint8(heatmap), cv2.COLORMAP_JET)[..., ::-1]
    return (alpha * colored + (1 - alpha) * image).astype(np.uint8)


def draw_boxes(ax, box: list[int], gt_boxes: list[list[float]] | None, gt_lw: float,
               size: tuple[int, int] | None = None) -> None:
    """On a matplotlib axis: the ground truth (white, dashed) and the predicted box (green). With the image's
    `size` (W, H), a box edge on the image's border is drawn just inside it, so a box covering the whole image
    stays visible instead of hiding under the frame."""
    from matplotlib.patches import Rectangle

    def inside(b):
        if size is None:
            return b
        inset = 0.008 * max(size)
        return [max(b[0], inset), max(b[1], inset), min(b[2], size[0] - inset), min(b[3], size[1] - inset)]

    for gt in gt_boxes or []:
        g = inside(gt)
        ax.add_patch(Rectangle((g[0], g[1]), g[2] - g[0], g[3] - g[1], fill=False, ec="white", lw=gt_lw, ls="--"))
    b = inside(box)
    ax.add_patch(Rectangle((b[0], b[1]), b[2] - b[0], b[3] - b[1], fill=False, ec="lime", lw=2))


def _figure(figsize: tuple[float, float], rows: int, cols: int):
    """A matplotlib Figure and its (rows, cols) axes, outside pyplot (no global state, no backend switch:
    it saves anywhere), which a notebook shows as a picture (`_repr_png_`)."""
    from matplotlib.figure import Figure

    class ShownFigure(Figure):
        """A Figure a notebook displays inline: `fig` as a cell's last line shows the picture, in a fresh kernel
        too (a Figure made outside pyplot otherwise shows as its text repr)."""

        def _repr_png_(self) -> bytes:
            import io

            buffer = io.BytesIO()
            self.savefig(buffer, format="png", dpi=80)
            return buffer.getvalue()

    fig = ShownFigure(figsize=figsize, layout="constrained")
    return fig, fig.subplots(rows, cols, squeeze=False)


def _finish(fig, path: str | Path | None):
    """Save `fig` to `path` (dpi 80), or return it when there is no path."""
    if path is None:
        return fig
    fig.savefig(path, dpi=80)
    return None


def pipeline_figure(
    image: Image.Image,
    rows: list[tuple[str, np.ndarray]],
    path: str | Path | None = None,
    threshold="otsu",
    gt_boxes: list[list[float]] | None = None,
):
    """A picture with one row per (label, raw-size heatmap) and the five stages as columns; a legend, a
    colour bar, the IoU with `gt_boxes`, constant (e.g. all-zero) maps flagged in red. Written to `path`,
    or returned as a matplotlib Figure when `path` is None."""
    rgb = np.asarray(image.convert("RGB"))
    height, width = rgb.shape[:2]
    scale = display_scale((width, height))
    small = _small(rgb, scale)
    extent = (0, width, height, 0)  # drawn small, in the image's own coordinates
    fig, axes = _figure((3 * len(STAGES), 2.6 * len(rows) + 0.5), len(rows), len(STAGES))
    for r, (label, heatmap) in enumerate(rows):
        gray = heatmap_to_uint8(heatmap)
        binary = binarize(gray, threshold)
        contours = outer_contours(binary)  # drawn in the fourth panel; the box is Algorithm 1's own
        box = largest_box(candidate_boxes(binary))
        drawn = small.copy()
        cv2.drawContours(drawn, [np.round(c * scale).astype(np.int32) for c in contours], -1, (0, 255, 0), 2)
        blended = overlay(small, _small(heatmap.astype(np.float32), scale))
        panels = [small, blended, _small(binary, scale, nearest=True), drawn, blended]
        for c, (ax, panel) in enumerate(zip(axes[r], panels)):
            ax.imshow(panel, cmap="gray" if panel.ndim == 2 else None, extent=extent)
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(STAGES[c] if c != 2 else f"binary ({threshold})")
        axes[r][0].set_ylabel(label, fontsize=9)
        if _constant(heatmap):
            axes[r][1].set_xlabel("constant map: no localisation", fontsize=8, color="red")
        ax = axes[r][-1]
        draw_boxes(ax, box, gt_boxes, gt_lw=2, size=image.size)
        ax.set_xlabel(_box_label(box, gt_boxes), fontsize=8)
    _colorbar(fig, axes)
    _legend(fig, bool(gt_boxes))
    fig.get_layout_engine().set(rect=(0, 0.04, 1, 0.96))
    return _finish(fig, path)


PANELS_PER_ROW = 6
"""`comparison_figure`: at most this many method panels in a row; more methods wrap onto further rows."""


def comparison_figure(
    image: Image.Image,
    prompts: list[str],
    heatmaps: dict[str, np.ndarray],
    path: str | Path | None = None,
    threshold="otsu",
    gt_boxes: list[list[float]] | None = None,
    scores: list[float] | None = None,
):
    """Methods side by side (appendix Figs. S4-S10): a row group per prompt, the input first, then one heatmap
    overlay per method with its box (green) and the ground truth (white, dashed), at most `PANELS_PER_ROW` panels
    a row (24 methods wrap onto 4 rows, not one strip); the prompt's score in its group's label; legend, colour
    bar, IoUs with `gt_boxes`, constant maps flagged. Written to `path`, or returned as a matplotlib Figure when
    `path` is None."""
    from camloc.evaluators import box_from_heatmap

    rgb = np.asarray(image.convert("RGB"))
    height, width = rgb.shape[:2]
    scale = display_scale((width, height))
    small = _small(rgb, scale)
    extent = (0, width, height, 0)
    methods = list(heatmaps)
    per_row = min(PANELS_PER_ROW, max(1, len(methods)))
    group = -(-len(methods) // per_row)  # rows per prompt
    cols = 1 + per_row
    rows = group * len(prompts)
    fig, axes = _figure((2.4 * cols, 2.25 * rows + 0.5), rows, cols)  # 6 methods a row: 1,344 px at dpi 80
    for p, prompt in enumerate(prompts):
        first = p * group
        axes[first][0].imshow(small, extent=extent)
        label = f"'{prompt}'" + (f"\nscore {scores[p]:.2f}" if scores is not None else "")
        axes[first][0].set_ylabel(label, fontsize=9)
        for k in range(1, group):
            axes[first + k][0].axis("off")
        for i, method in enumerate(methods):
            heatmap = heatmaps[method][p]
            box = box_from_heatmap(heatmap, threshold)
            ax = axes[first + i // per_row][1 + i % per_row]
            ax.imshow(overlay(small, _small(heatmap.astype(np.float32), scale)), extent=extent)
            draw_boxes(ax, box, gt_boxes, gt_lw=1.5, size=(width, height))
            if gt_boxes:
                ax.set_xlabel(_box_label(box, gt_boxes).split("  ")[-1], fontsize=8)
            if _constant(heatmap):
                ax.set_xlabel("constant map", fontsize=8, color="red")
            ax.set_title(method, fontsize=10)
        for i in range(len(methods), group * per_row):  # the last row's empty places
            axes[first + i // per_row][1 + i % per_row].axis("off")
        for ax in axes[first:first + group].ravel():
            ax.set_xticks([]), ax.set_yticks([])
    axes[0][0].set_title("input", fontsize=10)
    _colorbar(fig, axes[:, 1:])
    _legend(fig, bool(gt_boxes))
    fig.get_layout_engine().set(rect=(0, 0.05, 1, 0.95))
    return _finish(fig, path)


def pair_overlay(image: Image.Image, heatmap: np.ndarray, box: list[int], gt_boxes: list[list[float]],
                 caption: str, path: str | Path, max_side: int = 320, points: list | None = None) -> None:
    """One pair as a picture: heatmap overlay, ground truth (white), predicted box (green; not drawn for a pair with
    point labels, whose ground truth is the points: yes points as white-ringed green dots, no points red), a caption
    strip underneath. Written with OpenCV (fast enough for hundreds per run)."""
    rgb = overlay(np.asarray(image.convert("RGB")), heatmap)
    for gt in gt_boxes:
        cv2.rectangle(rgb, (int(gt[0]), int(gt[1])), (int(gt[2]) - 1, int(gt[3]) - 1), (255, 255, 255), 2)
    if points is None:
        cv2.rectangle(rgb, (box[0], box[1]), (box[2] - 1, box[3] - 1), (0, 255, 0), 2)
    radius = max(3, round(max(rgb.shape[:2]) / 120))
    for x, y, yes in points or []:
        centre = (int(x), int(y))
        cv2.circle(rgb, centre, radius + 2, (255, 255, 255), -1, cv2.LINE_AA)
        cv2.circle(rgb, centre, radius, (0, 200, 0) if yes else (230, 0, 0), -1, cv2.LINE_AA)
    scale = max_side / max(rgb.shape[:2])
    if scale < 1:
        rgb = cv2.resize(rgb, (round(rgb.shape[1] * scale), round(rgb.shape[0] * scale)), interpolation=cv2.INTER_AREA)
    strip = np.full((22, rgb.shape[1], 3), 255, np.uint8)
    cv2.putText(strip, caption[:60], (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (0, 0, 0), 1, cv2.LINE_AA)
    Image.fromarray(np.vstack([rgb, strip])).save(path)
