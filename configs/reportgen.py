r"""Report generation: the `reportgen` task (t3d_jax/tasks/reportgen.py), a GPT-2 decoder that
cross-attends to a pretrained image encoder's tokens.

  python launch/train.py --config=configs/reportgen.py:demo --workdir demo_out/reportgen
  python launch/train.py --config=configs/reportgen.py:demo,finetune ...      # the encoder trains too
  python launch/generate_reports.py --config=configs/reportgen.py:demo --workdir demo_out/reportgen \
      --input my_cts/ --output reports.jsonl
  python bench/reportgen_baselines.py --demo-dir demo_out      # the demo table against two baselines

`:VARIANT[,MODE]`: the variants of configs/common.py; MODE is how the image encoder trains:
`frozen` (default: `optim.freeze = ("^image_encoder/",)`, only the decoder learns, so the
figures measure what the pretraining put into the encoder) or `finetune` (the encoder at
`optim.lr_multipliers.image`, 0.1 by default).

The image encoder is `model.image.*` (ViT3D, ResNet3D, Swin3D or MS-VLM by name), read from a
pretraining checkpoint with `init_from.checkpoint` + `init_from.checkpoint_params =
("image_encoder",)` (parameters only). The decoder is `model.decoder.*`: a size by name
(t3d_jax/models/report_decoder.py, GPT-2 layout with cross-attention) or a local Hugging Face
GPT-2 folder (`init_from.hf_gpt2_dir`, whose vocabulary must then be the data's), an optional
Perceiver resampler (`model.decoder.resampler_latents`). Reports are the data's WordPiece ids:
[CLS] starts a report, [SEP] ends it.

The `demo` variant reads `demo_out/prepared_reportgen`: the demo's synthetic volumes prepared
with a report vocabulary built from their reports (`demo_out/reportgen_vocab.txt`), the
reports as written and long enough never to be cut (224 ids); its image settings are
configs/t3d.py:demo's, whose checkpoint (`demo_out/run/checkpoints`) it starts from when that
folder exists. docs/report_generation.md, "Training and evaluation", has the commands.
"""

import os

import ml_collections

from configs import common

MODES = ("frozen", "finetune")
DEMO_PRETRAINING = "demo_out/run/checkpoints"  # launch/demo.sh's pretraining (configs/t3d.py:demo)


def get_config(arg: str = "demo") -> ml_collections.ConfigDict:
    variant, _, mode = (arg or "demo").partition(",")
    mode = mode or "frozen"
    if mode not in MODES:
        raise ValueError(f"configs/reportgen.py: unknown mode {mode!r}; choose one of {MODES} "
                         f"(e.g. --config=configs/reportgen.py:demo,finetune)")
    c = common.get_config(variant or "demo", config_file="configs/reportgen.py")
    c.task = "reportgen"
    c.model.name = "reportgen"
    c.data.num_views = 1
    c.model.image.patch_dropout = 0.0  # the decoder reads every token
    c.model.decoder = ml_collections.ConfigDict({
        "size": "tiny",  # tiny | demo | small | base (GPT-2 124M + cross-attention)
        "hidden_size": 0,  # > 0 overrides the size's width (and num_layers / num_heads theirs)
        "num_layers": 0,
        "num_heads": 0,
        "vocab_size": 0,  # 0 = the data's tokenizer's (dataset.json, else preprocess.vocab)
        "max_position_embeddings": 512,
        "resampler_latents": 0,  # > 0: a Perceiver resampler of this many latents
        "resampler_layers": 2,
        "hidden_dropout": 0.1,
        "attention_dropout": 0.0,  # > 0 only with model.attention = 'reference'
    })
    # Decoding in evaluation and launch/generate_reports.py (t3d_jax/models/decoding.py).
    c.generate = ml_collections.ConfigDict({
        "method": "beam",  # greedy | beam | sample
        "num_beams": 3,
        "length_penalty": 1.0,
        "top_p": 0.9,
        "temperature": 1.0,
        "max_new_tokens": 0,  # 0 = preprocess.max_len - 1
        "no_repeat_ngram_size": 3,  # never repeat a trigram (R2Gen's beam search blocks them); 0 = off
        "batch_size": 16,
    })
    c.init_from.checkpoint_params = ("image_encoder",)
    c.init_from.hf_gpt2_dir = ""
    c.optim.lr_multipliers = ml_collections.ConfigDict({"image": 0.1, "decoder": 1.0})
    c.optim.freeze = ("^image_encoder/",) if mode == "frozen" else ()
    c.eval.evaluators = ("reportgen",)
    c.eval.reportgen_nearest_neighbour = False  # also score the retrieval baseline (needs a CLIP/T3D checkpoint)
    if c.variant == "tiny":
        c.model.decoder.size = "tiny"
        c.model.decoder.max_position_embeddings = 128
        c.generate.method = "greedy"
        c.generate.max_new_tokens = 8
        c.generate.batch_size = 8
    elif c.variant == "demo":
        c.data.dir = "demo_out/prepared_reportgen"
        c.data.report_sentence_drop = 0.0  # the decoder learns the reports as written
        c.data.report_shuffle = False
        c.preprocess.vocab = "demo_out/reportgen_vocab.txt"
        # The demo reports take 204 ids at most (mean 101) with this vocabulary: none is cut.
        c.preprocess.max_len = 224
        c.preprocess.report_order = "as_written"
        # 128 wide, 2 layers: ~0.7M parameters, a few minutes on the 2-core CPU.
        c.model.decoder.size = "tiny"
        c.model.decoder.hidden_size = 128
        c.model.decoder.num_heads = 4
        if os.path.isdir(DEMO_PRETRAINING):
            c.init_from.checkpoint = DEMO_PRETRAINING
        c.train.global_batch_size = 16
        c.train.num_steps = 300
        c.optim.lr = 1e-3
        c.optim.warmup_steps = 30
        c.optim.weight_decay = 0.01
        c.checkpoint.every_steps = 300
    elif c.variant == "small":
        c.model.decoder.size = "small"
        c.model.decoder.resampler_latents = 32
        c.preprocess.max_len = 256
    elif c.variant == "base":
        c.model.decoder.size = "base"
        c.model.decoder.resampler_latents = 64
        c.preprocess.max_len = 256
        c.train.global_batch_size = 256
    c.model.text.max_len = c.preprocess.max_len  # the data check compares the reports' length with it
    return c
