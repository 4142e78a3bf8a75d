"""Writing a planned conversion: shards into a temporary folder next to DST, verified, then renamed into place.

The temporary folder (`.DST.partial-PID-*`) is removed on any failure, Ctrl-C or SIGTERM; even a SIGKILL leaves at
most that hidden folder, never a DST that looks complete, and the next conversion to DST removes it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import save_file

from . import interrupts, quant
from .convert import Plan
from .convert_keys import Entry
from .convert_verify import Verification, verify
from .errors import LlavaError
from .ui import human_bytes
from .weights import INDEX

try:
    import fcntl
except ImportError:  # Windows: no flock, so killed conversions' folders are left for the user
    fcntl = None


@dataclass
class Result:
    location: Path  # DST, or DST.unverified when verification failed
    files: dict[str, int]  # file name -> bytes
    shards: int
    verification: Verification | None

    @property
    def ok(self) -> bool:
        return self.verification is None or self.verification.ok


def _natural(name: str) -> list:
    """layers.2 before layers.10, so a shard holds whole layers in order."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def shard(plan: Plan, max_bytes: int) -> list[list[Entry]]:
    """Entries in name order, cut into groups of at most `max_bytes` (a bigger tensor gets a shard of its own)."""
    groups: list[list[Entry]] = [[]]
    size = 0
    for e in sorted(plan.entries, key=lambda e: _natural(e.name)):
        n = plan.nbytes(e)
        if groups[-1] and size + n > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(e)
        size += n
    return groups


def check_destination(dst: Path, source: Path | None, force: bool) -> None:
    """Refuse a DST that holds the source, is not a folder, or exists (without --force, or is no checkpoint)."""
    if source is not None and (dst.resolve() == source.resolve() or dst.resolve() in source.resolve().parents):
        raise LlavaError(f"{dst} holds the source checkpoint; choose another destination")
    if dst.is_symlink() or (dst.exists() and not dst.is_dir()):
        raise LlavaError(f"{dst} exists and is not a folder")
    if dst.is_dir() and any(dst.iterdir()):
        if not force:
            raise LlavaError(f"{dst} exists; pass --force to replace it")
        if not (dst / "config.json").is_file():
            raise LlavaError(f"{dst} exists and is not a checkpoint folder; --force replaces only checkpoints")


def write(plan: Plan, dst: Path, *, max_bytes: int, force: bool = False, check: bool = True,
          progress: Callable[[str], None] = lambda _: None) -> Result:
    """Write `plan` to `dst` through a temporary folder; verify it unless `check` is False."""
    check_destination(dst, plan.folder, force)
    dst.parent.mkdir(parents=True, exist_ok=True)
    _remove_killed(dst, progress)
    # The pid in the name tells a later conversion whether the folder's writer is still running.
    tmp: Path | None = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-{os.getpid()}-", dir=dst.parent))
    # ... and a lock held on the folder while it is written tells the same across hosts or pid namespaces that share
    # the disk, where a pid means nothing.
    held = None
    try:
        held = _lock(tmp)
        try:
            shards = _write_into(plan, tmp, max_bytes, progress)
            _usual_permissions(tmp)
        except OSError as e:  # a full disk, most likely; or a source file that cannot be read
            if e.filename and not Path(e.filename).resolve().is_relative_to(tmp.resolve()):
                raise LlavaError(f"cannot read {e.filename}: {e.strerror or e}; the partial output was removed") from None
            file = f" ({Path(e.filename).name})" if e.filename else ""
            raise LlavaError(f"cannot write {dst}{file}: {e.strerror or e}; the partial output was removed") from None
        files = {f.name: f.stat().st_size for f in sorted(tmp.iterdir())}
        verification = verify(plan, tmp, progress) if check else None
        if verification is not None and not verification.ok:
            location = dst.with_name(dst.name + ".unverified")
            if location.exists():
                location = tmp
            else:
                os.rename(tmp, location)
            tmp = None
            return Result(location, files, shards, verification)
        _replace(tmp, dst)
        tmp = None
        return Result(dst, files, shards, verification)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if held is not None:
            os.close(held)


