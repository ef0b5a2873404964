"""Keep a multi-threaded process on one OpenMP thread team.

torch runs its parallel CPU ops (and idefics2's kernels) on OpenMP. libgomp gives every thread that starts a
parallel region a team of its own, and as soon as the process holds more OpenMP threads than CPUs it stops
spinning between regions: every parallel op then waits for its workers to be woken by the kernel. On a small
machine a second team (e.g. the model loaded on the main thread, then served from an engine thread) made every
decode step 30-45% slower. The server therefore loads the model on a thread that exits (its team goes with
it) and lets only the engine thread run parallel torch code; other threads call `use_one_openmp_thread()`.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")
_libgomp: ctypes.CDLL | None | bool = False  # False: not looked up yet


def _find_libgomp() -> ctypes.CDLL | None:
    """The libgomp that torch loaded (the one whose per-thread settings torch reads), or None."""
    global _libgomp
    if _libgomp is False:
        _libgomp = None
        try:
            with open("/proc/self/maps") as maps:
                paths = {line.split()[-1] for line in maps if "libgomp" in line and "/" in line}
            for path in sorted(paths):
                lib = ctypes.CDLL(path)
                if hasattr(lib, "omp_set_num_threads"):
                    _libgomp = lib
                    break
        except OSError:
            pass
    return _libgomp


def use_one_openmp_thread() -> bool:
    """Run torch single-threaded in the calling thread only (other threads keep their setting).

    Returns False where it cannot be done (no libgomp: another OpenMP runtime or platform).
    """
    torch.get_num_threads()  # torch's per-thread lazy set-up runs first; it would override the value below
    lib = _find_libgomp()
    if lib is None:
        return False
    lib.omp_set_num_threads(1)
    return True


def run_in_short_lived_thread(fn: Callable[..., T], *args, **kwargs) -> T:
    """fn(*args, **kwargs) on a new thread that exits afterwards, taking its OpenMP team with it."""
    result: dict = {}

    def target() -> None:
        try:
            result["value"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001  (re-raised on the calling thread)
            result["error"] = e

    thread = threading.Thread(target=target, name="idefics2-load")
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]
