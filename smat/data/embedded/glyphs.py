"""Omniglot-like glyph domains drawn with matplotlib's bundled fonts.

One Unicode script (or symbol family) is one domain, one base character is one class, and each Unicode
block is an "alphabet" from which the class groups are drawn. Every image re-samples the font, the stroke
width, rotation, shear, scale, translation and an elastic warp, so a class is a character rather than a
rendering. Code points are kept only where a font really draws them, and near-identical characters (the
same shape at two code points) are merged so that two classes never look alike.
"""

from __future__ import annotations

import functools
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib import ft2font
from PIL import Image, ImageDraw, ImageFont

from smat.data.embedded.raster import (
    CANVAS,
    downsample,
    gray_to_rgb,
    ink_boxes,
    random_affine,
    smooth_field,
    to_uint8,
    warp,
)
from smat.data.embedded.writing import DomainImages

FONT_DIR = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
# Only the Unicode text families. Computer Modern (cm*) remaps Latin code points to math symbols,
# LastResort draws a placeholder box for everything, STIXNonUni / STIXSiz* / *Display are partial
# helper fonts (notes pitfall 3). The first font is the reference used to compare shapes.
FONT_FAMILIES = ("DejaVuSans", "DejaVuSerif", "STIXGeneral")
REFERENCE_FONT = "DejaVuSans.ttf"

RENDER_CANVAS = 96  # glyphs are drawn on a larger canvas, then warped into the 64-pixel frame
FONT_SIZE = 48  # em of 48 px in the 64-px frame (24 px of the 32-px image)
EM_FONT_SIZE = 40  # position-coded symbols: the whole em box (wide dominoes too) must fit
FIT = 54  # script glyphs larger than this (px, 64-px frame) are scaled down to fit
PROBE_SIZE = 24  # font size for coverage checks and shape comparison
MIN_INK_AREA = 9  # probe glyphs with a smaller ink box (px^2) count as empty


@dataclass(frozen=True)
class Block:
    name: str
    ranges: tuple[tuple[int, int], ...]  # inclusive code point ranges


@dataclass(frozen=True)
class Script:
    name: str
    blocks: tuple[Block, ...]
    categories: tuple[str, ...]  # Unicode general categories kept (letters, symbols)
    em_box: bool = False  # position-coded symbols keep their place in the em box (notes pitfall 2)
    distinct_from: tuple[str, ...] = ()  # drop characters that look like one of these scripts'
    duplicate_distance: float = 0.08  # shape difference (see `_distances`) below which two glyphs are one


LETTERS = ("Lu", "Ll", "Lt", "Lo")
SYMBOLS = ("Sm", "So")
ID_SCRIPTS = ("latin-greek", "cyrillic", "armenian-georgian", "syllabics", "rtl-scripts", "math-symbols")
SCRIPTS = {
    s.name: s
    for s in (
        Script("latin-greek", (
            Block("latin-basic", ((0x41, 0x5A), (0x61, 0x7A))),
            Block("latin-1", ((0xC0, 0xFF),)),
            Block("latin-ext-a", ((0x100, 0x17F),)),
            Block("latin-ext-b", ((0x180, 0x24F),)),
            Block("ipa", ((0x250, 0x2AF),)),
            Block("greek", ((0x370, 0x3FF),)),
        ), LETTERS),
        Script("cyrillic", (
            Block("cyrillic-basic", ((0x410, 0x44F),)),
            Block("cyrillic-ext", ((0x400, 0x40F), (0x450, 0x4FF))),
            Block("cyrillic-supplement", ((0x500, 0x52F),)),
        ), LETTERS),
        Script("armenian-georgian", (
            Block("armenian", ((0x531, 0x587),)),
            Block("georgian", ((0x10A0, 0x10FF),)),
        ), LETTERS),
        Script("syllabics", (
            Block("cree-ojibwe", ((0x1401, 0x14FF),)),
            Block("inuktitut-carrier", ((0x1500, 0x15FF),)),
            Block("syllabics-ext", ((0x1600, 0x167F),)),
        ), LETTERS),
        Script("rtl-scripts", (
            Block("hebrew", ((0x5D0, 0x5F2),)),
            Block("arabic", ((0x620, 0x6FF),)),
            Block("nko", ((0x7CA, 0x7EA),)),
        ), LETTERS),
        Script("math-symbols", (
            Block("arrows", ((0x2190, 0x21FF),)),
            Block("operators", ((0x2200, 0x22FF),)),
            Block("misc-math", ((0x27C0, 0x27EF), (0x2980, 0x29FF))),
            Block("supplemental-arrows", ((0x27F0, 0x27FF), (0x2900, 0x297F))),
            Block("supplemental-operators", ((0x2A00, 0x2AFF),)),
        ), SYMBOLS),
        Script("unseen-scripts", (
            Block("tifinagh", ((0x2D30, 0x2D7F),)),
            Block("lao", ((0xE80, 0xEFF),)),
            Block("lisu", ((0xA4D0, 0xA4F7),)),
            Block("ogham", ((0x1681, 0x169A),)),
            Block("old-italic", ((0x10300, 0x1031F),)),
        ), LETTERS, distinct_from=ID_SCRIPTS),
        Script("tiles", (
            Block("iching", ((0x4DC0, 0x4DFF),)),
            Block("dominoes", ((0x1F030, 0x1F093),)),
            Block("braille", ((0x2801, 0x28FF),)),
            Block("cards", ((0x1F0A1, 0x1F0F5),)),
        ), SYMBOLS, em_box=True, duplicate_distance=0.01),
    )
}


