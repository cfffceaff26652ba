"""Fixed RGB colours for plot lines and bars, so they look the same in every terminal and theme
(named ANSI colours are remapped by the terminal's palette and by Textual's theme)."""

from __future__ import annotations

RGB = {
    "blue": (0, 130, 200), "green": (60, 180, 75), "red": (230, 25, 75), "yellow": (255, 200, 25),
    "orange": (245, 130, 48), "purple": (145, 30, 180), "cyan": (70, 220, 240), "magenta": (240, 50, 230),
    "grey": (128, 128, 128), "white": (230, 230, 230),
}


def hex_color(name: str) -> str:
    """'#rrggbb' for Rich styles."""
    return "#{:02x}{:02x}{:02x}".format(*RGB[name])
