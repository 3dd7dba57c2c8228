"""`download-model`: what the add-on's Download Model button runs. No test reaches the Hub:
each runs with HF_HUB_OFFLINE=1, which is also how an offline machine looks to the command."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from sds_backend.app.download import expected_bytes


def download(*args, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    result = subprocess.run([sys.executable, "-m", "sds_backend", "download-model", *args], env=env,
                            capture_output=True, text=True, timeout=120)
    reports = [json.loads(line) for line in result.stdout.splitlines()]
    return result.returncode, reports, result.stderr


def test_offline_it_fails_at_once_with_one_line(tmp_path):
    code, reports, stderr = download("--model", "someone/some-model", tmp_path=tmp_path)
    assert code == 4 and "Traceback" not in stderr
    assert reports[-1] == {"ok": False, "message": "cannot download model someone/some-model: "
                                                   "downloads are disabled by HF_HUB_OFFLINE"}


@pytest.mark.parametrize("model, expected", [("./no/such/folder", "not found"), ("{tmp}/file.txt", "not a folder"),
                                             ("{tmp}", "no model_index.json")])
def test_a_missing_or_wrong_folder_is_bad_input(tmp_path, model, expected):
    (tmp_path / "file.txt").write_text("not a model")
    code, reports, _ = download("--model", model.format(tmp=tmp_path), tmp_path=tmp_path)
    assert code == 3 and reports[-1]["ok"] is False and expected in reports[-1]["message"]


def test_a_local_folder_needs_no_download(tmp_path, tiny_sd_dir):
    code, reports, _ = download("--model", str(tiny_sd_dir), "--vae-model", str(tiny_sd_dir / "tiny_vae"),
                                tmp_path=tmp_path)
    assert code == 0 and reports[-1] == {"ok": True, "message": f"ready: {tiny_sd_dir}, {tiny_sd_dir / 'tiny_vae'}"}
    assert not (tmp_path / "hf").exists()


def test_the_expected_size_counts_the_files_a_pipeline_download_fetches():
    files = {"model_index.json": 1, "unet/config.json": 2, "unet/diffusion_pytorch_model.safetensors": 100,
             "unet/diffusion_pytorch_model.fp16.safetensors": 50, "unet/diffusion_pytorch_model.bin": 100,
             "vae/diffusion_pytorch_model.safetensors": 10, "text_encoder/model.safetensors": 20,
             "tokenizer/vocab.json": 3, "scheduler/scheduler_config.json": 4, "v1-5-pruned.ckpt": 4000,
             "safety_checker/model.safetensors": 1000, "unet/diffusion_pytorch_model.non_ema.safetensors": 100}
    siblings = [SimpleNamespace(rfilename=name, size=size) for name, size in files.items()]
    assert expected_bytes(siblings) == 1 + 2 + 100 + 10 + 20 + 3 + 4