def _lock(folder: Path) -> int | None:
    """An exclusive flock on the folder itself (a directory fd), held until the fd is closed; None where the
    filesystem takes no locks."""
    if fcntl is None:
        return None
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _write_into(plan: Plan, folder: Path, max_bytes: int, progress: Callable[[str], None]) -> int:
    for name, text in plan.files.items():
        (folder / name).write_text(text, encoding="utf-8")
    for name, path in plan.copies.items():
        shutil.copyfile(path, folder / name)
    groups = shard(plan, max_bytes)
    total, done_bytes, done_tensors = plan.total_bytes, 0, 0
    # A quantized checkpoint says so in every shard, so the loader assigns its tensors as they are.
    metadata = {"format": "pt"} | ({quant.METADATA_KEY: plan.quantize} if plan.quantize else {})
    weight_map: dict[str, str] = {}
    for i, group in enumerate(groups, start=1):
        name = "model.safetensors" if len(groups) == 1 else f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        tensors = {k: t for e in group for k, t in plan.written(e).items()}  # one shard in memory at a time
        _save(tensors, folder / name, metadata)
        weight_map |= dict.fromkeys(tensors, name)
        done_tensors += len(tensors)
        del tensors
        done_bytes += sum(plan.nbytes(e) for e in group)
        progress(f"wrote {name}: {done_tensors}/{len(plan.layout)} tensors, "
                 f"{human_bytes(done_bytes)} of {human_bytes(total)}")
    if len(groups) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return len(groups)


def _save(tensors: dict, path: Path, metadata: dict) -> None:
    """save_file, with its I/O errors as the OSError they are (safetensors gives them as text)."""
    interrupts.check()  # a Ctrl-C that the last shard's save_file swallowed
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as e:  # "Error while serializing: I/O error: No space left on device (os error 28)"
        # newer releases say "(os error 28)"; 0.4/0.5 print the Rust error: "IoError(Os { code: 28, kind: ... })"
        if m := re.search(r"\(os error (\d+)\)|Os \{ code: (\d+)", str(e)):
            code = int(m[1] or m[2])
            raise OSError(code, os.strerror(code), str(path)) from None
        raise


def _remove_killed(dst: Path, progress: Callable[[str], None]) -> None:
    """Remove the `.DST.partial-PID-*` folders that conversions to DST left when they were killed: PID is gone here,
    and nobody holds the folder's lock (a conversion on another host sharing the disk would)."""
    left = re.compile(rf"\.{re.escape(dst.name)}\.partial-(\d+)-\w+")
    for folder in dst.parent.iterdir():
        if (m := left.fullmatch(folder.name)) and folder.is_dir() and not folder.is_symlink() and not _running(int(m[1])):
            try:
                held = _lock(folder)
            except OSError:  # gone meanwhile, or not ours to open
                continue
            if held is None:  # its writer still holds it, or the filesystem cannot tell: leave it
                continue
            try:
                shutil.rmtree(folder, ignore_errors=True)
            finally:
                os.close(held)
            progress(f"removed {folder}, left by a conversion that was killed (process {m[1]} is gone)")


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


def _usual_permissions(folder: Path) -> None:
    """mkdtemp makes a private folder and safetensors private files; give them what the umask gives new files."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for f in folder.iterdir():
        f.chmod(0o666 & ~umask)


def _replace(tmp: Path, dst: Path) -> None:
    """Rename `tmp` to `dst`; an existing `dst` is moved aside first and deleted only once `tmp` is in place."""
    if not dst.exists():
        os.rename(tmp, dst)
        return
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    os.rename(dst, old)
    try:
        os.rename(tmp, dst)
    except BaseException:
        os.rename(old, dst)
        raise
    shutil.rmtree(old, ignore_errors=True)
