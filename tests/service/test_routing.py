"""Routing: the bucket hash (test vectors, an independent implementation, uniformity, salts), the
bucket -> variant table, layers, version policies and the validation of the experiment config."""

import random
import string

import mmh3
import pytest
from scipy.stats import chisquare

from service.routing import (
    DEFAULT_BUCKETS,
    RoutingConfigError,
    VersionPolicy,
    bucket_of,
    implicit_config,
    is_safe_name,
    load_config,
    parse_config,
    parse_policy,
)


def murmur3_x86_32(data: bytes, seed: int = 0) -> int:
    """MurmurHash3 x86 32-bit, written from the reference algorithm (independent of mmh3)."""
    c1, c2, mask = 0xCC9E2D51, 0x1B873593, 0xFFFFFFFF

    def rotl(x: int, r: int) -> int:
        return ((x << r) | (x >> (32 - r))) & mask

    h = seed & mask
    n = len(data) // 4 * 4
    for i in range(0, n, 4):
        k = int.from_bytes(data[i:i + 4], "little")
        k = rotl((k * c1) & mask, 15) * c2 & mask
        h = (rotl(h ^ k, 13) * 5 + 0xE6546B64) & mask
    tail, k = data[n:], 0
    if len(tail) >= 3:
        k ^= tail[2] << 16
    if len(tail) >= 2:
        k ^= tail[1] << 8
    if len(tail) >= 1:
        k ^= tail[0]
        h ^= rotl((k * c1) & mask, 15) * c2 & mask
    h ^= len(data)
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & mask
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & mask
    return h ^ (h >> 16)


def ref_bucket(salt: str, user_id: str, buckets: int = DEFAULT_BUCKETS) -> int:
    return murmur3_x86_32(f"{salt}:{user_id}".encode(), 0) % buckets


# published in the README ("Experiments"): salt, user id, bucket of 10,000
VECTORS = [
    ("exp1", "42", 9431),
    ("exp1", "43", 8167),
    ("exp1", "user-1", 9747),
    ("home-2024-06", "42", 689),
    ("home-2024-06", "alice", 5426),
    ("home-2024-06", "ünïcödé", 2763),
    ("mtrank", "42", 5888),
    ("s", "", 5059),
]


def test_reference_murmur3_matches_published_vectors():
    # the canonical MurmurHash3_x86_32 vectors: the reference implementation above is right
    assert murmur3_x86_32(b"", 0) == 0
    assert murmur3_x86_32(b"", 1) == 0x514E28B7
    assert murmur3_x86_32(b"test", 0) == 0xBA6BD213
    assert murmur3_x86_32(b"Hello, world!", 1234) == 0xFAF6CDB3
    assert murmur3_x86_32(b"The quick brown fox jumps over the lazy dog", 0) == 0x2E4FF723


@pytest.mark.parametrize("salt,user,bucket", VECTORS)
def test_bucket_test_vectors(salt, user, bucket):
    assert bucket_of(salt, user) == bucket
    assert ref_bucket(salt, user) == bucket
    assert mmh3.hash(f"{salt}:{user}".encode(), 0, signed=False) % 10_000 == bucket


def test_bucket_equals_independent_implementation_on_random_ids():
    rng = random.Random(11)
    alphabet = string.ascii_letters + string.digits + "-_:/ éü漢😀"
    for _ in range(3000):
        user = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24)))
        salt = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12)))
        n = rng.choice([2, 7, 100, 10_000, 65_536, 1_000_000])
        assert bucket_of(salt, user, n) == ref_bucket(salt, user, n), (salt, user, n)


