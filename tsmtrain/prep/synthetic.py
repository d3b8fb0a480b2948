"""The embedded demo dataset: short H.264 clips whose classes differ only in temporal order.

Classes come in pairs ``(2k, 2k+1)``; a clip of class ``2k+1`` is a clip of class ``2k``,
rendered by exactly the same random procedure, played backwards:

* pair 0: a shape moving left-to-right (class 0) / right-to-left (class 1),
* pair 1: a disc growing (class 2) / shrinking (class 3),
* pair 2: a bar turning counter-clockwise (class 4) / clockwise (class 5).

Because reversal does not change which frames occur, the frames of the two classes of a pair
are identically distributed: a network that averages per-frame scores (TSN) cannot do better
than chance within a pair, while one that relates frames in time (TSM) can. Colours,
background texture, start position, speed and size are random, so no single frame tells the
class either. Frames are rendered with NumPy and encoded by ffmpeg (libx264, yuv420p).

The *multi-label* dataset (:func:`generate_multilabel_dataset`, ``data.generate: multilabel``)
puts one to three objects in a clip, each in its own quadrant and each moving its own way (one
of the six demo classes, :func:`render_multilabel_clip`); a clip's labels are the classes of its
objects. Each object of class ``2k+1`` is an object of class ``2k`` played backwards, so the
order-only pairs still separate TSM from TSN.

The *study* dataset (:func:`generate_study_dataset`, ``data.generate: study``, used by
``scripts/large_batch_study.py``) is a harder one of the same kind, so that a small network does
not reach 100%: six order-only pairs (the three above, plus moving down / up, a colour turning
from warm to cool / cool to warm, fading in / fading out), distractor objects that drift in
random directions, and Gaussian pixel noise on every frame (:func:`render_study_clip`). Every
random choice is made once per clip and the clip of class ``2k+1`` is again exactly the clip of
class ``2k`` played backwards, distractors and noise included.
"""

from __future__ import annotations

import json
import logging
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..child import ProgramNotFound, run
from ..io import write_text

__all__ = ["render_clip", "generate_demo_dataset", "render_study_clip", "generate_study_dataset", "STUDY_PAIRS",
           "COMPLETE_MARKER", "is_complete", "mark_complete", "render_multilabel_clip", "generate_multilabel_dataset",
           "MULTILABEL_CLASSES"]

log = logging.getLogger(__name__)
ENCODE_TIMEOUT_S = 600
"""Seconds after which the ffmpeg of one rendered clip is killed (a few frames: it takes milliseconds)."""
PAIRS = ("left-to-right / right-to-left", "growing / shrinking", "counter-clockwise / clockwise")


def _turning_bar(rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray, size: float, t: np.ndarray,
                 widths: tuple[float, float], origin: tuple[float, float] = (0.0, 0.0)) -> list[np.ndarray]:
    """Masks (the shape of ``xx``) bool, one per time in ``t`` (0..1), of a bar turning
    counter-clockwise on screen (y grows downwards) about a random centre in the square of side
    ``size`` whose top left corner is ``origin`` (x, y); its half width is drawn from ``widths``
    (fractions of ``size``). Draws from ``rng`` in a fixed order: centre, start angle and sweep,
    half length and half width."""
    xc, yc = np.asarray(origin, np.float64) + rng.uniform(0.4, 0.6, 2) * size
    a0, sweep = rng.uniform(0, 2 * np.pi), rng.uniform(0.5, 0.9) * np.pi
    half_len, half_width = rng.uniform(0.3, 0.42) * size, rng.uniform(*widths) * size
    masks = []
    for a in a0 + sweep * t:
        u = (xx - xc) * np.cos(a) - (yy - yc) * np.sin(a)
        v = (xx - xc) * np.sin(a) + (yy - yc) * np.cos(a)
        masks.append((abs(u) <= half_len) & (abs(v) <= half_width))
    return masks


