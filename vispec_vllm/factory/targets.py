"""`build_tiny_target`: build a tiny random target checkpoint directory, once per (family, seed, factory version).

A build is written into a private sibling directory, finished with a marker file (`MARKER_NAME`, holding the
family, seed, factory version and each file's sha256), then renamed into place; so `out_dir` is either absent,
complete, or left untouched because it holds something else.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from vispec_vllm.factory import llava, qwen2_5_vl

# Bump whenever a change alters the bytes of any built file.
FACTORY_VERSION = 2
MARKER_NAME = "vispec_factory.json"
_PARTIAL_INFIX = ".partial-"

BUILDERS: dict[str, Callable[[Path, int], None]] = {
    "qwen2_5_vl": qwen2_5_vl.build,
    "llava": llava.build_llava,
    "llava_next": llava.build_llava_next,
}
FAMILIES: tuple[str, ...] = tuple(BUILDERS)


def build_tiny_target(family: str, out_dir: str | os.PathLike, *, seed: int = 0) -> Path:
    """Build (or find already built) the tiny `family` target in `out_dir`; returns `out_dir` as a Path."""
    if family not in BUILDERS:
        raise ValueError(f"unknown target family {family!r}; valid families: {', '.join(FAMILIES)}")
    out_dir = Path(out_dir).resolve()
    wanted = {"family": family, "seed": seed, "factory_version": FACTORY_VERSION}
    if _is_build_of(out_dir, wanted):
        return out_dir
    if out_dir.exists() and any(out_dir.iterdir()) and read_marker(out_dir) is None:
        raise FileExistsError(f"{out_dir} is not empty and holds no tiny-target build; refusing to replace it")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_partials(out_dir)
    partial = out_dir.with_name(f".{out_dir.name}{_PARTIAL_INFIX}{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        BUILDERS[family](partial, seed)
        _write_marker(partial, wanted)
        if _is_build_of(out_dir, wanted):  # another process finished the same build meanwhile
            return out_dir
        if out_dir.exists():  # empty, or an older build (other seed, family or factory version)
            shutil.rmtree(out_dir)
        try:
            partial.rename(out_dir)
        except OSError:
            if not _is_build_of(out_dir, wanted):  # another process won the race with the same build: fine
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out_dir


def read_marker(target_dir: str | os.PathLike) -> dict | None:
    """The factory marker of a built target directory, or None (not a factory build, or not finished)."""
    path = Path(target_dir) / MARKER_NAME
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def file_digests(target_dir: str | os.PathLike) -> dict[str, str]:
    """sha256 of every file in `target_dir` except the marker, keyed by file name."""
    root = Path(target_dir)
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.iterdir())
        if path.is_file() and path.name != MARKER_NAME
    }


def _is_build_of(out_dir: Path, wanted: dict) -> bool:
    marker = read_marker(out_dir)
    return marker is not None and all(marker.get(key) == value for key, value in wanted.items())


def _write_marker(build_dir: Path, identity: dict) -> None:
    marker = {**identity, "files": file_digests(build_dir)}
    (build_dir / MARKER_NAME).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _remove_dead_partials(out_dir: Path) -> None:
    """Delete partial builds of `out_dir` left by killed processes."""
    for partial in out_dir.parent.glob(f".{out_dir.name}{_PARTIAL_INFIX}*"):
        pid = partial.name.rsplit(_PARTIAL_INFIX, 1)[1]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(partial, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True