def test_assignment_is_uniform_chi_square():
    rng = random.Random(2024)
    ids = [str(rng.getrandbits(63)) for _ in range(100_000)]
    # all 10,000 buckets (10 users expected in each)
    counts = [0] * DEFAULT_BUCKETS
    for u in ids:
        counts[bucket_of("uniformity", u)] += 1
    assert chisquare(counts).pvalue > 0.001
    # 100 ranges of 100 buckets (what a 1% variant gets), other ids and salt
    ranges = [0] * 100
    for _ in range(100_000):
        ranges[bucket_of("exp-2024", f"user-{rng.getrandbits(40)}") // 100] += 1
    assert chisquare(ranges).pvalue > 0.001
    # the test can fail: 1% of the users moved into the first 10 ranges is rejected at this level
    skewed = [c + 100 if i < 10 else c - 1000 // 90 for i, c in enumerate(ranges)]
    assert chisquare(skewed).pvalue < 0.001


def test_salt_change_reshuffles_users():
    users = [str(i) for i in range(20_000)]
    half_a = {u for u in users if bucket_of("salt-a", u) < 5000}
    half_b = {u for u in users if bucket_of("salt-b", u) < 5000}
    # independent halves overlap by about a quarter of the users, identical ones by half
    overlap = len(half_a & half_b) / len(users)
    assert 0.23 < overlap < 0.27
    same = sum(bucket_of("salt-a", u) == bucket_of("salt-b", u) for u in users)
    assert same < 20  # ~2 expected by chance


CONFIG = """\
salt: exp1
buckets: 10000
allow_force: true
models:
  demo: latest 2
layers:
  - name: ranking
    variants:
      - name: control
        buckets: [0, 4999]
        model: {name: demo, version: latest}
      - name: candidate
        buckets: [5000, 9999]
        model: {name: demo, version: 3}
        fusion: {name: weighted_sum, weights: {ctr: 1.0, cvr: 2.0}}
  - name: ui
    variants:
      - {name: ui-a, percent: 25}
      - {name: ui-b, percent: 75}
"""


def test_config_parses_and_routes():
    cfg = parse_config(CONFIG, "exp.yaml")
    assert cfg.allow_force and cfg.buckets == 10_000 and cfg.ranking_layer == "ranking"
    assert cfg.models == {"demo": VersionPolicy(latest=2)}
    assert cfg.model_names() == {"demo"}
    t = cfg.table()
    assert [v.name for v in t.variants] == ["control", "candidate"]
    assert t.range_of("candidate") == (5000, 9999)
    ui = cfg.table("ui")
    assert ui.range_of("ui-a") == (0, 2499) and ui.range_of("ui-b") == (2500, 9999)
    assert cfg.salt_of(cfg.layer("ranking")) == "exp1" and cfg.salt_of(cfg.layer("ui")) == "exp1:ui"
    # user 42 has bucket 9431 under salt exp1 (a README vector): candidate
    assert cfg.assign("42")["ranking"] == ("candidate", 9431)
    assert cfg.assign("42")["ui"] == ("ui-b" if bucket_of("exp1:ui", "42") >= 2500 else "ui-a",
                                      bucket_of("exp1:ui", "42"))


def test_shorthand_variants_is_one_ranking_layer():
    cfg = parse_config("salt: s\nvariants:\n  - {name: a, percent: 50, model: {name: m}}\n"
                       "  - {name: b, percent: 50, model: {name: m, version: 2}}\n")
    assert [layer.name for layer in cfg.layers] == ["ranking"]
    assert cfg.table().range_of("b") == (5000, 9999)
    assert cfg.ranking.variants[1].model.version == 2 and cfg.ranking.variants[0].model.version == "latest"


def test_layers_are_mutually_exclusive_within_and_independent_across():
    cfg = parse_config(CONFIG)
    users = [f"u{i}" for i in range(20_000)]
    per_layer = {layer.name: {} for layer in cfg.layers}
    for u in users:
        for layer, (variant, _bucket) in cfg.assign(u).items():
            per_layer[layer].setdefault(variant, set()).add(u)
    for groups in per_layer.values():
        # every user in exactly one variant of each layer
        assert sum(len(g) for g in groups.values()) == len(users)
        assert set().union(*groups.values()) == set(users)
        names = list(groups)
        for i in range(len(names)):
            for j in range(i + 1, len(names)):
                assert not groups[names[i]] & groups[names[j]]
    # across layers the split is independent: candidate users are ~25% ui-a, like everyone
    cand = per_layer["ranking"]["candidate"]
    share = len(cand & per_layer["ui"]["ui-a"]) / len(cand)
    assert 0.22 < share < 0.28


def test_percentages_take_consecutive_ranges_in_order():
    cfg = parse_config("salt: s\nbuckets: 1000\nvariants:\n"
                       "  - {name: a, percent: 10.5, model: {name: m}}\n"
                       "  - {name: b, percent: 39.5, model: {name: m}}\n"
                       "  - {name: c, percent: 50, model: {name: m}}\n")
    t = cfg.table()
    assert [t.range_of(n) for n in "abc"] == [(0, 104), (105, 499), (500, 999)]
    assert [t.variant_at(b).name for b in (0, 104, 105, 499, 500, 999)] == list("aabbcc")


def errors_of(text: str) -> list:
    with pytest.raises(RoutingConfigError) as e:
        parse_config(text, "bad.yaml")
    assert "bad.yaml" in str(e.value)
    return e.value.issues


def one_error(text: str, line: int, *words: str):
    issues = errors_of(text)
    assert len(issues) == 1, [str(i) for i in issues]
    issue = issues[0]
    assert issue.line == line, str(issue)
    for w in words:
        assert w in issue.message, str(issue)
    assert f"line {line}" in str(issue)
    return issue


BASE = "salt: s\nvariants:\n"


def test_error_overlapping_ranges():
    one_error(BASE + "  - {name: a, buckets: [0, 5000], model: {name: m}}\n"
                     "  - {name: b, buckets: [5000, 9999], model: {name: m}}\n", 4, "overlaps", "'a'", "line 3")


def test_error_missing_ranges():
    one_error(BASE + "  - {name: a, buckets: [0, 4000], model: {name: m}}\n"
                     "  - {name: b, buckets: [5000, 9999], model: {name: m}}\n", 4, "4001-4999", "not assigned")
    one_error(BASE + "  - {name: a, buckets: [0, 4999], model: {name: m}}\n"
                     "  - {name: b, buckets: [5000, 9000], model: {name: m}}\n", 2, "9001-9999", "not assigned")


def test_error_range_outside_buckets():
    one_error("salt: s\nbuckets: 100\nvariants:\n  - {name: a, buckets: [0, 100], model: {name: m}}\n", 4,
              "outside buckets 0..99")


def test_error_percentages_not_summing_to_100():
    one_error(BASE + "  - name: a\n    percent: 60\n    model: {name: m}\n"
                     "  - name: b\n    percent: 30\n    model: {name: m}\n", 2, "sum to 90", "not 100")


def test_error_percent_not_whole_buckets_and_mixing():
    issues = errors_of("salt: s\nbuckets: 10\nvariants:\n  - {name: a, percent: 55, model: {name: m}}\n"
                       "  - {name: b, percent: 45, model: {name: m}}\n")
    assert [(i.line, "% of 10 buckets is not a whole number" in i.message) for i in issues] == [(4, True), (5, True)]
    one_error(BASE + "  - {name: a, percent: 50, model: {name: m}}\n"
                     "  - {name: b, buckets: [5000, 9999], model: {name: m}}\n", 4, "mixes")


@pytest.mark.parametrize("weights,word", [("{ctr: .nan}", "finite"), ("{ctr: .inf}", "finite"),
                                          ("{ctr: true}", "number"), ("{ctr: abc}", "number"),
                                          ("{}", "empty")])
def test_error_bad_weights(weights, word):
    text = BASE + "  - name: a\n    percent: 100\n    model: {name: m}\n    fusion:\n      weights: " + weights + "\n"
    one_error(text, 7, word)


def test_error_unknown_fusion_unknown_key_bad_version_and_names():
    one_error(BASE + "  - {name: a, percent: 100, model: {name: m}, fusion: {name: max}}\n", 3, "unknown fusion")
    one_error(BASE + "  - name: a\n    percent: 100\n    model: {name: m}\n    weight: 3\n", 6, "unknown key")
    one_error(BASE + "  - name: a\n    percent: 100\n    model: {name: m, version: 0}\n", 5, "version number")
    one_error(BASE + "  - name: a\n    percent: 100\n    model: {name: ../etc}\n", 5, "must match")
    one_error(BASE + "  - name: a\n    percent: 100\n", 3, "needs a model")


def test_error_duplicates_yaml_and_layers():
    one_error("salt: s\nsalt: t\nvariants:\n  - {name: a, percent: 100, model: {name: m}}\n", 2, "duplicate key")
    one_error(BASE + "  - {name: a, percent: 50, model: {name: m}}\n  - {name: a, percent: 50, model: {name: m}}\n",
              4, "duplicate variant")
    one_error("salt: s\nvariants: [\n", 3, "not valid YAML")
    one_error("salt: s\nranking_layer: main\nlayers:\n  - name: ranking\n"
              "    variants: [{name: a, percent: 100, model: {name: m}}]\n", 2, "not one of the layers")
    one_error("salt: s\nlayers:\n  - name: ranking\n    variants: [{name: a, percent: 100, model: {name: m}}]\n"
              "  - name: ui\n    salt: s\n    variants: [{name: b, percent: 100}]\n", 6, "same salt")
    one_error("salt: s\nlayers:\n  - name: ranking\n    variants: [{name: a, percent: 100, model: {name: m}}]\n"
              "  - name: ui\n    variants: [{name: b, percent: 100, model: {name: m}}]\n", 6,
              "only variants of the ranking")


def test_several_errors_reported_together():
    issues = errors_of(BASE + "  - {name: a, percent: 60, model: {name: m}, fusion: {weights: {ctr: .nan}}}\n"
                              "  - {name: b, percent: 30, model: {name: m}}\n")
    assert sorted(i.line for i in issues) == [2, 3]


def test_load_config_reads_a_file_and_names_it(tmp_path):
    p = tmp_path / "routing.yaml"
    p.write_text(CONFIG)
    assert load_config(p).source == str(p)
    with pytest.raises(RoutingConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")


def test_version_policies():
    assert parse_policy("latest") == VersionPolicy(latest=1)
    assert parse_policy("latest 3") == VersionPolicy(latest=3)
    assert parse_policy(4) == VersionPolicy(versions=(4,))
    assert parse_policy([5, 3, "latest"]) == VersionPolicy(latest=1, versions=(3, 5))
    assert parse_policy("latest, 2") == VersionPolicy(latest=1, versions=(2,))
    for bad in ("newest", "latest 0", "latest x", 0, [True], "latest 2 3"):
        with pytest.raises(ValueError):
            parse_policy(bad)
    one_error("salt: s\nmodels:\n  m: newest\nvariants:\n  - {name: a, percent: 100, model: {name: m}}\n", 3,
              "bad version policy")


def test_implicit_config_is_one_default_variant():
    cfg = implicit_config("demo", None, "weighted_product", {"ctr": 1.0}, "latest 2")
    assert [v.name for v in cfg.ranking.variants] == ["default"]
    assert cfg.table().range_of("default") == (0, 9999)
    assert cfg.models == {"demo": VersionPolicy(latest=2)}
    pinned = implicit_config("demo", 3, "weighted_sum", {"ctr": 1.0})
    assert pinned.models == {"demo": VersionPolicy(versions=(3,))} and pinned.ranking.variants[0].model.version == 3


@pytest.mark.parametrize("name,ok", [("demo", True), ("demo-2.v1_x", True), ("..", False), ("../x", False),
                                     ("a/b", False), ("a\\b", False), (".tmp-1", False), ("", False),
                                     ("a..b", False), ("x" * 129, False), ("ok%2f", False)])
def test_safe_names(name, ok):
    assert is_safe_name(name) is ok


def test_variant_precision():
    cfg = parse_config(BASE + "  - {name: a, percent: 50, model: {name: m}}\n"
                              "  - {name: b, percent: 50, model: {name: m}, precision: int8}\n")
    assert [(v.precision, v.model_precision) for v in cfg.ranking.variants] == [(None, "fp32"), ("int8", "int8")]
    one_error(BASE + "  - name: a\n    percent: 100\n    model: {name: m}\n    precision: int4\n", 6,
              "unknown precision 'int4'", "fp32", "int8")
    one_error("salt: s\nlayers:\n  - name: ranking\n    variants: [{name: a, percent: 100, model: {name: m}}]\n"
              "  - name: ui\n    variants:\n      - name: b\n        percent: 100\n        precision: int8\n", 9,
              "only variants of the ranking")
