"""Polling until a condition holds: the one helper the tests use instead of fixed sleeps."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(pred: Callable[[], T], timeout: float, step: float = 0.05) -> T:
    """Poll ``pred`` every ``step`` seconds until it is truthy or ``timeout`` has passed; return its
    last value (falsy when time ran out)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = pred()
        if value:
            return value
        time.sleep(step)
    return pred()


def wait_for(pred: Callable[[], T], timeout: float = 30.0, what: str = "condition", step: float = 0.05) -> T:
    """:func:`wait_until`, failing the test (naming ``what``) when time runs out."""
    value = wait_until(pred, timeout, step)
    assert value, f"timed out after {timeout} s waiting for {what}"
    return value
