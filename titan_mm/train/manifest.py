"""Checkpoint manifests: what a complete checkpoint holds, with a checksum per file.

A checkpoint is written to ``step-N.partial`` and renamed ``step-N`` once complete, with
``manifest.json`` inside: the step, the job that wrote it (model, data layout, starting point;
train/resume.py checks them) and the size and zlib crc32 of every file. Each rank checksums the
files it wrote, right after writing them and in the thread that writes them (so an async save
computes them off the training step), and leaves them in a small ``__R_crc.json``; rank 0 merges
those into the manifest when the save is done. Loading verifies every file against it.
"""

import errno
import json
import os
import re
import shutil
import zlib

from torch.distributed.checkpoint import FileSystemWriter

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
_CHUNK = 16 * 2**20
_RANK_CHECKSUMS = "crc.json"
"""Suffix of the per-rank checksum files (``__R_crc.json``, after DCP's ``__R_`` file prefix)."""


_STEP_DIR = re.compile(r"^step-(\d+)$")


def step_folder(folder: str, step: int) -> str:
    return os.path.join(folder, f"step-{step}")


def saved_steps(folder: str) -> list[int]:
    """Steps of the committed checkpoints (``step-N`` folders), oldest first."""
    if not os.path.isdir(folder):
        return []
    return sorted(int(m.group(1)) for d in os.listdir(folder) if (m := _STEP_DIR.match(d)))


class DamagedCheckpoint(Exception):
    """A checkpoint folder that does not match its manifest; the message names the file and the problem."""


def file_entry(path: str) -> dict:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return {"size": os.path.getsize(path), "crc32": crc}


class ChecksummingWriter(FileSystemWriter):
    """DCP's file writer, plus the checksums of the files this rank wrote (``__R_crc.json``)."""

    fail_with_enospc = False
    """Drill hook: fail this save as a full disk would (train/checkpoint.py DRILL_ENOSPC_STEP)."""

    def write_data(self, plan, planner):
        if self.fail_with_enospc:
            raise OSError(errno.ENOSPC, "No space left on device (injected by the fault drill)")
        future = super().write_data(plan, planner)
        names = sorted({result.storage_data.relative_path for result in future.value()})
        entries = {name: file_entry(os.path.join(self.path, name)) for name in names}
        sidecar = os.path.join(self.path, f"{plan.storage_data.prefix}{_RANK_CHECKSUMS}")
        write_json(sidecar, entries)
        return future


def write_json(path: str, data: dict):
    """Write ``data`` to ``path`` durably: a temporary file, fsync, rename."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def commit(partial: str, final: str, step: int, job: dict):
    """Rank 0, once every rank's write is done: merge the checksums into manifest.json, then rename
    ``partial`` to ``final`` (replacing an older folder of that name)."""
    files, sidecars = {}, []
    for name in sorted(os.listdir(partial)):
        if name.endswith(_RANK_CHECKSUMS):
            with open(os.path.join(partial, name)) as f:
                files.update(json.load(f))
            sidecars.append(name)
    for name in sorted(os.listdir(partial)):
        if name not in files and name not in sidecars:  # .metadata, written by the coordinator
            files[name] = file_entry(os.path.join(partial, name))
    write_json(os.path.join(partial, MANIFEST), {"format": MANIFEST_FORMAT, "step": step, "job": job,
                                                 "files": files})
    for name in sidecars:
        os.remove(os.path.join(partial, name))
    if os.path.exists(final):
        shutil.rmtree(final)
    os.rename(partial, final)
    fsync_folder(os.path.dirname(final))


def fsync_folder(path: str):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_manifest(folder: str) -> dict:
    path = os.path.join(folder, MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise DamagedCheckpoint(f"{MANIFEST} is missing (not written by a finished titan_mm save)") from None
    except (OSError, ValueError) as e:
        raise DamagedCheckpoint(f"{MANIFEST} cannot be read: {e}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise DamagedCheckpoint(f"{MANIFEST} has no file list")
    return manifest


def verify_files(folder: str, files: dict) -> list[str]:
    """Problems of ``files`` ({name: {size, crc32}}) in ``folder``, one line each ([] = all good)."""
    problems = []
    for name, expected in sorted(files.items()):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            problems.append(f"{name} is missing")
            continue
        size = os.path.getsize(path)
        if size != expected["size"]:
            problems.append(f"{name} has {size} bytes, the manifest says {expected['size']} (truncated or overwritten)")
            continue
        crc = file_entry(path)["crc32"]
        if crc != expected["crc32"]:
            problems.append(f"{name} has crc32 {crc:08x}, the manifest says {expected['crc32']:08x} "
                            f"(its bytes changed after the save)")
    return problems
