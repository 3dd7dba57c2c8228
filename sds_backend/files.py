"""User files in and outputs out, so that nothing the user owns is lost or run (stdlib only).

Both processes use this module: the backend as `sds_backend.files`, the Blender add-on through
its shared subpackage (see blender_addon/paths.py).

Reading: `check_input_file` accepts a regular, readable file within a size limit and names
what is wrong otherwise: missing, a folder, a FIFO (a read would wait forever), a device such as
/dev/zero (endless), a symlink loop. `parse_json` refuses NaN/Infinity, nesting too deep for the
parser and text that is not UTF-8, each with a message instead of a traceback.

Writing: `atomic_write` writes a temporary file beside the target and renames it over the
target, so a reader, a crash or a full disk never leaves half a file, and the temporary file is
removed on every failure. `OutputSet` stages a whole set of outputs and moves them into their
folder only once every one of them is written: a folder holds one run's complete outputs, the
previous run's, or (for a new folder) nothing.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import stat
from pathlib import Path
from typing import Any, Callable, Iterable

PROBE_BYTES = 64 * 1024          # what the writability probe writes: room for a small file
STAGING_PREFIX = ".sds-head-staging-"


class InputError(ValueError):
    """An input (file, path or value) that cannot be used; the message names it and says why."""


class OutputError(Exception):
    """An output that cannot be written; the message names the file and the reason."""


# ------------------------------------------------------------------------------------------ inputs
def check_path_text(value: Any, what: str) -> str:
    """A path given as text: non-empty, no NUL, encodable for the file system."""
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{what}: expected a path, got {value!r}")
    if "\0" in value:
        raise InputError(f"{what}: the path contains a NUL character")
    try:
        os.fsencode(value)
    except UnicodeEncodeError:
        raise InputError(f"{what}: the path {value!r} is not valid text (a lone UTF-16 surrogate?)") from None
    return value


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "special file"


def check_input_file(path: str | os.PathLike, what: str, max_bytes: int) -> Path:
    """`path` as a Path when it is a regular file of at most `max_bytes` that this process can
    read; InputError naming `what` and the path otherwise. Opens nothing."""
    check_path_text(os.fspath(path), what)
    path = Path(path).expanduser()
    try:
        info = path.stat()
    except FileNotFoundError:
        raise InputError(f"{what}: {path} not found") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InputError(f"{what}: {path} is a symlink loop") from None
        raise InputError(f"{what}: cannot read {path}: {exc.strerror}") from None
    if stat.S_ISDIR(info.st_mode):
        raise InputError(f"{what}: {path} is a folder, expected a file")
    if not stat.S_ISREG(info.st_mode):
        raise InputError(f"{what}: {path} is a {_kind(info.st_mode)}, not a regular file")
    if info.st_size > max_bytes:
        raise InputError(f"{what}: {path} has {info.st_size} bytes, more than the {max_bytes}-byte limit")
    if not os.access(path, os.R_OK):
        raise InputError(f"{what}: {path} is not readable (permission denied)")
    return path


def read_input_file(path: str | os.PathLike, what: str, max_bytes: int) -> bytes:
    """The bytes of a file `check_input_file` accepts (re-checked against the limit while reading)."""
    path = check_input_file(path, what, max_bytes)
    try:
        with open(path, "rb") as handle:
            data = handle.read(max_bytes + 1)
    except OSError as exc:
        raise InputError(f"{what}: cannot read {path}: {exc.strerror}") from None
    if len(data) > max_bytes:
        raise InputError(f"{what}: {path} grew past the {max_bytes}-byte limit while it was read")
    return data


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name} is not allowed")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    """An object whose keys are all different (JSON would keep the last of two silently)."""
    result = dict(pairs)
    if len(result) != len(pairs):
        seen = set()
        twice = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise ValueError(f"the key {twice!r} appears twice")
    return result


def parse_json(text: str | bytes, what: str) -> Any:
    """Parse JSON text; InputError for invalid JSON, NaN/Infinity, a key twice in one object, nesting
    too deep to parse, integers too long to convert, or bytes that are not UTF-8."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"{what}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        return json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as exc:
        raise InputError(f"{what}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    except RecursionError:
        raise InputError(f"{what}: JSON nested too deeply to read") from None
    except ValueError as exc:    # NaN/Infinity, an integer of thousands of digits
        raise InputError(f"{what}: cannot be read as JSON ({str(exc)[:200]})") from None


def read_json_file(path: str | os.PathLike, what: str, max_bytes: int = 1 << 20) -> Any:
    return parse_json(read_input_file(path, what, max_bytes), f"{what} ({path})")


# ----------------------------------------------------------------------------------------- outputs
def temporary_beside(path: Path) -> Path:
    """A fresh hidden name in the target's folder, with the target's suffix (exporters look at it)."""
    return path.with_name(f".{path.stem}.{os.getpid()}.{secrets.token_hex(4)}.tmp{path.suffix}")


def _shown(path: Path) -> Path:
    """The path a user knows: an output being staged is shown where it is going."""
    if path.parent.name.startswith(STAGING_PREFIX):
        return path.parent.parent / path.name
    return path


def _output_error(path: Path, exc: OSError) -> OutputError:
    path = _shown(Path(path))
    reason = exc.strerror or str(exc)
    if exc.errno == errno.ENOSPC:
        reason = "no space left on the device"
    elif exc.errno == errno.EROFS:
        reason = "the file system is read-only"
    elif exc.errno == errno.ENAMETOOLONG:
        reason = "the name is too long for the file system"
    return OutputError(f"cannot write {path}: {reason}")


def write_through_temporary(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Let `write(tmp)` write a temporary file beside `path`, then rename it over `path`. OutputError
    when that fails (or writes nothing), with the target as it was and no temporary file left."""
    path = Path(path)
    tmp = temporary_beside(path)
    try:
        write(tmp)
        if not tmp.is_file():
            raise OutputError(f"cannot write {path}: nothing was written")
        os.replace(tmp, path)
    except OSError as exc:
        remove_quietly(tmp)
        raise _output_error(path, exc) from None
    except BaseException:
        remove_quietly(tmp)
        raise
    return path


def atomic_write(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` through a temporary file beside it (see write_through_temporary)."""
    def write(tmp: Path) -> None:
        with open(tmp, "xb") as handle:
            handle.write(data)

    return write_through_temporary(path, write)


def remove_quietly(path: str | os.PathLike) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def probe_writable(folder: Path) -> None:
    """OutputError unless a small file can be written (and removed) in `folder`."""
    probe = folder / f".sds-head-probe-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        with open(probe, "xb") as handle:
            handle.write(b"\0" * PROBE_BYTES)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        raise _output_error(folder, exc) from None
    finally:
        remove_quietly(probe)


def check_output_file(path: str | os.PathLike, what: str, overwrite: bool) -> Path:
    """The absolute path of one output file that can be written: OutputError unless it is a new
    name (or, with `overwrite`, a plain file) in an existing folder where a file can be written."""
    path = Path(path).expanduser().absolute()
    try:
        if os.path.lexists(path):
            mode = os.lstat(path).st_mode
            if not stat.S_ISREG(mode):
                raise OutputError(f"{what}: {path} is a {_kind_or_folder(mode)}, not a file")
            if not overwrite:
                raise OutputError(f"{what}: {path} exists; pass --overwrite to replace it")
        if not path.parent.is_dir():
            raise OutputError(f"{what}: the folder {path.parent} does not exist")
        if len(os.fsencode(path.name)) > os.pathconf(path.parent, "PC_NAME_MAX"):
            raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG))
    except OSError as exc:
        raise _output_error(path, exc) from None
    probe_writable(path.parent)
    return path


