"""The dataset spec is validated completely when loaded: each problem is one line naming the field.
Plus the CSV options (separator, no header) and a user's own tabular data set, end to end."""

import copy

import numpy as np
import pandas as pd
import pytest
import yaml

from service.contract import MANIFEST_FILE, BundleManifest
from tests.support.specs import SPEC, reference_log
from training.data.dataset import prepare
from training.data.spec import SpecError, load_spec

LOG = reference_log()


@pytest.fixture
def data_dir(tmp_path):
    LOG.to_csv(tmp_path / "log.csv", index=False)
    LOG.to_parquet(tmp_path / "log.parquet")
    return tmp_path


def write(d, spec) -> None:
    (d / "dataset.yaml").write_text(yaml.safe_dump(spec) if not isinstance(spec, str) else spec)


def edit(**changes):
    """SPEC with changes: {"features.3.kind": "x"} sets a nested value; value DELETE removes it."""
    spec = copy.deepcopy(SPEC)
    for path, value in changes.items():
        *parents, last = [int(p) if p.isdigit() else p for p in path.split("__")]
        node = spec
        for p in parents:
            node = node[p]
        if value is DELETE:
            del node[last]
        else:
            node[last] = value
    return spec


DELETE = object()

CASES = {
    "bad kind": (edit(features__3__kind="categorical"), "spec.features[3].kind: Input should be"),
    "unknown top-level key": (edit(featurs=[]), "spec.featurs: unknown key"),
    "unknown feature key": (edit(features__0__colum="uid"), "spec.features[0].colum: unknown key"),
    "unknown task key": (edit(tasks__1__conditon="ctr"), "spec.tasks[1].conditon: unknown key"),
    "wrong type": (edit(features__1__embedding_dim="big"), "spec.features[1].embedding_dim: Input should be"),
    "not a list": (edit(features={"item_id": "sparse"}), "spec.features: Input should be a valid list"),
    "missing key": (edit(exposures__item_key=DELETE), "spec.exposures.item_key: Field required"),
    "bad entity": (edit(features__4__entity="session"), "spec.features[4].entity: Input should be"),
    "bad task kind": (edit(tasks__0__kind="ranking"), "spec.tasks[0].kind: Input should be"),
    "duplicate feature": (edit(features__4__name="age"), "spec.features[4].name: duplicate feature name 'age'"),
    "duplicate task": (edit(tasks__1__name="ctr", tasks__1__condition=DELETE),
                       "spec.tasks[1].name: duplicate task name 'ctr'"),
    "no item feature": (edit(features=[f for f in SPEC["features"] if f["entity"] != "item"]
                             + [{"name": "item_id", "entity": "user", "kind": "sparse", "column": "iid"}]),
                        "spec.features: no item feature"),
    "sequence without max_len": (edit(features__2__max_len=DELETE),
                                 "spec.features[2].max_len: a sequence feature needs"),
    "vocab_of not sparse": (edit(features__2__vocab_of="age"), "spec.features[2].vocab_of: 'age' is not a sparse"),
    "max_len on sparse": (edit(features__0__max_len=4), "spec.features[0].max_len: only a sequence feature"),
    "zero embedding_dim": (edit(features__0__embedding_dim=0),
                           "spec.features[0].embedding_dim: Input should be greater"),
    "no tasks": (edit(tasks=[]), "spec.tasks: at least one task"),
    "condition not a task": (edit(tasks__1__condition="ctx"), "spec.tasks[1].condition: 'ctx' must name another"),
    "condition on itself": (edit(tasks__1__condition="cvr"), "spec.tasks[1].condition: 'cvr' must name another"),
    "condition chain": (edit(tasks=SPEC["tasks"]
                             + [{"name": "x", "kind": "binary", "label": "buy", "condition": "cvr"}]),
                        "spec.tasks[2].condition: 'cvr' has a condition itself"),
    "per-exposure users with a users table": (edit(user_features_per_exposure=True,
                                                   users={"path": "log.csv", "key": "uid"}), "spec.users: "),
    "label not a column": (edit(tasks__1__label="like"), "spec.tasks[1].label: no column 'like' in the exposures"),
    "feature not a column": (edit(features__1__name="height"), "spec.features[1].name: no column 'height'"),
    "feature column not a column": (edit(features__3__column="item"), "spec.features[3].column: no column 'item'"),
    "key not a column": (edit(exposures__user_key="user"), "spec.exposures.user_key: no column 'user'"),
    "time not a column": (edit(exposures__time="ts"), "spec.exposures.time: no column 'ts'"),
    "items key not a column": (edit(items={"path": "log.csv", "key": "item"}),
                               "spec.items.key: no column 'item' in the items"),
    "no such file": (edit(exposures__path="nope.csv"), "spec.exposures.path: no such file"),
    "unsupported format": (edit(exposures__path="log.json"), "spec.exposures.path: unsupported table format '.json'"),
    "no header, no columns": (edit(exposures__header=False), "spec.exposures.columns: a table without a header"),
    "columns with a header": (edit(exposures__columns=["a"]), "spec.exposures.columns: the table has a header"),
    "sep on parquet": (edit(exposures__path="log.parquet", exposures__sep=";"), "spec.exposures.sep: only a CSV table"),
    "duplicate column": (edit(exposures__header=False, exposures__columns=["uid", "iid", "uid"]),
                         "spec.exposures.columns[2]: duplicate column name 'uid'"),
    "column count": (edit(exposures__header=False, exposures__columns=list(LOG.columns)[:-1]),
                     "spec.exposures.columns: 7 names, but the first line of log.csv has 8 fields"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_spec_problem_is_one_line_naming_the_field(case, data_dir):
    spec, expected = CASES[case]
    write(data_dir, spec)
    with pytest.raises(SpecError) as e:
        load_spec(data_dir)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"dataset spec {data_dir / 'dataset.yaml'}: ")
    assert expected in msg


def test_the_reference_spec_loads(data_dir):
    write(data_dir, SPEC)
    spec = load_spec(data_dir)
    assert [f.name for f in spec.features] == [f["name"] for f in SPEC["features"]]
    assert spec.exposures.separator == "," and spec.exposures.header


def test_every_problem_is_named(data_dir):
    write(data_dir, edit(features__3__kind="categorical", tasks__0__kind="ranking"))
    with pytest.raises(SpecError, match=r"spec\.features\[3\]\.kind: .*; spec\.tasks\[0\]\.kind: "):
        load_spec(data_dir)


@pytest.mark.parametrize("text, expected", [
    ("name: [unclosed", "not valid YAML at line 1"),
    ("- a\n- b\n", "spec: expected a mapping"),
    ("", "spec: expected a mapping"),
])
def test_unreadable_spec_files(data_dir, text, expected):
    write(data_dir, text)
    with pytest.raises(SpecError, match=expected):
        load_spec(data_dir)
    with pytest.raises(SpecError, match="cannot read it"):
        load_spec(data_dir / "missing.yaml")


@pytest.mark.parametrize("name, sep", [("log.tsv", None), ("log.txt.csv", ";")])
def test_csv_without_header_and_own_separator(data_dir, name, sep):
    """The same rows as a TSV without header (columns named in the spec) and a ';'-separated CSV
    without header encode exactly as the comma-separated file with a header."""
    write(data_dir, SPEC)
    want = prepare(data_dir)
    LOG.to_csv(data_dir / name, sep=sep or "\t", header=False, index=False)
    (data_dir / "log.csv").unlink()  # nothing can be read from the old file by mistake
    exposures = dict(SPEC["exposures"], path=name, header=False, columns=list(LOG.columns))
    if sep:
        exposures["sep"] = sep
    write(data_dir, dict(SPEC, exposures=exposures))
    spec = load_spec(data_dir)
    assert spec.exposures.separator == (sep or "\t")
    got = prepare(spec)
    assert got.vocabs == want.vocabs and got.schema == want.schema
    for key in ("sparse", "dense", "seq"):
        np.testing.assert_array_equal(getattr(got.users, key), getattr(want.users, key))
        np.testing.assert_array_equal(getattr(got.items, key), getattr(want.items, key))
    np.testing.assert_array_equal(got.context["sparse"], want.context["sparse"])
    for label in ("click", "buy"):
        np.testing.assert_array_equal(got.labels[label], want.labels[label])
    np.testing.assert_array_equal(got.time, want.time)


def test_users_table_without_header(data_dir):
    users = pd.DataFrame({"u": [1, 2, 3], "age": [21.0, 22.0, 23.0]})
    users.to_csv(data_dir / "users.tsv", sep="\t", header=False, index=False)
    spec = edit(users={"path": "users.tsv", "key": "u", "header": False, "columns": ["u", "age"]},
                features=[f for f in SPEC["features"] if f["name"] in ("age", "item_id")])
    write(data_dir, spec)
    ds = prepare(data_dir)
    assert list(ds.users.ids) == ["1", "2", "3"]
    np.testing.assert_allclose(ds.users.dense[:, 0], [21.0, 22.0, 23.0])


# ---------------------------------------------------------------- a user's own tabular data set

def tabular(d, n=3000, seed=0):
    """40 columns: a row id, an item id, 18 dense and 18 categorical columns, two binary labels
    (click, like) that depend on a few of them. No user or item structure beyond the item id."""
    rng = np.random.default_rng(seed)
    cols = {"row": np.arange(n), "ad": rng.integers(0, 50, n)}
    for i in range(18):
        cols[f"x{i}"] = rng.normal(size=n).round(4)
    for i in range(18):
        cols[f"c{i}"] = rng.choice(["a", "b", "c", "d"], n)
    score = cols["x0"] + (cols["c0"] == "a") + 0.02 * cols["ad"]
    cols["click"] = (score + rng.normal(size=n) > 0.5).astype(int)
    cols["like"] = (cols["x1"] + rng.normal(size=n) > 1.0).astype(int)
    df = pd.DataFrame(cols)
    assert df.shape[1] == 40
    df.to_csv(d / "table.tsv", sep="\t", header=False, index=False)
    spec = {
        "name": "tabular",
        "exposures": {"path": "table.tsv", "header": False, "columns": list(df.columns),
                      "user_key": "row", "item_key": "ad"},
        "features": [{"name": "ad", "entity": "item", "kind": "sparse"}]
        + [{"name": f"x{i}", "entity": "context", "kind": "dense"} for i in range(18)]
        + [{"name": f"c{i}", "entity": "context", "kind": "sparse", "embedding_dim": 4} for i in range(18)],
        "tasks": [{"name": "click", "kind": "binary", "label": "click"},
                  {"name": "like", "kind": "binary", "label": "like"}],
    }
    write(d, spec)
    return spec


def test_tabular_spec_without_item_feature_fails_at_load(tmp_path):
    spec = tabular(tmp_path)
    spec["features"] = spec["features"][1:]
    write(tmp_path, spec)
    with pytest.raises(SpecError, match=r"spec\.features: no item feature.*column: ad"):
        load_spec(tmp_path)


@pytest.mark.parametrize("command", [["train"], ["features", "load"]])
def test_cli_reports_a_bad_spec_in_one_line(tmp_path, command):
    import subprocess
    import sys
    from pathlib import Path

    spec = tabular(tmp_path)
    spec["features"] = spec["features"][1:]
    write(tmp_path, spec)
    mtrank = Path(sys.executable).with_name("mtrank")
    r = subprocess.run([str(mtrank), *command, "--data", str(tmp_path), "--store", str(tmp_path / "store"), "--quiet"],
                       capture_output=True, text=True, timeout=120)
    # train: the spec fails at load; features load: the empty store has no bundle to load features for
    want = "spec.features: no item feature" if command == ["train"] else "no bundle versions of 'demo'"
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and want in lines[0], r.stderr


def test_tabular_data_set_trains_and_exports(tmp_path):
    pytest.importorskip("torch")
    from training.train import TrainConfig, train

    tabular(tmp_path)
    bundle, metrics = train(tmp_path, name="tab", store=tmp_path / "store",
                            cfg=TrainConfig(arch="mmoe", epochs=1, batch_size=512, threads=1), progress=False)
    manifest = BundleManifest.model_validate_json((bundle / MANIFEST_FILE).read_text())
    assert [t.name for t in manifest.tasks] == ["click", "like"]
    assert len(manifest.feature_schema.dense) == 18 and len(manifest.feature_schema.sparse) == 19
    assert 0.0 <= metrics["auc/click"] <= 1.0 and 0.0 <= metrics["auc/like"] <= 1.0
    assert metrics["auc/click"] > 0.6  # it learned something from x0, c0 and the ad
