"""Every setting of a fit: its name, type, default and allowed range, in one place (stdlib only).

Both processes import this module: the backend builds a `FitConfig` from a request, the command
line or `--config`; the Blender add-on (through its shared subpackage, see
blender_addon/paths.py) reads its panel's defaults and slider limits from `FitConfig()` and
`RANGES`, so neither side keeps a copy of the other's numbers. The defaults and the published
code each comes from are listed in docs/sds-defaults.md.

`check` (run by the constructor) accepts only values a fit can use: every number finite and
inside its documented range, every choice one of its listed values; the error names the field,
what was expected and what arrived.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, NamedTuple, get_args

Stage = Literal["shape", "texture"]
Shading = Literal["mixed", "lambert", "normal"]
TextureParam = Literal["pyramid", "rgb"]
Background = Literal["black", "white", "random"]
Weighting = Literal["1-alpha", "sqrt_alpha_1m_alpha", "uniform"]
Vae = Literal["full", "tiny"]
Dtype = Literal["auto", "float32", "float16"]
STAGE_ORDER: tuple[Stage, ...] = get_args(Stage)


@dataclass(frozen=True)
class FitConfig:
    """Every knob of a fit. Defaults and their sources: docs/sds-defaults.md."""

    stages: tuple[Stage, ...] = ("shape",)
    """Stages to run, in order: "shape" (the weights) and/or "texture" (the UV texture)."""
    shape_steps: int = 200
    """Iterations of the shape stage."""
    texture_steps: int = 400
    """Iterations of the texture stage."""
    seed: int = 0
    """Seed of the one generator behind cameras, lights, timesteps and noise."""
    guidance_scale: float = 100.0
    """Classifier-free guidance scale (DreamFusion-style SDS uses 100)."""
    weighting: Weighting = "1-alpha"
    """w(t) of the SDS gradient."""
    t_min: float = 0.02
    """Lowest diffusion timestep, as a fraction of the train steps."""
    t_max: float = 0.98
    """Highest diffusion timestep at the start of each stage."""
    shape_t_max_end: float | None = None
    """Highest timestep at the end of the shape stage; None keeps t_max."""
    texture_t_max_end: float | None = 0.5
    """Highest timestep at the end of the texture stage (annealed linearly from t_max)."""
    lr: float = 0.05
    """Adam learning rate of the shape weights at the start of the stage."""
    lr_decay: float = 1.0
    """The shape learning rate decays exponentially to lr * lr_decay by the end; 1 (FaceG2E) keeps it
    constant. Adam's steps do not shrink with the gradient, so at a constant rate the weights keep
    jittering by about lr (0.05 sd: invisible); below 1 they settle, but travel less."""
    texture_lr: float = 0.05
    """Adam learning rate of the texture parameters (decays x0.9 every 100 steps)."""
    l2_weight: float = 1e-3
    """Weight of the L2 penalty on the shape weights."""
    grad_clip: float = 5.0
    """Clip the gradient norm of the shape weights to this (0 disables)."""
    weight_clamp: float = 3.0
    """Clamp every shape weight to +-this many standard deviations."""
    batch_size: int = 1
    """Views rendered per iteration."""
    render_size: int = 256
    """Side of the square render in pixels (the guidance resizes it to `guidance_resolution`)."""
    guidance_resolution: int | None = None
    """Side the render is resized to before VAE encoding; None = the model's own (512 for SD 1.5)."""
    vae: Vae = "full"
    """The encoder SDS pulls the render through: "full" (the model's own VAE, as the published methods
    use) or "tiny" (a TAESD AutoencoderTiny: the same latent space, a step in about 0.4x the time)."""
    dtype: Dtype = "auto"
    """The model's weights: "auto" = float16 on CUDA, float32 on Apple's MPS and the CPU; "float16"
    halves memory on MPS too (a CPU refuses it)."""
    texture_size: int = 512
    """Side of the square UV texture in texels."""
    texture_param: TextureParam = "pyramid"
    """Texture parametrisation: "pyramid" (multi-resolution, less noise) or "rgb" (plain texels)."""
    shading: Shading = "mixed"
    """Shape-stage renders: "lambert" (grey, random light), "normal" (normal map) or "mixed" (either, per step)."""
    background: Background = "black"
    """Colour behind the head: black, white, or a random grey per step."""
    yaw_range: tuple[float, float] = (-45.0, 45.0)
    """Camera yaw range in degrees for the shape stage (0 = front)."""
    texture_yaw_range: tuple[float, float] = (-180.0, 180.0)
    """Camera yaw range for the texture stage (all around the head)."""
    pitch_range: tuple[float, float] = (-20.0, 20.0)
    """Camera pitch range in degrees (positive = from above)."""
    zoom_range: tuple[float, float] = (0.9, 1.1)
    """Random zoom; 1 frames the head to fill 90% of the image."""
    fov_deg: float = 30.0
    """Vertical field of view of the cameras."""
    event_every: int = 5
    """Send a progress event every N iterations (and at the last)."""
    texture_every: int = 20
    """Send a texture event every N texture-stage iterations (and at the last)."""
    checkpoint_every: int = 50
    """Write a checkpoint every N iterations when a checkpoint path is given (0 disables)."""
    gif_frames: int = 24
    """Snapshots kept for the evolution GIF."""
    compile: bool = False
    """torch.compile the UNet: on CUDA the first steps are slow (compilation), later ones faster."""

    def __post_init__(self) -> None:
        check(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "FitConfig":
        """Build from JSON values (lists become tuples); unknown keys are an error."""
        if not isinstance(values, dict):
            raise ValueError(f"config: expected an object of settings, got {type(values).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(key) for key in set(values) - known)
        if unknown:
            raise ValueError(f"config: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(known))}")
        return cls(**{key: tuple(value) if isinstance(value, list) else value for key, value in values.items()})

    def to_dict(self) -> dict[str, Any]:
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}

    def steps_of(self, stage: Stage) -> int:
        return self.shape_steps if stage == "shape" else self.texture_steps

    @property
    def total_steps(self) -> int:
        return sum(self.steps_of(stage) for stage in self.stages)


def texture_level_sides(config: FitConfig) -> list[int]:
    """Sides of the texture's parameter levels: the texture itself for "rgb"; for "pyramid" from
    size/32 (at least 8) up to size, doubling."""
    size = config.texture_size
    if config.texture_param == "rgb":
        return [size]
    sides = [size]
    while sides[-1] // 2 >= max(8, size // 32):
        sides.append(sides[-1] // 2)
    return sides[::-1]


class Range(NamedTuple):
    """Allowed values of a number: low..high (bounds included unless `low_open`), integers only or not."""

    low: float
    high: float
    integer: bool = False
    low_open: bool = False

    def contains(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.integer and not isinstance(value, int):
            return False
        if not math.isfinite(value):
            return False
        return (self.low < value if self.low_open else self.low <= value) and value <= self.high

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a number"
        return f"{kind} in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"


# the range of every number; pairs (yaw_range, ...) apply theirs to both ends
RANGES: dict[str, Range] = {
    "shape_steps": Range(1, 100_000, True), "texture_steps": Range(1, 100_000, True),
    "seed": Range(0, 2 ** 63 - 1, True), "batch_size": Range(1, 64, True),
    "render_size": Range(16, 2048, True), "texture_size": Range(16, 4096, True),
    "guidance_resolution": Range(64, 2048, True), "event_every": Range(1, 100_000, True),
    "texture_every": Range(1, 100_000, True), "checkpoint_every": Range(0, 100_000, True),
    "gif_frames": Range(1, 500, True),
    "guidance_scale": Range(0, 1000), "t_min": Range(0, 1), "t_max": Range(0, 1),
    "shape_t_max_end": Range(0, 1), "texture_t_max_end": Range(0, 1),
    "lr": Range(0, 10, low_open=True), "lr_decay": Range(0, 10, low_open=True),
    "texture_lr": Range(0, 10, low_open=True), "l2_weight": Range(0, 1000), "grad_clip": Range(0, 1e6),
    "weight_clamp": Range(0, 10, low_open=True), "fov_deg": Range(5, 120),
    "yaw_range": Range(-720, 720), "texture_yaw_range": Range(-720, 720), "pitch_range": Range(-89, 89),
    "zoom_range": Range(0.1, 10),
}
CHOICES: dict[str, tuple[str, ...]] = {
    "weighting": get_args(Weighting), "texture_param": get_args(TextureParam), "shading": get_args(Shading),
    "background": get_args(Background), "vae": get_args(Vae), "dtype": get_args(Dtype),
}
OPTIONAL = ("guidance_resolution", "shape_t_max_end", "texture_t_max_end")   # null allowed
PAIRS = ("yaw_range", "texture_yaw_range", "pitch_range", "zoom_range")


def check(config: FitConfig) -> None:
    """Raise ValueError naming the field, what was expected and what arrived."""
    def fail(name: str, expected: str) -> None:
        shown = repr(getattr(config, name))
        raise ValueError(f"config.{name}: expected {expected}, got {shown if len(shown) <= 80 else shown[:77] + '...'}")

    stages = config.stages
    if (not isinstance(stages, tuple) or not stages or len(set(map(repr, stages))) != len(stages)
            or any(stage not in STAGE_ORDER for stage in stages)):
        fail("stages", "a non-empty list of distinct 'shape' / 'texture'")
    if list(stages) != sorted(stages, key=STAGE_ORDER.index):
        fail("stages", "'shape' before 'texture'")
    for name, allowed in RANGES.items():
        value = getattr(config, name)
        if name in OPTIONAL and value is None:
            continue
        if name in PAIRS:
            if not isinstance(value, tuple) or len(value) != 2 or not all(allowed.contains(v) for v in value):
                fail(name, f"a pair [low, high] of numbers in [{allowed.low:g}, {allowed.high:g}]")
            if value[0] > value[1]:
                fail(name, "a pair [low, high] with low <= high")
        elif not allowed.contains(value):
            fail(name, ("null or " if name in OPTIONAL else "") + allowed.describe())
    for name, choices in CHOICES.items():
        if not isinstance(getattr(config, name), str) or getattr(config, name) not in choices:
            fail(name, f"one of {', '.join(choices)}")
    if not isinstance(config.compile, bool):
        fail("compile", "true or false")
    if config.guidance_resolution is not None and config.guidance_resolution % 8:
        fail("guidance_resolution", "null or a multiple of 8 in [64, 2048]")
    if config.t_min > config.t_max:
        fail("t_min", f"a value <= t_max={config.t_max}")
    for name in ("shape_t_max_end", "texture_t_max_end"):
        value = getattr(config, name)
        if value is not None and value < config.t_min:
            fail(name, f"null or a number in [t_min={config.t_min}, 1] (set it along with t_min)")


# ------------------------------------------------------------------------------- command-line flags
# flag -> (FitConfig field, type, help), shared by `python -m sds_backend fit` and headless Blender;
# --config sets any field, and these flags override it
FLAGS: dict[str, tuple[str, type, str]] = {
    "--stages": ("stages", str, "comma-separated: shape, texture"),
    "--steps": ("shape_steps", int, "shape-stage iterations"),
    "--texture-steps": ("texture_steps", int, "texture-stage iterations"),
    "--seed": ("seed", int, "random seed"),
    "--guidance": ("guidance_scale", float, "classifier-free guidance scale"),
    "--lr": ("lr", float, "learning rate of the shape weights"),
    "--texture-lr": ("texture_lr", float, "learning rate of the texture"),
    "--l2": ("l2_weight", float, "L2 penalty on the shape weights"),
    "--weight-clamp": ("weight_clamp", float, "weights stay within +-this many standard deviations"),
    "--vae": ("vae", str, "SDS encoder: full (the model's own VAE) or tiny (TAESD, faster)"),
    "--dtype": ("dtype", str, "model weights: auto (float16 on CUDA, float32 elsewhere), float32 or float16"),
    "--render-size": ("render_size", int, "render side in pixels"),
    "--texture-size": ("texture_size", int, "UV texture side in texels"),
    "--event-every": ("event_every", int, "report progress every N iterations"),
    "--texture-every": ("texture_every", int, "report the texture every N iterations"),
}
MAX_CONFIG_BYTES = 1 << 20


def add_flags(parser) -> None:
    """The settings flags and --config on an argparse parser (each default: FitConfig's)."""
    defaults = FitConfig()
    for flag, (key, kind, text) in FLAGS.items():
        default = getattr(defaults, key)
        shown = ",".join(default) if isinstance(default, tuple) else default
        metavar = "|".join(CHOICES[key]) if key in CHOICES else {int: "N", float: "X", str: "LIST"}[kind]
        parser.add_argument(flag, dest=key, type=kind, default=None, metavar=metavar, help=f"{text} (default {shown})")
    parser.add_argument("--config", default=None, metavar="JSON",
                        help="more FitConfig fields as JSON or @file.json, e.g. '{\"lr\": 0.03, \"batch_size\": 2}'; "
                             "the flags above override it")


def from_flags(args) -> FitConfig:
    """The FitConfig of parsed flags: --config (JSON or @file) first, the dedicated flags on top."""
    return FitConfig.from_dict(flag_values(args))


def flag_values(args) -> dict[str, Any]:
    """Only the settings the flags set (--config's, then the dedicated flags'), as FitConfig fields;
    InputError for a --config that is not a JSON object."""
    from .files import InputError, parse_json, read_input_file

    values: Any = {}
    if args.config:
        if args.config.startswith("@"):
            values = parse_json(read_input_file(args.config[1:], "--config", MAX_CONFIG_BYTES), f"--config {args.config}")
        else:
            values = parse_json(args.config, "--config")
        if not isinstance(values, dict):
            raise InputError(f"--config: expected a JSON object of FitConfig fields, got {type(values).__name__}")
    for key, _, _ in FLAGS.values():
        value = getattr(args, key)
        if value is not None:
            values[key] = [s.strip() for s in value.split(",") if s.strip()] if key == "stages" else value
    return values
