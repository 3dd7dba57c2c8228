"""The headless entry point's input checks and exit codes, run in this process (bpy module).

test_05_blender runs the same entry point under a real `blender -b` for one case of each exit
code; the rest are checked here, where each costs no Blender start.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from file_checks import leftovers, snapshot


@pytest.fixture
def run_headless(addon, synthetic_bundle, tmp_path, capsys):
    from blender_addon import headless

    def run(*args: str) -> tuple[int, str]:
        code = headless.main(["--out", str(tmp_path / "out"), "--bundle", str(synthetic_bundle), *args])
        return code, capsys.readouterr().err

    return run


def test_missing_backend_python_exits_3(run_headless):
    code, err = run_headless("--prompt", "a head", "--backend-python", "/nonexistent/python")
    assert code == 3, err
    assert "error: Backend Python not found: /nonexistent/python" in err


def test_missing_model_folder_exits_3(run_headless, tmp_path):
    code, err = run_headless("--prompt", "a head", "--model", str(tmp_path / "no-such-model"))
    assert code == 3, err
    assert f"error: model: folder {tmp_path / 'no-such-model'} not found" in err


def test_backend_answering_garbage_exits_4_and_writes_nothing(run_headless, fake_backend, tmp_path):
    code, err = run_headless("--prompt", "a head", "--backend-python", fake_backend("garbage"))
    assert code == 4, err
    assert "Backend answered garbage" in err
    assert not (tmp_path / "out" / "weights.json").exists()


# ------------------------------------------------------------------------------ hostile inputs
def _special(tmp_path: Path, kind: str) -> str:
    path = tmp_path / f"special-{kind}.npz"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    elif kind == "loop":
        path.symlink_to(path)
    elif kind == "text":
        path.write_text("not a bundle")
    elif kind == "dev-zero":
        return "/dev/zero"
    return str(path)


HEADLESS_CASES = [
    # (id, arguments, exit code, text of the error)
    ("steps-zero", ["--steps", "0"], 3, "config.shape_steps"),
    ("guidance-1e308", ["--guidance", "1e308"], 3, "config.guidance_scale"),
    ("lr-nan", ["--lr", "nan"], 3, "config.lr"),
    ("weight-clamp-1e308", ["--weight-clamp", "1e308"], 3, "config.weight_clamp"),
    ("render-size-huge", ["--render-size", "100000"], 3, "config.render_size"),
    ("seed-negative", ["--seed", "-5"], 3, "config.seed"),
    ("stages-unknown", ["--stages", "shape,colour"], 3, "config.stages"),
    ("stages-none", ["--stages", ","], 3, "No stage selected"),
    ("config-yaw-1e308", ["--config", '{"yaw_range": [-1e308, 1e308]}'], 3, "config.yaw_range"),
    ("config-zoom-zero", ["--config", '{"zoom_range": [0, 0]}'], 3, "config.zoom_range"),
    ("config-unknown", ["--config", '{"colour": 1}'], 3, "unknown key(s) colour"),
    ("config-nested", ["--config", "[" * 100_000 + "]" * 100_000], 3, "nested too deeply"),
    ("config-nan", ["--config", '{"lr": NaN}'], 3, "non-finite number NaN"),
    ("config-list", ["--config", "[]"], 3, "expected a JSON object"),
    ("prompt-surrogate", ["--prompt", "\udcff"], 3, "lone UTF-16 surrogate"),
    ("prompt-long", ["--prompt", "x" * 2001], 3, "at most 2000 characters"),
    ("negative-surrogate", ["--negative", "a\ud800"], 3, "negative_prompt"),
    ("model-no-index", ["--model", "/tmp"], 3, "has no model_index.json"),
    ("model-nul", ["--model", "./a\0b"], 3, "NUL character"),
    ("vae-unknown", ["--vae", "medium"], 3, "config.vae: expected one of full, tiny"),
    ("vae-model-without-tiny", ["--vae-model", "madebyollin/taesd"], 3, "choose the Tiny VAE (--vae tiny)"),
    ("vae-model-missing", ["--vae", "tiny", "--vae-model", "/nonexistent/taesd"], 3,
     "vae_model: folder /nonexistent/taesd not found"),
    ("object-missing", ["--object", "Nobody"], 3, "no such object"),
    ("steps-text", ["--steps", "many"], 2, ""),
    ("unknown-flag", ["--colour", "red"], 2, ""),
]


@pytest.mark.parametrize("case,args,code,expected", HEADLESS_CASES, ids=[c[0] for c in HEADLESS_CASES])
def test_headless_refuses_hostile_input_before_starting(run_headless, tmp_path, case, args, code, expected):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("the user's own")
    before = snapshot(out)
    given = ["--prompt", "a head", *args] if "--prompt" not in args else args
    got, err = run_headless(*given)
    assert got == code, err
    assert expected in err and "Traceback" not in err, err
    assert snapshot(out) == before and not leftovers(tmp_path)


@pytest.mark.parametrize("kind,expected", [("fifo", "FIFO"), ("folder", "is a folder"), ("loop", "symlink loop"),
                                           ("text", "cannot read the file"), ("dev-zero", "character device"),
                                           ("missing", "not found")])
def test_headless_refuses_hostile_bundle_files(addon, tmp_path, capsys, kind, expected):
    from blender_addon import headless

    code = headless.main(["--prompt", "a head", "--out", str(tmp_path / "out"), "--bundle", _special(tmp_path, kind)])
    err = capsys.readouterr().err
    assert code == 3 and expected in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_headless_refuses_a_folder_with_another_runs_outputs_and_an_existing_save(run_headless, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "weights.json").write_text('{"a": 1}')
    before = snapshot(out)
    code, err = run_headless("--prompt", "a head")
    assert code == 5 and "already holds the outputs of another run (weights.json)" in err, err
    assert "--overwrite" in err and snapshot(out) == before
    (out / "weights.json").unlink()
    blend = tmp_path / "scene.blend"
    blend.write_bytes(b"the user's scene")
    code, err = run_headless("--prompt", "a head", "--save", str(blend))
    assert code == 5 and f"--save: {blend} exists; pass --overwrite to replace it" in err, err
    assert blend.read_bytes() == b"the user's scene" and not leftovers(tmp_path)


@pytest.mark.parametrize("case,save,expected", [
    ("a-folder", "a-folder", "is a folder, not a file"),
    ("no-such-folder", "missing/scene.blend", "the folder {tmp}/missing does not exist"),
    ("name-too-long", "x" * 300 + ".blend", "the name is too long for the file system"),
    ("an-output-name", "out/weights.json", "is where the fit writes its weights.json"),
])
def test_headless_refuses_a_save_path_it_could_not_write_before_the_fit(run_headless, tmp_path, case, save,
                                                                        expected):
    (tmp_path / "a-folder").mkdir()
    (tmp_path / "a-folder" / "inside.txt").write_text("the user's own")
    before = snapshot(tmp_path)
    code, err = run_headless("--prompt", "a head", "--overwrite", "--save", str(tmp_path / save))
    assert code == 5 and expected.format(tmp=tmp_path) in err and "Traceback" not in err, err
    assert snapshot(tmp_path) == before and not leftovers(tmp_path)


def test_headless_refuses_an_output_path_that_is_a_file(run_headless, tmp_path):
    (tmp_path / "out").write_text("a file where the folder should be")
    code, err = run_headless("--prompt", "a head")
    assert code == 5 and "is not a folder" in err, err
    assert (tmp_path / "out").read_text() == "a file where the folder should be"


@pytest.fixture
def full_disk(tmp_path):
    """A tmpfs with no room left (skipped where this machine does not allow mounting one)."""
    import subprocess

    path = tmp_path / "disk"
    path.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(path)],
                                           capture_output=True).returncode:
        pytest.skip("this machine does not let the tests mount a small tmpfs (needs root and CAP_SYS_ADMIN)")
    try:
        with open(path / "filler", "wb") as handle:
            while True:
                handle.write(b"\0" * 4096)
                handle.flush()
    except OSError:
        pass
    yield path
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_headless_refuses_a_full_output_disk_before_the_fit(addon, full_disk, synthetic_bundle, capsys):
    from blender_addon import headless

    before = snapshot(full_disk)
    code = headless.main(["--prompt", "a head", "--out", str(full_disk / "out"), "--bundle", str(synthetic_bundle)])
    err = capsys.readouterr().err
    assert code == 5 and "no space left on the device" in err and "Traceback" not in err, err
    assert snapshot(full_disk) == before and not leftovers(full_disk)