class OutputSet:
    """One run's output files, staged and moved into `folder` together.

    `names` are the file names a run of this kind may write (every one of them, also those this
    run will not write): a folder that holds any of them holds another run's outputs, and is
    refused unless `replace` is true (--overwrite, or --resume continuing that run). Then, at
    commit, those of them this run did not write are removed, so old and new never mix.

    `prepare()` runs before any heavy work: it creates the folder, refuses a mix, refuses an output
    name taken by a folder or another special file (never a file of ours: it is not replaced or
    deleted), takes the folder's lock (a second run into the same folder is refused while this one
    runs), and probes that a small file can be written there. `path(name)` is where to write an
    output; `commit()` swaps everything written into place: the files it replaces are first moved
    aside and come back if any move fails, so the folder holds the old set or the new one.
    `discard()` (also on any exception inside `with`) removes what was staged, and the folder
    itself when this set created it (and it is empty). `direct_path(name)` is for the one output
    that must outlive a crash of the run itself (a checkpoint, written atomically): it lies in the
    folder at once and counts as written.
    """

    def __init__(self, folder: str | os.PathLike, names: Iterable[str], replace: bool = False,
                 what: str = "--out", hint: str = "pass --overwrite to replace them"):
        self.folder = Path(folder).expanduser().absolute()
        self.names = tuple(names)
        self.replace = replace
        self.what = what
        self.hint = hint
        self.staging: Path | None = None
        self.direct: set[str] = set()
        self._created: list[Path] = []
        self._lock: int | None = None

    def existing_outputs(self) -> list[str]:
        try:
            return [name for name in self.names if os.path.lexists(self.folder / name)]
        except OSError:          # a name too long for this file system: prepare() says so
            return []

    def prepare(self) -> "OutputSet":
        try:
            self._prepare()
        except OSError as exc:
            self.discard()
            raise _output_error(self.folder, exc) from None
        except BaseException:
            self.discard()
            raise
        return self

    def _prepare(self) -> None:
        if os.path.lexists(self.folder) and not self.folder.is_dir():
            raise OutputError(f"{self.what}: {self.folder} exists and is not a folder")
        found = self.existing_outputs() if self.folder.is_dir() else []
        if found and not self.replace:
            raise OutputError(f"{self.what}: {self.folder} already holds the outputs of another "
                              f"run ({', '.join(found)}); {self.hint}, or choose another folder")
        for name in found:
            info = os.lstat(self.folder / name)
            if not (stat.S_ISREG(info.st_mode) or stat.S_ISLNK(info.st_mode)):
                raise OutputError(f"{self.what}: {self.folder / name} is a {_kind_or_folder(info.st_mode)}, not an "
                                  "earlier output; move it out of the way")
        missing = []
        for parent in [self.folder, *self.folder.parents]:
            if parent.exists():
                break
            missing.append(parent)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._created = missing
        self._take_lock()
        self.staging = self.folder / f"{STAGING_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        self.staging.mkdir()
        probe_writable(self.staging)

    def _take_lock(self) -> None:
        """An exclusive lock on the folder itself (no lock file to leave behind); POSIX only."""
        try:
            import fcntl
        except ImportError:
            return
        self._lock = os.open(self.folder, os.O_RDONLY)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock)
            self._lock = None
            raise OutputError(f"{self.what}: another run is writing into {self.folder} right now; wait for it "
                              "or choose another folder") from None

    def path(self, name: str) -> Path:
        assert self.staging is not None, "prepare() first"
        assert name in self.names, name
        return self.staging / name

    def direct_path(self, name: str) -> Path:
        assert name in self.names, name
        self.direct.add(name)
        return self.folder / name

    def written(self) -> list[str]:
        if self.staging is None:
            return []
        return sorted(entry.name for entry in self.staging.iterdir() if entry.name in self.names)

    def commit(self) -> dict[str, str]:
        """Swap the staged files into the folder; -> name -> final path of each."""
        assert self.staging is not None, "prepare() first"
        names = self.written()
        leaving = [name for name in self.names if name not in self.direct and (name in names or self.replace)
                   and os.path.lexists(self.folder / name)]
        aside = self.staging / ".previous"
        moved_aside, moved_in = [], []
        current = ""
        try:
            aside.mkdir()
            for current in leaving:                  # the old set out of the way, in one folder
                os.replace(self.folder / current, aside / current)
                moved_aside.append(current)
            for current in names:                    # then the new set in
                os.replace(self.staging / current, self.folder / current)
                moved_in.append(current)
        except OSError as exc:
            error = _output_error(self.folder / current, exc)
            for name in moved_in:                    # put the folder back as it was
                with contextlib.suppress(OSError):
                    os.replace(self.folder / name, self.staging / name)
            stranded = []
            for name in moved_aside:
                try:
                    os.replace(aside / name, self.folder / name)
                except OSError:
                    stranded.append(name)
            if stranded:                             # never delete the earlier outputs: leave them
                self.staging = None
                error = OutputError(f"{error}; the earlier {', '.join(stranded)} could not be moved back and "
                                    f"{'is' if len(stranded) == 1 else 'are'} kept in {aside}")
            raise error from None
        finally:
            self._remove_staging()
            self._release_lock()
        self._created = []
        kept = [name for name in self.direct if os.path.lexists(self.folder / name)]
        return {name: str(self.folder / name) for name in sorted({*names, *kept})}

    def discard(self) -> None:
        self._remove_staging()
        self._release_lock()
        for folder in self._created:      # innermost first: only folders this set made, if empty
            try:
                folder.rmdir()
            except OSError:
                break
        self._created = []

    def _remove_staging(self) -> None:
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = None

    def _release_lock(self) -> None:
        if self._lock is not None:
            os.close(self._lock)        # closing the descriptor releases the lock
            self._lock = None

    def __enter__(self) -> "OutputSet":
        return self.prepare() if self.staging is None else self

    def __exit__(self, kind, value, trace) -> bool:
        if kind is not None:
            self.discard()
        return False


def _kind_or_folder(mode: int) -> str:
    return "folder" if stat.S_ISDIR(mode) else _kind(mode)
