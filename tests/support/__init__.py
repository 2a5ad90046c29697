"""What the tests share, in one place (conftest.py files only define fixtures over it):

- ``ports``: ``free_port``
- ``redis_server``: ``RedisProc``, the one launcher of a test-owned redis-server (password, TLS,
  cluster and debug options as the tests need)
- ``server``: ``Server``, the one runner of the service in a subprocess (``uvicorn --factory`` or
  ``mtrank serve``) with ``wait_ready``
- ``contract``: the standard three tasks and a tiny feature schema
- ``bundles``: a real ONNX bundle built with ``onnx.helper`` (no torch), features written to Redis
- ``world``: a synthetic dataset with a bundle of its schema, loaded with the real loader; a Ranker rig
- ``http``: a raw HTTP/1.1 exchange and Prometheus scrapes
- ``loadgen``: a small asyncio load generator
"""
