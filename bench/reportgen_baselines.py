r"""Report generation on the demo data against two baselines, in one run.

  python bench/reportgen_baselines.py [--demo-dir demo_out] [--steps N] [--out reportgen_demo.json]

From the folder `make demo` wrote (DEMO_DIR/raw: the synthetic volumes and reports, DEMO_DIR/run:
the configs/t3d.py:demo pretraining), it

1. builds the report vocabulary from the *training* reports (launch/build_vocab.py's
   `build_vocab`, 1,000 pieces asked; DEMO_DIR/reportgen_vocab.txt) and prepares the volumes with
   it (DEMO_DIR/prepared_reportgen: reports as written, 224 ids, none cut), unless both exist;
2. trains configs/reportgen.py:demo twice, same data, steps, batch and seed:
   `t3d`    the decoder on the pretraining's image encoder, frozen (what the T3D pretraining
            gives a report decoder);
   `random` the same decoder on a randomly initialised, frozen image encoder (what the image
            contributes at all: this arm can only learn the reports' common text);
3. scores, on the held-out split, both arms' generated reports and
   `nearest_neighbour` for each held-out volume the training report of the most similar training
            volume by the pretraining's image embedding (the classic retrieval baseline);
   with the `reportgen` evaluator's scoring (BLEU-1..4, METEOR, ROUGE-L, CIDEr, clinical-efficacy
   P/R/F1; percentile intervals over --num-bootstrap resamples of the held-out volumes).

Prints the table and writes JSON (--out), with a few generated reports beside their references.
With --workdir, an arm already trained there to the step budget is not trained again (the
trainer resumes at its last step): rerunning only generates and scores.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import pathlib
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ARMS = ("t3d", "random", "nearest_neighbour")
SHOWN = ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr",
         "CE_precision_macro", "CE_recall_macro", "CE_f1_macro", "CE_f1_micro")


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


def run(args, log=print) -> dict:
    import jax

    from bench.compare_methods import apply_overrides, config_from_file, quiet_training
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
    apply_overrides(config, args.set)
    quiet_training(config)
    prepare(demo, config, log)
    checkpoints = str((demo / "run" / "checkpoints").absolute())
    if not os.path.isdir(checkpoints):
        raise SystemExit(f"{checkpoints}: no pretraining checkpoints; run `make demo` first")
    root = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="reportgen_baselines_"))
    split = args.split
    result = {"data": config.data.dir, "pretraining": checkpoints, "split": split,
              "num_bootstrap": args.num_bootstrap,
              "config": {"steps": int(config.train.num_steps), "global_batch_size": int(config.train.global_batch_size),
                         "lr": float(config.optim.lr), "seed": int(config.seed),
                         "decoder": dict(config.model.decoder.to_dict()), "generate": dict(config.generate.to_dict()),
                         "freeze": list(config.optim.freeze)},
              "arms": {}}
    generated: dict[str, dict] = {}
    for arm in ARMS[:2]:
        c = config.copy_and_resolve_references()
        c.init_from.checkpoint = checkpoints if arm == "t3d" else ""
        workdir = root / arm
        log(f"== {arm}: {c.train.num_steps} steps -> {workdir}")
        t0 = time.perf_counter()
        trained = train_and_evaluate(c, workdir)
        train_s = time.perf_counter() - t0
        losses = [h["loss"] for h in trained.history if "loss" in h]
        if not losses and (workdir / "metrics.jsonl").is_file():  # an arm trained before: its own log
            import json

            losses = [r["loss"] for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
                      if "loss" in r]
        mesh = mesh_lib.make_mesh(c.mesh)
        model, _ = params_lib.restore_model(c, workdir / "checkpoints", None, mesh=mesh)
        t0 = time.perf_counter()
        with jax.set_mesh(mesh):
            generated[arm] = generate_split(model, c, mesh, split)
        gen_s = time.perf_counter() - t0
        result["arms"][arm] = {"train_seconds": round(train_s, 1), "generate_seconds": round(gen_s, 1),
                               "final_loss": float(losses[-1]) if losses else math.nan}
        log(f"   trained {train_s:.0f} s (final loss {result['arms'][arm]['final_loss']:.3f}); "
            f"generated {len(generated[arm]['id'])} reports in {gen_s:.0f} s")

    # The retrieval baseline: the pretraining's own image embeddings, training reports as the bank.
    pre_cfg = config_from_file(str(REPO / "configs" / "t3d.py"), "demo")
    pre_cfg.data.dir = config.data.dir
    pre_cfg.preprocess.max_len = config.preprocess.max_len
    pre_cfg.model.text.max_len = config.preprocess.max_len
    bank_emb, bank_reports, _ = image_embeddings(pre_cfg, checkpoints, config.data, config.data.train_split, 32)
    query_emb, refs, ids = image_embeddings(pre_cfg, checkpoints, config.data, split, 32)
    if ids != generated["t3d"]["id"]:
        raise RuntimeError("the held-out split was read in two different orders")
    generated["nearest_neighbour"] = {"id": ids, "reference": refs,
                                      "generated": nearest_neighbour_reports(query_emb, bank_emb, bank_reports)}
    for arm in ARMS:
        g = generated[arm]
        scored = score_reports(g["reference"], g["generated"], num_bootstrap=args.num_bootstrap)
        result["arms"].setdefault(arm, {}).update(scored)
        result["arms"][arm]["examples"] = [{"id": i, "reference": r, "generated": t}
                                           for i, r, t in list(zip(g["id"], g["reference"], g["generated"]))[:3]]
    result["num_reports"] = len(ids)
    if args.workdir:
        for arm in ARMS:
            with open(root / f"generated_{arm}.csv", "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["id", "reference", "generated"])
                w.writerows(zip(generated[arm]["id"], generated[arm]["reference"], generated[arm]["generated"]))
    return result


def table(result: dict) -> str:
    lines = [f"Report generation on {result['num_reports']} held-out '{result['split']}' volumes "
             f"[95% bootstrap CI over volumes; METEOR has none]; {result['config']['steps']} steps per trained arm",
             f"{'figure':<20}" + "".join(f"{a:<26}" for a in ARMS)]
    for k in SHOWN:
        row = f"{k:<20}"
        for a in ARMS:
            v = result["arms"][a]["figures"][k]
            ci = result["arms"][a]["intervals"].get(k)
            cell = f"{v:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci and math.isfinite(ci[0]) else "")
            row += f"{cell:<26}"
        lines.append(row)
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo-dir", default="demo_out", help="the folder `make demo` wrote (raw/, run/)")
    parser.add_argument("--steps", type=int, default=None, help="train steps per arm (default: the config's)")
    parser.add_argument("--split", default="valid", help="held-out split to score")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for both trained arms, e.g. generate.method=greedy")
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
