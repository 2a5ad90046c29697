"""Synthetic multi-task exposure logs for a recommendation ranker (what ``mtrank synth`` writes).

The generative story, top to bottom (every label shares one affinity, so the tasks correlate):

* users: a latent taste ``u`` (``dim`` numbers) shifted by age bucket, gender and region, so the
  side features are predictive of taste; ``activity`` (log-normal) drives how many exposures a
  user gets and a click bias; ``tenure_days`` nudges conversion; each user prefers some devices.
* items: categories have centroids and an item's latent ``v`` is its category's centroid plus
  noise; creators own a main category and a quality level; exposure weight is Zipf-like over a
  quality-driven ranking, and ``popularity`` is the log of the views that weight gave before.
* exposures: half come from a popularity feed, half from a personalised feed (category from a
  softmax over the user's category affinity and the category's mass, then an item by popularity
  within it); timestamps over ``days`` days with a diurnal profile; device from the user's mix.
* labels: ``a = <u, v>/sqrt(dim) + user bias + item bias + hour effect + device effect``::

      click            ~ Bernoulli(sigmoid(a + c0))                       c0 set for target_ctr
      conversion|click ~ Bernoulli(sigmoid(0.8 a + quality - price + tenure + device + 0.8 e + c1))
      watch_time|click = clip(exp(log duration - 1.2 + 0.4 a + 0.2 quality + 0.5 e + 0.7 N), 1, 3 duration)

  where ``e`` is an unobserved per-exposure engagement shared by conversion and watch time.
* history: a per-user snapshot taken *before* the logged window: the same model run over a
  prior feed (more of it for active users); the last ``max_clicked`` clicked and
  ``max_converted`` converted item ids, most recent first, become ``clicked_items`` and
  ``converted_items``. Nothing in it comes from the logged labels.

``user_id`` and ``item_id`` start at 1; all other categorical values start at 0.
Everything is vectorised numpy driven by one ``np.random.default_rng(cfg.seed)``, so the same
config gives byte-identical files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from service.contract import TaskSpec
from training.data.spec import DatasetSpec, EntityTable, ExposureTable, FeatureSpec, dump_spec


@dataclass
class SynthConfig:
    n_users: int = 20_000
    n_items: int = 50_000
    n_exposures: int = 1_000_000
    seed: int = 7
    dim: int = 16                   # latent taste dimension
    n_categories: int = 150
    n_creators: int = 3_000         # capped at n_items // 10 for small item counts
    n_regions: int = 50
    n_age_buckets: int = 7
    start: str = "2026-01-01"       # UTC day the logged window starts
    days: int = 14
    target_ctr: float = 0.07        # overall click rate
    target_cvr: float = 0.15        # conversion rate among clicks
    personalised: float = 0.5       # share of exposures (and prior feed) from the personalised feed
    zipf: float = 1.0               # exponent of the item exposure weight, rank ** -zipf
    history_candidates: int = 256   # max prior-feed items per user for the sequence snapshot
    history_per_activity: float = 60.0  # prior-feed items seen per unit of activity
    max_clicked: int = 20
    max_converted: int = 10
    chunk: int = 250_000            # rows per vectorised step (memory bound)


DEVICES = ("ios", "android", "web")
GENDERS = ("f", "m", "x")
DEVICE_CLICK = np.array([0.10, 0.0, -0.30])        # per-device click bias
DEVICE_CONV = np.array([0.25, 0.0, 0.15])          # per-device conversion bias
HOURS = np.arange(24)
HOUR_TRAFFIC = 1.0 + 0.8 * np.cos(2 * np.pi * (HOURS - 20) / 24)   # evening peak, night trough
HOUR_CLICK = 0.20 * np.cos(2 * np.pi * (HOURS - 21) / 24)          # people click more at night


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _calibrate(logit, target, iters=40):
    """The offset ``c`` with ``mean(sigmoid(logit + c)) == target`` (bisection; monotone in c)."""
    logit = logit[:200_000]  # rows are in random order: a prefix is a fair sample
    lo, hi = -30.0, 30.0
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _sigmoid(logit + mid).mean() < target else (lo, mid)
    return (lo + hi) / 2


def _zipf_p(n, s, shift=1.0):
    p = (np.arange(n) + shift) ** -s
    return p / p.sum()


# ----------------------------------------------------------------------------- users and items

def _users(cfg, rng):
    n, d = cfg.n_users, cfg.dim
    age = rng.choice(cfg.n_age_buckets, n, p=_zipf_p(cfg.n_age_buckets, 0.3))
    gender = rng.choice(3, n, p=[0.48, 0.48, 0.04])
    region = rng.choice(cfg.n_regions, n, p=_zipf_p(cfg.n_regions, 0.8, shift=3.0))
    activity = np.exp(rng.normal(0.5, 0.7, n))
    tenure = rng.exponential(400.0, n)
    # taste: personal noise + shifts shared by everyone of the same age / gender / region
    shift = (rng.normal(0, 0.7, (cfg.n_age_buckets, d))[age] + rng.normal(0, 0.5, (3, d))[gender]
             + rng.normal(0, 0.3, (cfg.n_regions, d))[region])
    u = (rng.normal(0, 0.7, (n, d)) + shift).astype(np.float32)
    # device mix: a concentrated Dirichlet per user, older users lean to the web
    alpha = np.stack([1.0 - 0.08 * age, np.ones(n), 0.15 + 0.2 * age], 1) * 0.6
    dev_p = rng.gamma(alpha)
    dev_cdf = np.cumsum(dev_p / dev_p.sum(1, keepdims=True), 1)
    return dict(age=age, gender=gender, region=region, activity=activity, tenure=tenure, u=u,
                dev_cdf=dev_cdf, bias=0.3 * (np.log(activity) - 0.5),
                conv_bias=0.2 * np.log1p(tenure / 365.0))


def _items(cfg, rng):
    n, d, n_cat = cfg.n_items, cfg.dim, cfg.n_categories
    n_creators = max(1, min(cfg.n_creators, n // 10))
    cat_p = _zipf_p(n_cat, 0.8, shift=5.0)
    creator_cat = rng.choice(n_cat, n_creators, p=cat_p)
    creator_q = rng.normal(0, 0.4, n_creators)
    creator = rng.choice(n_creators, n, p=_zipf_p(n_creators, 0.9, shift=2.0))
    category = np.where(rng.random(n) < 0.85, creator_cat[creator], rng.choice(n_cat, n, p=cat_p))
    centroids = rng.normal(0, 1.0, (n_cat, d)).astype(np.float32)
    v = centroids[category] + rng.normal(0, 0.6, (n, d)).astype(np.float32)
    quality = creator_q[creator] + rng.normal(0, 0.5, n)
    duration = np.clip(np.exp(rng.normal(np.log(90), 0.8, n_cat)[category] + rng.normal(0, 0.5, n)), 5, 3600)
    log_price = rng.normal(np.log(30), 0.9, n_cat)[category] + rng.normal(0, 0.5, n)
    price = np.round(np.clip(np.exp(log_price), 0.99, 5000), 2)
    age_days = rng.exponential(120.0, n)
    # exposure weight: Zipf over a ranking that better items tend to top
    rank = np.empty(n, np.int64)
    rank[np.argsort(-(quality + rng.normal(0, 1.0, n)), kind="stable")] = np.arange(n)
    w = (rank + 1.0) ** -cfg.zipf
    log_w = np.log(w)
    views = w / w.sum() * n * 500 * np.exp(rng.normal(0, 0.3, n)) * (1 - np.exp(-(age_days + 1) / 30))
    bias = (0.4 * quality + 0.15 * (log_w - log_w.mean()) / log_w.std()
            + 0.3 * np.exp(-age_days / 7))  # fresh items get a boost
    conv_bias = 0.5 * quality - 0.6 * (log_price - log_price.mean()) / log_price.std()
    return dict(category=category, creator=creator, centroids=centroids, v=v, quality=quality,
                duration=duration, price=price, age_days=age_days, w=w, popularity=np.log1p(views),
                bias=bias, conv_bias=conv_bias)


class _Feed:
    """Samples the items a user is shown: popularity feed or personalised (category then item)."""

    def __init__(self, cfg, users, items):
        self.cfg, n_cat = cfg, cfg.n_categories
        cat = items["category"]
        self.order = np.argsort(cat, kind="stable")           # items grouped by category
        self.cum = np.cumsum(items["w"][self.order])
        counts = np.bincount(cat, minlength=n_cat)
        self.ends = np.cumsum(counts)
        self.starts = self.ends - counts
        self.lo = np.where(self.starts > 0, self.cum[np.maximum(self.starts - 1, 0)], 0.0)
        mass = np.where(counts > 0, self.cum[np.maximum(self.ends - 1, 0)] - self.lo, 0.0)
        # per-user category distribution: taste affinity + log category mass
        aff = np.einsum("ud,cd->uc", users["u"], items["centroids"]) / np.sqrt(cfg.dim)
        logits = aff + np.log(np.maximum(mass, 1e-300))
        logits[:, counts == 0] = -np.inf
        p = np.exp(logits - logits.max(1, keepdims=True))
        cdf = np.cumsum(p / p.sum(1, keepdims=True), 1)
        cdf[:, -1] = 1.0
        self.flat_cdf = (cdf + np.arange(cfg.n_users)[:, None]).ravel()  # one sorted array

    def sample(self, uid, rng):
        n, n_cat = len(uid), self.cfg.n_categories
        personal = rng.random(n) < self.cfg.personalised
        r1, r2 = rng.random(n), rng.random(n)
        cat = np.searchsorted(self.flat_cdf, uid + r1, side="right") - uid * n_cat
        cat = np.clip(cat, 0, n_cat - 1)
        x = np.where(personal, self.lo[cat] + r2 * (self.cum[self.ends[cat] - 1] - self.lo[cat]),
                     r2 * self.cum[-1])
        pos = np.searchsorted(self.cum, x, side="right")
        pos = np.where(personal, np.clip(pos, self.starts[cat], self.ends[cat] - 1),
                       np.minimum(pos, len(self.cum) - 1))
        return self.order[pos]


def _affinity(cfg, users, items, uid, iid):
    taste = np.einsum("nd,nd->n", users["u"][uid], items["v"][iid]) / np.sqrt(cfg.dim)
    return taste + users["bias"][uid] + items["bias"][iid]


def _conv_logit(users, items, uid, iid, a, e):
    return 0.8 * a + items["conv_bias"][iid] + users["conv_bias"][uid] + 0.8 * e


# ----------------------------------------------------------------------------- ground truth

#: the generator's hidden state, written beside the data for ``mtrank simulate``
TRUTH_DIR = "truth"
_TRUTH_ARRAYS = {"users": ("u", "bias", "conv_bias", "dev_cdf", "activity"),
                 "items": ("v", "bias", "conv_bias", "quality", "duration", "w")}


def save_truth(path: Path, cfg: SynthConfig, users: dict, items: dict, **scalars: float) -> None:
    """The latent tastes, biases and offsets that drew the labels (``.npy`` files: byte-identical
    for one config, like the data), so a simulator can draw new outcomes from the same world."""
    path.mkdir(parents=True, exist_ok=True)
    for entity, names in _TRUTH_ARRAYS.items():
        source = users if entity == "users" else items
        for name in names:
            np.save(path / f"{entity}_{name}.npy", np.asarray(source[name]))
    (path / "scalars.json").write_text(json.dumps({"dim": cfg.dim, **scalars}, sort_keys=True) + "\n")


class Truth:
    """The world of one synthetic data set: who clicks, converts and watches what, with which probability."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if not (path / "scalars.json").is_file():
            raise FileNotFoundError(f"{path} holds no ground truth: generate the data with `mtrank synth`")
        arrays = {f"{e}_{n}": np.load(path / f"{e}_{n}.npy") for e, ns in _TRUTH_ARRAYS.items() for n in ns}
        self.users = {n: arrays[f"users_{n}"] for n in _TRUTH_ARRAYS["users"]}
        self.items = {n: arrays[f"items_{n}"] for n in _TRUTH_ARRAYS["items"]}
        scalars = json.loads((path / "scalars.json").read_text())
        self.dim, self.c0, self.c1 = int(scalars["dim"]), scalars["c0"], scalars["c1"]
        self.a_click_mean = scalars["a_click_mean"]

    @property
    def n_users(self) -> int:
        return len(self.users["bias"])

    @property
    def n_items(self) -> int:
        return len(self.items["bias"])

    def affinity(self, uid, iid, hour, dev) -> np.ndarray:
        """``a`` of the module doc for 0-based user and item indices (arrays broadcast)."""
        taste = np.einsum("...d,...d->...", self.users["u"][uid], self.items["v"][iid]) / np.sqrt(self.dim)
        return (taste + self.users["bias"][uid] + self.items["bias"][iid] + HOUR_CLICK[hour]
                + DEVICE_CLICK[dev])

    def p_click(self, uid, iid, hour, dev) -> np.ndarray:
        return _sigmoid(self.affinity(uid, iid, hour, dev) + self.c0)

    def outcomes(self, rng: np.random.Generator, uid, iid, hour, dev):
        """Draw (p_click, click, conversion, watch seconds) for one user shown ``iid``, as the
        generator drew its labels."""
        a = self.affinity(uid, iid, hour, dev)
        p = _sigmoid(a + self.c0)
        click = rng.random(len(iid)) < p
        e = rng.standard_normal(len(iid))
        conv_logit = _conv_logit(self.users, self.items, uid, iid, a, e) + DEVICE_CONV[dev] + self.c1
        conversion = click & (rng.random(len(iid)) < _sigmoid(conv_logit))
        dur = self.items["duration"][iid]
        log_wt = (np.log(dur) - 1.2 + 0.4 * (a - self.a_click_mean) + 0.2 * self.items["quality"][iid]
                  + 0.5 * e + 0.7 * rng.standard_normal(len(iid)))
        watch = np.where(click, np.clip(np.exp(log_wt), 1.0, 3.0 * dur), 0.0)
        return p, click, conversion, watch


