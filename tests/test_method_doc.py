"""docs/METHOD.md is the document that code comments cite as "METHOD §x.y": every cited section must exist.

(a) Every citation "METHOD §N(.N)*" in the repository's code, configs and docs, including lists
("§1.10, §2.3", "§3.4/§3.5") and ranges ("§1.10-1.11", "§5.3–5.5"), names a numbered heading of
docs/METHOD.md. (b) No file still cites the old, unpublished document by "spec" + section sign.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHOD = ROOT / "docs" / "METHOD.md"
SCANNED = ("smat", "workflow", "Snakefile", "benchmarks", "config", "tests", "README.md", "docs")
SKIP_DIRS = {"__pycache__", ".snakemake", ".pytest_cache", ".git"}
MAX_BYTES = 2_000_000                    # larger files are data, not text with citations

SECTION = "\u00a7"                        # written as an escape so this file does not match its own checks
NUMBER = r"\d+(?:\.\d+)*"
# One citation with its continuations: "METHOD §1.10, §2.3", "METHOD §3.4/§3.5", "METHOD §5.3–5.5".
CITATION = re.compile(rf"METHOD {SECTION}({NUMBER})((?:\s*(?:[,/]|and)\s*{SECTION}{NUMBER}"
                      rf"|\s*[-\u2013]\s*{SECTION}?{NUMBER})*)")
CONTINUATION = re.compile(rf"\s*([,/]|and|[-\u2013])\s*{SECTION}?({NUMBER})")
HEADING = re.compile(rf"^#+\s+({NUMBER})\.?\s", re.MULTILINE)
OLD_CITATION = "spec " + SECTION


def text_files() -> list[Path]:
    files = []
    for name in SCANNED:
        path = ROOT / name
        candidates = [path] if path.is_file() else sorted(path.rglob("*")) if path.is_dir() else []
        for candidate in candidates:
            if not candidate.is_file() or SKIP_DIRS & set(candidate.relative_to(ROOT).parts):
                continue
            if candidate.stat().st_size > MAX_BYTES:
                continue
            try:
                text = candidate.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                continue                 # binary (weights, images)
            if "\x00" not in text:
                files.append(candidate)
    return files


def expand_range(first: str, last: str) -> list[str]:
    """"5.3"-"5.5" -> 5.3, 5.4, 5.5; endpoints only when the two numbers differ above the last level."""
    a, b = first.split("."), last.split(".")
    if len(a) == len(b) and a[:-1] == b[:-1] and int(a[-1]) <= int(b[-1]):
        return [".".join(a[:-1] + [str(i)]) for i in range(int(a[-1]), int(b[-1]) + 1)]
    return [first, last]


def cited_sections(line: str) -> list[str]:
    sections = []
    for match in CITATION.finditer(line):
        numbers = [match.group(1)]
        for separator, number in CONTINUATION.findall(match.group(2)):
            if separator in ("-", "\u2013"):
                numbers[-1:] = expand_range(numbers[-1], number)
            else:
                numbers.append(number)
        sections.extend(numbers)
    return sections


def citations() -> dict[str, list[str]]:
    """{section number: ["file:line", ...]} over every scanned file."""
    found: dict[str, list[str]] = {}
    for path in text_files():
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            for number in cited_sections(line):
                found.setdefault(number, []).append(f"{path.relative_to(ROOT)}:{lineno}")
    return found


def test_citation_parser():
    s = SECTION
    assert cited_sections(f"(METHOD {s}1.10, {s}2.3)") == ["1.10", "2.3"]
    assert cited_sections(f"METHOD {s}3.4/{s}3.5 and METHOD {s}7, bug 2") == ["3.4", "3.5", "7"]
    assert cited_sections(f"METHOD {s}5.3\u20135.5; METHOD {s}1-2") == ["5.3", "5.4", "5.5", "1", "2"]
    assert cited_sections(f"METHOD {s}2.2. Next sentence, METHOD {s}1.1: 21,665,664") == ["2.2", "1.1"]
    assert cited_sections(f"METHOD {s}3.1 rule 4") == ["3.1"]


def test_method_doc_has_a_heading_for_every_cited_section():
    assert METHOD.is_file(), f"{METHOD.relative_to(ROOT)} is missing"
    headings = set(HEADING.findall(METHOD.read_text(encoding="utf-8")))
    found = citations()
    assert found, f"no 'METHOD {SECTION}' citation found under {', '.join(SCANNED)}: is the scan broken?"
    missing = {number: places for number, places in found.items() if number not in headings}
    report = "\n".join(f"  {SECTION}{number}: {', '.join(places)}" for number, places in sorted(missing.items()))
    assert not missing, f"cited sections without a heading in docs/METHOD.md:\n{report}"


def test_method_doc_headings_are_unique():
    numbers = HEADING.findall(METHOD.read_text(encoding="utf-8"))
    duplicates = sorted({n for n in numbers if numbers.count(n) > 1})
    assert not duplicates, f"section numbers used by more than one heading of docs/METHOD.md: {duplicates}"


def test_no_citation_of_the_old_document():
    stale = [f"{path.relative_to(ROOT)}:{lineno}: {line.strip()}"
             for path in text_files()
             for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
             if OLD_CITATION in line]
    report = "\n".join(f"  {entry}" for entry in stale)
    assert not stale, f"citations of the old document; cite docs/METHOD.md as 'METHOD {SECTION}x.y':\n{report}"
