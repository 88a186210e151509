"""Procedurally generated captioned clips that the reference model is trained and judged on.

A scene is one coloured shape with one kind of motion over a plain or textured background, optionally under a
camera pan. The vocabulary is fixed, so the caption set is finite (``all_scenes``). A deterministic set of
(colour, shape, motion) triples never appears in training (``held_out_triples``); ``evaluation_scenes`` gives one
caption per held-out triple for the acceptance test.

``render_clips`` draws a batch of scenes on any device with plain vectorised torch (signed distance functions,
anti-aliased edges). Every random nuisance (start position, size, speed, texture phase, ...) is drawn on the CPU
from a generator seeded by the caller, so the same seed gives the same clips on CPU and GPU. Output layout is what
``AutoencoderKLWan`` takes: (batch, 3, frames, height, width) in [-1, 1].
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Sequence

import torch

# Saturated, bright object colours (HSV value >= 0.85, saturation >= 0.8) 60 degrees apart in hue, so that the
# colour classifier can separate them from each other and from the muted or grey backgrounds below.
OBJECT_COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.92, 0.12, 0.10),
    "yellow": (0.93, 0.86, 0.10),
    "green": (0.12, 0.85, 0.18),
    "cyan": (0.10, 0.82, 0.90),
    "blue": (0.16, 0.30, 0.95),
    "magenta": (0.88, 0.14, 0.86),
}
# Backgrounds are grey or dark and muted (HSV value <= 0.5 when saturated), never bright and saturated.
BACKGROUND_COLOURS: dict[str, tuple[float, float, float]] = {
    "black": (0.04, 0.04, 0.04),
    "gray": (0.45, 0.45, 0.45),
    "white": (0.92, 0.92, 0.92),
    "red": (0.45, 0.10, 0.09),
    "green": (0.09, 0.36, 0.13),
    "blue": (0.09, 0.13, 0.45),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
MOTIONS: tuple[str, ...] = (
    "moves left",
    "moves right",
    "moves up",
    "moves down",
    "bounces around",
    "rotates",
    "grows",
    "shrinks",
)
TEXTURES: tuple[str, ...] = ("plain", "striped", "checkered")
CAMERAS: tuple[str, ...] = ("static", "pans left", "pans right")


@dataclasses.dataclass(frozen=True)
class Scene:
    """One caption's worth of content; every field is a word from the fixed vocabulary above."""

    colour: str
    shape: str
    motion: str
    background: str
    texture: str = "plain"
    camera: str = "static"

    def __post_init__(self) -> None:
        if self.colour not in OBJECT_COLOURS:
            raise ValueError(f"unknown object colour {self.colour!r}")
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}")
        if self.motion not in MOTIONS:
            raise ValueError(f"unknown motion {self.motion!r}")
        if self.background not in BACKGROUND_COLOURS:
            raise ValueError(f"unknown background colour {self.background!r}")
        if self.texture not in TEXTURES:
            raise ValueError(f"unknown texture {self.texture!r}")
        if self.camera not in CAMERAS:
            raise ValueError(f"unknown camera motion {self.camera!r}")
        if self.colour == self.background:
            raise ValueError("object and background must differ in colour")
        if self.shape == "circle" and self.motion == "rotates":
            raise ValueError("a rotating circle looks static, so that caption would lie")
        if self.texture == "plain" and self.camera != "static":
            raise ValueError("a pan over a plain background is invisible, so that caption would lie")

    @property
    def triple(self) -> tuple[str, str, str]:
        return (self.colour, self.shape, self.motion)

    @property
    def caption(self) -> str:
        texture = "" if self.texture == "plain" else f"{self.texture} "
        text = f"a {self.colour} {self.shape} {self.motion} over a {texture}{self.background} background"
        if self.camera != "static":
            text += f" as the camera {self.camera}"
        return text


def _valid(**fields: str) -> bool:
    try:
        Scene(**fields)
    except ValueError:
        return False
    return True


def all_scenes() -> list[Scene]:
    """Every scene the vocabulary allows, in a fixed order."""
    return list(_all_scenes())


