"""The engine directory's manifest (``toolkit.json``): what was built, from what, and whether it validated.

An engine directory is only usable when its manifest parses, names a known format version, and
every artifact file it lists is present with the recorded size and SHA-256. Export writes into a
temporary sibling directory and renames it into place (``publish``), so a killed export never
leaves a directory that passes ``load_manifest``.

Export writes the manifest once, after validation, with every file hashed once
(``describe_files``); runtime and ``toolkit validate`` read it with ``load_manifest``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from toolkit.artifact.layout import MANIFEST_NAME

FORMAT_VERSION = 1


class EngineDirError(RuntimeError):
    """An engine directory is missing, partial or corrupted."""


@dataclass
class Manifest:
    """Contents of ``toolkit.json``.

    recipe: recipe name; source: ``{"path", "sha256"}`` of the Hugging Face checkpoint;
    architecture: transformers model_type; target: ``onnx`` or ``trtllm``; precision:
    ``fp32``/``fp16``/``int8``; context_length: max prompt+output tokens; kv_layout: layers,
    KV heads, head size and dtype of the cache; files: artifact path -> {"size", "sha256"};
    tokenizer_files: copied tokenizer files; tools: package -> version; build_key: hash of every
    input that determines the artifact (reuse test); validation: last ``toolkit validate`` result;
    adapters: LoRA adapters added by ``toolkit export-lora`` (name -> directory, rank, modules, weights
    SHA-256, validation; see ``toolkit.artifact.lora``).
    """

    recipe: str
    source: dict[str, str]
    architecture: str
    target: str
    precision: str
    context_length: int
    kv_layout: dict[str, Any]
    build_key: str
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    tokenizer_files: list[str] = field(default_factory=list)
    tools: dict[str, str] = field(default_factory=dict)
    export_options: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, Any] | None = None
    adapters: dict[str, dict[str, Any]] = field(default_factory=dict)
    export_seconds: float = 0.0
    created_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """SHA-256 hex digest of one file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def describe_files(root: Path, exclude: tuple[str, ...] = (MANIFEST_NAME,)) -> dict[str, dict[str, Any]]:
    """Size and SHA-256 of every file under ``root`` (relative POSIX paths), except ``exclude``."""
    described = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel not in exclude:
            described[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    return described


def write_manifest(engine_dir: Path, manifest: Manifest) -> None:
    """Write ``manifest`` as ``toolkit.json`` atomically (its ``files`` as given: see ``describe_files``)."""
    tmp = engine_dir / (MANIFEST_NAME + ".tmp")
    tmp.write_text(manifest.to_json())
    os.replace(tmp, engine_dir / MANIFEST_NAME)


def load_manifest(engine_dir: str | Path, verify_hashes: bool = True) -> Manifest:
    """Read and check an engine directory's manifest; raise ``EngineDirError`` saying what is wrong."""
    engine_dir = Path(engine_dir)
    path = engine_dir / MANIFEST_NAME
    if not engine_dir.is_dir():
        raise EngineDirError(f"{engine_dir} is not a directory; create it with `toolkit export`")
    if not path.is_file():
        raise EngineDirError(
            f"{engine_dir} has no {MANIFEST_NAME}: it is not an engine directory or its export did not finish; "
            "re-run `toolkit export --force`"
        )
    try:
        data = json.loads(path.read_text())
        manifest = Manifest(**data)
    except (ValueError, TypeError) as exc:
        raise EngineDirError(f"{path} is corrupted ({exc}); re-run `toolkit export --force`") from None
    if manifest.format_version != FORMAT_VERSION:
        raise EngineDirError(
            f"{path} has format version {manifest.format_version}, this toolkit reads {FORMAT_VERSION}; re-export"
        )
    _check_files(engine_dir, manifest, verify_hashes)
    return manifest


def _check_files(engine_dir: Path, manifest: Manifest, verify_hashes: bool) -> None:
    if not manifest.files:
        raise EngineDirError(f"{engine_dir}/{MANIFEST_NAME} lists no artifact files; re-run `toolkit export --force`")
    for rel, info in manifest.files.items():
        file = engine_dir / rel
        if not file.is_file():
            raise EngineDirError(f"{engine_dir} is partial: {rel} is missing; re-run `toolkit export --force`")
        if file.stat().st_size != info["size"]:
            raise EngineDirError(
                f"{engine_dir} is corrupted: {rel} is {file.stat().st_size} bytes, the manifest says {info['size']}; "
                "re-run `toolkit export --force`"
            )
        if verify_hashes and sha256_file(file) != info["sha256"]:
            raise EngineDirError(
                f"{engine_dir} is corrupted: {rel} does not match its recorded SHA-256; re-run `toolkit export --force`"
            )


def update_validation(engine_dir: Path, validation: dict[str, Any]) -> None:
    """Store a validation result in an existing, already verified manifest."""
    manifest = load_manifest(engine_dir, verify_hashes=False)
    manifest.validation = validation
    write_manifest(engine_dir, manifest)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_leftovers(out_dir: Path) -> None:
    """Remove staging directories of dead export processes; restore an export lost mid-``publish``."""
    for path in out_dir.parent.glob(f".{out_dir.name}.partial-*"):
        pid = path.name.rsplit(".partial-", 1)[1].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
    for path in sorted(out_dir.parent.glob(f".{out_dir.name}.old-*")):
        if not out_dir.exists():
            os.replace(path, out_dir)  # killed between publish()'s two renames: put the old export back
        else:
            shutil.rmtree(path, ignore_errors=True)


def staging_dir(out_dir: Path) -> Path:
    """A fresh temporary directory beside ``out_dir`` (same filesystem, so the final rename is atomic)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(out_dir)
    stage = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}-{time.time_ns()}"
    stage.mkdir()
    return stage


def publish(stage: Path, out_dir: Path) -> None:
    """Move a finished staging directory to ``out_dir``, replacing an older one."""
    if out_dir.exists():
        trash = out_dir.parent / f".{out_dir.name}.old-{time.time_ns()}"
        os.replace(out_dir, trash)
        os.replace(stage, out_dir)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(stage, out_dir)
