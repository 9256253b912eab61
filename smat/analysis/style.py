"""The shared look of every figure: paper column width, readable fonts, PNG (200 dpi) + PDF output.

Figures are drawn on `matplotlib.figure.Figure` objects (Agg canvas, no pyplot state) inside `paper_style()`,
so that drawing never changes the caller's matplotlib settings.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any, Iterator, Sequence

import matplotlib
import seaborn as sns
from matplotlib.figure import Figure

from smat.io import atomic_path, provenance, sha256_file

COLUMN_WIDTH = 3.3   # inches, one column of a two-column paper
TEXT_WIDTH = 6.9     # inches, both columns
DPI = 200
ID_COLOUR, OOD_COLOUR = "#1f5fa8", "#c0392b"
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")

# Embedding TrueType fonts in PDFs (pdf.fonttype 42) runs fontTools, which logs every glyph at INFO.
logging.getLogger("fontTools").setLevel(logging.WARNING)

_RC = {
    "font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "xtick.labelsize": 7, "ytick.labelsize": 7,
    "legend.fontsize": 7, "legend.title_fontsize": 7, "lines.linewidth": 1.2, "lines.markersize": 5,
    "axes.linewidth": 0.6, "grid.linewidth": 0.4, "pdf.fonttype": 42, "savefig.bbox": "tight",
    "savefig.pad_inches": 0.02,
}


@contextlib.contextmanager
def paper_style() -> Iterator[None]:
    rc = {**sns.axes_style("whitegrid"), **sns.plotting_context("paper"), **_RC}
    with matplotlib.rc_context(rc):
        yield


def new_figure(width: float = COLUMN_WIDTH, height: float = 2.4, nrows: int = 1, ncols: int = 1,
               **subplot_kw: Any):
    """A constrained-layout figure and its axes (squeezed as by `plt.subplots`)."""
    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots(nrows, ncols, **subplot_kw)


def save_figure(fig: Figure, out_prefix: Path, figure: str, inputs: Sequence[Path]) -> list[Path]:
    """Write PREFIX.png and PREFIX.pdf together (both or neither), with provenance in their metadata."""
    out_prefix = Path(out_prefix)
    record = json.dumps(provenance(figure=figure, inputs=[{"path": str(p), "sha256": sha256_file(p)}
                                                          for p in inputs]))
    outputs = [out_prefix.with_name(out_prefix.name + ".png"), out_prefix.with_name(out_prefix.name + ".pdf")]
    with contextlib.ExitStack() as stack:
        png, pdf = (stack.enter_context(atomic_path(path)) for path in outputs)
        fig.savefig(png, format="png", dpi=DPI, metadata={"Software": "smat", "Description": record})
        fig.savefig(pdf, format="pdf", metadata={"Creator": "smat", "Subject": record})
    return outputs
