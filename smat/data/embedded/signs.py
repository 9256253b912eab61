"""GTSRB-like traffic-sign domain: a class is a sign (shape, colour scheme, symbol).

Shapes and colour schemes are paired as on real roads (red-ringed circles, blue discs, red-bordered
triangles, red octagons, yellow diamonds, ...) with symbols such as speed limits, arrows and pictograms,
so that, as in GTSRB, many classes differ only in their symbol. Every image places the sign at a new scale,
angle and slant over a new street-like background, under new lighting, blur and sensor noise.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from smat.data.embedded.glyphs import FONT_DIR
from smat.data.embedded.raster import CANVAS, downsample, random_affine, to_uint8, upsample, warp
from smat.data.embedded.writing import DomainImages

SYMBOL_FONT = FONT_DIR / "DejaVuSans-Bold.ttf"
COLOURS = {
    "red": (200, 30, 35), "white": (240, 240, 235), "black": (25, 25, 25), "blue": (20, 70, 170),
    "yellow": (245, 200, 30), "green": (20, 120, 60),
}
SCHEMES = {  # name: (border, fill, symbol)
    "ring": ("red", "white", "black"),
    "blue": ("white", "blue", "white"),
    "yellow": ("black", "yellow", "black"),
    "red": ("white", "red", "white"),
    "green": ("white", "green", "white"),
    "plain": ("black", "white", "black"),
}
SIGN_TYPES = (  # (shape, scheme) pairs seen on roads
    ("circle", "ring"), ("circle", "blue"), ("circle", "plain"), ("triangle", "ring"),
    ("triangle", "yellow"), ("yield", "ring"), ("yield", "plain"), ("octagon", "red"), ("diamond", "yellow"),
    ("diamond", "plain"), ("square", "blue"), ("square", "green"), ("square", "plain"), ("square", "yellow"),
)
SHAPES = {"circle": (0, 0.0), "triangle": (3, 0.0), "yield": (3, 180.0), "octagon": (8, 0.0),
          "diamond": (4, 45.0), "square": (4, 0.0)}  # sides (0 = circle), PIL's polygon rotation
SYMBOLS = {
    **{f"speed{v}": str(v) for v in (20, 30, 40, 50, 60, 70, 80, 90, 100, 120)},
    "P": "P", "H": "H", "info": "i", "danger": "!", "up": "\u2191", "right": "\u2192", "left": "\u2190",
    "turn-left": "\u21b0", "turn-right": "\u21b1", "u-turn": "\u21b6", "two-way": "\u21c5",
    "plane": "\u2708", "umbrella": "\u2602", "lightning": "\u26a1", "snow": "\u2744", "wheelchair": "\u267f",
    "radiation": "\u2622", "cross": "\u2716", "plus": "\u271a", "hot": "\u2668", "flag": "\u2691",
    "anchor": "\u2693", "phone": "\u260e", "recycle": "\u267b", "sun": "\u2600", "star": "\u2605",
    "gear": "\u2699", "scissors": "\u2702", "house": "\u2302", "bar": "", "slash": "", "blank": "",
}
# Street-scene colours for the backgrounds: sky, foliage, asphalt, walls, shadow.
BACKGROUND = np.array([(0.55, 0.7, 0.9), (0.25, 0.4, 0.2), (0.4, 0.5, 0.3), (0.45, 0.45, 0.45),
                       (0.6, 0.55, 0.5), (0.3, 0.25, 0.2), (0.15, 0.15, 0.18), (0.75, 0.75, 0.7)])
RADIUS = 30.0  # sign radius (px) in the 64-px template


def generate(n_classes: int, n_images: int, rng: np.random.Generator) -> DomainImages:
    combos = [(shape, scheme, symbol) for shape, scheme in SIGN_TYPES for symbol in SYMBOLS]
    if n_classes > len(combos):
        raise ValueError(f"signs: at most {len(combos)} classes, asked for {n_classes}")
    chosen = sorted(rng.choice(len(combos), n_classes, replace=False).tolist())
    names, images = [], []
    for index in chosen:
        shape, scheme, symbol = combos[index]
        names.append(f"{shape}-{scheme}-{symbol}")
        images.append(_render(_template(shape, scheme, symbol), n_images, rng))
    return DomainImages(names, images)


@functools.cache
def _template(shape: str, scheme: str, symbol: str) -> np.ndarray:
    """RGBA float (64, 64, 4) of the sign, centred, on a transparent background."""
    border, fill, ink = (COLOURS[c] for c in SCHEMES[scheme])
    image = Image.new("RGBA", (CANVAS, CANVAS), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    centre = (CANVAS - 1) / 2
    sides, rotation = SHAPES[shape]
    band = RADIUS * (0.2 if scheme == "ring" else 0.1)
    for radius, colour in ((RADIUS, border), (RADIUS - band, fill)):
        if sides == 0:
            draw.ellipse((centre - radius, centre - radius, centre + radius, centre + radius), fill=colour)
        else:
            # A polygon's inner border must stay `band` wide along the edges, not just at the corners.
            radius = radius if radius == RADIUS else RADIUS - band / np.cos(np.pi / sides)
            draw.regular_polygon((centre, centre, radius), sides, rotation=rotation, fill=colour)
    # Symbols sit a little low in upright triangles and high in yield signs, where the room is.
    dy = {"triangle": 4.0, "yield": -6.0}.get(shape, 0.0)
    text = SYMBOLS[symbol]
    if symbol == "bar":
        draw.rectangle((centre - 17, centre - 4 + dy, centre + 17, centre + 4 + dy), fill=ink)
    elif symbol == "slash":
        draw.line((centre - 14, centre + 14 + dy, centre + 14, centre - 14 + dy), fill=ink, width=5)
    elif text:
        size = {1: 28, 2: 22, 3: 17}[len(text)] - (6 if shape in ("triangle", "yield") else 0)
        font = ImageFont.truetype(str(SYMBOL_FONT), size, layout_engine=ImageFont.Layout.BASIC)
        draw.text((centre, centre + dy), text, font=font, fill=ink, anchor="mm")
    return np.asarray(image, dtype=np.float32) / 255.0


def _render(template: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    centre = np.full((n, 2), (CANVAS - 1) / 2)
    # A narrower sign (aspect < 1) is one seen from the side.
    inverse = random_affine(rng, n, centre, rotation_deg=6, shear=0.12, scale=(0.6, 0.95), translate_px=4,
                            aspect=(0.8, 1.05))
    sign = warp(np.broadcast_to(template, (n,) + template.shape), inverse, CANVAS, fill=0.0)
    images = sign[..., :3] * sign[..., 3:] + _background(rng, n) * (1 - sign[..., 3:])
    images = downsample(images)
    blurred = 0.5 * images + 0.125 * (np.roll(images, 1, 1) + np.roll(images, -1, 1)
                                      + np.roll(images, 1, 2) + np.roll(images, -1, 2))
    images = np.where(rng.random((n, 1, 1, 1)) < 0.4, blurred, images)  # motion / focus blur
    exposure = rng.uniform(0.3, 1.3, (n, 1, 1, 1))  # GTSRB has many dark, some washed-out photos
    cast = rng.normal(1.0, 0.06, (n, 1, 1, 3))
    images = images * exposure * cast + rng.normal(0, 0.025, images.shape)
    return to_uint8(images)


def _background(rng: np.random.Generator, n: int) -> np.ndarray:
    """Smooth street-like colour fields with finer detail: (n, 64, 64, 3)."""
    coarse = BACKGROUND[rng.integers(len(BACKGROUND), size=(n, 3, 3))] + rng.normal(0, 0.03, (n, 3, 3, 3))
    detail = rng.normal(0, 0.08, (n, 12, 12, 1))
    return (upsample(coarse, CANVAS) + upsample(detail, CANVAS)).astype(np.float32)
