"""The event -> sequence mapping of the dataset spec and the contract: validated where it is written,
carried into the bundle's schema, and left out of the JSON (and the fingerprint) when unset."""

from __future__ import annotations

import copy

import pytest
import yaml
from pydantic import ValidationError

from service.contract import SequenceField
from tests.support.bundles import make_schema
from tests.support.specs import SPEC, reference_log
from training.data.dataset import prepare
from training.data.spec import SpecError, load_spec
from training.data.synth import dataset_spec as synth_spec


def spec_dir(tmp_path, **feature_changes):
    spec = copy.deepcopy(SPEC)
    for i, change in feature_changes.items():
        spec["features"][int(i.removeprefix("f"))].update(change)
    reference_log().to_csv(tmp_path / "log.csv", index=False)
    (tmp_path / "dataset.yaml").write_text(yaml.safe_dump(spec))
    return tmp_path


def test_a_user_sequence_names_its_event_and_training_carries_it_into_the_schema(tmp_path):
    ds = prepare(spec_dir(tmp_path, f2={"event": "click"}))
    assert ds.schema.field("recent").event == "click"


@pytest.mark.parametrize("i, change, words", [
    ("f2", {"event": "like"}, "spec.features[2].event: Input should be 'impression', 'click', 'conversion' or 'watch'"),
    ("f1", {"event": "click"}, "spec.features[1].event: only a user sequence follows an event"),
])
def test_a_wrong_event_is_one_line_naming_the_field(tmp_path, i, change, words):
    with pytest.raises(SpecError) as e:
        load_spec(spec_dir(tmp_path, **{i: change}))
    assert words in str(e.value)


def test_the_contract_refuses_an_event_on_an_item_sequence():
    with pytest.raises(ValidationError, match="only a user sequence follows an event"):
        type(make_schema()).model_validate(
            {**make_schema().model_dump(), "sequence": [{"name": "s", "entity": "item", "max_len": 2,
                                                          "vocab_of": "item_id", "event": "click"}]})


def test_unset_event_keeps_the_json_of_older_schemas_and_no_mapping_moves_the_namespace(ev_schema):
    plain = SequenceField(name="s", entity="user", max_len=2, vocab_of="item_id")
    assert "event" not in plain.model_dump() and "event" not in plain.model_dump_json()
    # the fingerprint covers the stored bytes only (contract.FeatureSchema.storage_layout): which
    # events feed a sequence changes none of them, so the features stay where they are
    assert make_schema().fingerprint() == ev_schema.fingerprint()
    assert make_schema().model_dump() != ev_schema.model_dump(), "the mapping is part of the schema"
    watch = SequenceField(name="s", entity="user", max_len=2, vocab_of="x", event="watch")
    assert SequenceField.model_validate_json(watch.model_dump_json()) == watch


def test_the_synthetic_spec_feeds_clicks_and_conversions():
    events = {f.name: f.event for f in synth_spec().features if f.kind == "sequence"}
    assert events == {"clicked_items": "click", "converted_items": "conversion"}
