"""Batched decoding of a :class:`ReportDecoder`: greedy, beam search and top-p sampling.

Each method is one ``lax.while_loop`` over a fixed number of steps (``max_new_tokens``), so a
whole batch decodes in one compiled program whatever the reports' lengths: no Python loop per
token and one compile per (shapes, :class:`DecodeConfig`). The loop ends early once every
sequence of the batch is finished (greedy / sampling: it emitted ``eos_id``; beam search: no
live beam can still beat the k-th finished one). A finished sequence is padded with ``pad_id``.

Every sequence starts from ``bos_id`` at position 0 and all sequences of a batch advance in
lock-step, so one scalar position indexes the KV cache of the whole batch
(:meth:`TextDecoder.decode_step`): per layer the self-attention keys/values in a fixed
``[B, 1 + max_new_tokens]`` buffer, the cross-attention keys/values computed once per image
(beam search: once per image, then repeated for its k beams; reordering beams permutes only
the self-attention buffers, since the beams of one image share its context).
``use_cache=False`` decodes the same way but recomputes the whole prefix at every step (the
full forward over the fixed-length buffer): the reference of the cache test and of the bench.

Beam search (``method='beam'``) is the vectorised form of Hugging Face's / t5x's: per step
the 2k best continuations of the k live beams; those ending in EOS among the k best become
finished hypotheses scored ``sum log p / length ** length_penalty`` (length = generated tokens
including EOS, as ``transformers``' ``length_penalty``), the k best others stay live. The early
stop is exact (``early_stopping='never'`` in ``transformers``): it stops only when the best
live beam, even at its most favourable length, cannot beat the k-th finished hypothesis. At
``max_new_tokens`` the live beams are scored as they are and compete with the finished ones.
With ``num_beams=1`` and ``length_penalty=0`` this is greedy decoding (tested); with another
length penalty it need not be (a short finished hypothesis can win on normalised score).

Top-p sampling (``method='sample'``): logits / temperature, the smallest set of tokens whose
probability reaches ``top_p`` (nucleus sampling), one draw. Each sequence has its own key
(``rng`` split per example, or a ``[B]`` array of keys), folded with the position, so a
sequence's draws do not depend on the rest of the batch.

Outputs (:func:`decode`): ``tokens`` int32 [B, max_new_tokens] (EOS included, then pad),
``lengths`` [B] (tokens up to and including EOS), ``scores`` [B] (sum of log-probabilities;
beam search: the length-penalised score); beam search adds ``beams`` [B, k, T] and
``beam_scores`` [B, k], best first.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

METHODS = ("greedy", "beam", "sample")
NEG_INF = -1.0e30  # a finite "minus infinity": -inf - -inf would be nan in the score updates


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    method: str = "greedy"
    max_new_tokens: int = 64
    bos_id: int = 2  # the project's WordPiece: [CLS] = 2, [SEP] = 3, [PAD] = 0 (build_vocab)
    eos_id: int = 3
    pad_id: int = 0
    num_beams: int = 4
    length_penalty: float = 1.0
    top_p: float = 0.9
    temperature: float = 1.0
    use_cache: bool = True
    # > 0: a token that would repeat an n-gram of this size already in the sequence gets
    # probability 0 (transformers' no_repeat_ngram_size; R2Gen's beam search blocks trigrams).
    no_repeat_ngram_size: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"decoding method {self.method!r} unknown; choose one of {METHODS}")
        if self.max_new_tokens < 1 or self.num_beams < 1:
            raise ValueError(f"max_new_tokens and num_beams must be >= 1, got {self.max_new_tokens}, "
                             f"{self.num_beams}")
        if not 0.0 < self.top_p <= 1.0 or self.temperature <= 0:
            raise ValueError(f"top_p must be in (0, 1] and temperature > 0, got {self.top_p}, {self.temperature}")
        if self.no_repeat_ngram_size < 0 or self.no_repeat_ngram_size == 1:
            raise ValueError(f"no_repeat_ngram_size must be 0 (off) or >= 2, got {self.no_repeat_ngram_size}")


def ban_repeated_ngrams(logits: jax.Array, tokens: jax.Array, pos, n: int) -> jax.Array:
    """`logits` [R, V] of position pos + 1 with every token that would complete an n-gram already
    present in `tokens[:, :pos + 1]` [R, T] set to NEG_INF (fixed shapes: all windows are
    compared, those not yet complete masked out)."""
    rows, length = tokens.shape
    if length < n:
        return logits
    last = jax.lax.dynamic_slice_in_dim(tokens, jnp.maximum(pos - (n - 2), 0), n - 1, axis=1)  # [R, n-1]
    starts = jnp.arange(length - n + 1)
    windows = jnp.stack([tokens[:, k:length - n + 1 + k] for k in range(n - 1)], -1)  # [R, W, n-1]
    following = tokens[:, n - 1:]  # [R, W]: the token after each window
    seen = (starts + n - 1 <= pos)[None] & (pos >= n - 2)
    match = jnp.all(windows == last[:, None, :], -1) & seen
    banned = jnp.zeros(logits.shape, jnp.int32).at[jnp.arange(rows)[:, None], following].max(match.astype(jnp.int32))
    return jnp.where(banned > 0, NEG_INF, logits)


# ------------------------------------------------------------------------------- steppers
class _Stepper:
    """``step(state, tokens [R, T+1], pos) -> (logits [R, V], state)`` with or without the cache.

    ``R`` rows = batch (x beams); ``tokens[:, pos]`` is the last known token and the logits
    are those of position ``pos + 1``. ``reorder(state, rows)`` follows a beam permutation.
    """

    def __init__(self, model, context, context_mask, *, rows_per_example: int, length: int, use_cache: bool,
                 no_repeat_ngram_size: int = 0):
        self.text = model.text
        self.use_cache = use_cache
        self.no_repeat_ngram_size = int(no_repeat_ngram_size)
        rep = lambda x: None if x is None else jnp.repeat(x, rows_per_example, axis=0)  # noqa: E731
        if use_cache:
            # Cross K/V computed once per image, then repeated for its beams (a no-op for 1 row).
            cache = self.text.init_cache(context, context_mask, length)
            cache = jax.tree.map(rep, cache) if rows_per_example > 1 else cache
            self.init_state = cache
        else:
            self.init_state = {"context": rep(context), "context_mask": rep(context_mask)}

    def step(self, state, tokens, pos):
        logits, state = self._step(state, tokens, pos)
        if self.no_repeat_ngram_size:
            logits = ban_repeated_ngrams(logits, tokens, pos, self.no_repeat_ngram_size)
        return logits, state

    def _step(self, state, tokens, pos):
        if self.use_cache:
            token = jax.lax.dynamic_index_in_dim(tokens, pos, axis=1, keepdims=False)
            return self.text.decode_step(token, pos, state)
        h = self.text(tokens, state["context"], state["context_mask"], return_hidden=True)
        h = jax.lax.dynamic_index_in_dim(h, pos, axis=1, keepdims=False)
        return self.text.logits(h), state

    def reorder(self, state, rows):
        if not self.use_cache:
            return state
        take = lambda x: jnp.take(x, rows, axis=0)  # noqa: E731
        return dict(state, k=[take(x) for x in state["k"]], v=[take(x) for x in state["v"]])


# ------------------------------------------------------------------------------ sampling
def top_p_logits(logits: jax.Array, top_p: float) -> jax.Array:
    """Logits with every token outside the nucleus (smallest set reaching ``top_p``) at NEG_INF."""
    if top_p >= 1.0:
        return logits
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each sorted token
    threshold = jnp.min(jnp.where(before < top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits >= threshold, logits, NEG_INF)


def _example_keys(rng, batch: int) -> jax.Array:
    if rng is None:
        raise ValueError("method='sample' needs rng (a key, or [B] keys, one per example)")
    rng = jnp.asarray(rng)
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return rng if rng.ndim == 1 else jax.random.split(rng, batch)
    return rng if rng.ndim == 2 else jax.random.split(rng, batch)  # raw uint32 keys


# ------------------------------------------------------------------------ greedy / sample
def _greedy_or_sample(stepper: _Stepper, batch: int, cfg: DecodeConfig, keys) -> dict:
    total = cfg.max_new_tokens + 1
    tokens = jnp.full((batch, total), cfg.pad_id, jnp.int32).at[:, 0].set(cfg.bos_id)
    init = (jnp.int32(0), tokens, stepper.init_state, jnp.zeros(batch, bool), jnp.zeros(batch, jnp.float32),
            jnp.zeros(batch, jnp.int32))

    def cond(carry):
        pos, _, _, done, _, _ = carry
        return (pos < cfg.max_new_tokens) & ~jnp.all(done)

    def body(carry):
        pos, tokens, state, done, score, length = carry
        logits, state = stepper.step(state, tokens, pos)
        logp = jax.nn.log_softmax(logits, axis=-1)
        if cfg.method == "sample":
            scaled = top_p_logits(logits / cfg.temperature, cfg.top_p)
            step_keys = jax.vmap(lambda k: jax.random.fold_in(k, pos))(keys)
            nxt = jax.vmap(jax.random.categorical)(step_keys, scaled).astype(jnp.int32)
        else:
            nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        score = score + jnp.where(done, 0.0, jnp.take_along_axis(logp, nxt[:, None], axis=-1)[:, 0])
        length = length + (~done).astype(jnp.int32)
        nxt = jnp.where(done, cfg.pad_id, nxt)
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, nxt[:, None], pos + 1, axis=1)
        return pos + 1, tokens, state, done | (nxt == cfg.eos_id), score, length

    _, tokens, _, _, score, length = jax.lax.while_loop(cond, body, init)
    return {"tokens": tokens[:, 1:], "lengths": length, "scores": score}


# ---------------------------------------------------------------------------- beam search
def _gather_beams(x: jax.Array, index: jax.Array) -> jax.Array:
    """x [B, n, ...], index [B, m] -> [B, m, ...]."""
    return jax.vmap(lambda a, i: jnp.take(a, i, axis=0))(x, index)


def _beam(stepper: _Stepper, batch: int, cfg: DecodeConfig) -> dict:
    k, steps = cfg.num_beams, cfg.max_new_tokens
    total = steps + 1
    alpha = float(cfg.length_penalty)
    tokens = jnp.full((batch, k, total), cfg.pad_id, jnp.int32).at[:, :, 0].set(cfg.bos_id)
    alive_logp = jnp.tile(jnp.array([0.0] + [NEG_INF] * (k - 1), jnp.float32), (batch, 1))
    init = dict(pos=jnp.int32(0), alive=tokens, alive_logp=alive_logp, state=stepper.init_state,
                fin=tokens, fin_scores=jnp.full((batch, k), NEG_INF, jnp.float32))

    def penalised(logp, length):
        return logp / jnp.asarray(length, jnp.float32) ** alpha

    def cond(c):
        pos = c["pos"]
        # Best score a live beam can still reach: its log-prob only falls; the length that
        # favours it is the longest for alpha >= 0, the next (pos + 1) for alpha < 0.
        best_length = steps if alpha >= 0 else pos + 1
        reachable = penalised(jnp.max(c["alive_logp"], axis=1), best_length)
        done = jnp.min(c["fin_scores"], axis=1) >= reachable
        return (pos < steps) & ~jnp.all(done)

    def body(c):
        pos = c["pos"]
        logits, state = stepper.step(c["state"], c["alive"].reshape(batch * k, total), pos)
        vocab = logits.shape[-1]
        logp = jax.nn.log_softmax(logits, axis=-1).reshape(batch, k, vocab)
        cand = (c["alive_logp"][:, :, None] + logp).reshape(batch, k * vocab)
        top_logp, top_index = jax.lax.top_k(cand, 2 * k)  # [B, 2k], best first
        origin, token = top_index // vocab, (top_index % vocab).astype(jnp.int32)
        seqs = _gather_beams(c["alive"], origin)
        seqs = jax.lax.dynamic_update_slice_in_dim(seqs, token[:, :, None], pos + 1, axis=2)
        is_eos = token == cfg.eos_id
        # Finished: EOS continuations among the k best (transformers' rule), merged with the old.
        new_fin = jnp.where(is_eos & (jnp.arange(2 * k) < k)[None], penalised(top_logp, pos + 1), NEG_INF)
        fin_scores, fin_index = jax.lax.top_k(jnp.concatenate([c["fin_scores"], new_fin], axis=1), k)
        fin = _gather_beams(jnp.concatenate([c["fin"], seqs], axis=1), fin_index)
        # Live: the k best continuations that did not end.
        alive_logp, alive_index = jax.lax.top_k(jnp.where(is_eos, NEG_INF, top_logp), k)
        alive = _gather_beams(seqs, alive_index)
        rows = (jnp.arange(batch)[:, None] * k + jnp.take_along_axis(origin, alive_index, axis=1)).reshape(-1)
        return dict(pos=pos + 1, alive=alive, alive_logp=alive_logp, state=stepper.reorder(state, rows),
                    fin=fin, fin_scores=fin_scores)

    c = jax.lax.while_loop(cond, body, init)
    # Live beams that reached max_new_tokens compete as they are; stopped early, they cannot win.
    alive_scores = jnp.where((c["pos"] == steps) & (c["alive_logp"] > NEG_INF / 2),
                             penalised(c["alive_logp"], steps), NEG_INF)
    scores, index = jax.lax.top_k(jnp.concatenate([c["fin_scores"], alive_scores], axis=1), k)
    beams = _gather_beams(jnp.concatenate([c["fin"], c["alive"]], axis=1), index)[:, :, 1:]
    ended = jnp.cumsum(beams == cfg.eos_id, axis=-1)
    lengths = jnp.sum((ended == 0) | ((ended == 1) & (beams == cfg.eos_id)), axis=-1).astype(jnp.int32)
    return {"tokens": beams[:, 0], "lengths": lengths[:, 0], "scores": scores[:, 0], "beams": beams,
            "beam_scores": scores}


# ---------------------------------------------------------------------------------- API
def decode(model, visual: jax.Array, visual_mask: jax.Array | None = None, *, config: DecodeConfig,
           rng: jax.Array | None = None) -> dict:
    """Decodes a batch of visual token sequences [B, N, D_v] with a :class:`ReportDecoder`.

    Traceable: call it inside ``nnx.jit`` (or use :func:`make_decode_fn` / :func:`generate`).
    ``rng``: sampling only; a key or [B] keys (one per example). Returns the dict of the
    module docstring.
    """
    context, cmask = model.encode_visual(visual, visual_mask)
    batch = context.shape[0]
    rows = config.num_beams if config.method == "beam" else 1
    stepper = _Stepper(model, context, cmask, rows_per_example=rows, length=config.max_new_tokens + 1,
                       use_cache=config.use_cache, no_repeat_ngram_size=config.no_repeat_ngram_size)
    if config.method == "beam":
        return _beam(stepper, batch, config)
    keys = _example_keys(rng, batch) if config.method == "sample" else None
    return _greedy_or_sample(stepper, batch, config, keys)


def make_decode_fn(graphdef: nnx.GraphDef, config: DecodeConfig) -> Callable:
    """A pure ``fn(params_state, visual, visual_mask, rng) -> dict`` for ``jax.jit`` with shardings
    (``graphdef, state = nnx.split(model)``): what a trainer's evaluator or a launcher jits."""
    def fn(state, visual, visual_mask=None, rng=None):
        return decode(nnx.merge(graphdef, state), visual, visual_mask, config=config, rng=rng)
    return fn


@functools.lru_cache(maxsize=32)
def _compiled(graphdef: nnx.GraphDef, config: DecodeConfig):
    return jax.jit(make_decode_fn(graphdef, config))


def generate(model, visual, visual_mask=None, *, config: DecodeConfig, rng=None) -> dict:
    """:func:`decode`, jitted once per (model structure, config) and cached across calls."""
    graphdef, state = nnx.split(model)
    return _compiled(graphdef, config)(state, visual, visual_mask, rng)
