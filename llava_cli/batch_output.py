"""Where `llava batch` records go: one complete line per item, appended with one write, resumable from JSONL."""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import sys
import tempfile
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

from .errors import LlavaError
from .files import json_text

FORMATS = ("jsonl", "csv", "txt")
CSV_COLUMNS = ("image", "prompt", "answer", "error", "model", "template", "seed", "prompt_tokens",
               "generated_tokens", "stop_reason", "key")
FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # no item after this one can be written either


class OutputError(LlavaError):
    """Writing the output failed (a full disk, say): the run stops, and what it wrote stays whole."""


class RecordWriter:
    """Appends records to a file (O_APPEND, one os.write per complete line) or stdout, in one format.

    A SIGKILL between two writes leaves whole lines only. Reopening a JSONL file reads the keys already there
    (`done`), so a rerun skips them; a last line cut short by a crash of the machine is cut off first.
    """

    def __init__(self, path: str | None, fmt: str = "jsonl", with_prompt: bool = False, retry_errors: bool = False,
                 warn: Callable[[str], None] = lambda message: None):
        if fmt not in FORMATS:
            raise LlavaError(f"unknown format '{fmt}'; choose one of {', '.join(FORMATS)}")
        self.path, self.fmt, self.with_prompt = path, fmt, with_prompt
        self.done: set[str] = set()
        self.old_errors = 0  # error records an earlier run left in the file
        self.written = 0
        self.created = path is not None and not os.path.exists(path)  # discard() removes only a file this run made
        if path is None:
            self.fd = None
            new = True
        else:
            self.fd = _open_append(path)
            new = os.fstat(self.fd).st_size == 0
            if not new and fmt != "jsonl":
                os.close(self.fd)
                raise LlavaError(f"'{path}' exists and only JSONL output can be resumed; remove it or use --format jsonl")
            if not new:
                self._resume(warn, retry_errors)
        self.header = fmt == "csv" and new  # written with the first record, so a run that fails first leaves no file

    @property
    def resumable(self) -> bool:
        """Whether the same command run again continues this output: a JSONL file does, a CSV or text file refuses
        (above), and records on stdout are gone."""
        return self.path is not None and self.fmt == "jsonl"

    def _resume(self, warn: Callable[[str], None], retry_errors: bool) -> None:
        """Read the keys of the records already in the file; cut a torn last line; drop error records to retry."""
        with open(self.path, "rb") as f:
            data = f.read()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            os.truncate(self.path, end)
            warn(f"{self.path}: removed an incomplete last line, left by a run that stopped mid-write")
        kept, errors = [], 0
        for n, line in enumerate(data[:end].splitlines(keepends=True), start=1):
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            key = record.get("key") if isinstance(record, dict) else None
            if not isinstance(key, str):
                if line.strip():
                    warn(f"{self.path}:{n}: not a llava batch record; kept and ignored")
            elif retry_errors and "error" in record:
                errors += 1
                continue
            else:
                self.done.add(key)
                self.old_errors += "error" in record
            kept.append(line)
        if errors:
            self._replace(b"".join(kept))
            warn(f"{self.path}: removed {errors} error record(s) to try those items again")

    def _replace(self, data: bytes) -> None:
        """Swap the file for `data` whole (a temporary file renamed over it), then append to the new one."""
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(self.path)}.", dir=os.path.dirname(self.path) or ".")
        try:
            os.fchmod(fd, os.fstat(self.fd).st_mode & 0o7777)  # mkstemp makes it 0600; keep the file's own mode
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException as e:  # Ctrl-C too: no temporary file is left next to the output
            os.unlink(tmp)
            if isinstance(e, OSError):
                raise LlavaError(f"cannot rewrite '{self.path}': {e.strerror or e}") from None
            raise
        os.close(self.fd)
        self.fd = _open_append(self.path)

    def write(self, record: dict) -> None:
        """One record, as one complete line, handed to the OS before returning."""
        if self.fmt == "jsonl":
            line = json_text(record) + "\n"  # an image name that is not UTF-8: escaped
        elif self.fmt == "csv":
            tokens = record.get("tokens", {})
            line = _csv_line(CSV_COLUMNS) if self.header else ""
            self.header = False
            line += _csv_line([record.get("image"), record.get("prompt"), record.get("answer"), record.get("error"),
                              record.get("model"), record.get("template"), record.get("seed"),
                              tokens.get("prompt"), tokens.get("generated"), record.get("stop_reason"),
                              record.get("key")])
        else:
            answer = record["answer"] if "error" not in record else f"error: {record['error']}"
            cells = [record["image"], record["prompt"], answer] if self.with_prompt else [record["image"], answer]
            line = "\t".join(" ".join(str(c).split()) for c in cells) + "\n"  # one line per item, no tabs inside
        self._write(line)
        self.written += 1
        if "key" in record:
            self.done.add(record["key"])

    def _write(self, line: str) -> None:
        data = line.encode("utf-8", errors="surrogateescape")  # CSV and text keep a file name's own bytes
        if self.fd is None:
            _write_stdout(data)
            return
        start = os.fstat(self.fd).st_size  # O_APPEND: the record goes at the end
        try:
            while data:  # a regular file takes it in one write; the loop only guards against a short write
                data = data[os.write(self.fd, data):]
        except BaseException as e:  # a full disk takes part of a line, then fails: cut the part off
            with suppress(OSError):
                os.ftruncate(self.fd, start)
            if isinstance(e, OSError):
                raise _failed(f"'{self.path}'", e, "its records are whole", resumes=self.resumable) from None
            raise

    def close(self) -> None:
        """Flush the records to the disk and close the file; a failure of the flush is an OutputError."""
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            os.fsync(fd)
        except OSError as e:
            raise _failed(f"'{self.path}'", e, "its records may not all be on the disk",
                          resumes=self.resumable) from None
        finally:
            os.close(fd)

    def discard(self) -> None:
        """Close after a run that stopped early (a failed flush is ignored: the run's own error says more), and
        remove the output file when this run created it and wrote nothing (the model did not load, Ctrl-C)."""
        with suppress(OutputError):
            self.close()
        if self.created and self.written == 0:
            Path(self.path).unlink(missing_ok=True)


