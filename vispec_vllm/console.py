"""Readable command output: vLLM's logs off unless --verbose, engine-process noise kept in a log file."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO


def quiet_vllm(verbose: bool) -> None:
    """vLLM's INFO and WARNING lines off (set before vLLM is imported; engine processes inherit it)."""
    if not verbose:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")


@contextlib.contextmanager
def engine_output_to(log_path: Path | None) -> Iterator[TextIO]:
    """Inside: file descriptors 1 and 2 of this process, and so of the engine processes it starts, go to
    `log_path` (appended); yields a stream to the real standard output. `log_path` None: nothing moves."""
    if log_path is None:
        yield sys.stdout
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log, os.fdopen(os.dup(saved[0]), "w", buffering=1) as terminal:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield terminal
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
