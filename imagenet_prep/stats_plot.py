"""OUT/stats.png: the mean image (the mean colour, for keep-aspect builds, which have none) beside the three RGB eigenvectors as colour swatches, so a
person sees at a glance whether the statistics are sane (a greyish blur; a dark-to-light
grey first component, then two colour-opponent ones)."""
from __future__ import annotations

import io

import numpy as np

SPREAD = 2.0  # each swatch runs from mean - 2 sqrt(lambda) v to mean + 2 sqrt(lambda) v


def swatch(channel_mean: np.ndarray, eigval: float, eigvec: np.ndarray, rows: int = 128, cols: int = 48) -> np.ndarray:
    """(rows, cols, 3) uint8: the colours channel_mean + t sqrt(eigval) eigvec for t from
    +SPREAD (top) to -SPREAD (bottom), clipped to 0-255."""
    t = np.linspace(SPREAD, -SPREAD, rows)[:, None]
    colours = channel_mean[None, :] + t * np.sqrt(max(float(eigval), 0.0)) * eigvec[None, :]
    strip = np.clip(np.rint(colours), 0, 255).astype(np.uint8)
    return np.repeat(strip[:, None, :], cols, axis=1)


def render_png(stats) -> bytes:
    """The PNG bytes of the figure (matplotlib's object API: no pyplot, no global state)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 3.6), dpi=100, layout="constrained")
    axes = fig.subplots(1, 4, gridspec_kw={"width_ratios": [2.2, 1, 1, 1]})
    ax = axes[0]
    if stats.mean_image is not None:
        mean_u8 = np.clip(np.rint(stats.mean_image), 0, 255).astype(np.uint8)
        ax.imshow(mean_u8, interpolation="nearest")
        ax.set_title(f"mean image ({stats.count:,} images)", fontsize=10)
    else:  # keep-aspect builds: images of different sizes have no mean image
        ax.imshow(swatch(stats.channel_mean, 0.0, np.zeros(3), rows=2, cols=2), interpolation="nearest")
        ax.set_title(f"mean colour ({stats.count:,} images)", fontsize=10)
        ax.text(0.5, 0.5, "no mean image:\nimage sizes differ\n(--resize keep-aspect)", ha="center", va="center",
                transform=ax.transAxes, fontsize=9, bbox={"facecolor": "white", "alpha": 0.8})
    r, g, b = stats.channel_mean
    ax.set_xlabel(f"channel mean R {r:.1f}  G {g:.1f}  B {b:.1f}", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    for k in range(3):
        ax = axes[k + 1]
        v = stats.eigvecs[:, k]
        lam = float(stats.eigvals[k])
        ax.imshow(swatch(stats.channel_mean, lam, v), aspect="auto", interpolation="nearest",
                  extent=(0, 1, -SPREAD, SPREAD))
        ax.set_title(f"eigvec {k + 1}: \u03bb = {lam:,.1f}\n(\u221a\u03bb = {np.sqrt(max(lam, 0)):.1f} levels)",
                     fontsize=9)
        ax.set_xlabel(f"v = ({v[0]:+.3f}, {v[1]:+.3f}, {v[2]:+.3f})", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([SPREAD, 0, -SPREAD], ["+2\u221a\u03bb", "mean", "\u22122\u221a\u03bb"], fontsize=8)
    fig.suptitle(f"alexprep stats (0-255 RGB; build {stats.build_id or 'unknown'}): "
                 "swatches run along each eigenvector through the mean colour", fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()