class NoRecords(RecordWriter):
    """Records go nowhere (--sidecar without --output: the caption files are the output)."""

    resumable = True  # a rerun skips the images whose caption file is there

    def __init__(self):
        super().__init__(None)

    def _write(self, line: str) -> None:
        pass


def _open_append(path: str) -> int:
    try:
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as e:
        raise LlavaError(f"cannot write '{path}': {e.strerror or e}") from None


def _write_stdout(data: bytes) -> None:
    try:
        sys.stdout.flush()
        try:
            fd = sys.stdout.fileno()
        except (AttributeError, OSError, io.UnsupportedOperation):  # a captured stdout (tests): its buffer
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
            return
        while data:
            data = data[os.write(fd, data):]
    except BrokenPipeError:  # the reader went away: ui.reported() ends quietly
        raise
    except OSError as e:
        raise _failed("to standard output", e) from None


def _failed(target: str, e: OSError, state: str = "", resumes: bool = True) -> OutputError:
    """'cannot write 'out.jsonl': No space left on device; its records are whole: run ... again to resume'.

    Only JSONL output and caption files resume; a CSV or text file is told as it is (a rerun refuses to append)."""
    hint = (f"; {state}" + (": run the same command again to resume" if resumes else "")) if state else ""
    return OutputError(f"cannot write {target}: {e.strerror or e}{hint}")


def _csv_line(cells) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(["" if c is None else c for c in cells])
    return buf.getvalue()


def sidecar_path(image: str) -> Path:
    """photo.jpg -> photo.txt, next to the image."""
    return Path(image).with_suffix(".txt")


def write_sidecar(image: str, answer: str) -> None:
    """Write the answer next to the image, whole or not at all, never over an existing file."""
    target = sidecar_path(image)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(answer + "\n")
            os.link(tmp, target)  # fails if the target appeared meanwhile, where a rename would overwrite it
        finally:
            os.unlink(tmp)
    except FileExistsError:
        raise LlavaError(f"'{target}' already exists; it was left as it is") from None
    except OSError as e:
        if e.errno in FULL:  # every caption after this one would fail too
            raise _failed(f"caption '{target}'", e, "the captions written are whole") from None
        raise LlavaError(f"cannot write caption '{target}': {e.strerror or e}") from None
