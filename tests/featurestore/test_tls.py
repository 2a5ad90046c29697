"""Redis over TLS with a password, through the URL only (``rediss://:PASSWORD@host:port/0?ssl_ca_certs=...``):
the loader writes features and the ranker reads them over TLS, scores equal those from a plain
Redis, and a client that does not trust the server's CA, or has the wrong password, is refused.

A test-owned redis-server with ``--port 0 --tls-port P`` (only TLS) and certificates made here
with openssl (a CA and a server certificate for 127.0.0.1)."""

from __future__ import annotations

import shutil
import subprocess
from urllib.parse import quote

import numpy as np
import orjson
import pytest
import redis

from service.redis_client import client_for_url
from tests.support.redis_server import RedisProc, TlsFiles
from tests.support.world import load_world, store_settings

PASSWORD = "s3cr3t/with:odd@chars"


def _openssl(*args: str, cwd) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not on PATH")
    d = tmp_path_factory.mktemp("tls")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=mtrank-test-ca",
             "-keyout", "ca.key", "-out", "ca.crt", cwd=d)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "server.key",
             "-out", "server.csr", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-days", "2", "-extfile", "san.ext", "-out", "server.crt", cwd=d)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=other-ca",
             "-keyout", "other.key", "-out", "other.crt", cwd=d)
    server = RedisProc(d, password=PASSWORD, tls=TlsFiles(cert=d / "server.crt", key=d / "server.key", ca=d / "ca.crt"))
    try:
        server.start()
    except RuntimeError:
        pytest.skip("this redis-server was built without TLS support")
    assert client_for_url(server.url).ping()  # the service's own client, through the URL only
    yield {"url": server.url, "port": server.port, "dir": d}
    server.stop()


def test_features_load_and_rank_over_tls(tls_redis, world, rig, redis_server, key_prefix):
    load_world(world, client_for_url(tls_redis["url"]), "tls")
    over_tls = rig(store_settings(tls_redis["url"], "tls", world, item_cache_size=0))
    load_world(world, redis.Redis.from_url(redis_server), key_prefix)
    plain = rig(store_settings(redis_server, key_prefix, world, item_cache_size=0))
    items = world.items[:50]
    a = over_tls.rank(world.users[0], items)
    b = plain.rank(world.users[0], items)
    assert a.degraded is None and b.degraded is None
    assert a.items_missing == 0
    ja, jb = orjson.loads(a.body), orjson.loads(b.body)
    assert [x["item_id"] for x in ja["items"]] == [x["item_id"] for x in jb["items"]]
    np.testing.assert_allclose([x["score"] for x in ja["items"]], [x["score"] for x in jb["items"]], rtol=1e-6)


def test_untrusted_ca_wrong_password_and_plaintext_are_refused(tls_redis):
    d, port = tls_redis["dir"], tls_redis["port"]
    good = f"rediss://:{quote(PASSWORD, safe='')}@127.0.0.1:{port}/0"
    with pytest.raises(redis.ConnectionError):  # the server's certificate is not signed by this CA
        client_for_url(f"{good}?ssl_ca_certs={d / 'other.crt'}", timeout_s=2).ping()
    with pytest.raises(redis.AuthenticationError):
        client_for_url(f"rediss://:wrong@127.0.0.1:{port}/0?ssl_ca_certs={d / 'ca.crt'}", timeout_s=2).ping()
    with pytest.raises(redis.ConnectionError):  # plain text to a TLS-only port
        client_for_url(f"redis://:{quote(PASSWORD, safe='')}@127.0.0.1:{port}/0", timeout_s=2).ping()
