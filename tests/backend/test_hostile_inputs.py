"""Hostile inputs through the backend's entry points: each ends in its exit code or error kind and a
specific message, before any heavy work, with every file that was already in the output folder
unchanged (hashes before and after) and no temporary file left behind.

Most cases run in this process (the `fit` command's main function, which stops before it would
import torch, and one `serve` process fed line after line); a representative few run as their
own processes: signals mid-fit, a crafted checkpoint on --resume, a closed stdout, a disk that
fills up at the end of a fit. Full and read-only disks are small tmpfs mounts, skipped where
this machine does not allow mounting. The case tables are in hostile.py; headless Blender's
cases are in tests/addon/test_04_headless.py and test_05_blender.py.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import hostile
from file_checks import leftovers, snapshot
from sds_backend import protocol
from sds_backend.__main__ import main
from server_process import ServerProcess

FAST = {"shape_steps": 2, "render_size": 64, "guidance_resolution": 64, "gif_frames": 2, "event_every": 1}


# ------------------------------------------------------------------------------------------ helpers
def user_folder(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """An output folder that already holds the user's own file, and its snapshot."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("the user's own notes: must survive every failure")
    return out, snapshot(out)


def run_fit(*args: str) -> tuple[int, str]:
    """`python -m sds_backend fit ARGS` in this process -> (exit code, stderr)."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            code = main(["fit", *args])
        except SystemExit as exc:            # argparse's usage errors
            code = exc.code
    return code, stderr.getvalue()


def assert_refused(code: int, err: str, expected_code: int, expected_text: str, out: Path, before: dict) -> None:
    assert code == expected_code, err
    assert expected_text in err, err
    assert "Traceback" not in err, err
    assert snapshot(out) == before, "a file in the output folder changed or appeared"
    assert not leftovers(out.parent), leftovers(out.parent)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hostile")


def _mount(path: Path, read_only: bool) -> bool:
    if os.geteuid() != 0:
        return False
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(path)], capture_output=True).returncode:
        return False
    if read_only and subprocess.run(["mount", "-o", "remount,ro", str(path)], capture_output=True).returncode:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)
        return False
    return True


@pytest.fixture(scope="module")
def disks(tmp_path_factory):
    """{"full": a tmpfs with no room left, "small": an empty 256 KiB tmpfs, "read-only": a read-only one}."""
    mounted = {}
    for name in ("full", "small", "read-only"):
        path = tmp_path_factory.mktemp(name)
        if not _mount(path, read_only=name == "read-only"):
            break
        mounted[name] = path
    if len(mounted) < 3:
        for path in mounted.values():
            subprocess.run(["umount", "-l", str(path)], capture_output=True)
        pytest.skip("this machine does not let the tests mount a small tmpfs (needs root and CAP_SYS_ADMIN)")
    with contextlib.suppress(OSError):
        with open(mounted["full"] / "filler", "wb") as handle:
            while True:
                handle.write(b"\0" * 4096)
                handle.flush()
    yield mounted
    for path in mounted.values():
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


# --------------------------------------------------------------------------------- fit: settings
@pytest.mark.parametrize("case,values,expected", hostile.config_cases(), ids=[c[0] for c in hostile.config_cases()])
def test_fit_refuses_absurd_settings(tmp_path, case, values, expected):
    out, before = user_folder(tmp_path)
    started = time.perf_counter()
    code, err = run_fit("--prompt", "a head", "--out", str(out), "--config", json.dumps(values))
    assert_refused(code, err, 3, expected, out, before)
    assert time.perf_counter() - started < 2.0


FLAG_CASES = [
    ("steps-zero", ["--steps", "0"], 3, "config.shape_steps"),
    ("steps-huge", ["--steps", "1000000000"], 3, "config.shape_steps"),
    ("steps-text", ["--steps", "many"], 2, "invalid int value"),
    ("guidance-1e308", ["--guidance", "1e308"], 3, "config.guidance_scale"),
    ("lr-nan", ["--lr", "nan"], 3, "config.lr"),
    ("lr-inf", ["--lr", "inf"], 3, "config.lr"),
    ("seed-negative", ["--seed", "-1"], 3, "config.seed"),
    ("render-size-huge", ["--render-size", "1000000"], 3, "config.render_size"),
    ("weight-clamp-11", ["--weight-clamp", "11"], 3, "config.weight_clamp"),
    ("stages-unknown", ["--stages", "colour"], 3, "config.stages"),
    ("stages-empty", ["--stages", ","], 3, "config.stages"),
    ("stages-reversed", ["--stages", "texture,shape"], 3, "'shape' before 'texture'"),
    ("config-not-object", ["--config", "[1, 2]"], 3, "expected a JSON object"),
    ("config-not-json", ["--config", "{lr: 1}"], 3, "--config: not valid JSON"),
    ("config-nan", ["--config", '{"lr": NaN}'], 3, "non-finite number NaN"),
    ("config-key-twice", ["--config", '{"lr": 0.01, "lr": 5}'], 3, "the key 'lr' appears twice"),
    ("config-nested", ["--config", "[" * 100_000 + "]" * 100_000], 3, "nested too deeply"),
    ("flag-overrides-config", ["--config", '{"stages": ["shape"]}', "--stages", "colour"], 3, "config.stages"),
    ("device-gpu", ["--device", "gpu"], 3, "device: expected auto, cpu, mps or cuda[:N]"),
    ("device-cuda-999", ["--device", "cuda:999"], 3, "device: expected auto, cpu, mps or cuda[:N]"),
    ("prompt-empty", ["--prompt", "   "], 3, "Prompt is empty"),
    ("prompt-surrogate", ["--prompt", "a \udcff head"], 3, "lone UTF-16 surrogate"),
    ("prompt-lone-high-surrogate", ["--prompt", "a \ud800 head"], 3, "lone UTF-16 surrogate"),
    ("prompt-too-long", ["--prompt", "x" * 2001], 3, "at most 2000 characters"),
    ("negative-surrogate", ["--negative", "\udcfe"], 3, "negative_prompt"),
    ("model-missing-folder", ["--model", "/nonexistent/sd15"], 3, "model: folder /nonexistent/sd15 not found"),
    ("model-a-file", ["--model", "/etc/passwd"], 3, "not a folder"),
    ("model-no-index", ["--model", "/tmp"], 3, "has no model_index.json"),
    ("model-not-a-hub-id", ["--model", "just-a-name"], 3, "not found"),
    ("model-nul", ["--model", "./a\0b"], 3, "NUL character"),
    ("vae-unknown", ["--vae", "medium"], 3, "config.vae: expected one of full, tiny"),
    ("vae-model-without-tiny", ["--vae-model", "madebyollin/taesd"], 3, "set vae to 'tiny' (--vae tiny)"),
    ("vae-model-missing-folder", ["--vae", "tiny", "--vae-model", "/nonexistent/taesd"], 3,
     "vae_model: folder /nonexistent/taesd not found"),
    ("vae-model-pipeline-folder", ["--vae", "tiny", "--vae-model", "/tmp"], 3, "has no config.json"),
    ("vae-model-surrogate", ["--vae", "tiny", "--vae-model", "./\udcff"], 3, "lone UTF-16 surrogate"),
    ("bundle-nul", ["--bundle", "a\0b.npz"], 3, "NUL character"),
    ("bundle-surrogate", ["--bundle", "\ud800.npz"], 3, "not valid text"),
]


@pytest.mark.parametrize("case,args,code,expected", FLAG_CASES, ids=[c[0] for c in FLAG_CASES])
def test_fit_refuses_hostile_flags(tmp_path, case, args, code, expected):
    out, before = user_folder(tmp_path)
    given = ["--prompt", "a head", "--out", str(out), *args]
    if "--prompt" in args:
        given = given[2:]
    assert_refused(*run_fit(*given), code, expected, out, before)


# ---------------------------------------------------------------------------------- fit: files
@pytest.fixture(scope="module")
def bundle_paths(files) -> dict[str, Path]:
    return {case: path for case, path, _ in hostile.bundle_cases(files / "bundles")}


@pytest.mark.parametrize("case,expected", [(c, e) for c, _, e in hostile.BUNDLE_CASES],
                         ids=[c for c, _, _ in hostile.BUNDLE_CASES])
def test_fit_refuses_hostile_bundles(tmp_path, bundle_paths, case, expected):
    path = bundle_paths[case]
    out, before = user_folder(tmp_path)
    started = time.perf_counter()
    assert_refused(*run_fit("--prompt", "a head", "--out", str(out), "--bundle", str(path)), 3, expected, out, before)
    assert time.perf_counter() - started < 2.0, case
    assert not (path.parent / "PICKLE_RAN").exists(), "loading a bundle ran code"


@pytest.mark.parametrize("case", list(hostile.WEIGHT_FILES))
def test_fit_refuses_hostile_initial_weights(tmp_path, files, case):
    path, expected = hostile.weights_file(files / "weights", case)
    out, before = user_folder(tmp_path)
    bundle = files / "small.npz"
    if not bundle.exists():
        from sds_backend import bundle as bundles

        bundles.save(bundles.Bundle.from_arrays(**hostile.small_arrays()), bundle)
    assert_refused(*run_fit("--prompt", "a head", "--out", str(out), "--bundle", str(bundle), "--initial-weights",
                            str(path)), 3, expected, out, before)


SPECIAL_PATHS = {"fifo": "FIFO", "dev-zero": "character device", "folder": "is a folder", "loop": "symlink loop",
                 "missing": "not found"}


def _special(files: Path, kind: str) -> Path:
    folder = files / "special"
    folder.mkdir(exist_ok=True)
    path = folder / kind
    if kind == "fifo" and not path.exists():
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir(exist_ok=True)
    elif kind == "loop" and not path.is_symlink():
        path.symlink_to(path)
    elif kind == "dev-zero":
        return Path("/dev/zero")
    return path


@pytest.mark.parametrize("flag", ["--config", "--initial-weights"])
@pytest.mark.parametrize("kind", list(SPECIAL_PATHS))
def test_fit_refuses_special_files_for_its_file_arguments(tmp_path, files, flag, kind):
    out, before = user_folder(tmp_path)
    path = _special(files, kind)
    value = f"@{path}" if flag == "--config" else str(path)
    assert_refused(*run_fit("--prompt", "a head", "--out", str(out), flag, value), 3, SPECIAL_PATHS[kind], out, before)


# ---------------------------------------------------------------------------- fit: output folder
def test_fit_refuses_a_folder_holding_another_fits_outputs(tmp_path):
    out, _ = user_folder(tmp_path)
    (out / "weights.json").write_text('{"a": 1}')
    (out / "head.glb").write_bytes(b"an earlier head")
    before = snapshot(out)
    code, err = run_fit("--prompt", "a head", "--out", str(out))
    assert_refused(code, err, 5, "already holds the outputs of another run (weights.json, head.glb)", out, before)
    assert "--overwrite" in err and "--resume" in err


def test_fit_refuses_a_folder_holding_a_pickled_checkpoint(tmp_path):
    out, _ = user_folder(tmp_path)
    hostile.crafted_pickle_checkpoint(out / "checkpoint.pt", tmp_path / "PICKLE_RAN")
    before = snapshot(out)
    assert_refused(*run_fit("--prompt", "a head", "--out", str(out)), 5, "checkpoint.pt", out, before)
    assert_refused(*run_fit("--prompt", "a head", "--out", str(out), "--resume"), 3,
                   "pickled checkpoint of an earlier release; it is not opened", out, before)
    assert not (tmp_path / "PICKLE_RAN").exists()


@pytest.mark.parametrize("content,expected", [
    (b"\x80\x04 a pickle, not safetensors", "not a readable SDS Head checkpoint"),
    (b"", "not a readable SDS Head checkpoint"),
    (b"\xff" * 8 + b"{}", "header runs past the end"),
    (len(b'{"__metadata__": {"sds_head": "[[[["}}').to_bytes(8, "little") + b'{"__metadata__": {"sds_head": "[[[["}}',
     "not a readable SDS Head checkpoint"),
    (len(b'{"__metadata__": {"sds_head": "{\\"version\\": 9}"}}').to_bytes(8, "little")
     + b'{"__metadata__": {"sds_head": "{\\"version\\": 9}"}}', "found version 9"),
], ids=["pickle", "empty", "header-past-end", "metadata-not-json", "future-version"])
def test_fit_resume_refuses_crafted_checkpoints(tmp_path, content, expected):
    out, _ = user_folder(tmp_path)
    (out / "checkpoint.safetensors").write_bytes(content)
    before = snapshot(out)
    assert_refused(*run_fit("--prompt", "a head", "--out", str(out), "--resume"), 3, expected, out, before)


def _checkpoint_for(path: Path, prompt: str, tamper=None) -> None:
    """A checkpoint of the default fit for `prompt` one step in, as `fit --prompt "a head"` would
    resume it; `tamper(tensors, header)` changes it before it is written."""
    import torch
    from safetensors.numpy import load, save

    from sds_backend import DEFAULT_BUNDLE, bundle, fit_config
    from sds_backend.core import checkpoint
    from sds_backend.inputs import make_rig, model_identity

    head = bundle.load(DEFAULT_BUNDLE)
    identity = checkpoint.Identity(config=fit_config.FitConfig().to_dict(), prompt=prompt, negative_prompt="",
                                   model=model_identity(None), bundle=head.digest(), components=head.num_components,
                                   rig=make_rig(head.names).identity())
    k = head.num_components
    state = checkpoint.FitState(stage_index=0, step=1, weights=torch.zeros(k), texture_levels=None,
                                optimizer_state={0: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(k),
                                                     "exp_avg_sq": torch.zeros(k)}},
                                generator_state=torch.Generator().get_state(), losses=[1.0], snapshots=[])
    checkpoint.save(path, identity, state)
    if tamper is not None:
        data = path.read_bytes()
        header = json.loads(json.loads(data[8:8 + int.from_bytes(data[:8], "little")])["__metadata__"]["sds_head"])
        tensors = load(data)
        tamper(tensors, header)
        path.write_bytes(save(tensors, metadata={"sds_head": json.dumps(header)}))


def _set(name, value):
    def tamper(tensors, header):
        tensors[name] = value
    return tamper


def _header(name, value):
    def tamper(tensors, header):
        header[name] = value
    return tamper


def _drop(name):
    def tamper(tensors, header):
        del tensors[name]
    return tamper


K = 50      # the default head's components
TAMPERED = [
    ("weights-1e30", _set("weights", np.full(K, 1e30, np.float32)), "weights lie outside the bounds"),
    ("weights-nan", _set("weights", np.full(K, np.nan, np.float32)), "'weights' contains NaN or inf"),
    ("weights-count", _set("weights", np.zeros(3, np.float32)), "tensor 'weights' must be float32 [50]"),
    ("weights-float64", _set("weights", np.zeros(K, np.float64)), "tensor 'weights' must be float32"),
    ("generator-garbage", _set("generator", np.random.default_rng(0).integers(0, 256, 5056, dtype=np.uint8)),
     "random generator state is not valid"),
    ("generator-short", _set("generator", np.zeros(16, np.uint8)), "tensor 'generator' must be uint8 [5056]"),
    ("optimizer-step-negative", _set("optimizer.0.step", np.array(-1, np.float32)), "must count steps"),
    ("optimizer-step-fraction", _set("optimizer.0.step", np.array(1.5, np.float32)), "must count steps"),
    ("optimizer-sq-negative", _set("optimizer.0.exp_avg_sq", np.full(K, -1, np.float32)), "must not be negative"),
    ("optimizer-inf", _set("optimizer.0.exp_avg", np.full(K, np.inf, np.float32)), "must be finite float32"),
    ("optimizer-incomplete", _drop("optimizer.0.exp_avg_sq"), "lacks step, exp_avg, exp_avg_sq for parameter(s) [0]"),
    ("optimizer-foreign", _set("optimizer.7.step", np.array(1, np.float32)), "is not optimizer state of this fit"),
    ("step-past-stage", _header("step", 10 ** 6), "'step' must be an integer in [0, "),
    ("stage-past-end", _header("stage_index", 9), "'stage_index' must be an integer in [0, 1]"),
    ("step-text", _header("step", "1"), "'step' must be an integer"),
    ("texture-levels-unasked", _header("texture_levels", 1), "tensor 'texture.0' is missing"),
    ("snapshots-not-integers", _header("snapshot_iterations", [1.5]), "'snapshot_iterations' must be a list"),
    ("snapshot-missing", _header("snapshot_iterations", [3]), "tensor 'snapshot.0.weights' is missing"),
    ("losses-2d", _set("losses", np.zeros((2, 2))), "'losses' must be 1-D"),
    ("weights-missing", _drop("weights"), "tensor 'weights' is missing"),
]


@pytest.mark.parametrize("case,tamper,expected", TAMPERED, ids=[case[0] for case in TAMPERED])
def test_fit_resume_refuses_a_tampered_checkpoint_before_loading_a_model(tmp_path, case, tamper, expected):
    out, _ = user_folder(tmp_path)
    _checkpoint_for(out / "checkpoint.safetensors", "a head", tamper)
    before = snapshot(out)
    started = time.monotonic()
    code, err = run_fit("--prompt", "a head", "--out", str(out), "--resume")
    assert_refused(code, err, 3, expected, out, before)
    assert time.monotonic() - started < 5, "the checkpoint is checked before any heavy work"


def test_fit_resume_accepts_the_untampered_checkpoint(tmp_path):
    """The control of the cases above: the same checkpoint as written passes every check."""
    from sds_backend import DEFAULT_BUNDLE, bundle, fit_config
    from sds_backend.app.fit_command import check_resumable
    from sds_backend.app.request import make_request

    _checkpoint_for(tmp_path / "checkpoint.safetensors", "a head")
    request = make_request("a head", "", None, str(DEFAULT_BUNDLE), config=fit_config.FitConfig())
    assert bundle.load(DEFAULT_BUNDLE).num_components == K
    check_resumable(tmp_path, tmp_path / "checkpoint.safetensors", request, [])


def test_fit_resume_refuses_the_checkpoint_of_another_prompt(tmp_path):
    out, _ = user_folder(tmp_path)
    _checkpoint_for(out / "checkpoint.safetensors", "a pirate")
    before = snapshot(out)
    assert_refused(*run_fit("--prompt", "a head", "--out", str(out), "--resume"), 3,
                   "it was made for prompt 'a pirate', not 'a head'", out, before)


def test_fit_resume_refuses_a_folder_of_outputs_without_their_checkpoint(tmp_path):
    out, _ = user_folder(tmp_path)
    (out / "weights.json").write_text('{"a": 1}')
    before = snapshot(out)
    assert_refused(*run_fit("--prompt", "a head", "--out", str(out), "--resume"), 3,
                   "holds the outputs of another run (weights.json) but no checkpoint.safetensors", out, before)


def test_fit_overwrite_refuses_an_output_name_taken_by_a_folder(tmp_path):
    out, _ = user_folder(tmp_path)
    (out / "head.glb").mkdir()
    (out / "head.glb" / "inside.txt").write_text("the user's own")
    before = snapshot(out)
    assert_refused(*run_fit("--prompt", "a head", "--out", str(out), "--overwrite"), 5,
                   "head.glb is a folder, not an earlier output", out, before)


def test_fit_refuses_a_folder_another_run_is_writing_into(tmp_path):
    import fcntl

    out, before = user_folder(tmp_path)
    lock = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert_refused(*run_fit("--prompt", "a head", "--out", str(out)), 5,
                       "another run is writing into", out, before)
    finally:
        os.close(lock)


def test_fit_refuses_names_too_long_for_the_file_system(tmp_path):
    out, before = user_folder(tmp_path)
    assert_refused(*run_fit("--prompt", "a head", "--out", str(out / ("x" * 300))), 5,
                   "the name is too long for the file system", out, before)


def test_fit_refuses_an_output_path_that_is_a_file_or_lies_under_one(tmp_path):
    out, before = user_folder(tmp_path)
    assert_refused(*run_fit("--prompt", "a head", "--out", str(out / "notes.txt")), 5, "is not a folder", out, before)
    assert_refused(*run_fit("--prompt", "a head", "--out", str(out / "notes.txt" / "deeper")), 5, "cannot write",
                   out, before)


@pytest.mark.parametrize("disk,expected", [("full", "no space left on the device"),
                                           ("read-only", "the file system is read-only")])
def test_fit_refuses_a_full_or_read_only_output_disk_before_loading_anything(disks, disk, expected):
    out = disks[disk] / "out"
    before = snapshot(disks[disk])
    code, err = run_fit("--prompt", "a head", "--out", str(out))
    assert code == 5 and expected in err and "Traceback" not in err, err
    assert snapshot(disks[disk]) == before and not leftovers(disks[disk])


# ---------------------------------------------------------------------- fit: separate processes
def _fit_process(tmp_path, tiny_sd_dir, out, **config):
    return subprocess.Popen([sys.executable, "-m", "sds_backend", "fit", "--prompt", "a man", "--out", str(out),
                             "--model", str(tiny_sd_dir), "--config", json.dumps(FAST | {
                                 "shape_steps": 100000, "checkpoint_every": 5} | config)],
                            stderr=open(tmp_path / "stderr.log", "w"), stdout=subprocess.DEVNULL)


def _wait_for_progress(out: Path, process, timeout: float = 60.0) -> None:
    """Until the fit has written its first periodic checkpoint (it is running its iterations)."""
    deadline = time.monotonic() + timeout
    while not (out / "checkpoint.safetensors").exists():
        assert process.poll() is None and time.monotonic() < deadline, "the fit did not start"
        time.sleep(0.1)


def test_ctrl_c_stops_after_the_iteration_and_writes_a_complete_result_marked_stopped(tmp_path, tiny_sd_dir):
    out = tmp_path / "out"
    process = _fit_process(tmp_path, tiny_sd_dir, out)
    _wait_for_progress(out, process)
    process.send_signal(signal.SIGINT)
    assert process.wait(60) == 130
    err = (tmp_path / "stderr.log").read_text()
    assert "SIGINT: stopping after the current iteration" in err and "Traceback" not in err, err
    fit = json.loads((out / "fit.json").read_text())
    assert fit["stopped"] is True and fit["iterations"] >= 5
    assert {"weights.json", "fit.json", "head.glb", "evolution.gif", "checkpoint.safetensors"} == {
        p.name for p in out.iterdir()}
    assert not leftovers(tmp_path)


def test_a_second_sigterm_aborts_at_once_and_writes_nothing_half(tmp_path, tiny_sd_dir):
    out, before = user_folder(tmp_path)
    process = _fit_process(tmp_path, tiny_sd_dir, out, gif_frames=24)    # a second or so of writing
    _wait_for_progress(out, process)
    process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30     # a second signal sent at once would merge with the first
    while "SIGTERM: stopping" not in (tmp_path / "stderr.log").read_text() and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == 143
    err = (tmp_path / "stderr.log").read_text()
    assert "aborted: nothing was written" in err and "Traceback" not in err, err
    after = snapshot(out)
    assert {k: v for k, v in after.items() if k != "checkpoint.safetensors"} == before   # the last checkpoint stays
    assert not leftovers(tmp_path)


def test_a_disk_that_fills_up_at_the_end_of_a_fit_loses_nothing(disks, tmp_path, tiny_sd_dir):
    out = disks["small"] / "out"
    out.mkdir(exist_ok=True)
    (out / "notes.txt").write_text("kept")
    before = snapshot(disks["small"])
    completed = subprocess.run([sys.executable, "-m", "sds_backend", "fit", "--prompt", "a man", "--out", str(out),
                                "--model", str(tiny_sd_dir), "--config", json.dumps(FAST | {"checkpoint_every": 0})],
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 5, completed.stderr
    assert "no space left on the device" in completed.stderr and "Traceback" not in completed.stderr
    assert {k: v for k, v in snapshot(disks["small"]).items() if k != "out/checkpoint.safetensors"} == before
    assert not leftovers(disks["small"])


def test_a_bad_input_fails_within_two_seconds_of_start(tmp_path):
    started = time.perf_counter()
    completed = subprocess.run([sys.executable, "-m", "sds_backend", "fit", "--prompt", "a head", "--out",
                                str(tmp_path / "out"), "--config", '{"lr": 1e308}'], capture_output=True, text=True,
                               timeout=60)
    assert time.perf_counter() - started < 2.0
    assert completed.returncode == 3 and "config.lr" in completed.stderr
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------- serve
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    process = ServerProcess(tmp_path_factory.mktemp("hostile-server"))
    assert process.next(60)["type"] == "hello"
    yield process
    process.close()


def _server_cases(files: Path, disks_available: dict) -> list[tuple[str, dict, str, str]]:
    """(id, fit fields, error kind, expected text)."""
    from sds_backend import DEFAULT_BUNDLE, bundle

    first = bundle.load(DEFAULT_BUNDLE).names[0]
    cases = [(f"config:{case}", {"config": values}, "bad_request", expected)
             for case, values, expected in hostile.config_cases()]
    cases += [(f"bundle:{case}", {"bundle": str(path)}, "bundle_error", expected)
              for case, path, expected in hostile.bundle_cases(files / "bundles")]
    (files / "a-file").write_text("not a folder")
    (files / "earlier-job").mkdir(exist_ok=True)
    (files / "earlier-job" / "weights.json").write_text('{"the": "client\'s earlier fit"}')
    cases += [
        ("prompt-surrogate", {"prompt": "a \ud800 head"}, "bad_request", "lone UTF-16 surrogate"),
        ("negative-surrogate", {"negative_prompt": "\udfff"}, "bad_request", "negative_prompt"),
        ("prompt-too-long", {"prompt": "x" * 2001}, "bad_request", "at most 2000 characters"),
        ("weights-1e308", {"initial_weights": [1e308] * 50}, "bad_request", "initial_weights[0]"),
        ("weights-count", {"initial_weights": [0.0] * 3}, "bad_request", "expected 50 values"),
        ("keys-unknown", {"keys": [first, "nobody"]}, "bad_request", "keys: 1 name(s) the head does not have"),
        ("keys-empty", {"keys": []}, "bad_request", "no component left to fit"),
        ("keys-not-text", {"keys": [1, 2]}, "bad_message", "'keys' must be"),
        ("bounds-inverted", {"bounds": {first: [1, -1]}}, "bad_request", "expected low < high"),
        ("bounds-1e308", {"bounds": {first: [-1e308, 1e308]}}, "bad_request", "expected a number in"),
        ("bounds-unknown", {"bounds": {"nobody": [0, 1]}}, "bad_request", "bounds: 1 name(s)"),
        ("bounds-three", {"bounds": {first: [0, 1, 2]}}, "bad_message", "'bounds' must be"),
        ("bounds-list", {"bounds": [[0, 1]]}, "bad_message", "'bounds' must be"),
        ("start-outside-bounds", {"bounds": {first: [0.5, 1]}}, "bad_request", "lies outside its bounds"),
        ("vae-model-without-tiny", {"vae_model": "madebyollin/taesd"}, "bad_request", "set vae to 'tiny'"),
        ("vae-model-not-text", {"vae_model": 5}, "bad_message", "'vae_model' must be"),
        ("vae-model-missing", {"vae_model": "/nonexistent/taesd", "config": FAST | {"vae": "tiny"}}, "model_error",
         "vae_model: folder /nonexistent/taesd not found"),
        ("vae-unknown", {"config": FAST | {"vae": "medium"}}, "bad_request", "config.vae"),
        ("model-nul", {"model": "./a\u0000b"}, "model_error", "NUL character"),
        ("model-surrogate", {"model": "./\ud800"}, "model_error", "lone UTF-16 surrogate"),
        ("job-dir-a-file", {"job_dir": str(files / "a-file")}, "output_error", "is not a folder"),
        ("job-dir-under-a-file", {"job_dir": str(files / "a-file" / "job")}, "output_error", "cannot write"),
        ("job-dir-holds-outputs", {"job_dir": str(files / "earlier-job")}, "output_error",
         "already holds the outputs of another run (weights.json); remove them first"),
        ("job-dir-name-too-long", {"job_dir": str(files / ("x" * 300))}, "output_error", "name is too long"),
        ("job-dir-nul", {"job_dir": "/tmp/a\u0000b"}, "bad_request", "NUL character"),
        ("job-dir-surrogate", {"job_dir": "/tmp/\ud800"}, "bad_request", "not valid text"),
    ]
    if disks_available:
        cases += [("job-dir-full-disk", {"job_dir": str(disks_available["full"] / "job")}, "output_error",
                   "no space left"),
                  ("job-dir-read-only", {"job_dir": str(disks_available["read-only"] / "job")}, "output_error",
                   "read-only")]
    return cases


def test_serve_answers_every_hostile_request_and_keeps_serving(server, files, tmp_path, tiny_sd_dir, request):
    try:
        available = request.getfixturevalue("disks")
    except pytest.skip.Exception:
        available = {}
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    (job_dir / "head.npz").write_bytes(b"the add-on's input: must stay as it is")
    before = snapshot(job_dir)
    cases = _server_cases(files, available)
    for case, fields, kind, expected in cases:
        message = {"v": protocol.PROTOCOL_VERSION, "type": "fit", "id": case, "prompt": "a man",
                   "model": str(tiny_sd_dir), "config": FAST, "job_dir": str(job_dir), **fields}
        server.send_raw((json.dumps(message) + "\n").encode())
        reply = server.reply(60)
        # a line that breaks the protocol is answered without an id: nothing in it can be trusted
        assert reply["type"] == "error" and reply["id"] == (None if kind == "bad_message" else case), (case, reply)
        assert reply["kind"] == kind and expected in reply["message"], (case, reply)
        assert "traceback" not in reply, (case, reply)
        assert server.proc.poll() is None, case
        assert snapshot(job_dir) == before and not leftovers(job_dir), case
    assert not (files / "bundles" / "PICKLE_RAN").exists()
    assert (files / "earlier-job" / "weights.json").read_text() == '{"the": "client\'s earlier fit"}'
    assert len(cases) >= 150
    # and it still fits
    server.send("fit", id="after", prompt="a man", model=str(tiny_sd_dir), config=FAST, job_dir=str(job_dir),
                outputs=["weights"])
    done, _ = server.until("done")
    assert done["id"] == "after" and set(done["outputs"]) == {"weights"}


def test_serve_ends_quietly_when_its_client_closes_stdout_mid_fit(tmp_path, tiny_sd_dir):
    process = ServerProcess(tmp_path)
    assert process.next(60)["type"] == "hello"
    process.send("fit", id="a", prompt="a man", model=str(tiny_sd_dir), config=FAST | {"shape_steps": 100000},
                 job_dir=str(tmp_path / "job"))
    message = process.next(60)
    while message["type"] != "progress" or message["stage"] == "loading":
        message = process.next(60)
    process.proc.stdout.close()
    assert process.proc.wait(60) == 0
    log = (tmp_path / "stderr.log").read_text()
    assert "the client closed the protocol channel" in log
    assert "Fatal Python error" not in log and "Traceback" not in log, log[-2000:]
