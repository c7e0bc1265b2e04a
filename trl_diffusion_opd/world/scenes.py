"""The world's scenes: prompt families, their metadata, and a deterministic renderer of ground-truth images.

Every image is `IMAGE_SIZE` x `IMAGE_SIZE` (32 x 32) RGB, uint8, on a uniform grey background. Objects are flat,
hard-edged (no anti-aliasing: every pixel is exactly the background or a palette colour) circles, squares and
upward triangles; letters are 5 x 7 bitmap glyphs drawn 4x (20 x 28 pixels) in black.

Prompt families (the `family` field of a scene's metadata):

| family | example | task |
|---|---|---|
| `single` | "a red circle" | composition, aesthetic |
| `counting` | "three blue squares" | composition |
| `position` | "a green triangle on the left" | composition |
| `binding` | "a red circle and a blue square" | composition, aesthetic |
| `letter` | "the letter K" | letters |

A scene is a pure function of `(seed, index)` (`scene_at`), so data streams, prompt sets and resumed pretraining are
reproducible bit for bit, and a batch can be rendered by any worker in any order.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

import numpy as np


IMAGE_SIZE = 32
BACKGROUND = (128, 128, 128)
# Saturated colours far apart in RGB (pairwise distance > 190), so that a pixel's colour is unambiguous.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 180, 30),
    "blue": (30, 60, 230),
    "yellow": (240, 220, 30),
}
INK = (20, 20, 20)  # letters
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "right", "top", "bottom")
COUNT_WORDS = {1: "a", 2: "two", 3: "three", 4: "four"}
WORD_COUNTS = {word: count for count, word in COUNT_WORDS.items()}
FAMILIES = ("single", "counting", "position", "binding", "letter")
# The tasks of the world and the prompt families each one trains on.
TASK_FAMILIES: dict[str, tuple[str, ...]] = {
    "composition": ("single", "counting", "position", "binding"),
    "letters": ("letter",),
    "aesthetic": ("single", "binding"),
}
# Mix of families in the pretraining stream: composition families with more degrees of freedom get more weight.
PRETRAIN_FAMILY_WEIGHTS = {"single": 0.15, "counting": 0.2, "position": 0.2, "binding": 0.25, "letter": 0.2}

# 5 x 7 bitmap glyphs ('#' = ink). Similar pairs (E/F, O/C, P/F) make the letter reward dense, not just right/wrong.
_GLYPH_ROWS = {
    "A": (".###.", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "C": (".###.", "#...#", "#....", "#....", "#....", "#...#", ".###."),
    "E": ("#####", "#....", "#....", "####.", "#....", "#....", "#####"),
    "F": ("#####", "#....", "#....", "####.", "#....", "#....", "#...."),
    "H": ("#...#", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "K": ("#...#", "#..#.", "#.#..", "##...", "#.#..", "#..#.", "#...#"),
    "L": ("#....", "#....", "#....", "#....", "#....", "#....", "#####"),
    "O": (".###.", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."),
    "P": ("####.", "#...#", "#...#", "####.", "#....", "#....", "#...."),
    "T": ("#####", "..#..", "..#..", "..#..", "..#..", "..#..", "..#.."),
    "X": ("#...#", "#...#", ".#.#.", "..#..", ".#.#.", "#...#", "#...#"),
    "Z": ("#####", "....#", "...#.", "..#..", ".#...", "#....", "#####"),
}
LETTERS = tuple(sorted(_GLYPH_ROWS))
GLYPH_SCALE = 4
GLYPH_HEIGHT, GLYPH_WIDTH = 7 * GLYPH_SCALE, 5 * GLYPH_SCALE  # 28 x 20 pixels
# A glyph's top-left corner moves by up to this many pixels from the centred position (x: ±3, y: ±2).
GLYPH_JITTER = (2, 3)


def glyph(letter: str) -> np.ndarray:
    """The `GLYPH_HEIGHT` x `GLYPH_WIDTH` boolean ink mask of `letter` (upper case, one of `LETTERS`)."""
    rows = _GLYPH_ROWS[letter.upper()]
    bitmap = np.array([[c == "#" for c in row] for row in rows], dtype=bool)
    return np.kron(bitmap, np.ones((GLYPH_SCALE, GLYPH_SCALE), dtype=bool))


@dataclass(frozen=True)
class WorldObject:
    """One flat object: `shape` of `color`, centred at (`cx`, `cy`) pixels, half-size `size` pixels."""

    shape: str
    color: str
    cx: float
    cy: float
    size: float


@dataclass
class Scene:
    """A prompt and the ground-truth picture of it.

    Attributes:
        prompt: The text.
        family: One of `FAMILIES`.
        objects: The objects drawn (empty for letters).
        letter: The letter drawn (`letter` family), else `None`.
        letter_xy: Top-left corner (x, y) of the glyph in pixels.
        requirements: What the prompt asks for (see `PromptSpec`), the same as `parse_prompt(prompt)` gives.
    """

    prompt: str
    family: str
    objects: list[WorldObject] = field(default_factory=list)
    letter: str | None = None
    letter_xy: tuple[int, int] | None = None

    @property
    def task(self) -> str:
        return "letters" if self.family == "letter" else "composition"

    def render(self) -> np.ndarray:
        """The ground-truth image: uint8 `(IMAGE_SIZE, IMAGE_SIZE, 3)`."""
        return render(self)

    def metadata(self) -> dict:
        """The prompt row: `prompt`, `task`, `family`, the parsed requirements and the drawn objects / letter."""
        row = {"prompt": self.prompt, "task": self.task, "family": self.family}
        row.update(parse_prompt(self.prompt).to_dict())
        row["objects"] = [asdict(o) for o in self.objects]
        if self.letter is not None:
            row["letter"] = self.letter
        return row


# ---------------------------------------------------------------------------------------------- prompt grammar
@dataclass(frozen=True)
class Requirement:
    """`count` objects of `color` and `shape`, each in the `position` half of the image when given."""

    color: str
    shape: str
    count: int = 1
    position: str | None = None


@dataclass(frozen=True)
class PromptSpec:
    """What a prompt asks for: object requirements (composition families) or a letter."""

    family: str
    requirements: tuple[Requirement, ...] = ()
    letter: str | None = None

    def to_dict(self) -> dict:
        return {
            "family": self.family,
            "requirements": [asdict(r) for r in self.requirements],
            "letter": self.letter,
        }


_COLOR = "|".join(COLORS)
_SHAPE = "|".join(SHAPES)
_COUNT = "|".join(COUNT_WORDS.values())
_LETTER_RE = re.compile(r"^the letter ([a-z])$")
_BINDING_RE = re.compile(rf"^a ({_COLOR}) ({_SHAPE}) and a ({_COLOR}) ({_SHAPE})$")
_OBJECT_RE = re.compile(rf"^({_COUNT}) ({_COLOR}) ({_SHAPE})s?(?: on the ({'|'.join(POSITIONS)}))?$")


def parse_prompt(prompt: str) -> PromptSpec:
    """The `PromptSpec` of a world prompt (case and surrounding spaces ignored).

    Raises:
        ValueError: the prompt is not in the world's grammar.
    """
    text = " ".join(prompt.lower().split())
    if match := _LETTER_RE.match(text):
        letter = match.group(1).upper()
        if letter not in LETTERS:
            raise ValueError(f"Letter {letter!r} is not in the world's alphabet {''.join(LETTERS)}.")
        return PromptSpec("letter", letter=letter)
    if match := _BINDING_RE.match(text):
        c1, s1, c2, s2 = match.groups()
        return PromptSpec("binding", (Requirement(c1, s1), Requirement(c2, s2)))
    if match := _OBJECT_RE.match(text):
        word, color, shape, position = match.groups()
        count = WORD_COUNTS[word]
        family = "position" if position else ("counting" if count > 1 else "single")
        return PromptSpec(family, (Requirement(color, shape, count, position),))
    raise ValueError(f"Prompt {prompt!r} is not a world prompt (e.g. 'a red circle', 'the letter K').")


def _object_phrase(count: int, color: str, shape: str) -> str:
    return f"{COUNT_WORDS[count]} {color} {shape}{'s' if count > 1 else ''}"


def all_prompts(family: str | None = None) -> list[str]:
    """Every prompt of `family` (all families when `None`), in a fixed order. 216 prompts in all."""
    families = FAMILIES if family is None else (family,)
    prompts: list[str] = []
    for fam in families:
        if fam == "letter":
            prompts += [f"the letter {letter}" for letter in LETTERS]
        elif fam in ("single", "counting"):
            counts = (1,) if fam == "single" else (2, 3, 4)
            prompts += [_object_phrase(n, c, s) for n in counts for c in COLORS for s in SHAPES]
        elif fam == "position":
            prompts += [f"a {c} {s} on the {p}" for p in POSITIONS for c in COLORS for s in SHAPES]
        elif fam == "binding":
            prompts += [
                f"a {c1} {s1} and a {c2} {s2}"
                for c1 in COLORS
                for s1 in SHAPES
                for c2 in COLORS
                for s2 in SHAPES
                if c1 != c2
            ]
        else:
            raise ValueError(f"Unknown family {fam!r}; families are {FAMILIES}.")
    return prompts


def vocabulary() -> list[str]:
    """Every word of every world prompt (lower case, as CLIP's tokenizer sees them), sorted."""
    return sorted({word for prompt in all_prompts() for word in prompt.lower().split()})


# ---------------------------------------------------------------------------------------------- sampling scenes
def _rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(index)])