def render_clip(cls: int, rng: np.random.Generator, frames: int = 16, size: int = 64) -> np.ndarray:
    """Render one clip of class ``cls``.

    Args:
        cls: class index, 0 .. 5.
        rng: random generator; the same state gives the same clip, and class ``2k+1`` with a
            given state is exactly class ``2k`` with that state reversed in time.
        frames: frames in the clip.
        size: frame side in pixels.

    Returns:
        uint8 array ``(frames, size, size, 3)``, RGB.

    Raises:
        ValueError: ``cls`` outside 0 .. 5.
    """
    if not 0 <= cls < 2 * len(PAIRS):
        raise ValueError(f"class {cls} outside 0..{2 * len(PAIRS) - 1}")
    pair, backwards = divmod(cls, 2)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    # a dark background and a bright object, both slightly tinted: enough variety that no
    # colour identifies a clip, little enough that memorising clips is no shortcut
    background = rng.uniform(10, 70) + rng.uniform(-10, 10, 3).astype(np.float32)
    colour = rng.uniform(170, 240) + rng.uniform(-15, 15, 3).astype(np.float32)
    texture = rng.normal(0, 5, (size, size, 1)).astype(np.float32)
    t = np.linspace(0.0, 1.0, frames, dtype=np.float32)
    if pair == 0:  # moving shape
        r = rng.uniform(0.10, 0.18) * size
        x0 = rng.uniform(r, 0.45 * size)
        x1 = rng.uniform(0.55 * size, size - r)
        y = rng.uniform(r, size - r) + rng.uniform(-0.15, 0.15) * size * (t - 0.5)
        xs = x0 + (x1 - x0) * t
        square = rng.random() < 0.5
        masks = [
            (np.maximum(abs(xx - xc), abs(yy - yc)) <= r) if square else ((xx - xc) ** 2 + (yy - yc) ** 2 <= r * r)
            for xc, yc in zip(xs, y)
        ]
    elif pair == 1:  # growing disc
        xc, yc = rng.uniform(0.35, 0.65, 2) * size
        r0, r1 = rng.uniform(0.05, 0.12) * size, rng.uniform(0.25, 0.38) * size
        radii = r0 + (r1 - r0) * t
        masks = [(xx - xc) ** 2 + (yy - yc) ** 2 <= rad * rad for rad in radii]
    else:  # turning bar
        masks = _turning_bar(rng, xx, yy, size, t, widths=(0.05, 0.09))
    clip = np.empty((frames, size, size, 3), dtype=np.uint8)
    for i, mask in enumerate(masks):
        frame = np.where(mask[..., None], colour, background) + texture
        clip[i] = np.clip(frame, 0, 255).astype(np.uint8)
    return clip[::-1].copy() if backwards else clip


STUDY_PAIRS = PAIRS + ("down / up", "warm-to-cool / cool-to-warm colour", "fading in / fading out")


