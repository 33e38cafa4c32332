"""Embeddings of your own volumes and reports from a trained checkpoint.

    python launch/export_embeddings.py --config=configs/t3d.py:demo --workdir runs/demo \
        --input PATH --output FILE.npz|FILE.parquet [--texts lines.txt] [--tokens]

PATH is a manifest (CSV/JSONL, as for launch/prepare_data.py: its reports are embedded
too), a folder of NIfTI files and/or DICOM series folders, a DICOM series folder, or one
NIfTI file. Every volume goes through exactly what training saw at evaluation time:
``preprocess.load_volume`` -> ``preprocess_volume`` with the dataset's preset ->
``views.eval_view`` (whole volume resampled to ``config.data.view_size``). Reports and
``--texts`` lines use the dataset's WordPiece tokenizer.

An input that cannot be read is written to the errors file (``FILE.errors.jsonl``: id,
path, reason) and skipped; the export never stops for one bad input.

Output:
  ``.npz``: ``id`` [N] str, ``volume_embedding`` [N, D] float32, ``report_embedding``
  [N, D] (NaN rows where an input had no report; only with a manifest), ``text`` [M] str and
  ``text_embedding`` [M, D] (``--texts``), ``tokens`` [N, T, d] and ``token_grid`` [3]
  (``--tokens``), ``preset`` and ``view_size``.
  ``.parquet``: one row per volume (``kind="volume"``: id, path, report, volume_embedding,
  text_embedding of the report, tokens flattened) and per text line (``kind="text"``: id
  "text:LINE", text, text_embedding); preset, view size and token grid in the schema
  metadata.
All embeddings are L2-normalised (the model's outputs).

``run_generate_reports`` (``launch/generate_reports.py``) writes a generated report per volume
instead, with a `reportgen` checkpoint (docs/report_generation.md).

``run_export_weights`` (``launch/export_weights.py``) exports the weights instead: the image
encoder as a MONAI state dict, the text encoder as a Hugging Face BERT folder
(t3d_jax/models/export_torch.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pathlib
from typing import Iterable, Sequence

import numpy as np

from t3d_jax.utils import UserFileNotFoundError, UserValueError, cfg_get

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
MANIFEST_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".ndjson")


@dataclasses.dataclass
class InputItem:
    id: str
    path: str
    report: str | None = None


@dataclasses.dataclass
class ExportResult:
    ids: list[str]
    volume_embedding: np.ndarray  # [N, D]
    report_embedding: np.ndarray | None  # [N, D], NaN rows without a report
    reports: list[str | None]
    paths: list[str]
    texts: list[str]
    text_embedding: np.ndarray | None  # [M, D]
    tokens: np.ndarray | None  # [N, T, d]
    token_grid: tuple[int, int, int] | None
    errors: list[dict]
    preset: str
    view_size: tuple[int, int, int]


# ----------------------------------------------------------------------------------- inputs


def _is_nifti(path: pathlib.Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def _looks_like_dicom_folder(folder: pathlib.Path) -> bool:
    from t3d_jax.data.preprocess import _is_dicom_file

    return any(_is_dicom_file(p) for p in sorted(folder.iterdir())[:64] if p.is_file())


def _stem(path: pathlib.Path) -> str:
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def discover_inputs(path: str | os.PathLike, split: str | None = None) -> tuple[list[InputItem], list[dict]]:
    """The volumes PATH names, and the entries that cannot be volumes (as error records).

    ``split`` keeps only a manifest's rows of that split (e.g. the held-out ``valid``).
    """
    from t3d_jax.data.manifest import read_manifest

    path = pathlib.Path(path)
    errors: list[dict] = []
    if not path.exists():
        raise UserFileNotFoundError(f"{path}: input not found (give a manifest, a folder of volumes, or a NIfTI file)")
    if path.is_file() and path.name.lower().endswith(MANIFEST_SUFFIXES):
        rows, _ = read_manifest(path)
        items, seen = [], set()
        for row in rows:
            if split and row.split != split and not row.error:
                continue
            if row.error or not row.id or not row.volume:
                errors.append({"id": row.id, "path": row.volume, "line": row.line,
                               "error": f"{path}:{row.line}: {row.error or 'no id / volume'}"})
                continue
            if row.id in seen:
                errors.append({"id": row.id, "path": row.volume, "line": row.line,
                               "error": f"{path}:{row.line}: duplicate id {row.id!r}"})
                continue
            seen.add(row.id)
            items.append(InputItem(row.id, row.volume, row.report))
        return items, errors
    if split:
        raise UserValueError(f"{path}: --split {split!r} selects manifest rows, but the input is not a manifest")
    if path.is_file():
        return [InputItem(_stem(path), str(path))], errors
    if _looks_like_dicom_folder(path):
        return [InputItem(path.name, str(path))], errors
    items = []
    for child in sorted(path.iterdir()):
        if child.is_dir():
            if _looks_like_dicom_folder(child):
                items.append(InputItem(child.name, str(child)))
            else:
                errors.append({"id": child.name, "path": str(child), "error": f"{child}: folder holds no DICOM files"})
        elif _is_nifti(child):
            items.append(InputItem(_stem(child), str(child)))
        elif not child.name.startswith("."):
            errors.append({"id": child.name, "path": str(child),
                           "error": f"{child}: not a NIfTI file (.nii/.nii.gz) or DICOM series folder"})
    return items, errors


def read_text_lines(path: str | os.PathLike) -> list[str]:
    """Non-empty lines of a UTF-8 text file (one free text per line)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise UserFileNotFoundError(f"{path}: --texts file not found (one text per line)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserValueError(f"{path}: --texts file cannot be read as UTF-8 text ({err})") from err
    return [line.strip() for line in text.splitlines() if line.strip()]


def prepare_volume(path: str, preset, view_size: Sequence[int]) -> np.ndarray:
    """One input -> float32 [X, Y, Z, 1] model input, exactly as the eval pipeline makes it."""
    from t3d_jax.data import preprocess
    from t3d_jax.data.views import eval_view

    volume = preprocess.load_volume(path)
    stored, scale, offset = preprocess.preprocess_volume(volume, preset)
    return eval_view(stored, scale, offset, tuple(int(s) for s in view_size))


# ----------------------------------------------------------------------------------- export


def prepare_or_record(item: InputItem, preset, view_size: Sequence[int], errors: list[dict]):
    """`prepare_volume` of one input, or None with the failure appended to `errors` (and
    logged): a bad volume never stops an export, and its reason names the file."""
    try:
        return prepare_volume(item.path, preset, view_size)
    except Exception as err:  # VolumeError, or anything unforeseen: log it, keep going
        reason = str(err) if str(err).startswith(str(item.path)) else f"{item.path}: {type(err).__name__}: {err}"
        errors.append({"id": item.id, "path": item.path, "error": reason})
        log.warning("skipping %s: %s", item.id, reason)
        return None


def _batches(seq: Sequence, size: int) -> Iterable[Sequence]:
    for start in range(0, len(seq), size):
        yield seq[start:start + size]


def export_embeddings(
    embedder,
    tokenizer,
    items: Sequence[InputItem],
    *,
    preset,
    view_size: Sequence[int],
    texts: Sequence[str] = (),
    tokens: bool = False,
    batch_size: int = 8,
    errors: list[dict] | None = None,
    progress: bool = True,
) -> ExportResult:
    """Embeds ``items`` (and ``texts``) with ``embedder`` (:class:`t3d_jax.evaluate.embedding.Embedder`).

    Volumes are read one by one and embedded ``batch_size`` at a time (rounded up to the
    device count; the last batch is padded and the padding dropped). A volume that fails
    to load or preprocess goes to ``errors`` and is skipped.
    """
    from tqdm import tqdm

    from t3d_jax.evaluate.embedding import eval_batch_size

    errors = list(errors or [])
    preset_name = getattr(preset, "name", str(preset))
    view_size = tuple(int(s) for s in view_size)
    bs = eval_batch_size(batch_size, embedder.multiple)
    ids, paths, reports, vol_out, tok_out = [], [], [], [], []
    grid = None
    pending: list[tuple[InputItem, np.ndarray]] = []

    def flush():
        nonlocal grid
        if not pending:
            return
        batch = np.stack([v for _, v in pending])
        vol_out.append(embedder.volumes(batch))
        if tokens:
            t, g = embedder.volume_tokens(batch)
            tok_out.append(t)
            grid = g if g is not None else grid
        for item, _ in pending:
            ids.append(item.id)
            paths.append(item.path)
            reports.append(item.report)
        pending.clear()

    bar = tqdm(items, desc="export volumes", unit="vol", disable=not progress)
    for item in bar:
        volume = prepare_or_record(item, preset, view_size, errors)
        if volume is None:
            continue
        pending.append((item, volume))
        if len(pending) == bs:
            flush()
    flush()
    bar.close()

    dim = vol_out[0].shape[1] if vol_out else 0
    volume_embedding = np.concatenate(vol_out) if vol_out else np.zeros((0, dim), np.float32)
    report_embedding = None
    if any(r for r in reports):
        report_embedding = np.full((len(ids), dim), np.nan, np.float32)
        with_report = [i for i, r in enumerate(reports) if r]
        for chunk in _batches(with_report, bs):
            ids_tok, mask = tokenizer.encode([reports[i] for i in chunk])
            report_embedding[list(chunk)] = embedder.texts(ids_tok, mask)
    text_embedding = None
    if texts:
        parts = []
        for chunk in tqdm(list(_batches(list(texts), bs)), desc="export texts", disable=not progress):
            ids_tok, mask = tokenizer.encode(list(chunk))
            parts.append(embedder.texts(ids_tok, mask))
        text_embedding = np.concatenate(parts)
    return ExportResult(
        ids=ids, volume_embedding=volume_embedding, report_embedding=report_embedding, reports=reports,
        paths=paths, texts=list(texts), text_embedding=text_embedding,
        tokens=np.concatenate(tok_out) if tok_out else None,
        token_grid=None if grid is None else tuple(int(g) for g in grid),
        errors=errors, preset=preset_name, view_size=view_size)


# ----------------------------------------------------------------------------------- files


def errors_path(output: str | os.PathLike) -> pathlib.Path:
    output = pathlib.Path(output)
    return output.with_name(output.name + ".errors.jsonl")


def write_result(result: ExportResult, output: str | os.PathLike) -> pathlib.Path:
    """Writes ``.npz`` or ``.parquet`` (by suffix) and the errors file next to it."""
    output = pathlib.Path(output)
    suffix = output.suffix.lower()
    if suffix not in (".npz", ".parquet"):
        raise UserValueError(f"{output}: output must end in .npz or .parquet")
    output.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".npz":
        arrays = {
            "id": np.asarray(result.ids, dtype=np.str_),
            "path": np.asarray(result.paths, dtype=np.str_),
            "volume_embedding": result.volume_embedding.astype(np.float32),
            "preset": np.asarray(result.preset),
            "view_size": np.asarray(result.view_size, np.int32),
        }
        if result.report_embedding is not None:
            arrays["report_embedding"] = result.report_embedding
        if result.text_embedding is not None:
            arrays["text"] = np.asarray(result.texts, dtype=np.str_)
            arrays["text_embedding"] = result.text_embedding
        if result.tokens is not None:
            arrays["tokens"] = result.tokens
            if result.token_grid is not None:
                arrays["token_grid"] = np.asarray(result.token_grid, np.int32)
        with open(output, "wb") as f:
            np.savez(f, **arrays)
    else:
        _write_parquet(result, output)
    with open(errors_path(output), "w") as f:
        for e in result.errors:
            f.write(json.dumps(e) + "\n")
    return output


def _write_parquet(result: ExportResult, output: pathlib.Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    n, m = len(result.ids), len(result.texts)

    def rows(x: np.ndarray | None, count: int) -> list:
        if x is None:
            return [None] * count
        return [None if not np.all(np.isfinite(r)) else r.astype(np.float32).tolist() for r in x]

    columns = {
        "kind": ["volume"] * n + ["text"] * m,
        "id": list(result.ids) + [f"text:{i + 1}" for i in range(m)],
        "path": list(result.paths) + [None] * m,
        "text": list(result.reports) + list(result.texts),
        "volume_embedding": rows(result.volume_embedding, n) + [None] * m,
        "text_embedding": rows(result.report_embedding, n) + rows(result.text_embedding, m),
    }
    schema_fields = [
        pa.field("kind", pa.string()), pa.field("id", pa.string()), pa.field("path", pa.string()),
        pa.field("text", pa.string()), pa.field("volume_embedding", pa.list_(pa.float32())),
        pa.field("text_embedding", pa.list_(pa.float32())),
    ]
    if result.tokens is not None:
        columns["tokens"] = [t.reshape(-1).astype(np.float32).tolist() for t in result.tokens] + [None] * m
        schema_fields.append(pa.field("tokens", pa.list_(pa.float32())))
    meta = {"preset": result.preset, "view_size": json.dumps(list(result.view_size)),
            "token_shape": json.dumps(None if result.tokens is None else list(result.tokens.shape[1:])),
            "token_grid": json.dumps(None if result.token_grid is None else list(result.token_grid))}
    table = pa.table(columns, schema=pa.schema(schema_fields, metadata=meta))
    pq.write_table(table, output)


def read_parquet(path: str | os.PathLike) -> dict:
    """Reads an exported parquet back into arrays (for users and tests)."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    data = table.to_pydict()
    vol = [i for i, k in enumerate(data["kind"]) if k == "volume"]
    txt = [i for i, k in enumerate(data["kind"]) if k == "text"]
    out = {"id": [data["id"][i] for i in vol], "meta": meta,
           "volume_embedding": np.asarray([data["volume_embedding"][i] for i in vol], np.float32),
           "report_embedding": [data["text_embedding"][i] for i in vol],
           "text": [data["text"][i] for i in txt],
           "text_embedding": np.asarray([data["text_embedding"][i] for i in txt], np.float32)}
    if "tokens" in data:
        shape = json.loads(meta["token_shape"])
        out["tokens"] = np.asarray([data["tokens"][i] for i in vol], np.float32).reshape(len(vol), *shape)
    return out


# ----------------------------------------------------------------------------------- set-up


def dataset_preprocessing(config) -> tuple[object, dict | None]:
    """(preset, tokenizer info) the training data was prepared with, else the config's.

    "Exactly as in training" means the dataset's own ``dataset.json`` (its preset entry is
    the full preset used); the config's ``preprocess`` section is the fallback when the
    prepared data is not on this machine.
    """
    from t3d_jax.data import preprocess
    from t3d_jax.data.pipeline import read_dataset_info
    from t3d_jax.data.shards import has_dataset

    data_dir = config.data.get("dir", "")
    if not has_dataset(data_dir):
        log.warning("prepared data %r not found: using config.preprocess (preset %r, vocab %r)",
                    data_dir, config.preprocess.preset, config.preprocess.get("vocab", ""))
        return preprocess.get_preset(config.preprocess.preset), None
    info = read_dataset_info(data_dir)
    p = info.get("preset")
    if isinstance(p, dict) and {"name", "window", "size", "scaling"} <= set(p):
        tup = lambda x: None if x is None else tuple(float(v) for v in x)  # noqa: E731
        preset = preprocess.Preset(str(p["name"]), tup(p.get("spacing")), tup(p["window"]),
                                   tuple(int(v) for v in p["size"]), str(p["scaling"]))
    else:
        preset = preprocess.get_preset(p if isinstance(p, str) and p else config.preprocess.preset)
    if preset.name != config.preprocess.preset:
        log.warning("dataset %s was prepared with preset %r, the config says %r: using the dataset's",
                    data_dir, preset.name, config.preprocess.preset)
    return preset, info.get("tokenizer")


def run_export(config, workdir, input_path, output, *, texts_file=None, tokens=False, step=None,
               batch_size=None, split=None, progress=True) -> ExportResult:
    """What ``launch/export_embeddings.py`` does: the inputs and the checkpoint's parameters
    (`t3d_jax.train.params`) first, so a wrong path fails before any work, then the export.

    The prepared data need not be on this machine: when ``config.data.dir`` holds it, its
    token length and label names win over the config (as in training); the config must
    then match the trained shapes. Expected problems (an input path that does not exist,
    no checkpoint) are `t3d_jax.utils.UserError`s naming the fix.
    """
    from t3d_jax.data.prepared import sync_config_with_data
    from t3d_jax.data.shards import has_dataset
    from t3d_jax.data.tokenizer import tokenizer_for_config
    from t3d_jax.evaluate.embedding import Embedder
    from t3d_jax.train import mesh as mesh_lib
    from t3d_jax.train import params as params_lib

    items, errors = discover_inputs(input_path, split)
    texts = read_text_lines(texts_file) if texts_file else []
    if has_dataset(config.data.get("dir", "")):
        config = sync_config_with_data(config)
    mesh = mesh_lib.make_mesh(config.mesh)
    model, got = params_lib.restore_model(config, params_lib.checkpoint_dir(config, workdir), step, mesh=mesh)
    preset, tok_info = dataset_preprocessing(config)
    embedder = Embedder(model, mesh, config.sharding_rules)
    tokenizer = tokenizer_for_config(config, tok_info) if (texts or any(i.report for i in items)) else None
    result = export_embeddings(
        embedder, tokenizer, items, preset=preset, view_size=config.data.view_size, texts=texts, tokens=tokens,
        batch_size=int(batch_size or config.get("eval", {}).get("batch_size", 8)), errors=errors, progress=progress)
    write_result(result, output)
    log.info("checkpoint step %d: exported %d volumes, %d texts to %s; %d errors in %s", got, len(result.ids),
             len(result.texts), output, len(result.errors), errors_path(output))
    return result


# ------------------------------------------------------------------ a user's own scans
def run_generate_reports(config, workdir, input_path, output, *, step=None, split=None,
                         progress: bool = True) -> dict:
    """What launch/generate_reports.py does: a report for every volume `input_path` names (a
    manifest, a folder of NIfTI files / DICOM series, one series folder or one NIfTI file),
    preprocessed exactly as the training data (`t3d_jax.export.prepare_volume` with the dataset's
    preset), decoded with `config.generate`, appended to `output` (JSONL: id, path, generated,
    and the manifest's report as `reference` where it has one) batch by batch.

    Inputs that cannot be read go to OUTPUT.errors.jsonl and are skipped. Ids already in
    `output` are not generated again, so a killed run continues where it stopped.
    Returns {"written", "skipped_existing", "errors", "step"}.
    """
    from tqdm import tqdm

    from t3d_jax.data.prepared import sync_config_with_data
    from t3d_jax.data.shards import has_dataset
    from t3d_jax.data.tokenizer import tokenizer_for_config
    from t3d_jax.evaluate.reportgen import generate_ids
    from t3d_jax.tasks.reportgen import decode_config, ids_to_text
    from t3d_jax.train import mesh as mesh_lib
    from t3d_jax.train import params as params_lib

    items, errors = discover_inputs(input_path, split)
    output = pathlib.Path(output)
    done = set()
    if output.is_file():
        for n, line in enumerate(output.read_text().splitlines(), 1):
            try:
                done.add(json.loads(line)["id"])
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"{output}:{n}: not a line this tool wrote (JSON with an 'id'); "
                                 "move the file away or pass another --output") from None
    if has_dataset(config.data.get("dir", "")):
        config = sync_config_with_data(config)
    mesh = mesh_lib.make_mesh(config.mesh)
    model, got = params_lib.restore_model(config, params_lib.checkpoint_dir(config, workdir), step, mesh=mesh)
    preset, tok_info = dataset_preprocessing(config)
    tokenizer = tokenizer_for_config(config, tok_info)
    dcfg = decode_config(config, tokenizer)
    batch_size = int(cfg_get(cfg_get(config, "generate"), "batch_size", 16))
    todo = [item for item in items if item.id not in done]
    output.parent.mkdir(parents=True, exist_ok=True)
    written, pending = 0, []

    def flush(out_file):
        nonlocal written
        if not pending:
            return
        rows = generate_ids(model, np.stack([v for _, v in pending]), dcfg, mesh=mesh,
                            rules=config.sharding_rules, seed=int(cfg_get(config, "seed", 0)))
        for (item, _), text in zip(pending, ids_to_text(tokenizer, rows)):
            entry = {"id": item.id, "path": item.path, "generated": text}
            if item.report:
                entry["reference"] = item.report
            out_file.write(json.dumps(entry) + "\n")
        out_file.flush()
        written += len(pending)
        pending.clear()

    with open(output, "a") as out_file:
        for item in tqdm(todo, desc="generate reports", unit="vol", disable=not progress):
            volume = prepare_or_record(item, preset, config.data.view_size, errors)
            if volume is None:
                continue
            pending.append((item, volume))
            if len(pending) == batch_size:
                flush(out_file)
        flush(out_file)
    with open(errors_path(output), "w") as f:
        for e in errors:
            f.write(json.dumps(e) + "\n")
    return {"written": written, "skipped_existing": len(items) - len(todo), "errors": len(errors), "step": got}


# ----------------------------------------------------------------------------- weights


def run_export_weights(config, workdir, out, *, step=None) -> dict:
    """What ``launch/export_weights.py`` does: the checkpoint's parameters (and BatchNorm
    statistics) restored into ``config``'s model (`t3d_jax.train.params`), then every tower
    written for PyTorch by `t3d_jax.models.export_torch.write_export`: the image encoder as a
    MONAI state dict (``ViT`` or ``resnet50`` ...), the text encoder as a Hugging Face BERT
    folder with the dataset's ``vocab.txt``, the projections, and ``export.json`` (how to build
    and feed each, the checkpoint step, the data's preprocessing). Returns that manifest.

    As for `run_export`, the prepared data need not be here: when ``config.data.dir`` holds it,
    its token length, vocab and preset are used and recorded; otherwise the config's.
    """
    import tempfile

    import jax
    from jax.experimental import multihost_utils

    from t3d_jax.data.prepared import sync_config_with_data
    from t3d_jax.data.shards import has_dataset
    from t3d_jax.data.tokenizer import tokenizer_for_config
    from t3d_jax.models import export_torch
    from t3d_jax.train import mesh as mesh_lib
    from t3d_jax.train import params as params_lib

    if has_dataset(config.data.get("dir", "")):
        config = sync_config_with_data(config)
    mesh = mesh_lib.make_mesh(config.mesh)
    model, got = params_lib.restore_model(config, params_lib.checkpoint_dir(config, workdir), step, mesh=mesh)
    preset, tok_info = dataset_preprocessing(config)
    tokenizer = tokenizer_for_config(config, tok_info) if getattr(model, "text_encoder", None) is not None else None

    def to_numpy(x):
        if jax.process_count() > 1 and isinstance(x, jax.Array) and not x.is_fully_addressable:
            x = multihost_utils.process_allgather(x, tiled=True)
        return np.asarray(x)

    info = {"checkpoint_step": int(got), "task": str(config.get("task", "")),
            "preprocess": {"preset": preset.to_json() if hasattr(preset, "to_json") else str(preset),
                           "view_size": [int(s) for s in config.data.view_size]}}
    if tokenizer is not None:
        info["preprocess"]["tokenizer"] = {"lowercase": tokenizer.lowercase, "max_len": tokenizer.max_len,
                                           "report_order": tokenizer.report_order}
    # Every process runs the same gathers (collectives); process 0 writes to `out`.
    target = out if jax.process_index() == 0 else tempfile.mkdtemp(prefix="export_weights_")
    try:
        manifest = export_torch.write_export(
            model, target, vocab_path=None if tokenizer is None else tokenizer.vocab_path,
            lowercase=True if tokenizer is None else tokenizer.lowercase,
            max_len=None if tokenizer is None else tokenizer.max_len, info=info, to_numpy=to_numpy)
    except ValueError as e:  # a model with no PyTorch equivalent (GroupNorm ResNet3D)
        raise UserValueError(str(e)) from e
    log.info("checkpoint step %d: wrote %s to %s", got, ", ".join(k for k in ("image", "text", "projections")
                                                                   if k in manifest), out)
    return manifest
