"""Pictures a person reads: image grids with a title and a name on each row, small images enlarged, and
pictures set side by side. Used by the training grids, generate.py's grid.png, the export's sample grid and
``python -m dmd2.compare --out``'s contact sheet. Nothing here imports torch: images are uint8 arrays or tensors
[3,H,W] (anything with ``.numpy()`` or an array's layout)."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

SMALL = 16        # images of this side or less are enlarged in every grid ...
MIN_SIDE = 32     # ... by a whole factor (nearest neighbour: every pixel stays a visible square) to at least this
PAD = 2           # pixels between the images of a grid
TITLE_H = 14      # the height of a title line


def as_hwc(image: Any) -> np.ndarray:
    """A uint8 image [3,H,W] (tensor or array) or [H,W,3] -> an array [H,W,3]."""
    array = image.numpy() if hasattr(image, "numpy") else np.asarray(image)
    return array.transpose(1, 2, 0) if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[2] not in (1, 3) \
        else array


def zoom(side: int) -> int:
    """The whole factor images of ``side`` pixels are enlarged by in grids: 1 above SMALL, else enough to reach
    MIN_SIDE (8 px -> 4)."""
    return 1 if side > SMALL else -(-MIN_SIDE // side)


def enlarged(image: Any) -> Image.Image:
    """One image as a PIL image, enlarged with nearest neighbour when it is SMALL or less."""
    array = as_hwc(image)
    if array.shape[2] == 1:
        array = array.repeat(3, axis=2)
    picture = Image.fromarray(np.ascontiguousarray(array))
    factor = zoom(max(picture.size))
    return picture.resize((picture.width * factor, picture.height * factor), Image.NEAREST) if factor > 1 else picture


def labelled_grid(rows: Sequence[Sequence[Any]], names: Sequence[str] | None = None, title: str = "") -> Image.Image:
    """uint8 images, one list per row, as one picture: each row's name (``names``) on its left, ``title`` above;
    images of SMALL px or less are enlarged (nearest)."""
    pictures = [[enlarged(img) for img in row] for row in rows]
    names = list(names) if names is not None else [""] * len(rows)
    h, w = (pictures[0][0].height, pictures[0][0].width) if pictures and pictures[0] else (32, 32)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    margin = (int(max(measure.textlength(n) for n in names)) + 8) if any(names) else 0
    cols = max((len(r) for r in pictures), default=0)
    top = TITLE_H + PAD if title else 0
    width = max(margin + cols * (w + PAD) + PAD, int(measure.textlength(title)) + 8 if title else 0)
    grid = Image.new("RGB", (width, top + len(pictures) * (h + PAD) + PAD), "white")
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((4, 2), title, fill="black")
    for r, (images, name) in enumerate(zip(pictures, names)):
        y = top + PAD + r * (h + PAD)
        if name:
            draw.text((4, y + h // 2 - 6), name, fill="black")
        for c, picture in enumerate(images):
            grid.paste(picture, (margin + PAD + c * (w + PAD), y))
    return grid


def side_by_side(pictures: Sequence[Image.Image], gap: int = 8) -> Image.Image:
    """Pictures next to each other, tops aligned, on white."""
    width = sum(p.width for p in pictures) + gap * max(0, len(pictures) - 1)
    out = Image.new("RGB", (max(width, 1), max((p.height for p in pictures), default=1)), "white")
    x = 0
    for p in pictures:
        out.paste(p, (x, 0))
        x += p.width + gap
    return out


def titled(picture: Image.Image, title: str) -> Image.Image:
    """``picture`` with a line of text above it."""
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    out = Image.new("RGB", (max(picture.width, int(measure.textlength(title)) + 8), picture.height + TITLE_H + PAD),
                    "white")
    ImageDraw.Draw(out).text((4, 2), title, fill="black")
    out.paste(picture, (0, TITLE_H + PAD))
    return out


def stacked(pictures: Sequence[Image.Image], gap: int = 8) -> Image.Image:
    """Pictures one below the other, left aligned, on white."""
    height = sum(p.height for p in pictures) + gap * max(0, len(pictures) - 1)
    out = Image.new("RGB", (max((p.width for p in pictures), default=1), max(height, 1)), "white")
    y = 0
    for p in pictures:
        out.paste(p, (0, y))
        y += p.height + gap
    return out


def class_rows(images: Any, labels: Sequence[int], class_names: Sequence[str] | None, per_row: int
               ) -> tuple[list[list[Any]], list[str]]:
    """Images [N,...] laid out ``per_row`` to a row (a grid's rows, one class each in the training grids) and each
    row's name: the class name of its first image (its label without ``class_names``; none for one label only)."""
    rows = [list(images[i:i + per_row]) for i in range(0, len(images), per_row)]
    firsts = [int(labels[i]) for i in range(0, len(images), per_row)]
    if len(set(int(v) for v in labels)) <= 1:
        return rows, [""] * len(rows)
    names = [class_names[y] if class_names and y < len(class_names) else str(y) for y in firsts]
    return rows, names


def plot_denoising_error(rows: Sequence[dict[str, float]], path: str, title: str = "") -> str:
    """evaluate.py's denoising error of a known-answer teacher (``rows``: dmd2.method.mixture.denoising_errors) by
    noise level, on log axes: the teacher's error to the clean images, E(D(x) - x0)^2 = mse + mse_x0 (the cross
    term vanishes: D* is the conditional mean), against mse_x0, the bound no denoiser can beat (the exact
    denoiser's), and mse, the distance to that denoiser. Written to ``path`` (PNG); matplotlib (Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sigmas = [r["sigma"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(sigmas, [r["mse"] + r["mse_x0"] for r in rows], marker="o", label="teacher: E(D(x) - x0)²")
    ax.plot(sigmas, [r["mse_x0"] for r in rows], "k--", label="bound: the exact denoiser's E(D*(x) - x0)²")
    ax.plot(sigmas, [r["mse"] for r in rows], marker=".", alpha=0.7, label="teacher vs the exact denoiser")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("noise level sigma")
    ax.set_ylabel("mean squared error per pixel")
    ax.set_title(title, fontsize="small")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