@dataclass(frozen=True)
class Glyph:
    code_point: int
    fonts: tuple[Path, ...]  # fonts that really draw it

    @property
    def class_name(self) -> str:
        return f"U{self.code_point:04X}"


def generate(name: str, group_sizes: list[int], n_images: int, rng: np.random.Generator) -> DomainImages:
    """Draw groups of the given sizes (each from one block, in order) and render `n_images` per class."""
    script = SCRIPTS[name]
    remaining = {block: list(glyphs) for block, glyphs in candidates(name).items()}
    taken = {block: 0 for block in remaining}
    names, images, groups = [], [], {}
    for size in group_sizes:
        blocks = [b for b, glyphs in remaining.items() if len(glyphs) >= size]
        if not blocks:
            raise ValueError(f"{name}: no block has {size} unused characters left")
        weights = np.array([len(remaining[b]) for b in blocks], dtype=float)
        block = blocks[rng.choice(len(blocks), p=weights / weights.sum())]
        picked = set(rng.choice(len(remaining[block]), size, replace=False).tolist())
        chosen = [g for i, g in enumerate(remaining[block]) if i in picked]
        remaining[block] = [g for i, g in enumerate(remaining[block]) if i not in picked]
        taken[block] += 1
        group = f"{block}-{taken[block]}"
        for glyph in chosen:
            names.append(glyph.class_name)
            images.append(render_class(glyph, n_images, rng, script.em_box))
            groups[glyph.class_name] = group
    return DomainImages(names, images, groups)


def render_class(glyph: Glyph, n: int, rng: np.random.Generator, em_box: bool) -> np.ndarray:
    """n augmented 32x32 renderings of one character: dark ink on white, like Omniglot."""
    fonts = rng.integers(len(glyph.fonts), size=n)
    strokes = rng.choice(3, size=n, p=[0.45, 0.4, 0.15])  # stroke width in px at 2x
    size = EM_FONT_SIZE if em_box else FONT_SIZE
    masks = np.stack([
        render(chr(glyph.code_point), glyph.fonts[f], size, RENDER_CANVAS, int(s))
        for f, s in zip(fonts, strokes)
    ])
    if em_box:
        center = np.full((n, 2), (RENDER_CANVAS - 1) / 2)
        inverse = random_affine(rng, n, center, rotation_deg=5, shear=0.08, scale=(0.95, 1.05),
                                translate_px=3)
    else:
        center, extent = ink_boxes(masks)
        inverse = random_affine(rng, n, center, rotation_deg=12, shear=0.2, scale=(0.88, 1.08),
                                translate_px=0.08 * CANVAS, base_scale=np.minimum(1.0, FIT / extent.max(axis=1)))
    field = smooth_field(rng, n, CANVAS, amplitude=0.8 if em_box else 1.6)
    ink = downsample(warp(masks[..., None], inverse, CANVAS, fill=0.0, displacement=field))
    return to_uint8(gray_to_rgb(1.0 - ink[..., 0]))


