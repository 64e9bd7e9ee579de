"""A run's output folder: which run owns it, and its outputs completed as a set.

``DIR/run.json`` holds the run's identity (a random id, also written into each checkpoint) and
the outputs it installed. A run starting where another run's results or checkpoints are is
refused (``overwrite=True`` removes them first, and only them: nothing seft did not write is
deleted). The outputs (``sparse.safetensors``, ``dense/`` or ``peft/``, ``lora_adapter/``,
``summary.json``) are written into an aside folder and moved in together at the end, so a
failed export leaves the folder as it was, and a finished one never mixes two runs' files.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Optional

MARKER = "run.json"
# moved in in this order: summary.json last
OUTPUTS = ("sparse.safetensors", "dense", "peft", "lora_adapter", "summary.json")
FOLDERS = ("dense", "peft", "lora_adapter")  # output folders: every file in them must be one the run recorded
FILES = ("summary.json", "log.jsonl", "sparse.safetensors", MARKER)  # the single files a run writes
ASIDE_PREFIX = ".seft-"  # the aside and replaced folders: DIR/.seft-outputs-<id>, DIR/.seft-replaced-<id>


class RunFolderError(ValueError):
    """The output folder cannot be used as asked."""


def new_run_id() -> str:
    return uuid.uuid4().hex


def check_writable(folder: Path, option: str) -> None:
    """``folder`` is a directory this process can create files in, or can be created as one."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise RunFolderError(f"{option} {folder}: exists and is not a directory")
    probe = folder
    while not probe.exists():
        if probe.is_symlink():
            raise RunFolderError(f"{option} {folder}: {probe} is a broken symbolic link")
        probe = probe.parent
    if not probe.is_dir():
        raise RunFolderError(f"{option} {folder}: {probe} is not a directory")
    try:
        fd, name = tempfile.mkstemp(dir=probe, prefix=".seft-probe-")
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise RunFolderError(f"{option} {folder}: cannot write in {probe} ({e.strerror})") from None


def read_marker(folder: Path) -> Optional[dict]:
    try:
        marker = json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("run_id"), str) else None


def _write_marker(folder: Path, marker: dict) -> None:
    tmp = folder / (MARKER + ".tmp")
    tmp.write_text(json.dumps(marker, indent=1) + "\n")
    os.replace(tmp, folder / MARKER)


def _checkpoint_files(folder: Path, run_id: str) -> list[Path]:
    """DIR/checkpoints/step-* files that are not run ``run_id``'s (leftovers without a JSON included)."""
    from .checkpoint import checkpoint_run_id

    ck = folder / "checkpoints"
    if not ck.is_dir():
        return []
    files = sorted(p for p in ck.iterdir() if p.name.startswith("step-"))
    ours = {p.name.split(".", 1)[0] for p in files if p.suffix == ".json" and checkpoint_run_id(p) == run_id}
    return [p for p in files if p.name.split(".", 1)[0] not in ours]


def previous_files(folder: Path, run_id: str) -> list[Path]:
    """What another run left in ``folder``: its outputs, log, marker, checkpoints, aside folders."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    marker = read_marker(folder)
    if marker is not None and marker["run_id"] == run_id:
        return []
    found = [folder / n for n in FILES + FOLDERS if (folder / n).exists() or (folder / n).is_symlink()]
    found += [p for p in folder.iterdir() if p.name.startswith(ASIDE_PREFIX)]
    return found + _checkpoint_files(folder, run_id)


def _unknown_output_file(folder: Path, marker: Optional[dict]) -> Optional[str]:
    """A file under an output folder (DIR/dense, ...) that the run owning the folder did not write, if any."""
    written = set(marker.get("outputs", [])) if marker else set()
    for name in FOLDERS:
        out = folder / name
        if out.is_symlink() or (out.exists() and not out.is_dir()):
            return f"{name} (not a folder seft wrote)"
        for p in sorted(out.rglob("*")) if out.exists() else []:
            rel = p.relative_to(folder).as_posix()
            if (p.is_file() or p.is_symlink()) and rel not in written:
                return rel
    return None


def claim(folder: Path, run_id: str, command: str, overwrite: bool, option: str = "--out") -> None:
    """Make ``folder`` run ``run_id``'s: refused when another run's results or checkpoints are
    there (``overwrite``: they are removed first), or when DIR/dense holds files seft did not write."""
    folder = Path(folder)
    check_writable(folder, option)
    marker = read_marker(folder)
    unknown = _unknown_output_file(folder, marker)
    if unknown is not None:
        raise RunFolderError(f"{option} {folder}: {folder / unknown} was not written by seft, and seft writes "
                             f"{folder / unknown.split('/')[0].split(' ')[0]} itself; move it away or give another "
                             f"{option}")
    previous = previous_files(folder, run_id)
    if previous and not overwrite:
        names = ", ".join(p.relative_to(folder).as_posix() for p in previous[:4])
        raise RunFolderError(f"{option} {folder} holds another run's results or checkpoints ({names}"
                             f"{' ...' if len(previous) > 4 else ''}); give another {option}, --resume "
                             f"{folder} to continue that run, or --overwrite to replace it")
    for path in previous:
        _remove(path)
    folder.mkdir(parents=True, exist_ok=True)
    ck = folder / "checkpoints"
    if ck.is_dir() and not any(ck.iterdir()):
        ck.rmdir()
    if marker is None or marker["run_id"] != run_id:
        _write_marker(folder, {"run_id": run_id, "command": command, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                               "outputs": []})


def aside_folder(folder: Path, run_id: str) -> Path:
    """An empty folder inside ``folder`` to write the outputs into before they move in."""
    aside = Path(folder) / f"{ASIDE_PREFIX}outputs-{run_id}"
    _remove(aside)
    aside.mkdir(parents=True)
    return aside


def discard(aside: Path) -> None:
    _remove(aside)


def install(folder: Path, run_id: str, aside: Path) -> None:
    """Move the outputs written in ``aside`` into ``folder`` (replacing this run's earlier ones)
    and record them in the marker."""
    folder = Path(folder)
    marker = read_marker(folder)
    if marker is None or marker["run_id"] != run_id:
        raise RunFolderError(f"{folder} no longer belongs to this run ({folder / MARKER} changed); its outputs "
                             f"are in {aside}")
    unknown = _unknown_output_file(folder, marker)
    if unknown is not None:
        raise RunFolderError(f"{folder / unknown} was not written by seft; the outputs are in {aside}")
    names = [n for n in OUTPUTS if (aside / n).exists()]
    replaced = folder / f"{ASIDE_PREFIX}replaced-{run_id}"
    _remove(replaced)
    replaced.mkdir()
    for n in OUTPUTS:  # this run's earlier outputs go first: the folder never mixes two sets
        if (folder / n).exists():
            os.replace(folder / n, replaced / n)
    for n in names:
        os.replace(aside / n, folder / n)
    written = [p.relative_to(folder).as_posix() for n in names for p in _files_under(folder / n)]
    _write_marker(folder, {**marker, "outputs": written})
    _remove(replaced)
    _remove(aside)


def _files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]


def _remove(path: Path) -> None:
    """Delete a file, a link or a folder tree, if there."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)
