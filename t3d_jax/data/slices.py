"""Slice sequences: what the per-slice `msvlm` encoder trains on (``data.slices.enabled``).

The fixed-view pipeline resamples every volume to one ``data.view_size`` grid, so every example
is one series of ``view_size[2]`` slices. MS-VLM reads any number of slices and several series,
so for it the data is kept as it was scanned, and padded instead of resampled:

* **Prepared with** ``preprocess.keep_slices`` (t3d_jax/data/prepare.py): x, y at the preset's
  spacing and in-plane size, every slice kept at the preset's z spacing, and the series of a
  manifest row (``volume`` = paths separated by ``;``) concatenated along z in manifest order,
  with ``series_slices`` (slices per series) and ``source`` (their files) in the record.
* **One example** (:func:`slice_sequence`): all series' slices in order, each slice resampled
  in-plane to ``data.view_size[:2]`` (the slice encoder's image size; identity when the
  preset's in-plane size is the same), optionally from a random in-plane crop
  (``data.crop_min``/``crop_max``, one box per example, shared by its series; z is never
  cropped), model units (``stored * scale + offset``) with the fixed-view path's intensity
  jitter and noise, then zero-padded at the end to ``data.slices.length`` slots:

  ========================  =======  ====================================================
  key                       dtype    shape / meaning
  ========================  =======  ====================================================
  ``slices``                float32  [X, Y, L, 1]: every series' slices, then padding
  ``slice_valid``           bool     [L]: True on the real slices
  ``series_id``             int32    [L]: 0 for the row's first series, 1 for its second, ...
                                     (0 on padding); the encoder's series (type) embedding
  ``slice_position``        int32    [L]: index of the slice within its series (0 on padding)
  ========================  =======  ====================================================

* **The length L, chosen once.** Batches must have one shape (one compiled step; on several
  hosts every process must build the same global array without talking to the others), so L
  is one length for the whole run, not per batch: ``data.slices.length`` if set, else the
  smallest of the encoder's buckets (``model.image.msvlm.buckets``) that holds the data's
  longest example, read from dataset.json's ``slices`` summary (:func:`resolve_length`; the
  ``msvlm`` task does this once in ``prepare_config``). Padding costs compute (the slice
  encoder runs on the padded slots too), so a data set with a few very long scans is
  better split or resampled coarser than padded to their length.
* **Nothing is cut.** An example with more slices than L, or more series than
  ``data.slices.max_series`` (the encoder's ``num_series``), raises a ValueError naming
  the record and its files; so does a length that is not one of the encoder's buckets.

A record without ``series_slices`` (prepared without ``keep_slices``) is one series of its
stored Z slices. Fixed-view consumers (the other tasks, evaluation's ``eval_view``) read only
series 0 of a multi-series record (:func:`primary_volume`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from t3d_jax.data.views import resample_box, sample_boxes
from t3d_jax.utils import cfg_get

BATCH_KEYS = ("slices", "slice_valid", "series_id", "slice_position")


@dataclasses.dataclass(frozen=True)
class SliceOptions:
    """How one slice-sequence example is made (``config.data``: ``view_size[:2]``, ``slices.*``,
    the crop and intensity augmentation keys of the fixed views)."""

    inplane: tuple[int, int]  # slice size (x, y) = the slice encoder's image_size
    length: int  # padded slots per example (L), one of the encoder's buckets
    max_series: int = 4  # series per example (the encoder's num_series)
    crop_min: float = 1.0  # in-plane crop extent U(crop_min, crop_max) of each axis
    crop_max: float = 1.0
    intensity_jitter: float = 0.0
    noise_std: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "inplane", tuple(int(s) for s in self.inplane))
        if len(self.inplane) != 2 or min(self.inplane) < 1:
            raise ValueError(f"slice size must be two positive ints, got {self.inplane}")
        if self.length < 1 or self.max_series < 1:
            raise ValueError(f"data.slices.length and data.slices.max_series must be >= 1, got {self.length}, "
                             f"{self.max_series} (the msvlm task resolves 0 = auto before training)")
        if not 0.0 < self.crop_min <= self.crop_max <= 1.0:
            raise ValueError(f"need 0 < crop_min <= crop_max <= 1, got {self.crop_min}, {self.crop_max}")

    @classmethod
    def from_config(cls, data_config: Any) -> "SliceOptions":
        sl = cfg_get(data_config, "slices", None) or {}
        return cls(inplane=tuple(cfg_get(data_config, "view_size", (48, 48, 48)))[:2],
                   length=int(cfg_get(sl, "length", 0)), max_series=int(cfg_get(sl, "max_series", 0) or 4),
                   crop_min=float(cfg_get(data_config, "crop_min", 1.0)),
                   crop_max=float(cfg_get(data_config, "crop_max", 1.0)),
                   intensity_jitter=float(cfg_get(data_config, "intensity_jitter", 0.0)),
                   noise_std=float(cfg_get(data_config, "noise_std", 0.0)))


def enabled(data_config: Any) -> bool:
    """``data.slices.enabled``: the pipeline makes slice sequences instead of fixed views."""
    return bool(cfg_get(cfg_get(data_config, "slices", None) or {}, "enabled", False))


def record_series(record: dict) -> tuple[np.ndarray, np.ndarray]:
    """(stored volume [X, Y, Z], slices per series [S]) of a record; Z = the sum of the counts."""
    volume = record["volume"]
    counts = record.get("series_slices")
    counts = np.asarray([volume.shape[2]] if counts is None else counts, np.int64).reshape(-1)
    if counts.size < 1 or np.any(counts < 1) or int(counts.sum()) != volume.shape[2]:
        raise ValueError(f"record {record.get('id', '?')!r}: series_slices {counts.tolist()} do not add up to "
                         f"the stored volume's {volume.shape[2]} slices")
    return volume, counts


def primary_volume(record: dict) -> np.ndarray:
    """Series 0 of a record (the whole volume of a one-series record): what fixed views read."""
    volume, counts = record_series(record)
    return volume if counts.size == 1 else volume[:, :, :int(counts[0])]


def _where(record: dict) -> str:
    source = record.get("source")
    return f"record {record.get('id', '?')!r}" + (f" ({source})" if source else "")


def slice_sequence(record: dict, options: SliceOptions, rng: np.random.Generator | None = None) -> dict:
    """One example's padded slice sequence (module docstring); ``rng`` None = deterministic (no
    crop, jitter or noise). Draw order: the crop box, then (gain, shift), then the noise."""
    volume, counts = record_series(record)
    total, length = int(counts.sum()), options.length
    if total > length:
        raise ValueError(f"{_where(record)}: {total} slices ({' + '.join(map(str, counts.tolist()))} over "
                         f"{counts.size} series) exceed data.slices.length={length}; nothing is cut: raise it "
                         f"to a larger bucket (model.image.msvlm.buckets), or prepare with a coarser z spacing")
    if counts.size > options.max_series:
        raise ValueError(f"{_where(record)}: {counts.size} series exceed data.slices.max_series="
                         f"{options.max_series} (model.image.msvlm.num_series series embeddings)")
    box = np.array([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    if rng is not None and options.crop_min < 1.0:
        box[:, :2] = sample_boxes(rng, 1, options.crop_min, options.crop_max)[0][:, :2]
    # z: the box spans it whole with as many output slices as input ones, so every slice is
    # read at its own centre (an exact copy along z); only x, y are interpolated.
    grid = resample_box(volume, box, (*options.inplane, total))
    scale, offset = float(record["intensity_scale"]), float(record["intensity_offset"])
    jitter = options.intensity_jitter
    gain, shift = (rng.uniform(-jitter, jitter, size=2) if rng is not None and jitter > 0 else (0.0, 0.0))
    grid *= np.float32(scale * (1.0 + gain))
    grid += np.float32(offset * (1.0 + gain) + shift)
    if rng is not None and options.noise_std > 0:
        grid += rng.standard_normal(size=grid.shape, dtype=np.float32) * np.float32(options.noise_std)
    slices = np.zeros((*options.inplane, length, 1), np.float32)
    slices[:, :, :total, 0] = grid
    valid = np.zeros(length, bool)
    valid[:total] = True
    series = np.zeros(length, np.int32)
    series[:total] = np.repeat(np.arange(counts.size, dtype=np.int32), counts)
    position = np.zeros(length, np.int32)
    position[:total] = np.concatenate([np.arange(n, dtype=np.int32) for n in counts])
    return {"slices": slices, "slice_valid": valid, "series_id": series, "slice_position": position}


def bucket_for(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= n (ValueError past the largest)."""
    fits = [int(b) for b in sorted(buckets) if int(b) >= n]
    if not fits:
        raise ValueError(f"{n} slices exceed the largest length bucket {max(buckets)}")
    return fits[0]


