"""The headless entry point's input checks and exit codes, run in this process (bpy module).

test_05_blender runs the same entry point under a real `blender -b` for one case of each exit
code; the rest are checked here, where each costs no Blender start.
"""
from __future__ import annotations

import pytest


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
