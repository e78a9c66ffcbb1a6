"""``toolkit export`` killed with SIGKILL at random points never leaves a partial engine directory.

A real ``toolkit export`` subprocess of a tiny checkpoint is timed once (that complete export is
also the "earlier" engine directory), then killed at seeded random points: one while it imports
and hashes (before its staging directory appears), the rest spread over the build (after the
staging directory appears, one random point in each quarter of the measured build time). After
every kill the output path is either absent or a complete directory that ``load_manifest``
accepts (hash-verified); re-exports with ``--force`` over the earlier export always leave a
loadable directory (staging + rename). A final export that is not killed succeeds and loads.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from toolkit.artifact.manifest import EngineDirError, load_manifest
from toolkit.recipes import get_recipe

RECIPE = "qwen2-7b-instruct"
SEED = 20240605
KILLS = 5
POLL_S = 0.01


def _export_cmd(checkpoint: Path, out: Path, force: bool) -> list[str]:
    cmd = [sys.executable, "-c", "from toolkit.cli import main; main()", "export", str(checkpoint),
           "--recipe", RECIPE, "--precision", "int8", "--out", str(out)]
    return cmd + (["--force"] if force else [])


def _staged(out: Path) -> bool:
    return out.parent.is_dir() and any(p.name.startswith(f".{out.name}.partial-") for p in out.parent.iterdir())


def _start(cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _timed_export(cmd: list[str], out: Path, env: dict[str, str]) -> tuple[float, float]:
    """Run to completion; (seconds until the staging directory appeared, total seconds)."""
    started, staged_at = time.monotonic(), None
    proc = _start(cmd, env)
    while proc.poll() is None:
        if staged_at is None and _staged(out):
            staged_at = time.monotonic() - started
        time.sleep(POLL_S)
    total = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr.read().decode()[-3000:]
    assert staged_at is not None, "the export never created a staging directory beside --out"
    return staged_at, total


def _killed_export(cmd: list[str], out: Path, env: dict[str, str], after_stage: bool, delay: float) -> str:
    """Start an export and SIGKILL it ``delay`` s after start (or after staging began); what happened."""
    proc = _start(cmd, env)
    started = time.monotonic()
    while after_stage and proc.poll() is None and not _staged(out):
        time.sleep(POLL_S)
    deadline = time.monotonic() + delay
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(POLL_S)
    if proc.poll() is not None:
        return f"finished before the kill (rc {proc.returncode})"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return f"killed {time.monotonic() - started:.2f} s after start"


def _assert_absent_or_complete(out: Path, what: str) -> str:
    if not out.exists():
        return "absent"
    try:
        manifest = load_manifest(out)
    except EngineDirError as exc:
        pytest.fail(f"{what}: {out} exists but does not load: {exc}")
    assert manifest.validation and manifest.validation["passed"], what
    return manifest.created_at


def test_sigkill_never_leaves_a_partial_engine_dir(tmp_path, tiny_checkpoint):
    checkpoint = tiny_checkpoint(get_recipe(RECIPE))
    env = {**os.environ, "TOOLKIT_CACHE": str(tmp_path / "cache")}
    existing, fresh = tmp_path / "engines" / "existing", tmp_path / "engines" / "fresh"

    staged_at, total = _timed_export(_export_cmd(checkpoint, existing, force=False), existing, env)
    before = load_manifest(existing)
    build = max(total - staged_at, 0.5)
    rng = random.Random(SEED)
    plan = [(False, rng.uniform(0.2, staged_at))]
    plan += [(True, build * (k + rng.random()) / (KILLS - 1)) for k in range(KILLS - 1)]

    for i, (after_stage, delay) in enumerate(plan):
        # Alternate: re-export over the complete earlier export (--force), and export into a fresh path.
        target, force = (existing, True) if i % 2 == 0 else (fresh, False)
        what = _killed_export(_export_cmd(checkpoint, target, force), target, env, after_stage, delay)
        what = f"kill {i} ({'after staging' if after_stage else 'from start'} +{delay:.2f} s, {target.name}): {what}"
        state = _assert_absent_or_complete(target, what)
        if target is existing:
            assert state != "absent", f"{what}: the earlier complete export disappeared"
            assert load_manifest(existing).build_key == before.build_key, what
        leftovers = [p.name for p in target.parent.iterdir() if p not in (existing, fresh)]
        assert all(name.startswith(".") for name in leftovers), f"{what}: visible leftovers {leftovers}"

    proc = subprocess.run(_export_cmd(checkpoint, fresh, force=True), check=False, env=env,
                          capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    manifest = load_manifest(fresh)
    assert manifest.validation["passed"] and manifest.build_key == before.build_key
    assert load_manifest(existing).build_key == before.build_key