def render(char: str, font: Path, size: int, canvas: int, stroke: int = 0) -> np.ndarray:
    """White-on-black float mask (canvas, canvas) with the em box centred (anchor 'mm')."""
    image = Image.new("L", (canvas, canvas), 0)
    ImageDraw.Draw(image).text(
        (canvas / 2, canvas / 2), char, font=_font(font, size), fill=255, anchor="mm",
        stroke_width=stroke, stroke_fill=255,
    )
    return np.asarray(image, dtype=np.float32) / 255.0


def font_files() -> list[Path]:
    files = sorted(
        p for p in FONT_DIR.glob("*.ttf") if p.stem.startswith(FONT_FAMILIES) and "Display" not in p.stem
    )
    return sorted(files, key=lambda p: p.name != REFERENCE_FONT)


@functools.cache
def _font(path: Path, size: int) -> ImageFont.FreeTypeFont:
    # The basic layout engine renders one character identically whether or not libraqm is installed.
    return ImageFont.truetype(str(path), size, layout_engine=ImageFont.Layout.BASIC)


@functools.cache
def _charmap(path: Path) -> frozenset[int]:
    return frozenset(ft2font.FT2Font(str(path)).get_charmap())


@functools.cache
def _notdef(path: Path) -> tuple[tuple[int, int, int, int], bytes]:
    """Box and bitmap of the font's .notdef placeholder (drawn for U+10FFFF, a noncharacter)."""
    font = _font(path, PROBE_SIZE)
    return font.getbbox("\U0010FFFF"), bytes(font.getmask("\U0010FFFF"))


def _draws(path: Path, code_point: int) -> bool:
    """The font maps the code point to a real, non-empty glyph (not its placeholder)."""
    if code_point not in _charmap(path):
        return False
    font, char = _font(path, PROBE_SIZE), chr(code_point)
    left, top, right, bottom = box = font.getbbox(char)
    if (right - left) * (bottom - top) < MIN_INK_AREA:
        return False
    notdef_box, notdef_mask = _notdef(path)
    return box != notdef_box or bytes(font.getmask(char)) != notdef_mask


@functools.cache
def candidates(name: str) -> dict[str, tuple[Glyph, ...]]:
    """Per block, the distinct characters of a script that at least one font draws, in code point order."""
    script = SCRIPTS[name]
    fonts = font_files()
    glyphs = []
    for block in script.blocks:
        for low, high in block.ranges:
            for cp in range(low, high + 1):
                if unicodedata.category(chr(cp)) in script.categories:
                    drawn_by = tuple(f for f in fonts if _draws(f, cp))
                    if drawn_by:
                        glyphs.append((block.name, Glyph(cp, drawn_by)))
    others = [g for other in script.distinct_from for block in candidates(other).values() for g in block]
    shapes = np.stack([_shape(g, script.em_box) for g in others + [g for _, g in glyphs]])
    distance = _distances(shapes[len(others):], shapes)  # (candidates, others + candidates)
    # Greedy: a character is kept unless it looks like one kept before it (or like another script's).
    kept_columns = list(range(len(others)))
    kept: dict[str, list[Glyph]] = {block.name: [] for block in script.blocks}
    for i, (block_name, glyph) in enumerate(glyphs):
        if kept_columns and distance[i, kept_columns].min() < script.duplicate_distance:
            continue
        kept_columns.append(len(others) + i)
        kept[block_name].append(glyph)
    return {block: tuple(g) for block, g in kept.items()}


@functools.cache
def _shape(glyph: Glyph, em_box: bool) -> np.ndarray:
    """Small reference rendering (first font), flattened, to find duplicates: ink-centred unless em_box."""
    mask = render(chr(glyph.code_point), glyph.fonts[0], PROBE_SIZE, 48)
    if not em_box:
        center, _ = ink_boxes(mask[None])
        shift = np.rint(23.5 - center[0]).astype(int)
        mask = np.roll(mask, (shift[1], shift[0]), axis=(0, 1))
    return downsample(mask[None, :, :, None])[0, :, :, 0].ravel()


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Squared difference over total squared ink, for all pairs: 0 for one shape, 1 for disjoint shapes."""
    norm_a, norm_b = (a**2).sum(axis=1), (b**2).sum(axis=1)
    return 1.0 - 2.0 * (a @ b.T) / (norm_a[:, None] + norm_b[None, :])