def render_study_clip(cls: int, rng: np.random.Generator, frames: int = 16, size: int = 32,
                      distractors: int = 2, noise: float = 20.0) -> np.ndarray:
    """Render one clip of class ``cls`` of the study dataset (12 classes, 6 order-only pairs).

    One object carries the class (pairs as in :data:`STUDY_PAIRS`: left-to-right / right-to-left,
    growing / shrinking, counter-clockwise / clockwise, down / up, warm-to-cool / cool-to-warm
    colour, fading in / fading out); ``distractors`` other objects, as bright, drift along
    straight lines in random directions (so motion alone does not give the class), and every
    frame gets Gaussian pixel noise.

    Args:
        cls: class index, 0 .. 11.
        rng, frames, size: as :func:`render_clip` (class ``2k+1`` is class ``2k`` reversed in time).
        distractors: distractor objects per clip.
        noise: standard deviation of the pixel noise, in 8-bit levels (0: none).

    Returns:
        uint8 array ``(frames, size, size, 3)``, RGB.

    Raises:
        ValueError: ``cls`` outside 0 .. 11, or a negative ``distractors`` or ``noise``.
    """
    if not 0 <= cls < 2 * len(STUDY_PAIRS):
        raise ValueError(f"class {cls} outside 0..{2 * len(STUDY_PAIRS) - 1}")
    if distractors < 0 or noise < 0:
        raise ValueError(f"distractors ({distractors}) and noise ({noise}) must not be negative")
    pair, backwards = divmod(cls, 2)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    t = np.linspace(0.0, 1.0, frames, dtype=np.float32)
    background = rng.uniform(10, 70) + rng.uniform(-10, 10, 3).astype(np.float32)
    texture = rng.normal(0, 5, (size, size, 1)).astype(np.float32)
    frame = np.broadcast_to(background + texture, (frames, size, size, 3)).copy()

    def disc(xc, yc, r):
        return (xx - xc) ** 2 + (yy - yc) ** 2 <= r * r

    def square(xc, yc, r):
        return np.maximum(abs(xx - xc), abs(yy - yc)) <= r

    # distractors first, the class's object over them
    for _ in range(distractors):
        r = rng.uniform(0.07, 0.14) * size
        start = rng.uniform(r, size - r, 2)
        angle, speed = rng.uniform(0, 2 * np.pi), rng.uniform(0.1, 0.5) * size
        end = np.clip(start + speed * np.array([np.cos(angle), np.sin(angle)]), r, size - r)
        colour = rng.uniform(150, 240) + rng.uniform(-40, 40, 3).astype(np.float32)
        shape = square if rng.random() < 0.5 else disc
        for i, ti in enumerate(t):
            xc, yc = start + (end - start) * ti
            frame[i][shape(xc, yc, r)] = colour

    colour = rng.uniform(170, 240) + rng.uniform(-15, 15, 3).astype(np.float32)
    colours = np.broadcast_to(colour, (frames, 3))
    alpha = np.ones(frames, dtype=np.float32)
    if pair in (0, 3):  # moving shape: horizontal (pair 0) or vertical (pair 3)
        r = rng.uniform(0.10, 0.18) * size
        a0, a1 = rng.uniform(r, 0.45 * size), rng.uniform(0.55 * size, size - r)
        along = a0 + (a1 - a0) * t
        across = rng.uniform(r, size - r) + rng.uniform(-0.15, 0.15) * size * (t - 0.5)
        shape = square if rng.random() < 0.5 else disc
        masks = [shape(a, c, r) if pair == 0 else shape(c, a, r) for a, c in zip(along, across)]
    elif pair == 1:  # growing disc
        xc, yc = rng.uniform(0.35, 0.65, 2) * size
        r0, r1 = rng.uniform(0.05, 0.12) * size, rng.uniform(0.25, 0.38) * size
        masks = [disc(xc, yc, rad) for rad in r0 + (r1 - r0) * t]
    elif pair == 2:  # turning bar
        masks = _turning_bar(rng, xx, yy, size, t, widths=(0.06, 0.1))
    else:  # a still shape changing colour (pair 4) or opacity (pair 5)
        r = rng.uniform(0.14, 0.24) * size
        xc, yc = rng.uniform(r, size - r, 2)
        shape = square if rng.random() < 0.5 else disc
        masks = [shape(xc, yc, r)] * frames
        if pair == 4:  # warm (red-dominant) to cool (blue-dominant)
            level = rng.uniform(170, 240)
            warm = np.array([level, 0.55 * level, 0.3 * level], dtype=np.float32)
            cool = warm[::-1].copy()
            colours = warm + (cool - warm) * t[:, None]
        else:  # fading in
            alpha = 0.1 + 0.9 * t
    for i, mask in enumerate(masks):
        frame[i][mask] = (1 - alpha[i]) * frame[i][mask] + alpha[i] * colours[i]
    if noise:
        frame += rng.normal(0, noise, frame.shape).astype(np.float32)
    clip = np.clip(frame, 0, 255).astype(np.uint8)
    return clip[::-1].copy() if backwards else clip


COMPLETE_MARKER = ".complete.json"
"""The file a generated dataset's directory gets last, holding the parameters it was built with."""


def is_complete(root: str | Path, params: dict) -> bool:
    """Whether ``root`` already holds a dataset built with ``params``: its
    :data:`COMPLETE_MARKER` (written last, by :func:`mark_complete`) holds the same ``params``.
    When it does not, a marker left by other parameters is removed, so that a build stopped
    before its end is never taken for complete.

    Raises:
        json.JSONDecodeError: the marker is not valid JSON.
    """
    marker = Path(root) / COMPLETE_MARKER
    if marker.is_file() and json.loads(marker.read_text()) == params:
        return True
    marker.unlink(missing_ok=True)
    return False


