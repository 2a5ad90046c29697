"""The small reference dataset spec and exposure log that the dataset and spec tests share."""

import pandas as pd

SPEC = {
    "name": "mine",
    "exposures": {"path": "log.csv", "user_key": "uid", "item_key": "iid", "time": "t"},
    "features": [
        {"name": "user_id", "entity": "user", "kind": "sparse", "column": "uid"},
        {"name": "age", "entity": "user", "kind": "dense"},
        {"name": "recent", "entity": "user", "kind": "sequence", "max_len": 3, "vocab_of": "item_id"},
        {"name": "item_id", "entity": "item", "kind": "sparse", "column": "iid"},
        {"name": "device", "entity": "context", "kind": "sparse"},
    ],
    "tasks": [
        {"name": "ctr", "kind": "binary", "label": "click"},
        {"name": "cvr", "kind": "binary", "label": "buy", "condition": "ctr"},
    ],
}


def reference_log() -> pd.DataFrame:
    """Six exposures of three users: a missing dense value, an empty and an out-of-vocabulary sequence."""
    return pd.DataFrame({
        "uid": [1, 1, 2, 3, 3, 3],
        "iid": ["a", "b", "a", "c", "a", "b"],
        "t": [5, 1, 2, 3, 4, 6],
        "age": [20.0, 20.0, None, 40.0, 40.0, 40.0],
        "recent": ["a|b|c|a", "a|b|c|a", "", "c", "c", "b|zzz"],
        "device": ["ios", "web", "ios", "ios", "android", "ios"],
        "click": [1, 0, 1, 1, 0, 1],
        "buy": [1, 0, 0, 1, 0, 0],
    })
