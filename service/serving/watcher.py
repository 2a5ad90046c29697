"""The store watcher: a daemon thread that polls the model store and the routing config."""

from __future__ import annotations

import logging
import threading

from service.serving.manager import ServingManager

log = logging.getLogger("service.serving")


class Watcher:
    """A daemon thread calling :meth:`ServingManager.poll` every ``interval`` seconds."""

    def __init__(self, manager: ServingManager, interval: float):
        self.manager = manager
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mtrank-store-watcher", daemon=True)

    def start(self) -> Watcher:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.manager.poll()
            except Exception:  # the watcher must survive anything; the old state keeps serving
                log.exception("store watcher: poll failed")
