"""Where trained checkpoints live and under which model name (writing them atomically: common/files.py)."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

from contract import MODEL_NAME

REPO_ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT_FILE = "checkpoint.pt"


def artifacts_root() -> Path:
    return Path(os.environ.get("SUITE_ARTIFACTS", REPO_ROOT / "artifacts"))


def family_dir(family: str) -> Path:
    return artifacts_root() / family


def model_name(family, profile: str, name: str | None = None) -> str:
    """The store name (and artifacts folder) of a family's model trained with ``profile``: benchmark
    models keep their own, and ``--name`` gives any other (an AlexNet beside the default LeNet-5)."""
    if name:
        if not MODEL_NAME.fullmatch(name):
            raise ValueError(f"--name {name!r}: lower-case letters, digits, ., _ and -, at most 63")
        return name
    return family.profiles.get(profile, {}).get("name", family.name)


def fingerprint(*chunks: bytes) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return "sha256:" + digest.hexdigest()[:16]


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return (rev + ("-dirty" if dirty else "")) or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
