"""Captioned videos of moving coloured shapes, made locally, and a probe that reads them back.

A video is described by its *attributes*::

    {"objects": [{"shape": "circle", "colour": "red", "motion": "left"}], "background": "plain"}

``render_video`` draws them (anti-aliased through signed distances, so it works from 16x16 pixels up),
``caption_of`` writes the caption ("a red circle moves left"), and ``estimate_attributes`` recovers
colour, motion and shape from pixels alone. ``caption_adherence`` uses the probe to measure how often
generated videos show what their captions say.

Some (shape, colour, motion) combinations never appear in the training split (``HELDOUT``): the
validation split is made of them only, so it measures composition, not memory. Every shape, colour
and motion still appears in training.
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from flowvid.checks import check_count, check_positive
from flowvid.data.manifest import MANIFEST_NAME, load_manifest, new_manifest, write_manifest
from flowvid.data.shards import ShardFolderWriter, encode_sample, replace_shard_folder, staging_folder
from flowvid.paths import check_output_folder

SHAPES = ("circle", "square", "triangle")
# Saturated, far apart in RGB (the closest pair, blue/cyan, is ~120 apart) and far from the dark
# backgrounds, so a pixel's nearest palette colour names its object.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (235, 215, 40),
    "magenta": (215, 60, 220),
    "cyan": (40, 210, 220),
}
MOTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
BACKGROUNDS = ("plain", "textured")
#: Objects per video at most, unless a dataset asks for fewer.
DEFAULT_MAX_OBJECTS = 2
# Each shape needs about half the frame to itself: a third object would be drawn over the others.
MAX_OBJECTS = 2
# Below 8 pixels a shape covers a few pixels or none, and 2 frames are the least that show motion:
# a smaller dataset's captions would name objects and motions its videos do not show.
MIN_DATASET_SIZE = 8
MIN_DATASET_FRAMES = 2
#: The most bytes one clip of a dataset (frames x size x size x 3) may hold, 64 frames of 576x576 say:
#: drawing a clip takes about 20 times its bytes in memory.
MAX_CLIP_BYTES = 64 * 2**20

Combination = tuple[str, str, str]  # (shape, colour, motion)
ALL_COMBINATIONS: tuple[Combination, ...] = tuple(itertools.product(SHAPES, COLOURS, MOTIONS))
# One combination in six, chosen so that every shape, colour and motion stays in training.
HELDOUT: frozenset[Combination] = frozenset(
    (shape, colour, motion)
    for (i, shape), (j, colour), (k, motion) in itertools.product(
        enumerate(SHAPES), enumerate(COLOURS), enumerate(MOTIONS)
    )
    if (i + j + k) % 6 == 0
)
TRAIN_COMBINATIONS: tuple[Combination, ...] = tuple(c for c in ALL_COMBINATIONS if c not in HELDOUT)
HELDOUT_COMBINATIONS: tuple[Combination, ...] = tuple(c for c in ALL_COMBINATIONS if c in HELDOUT)

RADIUS = 0.18  # object radius as a fraction of the frame's shorter side
TRAVEL = 0.4  # distance an object covers during the clip, as a fraction of the frame's side


def caption_of(attributes: dict[str, Any]) -> str:
    """"a red circle moves left", or two clauses joined by "and" for two objects."""
    clauses = [f"a {o['colour']} {o['shape']} moves {o['motion']}" for o in attributes["objects"]]
    return " and ".join(clauses)


def sample_attributes(
    rng: np.random.Generator,
    combinations: Sequence[Combination],
    max_objects: int = DEFAULT_MAX_OBJECTS,
    backgrounds: Sequence[str] = BACKGROUNDS,
) -> dict[str, Any]:
    """One to ``max_objects`` objects of distinct colours drawn from ``combinations``, and a background."""
    check_scene_options(max_objects, backgrounds)
    colours = sorted({colour for _, colour, _ in combinations})
    if len(colours) < max_objects:
        raise ValueError(f"{max_objects} objects of distinct colours need combinations in {max_objects} colours or "
                         f"more, got {colours}: pass more combinations or a smaller max_objects")
    num_objects = int(rng.integers(1, max_objects + 1))
    objects: list[dict[str, str]] = []
    while len(objects) < num_objects:
        shape, colour, motion = combinations[int(rng.integers(len(combinations)))]
        if all(o["colour"] != colour for o in objects):  # the probe tells objects apart by colour
            objects.append({"shape": shape, "colour": colour, "motion": motion})
    return {"objects": objects, "background": backgrounds[int(rng.integers(len(backgrounds)))]}


def check_scene_options(max_objects: int, backgrounds: Sequence[str], name_of: Callable[[str], str] = str) -> None:
    """Raise a ValueError unless 1 <= ``max_objects`` <= ``MAX_OBJECTS``, and ``backgrounds`` are known ones.
    ``name_of`` spells each argument's name as the caller took it (``--max-objects`` on a command line)."""
    if not 1 <= max_objects <= MAX_OBJECTS:
        raise ValueError(f"{name_of('max_objects')} must be between 1 and {MAX_OBJECTS} (a frame holds no more "
                         f"shapes apart), got {max_objects}")
    if not backgrounds or any(b not in BACKGROUNDS for b in backgrounds):
        raise ValueError(f"{name_of('backgrounds')} must be a non-empty subset of {list(BACKGROUNDS)}, "
                         f"got {list(backgrounds)}")


