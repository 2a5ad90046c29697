"""The naive peer of the serving benchmark (issue 5): what a team would write in an afternoon.

A reference implementation kept in ``bench/``, not part of the product:

* ``app.py``  - FastAPI + the trained PyTorch model in eager mode, features as one Redis hash per
  entity read with pipelined HGETALLs, the default FastAPI JSON response (a list of dicts validated
  through ``response_model``). Run it with ``uvicorn bench.naive_peer.app:app --workers 2``.
* ``load.py`` - writes the hashes (HSET per user and per item) and the model checkpoint it reads.
"""