def _place(rng: np.random.Generator, sizes: list[float], region: str | None = None, gap: float = 2.0):
    """Centres for objects of half-sizes `sizes`, inside the image (and inside `region`'s half when given), with
    at least `gap` pixels between bounding boxes so that objects never touch (a detector sees each one)."""
    half = IMAGE_SIZE / 2
    for _ in range(200):
        centres: list[tuple[float, float]] = []
        for size in sizes:
            lo_x, hi_x = size + 1.0, IMAGE_SIZE - size - 1.0
            lo_y, hi_y = lo_x, hi_x
            if region == "left":
                hi_x = half - size - 1.0
            elif region == "right":
                lo_x = half + size + 1.0
            elif region == "top":
                hi_y = half - size - 1.0
            elif region == "bottom":
                lo_y = half + size + 1.0
            for _ in range(50):
                cx, cy = rng.uniform(lo_x, hi_x), rng.uniform(lo_y, hi_y)
                if all(
                    max(abs(cx - x), abs(cy - y)) >= size + other + gap
                    for (x, y), other in zip(centres, sizes, strict=False)
                ):
                    centres.append((cx, cy))
                    break
            else:
                break
        if len(centres) == len(sizes):
            return centres
    raise RuntimeError(f"Could not place objects of sizes {sizes} in region {region!r}.")  # pragma: no cover