# ----------------------------------------------------------------------------- main

def generate(out_dir: str | Path, cfg: SynthConfig | None = None, progress: bool = True) -> Path:
    """Writes exposures.parquet, users.parquet, items.parquet, dataset.yaml and the ground truth
    (``truth/``, for ``mtrank simulate``) into out_dir (``cfg``:
    the defaults of :class:`SynthConfig` when None); returns the dataset.yaml path."""
    cfg = cfg if cfg is not None else SynthConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    N, U = cfg.n_exposures, cfg.n_users
    user_chunk = max(1, cfg.chunk // cfg.history_candidates)
    n_steps = 3 + -(-N // cfg.chunk) + -(-U // user_chunk)  # users+items, labels, write
    bar = tqdm(total=n_steps, desc="synth", disable=not progress)

    def step(desc):
        bar.set_description(f"synth: {desc}")
        bar.update(1)

    users = _users(cfg, rng)
    items = _items(cfg, rng)
    feed = _Feed(cfg, users, items)
    step("users, items")

    # --- exposures: who, what, when, on which device; affinity and engagement per row
    user_p = users["activity"] / users["activity"].sum()
    t0 = int(datetime.fromisoformat(cfg.start).replace(tzinfo=UTC).timestamp())
    hour_p = HOUR_TRAFFIC / HOUR_TRAFFIC.sum()
    cols = {k: [] for k in ("uid", "iid", "ts", "dev", "a", "e")}
    for s in range(0, N, cfg.chunk):
        m = min(cfg.chunk, N - s)
        uid = rng.choice(U, m, p=user_p)
        iid = feed.sample(uid, rng)
        hour = rng.choice(24, m, p=hour_p)
        ts = t0 + rng.integers(0, cfg.days, m) * 86400 + hour * 3600 + rng.integers(0, 3600, m)
        dev = (rng.random(m)[:, None] > users["dev_cdf"][uid]).sum(1).clip(0, 2)
        a = _affinity(cfg, users, items, uid, iid) + HOUR_CLICK[hour] + DEVICE_CLICK[dev]
        for k, x in zip(cols, (uid, iid, ts, dev, a, rng.standard_normal(m)), strict=True):
            cols[k].append(x)
        step("exposures")
    uid, iid, ts, dev, a, e = (np.concatenate(cols.pop(k)) for k in list(cols))

    # --- labels: click -> conversion, click -> watch time, all through a (and e)
    c0 = _calibrate(a, cfg.target_ctr)
    click = rng.random(N) < _sigmoid(a + c0)
    ci = np.flatnonzero(click)
    cl = _conv_logit(users, items, uid[ci], iid[ci], a[ci], e[ci]) + DEVICE_CONV[dev[ci]]
    c1 = _calibrate(cl, cfg.target_cvr)
    conversion = np.zeros(N, np.int8)
    conversion[ci] = rng.random(len(ci)) < _sigmoid(cl + c1)
    dur = items["duration"][iid[ci]]
    log_wt = (np.log(dur) - 1.2 + 0.4 * (a[ci] - a[ci].mean()) + 0.2 * items["quality"][iid[ci]]
              + 0.5 * e[ci] + 0.7 * rng.standard_normal(len(ci)))
    watch_time = np.zeros(N, np.float32)
    watch_time[ci] = np.clip(np.exp(log_wt), 1.0, 3.0 * dur)
    save_truth(out / TRUTH_DIR, cfg, users, items, c0=c0, c1=c1, a_click_mean=float(a[ci].mean()))
    step("labels")

    # --- history snapshot before the window: the same model over a prior feed, no context
    K = cfg.history_candidates
    seen = np.minimum(K, rng.poisson(users["activity"] * cfg.history_per_activity))
    seqs = {"clicked": ([], [], cfg.max_clicked), "converted": ([], [], cfg.max_converted)}
    for s in range(0, U, user_chunk):
        b = min(user_chunk, U - s)
        huid = np.repeat(np.arange(s, s + b), K)
        hiid = feed.sample(huid, rng)
        ha = _affinity(cfg, users, items, huid, hiid)
        he = rng.standard_normal(b * K)
        hclick = (rng.random(b * K) < _sigmoid(ha + c0)).reshape(b, K) & (np.arange(K) < seen[s:s + b, None])
        hconv = hclick & (rng.random(b * K)
                          < _sigmoid(_conv_logit(users, items, huid, hiid, ha, he) + c1)).reshape(b, K)
        hiid = hiid.reshape(b, K)  # column 0 = most recent
        for name, mask in (("clicked", hclick), ("converted", hconv)):
            lengths, values, max_len = seqs[name]
            first = np.argsort(~mask, axis=1, kind="stable")[:, :max_len]  # positives first, in order
            keep = np.take_along_axis(mask, first, 1)
            lengths.append(keep.sum(1))
            values.append(np.take_along_axis(hiid, first, 1)[keep] + 1)
        step("history")

    def list_col(name):
        lengths, values, _ = seqs[name]
        offsets = np.concatenate([[0], np.cumsum(np.concatenate(lengths))]).astype(np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.concatenate(values), pa.int64()))

    # --- write
    order = np.argsort(ts, kind="stable")
    ts = ts[order]
    exposures = pa.table({
        "user_id": pa.array(uid[order] + 1, pa.int64()),
        "item_id": pa.array(iid[order] + 1, pa.int64()),
        "ts": pa.array(ts, pa.int64()),
        "hour": pa.array(((ts - t0) // 3600 % 24).astype(np.int32)),
        "device": pa.DictionaryArray.from_arrays(pa.array(dev[order].astype(np.int32)),
                                                 list(DEVICES)).cast(pa.string()),
        "click": pa.array(click[order].astype(np.int8)),
        "conversion": pa.array(conversion[order]),
        "watch_time": pa.array(watch_time[order]),
    })
    users_t = pa.table({
        "user_id": pa.array(np.arange(1, U + 1), pa.int64()),
        "age_bucket": pa.array(users["age"].astype(np.int32)),
        "gender": pa.DictionaryArray.from_arrays(pa.array(users["gender"].astype(np.int32)),
                                                 list(GENDERS)).cast(pa.string()),
        "region": pa.array(users["region"].astype(np.int32)),
        "activity": pa.array(users["activity"]),
        "tenure_days": pa.array(users["tenure"]),
        "clicked_items": list_col("clicked"),
        "converted_items": list_col("converted"),
    })
    items_t = pa.table({
        "item_id": pa.array(np.arange(1, cfg.n_items + 1), pa.int64()),
        "category": pa.array(items["category"].astype(np.int32)),
        "creator": pa.array(items["creator"].astype(np.int32)),
        "duration_s": pa.array(items["duration"]),
        "price": pa.array(items["price"]),
        "popularity": pa.array(items["popularity"]),
        "item_age_days": pa.array(items["age_days"]),
    })
    pq.write_table(exposures, out / "exposures.parquet")
    pq.write_table(users_t, out / "users.parquet")
    pq.write_table(items_t, out / "items.parquet")
    spec_path = out / "dataset.yaml"
    dump_spec(dataset_spec(cfg), spec_path)
    bar.set_postfix(ctr=f"{click.mean():.4f}", cvr=f"{conversion.sum() / max(1, len(ci)):.4f}")
    step("written")
    bar.close()
    return spec_path


def dataset_spec(cfg: SynthConfig | None = None) -> DatasetSpec:
    """The spec describing the files :func:`generate` writes (``cfg`` as there)."""
    cfg = cfg if cfg is not None else SynthConfig()
    def f(name, entity, kind, **kw):
        return FeatureSpec(name=name, entity=entity, kind=kind, **kw)

    return DatasetSpec(
        name="synth",
        exposures=ExposureTable(path="exposures.parquet", user_key="user_id", item_key="item_id", time="ts"),
        users=EntityTable(path="users.parquet", key="user_id"),
        items=EntityTable(path="items.parquet", key="item_id"),
        features=[
            *(f(n, "user", "sparse") for n in ("user_id", "age_bucket", "gender", "region")),
            *(f(n, "user", "dense") for n in ("activity", "tenure_days")),
            f("clicked_items", "user", "sequence", max_len=cfg.max_clicked, vocab_of="item_id", event="click"),
            f("converted_items", "user", "sequence", max_len=cfg.max_converted, vocab_of="item_id",
              event="conversion"),
            *(f(n, "item", "sparse") for n in ("item_id", "category", "creator")),
            *(f(n, "item", "dense") for n in ("duration_s", "price", "popularity", "item_age_days")),
            *(f(n, "context", "sparse") for n in ("hour", "device")),
        ],
        tasks=[
            TaskSpec(name="ctr", kind="binary", label="click"),
            TaskSpec(name="cvr", kind="binary", label="conversion", condition="ctr"),
            TaskSpec(name="watch_time", kind="regression", label="watch_time", condition="ctr"),
        ],
    )


if __name__ == "__main__":  # python -m training.data.synth OUT_DIR
    import sys

    print(generate(sys.argv[1] if len(sys.argv) > 1 else "data/synth"))
