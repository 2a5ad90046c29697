"""``mtrank features gc`` against a real redis-server (and a real 3-master cluster): a dry run
deletes nothing; ``--apply`` deletes exactly the namespaces no held bundle uses - keys outside the
prefix, keys under it that are in no namespace, the held version's namespace and the namespace of
a newer version whose features are being loaded (no meta key yet) all survive."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from service.cli import app
from service.contract import BundleManifest, meta_key, namespace
from service.redis_client import client_for_url
from tests.featurestore.test_cluster import cluster  # noqa: F401  (the 3-master cluster: a fixture, started if used)
from tests.support.bundles import write_bundle
from tests.support.world import load_world

PREFIX = "gc"
ENV = {"MTRANK_ROUTING_CONFIG": None, "MTRANK_MODEL_NAME": "demo", "MTRANK_MODEL_VERSION": None,
       "MTRANK_VERSION_POLICY": None}


def _scenario(url: str, world, tmp_path) -> None:
    client = client_for_url(url)
    store = tmp_path / "models"
    shutil.copytree(world.store, store)
    v1 = BundleManifest.from_json((world.bundle_dir / "manifest.json").read_text())
    vocabs = json.loads((world.bundle_dir / "vocab.json").read_text())
    schema = v1.feature_schema
    seq = schema.sequence[0]
    alt = schema.model_copy(update={"sequence": [seq.model_copy(update={"max_len": seq.max_len + 1}),
                                                 *schema.sequence[1:]]})
    write_bundle(store, "demo", 2, schema=alt, vocabs=vocabs)  # newest; its features still loading
    held, loading = namespace(PREFIX, schema), namespace(PREFIX, alt)
    assert held != loading
    load_world(world, client, PREFIX)
    for i in range(30):
        client.set(f"{loading}:i:{i}", b"x")  # the data first, the meta key last: not written yet
    stale = f"{PREFIX}:0123456789ab"
    for i in range(40):
        client.set(f"{stale}:u:{i}", b"x")
        client.set(f"{stale}:i:{i}", b"x")
    client.set(meta_key(stale), json.dumps({"schema_fingerprint": "0123456789ab" + "0" * 52, "model": "demo",
                                            "version": 0}))
    untouchable = {f"{PREFIX}:predictions": b"stream", f"{PREFIX}:abc:def": b"1", f"{PREFIX}x:0123456789ab:u:1": b"1",
                   "other:0123456789ab:u:1": b"1", f"{stale}": b"the namespace's name itself, not in it"}
    for k, v in untouchable.items():
        client.set(k, v)

    def keys() -> set[bytes]:
        from service.namespaces import masters
        return {k for node in masters(client) for k in node.scan_iter(count=1000)}

    before = keys()
    runner = CliRunner()
    args = ["features", "gc", "--redis-url", url, "--prefix", PREFIX, "--store", str(store)]
    dry = runner.invoke(app, args, env=ENV)
    assert dry.exit_code == 0, dry.output
    assert keys() == before
    assert f"{stale}" in dry.output and "would delete 1 namespaces (81 keys)" in dry.output, dry.output
    assert "keep (demo v2)" in dry.output and "keep (demo v1)" in dry.output, dry.output

    done = runner.invoke(app, [*args, "--apply"], env=ENV)
    assert done.exit_code == 0, done.output
    assert "deleted 1 namespaces (81 keys)" in done.output, done.output
    after = keys()
    assert after == {k for k in before if not k.startswith(f"{stale}:".encode())}
    assert all(k.encode() in after for k in untouchable)
    assert client.get(meta_key(held)) is not None
    client.close()


def test_gc_on_one_redis(own_redis, world, tmp_path):
    _scenario(own_redis().url, world, tmp_path)


def test_gc_refuses_a_bad_keep(own_redis, world, tmp_path):
    out = CliRunner().invoke(app, ["features", "gc", "--redis-url", own_redis().url, "--keep", "../x:1"], env=ENV)
    assert out.exit_code == 2 and "NAME:VERSION" in out.output


@pytest.mark.slow
def test_gc_on_a_cluster_scans_every_master(cluster, world, tmp_path):  # noqa: F811
    _scenario(cluster.url, world, tmp_path)