def resolve_length(info: dict, buckets: Sequence[int], length: int = 0, where: str = "the data") -> int:
    """The run's padded length L from dataset.json ``info`` (its ``slices`` summary) and the
    encoder's ``buckets``: ``length`` if > 0 (it must be a bucket), else the smallest bucket that
    holds the longest example. Raises naming the longest example and its files when it does not fit."""
    buckets = sorted(int(b) for b in buckets)
    summary = info.get("slices") or {}
    if not summary.get("keep"):
        raise ValueError(f"{where}: not prepared with keep_slices (dataset.json has no 'slices' summary); "
                         "re-prepare with launch/prepare_data.py --keep-slices for data.slices.enabled")
    longest = summary.get("longest") or {}
    need = int(summary.get("max", 0))
    what = (f"its longest example {longest.get('id')!r} ({longest.get('source')}) has {need} slices "
            f"({' + '.join(map(str, longest.get('slices', [])))})")
    if length:
        if int(length) not in buckets:
            raise ValueError(f"data.slices.length={length} is not one of the encoder's buckets {tuple(buckets)} "
                             "(model.image.msvlm.buckets)")
        if need > int(length):
            raise ValueError(f"{where}: {what}, more than data.slices.length={length}; nothing is cut: "
                             "raise data.slices.length (0 = the smallest bucket that fits)")
        return int(length)
    if need > buckets[-1]:
        raise ValueError(f"{where}: {what}, more than the largest bucket {buckets[-1]} "
                         "(model.image.msvlm.buckets); add a bucket or prepare with a coarser z spacing")
    return bucket_for(max(need, 1), buckets)
