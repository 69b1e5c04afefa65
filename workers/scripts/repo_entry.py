"""Helpers shared by the scripts that write model-repository entries.

A model-repository entry is a directory `<repo>/<name>/<version>/` holding
`model.onnx`, `model.toml`, optionally `tokenizer.json`, and `SHA256SUMS`
(lines `<sha256hex>  <file>`, one per file of the directory). Every file is
written atomically, and `SHA256SUMS` is written last: the worker only serves a
version whose `SHA256SUMS` exists and matches, so a half-written version is
never picked up.

The scripts are run as `python workers/scripts/X.py`, which puts this
directory on `sys.path`; they import this module as `repo_entry`.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

SUMS_FILE = "SHA256SUMS"


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temp file in the same directory, fsync, rename.

    Readers see either the old file or the complete new one, never a prefix.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            # mkstemp makes 0600 files; model files are read by workers that
            # may run as another user.
            os.fchmod(f.fileno(), 0o644)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # Don't leave a stray `.<name>.XXXX` temp file behind on failure.
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def finish_entry(dest_dir: Path, files: list[str]) -> None:
    """Write `dest_dir/SHA256SUMS` listing `files` (sorted); call it last.

    `files` are names relative to `dest_dir` and must all exist already.
    """
    dest_dir = Path(dest_dir)
    sums = "".join(f"{sha256(dest_dir / n)}  {n}\n" for n in sorted(files))
    write_atomic(dest_dir / SUMS_FILE, sums.encode())


def toml_string(s: str) -> str:
    """`s` as a TOML basic string (quotes, backslashes and control characters escaped)."""
    out = []
    for ch in s:
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def tensor_model_toml(
    script: str, name: str, version: str, description: str, outputs: list[str] | None, concat_batch: bool = False
) -> str:
    """`model.toml` for a `task = "tensor"` entry (tensors in, named graph outputs back).

    The `[tensor]` section is omitted when `outputs` is None and `concat_batch` is off.
    """
    text = (
        f"# Model-repository entry written by workers/scripts/{script}.\n"
        f"name = {toml_string(name)}\n"
        f"version = {toml_string(version)}\n"
        'task = "tensor"\n'
        f"description = {toml_string(description)}\n"
    )
    if outputs is not None or concat_batch:
        text += "\n[tensor]\n"
    if outputs is not None:
        text += (
            "# Graph outputs returned to clients (non-tensor outputs such as ZipMap sequences cannot be returned).\n"
            f"outputs = [{', '.join(toml_string(o) for o in outputs)}]\n"
        )
    if concat_batch:
        text += (
            "# The first axis is a batch axis whose rows do not interact: the jobs of a batch run in one\n"
            "# forward pass, their inputs concatenated along it.\n"
            "concat_batch = true\n"
        )
    return text


def entry_dir(repo: Path, name: str, version: str) -> Path:
    """`<repo>/<name>/<version>`, refusing names that are not one plain path component."""
    for what, part in (("name", name), ("version", version)):
        if not part or part in (".", "..") or "/" in part or "\\" in part or part.startswith("."):
            raise SystemExit(f"--{what} {part!r}: must be a single directory name (no '/', not starting with '.')")
    return Path(repo) / name / version
