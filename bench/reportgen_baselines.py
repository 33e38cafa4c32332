r"""Report generation on the demo data: one decoder on several image encoders, plus baselines.

  python bench/reportgen_baselines.py [--demo-dir demo_out] [--steps N] [--out reportgen_demo.json]
  python bench/reportgen_baselines.py --demo-dir demo_out --set model.decoder.resampler_latents=32 \
      --encoder vit=configs/clip.py:demo@RUNS/clip_seed0/checkpoints \
      --encoder msvlm=configs/msvlm.py:demo@RUNS/msvlm_seed0/checkpoints --out rg_msvlm_vs_vit.json

From the folder `make demo` wrote (DEMO_DIR/raw: the synthetic volumes and reports, DEMO_DIR/run:
the configs/t3d.py:demo pretraining), it

1. builds the report vocabulary from the *training* reports (launch/build_vocab.py's
   `build_vocab`, 1,000 pieces asked; DEMO_DIR/reportgen_vocab.txt) and prepares the volumes with
   it (DEMO_DIR/prepared_reportgen: reports as written, 224 ids, none cut), unless both exist;
2. trains configs/reportgen.py:demo once per *encoder arm*, same data, steps, batch, seed and
   decoder, the image encoder frozen. An arm is `--encoder NAME=CONFIG_FILE:VARIANT[@CHECKPOINT_DIR]`
   (repeatable): the pretraining config `CONFIG_FILE`'s get_config(VARIANT) gives the encoder
   (`model.image.*`, patch dropout off: the decoder reads every token) and its input
   (`data.view_size`), CHECKPOINT_DIR its weights (`init_from.checkpoint`, the image encoder's
   parameters only); without `@` the encoder is randomly initialised. Where the run's
   config.json sits beside CHECKPOINT_DIR (what launch/train.py writes), the `model.image` and
   `data.view_size` keys it shares with the named config must hold the same values: a
   checkpoint read under another encoder's settings stops the script naming the key (a key
   the run's config.json lacks, added to the code after that run, is no conflict). Without --encoder the arms are today's two:
   `t3d`    `configs/t3d.py:demo@DEMO_DIR/run/checkpoints` (what the T3D pretraining gives a
            report decoder);
   `random` `configs/t3d.py:demo`, randomly initialised (what the image contributes at all:
            this arm can only learn the reports' common text);
   `--set` overrides apply to every arm after the merge (e.g. model.decoder.resampler_latents=32
   gives every arm the same Perceiver resampler, so encoders of different token counts feed
   the same decoder);
3. scores, on the held-out split, every arm's generated reports and, for every arm with a
   checkpoint (unless --no-nearest-neighbour),
   `nearest_neighbour_NAME` for each held-out volume the training report of the most similar
            training volume by that pretraining's image embedding (the classic retrieval
            baseline);
   with the `reportgen` evaluator's scoring (BLEU-1..4, METEOR, ROUGE-L, CIDEr, clinical-efficacy
   P/R/F1; percentile intervals over --num-bootstrap resamples of the held-out volumes).

Prints the table and writes JSON (--out), with a few generated reports beside their references.
With --workdir, an arm already trained there to the step budget is not trained again (the
trainer resumes at its last step): rerunning only generates and scores.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import pathlib
import sys
import tempfile
import re
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHOWN = ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr",
         "CE_precision_macro", "CE_recall_macro", "CE_f1_macro", "CE_f1_micro")


@dataclasses.dataclass(frozen=True)
class EncoderArm:
    """One `--encoder NAME=CONFIG_FILE:VARIANT[@CHECKPOINT_DIR]`; `checkpoint` "" = random init."""

    name: str
    config_file: str
    variant: str
    checkpoint: str = ""

    @property
    def spec(self) -> str:
        return f"{self.name}={self.config_file}:{self.variant}" + (f"@{self.checkpoint}" if self.checkpoint else "")


def parse_encoder(spec: str) -> EncoderArm:
    """`NAME=CONFIG_FILE:VARIANT[@CHECKPOINT_DIR]` -> EncoderArm (VARIANT may hold commas, e.g.
    `demo,slices`; the checkpoint folder is made absolute). Malformed specs stop the script."""
    usage = "expected NAME=CONFIG_FILE:VARIANT[@CHECKPOINT_DIR], e.g. vit=configs/clip.py:demo@runs/clip/checkpoints"
    name, sep, rest = spec.partition("=")
    if not sep or not name or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise SystemExit(f"--encoder {spec!r}: {usage} (NAME: letters, digits, _ . -)")
    rest, at, checkpoint = rest.partition("@")
    config_file, colon, variant = rest.rpartition(":")
    if not colon or not config_file or not variant:
        raise SystemExit(f"--encoder {spec!r}: {usage}")
    if at and not checkpoint:
        raise SystemExit(f"--encoder {spec!r}: empty CHECKPOINT_DIR after '@' (leave out '@' for a random encoder)")
    return EncoderArm(name, config_file, variant, str(pathlib.Path(checkpoint).absolute()) if checkpoint else "")


def default_arms(demo: pathlib.Path) -> list[EncoderArm]:
    """Without --encoder: the demo's T3D pretraining and the same encoder randomly initialised."""
    t3d = str(REPO / "configs" / "t3d.py")
    return [EncoderArm("t3d", t3d, "demo", str((demo / "run" / "checkpoints").absolute())),
            EncoderArm("random", t3d, "demo")]


