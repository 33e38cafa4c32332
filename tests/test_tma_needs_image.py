"""TMA's targets must need the image (docs/method.md, TMA step 3).

Both views of an example carry the same report. If the Sinkhorn targets came from the same
text-informed token embeddings as the predictions, the head could meet them from the report
alone. This test trains only the TMA head and its prototypes (the part that could cheat), on
visual tokens that are

* noise: fresh, independent between the two views, so nothing of view v is visible in view w;
* consistent: the same content at the same place in both views, plus a little noise (what a
  real volume's two crops give),

with real-looking reports: a fixed pool of random token-state sequences, one per example.

Expected (ln K is what a head that predicts nothing about the targets gets):
* targets from the text-free embeddings ('visual', the t3d task's default), noise tokens: the
  token loss stays at ln K or above (the targets are independent of all the head can see);
* the same, consistent tokens: the loss falls well below ln K (the image carries the answer);
* targets from the text-informed embeddings ('text_informed'), noise tokens: the loss falls
  below ln K anyway; the report alone solves it. This is the flaw the default avoids.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from t3d_jax.losses import tma as tma_lib
from t3d_jax.models.tma_head import TMAHead

K, WIDTH, TEXT_WIDTH, DIM = 8, 16, 16, 16
BATCH, VIEWS, GRID, TEXT_LEN, REPORTS = 32, 2, (2, 2, 2), 4, 64
TOKENS = math.prod(GRID)
STEPS = 200


def train_head(targets: str, tokens: str, seed: int = 0) -> list[float]:
    """Token-loss curve of the TMA head + prototypes trained alone on the given data."""
    rng = np.random.default_rng(seed)
    reports = rng.normal(size=(REPORTS, TEXT_LEN, TEXT_WIDTH)).astype(np.float32)
    head = TMAHead(WIDTH, TEXT_WIDTH, DIM, K, num_heads=2, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(head, nnx.Param)
    params = nnx.to_pure_dict(params)
    tx = optax.adam(3e-3)
    opt_state = tx.init(params)
    boxes = jnp.broadcast_to(jnp.asarray([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]), (BATCH, VIEWS, 2, 3))

    def loss_fn(params, visual, text):
        head = nnx.merge(graphdef, params)
        flat = visual.reshape(BATCH * VIEWS, TOKENS, WIDTH)
        text_rep = jnp.repeat(text, VIEWS, axis=0)
        u = head(flat, text_rep).reshape(BATCH, VIEWS, TOKENS, DIM)
        u0 = head(flat).reshape(BATCH, VIEWS, TOKENS, DIM) if targets == "visual" else None
        out = tma_lib.tma_loss(u, head.normalized_prototypes(), boxes, GRID, target_emb=u0)
        return out.token_loss, out

    @jax.jit
    def step(params, opt_state, visual, text):
        (loss, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, visual, text)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    curve = []
    for _ in range(STEPS):
        text = reports[rng.integers(0, REPORTS, BATCH)]
        if tokens == "noise":
            visual = rng.normal(size=(BATCH, VIEWS, TOKENS, WIDTH))
        else:
            content = rng.normal(size=(BATCH, 1, TOKENS, WIDTH))
            visual = content + 0.1 * rng.normal(size=(BATCH, VIEWS, TOKENS, WIDTH))
        params, opt_state, loss = step(params, opt_state, jnp.asarray(visual, jnp.float32), jnp.asarray(text))
        curve.append(float(loss))
    return curve


def tail(curve):
    return float(np.mean(curve[-30:]))


@pytest.fixture(scope="module")
def curves():
    return {(t, d): train_head(t, d) for t, d in
            [("visual", "noise"), ("visual", "consistent"), ("text_informed", "noise")]}


def test_text_free_targets_cannot_be_met_from_the_report(curves):
    assert tail(curves["visual", "noise"]) > 0.97 * math.log(K), curves["visual", "noise"][-5:]


def test_text_free_targets_are_met_when_the_views_share_content(curves):
    assert tail(curves["visual", "consistent"]) < 0.6 * math.log(K), curves["visual", "consistent"][-5:]


def test_text_informed_targets_are_met_from_the_report_alone(curves):
    """The reading the default replaced: noise images, and the loss still falls below ln K."""
    assert tail(curves["text_informed", "noise"]) < 0.8 * math.log(K), curves["text_informed", "noise"][-5:]