def mark_complete(root: str | Path, params: dict) -> None:
    """Write ``root``'s :data:`COMPLETE_MARKER` with ``params``: the last step of a build (the
    videos before it are written in place: a build killed before its marker is made again)."""
    write_text(Path(root) / COMPLETE_MARKER, json.dumps(params))


def _encode(clip: np.ndarray, path: Path, fps: int) -> None:
    frames, h, w, _ = clip.shape
    cmd = ["ffmpeg", "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}",
           "-r", str(fps), "-i", "-", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-preset", "veryfast",
           "-crf", "18", str(path)]
    run(cmd, input=clip.tobytes(), text=False, timeout=ENCODE_TIMEOUT_S, what=f"writing {path}")


def _render_dataset(root: Path, params: dict, kind: str, render) -> tuple[Path, Path]:
    """Render ``params["train_per_class"]`` and ``params["val_per_class"]`` clips of each of
    ``params["num_classes"]`` classes with ``render(cls, rng)`` (uint8 ``(frames, H, W, 3)``) into
    ``root/videos/{train,val}/CLASS_INDEX.mp4``, encoded at ``params["fps"]``; write
    ``train.txt``, ``val.txt`` and, last, ``.complete.json`` holding ``params``. Skipped when that
    marker already holds the same ``params``. Clip ``i`` of class ``cls`` is drawn from
    ``SeedSequence([seed, split, cls, i])``, so it does not depend on the other clips.

    Returns:
        ``(train_list, val_list)``.

    Raises:
        tsmtrain.child.ChildError: ffmpeg is missing (only when something is to be rendered), fails or
            runs past its timeout (the message names the file).
    """
    if _needs_rendering(root, params, kind):
        jobs = []
        for split, per_class, split_seed in (("train", params["train_per_class"], 0),
                                             ("val", params["val_per_class"], 1)):
            for cls in range(params["num_classes"]):
                for i in range(per_class):
                    rng = np.random.default_rng(np.random.SeedSequence([params["seed"], split_seed, cls, i]))
                    jobs.append((split, f"videos/{split}/{cls}_{i:04d}.mp4", [cls], rng))
        _render_jobs(root, params, kind, jobs, lambda labels, rng: render(labels[0], rng))
    return root / "train.txt", root / "val.txt"


def _needs_rendering(root: Path, params: dict, kind: str) -> bool:
    """False when ``root``'s completion marker holds ``params`` (a GPU node without ffmpeg can
    read a dataset rendered elsewhere); True otherwise.

    Raises:
        tsmtrain.child.ProgramNotFound: something is to be rendered and ffmpeg is missing.
    """
    if is_complete(root, params):
        return False
    if shutil.which("ffmpeg") is None:
        raise ProgramNotFound(f"ffmpeg not found: the {kind} dataset is encoded with it (apt-get install ffmpeg)",
                              ["ffmpeg"])
    return True


def _render_jobs(root: Path, params: dict, kind: str, jobs: list, render) -> None:
    """Encode every job ``(split, relative path, labels, rng)`` as ``render(labels, rng)``
    (uint8 ``(frames, H, W, 3)``) at ``params["fps"]``, three ffmpeg at a time; then write
    ``train.txt`` and ``val.txt`` (``path label...`` lines) and, last, the completion marker."""
    for split in {job[0] for job in jobs}:
        (root / "videos" / split).mkdir(parents=True, exist_ok=True)
    log.info("rendering %d %s clips into %s", len(jobs), kind, root)

    def work(job):
        _, rel, labels, rng = job
        _encode(render(labels, rng), root / rel, params["fps"])

    with ThreadPoolExecutor(max_workers=3) as pool:
        list(pool.map(work, jobs))
    for split in ("train", "val"):
        write_text(root / f"{split}.txt",
                   "".join(f"{rel} {' '.join(map(str, labels))}\n" for s, rel, labels, _ in jobs if s == split))
    mark_complete(root, params)


