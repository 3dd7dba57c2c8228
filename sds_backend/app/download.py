"""`download-model`: fetch a Stable Diffusion checkpoint (and a tiny VAE) into the Hugging Face cache.

    python -m sds_backend download-model [--model ID] [--vae-model ID]

Prints one JSON object per line: `{"step": ...}`, `{"downloaded_bytes": n, "total_bytes": t}`
about once a second while files arrive (the add-on's Download Model button shows them), and a last
`{"ok": true|false, "message": ...}`. Only the files a fit loads are fetched (diffusers'
own selection: safetensors weights, configs, tokenizer), the same files `fit` would download on
first use. A local folder needs no download; an offline machine or an unknown id fails at once
with one message, exit code 4 (exits.BACKEND); a malformed id or path exits 3.
"""
from __future__ import annotations

import argparse
import json
import threading
from pathlib import Path

from .. import exits
from ..inputs import InputError, check_model_source, default_model_id, looks_like_path

# the pipeline parts SDS loads, and the weight files of those parts diffusers picks
PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_SKIPPED_WEIGHTS = (".bin", ".ckpt", ".msgpack", ".onnx", ".pb", ".h5", ".pt", ".pth")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help=f"hub id or folder (default: {default_model_id()})")
    parser.add_argument("--vae-model", default=None, help="also this tiny VAE (AutoencoderTiny hub id or folder)")


def say(**report) -> None:
    print(json.dumps(report), flush=True)


def expected_bytes(siblings) -> int:
    """Sum of the sizes of the files a pipeline download fetches, from the Hub's file list."""
    total = 0
    for sibling in siblings:
        name, size = sibling.rfilename, getattr(sibling, "size", None) or 0
        part = name.split("/", 1)[0] if "/" in name else ""
        if name == "model_index.json" or (part in PARTS and not name.endswith(_SKIPPED_WEIGHTS)
                                          and ".fp16." not in name and "ema" not in name.rsplit("/", 1)[-1]):
            total += size
    return total


class _CacheWatcher:
    """Reports the bytes under a repo's cache folder (finished blobs and partial downloads)."""

    def __init__(self, repo_id: str, total: int):
        from huggingface_hub.constants import HF_HUB_CACHE

        self.folder = Path(HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
        self.total, self.done = total, threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def _size(self) -> int:
        try:
            return sum(p.stat().st_size for p in (self.folder / "blobs").iterdir() if p.is_file())
        except OSError:
            return 0

    def _watch(self) -> None:
        while not self.done.wait(1.0):
            say(downloaded_bytes=self._size(), total_bytes=self.total)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        say(downloaded_bytes=self._size(), total_bytes=self.total)


def _hub_info(repo_id: str):
    """The repo's file list, asked once with a short timeout; one line when the Hub says no."""
    from huggingface_hub import HfApi
    from huggingface_hub.constants import is_offline_mode

    if is_offline_mode():
        raise ConnectionError("downloads are disabled by HF_HUB_OFFLINE")
    try:
        return HfApi().model_info(repo_id, files_metadata=True, timeout=10)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise ConnectionError(f"the Hugging Face Hub did not answer ({type(exc).__name__}: {first})") from None


def download(model: str, kind: str) -> str:
    """Fetch one checkpoint; returns its cache folder (or the local folder as it is)."""
    if looks_like_path(model):
        say(step=f"{kind} {model} is a local folder: nothing to download")
        return model
    say(step=f"asking the Hub about {model}")
    info = _hub_info(model)
    if kind == "model":
        from diffusers import DiffusionPipeline

        with _CacheWatcher(model, expected_bytes(info.siblings)):
            say(step=f"downloading {model}")
            return str(DiffusionPipeline.download(model))
    from huggingface_hub import snapshot_download

    total = sum(s.size or 0 for s in info.siblings if s.rfilename.endswith((".json", ".safetensors")))
    with _CacheWatcher(model, total):
        say(step=f"downloading {model}")
        return snapshot_download(model, allow_patterns=["*.json", "*.safetensors"])


def run(args: argparse.Namespace) -> int:
    try:
        model = check_model_source(args.model, "model") or default_model_id()
        tiny_vae = check_model_source(args.vae_model, "vae_model")
    except InputError as exc:
        say(ok=False, message=str(exc))
        return exits.BAD_INPUT
    where = []
    for source, kind in ((model, "model"), (tiny_vae, "tiny VAE")):
        if not source:
            continue
        try:
            where.append(download(source, kind))
        except Exception as exc:   # the Hub, the disk, the network: one line, never a traceback
            message = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            if not isinstance(exc, ConnectionError):
                message = f"{type(exc).__name__}: {message}"
            say(ok=False, message=f"cannot download {kind} {source}: {message}")
            return exits.BACKEND
    say(ok=True, message="ready: " + ", ".join(where))
    return exits.OK

