"""Small shared test material: the standard three tasks and a tiny feature schema."""

from service.contract import (
    DenseField,
    FeatureSchema,
    SequenceField,
    SparseField,
    TaskSpec,
)

TASKS = [TaskSpec(name="ctr", kind="binary", label="click"),
         TaskSpec(name="cvr", kind="binary", label="conversion", condition="ctr"),
         TaskSpec(name="watch_time", kind="regression", label="watch_time", condition="ctr")]


def tiny_schema() -> FeatureSchema:
    """User, item and context fields of every kind, a behaviour sequence sharing item_id."""
    return FeatureSchema(
        sparse=[SparseField(name="user_id", entity="user", vocab_size=50),
                SparseField(name="gender", entity="user", vocab_size=4, embedding_dim=4),
                SparseField(name="item_id", entity="item", vocab_size=100),
                SparseField(name="category", entity="item", vocab_size=10, embedding_dim=8),
                SparseField(name="hour", entity="context", vocab_size=25, embedding_dim=4)],
        dense=[DenseField(name="activity", entity="user", mean=3.0, std=2.0),
               DenseField(name="price", entity="item", mean=10.0, std=5.0),
               DenseField(name="age_days", entity="item", mean=30.0, std=10.0)],
        sequence=[SequenceField(name="clicked", entity="user", max_len=5, vocab_of="item_id")],
    )

