"""A checkpoint's manifest: the size and checksums of every file, checked before loading.

``manifest.json`` is written into a checkpoint's temporary directory after every other file,
so it is part of the atomic rename that publishes the checkpoint::

    {"format": "megatron_rpt.manifest", "algorithm": "crc32", "block_bytes": 67108864,
     "files": {"model/__0_0.distcp": {"size": 229843, "blocks": ["1c291ca3"]}, ...}}

Each file is checksummed in blocks of ``block_bytes`` so that verification runs as many
blocks in parallel as there are threads, whatever the number of files (zlib releases the GIL
while it checksums). CRC-32 detects corrupted or truncated files (a flipped byte, a copy cut
short, a disk error); it is not a signature: a file crafted on purpose can carry a matching
manifest, which is why pickled files are read with restricted loaders (model/safe_load.py).

A mismatch raises ``CheckpointError`` naming the file (and the byte range). A checkpoint
without a manifest (written before manifests existed, or a Megatron-LM directory) is loaded
with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from megatron_rpt.errors import CheckpointError
from megatron_rpt.fileio import atomic_write_json

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
FORMAT = "megatron_rpt.manifest"
BLOCK_BYTES = 64 << 20
_READ_BYTES = 8 << 20


def _threads() -> int:
    return max(1, min(16, os.cpu_count() or 1))


def _block_crc(path: Path, start: int, length: int) -> str:
    crc, left = 0, length
    with open(path, "rb", buffering=0) as fh:
        fh.seek(start)
        while left > 0:
            data = fh.read(min(_READ_BYTES, left))
            if not data:
                break
            crc = zlib.crc32(data, crc)
            left -= len(data)
    return f"{crc & 0xFFFFFFFF:08x}"


def _blocks(size: int, block: int) -> list[tuple[int, int]]:
    """(start, length) of each block of a file; an empty file has one empty block.

    >>> _blocks(10, 4), _blocks(0, 4)
    ([(0, 4), (4, 4), (8, 2)], [(0, 0)])
    """
    return [(s, min(block, size - s)) for s in range(0, size, block)] or [(0, 0)]


def _checksums(root: Path, sizes: dict[str, int], block: int) -> dict[str, list[str]]:
    """Per file, the CRC-32 of each block, computed on a thread pool."""
    jobs = [(rel, s, n) for rel, size in sizes.items() for s, n in _blocks(size, block)]
    with ThreadPoolExecutor(_threads()) as pool:
        crcs = list(pool.map(lambda j: _block_crc(root / j[0], j[1], j[2]), jobs))
    out: dict[str, list[str]] = {rel: [] for rel in sizes}
    for (rel, _, _), crc in zip(jobs, crcs, strict=True):
        out[rel].append(crc)
    return out


def _files(root: Path) -> dict[str, int]:
    """Relative path -> size of every regular file under ``root`` but the manifest."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if rel != MANIFEST_FILE and path.is_file() and not path.is_symlink():
                out[rel] = path.stat().st_size
    return dict(sorted(out.items()))


def write_manifest(root: str | Path, *, block_bytes: int = BLOCK_BYTES) -> Path:
    """Checksum every file under ``root`` into ``root/manifest.json``."""
    root = Path(root)
    sizes = _files(root)
    crcs = _checksums(root, sizes, block_bytes)
    files = {rel: {"size": size, "blocks": crcs[rel]} for rel, size in sizes.items()}
    manifest = {"format": FORMAT, "algorithm": "crc32", "block_bytes": block_bytes, "files": files}
    atomic_write_json(root / MANIFEST_FILE, manifest)
    return root / MANIFEST_FILE


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_bytes())
        ok = manifest.get("format") == FORMAT and manifest.get("algorithm") == "crc32"
        block = int(manifest["block_bytes"])
        files = manifest["files"]
        ok = ok and block > 0 and isinstance(files, dict)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{path}: cannot read the checkpoint manifest ({exc})") from None
    if not ok:
        raise CheckpointError(f"{path}: not a megatron_rpt manifest (crc32 blocks expected)")
    return manifest


def verify_manifest(root: str | Path) -> bool:
    """Check every file listed in ``root/manifest.json``; False when there is no manifest.

    Raises CheckpointError naming the first file that is missing, has another size, or whose
    content differs (with the byte range).
    """
    root = Path(root)
    path = root / MANIFEST_FILE
    if not path.is_file():
        return False
    start = time.perf_counter()
    manifest = _read_manifest(path)
    block, listed = int(manifest["block_bytes"]), manifest["files"]
    sizes = {}
    for rel, entry in listed.items():
        target = (root / rel).resolve()
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            raise CheckpointError(f"{path}: lists {rel!r}, outside the checkpoint")
        if not target.is_file():
            raise CheckpointError(f"{root / rel}: missing (listed in {MANIFEST_FILE})")
        size = target.stat().st_size
        if size != entry.get("size"):
            raise CheckpointError(
                f"{root / rel}: {size} bytes, the manifest says {entry.get('size')} "
                "(truncated or replaced file)"
            )
        sizes[rel] = size
    found = _checksums(root, sizes, block)
    for rel, crcs in found.items():
        if crcs != listed[rel].get("blocks"):
            bad = next(
                (
                    i
                    for i, (a, b) in enumerate(zip(crcs, listed[rel]["blocks"], strict=False))
                    if a != b
                ),
                0,
            )
            raise CheckpointError(
                f"{root / rel}: checksum mismatch in bytes {bad * block}-"
                f"{min(sizes[rel], (bad + 1) * block)} (the file is corrupted)"
            )
    total = sum(sizes.values())
    logger.info(
        "verified %s: %d files, %.1f MiB in %.2f s",
        root, len(sizes), total / 2**20, time.perf_counter() - start,
    )  # fmt: skip
    return True


def verify_checkpoint(root: str | Path) -> None:
    """``verify_manifest`` on rank 0, its verdict shared with every rank (collective if dist).

    A checkpoint without a manifest is loaded with a warning.
    """
    import torch.distributed as dist

    collective = dist.is_initialized() and dist.get_world_size() > 1
    verdict: list[Any] = [None]
    if not collective or dist.get_rank() == 0:
        try:
            verdict[0] = "ok" if verify_manifest(root) else "none"
        except CheckpointError as exc:
            verdict[0] = ("error", str(exc))
    if collective:
        dist.broadcast_object_list(verdict, src=0)
    if isinstance(verdict[0], tuple):
        raise CheckpointError(verdict[0][1])
    if verdict[0] == "none" and (not collective or dist.get_rank() == 0):
        logger.warning("%s: no %s, so its files cannot be verified", root, MANIFEST_FILE)


__all__ = ["MANIFEST_FILE", "verify_checkpoint", "verify_manifest", "write_manifest"]