def sample_scene(rng: np.random.Generator, family: str) -> Scene:
    """A random scene of `family` drawn with `rng`."""
    colors, shapes = list(COLORS), list(SHAPES)
    if family == "letter":
        letter = LETTERS[rng.integers(len(LETTERS))]
        jy, jx = GLYPH_JITTER
        x0 = (IMAGE_SIZE - GLYPH_WIDTH) // 2 + int(rng.integers(-jx, jx + 1))
        y0 = (IMAGE_SIZE - GLYPH_HEIGHT) // 2 + int(rng.integers(-jy, jy + 1))
        return Scene(f"the letter {letter}", family, letter=letter, letter_xy=(x0, y0))
    if family == "binding":
        c1, c2 = rng.choice(len(colors), size=2, replace=False)
        s1, s2 = rng.integers(len(shapes), size=2)
        sizes = [float(rng.uniform(4.0, 6.0)) for _ in range(2)]
        centres = _place(rng, sizes)
        objects = [
            WorldObject(shapes[s], colors[c], x, y, size)
            for (x, y), size, c, s in zip(centres, sizes, (c1, c2), (s1, s2), strict=True)
        ]
        prompt = f"a {colors[c1]} {shapes[s1]} and a {colors[c2]} {shapes[s2]}"
        return Scene(prompt, family, objects)
    color, shape = colors[rng.integers(len(colors))], shapes[rng.integers(len(shapes))]
    if family == "single":
        count, position, sizes = 1, None, [float(rng.uniform(4.0, 7.0))]
    elif family == "counting":
        count, position = int(rng.integers(2, 5)), None
        sizes = [float(rng.uniform(3.3, 4.5)) for _ in range(count)]  # radius 3 circles look square
    elif family == "position":
        count, position = 1, POSITIONS[rng.integers(len(POSITIONS))]
        sizes = [float(rng.uniform(3.5, 5.5))]
    else:
        raise ValueError(f"Unknown family {family!r}; families are {FAMILIES}.")
    centres = _place(rng, sizes, position)
    objects = [WorldObject(shape, color, x, y, size) for (x, y), size in zip(centres, sizes, strict=True)]
    prompt = _object_phrase(count, color, shape) + (f" on the {position}" if position else "")
    return Scene(prompt, family, objects)


