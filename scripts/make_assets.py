"""Draw the example reference images in ``assets/`` (made here, so they are license-clean).

Each is a warm object on a cool background, 480x320 (the 3:2 shape of CogVideoX's 720x480), so a saliency model
(and the tests' tiny red-minus-blue stand-in for u2netp) finds the object. Run: ``python scripts/make_assets.py``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

logger = logging.getLogger("make_assets")

WIDTH, HEIGHT = 480, 320
ASSETS = Path(__file__).resolve().parents[1] / "assets"


def _vertical_gradient(top: tuple[int, int, int], bottom: tuple[int, int, int]) -> Image.Image:
    t = np.linspace(0.0, 1.0, HEIGHT)[:, None, None]
    rows = (1 - t) * np.array(top, float) + t * np.array(bottom, float)
    return Image.fromarray(np.repeat(rows, WIDTH, axis=1).astype(np.uint8))


def _grain(image: Image.Image, seed: int, amount: float = 6.0) -> Image.Image:
    # A little noise so the images look less like flat vector art (and video models see texture).
    rng = np.random.default_rng(seed)
    arr = np.asarray(image, dtype=np.float32) + rng.normal(0.0, amount, (HEIGHT, WIDTH, 1))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def balloon() -> Image.Image:
    """A red hot-air balloon over a blue sky with pale-blue clouds."""
    img = _vertical_gradient((40, 90, 190), (140, 190, 235))
    draw = ImageDraw.Draw(img)
    for cx, cy, r in ((70, 250, 40), (110, 240, 50), (150, 255, 35), (380, 80, 30), (415, 70, 40), (450, 85, 28)):
        draw.ellipse((cx - r, cy - r * 0.6, cx + r, cy + r * 0.6), fill=(185, 215, 245))
    img = img.filter(ImageFilter.GaussianBlur(2))
    draw = ImageDraw.Draw(img)
    draw.ellipse((190, 40, 290, 160), fill=(220, 50, 40))
    draw.polygon([(198, 125), (282, 125), (252, 188), (228, 188)], fill=(220, 50, 40))
    for x in (215, 240, 265):
        draw.line([(x, 45), (x - (x - 240) * 0.4, 185)], fill=(245, 170, 40), width=5)
    draw.line([(230, 188), (232, 212)], fill=(90, 50, 30), width=2)
    draw.line([(250, 188), (248, 212)], fill=(90, 50, 30), width=2)
    draw.rectangle((228, 210, 252, 232), fill=(150, 80, 40))
    return _grain(img, seed=1)


def lighthouse() -> Image.Image:
    """An orange-and-red lighthouse on a rock by a deep-blue sea at dusk."""
    img = _vertical_gradient((30, 40, 110), (60, 110, 180))
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, 220, WIDTH, HEIGHT), fill=(20, 60, 130))
    for y in range(228, HEIGHT, 12):
        draw.line([(0, y), (WIDTH, y + 3)], fill=(40, 90, 160), width=2)
    draw.polygon([(270, 230), (420, 230), (440, 260), (250, 262)], fill=(60, 60, 90))
    draw.polygon([(320, 230), (370, 230), (362, 90), (328, 90)], fill=(230, 80, 30))
    for y0 in (120, 170, 210):
        draw.rectangle((322, y0, 368, y0 + 15), fill=(200, 30, 30))
    draw.rectangle((322, 70, 368, 92), fill=(255, 210, 80))
    draw.polygon([(318, 70), (372, 70), (345, 48)], fill=(180, 30, 30))
    return _grain(img, seed=2)


def koi() -> Image.Image:
    """An orange koi in a blue-green pond with teal lily pads."""
    img = _vertical_gradient((20, 80, 140), (10, 60, 120))
    draw = ImageDraw.Draw(img)
    for cx, cy, r in ((80, 70, 38), (400, 250, 45), (420, 60, 30), (60, 260, 28)):
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(30, 120, 130))
        draw.pieslice((cx - r, cy - r, cx + r, cy + r), 300, 330, fill=(20, 80, 140))
    draw.ellipse((170, 130, 310, 190), fill=(245, 120, 30))
    draw.polygon([(305, 160), (360, 125), (350, 160), (360, 195)], fill=(240, 100, 30))
    draw.ellipse((200, 140, 240, 165), fill=(230, 60, 40))
    draw.ellipse((180, 150, 190, 160), fill=(20, 20, 30))
    img = img.filter(ImageFilter.GaussianBlur(1))
    return _grain(img, seed=3)


IMAGES = {"balloon.png": balloon, "lighthouse.png": lighthouse, "koi.png": koi}


def main() -> int:
    """Write every example image into ``--out`` (default: the repo's assets/)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ASSETS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    for name, draw in IMAGES.items():
        path = args.out / name
        draw().save(path, optimize=True)
        logger.info("wrote %s (%d bytes)", path, path.stat().st_size)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
