"""The key layout's hash tags (service.contract) and the cluster read's grouping of keys by hash slot
(service.redis_client): no Redis needed. The cluster itself is in test_cluster.py."""

from __future__ import annotations

import random

from redis.crc import key_slot

from service.contract import (
    CLUSTER_SLOTS,
    ITEM_GROUPS,
    KEY_LAYOUT_VERSION,
    item_group,
    item_key,
    item_keys,
    meta_key,
    user_key,
)
from service.redis_client import _positions_by_slot

NS = "p:0123456789ab"


def test_item_keys_fall_in_item_groups_slots_per_namespace():
    ids = [f"item-{i}" for i in range(5000)] + ["a:b", "{x}", "}", "é", ""]
    keys = item_keys(NS, ids)
    assert keys == [item_key(NS, i) for i in ids]
    assert all(k.startswith(f"{NS}:i:{{") and k.endswith(f"}}:{i}") for k, i in zip(keys, ids, strict=True))
    by_group: dict[int, set[int]] = {}
    for i, k in zip(ids, keys, strict=True):
        by_group.setdefault(item_group(i), set()).add(key_slot(k.encode()))
    # every group is one slot, and the groups are ITEM_GROUPS different slots
    assert sorted(by_group) == list(range(ITEM_GROUPS)) and all(len(s) == 1 for s in by_group.values())
    assert len({s for v in by_group.values() for s in v}) == ITEM_GROUPS
    # another namespace's groups are other slots (the tag holds the namespace's hash)
    other = {key_slot(k.encode()) for k in item_keys("p:ba9876543210", ids)}
    assert len(other) == ITEM_GROUPS and len(other & {s for v in by_group.values() for s in v}) < ITEM_GROUPS // 4
    assert KEY_LAYOUT_VERSION == 2


def test_item_groups_spread_evenly_over_the_slots():
    """Group k's slot is in the middle half of the k-th of ITEM_GROUPS equal slot ranges: masters with
    equal contiguous ranges (what `redis-cli --cluster create` makes) hold exactly equal numbers of
    groups when their count divides ITEM_GROUPS (2, 3, 4, 6, 12), and equal to one for 5 or 8 masters."""
    assert ITEM_GROUPS == 12
    width = CLUSTER_SLOTS / ITEM_GROUPS
    for n in range(200):
        ns = f"mtrank:{n:012x}" if n else NS
        slots = [key_slot(item_key(ns, i).encode()) for i in _one_id_per_group()]
        assert [int(s // width) for s in slots] == list(range(ITEM_GROUPS))
        assert all(width / 4 - 1 <= s % width < width * 3 / 4 for s in slots), (ns, slots)
        for masters in (2, 3, 4, 5, 6, 8, 12):
            per = [sum(lo <= s <= hi for s in slots) for lo, hi in _cluster_create_ranges(masters)]
            assert max(per) - min(per) <= (0 if ITEM_GROUPS % masters == 0 else 1), (ns, masters, per)


def _cluster_create_ranges(masters: int) -> list[tuple[int, int]]:
    """The slot ranges `redis-cli --cluster create` gives ``masters`` masters (its own rounding)."""
    per, first, cursor, out = CLUSTER_SLOTS / masters, 0, 0.0, []
    for m in range(masters):
        last = CLUSTER_SLOTS - 1 if m == masters - 1 else round(cursor + per - 1)
        out.append((first, last))
        first, cursor = last + 1, cursor + per
    return out


def _one_id_per_group() -> list[str]:
    ids: dict[int, str] = {}
    for i in range(10_000):
        ids.setdefault(item_group(str(i)), str(i))
        if len(ids) == ITEM_GROUPS:
            return [ids[k] for k in range(ITEM_GROUPS)]
    raise AssertionError("some group has no id")


def test_item_group_is_stable():
    """Writers and readers on other machines and Python versions must agree: crc32, not hash()."""
    assert [item_group(i) for i in ("", "0", "item-1", "é")] == [0, 5, 9, 2]


def test_positions_by_slot_follow_redis_cluster_rules():
    """Every key lands in its own slot whatever its braces (the head cache must never misplace one)."""
    odd = ["plain", "{}", "{}x", "x{}", "{", "}", "}{", "a{b}c", "a{b}c}", "a{{b}}", "{a}{b}", "x}{y}",
           "a{", "a{}b{c}", "ns:i:{t.1}", "ns:i:{t.1}:", "ns:i:{t.1", "ns:i:{t.1}x}"]
    rnd = random.Random(5)
    keys = [user_key(NS, "u1"), meta_key(NS), *item_keys(NS, [str(rnd.random()) for _ in range(300)]), *odd]
    for _ in range(2):  # the second time from the head cache
        keys = keys[::-1]
        groups = _positions_by_slot(keys)
        assert sorted(p for ps in groups.values() for p in ps) == list(range(len(keys)))
        for slot, positions in groups.items():
            assert {key_slot(keys[p].encode()) for p in positions} == {slot}
    item_slots = {s for s, ps in _positions_by_slot(item_keys(NS, [str(i) for i in range(2000)])).items()}
    assert len(item_slots) == ITEM_GROUPS