@functools.lru_cache(maxsize=1)
def _all_scenes() -> tuple[Scene, ...]:
    scenes = []
    for colour, shape, motion, background, texture, camera in itertools.product(
        OBJECT_COLOURS, SHAPES, MOTIONS, BACKGROUND_COLOURS, TEXTURES, CAMERAS
    ):
        fields = dict(colour=colour, shape=shape, motion=motion, background=background, texture=texture, camera=camera)
        if _valid(**fields):
            scenes.append(Scene(**fields))
    return tuple(scenes)


def held_out_triples() -> list[tuple[str, str, str]]:
    """24 (colour, shape, motion) triples excluded from training: each colour with every shape, motions spread.

    A fixed formula rather than a random draw, so the split can be read off and never drifts.
    """
    colours, triples = list(OBJECT_COLOURS), []
    for i, colour in enumerate(colours):
        for k, shape in enumerate(SHAPES):
            motion_index = (i + 3 * k) % len(MOTIONS)
            if shape == "circle" and MOTIONS[motion_index] == "rotates":
                motion_index = (motion_index + 1) % len(MOTIONS)
            triples.append((colour, shape, MOTIONS[motion_index]))
    return triples


def training_scenes() -> list[Scene]:
    held_out = set(held_out_triples())
    return [scene for scene in all_scenes() if scene.triple not in held_out]


