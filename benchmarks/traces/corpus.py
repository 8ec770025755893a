"""The traces' corpus: 120 distinct originals of 1600-4000 px derived from the shared seed photos.

Deterministic (seeded crops, quarter turns, scales, colour shifts and JPEG/PNG re-encodes), written once to
benchmarks/.traces/corpus/ (never committed) and reused while the recipe is unchanged.
Run alone: `cd benchmarks && ../.venv/bin/python -m traces.corpus`.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import pyvips
from harness import IMAGES

RECIPE = 2  # bump when the recipe changes: the cached corpus is rebuilt
COUNT = 120
CACHE = Path(__file__).resolve().parents[1] / ".traces" / "corpus"
# (seed file, weight): the two photos mostly, the PNG with alpha now and then
SEEDS = (("photo-4000x3000.jpg", 6), ("2569067123_aca715a2ee_o.jpg", 4), ("alpha-premultiply-2048x1536-paper.png", 1))


@dataclass(frozen=True)
class Original:
    file: str  # name inside the corpus directory
    width: int
    height: int
    kind: Literal["jpeg", "png"]
    seed: str

    def path(self, root: Path = CACHE) -> Path:
        return root / self.file


def _derive(rng: random.Random, index: int) -> tuple[pyvips.Image, str, dict]:
    """One original's pixels, its seed, and how it is saved."""
    seed = rng.choices([name for name, _ in SEEDS], [weight for _, weight in SEEDS])[0]
    image = pyvips.Image.new_from_file(str(IMAGES / seed))
    fw, fh = rng.uniform(0.55, 1.0), rng.uniform(0.55, 1.0)
    cw, ch = max(int(image.width * fw), 64), max(int(image.height * fh), 64)
    image = image.crop(rng.randint(0, image.width - cw), rng.randint(0, image.height - ch), cw, ch)
    turn = rng.choices([0, 90, 180, 270], [14, 3, 1, 2])[0]
    if turn:
        image = image.rot(f"d{turn}")
    png = seed.endswith(".png") or index % 12 == 7  # ~15% PNG, the alpha seed always
    longest = rng.randint(1600, 2400 if png else 4000)  # PNG photos of 4000 px would be 20+ MB
    image = image.resize(longest / max(image.width, image.height), kernel="lanczos3")
    gain = [rng.uniform(0.9, 1.1) for _ in range(3)]  # distinct pixels even where crops overlap
    colour, alpha = (image[:3], image[3:]) if image.bands == 4 else (image, None)
    colour = (colour * gain).cast("uchar")
    image = colour.bandjoin(alpha) if alpha is not None else colour
    if png:
        return image, seed, {"suffix": ".png", "compression": 6}
    return image, seed, {"suffix": ".jpg", "Q": rng.randint(78, 95), "interlace": rng.random() < 0.2}


def build(root: Path = CACHE) -> list[Original]:
    """The corpus, generated into `root` unless a complete one of this recipe is there already."""
    manifest = root / "manifest.json"
    if manifest.exists():
        saved = json.loads(manifest.read_text())
        if saved["recipe"] == RECIPE and all((root / o["file"]).exists() for o in saved["originals"]):
            return [Original(**o) for o in saved["originals"]]
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(16)
    originals = []
    for index in range(COUNT):
        image, seed, save = _derive(rng, index)
        suffix = save.pop("suffix")
        original = Original(
            f"o{index:03d}{suffix}", image.width, image.height, "png" if suffix == ".png" else "jpeg", seed
        )
        image.write_to_file(str(original.path(root)), **save)
        originals.append(original)
    manifest.write_text(json.dumps({"recipe": RECIPE, "originals": [asdict(o) for o in originals]}, indent=1))
    return originals


if __name__ == "__main__":
    corpus = build()
    sizes = sum(o.path().stat().st_size for o in corpus)
    print(f"{len(corpus)} originals in {CACHE}, {sizes / 2**20:.0f} MiB")
