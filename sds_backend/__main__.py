"""Command line: python -m sds_backend {fit,serve,doctor,download-model,bench,make-head,make-tiny-sd} ...

Each subcommand lives in its own module; this file only routes, so `--help` stays fast and
importing the CLI never loads torch until a command needs it.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# subcommand -> (module, one-line help). Each module has add_arguments(parser) and run(args) -> int.
COMMANDS = {
    "fit": ("sds_backend.app.fit_command", "fit the head to a text prompt and write the outputs"),
    "serve": ("sds_backend.app.server", "speak the JSON-lines protocol on stdin/stdout (used by the Blender add-on)"),
    "doctor": ("sds_backend.app.doctor", "report device, versions, whether the model and the default head load"),
    "download-model": ("sds_backend.app.download", "fetch the model (and a tiny VAE) into the Hugging Face cache"),
    "bench": ("sds_backend.tools.bench", "print benchmark figures as one JSON object"),
    "make-head": ("sds_backend.tools.make_head", "build assets/default_head.npz from the CC0 MakeHuman data"),
    "make-tiny-sd": ("sds_backend.tools.tiny_sd", "save a tiny random Stable Diffusion folder (tests, demos)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m sds_backend", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    name = argv[0]
    if name not in COMMANDS:
        parser.error(f"unknown command {name!r}; choose from {', '.join(COMMANDS)}")
    if sys.platform == "darwin":   # an op Apple's MPS lacks runs on the CPU instead of failing (app/device.py)
        os.environ.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "1")
    from .app.allocator import tune_for_reuse

    tune_for_reuse()   # this process is ours: keep freed tensor memory mapped (see allocator.py)
    module = importlib.import_module(COMMANDS[name][0])
    command_parser = argparse.ArgumentParser(prog=f"python -m sds_backend {name}", description=COMMANDS[name][1])
    module.add_arguments(command_parser)
    return int(module.run(command_parser.parse_args(argv[1:])) or 0)


def exit_without_teardown(code: int) -> None:
    """End the process once a command has returned, skipping the interpreter's teardown.

    With torch, diffusers and transformers loaded, teardown takes 1-2 s of a core after every
    output is written and closed; the add-on starts a backend per session and waits for it to end
    when Blender quits. Exceptions never get here: they exit the usual way, with their traceback.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):   # a closed or broken pipe: nothing left to say
            pass
    os._exit(code)


if __name__ == "__main__":
    exit_without_teardown(main())