def check_video_options(frames: int, size: int | tuple[int, int], fps: float) -> None:
    """Raise a ValueError unless videos of ``frames`` x ``size`` pixels at ``fps`` can be drawn."""
    height, width = (size, size) if isinstance(size, int) else size
    if frames < 1 or height < 4 or width < 4 or not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"need frames >= 1, size >= 4 and a finite fps > 0, "
                         f"got frames={frames}, size={size}, fps={fps}")


def check_attributes(attributes: dict[str, Any]) -> None:
    """Raise a ValueError naming the first attribute outside the vocabulary."""
    objects = attributes.get("objects")
    if not objects:
        raise ValueError(f"attributes need a non-empty 'objects' list, got {attributes!r}")
    for obj in objects:
        for key, vocabulary in (("shape", SHAPES), ("colour", COLOURS), ("motion", MOTIONS)):
            if obj.get(key) not in vocabulary:
                raise ValueError(f"{key} must be one of {sorted(vocabulary)}, got {obj.get(key)!r}")
    if attributes.get("background", "plain") not in BACKGROUNDS:
        raise ValueError(f"background must be one of {list(BACKGROUNDS)}, got {attributes['background']!r}")


def render_video(
    attributes: dict[str, Any], frames: int, size: int | tuple[int, int], fps: float = 8.0, seed: int = 0
) -> np.ndarray:
    """Draw the attributes as a uint8 video ``(frames, height, width, 3)``.

    ``seed`` fixes everything the attributes leave open (start positions, object size, background
    shade and texture); the same arguments always give the same pixels. Each object crosses
    ``TRAVEL`` of the frame during the clip, whatever its length. ``fps`` does not change the pixels:
    it is the rate the clip is meant to be played at and is recorded beside it.
    """
    check_attributes(attributes)
    check_video_options(frames, size, fps)
    height, width = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    canvas = _background(rng, attributes.get("background", "plain"), height, width)
    video = np.broadcast_to(canvas, (frames, height, width, 3)).copy()
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5  # pixel centres
    radius = RADIUS * min(height, width) * rng.uniform(0.95, 1.05)
    tracks = _tracks(rng, attributes["objects"], frames, height, width, radius)
    for obj, (cx, cy) in zip(attributes["objects"], tracks):
        # Distances to the object's edge per frame, (frames, height, width); negative inside.
        dx = xs[None] - cx[:, None, None]
        dy = ys[None] - cy[:, None, None]
        alpha = np.clip(0.5 - _signed_distance(obj["shape"], dx, dy, radius), 0.0, 1.0)[..., None]
        video = video * (1.0 - alpha) + alpha * np.asarray(COLOURS[obj["colour"]], np.float32)
    return np.round(video).astype(np.uint8)


