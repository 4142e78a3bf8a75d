"""Ctrl-C and SIGTERM during work that must end cleanly (`llava convert`), even where library code swallows them.

Python raises KeyboardInterrupt inside whatever Python code runs when the signal arrives. When that code was called
from C code that treats any exception as "not found" or "not a sequence", the interrupt is lost: seen here about once
in 20-40 runs of the Ctrl-C tests, as a conversion that kept writing (numpy's attribute lookups inside safetensors'
save_file) or as "ValueError: could not determine the shape of object type 'torch.storage.UntypedStorage'" (torch
inferring a shape while the verification read tensors back). Within caught(), the signal is also remembered: check()
raises it again at the work's own safe points (each shard written, each tensor verified), and an exception that ends
the block while one is remembered ends it as the KeyboardInterrupt it stands for.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

_pending = False


def _raise(signum, frame) -> None:
    global _pending
    _pending = True
    raise KeyboardInterrupt


@contextmanager
def caught() -> Iterator[None]:
    """Within: SIGINT and SIGTERM raise KeyboardInterrupt and are remembered until the block ends (SIGTERM so that
    `kill` cleans up as Ctrl-C does). Outside the main thread signals are left alone."""
    global _pending
    try:
        previous = {s: signal.signal(s, _raise) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread
        yield
        return
    _pending = False
    try:
        yield
    except KeyboardInterrupt:
        raise
    except Exception:
        if _pending:  # the interrupt, turned into another error by the code it landed in
            raise KeyboardInterrupt from None
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _pending = False


def check() -> None:
    """Raise KeyboardInterrupt where a signal arrived within caught() and did not get through."""
    if _pending:
        raise KeyboardInterrupt