def generate_demo_dataset(root: str | Path, num_classes: int = 4, train_per_class: int = 200,
                          val_per_class: int = 50, frames: int = 16, size: int = 64, fps: int = 8,
                          seed: int = 0) -> tuple[Path, Path]:
    """Render the demo dataset into ``root`` unless it is already there with these parameters.

    Writes ``root/videos/{train,val}/CLASS_INDEX.mp4`` and the list files ``root/train.txt``
    and ``root/val.txt`` (``relative/path.mp4 label``). A marker ``root/.complete.json`` with
    the parameters is written last, so an interrupted generation starts again next time.

    Returns:
        ``(train_list, val_list)``.

    Raises:
        ValueError: ``num_classes`` odd or outside 2 .. 6.
        tsmtrain.child.ChildError: ffmpeg is missing, fails or runs past its timeout (the message names
            the file).
    """
    if num_classes % 2 or not 2 <= num_classes <= 2 * len(PAIRS):
        raise ValueError(f"num_classes must be even and in 2..{2 * len(PAIRS)}, got {num_classes}")
    root = Path(root)
    params = dict(num_classes=num_classes, train_per_class=train_per_class, val_per_class=val_per_class,
                  frames=frames, size=size, fps=fps, seed=seed, version=2)
    return _render_dataset(root, params, "demo", lambda cls, rng: render_clip(cls, rng, frames, size))


def generate_study_dataset(root: str | Path, num_classes: int = 12, train_per_class: int = 128,
                           val_per_class: int = 40, frames: int = 16, size: int = 32, fps: int = 8,
                           distractors: int = 2, noise: float = 20.0, seed: int = 0) -> tuple[Path, Path]:
    """Render the large-batch study's dataset (:func:`render_study_clip`) into ``root`` unless it
    is already there with these parameters.

    Layout and marker as :func:`generate_demo_dataset`: ``root/videos/{train,val}/CLASS_INDEX.mp4``,
    ``root/train.txt``, ``root/val.txt``, ``root/.complete.json`` written last.

    Returns:
        ``(train_list, val_list)``.

    Raises:
        ValueError: ``num_classes`` odd or outside 2 .. 12, or fewer than one clip per class.
        tsmtrain.child.ChildError: ffmpeg is missing, fails or runs past its timeout (the message names
            the file).
    """
    if num_classes % 2 or not 2 <= num_classes <= 2 * len(STUDY_PAIRS):
        raise ValueError(f"num_classes must be even and in 2..{2 * len(STUDY_PAIRS)}, got {num_classes}")
    if train_per_class < 1 or val_per_class < 1:
        raise ValueError(f"train_per_class ({train_per_class}) and val_per_class ({val_per_class}) must be >= 1")
    root = Path(root)
    params = dict(kind="study", num_classes=num_classes, train_per_class=train_per_class,
                  val_per_class=val_per_class, frames=frames, size=size, fps=fps, distractors=distractors,
                  noise=noise, seed=seed, version=1)
    return _render_dataset(root, params, "study",
                           lambda cls, rng: render_study_clip(cls, rng, frames, size, distractors, noise))


MULTILABEL_CLASSES = 6
"""The multi-label dataset's classes: the demo's six (three order-only pairs)."""


def _object_masks(kind: int, rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray, box: tuple[float, float, float],
                  t: np.ndarray) -> list[np.ndarray]:
    """Masks ``(size, size)`` of one object of pair ``kind`` (0 moving left-to-right, 1 growing,
    2 turning counter-clockwise) inside the square ``box`` = ``(left, top, side)``, one per time
    in ``t``."""
    x0, y0, s = box
    if kind == 0:
        r = rng.uniform(0.12, 0.2) * s
        xa, xb = x0 + rng.uniform(r, 0.45 * s), x0 + rng.uniform(0.55 * s, s - r)
        yc = y0 + rng.uniform(r, s - r)
        square = rng.random() < 0.5
        return [(np.maximum(abs(xx - xc), abs(yy - yc)) <= r) if square else ((xx - xc) ** 2 + (yy - yc) ** 2 <= r * r)
                for xc in xa + (xb - xa) * t]
    if kind == 1:
        xc, yc = x0 + rng.uniform(0.4, 0.6) * s, y0 + rng.uniform(0.4, 0.6) * s
        r0, r1 = rng.uniform(0.05, 0.12) * s, rng.uniform(0.32, 0.45) * s
        return [(xx - xc) ** 2 + (yy - yc) ** 2 <= rad * rad for rad in r0 + (r1 - r0) * t]
    return _turning_bar(rng, xx, yy, s, t, widths=(0.07, 0.11), origin=(x0, y0))


