"""Checkpoints that a crash cannot corrupt: each is written under a temporary name and renamed into place when
complete, and older ones are deleted only after a newer one is in place."""

from __future__ import annotations

import os
import re
import shutil

_NAME = re.compile(r"^step-(\d+)$")


def checkpoint_dir(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def latest_checkpoint(output_dir: str) -> str | None:
    """The newest complete checkpoint (temporary folders of an interrupted save are ignored)."""
    root = checkpoint_dir(output_dir)
    if not os.path.isdir(root):
        return None
    steps = sorted((int(m.group(1)), name) for name in os.listdir(root) if (m := _NAME.match(name)))
    return os.path.join(root, steps[-1][1]) if steps else None


def temporary_path(final: str) -> str:
    head, tail = os.path.split(final.rstrip(os.sep))
    return os.path.join(head, f".tmp-{tail}")


def publish(tmp: str, final: str) -> None:
    """Moves a finished folder into place, replacing an older folder of the same name."""
    if os.path.exists(final):
        old = os.path.join(os.path.dirname(final), f".old-{os.path.basename(final)}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def prune(output_dir: str, keep: int) -> None:
    root = checkpoint_dir(output_dir)
    steps = sorted((int(m.group(1)), name) for name in os.listdir(root) if (m := _NAME.match(name)))
    for _, name in steps[:-keep]:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)
