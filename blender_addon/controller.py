"""The fit service: one job at a time, from the fit request to the last applied update.

Operators and headless.py call `start_fit`, `stop`, `tick` and `shutdown`; the UI timer (or the
blocking loop under `blender -b`) calls `tick`, the only place where backend updates touch bpy
data. Each tick applies just the newest weights and the newest texture that arrived since the
previous one. The backend process stays up between fits (the model stays loaded) until
`shutdown()` (Stop Backend button, add-on unregister, Blender quit, loading another file).
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import bpy

from . import bridge, paths, pngfile, roles, scene
from .errors import UserError

log = logging.getLogger(__package__)

@dataclass
class FitInputs:
    """Everything a fit needs besides the head: gathered from the panel or the command line."""

    prompt: str
    negative_prompt: str = ""
    model: str = ""                 # hub id or local folder; '' = the backend's default
    vae_model: str = ""             # the tiny VAE of config vae "tiny"; '' = the backend's default
    config: dict = field(default_factory=dict)   # FitConfig fields that were set; the rest keep FitConfig's defaults
    roles: dict | None = None       # key -> fit / locked / off for this fit; None: the object's (roles.roles)


def check_fit_inputs(inputs: FitInputs):
    """The fit's FitConfig; UserError naming the first input that cannot work. Runs before anything
    starts, with the backend's own checks (the shared inputs and fit_config modules)."""
    checks, fit_config = paths.shared("inputs"), paths.shared("fit_config")
    if not inputs.config.get("stages", True):
        raise UserError("No stage selected: enable Shape, Texture or both")
    try:
        checks.check_prompt(inputs.prompt, inputs.negative_prompt)
        checks.check_model_source(inputs.model)
        checks.check_model_source(inputs.vae_model, "vae_model")
        config = fit_config.FitConfig.from_dict(inputs.config)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if inputs.vae_model.strip() and config.vae != "tiny":
        raise UserError(f"vae_model: {inputs.vae_model.strip()!r} is a tiny VAE, and the VAE is {config.vae!r}; "
                        "choose the Tiny VAE (--vae tiny) to encode with it")
    return config


FAILURE_TITLES = {
    "model_error": "Model could not be loaded",
    "bundle_error": "Backend could not use the head",
    "output_error": "Backend could not write the job folder",
    "bad_request": "Backend rejected the fit",
    "busy": "Backend is busy",
    "internal": "Backend error during the fit",
    "bad_message": "Backend protocol error",
    "backend_died": "Backend failed",
}


def describe_failure(failure: bridge.BackendFailure) -> str:
    return f"{FAILURE_TITLES.get(failure.kind, 'Backend error')}: {failure}"


@dataclass
class Status:
    """What the panel (and headless progress lines) show."""

    state: str = "idle"            # idle | starting | running | stopping | done | stopped | failed
    message: str = ""
    stage: str = ""
    iteration: int = 0
    total: int = 0
    loss: float | None = None
    seconds: float = 0.0
    last_error: str = ""
    backend: str = "not started"
    object_name: str = ""
    updates_applied: int = 0
    updates_superseded: int = 0    # progress/texture events skipped because a newer one was there
    textures_applied: int = 0
    apply_ms: float = 0.0          # main-thread time of the last tick that applied something
    stop_latency: float | None = None
    iterations_done: int = 0        # done.iterations of the finished job
    weights: list = field(default_factory=list)   # the newest weights applied to the scene
    outputs: dict = field(default_factory=dict)

    @property
    def progress(self) -> float:
        return min(1.0, self.iteration / self.total) if self.total else 0.0


@dataclass
class Job:
    id: str
    object_name: str
    names: list[str]                # the bundle's components: the fit and the locked keys
    indices: list[int]              # their key-block indices
    moves: list[bool]               # per component: a fit key (its value is applied), else locked
    widen: bool                     # sliders may widen (a head built from a bundle), else they are the rig's
    image_name: str
    job_dir: Path
    stages: tuple[str, ...]
    started_at: float
    stop_requested_at: float | None = None
    abandoned: str = ""     # why updates are no longer applied (the job waits for its end, then fails)
    texture_changed: bool = False   # pixels of image_name were replaced by the fit