def render_multilabel_clip(classes: list[int], rng: np.random.Generator, frames: int = 16,
                           size: int = 64) -> np.ndarray:
    """Render a clip holding one object of each class in ``classes`` (demo classes 0 .. 5: pair
    ``c // 2``, played backwards when ``c`` is odd), each in its own quadrant of the frame, with
    its own colour.

    Returns:
        uint8 ``(frames, size, size, 3)``, RGB.

    Raises:
        ValueError: no class, more than 4, a repeated class or one outside 0 .. 5.
    """
    if not 1 <= len(classes) <= 4 or len(set(classes)) < len(classes) or any(
            not 0 <= c < MULTILABEL_CLASSES for c in classes):
        raise ValueError(f"classes {classes}: one to four distinct classes in 0..{MULTILABEL_CLASSES - 1}")
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    t = np.linspace(0.0, 1.0, frames, dtype=np.float32)
    background = rng.uniform(10, 70) + rng.uniform(-10, 10, 3).astype(np.float32)
    texture = rng.normal(0, 5, (size, size, 1)).astype(np.float32)
    frame = np.broadcast_to(background + texture, (frames, size, size, 3)).copy()
    half = size / 2
    quadrants = rng.permutation(4)
    for c, q in zip(classes, quadrants):
        masks = _object_masks(c // 2, rng, xx, yy, ((q % 2) * half, (q // 2) * half, half), t)
        if c % 2:
            masks = masks[::-1]  # the object of the paired class: the same motion backwards
        colour = rng.uniform(170, 240) + rng.uniform(-15, 15, 3).astype(np.float32)
        for i, mask in enumerate(masks):
            frame[i][mask] = colour
    return np.clip(frame, 0, 255).astype(np.uint8)


def generate_multilabel_dataset(root: str | Path, train_videos: int = 800, val_videos: int = 200, frames: int = 16,
                                size: int = 64, fps: int = 8, seed: int = 0) -> tuple[Path, Path]:
    """Render the multi-label dataset into ``root`` unless it is already there with these
    parameters: clips of one to three objects (uniformly), their classes drawn without
    repetition from the six (:func:`render_multilabel_clip`), written as
    ``root/videos/{train,val}/NNNNN.mp4`` with list lines ``path label label ...`` (mmaction2's
    multi-label form) in ``root/train.txt`` and ``root/val.txt``, and the marker last (as
    :func:`generate_demo_dataset`). Clip ``i`` of a split is drawn from ``SeedSequence([seed,
    split, i])``.

    Returns:
        ``(train_list, val_list)``.

    Raises:
        tsmtrain.child.ChildError: ffmpeg is missing, fails or runs past its timeout (the message names
            the file).
    """
    root = Path(root)
    params = dict(kind="multilabel", train_videos=train_videos, val_videos=val_videos, frames=frames, size=size,
                  fps=fps, seed=seed, version=1)
    if _needs_rendering(root, params, "multilabel"):
        jobs = []
        for split, count, split_seed in (("train", train_videos, 0), ("val", val_videos, 1)):
            for i in range(count):
                rng = np.random.default_rng(np.random.SeedSequence([seed, split_seed, i]))
                classes = sorted(rng.choice(MULTILABEL_CLASSES, int(rng.integers(1, 4)), replace=False).tolist())
                jobs.append((split, f"videos/{split}/{i:05d}.mp4", classes, rng))
        _render_jobs(root, params, "multilabel", jobs,
                     lambda classes, rng: render_multilabel_clip(classes, rng, frames, size))
    return root / "train.txt", root / "val.txt"
