"""What each of the server's processes sets about itself: its name, and that it ends with the supervisor."""

from __future__ import annotations

import ctypes
import signal

_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15


def _prctl(option: int, value: object) -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(option, value, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: both are conveniences the server does not depend on


def name_process(name: str) -> None:
    """Name this process as `ps`, `top` and /proc/PID/comm show it (Linux keeps the first 15 bytes)."""
    _prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]))


def end_with_parent(sig: signal.Signals = signal.SIGTERM) -> None:
    """Have the kernel send `sig` to this process when the supervisor dies, however it dies (even `kill -9`):
    an HTTP server left behind would keep the port and answer without anyone watching it."""
    _prctl(_PR_SET_PDEATHSIG, int(sig))
