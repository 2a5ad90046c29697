"""Packed-bytes encoding of one entity's features (the value of one Redis key).

Layout of a value, little-endian, fixed size for a given schema and entity::

    b"MT" | uint8 format version (FORMAT_VERSION) | uint8 reserved (0)
    int32  x n_sparse       sparse indices, in schema order
    float32 x n_dense        raw dense values, in schema order
    int32  x sum(max_len)    sequence ids, each field padded with 0 to its max_len

Because every value of an entity has the same size, a whole MGET reply decodes with one
``np.frombuffer`` over the joined bytes. A value of the wrong size or header is treated like a
missing one (schema defaults), never an error. A dense NaN (how the loader stores a missing
value) decodes to the reading model's default (its mean).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from service.contract import CODEC_FORMAT_VERSION, Entity, FeatureSchema

MAGIC = b"MT"
FORMAT_VERSION = CODEC_FORMAT_VERSION  # the number lives in the contract (the fingerprint covers it)
HEADER = MAGIC + bytes([FORMAT_VERSION, 0])


@dataclass(frozen=True)
class EntityCodec:
    """Encoder/decoder of one entity's packed values for one schema."""

    entity: Entity
    n_sparse: int
    n_dense: int
    seq_width: int
    dense_defaults: np.ndarray  # float32 [n_dense]
    sparse_vocab: np.ndarray  # int64 [n_sparse]: ids at or above it are out of range
    seq_vocab: np.ndarray  # int64 [seq_width]

    @classmethod
    def for_schema(cls, schema: FeatureSchema, entity: Entity) -> EntityCodec:
        vocab = {f.name: f.vocab_size for f in schema.sparse}
        return cls(
            entity=entity,
            n_sparse=len(schema.sparse_of(entity)),
            n_dense=len(schema.dense_of(entity)),
            seq_width=sum(f.max_len for f in schema.sequence_of(entity)),
            dense_defaults=np.array([f.default for f in schema.dense_of(entity)], dtype=np.float32),
            sparse_vocab=np.array([f.vocab_size for f in schema.sparse_of(entity)], dtype=np.int64),
            # vocab_of names a sparse field (FeatureSchema checks it)
            seq_vocab=np.array([vocab[f.vocab_of] for f in schema.sequence_of(entity) for _ in range(f.max_len)],
                               dtype=np.int64),
        )

    @property
    def dtype(self) -> np.dtype:
        return np.dtype([
            ("header", "S4"),
            ("sparse", "<i4", (self.n_sparse,)),
            ("dense", "<f4", (self.n_dense,)),
            ("seq", "<i4", (self.seq_width,)),
        ])

    @property
    def size(self) -> int:
        return self.dtype.itemsize

    def encode(self, sparse: np.ndarray, dense: np.ndarray, seq: np.ndarray) -> list[bytes]:
        """Pack n entities: sparse int [n, n_sparse], dense float [n, n_dense], seq int [n, seq_width]."""
        n = len(sparse) if self.n_sparse else len(dense) if self.n_dense else len(seq)
        rec = np.zeros(n, dtype=self.dtype)
        rec["header"] = HEADER
        if self.n_sparse:
            rec["sparse"] = np.asarray(sparse).reshape(n, self.n_sparse)
        if self.n_dense:
            rec["dense"] = np.asarray(dense).reshape(n, self.n_dense)
        if self.seq_width:
            rec["seq"] = np.asarray(seq).reshape(n, self.seq_width)
        raw = rec.tobytes()
        s = self.size
        return [raw[i * s:(i + 1) * s] for i in range(n)]

    def decode(self, values: list[bytes | None]) -> Decoded:
        """Decode an MGET reply. Missing or malformed values get the schema defaults.

        Returns whole arrays (int64 ids, float32 dense) and the masks of which values were
        missing and which were present but malformed (corrupt)."""
        n = len(values)
        size = self.size
        present = np.fromiter((v is not None for v in values), dtype=bool, count=n)
        ok = np.fromiter((v is not None and len(v) == size and v[:4] == HEADER for v in values), dtype=bool, count=n)
        sparse = np.zeros((n, self.n_sparse), dtype=np.int64)
        dense = np.empty((n, self.n_dense), dtype=np.float32)
        dense[:] = self.dense_defaults
        seq = np.zeros((n, self.seq_width), dtype=np.int64)
        if ok.any():
            good = b"".join(v for v, is_ok in zip(values, ok, strict=True) if is_ok and v is not None)
            rec = np.frombuffer(good, dtype=self.dtype)
            sparse[ok] = rec["sparse"]
            dense[ok] = rec["dense"]
            seq[ok] = rec["seq"]
            # an id outside its vocabulary can only come from a bad writer: make it OOV (0)
            sparse[(sparse < 0) | (sparse >= self.sparse_vocab)] = 0
            seq[(seq < 0) | (seq >= self.seq_vocab)] = 0
            bad_dense = ~np.isfinite(dense)
            if bad_dense.any():
                dense[bad_dense] = np.broadcast_to(self.dense_defaults, dense.shape)[bad_dense]
        return Decoded(sparse=sparse, dense=dense, seq=seq, missing=~present, corrupt=present & ~ok)


@dataclass(frozen=True)
class Decoded:
    sparse: np.ndarray  # int64 [n, n_sparse]
    dense: np.ndarray  # float32 [n, n_dense]
    seq: np.ndarray  # int64 [n, seq_width]
    missing: np.ndarray  # bool [n]: no value in Redis
    corrupt: np.ndarray  # bool [n]: a value that did not decode (defaults used)
