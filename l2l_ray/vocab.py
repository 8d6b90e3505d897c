"""Words shared by the synthetic dataset (which writes sentences) and the lexical prior (which reads
them). Real RefCOCO sentences use the same kinds of words, so the lexical prior also reads them.
"""

from __future__ import annotations

# name -> RGB centre used by the synthetic renderer and by the lexical prior's colour model
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (210, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 210),
    "yellow": (230, 210, 40),
    "orange": (240, 130, 30),
    "purple": (140, 50, 170),
    "white": (235, 235, 235),
    "black": (25, 25, 25),
    "pink": (240, 140, 180),
    "brown": (130, 80, 40),
    "gray": (128, 128, 128),
}
COLOUR_SYNONYMS = {"grey": "gray", "dark": "black", "violet": "purple"}

# synthetic categories (shape families) and their synonyms in sentences
CATEGORIES: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "ball", "disc", "round thing"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle", "wedge"),
    "star": ("star",),
    "ring": ("ring", "donut"),
    "bar": ("bar", "stick", "rod"),
}

SIZE_WORDS = {"big": "large", "large": "large", "bigger": "large", "biggest": "large", "largest": "large",
              "small": "small", "little": "small", "tiny": "small", "smaller": "small", "smallest": "small"}

# spatial words -> canonical direction
SPATIAL_WORDS = {
    "left": "left", "leftmost": "left",
    "right": "right", "rightmost": "right",
    "top": "top", "upper": "top", "above": "top", "highest": "top",
    "bottom": "bottom", "lower": "bottom", "below": "bottom", "lowest": "bottom",
    "middle": "center", "center": "center", "centre": "center",
}

RELATION_WORDS = ("next to", "near", "beside", "left of", "right of", "above", "below", "closest to")
