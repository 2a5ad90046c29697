"""The serving benchmark (``bench/serve.py``), in the order a run uses it:

* ``assets``  - synthetic data widened to the issue's schema, the trained and exported PLE (both
  cached under the workdir), its onnxruntime AUCs, the unsplit baseline bundle, request bodies;
* ``systems`` - what is measured: the in-process floor, ``mtrank serve`` (ours), the naive peer,
  and the wrk client that drives the HTTP ones;
* ``load``    - one measured cell (floor or HTTP), the per-stage deltas of ``/metrics``, memory
  samples and the soak;
* ``report``  - the issue's target ratios and the Markdown rendering of the JSON report.
"""

from __future__ import annotations

import time


def log(msg: str) -> None:
    print(f"[serve-bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)
