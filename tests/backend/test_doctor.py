"""`python -m sds_backend doctor`: JSON report for the add-on, exit codes, clear model errors."""
from __future__ import annotations

import json

import numpy as np
import pytest

from sds_backend.__main__ import main
from sds_backend import bundle


@pytest.fixture
def head_bundle(tmp_path):
    """A valid two-component tetrahedron bundle."""
    mean = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float32)
    faces = np.array([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]], dtype=np.int32)
    head = bundle.Bundle.from_arrays(
        mean=mean, basis=np.random.default_rng(0).normal(size=(2, 4, 3)).astype(np.float32), names=np.array(["a", "b"]),
        faces=faces, uv=mean[:, :2].copy(), uv_faces=faces,
    )
    path = tmp_path / "head.npz"
    bundle.save(head, path)
    return path


def doctor_json(capsys, *args):
    code = main(["doctor", "--json", *map(str, args)])
    out = capsys.readouterr().out
    return code, json.loads(out)  # the whole of stdout is one JSON object


def test_json_with_the_tiny_model_folder(capsys, tiny_sd_dir, head_bundle):
    code, report = doctor_json(capsys, "--model", tiny_sd_dir, "--head", head_bundle, "--device", "cpu")
    assert code == 0 and report["ok"] is True
    assert report["model"]["ok"] is True and report["model"]["error"] is None
    assert report["model"]["id"] == str(tiny_sd_dir) and report["model"]["resolution"] == 256
    assert report["model"]["dtype"] == "float32" and report["model"]["seconds"] >= 0
    assert report["head"] == {"path": str(head_bundle), "ok": True, "vertices": 4, "components": 2, "error": None}
    assert report["device"]["type"] == "cpu"
    assert report["versions"]["torch"] and report["versions"]["diffusers"] and report["versions"]["transformers"]


def test_missing_model_fails_with_the_clear_message(capsys, tmp_path, head_bundle):
    missing = tmp_path / "nowhere"
    code, report = doctor_json(capsys, "--model", missing, "--head", head_bundle, "--device", "cpu")
    assert code != 0 and report["ok"] is False and report["model"]["ok"] is False
    error = report["model"]["error"]
    assert str(missing) in error and "--model DIR" in error and "Traceback" not in error
    assert report["head"]["ok"] is True


def test_uncached_hub_id_says_local_only(capsys, head_bundle):
    code, report = doctor_json(capsys, "--model", "nobody/no-such-sd-model", "--head", head_bundle, "--device", "cpu")
    assert code != 0
    assert "Hugging Face cache" in report["model"]["error"] and "--download" in report["model"]["error"]


def test_missing_head_bundle_is_reported_and_fails(capsys, tiny_sd_dir, tmp_path):
    code, report = doctor_json(capsys, "--model", tiny_sd_dir, "--head", tmp_path / "default_head.npz", "--device", "cpu")
    assert code != 0 and report["model"]["ok"] is True and report["head"]["ok"] is False
    assert "does not exist" in report["head"]["error"] and "make-head" in report["head"]["error"]


def test_invalid_head_bundle_is_reported(capsys, tiny_sd_dir, tmp_path):
    broken = tmp_path / "broken.npz"
    np.savez(broken, mean=np.zeros((4, 3), np.float32))
    code, report = doctor_json(capsys, "--model", tiny_sd_dir, "--head", broken, "--device", "cpu")
    assert code != 0 and "missing required field" in report["head"]["error"]


def test_text_report(capsys, tiny_sd_dir, head_bundle):
    code = main(["doctor", "--model", str(tiny_sd_dir), "--head", str(head_bundle), "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0
    assert "model         ok" in out and "head          ok" in out and "all good" in out