def evaluation_scenes() -> list[Scene]:
    """One caption per held-out triple, backgrounds and textures rotated deterministically."""
    scenes = []
    for index, (colour, shape, motion) in enumerate(held_out_triples()):
        backgrounds = [b for b in BACKGROUND_COLOURS if b != colour]
        background = backgrounds[index % len(backgrounds)]
        texture = TEXTURES[index % len(TEXTURES)]
        camera = "static" if texture == "plain" or index % 2 == 0 else CAMERAS[1 + (index // 2) % 2]
        scenes.append(Scene(colour, shape, motion, background, texture, camera))
    return scenes


def all_captions() -> list[str]:
    return [scene.caption for scene in all_scenes()]


def sample_scenes(count: int, seed: int, pool: Sequence[Scene] | None = None) -> list[Scene]:
    """``count`` scenes drawn uniformly (with replacement) from ``pool`` (default: the training scenes)."""
    pool = training_scenes() if pool is None else list(pool)
    generator = torch.Generator().manual_seed(seed)
    indices = torch.randint(len(pool), (count,), generator=generator)
    return [pool[i] for i in indices.tolist()]


def _uniform(generator: torch.Generator, count: int, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(count, generator=generator, dtype=torch.float64)


def _fold(position: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
    """Reflect an unbounded straight-line position into [-limit, limit] (a bounce off both walls)."""
    period = 4 * limit
    phase = torch.remainder(position + limit, period)
    return limit - (phase - 2 * limit).abs()


def _shape_distance(shape_ids: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Signed distance (in object radii) to each shape outline; negative inside. Shapes of radius about 1."""
    circle = torch.sqrt(x * x + y * y) - 1.0
    square = torch.maximum(x.abs(), y.abs()) - 0.85
    # Equilateral triangle, apex up, as the largest of three edge half-plane distances; inradius 0.55.
    edges = [
        (math.cos(a), math.sin(a)) for a in (math.pi / 2, math.pi / 2 + 2 * math.pi / 3, math.pi / 2 + 4 * math.pi / 3)
    ]
    triangle = torch.stack([-(nx * x + ny * y) for nx, ny in edges]).amax(0) - 0.55
    arm = 0.32
    cross = torch.minimum(torch.maximum(x.abs() - 1.0, y.abs() - arm), torch.maximum(x.abs() - arm, y.abs() - 1.0))
    distances = torch.stack([circle, square, triangle, cross])  # order of SHAPES
    index = shape_ids.view(1, -1, *([1] * (x.dim() - 1))).expand(1, *x.shape)
    return distances.gather(0, index).squeeze(0)


@dataclasses.dataclass
class _Trajectories:
    centre_x: torch.Tensor  # (B, F), normalised units (1 = half the shorter side)
    centre_y: torch.Tensor
    radius: torch.Tensor
    angle: torch.Tensor
    pan_x: torch.Tensor  # (B, F) texture offset from the camera pan


def _trajectories(scenes: Sequence[Scene], num_frames: int, aspect: float, generator: torch.Generator) -> _Trajectories:
    """Per-scene motion over the clip, drawn on the CPU in float64 so every device renders the same clip."""
    count = len(scenes)
    t = (
        torch.linspace(0.0, 1.0, num_frames, dtype=torch.float64).view(1, -1)
        if num_frames > 1
        else torch.zeros(1, 1, dtype=torch.float64)
    )
    motion = [s.motion for s in scenes]

    base_radius = _uniform(generator, count, 0.16, 0.24)
    speed = _uniform(generator, count, 0.7, 1.1)
    middle = _uniform(generator, count, -0.15, 0.15)
    across = _uniform(generator, count, -0.5, 0.5)
    still_x = _uniform(generator, count, -0.4, 0.4)
    still_y = _uniform(generator, count, -0.4, 0.4)
    bounce_speed = _uniform(generator, count, 1.6, 2.4)
    bounce_angle = (
        _uniform(generator, count, math.radians(20), math.radians(70))
        + (math.pi / 2) * torch.randint(4, (count,), generator=generator).double()
    )
    angle0 = _uniform(generator, count, 0.0, 2 * math.pi)
    spin = _uniform(generator, count, math.pi, 2 * math.pi) * (
        2 * torch.randint(2, (count,), generator=generator).double() - 1
    )
    grow = _uniform(generator, count, 0.9, 1.3)
    small_radius = _uniform(generator, count, 0.12, 0.16)
    large_radius = _uniform(generator, count, 0.28, 0.34)
    shrink = _uniform(generator, count, 0.5, 0.6)
    pan_speed = _uniform(generator, count, 0.4, 0.7)

    centre_x = still_x.view(-1, 1).expand(count, t.shape[1]).clone()
    centre_y = still_y.view(-1, 1).expand(count, t.shape[1]).clone()
    radius = base_radius.view(-1, 1).expand(count, t.shape[1]).clone()
    angle = angle0.view(-1, 1).expand(count, t.shape[1]).clone()
    pan_x = torch.zeros(count, t.shape[1], dtype=torch.float64)
    for b, name in enumerate(motion):
        travel = speed[b] * (t[0] - 0.5)
        if name == "moves left":
            centre_x[b], centre_y[b] = middle[b] - travel, across[b]
        elif name == "moves right":
            centre_x[b], centre_y[b] = middle[b] + travel, across[b]
        elif name == "moves up":  # image y grows downwards
            centre_x[b], centre_y[b] = across[b] * aspect, middle[b] - travel
        elif name == "moves down":
            centre_x[b], centre_y[b] = across[b] * aspect, middle[b] + travel
        elif name == "bounces around":
            limit_x = torch.as_tensor(aspect - base_radius[b])
            limit_y = torch.as_tensor(1.0 - base_radius[b])
            start_x, start_y = still_x[b], still_y[b]
            centre_x[b] = _fold(start_x + bounce_speed[b] * math.cos(bounce_angle[b]) * t[0], limit_x)
            centre_y[b] = _fold(start_y + bounce_speed[b] * math.sin(bounce_angle[b]) * t[0], limit_y)
        elif name == "rotates":
            angle[b] = angle0[b] + spin[b] * t[0]
        elif name == "grows":
            radius[b] = small_radius[b] * (1 + grow[b] * t[0])
        elif name == "shrinks":
            radius[b] = large_radius[b] * (1 - shrink[b] * t[0])
        camera = scenes[b].camera
        if camera != "static":
            # The camera turning left makes the world slide right across the frame.
            direction = 1.0 if camera == "pans left" else -1.0
            pan_x[b] = direction * pan_speed[b] * t[0]
    return _Trajectories(centre_x, centre_y, radius, angle, pan_x)


def _texture_pattern(
    texture_ids: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    period: torch.Tensor,
    orientation: torch.Tensor,
    phase: torch.Tensor,
    pixel: float,
) -> torch.Tensor:
    """Texture weight in [0, 1] (0 = base colour, 1 = alternate colour); anti-aliased square waves."""
    view = (-1,) + (1,) * (u.dim() - 1)
    period, orientation, phase = period.view(view), orientation.view(view), phase.view(view)
    sharp = period / (2 * math.pi * pixel)  # slope that makes a transition about one pixel wide

    def square_wave(coordinate: torch.Tensor) -> torch.Tensor:
        return torch.clamp(torch.sin(2 * math.pi * coordinate / period) * sharp, -1.0, 1.0)

    along = u * torch.cos(orientation) + v * torch.sin(orientation) + phase
    stripes = 0.5 + 0.5 * square_wave(along)
    checks = 0.5 + 0.5 * square_wave(u + phase) * square_wave(v + phase)
    plain = torch.zeros_like(stripes)
    ids = texture_ids.view(view)
    return torch.where(ids == 1, stripes, torch.where(ids == 2, checks, plain))


def render_clips(
    scenes: Sequence[Scene],
    *,
    seed: int,
    num_frames: int = 33,
    height: int = 256,
    width: int = 256,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    return_coverage: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Draw ``scenes`` as clips of shape (len(scenes), 3, num_frames, height, width), values in [-1, 1].

    With ``return_coverage`` also the object's anti-aliased coverage, shape (len(scenes), num_frames, height, width)
    in [0, 1]: training losses use it to weight the small object against the large background.
    """
    if not scenes:
        raise ValueError("need at least one scene")
    device = torch.device(device) if device is not None else torch.device("cpu")
    generator = torch.Generator().manual_seed(seed)
    count = len(scenes)
    unit = min(height, width) / 2  # pixels per normalised unit
    aspect = width / min(height, width)
    tracks = _trajectories(scenes, num_frames, aspect, generator)

    texture_period = _uniform(generator, count, 0.22, 0.4)
    texture_orientation = _uniform(generator, count, 0.0, math.pi)
    texture_phase = _uniform(generator, count, 0.0, 1.0)
    brightness = _uniform(generator, count, 0.9, 1.0)

    def to_device(values: torch.Tensor) -> torch.Tensor:
        return values.to(device=device, dtype=torch.float32)

    centre_x, centre_y = to_device(tracks.centre_x), to_device(tracks.centre_y)
    radius, angle, pan_x = to_device(tracks.radius), to_device(tracks.angle), to_device(tracks.pan_x)

    # Pixel centres in normalised units, x to the right, y downwards; shape (1, 1, H, W) against (B, F, 1, 1).
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5 - width / 2) / unit
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5 - height / 2) / unit
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    grid_x, grid_y = grid_x.view(1, 1, height, width), grid_y.view(1, 1, height, width)

    def per_frame(values: torch.Tensor) -> torch.Tensor:
        return values.view(count, -1, 1, 1)

    dx = (grid_x - per_frame(centre_x)) / per_frame(radius)
    dy = (grid_y - per_frame(centre_y)) / per_frame(radius)
    cos, sin = torch.cos(per_frame(angle)), torch.sin(per_frame(angle))
    local_x, local_y = cos * dx + sin * dy, -sin * dx + cos * dy
    shape_ids = torch.tensor([SHAPES.index(s.shape) for s in scenes], device=device)
    distance_pixels = _shape_distance(shape_ids, local_x, local_y) * per_frame(radius) * unit
    coverage = torch.clamp(0.5 - distance_pixels, 0.0, 1.0).unsqueeze(1)  # (B, 1, F, H, W)

    texture_ids = torch.tensor([TEXTURES.index(s.texture) for s in scenes], device=device)
    pattern = _texture_pattern(
        texture_ids,
        grid_x - per_frame(pan_x),
        grid_y.expand_as(dx),
        to_device(texture_period),
        to_device(texture_orientation),
        to_device(texture_phase),
        1.0 / unit,
    ).unsqueeze(1)  # (B, 1, F, H, W)

    base = torch.tensor([BACKGROUND_COLOURS[s.background] for s in scenes], device=device)
    luminance = base.mean(dim=1, keepdim=True)
    # The alternate texture colour is a darker shade of a light background, a lighter one of a black background.
    alternate = torch.where(luminance > 0.2, base * 0.6, base + 0.2)
    fill = torch.tensor([OBJECT_COLOURS[s.colour] for s in scenes], device=device) * to_device(brightness).view(-1, 1)

    def colour_volume(rgb: torch.Tensor) -> torch.Tensor:
        return rgb.view(count, 3, 1, 1, 1)

    background = colour_volume(base) + (colour_volume(alternate) - colour_volume(base)) * pattern
    frames = background + (colour_volume(fill) - background) * coverage
    clips = (frames * 2.0 - 1.0).clamp(-1.0, 1.0).to(dtype)
    return (clips, coverage.squeeze(1)) if return_coverage else clips
