"""Checkpoints that a killed run resumes from exactly.

`<output>/ckpt/step_{step:06d}/` holds the student, the teacher (when it is not the live student),
the optimizer, the RNG states, the data position (the step: data order is a pure function of seed and
step) and `config.json`. A checkpoint is written into a temporary directory and renamed, so a resume
always finds a whole step; older checkpoints are removed only after the new one is in place.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile

import torch

_STEP_DIR = re.compile(r"^step_(\d{6,})$")


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(output: str, step: int, *, student, teacher, optimizer, config: dict, extra: dict | None = None,
                    keep_last: int = 1) -> str:
    """Write step `step` atomically; returns its directory."""
    root = os.path.join(output, "ckpt")
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step_{step:06d}")
    tmp = tempfile.mkdtemp(dir=root, prefix=".tmp-")
    try:
        torch.save(student.state_dict(), os.path.join(tmp, "student.pt"))
        if teacher is not None:
            torch.save(teacher.state_dict(), os.path.join(tmp, "teacher.pt"))
        torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
        torch.save({"step": step, "rng": _rng_state(), "extra": extra or {}}, os.path.join(tmp, "state.pt"))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=1)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    for old in list_checkpoints(output)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(output: str) -> list[str]:
    root = os.path.join(output, "ckpt")
    if not os.path.isdir(root):
        return []
    steps = sorted((int(m.group(1)), name) for name in os.listdir(root) if (m := _STEP_DIR.match(name)))
    return [os.path.join(root, name) for _, name in steps]


def latest_checkpoint(output: str) -> str | None:
    found = list_checkpoints(output)
    return found[-1] if found else None


def load_checkpoint(path: str, *, student, teacher, optimizer, device) -> dict:
    """Restore weights, optimizer and RNG in place; returns {"step", "config", "extra"}."""
    student.load_state_dict(torch.load(os.path.join(path, "student.pt"), map_location=device))
    teacher_file = os.path.join(path, "teacher.pt")
    if teacher is not None:
        if not os.path.exists(teacher_file):
            raise ValueError(f"checkpoint {path} has no teacher.pt but this run keeps a separate teacher")
        teacher.load_state_dict(torch.load(teacher_file, map_location=device))
    optimizer.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"), map_location=device))
    state = torch.load(os.path.join(path, "state.pt"), weights_only=False)
    _set_rng_state(state["rng"])
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    return {"step": state["step"], "config": config, "extra": state.get("extra", {})}