def default_job_root() -> Path:
    return Path(bpy.app.tempdir or tempfile.gettempdir()) / "sds-head"


class FitController:
    def __init__(self) -> None:
        self.backend: bridge.Backend | None = None
        self.job: Job | None = None
        self.status = Status()
        self.listeners: list[Callable[[Status], None]] = []

    # ------------------------------------------------------------------ state
    @property
    def busy(self) -> bool:
        return self.job is not None

    def publish(self) -> None:
        if self.backend is not None:
            self.status.backend = self.backend.describe()
        for listener in list(self.listeners):
            try:
                listener(self.status)
            except Exception:  # a broken listener must not break the fit
                log.exception("status listener failed")

    def record_error(self, text: str) -> None:
        self.status.last_error = text
        self.publish()

    # ------------------------------------------------------------------ start
    def ensure_backend(self, settings: bridge.BackendSettings) -> bridge.Backend:
        """The running backend when it was started with these settings, else a new one."""
        backend = self.backend
        if backend is not None and backend.alive and backend.settings == settings:
            return backend
        if backend is not None:
            backend.close()
        self.backend = bridge.Backend(settings, texture_loader=pngfile.read_png)
        try:
            self.backend.start()
        except bridge.ConfigError as exc:
            self.backend = None
            raise UserError(str(exc)) from None
        return self.backend

    def start_fit(self, obj, inputs: FitInputs, settings: bridge.BackendSettings,
                  job_root: str | Path | None = None) -> str:
        """Check everything, snapshot the head, send the fit; returns the job id. Never blocks on the backend."""
        if self.busy:
            raise UserError("A fit is already running: stop it first")
        config = check_fit_inputs(inputs)
        scene.check_head(obj)
        try:
            bridge.check_settings(settings)
        except bridge.ConfigError as exc:
            raise UserError(str(exc)) from None
        plan = roles.plan(obj, inputs.roles if inputs.roles is not None else roles.roles(obj))
        if not plan.fit:
            raise UserError(f"No shape key of '{obj.name}' is set to Fit: give at least one key the role Fit")
        for name, (low, high) in (plan.bounds or {}).items():
            if not low < high:
                raise UserError(f"Shape key '{name}' has an empty slider range [{low:g}, {high:g}]: widen it, or "
                                "lock the key")
        names = plan.components
        indices = scene.key_indices(obj, names)
        bundle = scene.bundle_from_object(obj, names)
        if "texture" in config.stages and not bundle.meta.get("has_uv"):
            raise UserError(f"Mesh '{obj.name}' has no UV map: the texture stage needs one (UV > Unwrap)")

        image = scene.ensure_texture_image(obj, config.texture_size) if "texture" in config.stages \
            else scene.texture_image(obj)
        # absolute: the backend runs in another working folder
        root = (Path(job_root) if job_root else default_job_root()).absolute()
        try:
            root.mkdir(parents=True, exist_ok=True)
            job_dir = Path(tempfile.mkdtemp(prefix="job-", dir=root))
            bundle_path = scene.bundles().save(bundle, job_dir / "head.npz", compress=False)
        except (OSError, paths.shared("files").OutputError) as exc:
            raise UserError(f"cannot write the fit's job folder in {root}: {exc}") from None
        initial = scene.read_weights(obj, names)
        scene.take_snapshot(obj, scene.all_key_names(obj))

        self.status = Status(state="starting", message="starting the backend", object_name=obj.name,
                             last_error="", total=0)
        backend = self.ensure_backend(settings)
        request = bridge.FitRequest(
            prompt=inputs.prompt.strip(), negative_prompt=inputs.negative_prompt.strip(),
            model=inputs.model.strip() or None, vae_model=inputs.vae_model.strip() or None,
            bundle=str(bundle_path), initial_weights=initial,
            keys=plan.fit, bounds=plan.bounds, config=dict(inputs.config), job_dir=str(job_dir))
        try:
            job_id = backend.submit(request)
        except bridge.BackendFailure as failure:
            backend.close(timeout=1.0)
            failure.stderr_tail = backend.stderr_tail()
            self._finish_failed(failure)
            raise UserError(describe_failure(failure)) from None
        fitted = set(plan.fit)
        self.job = Job(id=job_id, object_name=obj.name, names=names, indices=indices,
                       moves=[name in fitted for name in names], widen=plan.built_head,
                       image_name=image.name if image is not None else "", job_dir=job_dir,
                       stages=config.stages, started_at=time.monotonic())
        self.status.message = "loading the model" if backend.hello else "starting the backend"
        self.publish()
        return job_id

    # ------------------------------------------------------------------ run
    def stop(self) -> None:
        """Ask the fit to end after its current iteration; it keeps the current result."""
        if self.job is None or self.backend is None:
            return
        if self.job.stop_requested_at is None:
            self.job.stop_requested_at = time.monotonic()
            self.backend.stop_job()
            self.status.state = "stopping"
            self.status.message = "stopping after the current iteration"
            self.publish()

    def tick(self, wait: float = 0.0) -> bool:
        """Apply what arrived since the last tick (blocking up to `wait` s for it). Returns busy.

        Listeners hear of the status only when it changed: the UI timer ticks ten times a second,
        and each publish redraws the 3D views (the whole viewport, in software GL a core's worth
        of work while the model loads)."""
        job, backend = self.job, self.backend
        if job is None or backend is None:
            return False
        before = replace(self.status), backend.describe()
        update = backend.wait(wait) if wait > 0 else backend.poll()
        if update is None:  # the backend forgot the job: only after close() from elsewhere
            self._finish_failed(bridge.BackendFailure("backend_died", "Backend was closed during the fit"))
            return False
        if not update.empty and not job.abandoned:
            started = time.perf_counter()
            try:
                self._apply(job, update)
            except UserError as exc:
                # stop, and keep the job until the backend confirms, so the next fit finds it idle
                job.abandoned = f"{exc}; the fit was stopped"
                backend.stop_job()
                self.status.state, self.status.message = "stopping", "stopping: an update could not be applied"
            self.status.apply_ms = (time.perf_counter() - started) * 1000.0
        if job.abandoned and update.finished:
            self._end_job()
            self._set_failed(job.abandoned)
        elif update.failure is not None:
            self._finish_failed(update.failure)
        elif update.done is not None:
            self._finish_done(job, update.done)
        elif backend.hello is not None and self.status.state == "starting":
            self.status.state, self.status.message = "running", "loading the model"
        if (self.status, backend.describe()) != before:
            self.publish()
        return self.busy

    def _head(self, job: Job):
        obj = bpy.data.objects.get(job.object_name)
        if obj is None or obj.type != "MESH" or obj.data.shape_keys is None:
            raise UserError(f"The head '{job.object_name}' was deleted or lost its shape keys during the fit")
        return obj

    def _apply_weights(self, job: Job, obj, weights: list[float]) -> None:
        if len(weights) != len(job.indices):
            raise UserError(f"Backend sent {len(weights)} weights for {len(job.indices)} shape keys")
        moved = [(i, w) for i, w, moves in zip(job.indices, weights, job.moves) if moves]
        scene.apply_weights(obj, [i for i, _ in moved], [w for _, w in moved], widen=job.widen)
        self.status.weights = [w for _, w in moved]

    def _apply_texture(self, job: Job, path: str, decoded=None) -> None:
        """decoded: (width, height, pixels) from pngfile.read_png on the reader thread, else None
        (Blender decodes the file here, on the main thread)."""
        image = bpy.data.images.get(job.image_name) if job.image_name else None
        if image is None:
            raise UserError(f"The texture image '{job.image_name}' was deleted during the fit")
        if decoded is not None:
            width, height, pixels = decoded
            scene.set_pixels(image, pixels, (width, height))
        else:
            scene.apply_texture_file(image, path)
        job.texture_changed = True
        self.status.textures_applied += 1

    def _apply(self, job: Job, update: bridge.JobUpdate) -> None:
        status = self.status
        status.updates_superseded += update.superseded
        if update.progress is not None or update.texture is not None or update.done is not None:
            obj = self._head(job)
        if update.progress is not None:
            p = update.progress
            status.stage, status.iteration, status.total = p["stage"], p["iteration"], p["total"]
            status.loss, status.seconds = p["loss"], p["seconds"]
            if p["stage"] == "loading":     # a heartbeat while the model loads: news for the panel only
                message = f"loading the model ({p['seconds']:.0f} s)"
            else:
                self._apply_weights(job, obj, p["weights"])
                status.updates_applied += 1
                message = f"{p['stage']} {p['iteration']}/{p['total']}"
            if status.state in ("starting", "running"):
                status.state, status.message = "running", message
        if update.texture is not None and update.done is None:
            path = update.texture["path"]
            if update.texture_data is None and not os.path.isfile(path):
                # the backend keeps only its newest few textures: a UI that fell far behind skips one
                log.warning("texture %s is gone; waiting for the next one", path)
                status.updates_superseded += 1
            else:
                self._apply_texture(job, path, update.texture_data)
        if update.done is not None:
            done = update.done
            if done["weights"]:
                self._apply_weights(job, obj, done["weights"])
            final_texture = done["outputs"].get("texture")
            if "texture" in job.stages and final_texture and os.path.isfile(final_texture):
                self._apply_texture(job, final_texture)
            elif update.texture is not None:
                self._apply_texture(job, update.texture["path"], update.texture_data)

    def _finish_done(self, job: Job, done: dict) -> None:
        status = self.status
        status.outputs = dict(done["outputs"])
        status.seconds = done["seconds"]
        status.iterations_done = done["iterations"]
        if done["stopped"]:
            status.state = "stopped"
            if job.stop_requested_at is not None:
                status.stop_latency = time.monotonic() - job.stop_requested_at
            status.message = f"stopped after {done['iterations']} iterations; the current result is kept"
        else:
            status.state = "done"
            status.iteration = status.total = max(status.total, done["iterations"])
            status.message = f"done: {done['iterations']} iterations in {done['seconds']:.1f} s"
        self._end_job()

    def _finish_failed(self, failure: bridge.BackendFailure) -> None:
        self._end_job()
        self._set_failed(describe_failure(failure))

    def _end_job(self) -> None:
        job, self.job = self.job, None
        self._keep_texture(job)

    @staticmethod
    def _keep_texture(job: Job | None) -> None:
        """Pack a texture the job changed, so saving the file keeps what the fit made (whether it
        ended done, stopped or failed): a generated image's pixels are not saved otherwise."""
        image = bpy.data.images.get(job.image_name) if job is not None and job.texture_changed else None
        if image is not None:
            scene.pack_texture(image)

    def _set_failed(self, text: str) -> None:
        self.status.state = "failed"
        self.status.message = "failed: the scene keeps the last good state; Reset restores the weights from before the fit"
        self.status.last_error = text
        log.error("%s", text)
        self.publish()

    # ------------------------------------------------------------------ end
    def shutdown(self, reason: str = "") -> None:
        """End the job and the backend process (unregister, quit, file load, Stop Backend)."""
        backend, job = self.backend, self.job
        self.job = None
        self.backend = None
        if backend is not None:
            backend.close()
        try:
            self._keep_texture(job)
        except (ReferenceError, RuntimeError):   # Blender is quitting: its data may be gone already
            log.warning("could not pack the texture of the ended fit", exc_info=True)
        if job is not None:
            self.status.state = "stopped"
            self.status.message = f"fit ended: {reason}" if reason else "fit ended"
        self.status.backend = "not started"
        self.publish()


CONTROLLER = FitController()
