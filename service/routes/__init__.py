"""The HTTP routes, one router per concern, over :class:`service.runtime.Runtime`:
:mod:`.rank` (``POST /rank``), :mod:`.health` (``/healthz``, ``/readyz``, ``/metrics``,
``/models``), :mod:`.admin` (``/admin/...``) and :mod:`.errors` (exception -> status)."""