def pretraining_config(arm: EncoderArm):
    """The arm's pretraining config (CONFIG_FILE relative to the working folder, else to the
    repository)."""
    from bench.compare_methods import config_from_file

    path = arm.config_file if os.path.isfile(arm.config_file) else str(REPO / arm.config_file)
    return config_from_file(path, arm.variant)


def _plain(value):
    """A config value as JSON writes it (tuples -> lists), for comparing with a config.json."""
    return json.loads(json.dumps(value, default=str))


def _differences(ours, theirs, prefix: str) -> list[str]:
    """Dotted keys that both configs hold with different values (nested dicts compared key by
    key). A key only one side has is no conflict: a run written before a key was added holds
    the default it did not know (`patch_dropout` is set by this script)."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        return [d for k in sorted(set(ours) & set(theirs)) if k != "patch_dropout"
                for d in _differences(ours[k], theirs[k], f"{prefix}.{k}")]
    return [] if ours == theirs else [prefix]


def arm_config(base, arm: EncoderArm, overrides=()):
    """(the reportgen config of `arm`, its pretraining config): `base` with the pretraining's
    `model.image` (patch dropout off) and `data.view_size`, the arm's checkpoint, then
    `overrides` (--set). Checked against CHECKPOINT_DIR/../config.json where that exists."""
    import ml_collections

    from bench.compare_methods import apply_overrides

    pre = pretraining_config(arm)
    if "slices" in pre.data and bool(pre.data.slices.get("enabled", False)):
        raise SystemExit(f"--encoder {arm.spec}: a `slices` pretraining (data.slices.enabled) reads per-series "
                         "slice data; report generation here reads fixed views: use the fixed-view variant")
    c = base.copy_and_resolve_references()
    c.model.image = ml_collections.ConfigDict(pre.model.image.to_dict())
    c.model.image.patch_dropout = 0.0  # the decoder reads every token
    c.data.view_size = tuple(pre.data.view_size)
    c.init_from.checkpoint = arm.checkpoint
    apply_overrides(c, list(overrides))
    if arm.checkpoint:
        if not os.path.isdir(arm.checkpoint):
            raise SystemExit(f"--encoder {arm.spec}: {arm.checkpoint}: no such checkpoint folder "
                             "(the default arm reads DEMO_DIR/run/checkpoints: run `make demo` first or pass --demo-dir)")
        saved = pathlib.Path(arm.checkpoint).parent / "config.json"
        if saved.is_file():
            try:
                run = json.loads(saved.read_text())
                ran = {"model.image": run["model"]["image"], "data.view_size": run["data"]["view_size"]}
            except (ValueError, KeyError, TypeError) as e:
                raise SystemExit(f"{saved}: not a training run's config.json ({e!r})")
            ours = {"model.image": _plain(pre.model.image.to_dict()), "data.view_size": _plain(c.data.view_size)}
            bad = []
            for key in ours:
                for k in _differences(ours[key], ran[key], key):
                    a, b = ours, ran
                    path = [key, *k[len(key) + 1:].split(".")] if k != key else [key]
                    for part in path:
                        a, b = a[part], b[part]
                    bad.append(f"{k}: {a!r} in {arm.config_file}:{arm.variant}, {b!r} in the run")
            if bad:
                raise SystemExit(f"--encoder {arm.name}: {saved} does not match the config it names: "
                                 + "; ".join(bad[:3]))
    return c, pre


def prepare(demo: pathlib.Path, config, log=print) -> None:
    """DEMO_DIR/reportgen_vocab.txt from the training reports, DEMO_DIR/prepared_reportgen with it."""
    from t3d_jax.data.manifest import read_manifest
    from t3d_jax.data.shards import has_dataset
    from t3d_jax.data.tokenizer import build_vocab

    manifest = demo / "raw" / "manifest.csv"
    if not manifest.is_file():
        raise SystemExit(f"{manifest}: not found; run `make demo` first (or pass --demo-dir)")
    vocab = pathlib.Path(config.preprocess.vocab)
    if not vocab.is_file():
        rows, _ = read_manifest(str(manifest))
        reports = [r.report for r in rows if r.report and (r.split or "train") == "train"]
        build_vocab(reports, 1000, str(vocab), lowercase=True)
        log(f"vocabulary of {sum(1 for _ in open(vocab))} pieces from {len(reports)} training reports -> {vocab}")
    if not has_dataset(config.data.dir):
        from launch import prepare_data

        log(f"preparing {manifest} -> {config.data.dir}")
        code = prepare_data.main(["--manifest", str(manifest), "--out", str(config.data.dir), "--config",
                                  f"{REPO / 'configs' / 'reportgen.py'}:demo", "--no-progress"])
        if code:
            raise SystemExit(f"prepare_data failed ({code}); see {config.data.dir}/errors.jsonl")


def image_embeddings(pretraining_config, checkpoints: str, data_config, split: str, batch_size: int):
    """(L2-normalised image embeddings [N, D] of `split`'s volumes under the pretraining's model,
    the raw reports, ids), in stored order."""
    import numpy as np

    from t3d_jax.data.pipeline import eval_iterator
    from t3d_jax.evaluate.embedding import Embedder, eval_batch_size
    from t3d_jax.train import mesh as mesh_lib
    from t3d_jax.train import params as params_lib

    mesh = mesh_lib.make_mesh(pretraining_config.mesh)
    model, _ = params_lib.restore_model(pretraining_config, checkpoints, None, mesh=mesh)
    embedder = Embedder(model, mesh, pretraining_config.sharding_rules)
    emb, reports, ids = [], [], []
    for batch in eval_iterator(data_config, split, eval_batch_size(batch_size, embedder.multiple), worker_count=0):
        valid = np.asarray(batch["valid"], bool)
        if valid.any():
            emb.append(embedder.volumes(batch["volume"])[valid])
            reports += [str(r) for r in np.asarray(batch["report"])[valid]]
            ids += [str(i) for i in np.asarray(batch["id"])[valid]]
    return np.concatenate(emb), reports, ids


def paired_differences(references, generated_a, generated_b, *, num_bootstrap: int, seed: int = 0,
                       alpha: float = 0.05) -> dict:
    """Figures of B minus A on the same held-out volumes, with a paired percentile interval: each
    resample draws one set of volumes and scores both arms on it (score_reports' resampling,
    t3d_jax/evaluate/reportgen.py, with its seed, so the per-arm intervals came from the same
    draws). `{"difference": {name: B - A}, "intervals": {name: [low, high]}}` over the
    bootstrapped figures (not METEOR)."""
    import numpy as np

    from t3d_jax.evaluate import report_labeler
    from t3d_jax.evaluate.reportgen import BOOTSTRAPPED, _ce_figures, _Resampled

    references = [str(r) for r in references]
    n = len(references)
    truth = report_labeler.label_reports(references)
    arms = []
    for gen in (generated_a, generated_b):
        gen = [str(g) for g in gen]
        if len(gen) != n:
            raise ValueError(f"paired_differences: {len(gen)} generated reports for {n} references")
        arms.append((_Resampled(references, gen), report_labeler.label_reports(gen)))

    def figures(idx):
        return [{**res.figures(idx), **_ce_figures(truth[idx], pred[idx])[0]} for res, pred in arms]

    fa, fb = figures(np.arange(n))
    out = {"difference": {k: fb[k] - fa[k] for k in BOOTSTRAPPED}, "intervals": {}}
    rng = np.random.default_rng(seed)
    samples = {k: [] for k in BOOTSTRAPPED}
    for _ in range(int(num_bootstrap)):
        fa, fb = figures(rng.integers(0, n, n))
        for k in samples:
            samples[k].append(fb[k] - fa[k])
    for k, values in samples.items():
        v = np.asarray(values, np.float64)
        v = v[np.isfinite(v)]
        if v.size:
            out["intervals"][k] = [float(np.percentile(v, 100 * alpha / 2)), float(np.percentile(v, 100 * (1 - alpha / 2)))]
    return out


def run(args, log=print) -> dict:
    import jax

    from bench.compare_methods import config_from_file, quiet_training
    from t3d_jax.evaluate.reportgen import generate_split, nearest_neighbour_reports, score_reports
    from t3d_jax.train import mesh as mesh_lib
    from t3d_jax.train import params as params_lib
    from t3d_jax.train.loop import train_and_evaluate

    demo = pathlib.Path(args.demo_dir)
    config = config_from_file(str(REPO / "configs" / "reportgen.py"), "demo")
    config.data.dir = str(demo / "prepared_reportgen")
    config.preprocess.vocab = str(demo / "reportgen_vocab.txt")
    if args.steps:
        config.train.num_steps = int(args.steps)
    config.checkpoint.every_steps = int(config.train.num_steps)
    quiet_training(config)
    arms = [parse_encoder(e) for e in args.encoder] if args.encoder else default_arms(demo)
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise SystemExit(f"--encoder: arm names must differ, got {names}")
    configs = {a.name: arm_config(config, a, args.set) for a in arms}  # every spec checked before training
    prepare(demo, config, log)
    root = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="reportgen_baselines_"))
    split = args.split
    first = configs[arms[0].name][0]
    result = {"data": config.data.dir, "split": split, "num_bootstrap": args.num_bootstrap,
              "config": {"steps": int(first.train.num_steps), "global_batch_size": int(first.train.global_batch_size),
                         "lr": float(first.optim.lr), "seed": int(first.seed),
                         "decoder": dict(first.model.decoder.to_dict()), "generate": dict(first.generate.to_dict()),
                         "freeze": list(first.optim.freeze), "set": list(args.set)},
              "encoders": {a.name: {"config": f"{a.config_file}:{a.variant}", "checkpoint": a.checkpoint or None,
                                    "image": _plain(configs[a.name][0].model.image.to_dict()),
                                    "view_size": list(configs[a.name][0].data.view_size)} for a in arms},
              "arms": {}}
    generated: dict[str, dict] = {}
    for arm in arms:
        c = configs[arm.name][0]
        workdir = root / arm.name
        log(f"== {arm.name} ({arm.spec}): {c.train.num_steps} steps -> {workdir}")
        t0 = time.perf_counter()
        trained = train_and_evaluate(c, workdir)
        train_s = time.perf_counter() - t0
        losses = [h["loss"] for h in trained.history if "loss" in h]
        if not losses and (workdir / "metrics.jsonl").is_file():  # an arm trained before: its own log
            losses = [r["loss"] for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
                      if "loss" in r]
        mesh = mesh_lib.make_mesh(c.mesh)
        model, _ = params_lib.restore_model(c, workdir / "checkpoints", None, mesh=mesh)
        t0 = time.perf_counter()
        with jax.set_mesh(mesh):
            generated[arm.name] = generate_split(model, c, mesh, split)
        gen_s = time.perf_counter() - t0
        result["arms"][arm.name] = {"train_seconds": round(train_s, 1), "generate_seconds": round(gen_s, 1),
                                    "final_loss": float(losses[-1]) if losses else math.nan}
        log(f"   trained {train_s:.0f} s (final loss {result['arms'][arm.name]['final_loss']:.3f}); "
            f"generated {len(generated[arm.name]['id'])} reports in {gen_s:.0f} s")

    # The retrieval baseline of every pretrained arm: its own image embeddings, training reports
    # as the bank, the arm's input settings.
    for arm in ([] if args.no_nearest_neighbour else [a for a in arms if a.checkpoint]):
        c, pre = configs[arm.name]
        pre.data.dir = c.data.dir
        pre.data.view_size = c.data.view_size
        pre.preprocess.max_len = c.preprocess.max_len
        pre.model.text.max_len = c.preprocess.max_len
        t0 = time.perf_counter()
        bank_emb, bank_reports, _ = image_embeddings(pre, arm.checkpoint, c.data, c.data.train_split, 32)
        query_emb, refs, ids = image_embeddings(pre, arm.checkpoint, c.data, split, 32)
        if ids != generated[arm.name]["id"]:
            raise RuntimeError("the held-out split was read in two different orders")
        name = f"nearest_neighbour_{arm.name}"
        generated[name] = {"id": ids, "reference": refs,
                           "generated": nearest_neighbour_reports(query_emb, bank_emb, bank_reports)}
        result["arms"][name] = {"embed_seconds": round(time.perf_counter() - t0, 1)}
    for name, g in generated.items():
        scored = score_reports(g["reference"], g["generated"], num_bootstrap=args.num_bootstrap)
        result["arms"].setdefault(name, {}).update(scored)
        # How many different reports the arm wrote: a decoder blind to the image writes one template.
        result["arms"][name]["distinct_reports"] = len(set(g["generated"]))
        result["arms"][name]["examples"] = [{"id": i, "reference": r, "generated": t}
                                            for i, r, t in list(zip(g["id"], g["reference"], g["generated"]))[:3]]
    result["num_reports"] = len(generated[arms[0].name]["id"])
    # Every other trained arm against the first, paired on the same volumes.
    ref_arm = arms[0].name
    result["differences"] = {
        f"{a.name} - {ref_arm}": paired_differences(generated[ref_arm]["reference"], generated[ref_arm]["generated"],
                                                     generated[a.name]["generated"], num_bootstrap=args.num_bootstrap)
        for a in arms[1:]}
    if args.workdir:
        for name, g in generated.items():
            with open(root / f"generated_{name}.csv", "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["id", "reference", "generated"])
                w.writerows(zip(g["id"], g["reference"], g["generated"]))
    return result


def table(result: dict) -> str:
    lines = [f"Report generation on {result['num_reports']} held-out '{result['split']}' volumes "
             f"[95% bootstrap CI over volumes; METEOR has none]; {result['config']['steps']} steps per trained arm",
             f"{'figure':<20}" + "".join(f"{a:<26}" for a in result["arms"])]
    for k in SHOWN:
        row = f"{k:<20}"
        for a in result["arms"]:
            v = result["arms"][a]["figures"][k]
            ci = result["arms"][a]["intervals"].get(k)
            cell = f"{v:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci and math.isfinite(ci[0]) else "")
            row += f"{cell:<26}"
        lines.append(row)
    for pair, d in result.get("differences", {}).items():
        lines.append(f"{pair} (paired, same volumes and resamples): " + ", ".join(
            f"{k} {d['difference'][k]:+.3f} [{d['intervals'][k][0]:+.3f}, {d['intervals'][k][1]:+.3f}]"
            for k in SHOWN if k in d["intervals"]))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo-dir", default="demo_out", help="the folder `make demo` wrote (raw/, run/)")
    parser.add_argument("--encoder", action="append", default=[], metavar="NAME=CONFIG_FILE:VARIANT[@CHECKPOINT_DIR]",
                        help="an image-encoder arm (repeatable); default: t3d=configs/t3d.py:demo@DEMO_DIR/run/"
                             "checkpoints and random=configs/t3d.py:demo")
    parser.add_argument("--no-nearest-neighbour", action="store_true",
                        help="skip the nearest-neighbour baseline of each pretrained arm")
    parser.add_argument("--steps", type=int, default=None, help="train steps per arm (default: the config's)")
    parser.add_argument("--split", default="valid", help="held-out split to score")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every trained arm, e.g. generate.method=greedy")
    parser.add_argument("--workdir", default=None, help="folder of the runs (default: a temporary one)")
    parser.add_argument("--num-bootstrap", type=int, default=200)
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    args = parser.parse_args(argv)
    from bench.compare_methods import write_json
    from t3d_jax.console import quiet_library_logs

    quiet_library_logs()
    result = run(args)
    print(table(result))
    if args.out:
        print(f"wrote {write_json(args.out, result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
