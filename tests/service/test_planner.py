"""The serving planner's rules, pure: no Redis, no onnxruntime, no store on disk."""

from service.routing import parse_config, parse_policy
from service.serving.planner import Latest, plan, resolve, take_latest, why_missing
from service.serving.state import BundleKey, LoadedBundle, ModelVersion

LATEST = parse_policy("latest")
TWO_VARIANTS = ("salt: s\nvariants:\n"
                "  - {name: a, percent: 50, model: {name: m, version: 2}, precision: int8}\n"
                "  - {name: b, percent: 50, model: {name: m}}\n")


def held(*entries: tuple[BundleKey, bool]) -> dict[BundleKey, LoadedBundle]:
    # the rules read keys and features_confirmed only; they never open a bundle
    return {k: LoadedBundle(bundle=None, signature=(), features_confirmed=c) for k, c in entries}


def test_plan_holds_pins_per_precision_then_latest_then_operator_loads():
    cfg = parse_config(TWO_VARIANTS)
    p = plan(cfg, {"m": [1, 2, 3]}, LATEST, operator_loaded={ModelVersion("m", 1)}, held_out=set())
    assert p.steps == [Latest("m", "fp32", 1, (3, 2, 1)),
                       BundleKey("m", 2, "int8"), Latest("m", "int8", 1, (3, 2, 1)),
                       BundleKey("m", 1, "fp32")]
    assert p.issues == []


def test_plan_leaves_out_operator_unloads_and_versions_not_in_the_store():
    cfg = parse_config("salt: s\nmodels: {m: [2, 7]}\nvariants:\n  - {name: a, percent: 100, model: {name: m}}\n")
    p = plan(cfg, {"m": [1, 2, 3]}, LATEST, operator_loaded=set(), held_out={ModelVersion("m", 3)}, store="/s")
    assert p.steps == [BundleKey("m", 2)]  # the policy [2, 7] has no 'latest'; 7 is not in the store
    assert len(p.issues) == 1 and "version 7 of model 'm' is not in the store /s" in p.issues[0].message
    p = plan(cfg, {"m": [1, 2, 3]}, LATEST, operator_loaded=set(), held_out={ModelVersion("m", 2)})
    assert p.steps == [] and len(p.issues) == 1  # unloaded by an operator: not held, even when listed


def test_take_latest_counts_confirmed_versions_and_walks_at_most_2n():
    bundles = held((BundleKey("m", 5), False), (BundleKey("m", 3), True), (BundleKey("m", 2), True),
                   (BundleKey("m", 1), True))
    asked = []

    def get(key):
        asked.append(key.version)
        return bundles.get(key)  # v4 is refused (None)

    got = take_latest(Latest("m", "fp32", 2, (5, 4, 3, 2, 1)), get)
    assert [lb.features_confirmed for lb in got] == [False, True, True] and asked == [5, 4, 3, 2]
    unconfirmed = held(*((BundleKey("m", v), False) for v in range(1, 7)))
    got = take_latest(Latest("m", "fp32", 2, (6, 5, 4, 3, 2, 1)), unconfirmed.get)
    assert len(got) == 4  # 2N loaded without a confirmed one: stop


def test_resolve_prefers_the_newest_confirmed_version_in_the_variants_precision():
    cfg = parse_config(TWO_VARIANTS)
    pinned, latest = cfg.table().variants
    h = held((BundleKey("m", 1), True), (BundleKey("m", 2), False), (BundleKey("m", 3, "int8"), True))
    assert resolve(latest, h) is h[BundleKey("m", 1)]  # v2 is newer but unconfirmed; int8 v3 is another precision
    assert resolve(latest, held((BundleKey("m", 2), False))) is not None  # nothing confirmed: the newest
    assert resolve(pinned, h) is None  # v2 int8 is not held
    h2 = held((BundleKey("m", 2, "int8"), False))
    assert resolve(pinned, h2) is h2[BundleKey("m", 2, "int8")]


def test_why_missing_names_the_refusals_and_operator_unloads():
    refused = {BundleKey("m", 2): "sha256 mismatch"}
    assert why_missing("x", None, "fp32", [], ["m"], refused, set(), "/s") == \
        "model 'x' is not in the store /s (models there: ['m'])"
    assert "version 9 is not in the store (versions there: [1, 2])" in \
        why_missing("m", 9, "fp32", [1, 2], ["m"], refused, set(), "/s")
    assert why_missing("m", None, "fp32", [1, 2], ["m"], refused, {ModelVersion("m", 1)}, "/s") == \
        "no loadable version of model 'm': v2: sha256 mismatch; unloaded by an operator: ['v1']"
    assert why_missing("m", 2, "int8", [1, 2], ["m"], {}, set(), "/s") == \
        "model 'm' version 2 in int8 could not be loaded: refused"
    assert str(BundleKey("m", 2, "int8")) == "m v2 int8" and str(BundleKey("m", 2)) == "m v2"