def _background(rng: np.random.Generator, kind: str, height: int, width: int) -> np.ndarray:
    base = rng.uniform(12, 45) + rng.uniform(-6, 6, size=3)  # dark, slightly tinted
    canvas = np.broadcast_to(base.astype(np.float32), (height, width, 3)).copy()
    if kind == "textured":
        # Soft checkerboard of random cell size and phase: structure without saturated colour.
        cell = rng.uniform(2.0, max(2.5, min(height, width) / 3))
        ys, xs = np.mgrid[0:height, 0:width] + rng.uniform(0, cell, size=(2, 1, 1))
        checker = ((ys // cell + xs // cell) % 2).astype(np.float32)
        canvas += (checker * rng.uniform(10, 20))[..., None]
    return canvas


def _tracks(
    rng: np.random.Generator, objects: list[dict[str, str]], frames: int, height: int, width: int, radius: float
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Centre positions per frame, keeping every object inside the frame and (if it can) apart."""
    progress = np.linspace(0.0, 1.0, frames, dtype=np.float32) if frames > 1 else np.zeros(1, np.float32)
    margin = 1.5 * radius  # the triangle reaches 1.5 radii above its centre
    best: list[tuple[np.ndarray, np.ndarray]] = []
    best_gap = -1.0
    for _attempt in range(30):
        tracks = []
        for obj in objects:
            step_x, step_y = MOTIONS[obj["motion"]]
            starts = []
            for step, side in ((step_x, width), (step_y, height)):
                travel = TRAVEL * side * step
                low, high = margin - min(travel, 0.0), side - margin - max(travel, 0.0)
                starts.append((rng.uniform(low, high) if high > low else side / 2, travel))
            (x0, tx), (y0, ty) = starts
            tracks.append((x0 + tx * progress, y0 + ty * progress))
        gap = _min_distance(tracks[0], tracks[1]) if len(tracks) == 2 else np.inf
        if gap > best_gap:
            best, best_gap = tracks, gap
        if gap > 3.0 * radius:  # the shapes reach at most 1.5 radii from their centres
            break
    return best


def _min_distance(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> float:
    return float(np.min(np.hypot(a[0] - b[0], a[1] - b[1])))


def _signed_distance(shape: str, dx: np.ndarray, dy: np.ndarray, radius: float) -> np.ndarray:
    """Pixel distance to the shape's outline (negative inside); exact near edges, enough for anti-aliasing."""
    if shape == "circle":
        return np.hypot(dx, dy) - radius
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) - 0.9 * radius
    # Equilateral triangle pointing up with inradius 0.75 r: inside all three edge half-planes.
    inradius = 0.75 * radius
    edges = (dy, -0.5 * dy - 0.866 * dx, -0.5 * dy + 0.866 * dx)  # outward normals: down, upper-left, upper-right
    return np.maximum.reduce(edges) - inradius


# --- the probe -----------------------------------------------------------------------------------

_PALETTE = np.asarray(list(COLOURS.values()), np.float32)
_MATCH_DISTANCE = 75.0  # RGB distance under which a pixel counts as one of the palette colours


def estimate_attributes(video: np.ndarray) -> dict[str, Any]:
    """Read objects back from a uint8 video ``(T, H, W, 3)``.

    Pixels are labelled with their nearest palette colour (when close enough); a colour whose largest
    connected patch per frame is big enough to be a shape is an object (scattered pixels of a colour,
    as in noise, are none). Its motion is the dominant direction of the colour's centroid track, its
    shape comes from how the patch fills its bounding box and how its mass is skewed. Returns the
    dominant object's ``colour``, ``motion`` and ``shape`` (None when no object is seen) and
    ``objects``, a list of all objects found, largest first.
    """
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"expected a video (T, H, W, 3), got shape {video.shape}")
    frames, height, width, _ = video.shape
    distances = np.linalg.norm(video.astype(np.float32)[..., None, :] - _PALETTE, axis=-1)  # T,H,W,K
    nearest = distances.argmin(-1)
    labels = np.where(distances.min(-1) < _MATCH_DISTANCE, nearest, -1)
    # A third of the smallest shape (a triangle covers ~8.5% of a square frame), so an object half
    # hidden by another still counts; noise's largest one-colour patch stays under 2% of the frame.
    min_pixels = max(2.0, 0.03 * min(height, width) ** 2)
    objects = []
    for index, colour in enumerate(COLOURS):
        mask = labels == index
        patch = _largest_patch(mask)
        if patch.sum(axis=(1, 2)).mean() < min_pixels:
            continue
        # The motion of all the colour's pixels: a shape drawn as two patches still moves as one.
        objects.append({"colour": colour, "motion": _motion_of(mask), "shape": _shape_of(patch),
                        "pixels": float(mask.sum(axis=(1, 2)).mean())})
    objects.sort(key=lambda o: -o["pixels"])
    top = objects[0] if objects else {"colour": None, "motion": None, "shape": None}
    return {"colour": top["colour"], "motion": top["motion"], "shape": top["shape"], "objects": objects}


def _largest_patch(mask: np.ndarray) -> np.ndarray:
    """Per frame of a ``(T, H, W)`` mask, only its largest 8-connected patch of pixels."""
    outside = mask.size
    patch_ids = np.where(mask, np.arange(mask.size).reshape(mask.shape), outside)
    height, width = mask.shape[1:]
    while True:  # every pixel takes the smallest id around it until each patch shares one id
        padded = np.pad(patch_ids, ((0, 0), (1, 1), (1, 1)), constant_values=outside)
        around = np.minimum.reduce([padded[:, dy : dy + height, dx : dx + width] for dy in range(3) for dx in range(3)])
        spread = np.where(mask, around, outside)
        if np.array_equal(spread, patch_ids):
            break
        patch_ids = spread
    largest = np.zeros_like(mask)
    for t, frame_ids in enumerate(patch_ids):
        ids, counts = np.unique(frame_ids[mask[t]], return_counts=True)
        if ids.size:
            largest[t] = frame_ids == ids[counts.argmax()]
    return largest


def _motion_of(mask: np.ndarray) -> str | None:
    seen = [t for t in range(mask.shape[0]) if mask[t].any()]
    if len(seen) < 2:
        return None
    ys, xs = np.mgrid[0 : mask.shape[1], 0 : mask.shape[2]]
    cx = np.array([xs[mask[t]].mean() for t in seen])
    cy = np.array([ys[mask[t]].mean() for t in seen])
    times = np.asarray(seen, np.float64)
    # Least-squares slope of the centroid over time: robust to a frame of partial occlusion.
    vx, vy = np.polyfit(times, cx, 1)[0], np.polyfit(times, cy, 1)[0]
    if max(abs(vx), abs(vy)) * (times[-1] - times[0]) < 0.5:  # under half a pixel: not moving
        return None
    if abs(vx) >= abs(vy):
        return "right" if vx > 0 else "left"
    return "down" if vy > 0 else "up"


def _shape_of(mask: np.ndarray) -> str | None:
    fills, skews = [], []
    counts = mask.sum(axis=(1, 2))
    for frame, count in zip(mask, counts):
        ys, xs = np.nonzero(frame)
        if count < max(4, 0.85 * counts.max()):  # partly hidden or clipped by another object
            continue
        box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        fills.append(len(ys) / box)
        spread = ys.std()
        skews.append(((ys - ys.mean()) ** 3).mean() / spread**3 if spread > 0 else 0.0)
    if not fills:
        return None
    fill, skew = float(np.median(fills)), float(np.median(skews))
    # A triangle pointing up has its mass low and a thin top: fill ~0.5 and skew < 0.
    if skew < -0.25 or fill < 0.62:
        return "triangle"
    return "square" if fill > 0.88 else "circle"


def caption_adherence(
    videos: Sequence[np.ndarray] | np.ndarray, attributes: Sequence[dict[str, Any]], check_shape: bool = True
) -> float:
    """Fraction of videos in which the probe finds every captioned object with its colour and motion.

    With ``check_shape`` the shape must match too.
    """
    if len(videos) != len(attributes):
        raise ValueError(f"got {len(videos)} videos but {len(attributes)} attribute sets")
    if len(videos) == 0:
        raise ValueError("caption_adherence needs at least one video")
    hits = 0
    for video, wanted in zip(videos, attributes):
        found = {o["colour"]: o for o in estimate_attributes(video)["objects"]}
        hits += all(
            obj["colour"] in found
            and found[obj["colour"]]["motion"] == obj["motion"]
            and (not check_shape or found[obj["colour"]]["shape"] == obj["shape"])
            for obj in wanted["objects"]
        )
    return hits / len(videos)


# --- the dataset ---------------------------------------------------------------------------------

SPLITS = {"train": TRAIN_COMBINATIONS, "val": HELDOUT_COMBINATIONS}


def write_synthetic_dataset(
    root: str | Path,
    num_videos: int,
    frames: int,
    size: int,
    fps: float = 8.0,
    seed: int = 0,
    val_videos: int | None = None,
    shard_samples: int = 64,
    max_objects: int = DEFAULT_MAX_OBJECTS,
    backgrounds: Sequence[str] = BACKGROUNDS,
    on_video: Callable[[], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Write ``root/train`` (training combinations) and ``root/val`` (held-out combinations).

    ``val_videos`` defaults to ``default_val_videos(num_videos)``. Each video shows one to
    ``max_objects`` objects on one of ``backgrounds``. Every video is a function of (seed, split,
    index) alone. ``on_video`` is called after each video (for progress bars).
    Every option is checked before ``root`` is touched, and both splits are written to a staging
    folder first: a refused or failed run leaves an earlier dataset in ``root`` as it was.
    Returns the two manifests.
    """
    recipe = checked_recipe(root, num_videos, frames, size, fps, seed, val_videos, shard_samples, max_objects,
                            backgrounds)
    return write_checked_recipe(root, recipe, on_video)


def checked_recipe(
    root: str | Path,
    num_videos: int,
    frames: int,
    size: int,
    fps: float = 8.0,
    seed: int = 0,
    val_videos: int | None = None,
    shard_samples: int = 64,
    max_objects: int = DEFAULT_MAX_OBJECTS,
    backgrounds: Sequence[str] = BACKGROUNDS,
    name_of: Callable[[str], str] = str,
) -> dict[str, Any]:
    """The recipe of the dataset that ``write_synthetic_dataset`` would write with these arguments, once every
    option and ``root`` passed the checks (``check_dataset_options``, ``check_dataset_folder``): a tool that
    shows progress checks first, with its options named by ``name_of``, then writes it with
    ``write_checked_recipe``."""
    val_videos = default_val_videos(num_videos) if val_videos is None else val_videos
    check_dataset_options(num_videos, val_videos, frames, size, fps, shard_samples, max_objects, backgrounds, seed,
                          name_of=name_of)
    check_dataset_folder(root, (num_videos + val_videos) * clip_bytes(frames, size))
    return {"num_videos": num_videos, "val_videos": val_videos, "frames": frames, "size": size, "fps": fps,
            "seed": seed, "shard_samples": shard_samples, "max_objects": max_objects, "backgrounds": list(backgrounds)}


def write_checked_recipe(
    root: str | Path, recipe: dict[str, Any], on_video: Callable[[], None] | None = None
) -> dict[str, dict[str, Any]]:
    """Write the dataset of a ``checked_recipe`` into ``root``, through a staging folder; returns the two manifests."""
    with staging_folder(root) as staging:
        written = {split: _write_split(staging / split, split, recipe, on_video) for split in SPLITS}
        for split in SPLITS:
            replace_shard_folder(staging / split, Path(root) / split)
    return written


def default_val_videos(num_videos: int) -> int:
    """Validation videos when none are asked for: an eighth of ``num_videos``, rounded down, and 1 at least."""
    return max(1, num_videos // 8)


def clip_bytes(frames: int, size: int) -> int:
    """The bytes of one clip's frames, ``frames`` of ``size`` x ``size`` RGB pixels."""
    return frames * size * size * 3


def check_dataset_options(
    num_videos: int,
    val_videos: int,
    frames: int,
    size: int,
    fps: float,
    shard_samples: int,
    max_objects: int,
    backgrounds: Sequence[str],
    seed: int = 0,
    name_of: Callable[[str], str] = str,
) -> None:
    """Raise a ValueError naming the first option of ``write_synthetic_dataset`` that cannot work, as
    ``name_of`` spells it (``make-synthetic`` gives ``--num-videos`` for ``num_videos``).

    Called by ``checked_recipe`` before anything is written (by ``make-synthetic`` before its progress
    bar), so that a bad option is refused while an earlier dataset is still untouched.
    """
    for name, value in (("num_videos", num_videos), ("val_videos", val_videos), ("shard_samples", shard_samples)):
        if value < 1:
            raise ValueError(f"{name_of(name)} must be 1 or more, got {value}")
    if size < MIN_DATASET_SIZE:
        raise ValueError(f"{name_of('size')} must be {MIN_DATASET_SIZE} or more (smaller shapes cannot be seen), "
                         f"got {size}")
    if frames < MIN_DATASET_FRAMES:
        raise ValueError(f"{name_of('frames')} must be {MIN_DATASET_FRAMES} or more (one frame shows no motion), "
                         f"got {frames}")
    _check_clip_size(frames, size, name_of)
    check_positive(name_of("fps"), fps)
    check_scene_options(max_objects, backgrounds, name_of)
    check_count(name_of("seed"), seed, minimum=0)  # numpy's random generators take no negative seed


def _check_clip_size(frames: int, size: int, name_of: Callable[[str], str]) -> None:
    """Refuse clips too large to draw before one is drawn: a huge ``size`` would fail in numpy, deep inside
    the run, with a MemoryError (or thrash a machine that lets it allocate)."""
    if clip_bytes(frames, size) > MAX_CLIP_BYTES:
        megabytes = clip_bytes(frames, size) / 2**20
        raise ValueError(f"a clip of {frames} frames of {size}x{size} pixels holds {megabytes:,.0f} MiB, more than "
                         f"the {MAX_CLIP_BYTES // 2**20} MiB a clip may (drawing one takes about 20 times that in "
                         f"memory): give a smaller {name_of('size')} or fewer {name_of('frames')}")


def check_dataset_folder(root: str | Path, needed_bytes: int = 0) -> None:
    """Raise a ValueError when ``root`` cannot be a folder, when its disk has not ``needed_bytes`` free, or
    when ``root/train`` or ``root/val`` holds a ``manifest.json`` that ``make-synthetic`` did not write:
    writing the dataset would replace that file, or the shards of a dataset made from videos, which cannot
    be drawn again by seed."""
    check_output_folder(root, "output folder", "give a folder for the shards")
    free = shutil.disk_usage(_nearest_existing(Path(root).absolute())).free
    if needed_bytes > free:
        raise ValueError(f"the videos' frames alone need {needed_bytes / 1e9:,.1f} GB, and the disk of {root} has "
                         f"{free / 1e9:,.1f} GB free: ask for fewer or smaller videos, or write them to a larger disk")
    for split in SPLITS:
        manifest = Path(root) / split / MANIFEST_NAME
        if manifest.is_file() and not _is_synthetic_manifest(manifest):
            raise ValueError(f"{manifest} was not written by make-synthetic (another dataset's, or not flowvid's), "
                             "and this run would replace it and the shards beside it; give another --out, or move "
                             f"{manifest.parent} away")


def _nearest_existing(path: Path) -> Path:
    """``path``, or the nearest of its parents that exists: where a folder made at ``path`` would take its disk."""
    return next(folder for folder in (path, *path.parents) if folder.exists())


def _is_synthetic_manifest(manifest: Path) -> bool:
    try:
        content = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    source = content.get("source") if isinstance(content, dict) else None
    return isinstance(source, dict) and source.get("generator") == "synthetic"


def _write_split(
    folder: Path, split: str, recipe: dict[str, Any], on_video: Callable[[], None] | None
) -> dict[str, Any]:
    """Render one split's videos into shards and a manifest in ``folder``; returns the manifest."""
    split_index = list(SPLITS).index(split)
    count = recipe["num_videos"] if split == "train" else recipe["val_videos"]
    frames, size, fps = recipe["frames"], recipe["size"], recipe["fps"]
    with ShardFolderWriter(folder, max_samples=recipe["shard_samples"]) as writer:
        for index in range(count):
            rng = np.random.default_rng([recipe["seed"], split_index, index])
            attributes = sample_attributes(rng, SPLITS[split], recipe["max_objects"], recipe["backgrounds"])
            video = render_video(attributes, frames, size, fps, seed=int(rng.integers(2**31)))
            caption = caption_of(attributes)
            meta = {"caption": caption, "fps": fps, "source": "synthetic", "clip_start": 0, "frames": frames,
                    "height": size, "width": size, "attributes": attributes}
            writer.write(encode_sample(f"synthetic-{split}-{index:06d}", caption, meta, frames=video))
            if on_video is not None:
                on_video()
    manifest = new_manifest(
        "raw",
        {"frames": frames, "height": size, "width": size, "fps": fps},
        samples=writer.samples,
        num_shards=len(writer.shards),
        shards=writer.shards,
        source={"generator": "synthetic", "split": split, "recipe": recipe,
                "heldout": [list(c) for c in sorted(HELDOUT)]},
    )
    write_manifest(folder, manifest)
    return manifest


def synthetic_recipe(root: str | Path) -> dict[str, Any] | None:
    """The arguments a synthetic dataset in ``root`` was made with (None when the folders disagree)."""
    recipes = [load_manifest(Path(root) / split)["source"].get("recipe") for split in SPLITS]
    return recipes[0] if recipes[0] == recipes[1] else None
