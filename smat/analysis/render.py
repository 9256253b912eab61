"""Render a grid of table cells as Markdown and as LaTeX (booktabs).

A grid is a header row plus body rows of `Cell`s; numbers are formatted once, by the table that builds the
grid, so that Markdown and LaTeX always show the same digits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "±": r"$\pm$", "✓": r"\checkmark", "✗": r"$\times$", "†": r"\dag{}", "‡": r"\ddag{}",
                  "τ": r"$\tau$", "·": r"$\cdot$"}


@dataclass(frozen=True)
class Cell:
    text: str
    bold: bool = False


def format_mean_ci(mean: float, ci95: float) -> str:
    """`85.14 ± 0.52`; the mean alone where there is no CI; empty where there is no result."""
    if mean is None or math.isnan(mean):
        return ""
    if ci95 is None or math.isnan(ci95):
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {ci95:.2f}"


def markdown(header: list[str], rows: list[list[Cell]], notes: list[str] = ()) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", r"\|") for c in cells) + " |"   # "|" would split a cell

    lines = [line(header), "|" + "|".join(["---"] * len(header)) + "|"]
    lines += [line([f"**{c.text}**" if c.bold and c.text else c.text for c in row]) for row in rows]
    text = "\n".join(lines) + "\n"
    if notes:
        text += "\n" + "\n".join(notes) + "\n"
    return text


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


def latex(header: list[str], rows: list[list[Cell]], align: str, groups: list[tuple[str, int]] = (),
          rules_after: set[int] = frozenset(), notes: list[str] = (), comments: list[str] = ()) -> str:
    """A booktabs `tabular` to `\\input` into a table environment. `groups` = (title, number of columns)
    spanning the header, `rules_after` = body row indices followed by a \\midrule, `notes` = footnotes shown
    below the table, `comments` = LaTeX comments. Needs booktabs (and amssymb for the ticks)."""
    lines = [f"\\begin{{tabular}}{{{align}}}", r"\toprule"]
    if groups:
        spans, rules, start = [], [], 1
        for title, width in groups:
            spans.append(f"\\multicolumn{{{width}}}{{c}}{{{latex_escape(title)}}}" if title else
                         " & ".join([""] * width))
            if title:
                rules.append(f"\\cmidrule(lr){{{start + 1}-{start + width}}}")
            start += width
        lines.append(" & ".join(["", *spans]) + r" \\")
        lines.append(" ".join(rules))
    lines.append(" & ".join(latex_escape(h) for h in header) + r" \\")
    lines.append(r"\midrule")
    for index, row in enumerate(rows):
        cells = [f"\\textbf{{{latex_escape(c.text)}}}" if c.bold and c.text else latex_escape(c.text)
                 for c in row]
        lines.append(" & ".join(cells) + r" \\")
        if index in rules_after and index != len(rows) - 1:
            lines.append(r"\midrule")
    lines.append(r"\bottomrule")
    lines.append(r"\end{tabular}")
    for note in notes:
        lines.append(f"\\par\\smallskip\\noindent{{\\footnotesize {latex_escape(note)}}}")
    lines.extend(f"% {comment}" for comment in comments)
    return "\n".join(lines) + "\n"