def scene_at(seed: int, index: int, families: dict[str, float] | tuple[str, ...] | None = None) -> Scene:
    """Scene number `index` of the stream `seed`: a pure function of its arguments.

    Args:
        seed: The stream.
        index: Position in the stream (any non-negative integer).
        families: Family weights (`PRETRAIN_FAMILY_WEIGHTS` when `None`), or a tuple of equally likely families.
    """
    weights = PRETRAIN_FAMILY_WEIGHTS if families is None else families
    if not isinstance(weights, dict):
        weights = dict.fromkeys(weights, 1.0)
    names = list(weights)
    p = np.asarray([weights[n] for n in names], dtype=np.float64)
    rng = _rng(seed, index)
    family = names[rng.choice(len(names), p=p / p.sum())]
    return sample_scene(rng, family)


def scenes(n: int, seed: int = 0, families: dict[str, float] | tuple[str, ...] | None = None) -> list[Scene]:
    """Scenes `0..n-1` of the stream `seed`."""
    return [scene_at(seed, i, families) for i in range(n)]


def task_scenes(task: str, n: int, seed: int = 0) -> list[Scene]:
    """`n` scenes of `task`'s families (`TASK_FAMILIES`), equally weighted."""
    if task not in TASK_FAMILIES:
        raise ValueError(f"Unknown world task {task!r}; tasks are {list(TASK_FAMILIES)}.")
    return scenes(n, seed, TASK_FAMILIES[task])


def task_prompts(task: str, n: int, seed: int = 0) -> list[dict]:
    """`n` prompt rows of `task` (the rows a trainer or an evaluation takes: `prompt`, `task`, metadata)."""
    rows = [scene.metadata() for scene in task_scenes(task, n, seed)]
    for row in rows:
        row["task"] = task
    return rows


# ---------------------------------------------------------------------------------------------- rendering
_YY, _XX = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32) + 0.5  # pixel centres


def shape_mask(shape: str, cx: float, cy: float, size: float) -> np.ndarray:
    """Boolean `(IMAGE_SIZE, IMAGE_SIZE)` mask of pixels whose centre lies inside the shape."""
    dx, dy = _XX - cx, _YY - cy
    if shape == "circle":
        return dx * dx + dy * dy <= size * size
    if shape == "square":
        side = size * 0.9  # the same visual weight as a circle of radius `size`
        return (np.abs(dx) <= side) & (np.abs(dy) <= side)
    if shape == "triangle":
        # apex at the top centre, base along the bottom edge of the size x size box
        return (dy <= size) & (dy >= -size) & (np.abs(dx) <= (dy + size) / 2.0)
    raise ValueError(f"Unknown shape {shape!r}; shapes are {SHAPES}.")


def render(scene: Scene) -> np.ndarray:
    """The ground-truth image of `scene`: uint8 `(IMAGE_SIZE, IMAGE_SIZE, 3)`."""
    image = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    for obj in scene.objects:
        image[shape_mask(obj.shape, obj.cx, obj.cy, obj.size)] = COLORS[obj.color]
    if scene.letter is not None:
        x0, y0 = scene.letter_xy
        window = image[y0 : y0 + GLYPH_HEIGHT, x0 : x0 + GLYPH_WIDTH]
        window[glyph(scene.letter)] = INK
    return image


def render_batch(batch: list[Scene]) -> np.ndarray:
    """Images of `batch`: uint8 `(B, IMAGE_SIZE, IMAGE_SIZE, 3)`."""
    return (
        np.stack([render(scene) for scene in batch]) if batch else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    )
