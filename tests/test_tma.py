"""TMA loss against the float64 NumPy oracle (tests/reference_numpy.py), plus its parts.

Tolerance for float32 JAX vs float64 NumPy: `RTOL = 1e-5`, relative to the largest reference
entry. The Sinkhorn targets exponentiate s / epsilon with epsilon = 0.05, which multiplies the
float32 rounding of the scores (~6e-8) by up to 1/epsilon = 20 before three normalisation
rounds; measured errors are below 5e-7 (loss and gradients), so 1e-5 leaves room for
reduction-order changes and still catches any wrong term (a dropped match or pair moves the
loss by >1e-2).
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import reference_numpy as ref
from t3d_jax.losses import tma

RTOL = 1e-5
HYPER = dict(temperature=0.1, sinkhorn_epsilon=0.05, sinkhorn_iters=3)


def assert_close(actual, expected, rtol=RTOL, what=""):
    ref.assert_close(actual, expected, rtol, what)


def _normalised(rng, *shape):
    x = rng.standard_normal(shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _boundary_margin(boxes, grid):
    """Smallest distance of any cell centre to a box edge or a cell edge of another view.

    Random boxes are redrawn until it is > 1e-4, so float32 (JAX) and float64 (NumPy) agree on
    every floor() and every inside test.
    """
    grid = np.asarray(grid)
    margin = np.inf
    batch, views = boxes.shape[:2]
    cells = np.stack(np.meshgrid(*[np.arange(g) for g in grid], indexing="ij"), -1).reshape(-1, 3)
    for b, v, w in itertools.product(range(batch), range(views), range(views)):
        lo_v, hi_v, lo_w, hi_w = boxes[b, v, 0], boxes[b, v, 1], boxes[b, w, 0], boxes[b, w, 1]
        centre = lo_v + (cells + 0.5) / grid * (hi_v - lo_v)
        rel = (centre - lo_w) / (hi_w - lo_w) * grid
        margin = min(margin, np.min(np.abs(rel - np.round(rel))))
    return margin


def _random_case(seed, batch=4, views=2, grid=(3, 3, 3), keep=20, dim=8, k=6):
    rng = np.random.default_rng(seed)
    while True:
        size = rng.uniform(0.5, 1.0, (batch, views, 3))
        lo = rng.uniform(0.0, 1.0, (batch, views, 3)) * (1.0 - size)
        boxes = np.stack([lo, lo + size], axis=2)
        if _boundary_margin(boxes, grid) > 1e-4:
            break
    cells = int(np.prod(grid))
    token_index = np.stack([np.stack([rng.permutation(cells)[:keep] for _ in range(views)])
                            for _ in range(batch)]).astype(np.int32)
    u = _normalised(rng, batch, views, keep, dim)
    protos = _normalised(rng, k, dim)
    return dict(u=u.astype(np.float32), protos=protos.astype(np.float32),
                boxes=boxes.astype(np.float32), token_index=token_index, grid=grid)


def _oracle(case, hist_weight=0.0, targets=None):
    return ref.tma_loss(case["u"], case["protos"], case["token_index"], case["boxes"], case["grid"],
                        temperature=HYPER["temperature"], epsilon=HYPER["sinkhorn_epsilon"],
                        iters=HYPER["sinkhorn_iters"], hist_weight=hist_weight, targets=targets)


_match = jax.jit(tma.match_tokens, static_argnums=2)
_swapped = jax.jit(tma.swapped_prediction_loss)


def _jax_value_and_grad(grid, hist_weight):
    def f(u, protos, boxes, token_index):
        out = tma.tma_loss(u, protos, boxes, grid, token_index, hist_weight=hist_weight, **HYPER)
        return out.loss, out
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))


# ------------------------------------------------------------------- the oracle itself


def test_oracle_gradient_matches_finite_differences():
    case = _random_case(1, batch=2, grid=(2, 2, 2), keep=6, dim=4, k=3)
    _, _, _, d_u, d_c, q, pairs = _oracle(case, hist_weight=0.5)
    assert len(pairs) > 4

    def loss_u(u):
        return _oracle(dict(case, u=u), hist_weight=0.5, targets=q)[0]

    def loss_c(c):
        return _oracle(dict(case, protos=c), hist_weight=0.5, targets=q)[0]

    np.testing.assert_allclose(d_u, ref.finite_difference(loss_u, case["u"]), rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(d_c, ref.finite_difference(loss_c, case["protos"]), rtol=1e-5, atol=1e-8)


# ------------------------------------------------------------------------- Sinkhorn


def test_sinkhorn_matches_oracle_and_token_marginals():
    rng = np.random.default_rng(2)
    scores = (_normalised(rng, 3, 2, 40, 8) @ _normalised(rng, 5, 8).T).astype(np.float32)
    q = np.asarray(tma.sinkhorn_targets(jnp.asarray(scores), 0.05, 3))
    assert_close(q, ref.sinkhorn(scores.reshape(-1, 5), 0.05, 3).reshape(q.shape), what="q")
    np.testing.assert_allclose(q.sum(-1), 1.0, rtol=1e-5)  # each token: a distribution


def test_sinkhorn_converges_to_equal_cluster_mass():
    rng = np.random.default_rng(3)
    scores = _normalised(rng, 240, 8) @ _normalised(rng, 6, 8).T  # M = 240 tokens, K = 6
    mass = {it: np.asarray(tma.sinkhorn_targets(jnp.asarray(scores, jnp.float32), 0.05, it)).sum(0)
            for it in (1, 3, 200)}
    raw = np.exp(scores / 0.05)
    raw = (raw / raw.sum(1, keepdims=True)).sum(0)  # a plain softmax: unequal cluster mass
    assert np.max(np.abs(raw - 40)) > 10
    # The prototype marginal approaches M/K = 40 per prototype; the token marginal stays 1.
    errors = {it: np.max(np.abs(m - 40.0)) for it, m in mass.items()}
    assert errors[3] < errors[1] < np.max(np.abs(raw - 40))
    assert errors[200] < 0.05


def test_sinkhorn_blocks_gradients():
    scores = jnp.asarray(np.random.default_rng(4).standard_normal((10, 4)), jnp.float32)
    grad = jax.grad(lambda s: jnp.sum(tma.sinkhorn_targets(s, 0.05, 3) * jnp.arange(4.0)))(scores)
    assert np.all(np.asarray(grad) == 0.0)


# ------------------------------------------------------------------------- matching


def _flat(x, y, z, grid=(4, 2, 2)):
    return (x * grid[1] + y) * grid[2] + z


def test_matching_for_known_boxes():
    """Grid (4,2,2); view 0 = whole volume, view 1 = x in [0.5,1), y in [0,0.5), z whole.

    View 0 cell centres along x are 1/8, 3/8, 5/8, 7/8 -> cells 2, 3 fall in view 1's x range,
    at view-1 cells floor((5/8-1/2)/(1/2)*4) = 1 and floor((7/8-1/2)/(1/2)*4) = 3. Along y,
    view 0 centres 1/4, 3/4 -> only y=0 is inside [0, 1/2), at view-1 cell floor(1/4/(1/2)*2) = 1.
    View 1 centres along x are 9/16, 11/16, 13/16, 15/16 -> view-0 cells 2, 2, 3, 3; along y,
    1/8, 3/8 -> view-0 cell 0, 0. z is identical in both views.
    """
    grid = (4, 2, 2)
    boxes = np.array([[[[0, 0, 0], [1, 1, 1]], [[0.5, 0, 0], [1, 0.5, 1]]]], np.float32)
    x01 = {2: 1, 3: 3}
    x10 = {0: 2, 1: 2, 2: 3, 3: 3}
    expected = set()
    for (x, tx), z in itertools.product(x01.items(), range(2)):
        expected.add((0, _flat(x, 0, z), 1, _flat(tx, 1, z)))
    for (x, tx), y, z in itertools.product(x10.items(), range(2), range(2)):
        expected.add((1, _flat(x, y, z), 0, _flat(tx, 0, z)))
    assert len(expected) == 4 + 16

    # Patch dropout: view 1 keeps every cell except (3,1,0), in a shuffled order.
    rng = np.random.default_rng(5)
    kept0 = rng.permutation(16)
    kept1 = rng.permutation([c for c in range(16) if c != _flat(3, 1, 0)])[:15]
    kept0 = kept0[:15]  # same count per view; view 0 drops one cell too
    token_index = np.stack([kept0, kept1])[None].astype(np.int32)
    slot, valid = map(np.asarray, _match(jnp.asarray(token_index), jnp.asarray(boxes), grid))
    got = set()
    for v, w, n in zip(*np.nonzero(valid[0])):
        got.add((int(v), int(token_index[0, v, n]), int(w), int(token_index[0, w, slot[0, v, w, n]])))
    kept = [set(kept0.tolist()), set(kept1.tolist())]
    want = {(v, c, w, t) for v, c, w, t in expected if c in kept[v] and t in kept[w]}
    assert _flat(3, 1, 0) not in kept[1] and (0, _flat(3, 0, 0), 1, _flat(3, 1, 0)) in expected
    assert got == want
    pairs = ref.match_tokens(token_index, boxes, grid)
    assert {(v, int(token_index[0, v, n]), w, int(token_index[0, w, m])) for _, v, n, w, m in pairs} == want


def test_matching_matches_oracle_for_random_boxes():
    case = _random_case(6, batch=3, views=3, grid=(3, 4, 2), keep=18)
    slot, valid = map(np.asarray, _match(
        jnp.asarray(case["token_index"]), jnp.asarray(case["boxes"]), case["grid"]))
    got = {(b, v, n, w, int(slot[b, v, w, n])) for b, v, w, n in zip(*np.nonzero(valid))}
    want = set(ref.match_tokens(case["token_index"], case["boxes"], case["grid"]))
    assert len(want) > 20 and got == want


def test_disjoint_views_give_zero_loss_not_nan():
    case = _random_case(7, batch=1, grid=(2, 2, 2), keep=8)
    boxes = np.array([[[[0, 0, 0], [0.5, 1, 1]], [[0.5, 0, 0], [1, 1, 1]]]], np.float32)
    (loss, out), (d_u, _) = _jax_value_and_grad(case["grid"], 0.0)(
        case["u"], case["protos"], boxes, case["token_index"])
    assert float(loss) == 0.0 and np.all(np.asarray(d_u) == 0.0) and float(out.matched_fraction) == 0.0


# ----------------------------------------------------------------------- the loss


@pytest.mark.parametrize("views,hist_weight", [(2, 0.0), (2, 0.3), (3, 0.0)])
def test_loss_and_gradients_match_oracle(views, hist_weight):
    case = _random_case(8 + views, views=views)
    (loss, out), (d_u, d_c) = _jax_value_and_grad(case["grid"], hist_weight)(
        case["u"], case["protos"], case["boxes"], case["token_index"])
    r_loss, r_tok, r_hist, r_du, r_dc, _, pairs = _oracle(case, hist_weight)
    assert len(pairs) > 30
    assert_close(loss, r_loss, what="loss")
    assert_close(out.token_loss, r_tok, what="token loss")
    if hist_weight:
        assert_close(out.hist_loss, r_hist, what="hist loss")
    assert_close(d_u, r_du, what="d u")
    assert_close(d_c, r_dc, what="d prototypes")
    batch, _, keep = case["token_index"].shape
    assert float(out.matched_fraction) == pytest.approx(len(pairs) / (batch * views * (views - 1) * keep))


def test_tokens_outside_the_overlap_contribute_nothing():
    case = _random_case(11, batch=2)
    pairs = ref.match_tokens(case["token_index"], case["boxes"], case["grid"])
    used = {(b, v, n) for b, v, n, _, _ in pairs} | {(b, w, m) for b, _, _, w, m in pairs}
    batch, views, keep = case["token_index"].shape
    unused = [t for t in itertools.product(range(batch), range(views), range(keep)) if t not in used]
    assert unused and used

    slot, valid = _match(jnp.asarray(case["token_index"]), jnp.asarray(case["boxes"]), case["grid"])
    rng = np.random.default_rng(12)
    q = rng.dirichlet(np.ones(6), (batch, views, keep)).astype(np.float32)
    log_p = np.log(rng.dirichlet(np.ones(6), (batch, views, keep))).astype(np.float32)
    base, _ = _swapped(q, log_p, slot, valid)

    def perturbed(tokens):
        q2, lp2 = q.copy(), log_p.copy()
        for t in tokens:
            q2[t] = rng.dirichlet(np.ones(6))
            lp2[t] = np.log(rng.dirichlet(np.ones(6)))
        return float(_swapped(q2, lp2, slot, valid)[0])

    assert perturbed(unused) == float(base)
    assert abs(perturbed([next(iter(used))]) - float(base)) > 1e-4  # the check can fail

    # Through the whole loss: no gradient reaches a token that is never a prediction target
    # (targets are stop-gradient, so being a match source alone gives no gradient either).
    targets = {(b, w, m) for b, _, _, w, m in pairs}
    (_, _), (d_u, _) = _jax_value_and_grad(case["grid"], 0.0)(
        case["u"], case["protos"], case["boxes"], case["token_index"])
    d_u = np.asarray(d_u)
    for t in itertools.product(range(batch), range(views), range(keep)):
        assert (np.abs(d_u[t]).max() > 0) == (t in targets), t


# ------------------------------------------------------------------- sharded batch


@pytest.mark.parametrize("mesh_shape", [(2, 4)])
def test_sharded_equals_single_device(mesh_shape):
    case = _random_case(13, batch=8, grid=(2, 3, 2), keep=10)
    fn = _jax_value_and_grad(case["grid"], 0.3)
    (loss, out), grads = fn(case["u"], case["protos"], case["boxes"], case["token_index"])
    mesh = jax.make_mesh(mesh_shape, ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    batch = NamedSharding(mesh, P(("data", "fsdp")))
    with jax.set_mesh(mesh):
        args = [jax.device_put(case[k], batch) for k in ("u", "boxes", "token_index")]
        (s_loss, s_out), s_grads = fn(args[0], case["protos"], args[1], args[2])
        hlo = fn.lower(args[0], case["protos"], args[1], args[2]).compile().as_text()
        q_single = tma.sinkhorn_targets(jnp.einsum("bvnd,kd->bvnk", case["u"], case["protos"]), 0.05, 3)
        q_sharded = jax.jit(lambda u: tma.sinkhorn_targets(
            jnp.einsum("bvnd,kd->bvnk", u, case["protos"]), 0.05, 3))(args[0])
    assert len(s_grads[0].sharding.device_set) == 8
    # Matching and the swapped prediction stay on each device; only K-sized Sinkhorn sums (and
    # the scalar loss) cross devices: no all-gather of tokens.
    assert "all-reduce" in hlo and "all-gather" not in hlo
    assert_close(q_sharded, q_single, rtol=1e-5, what="sinkhorn q")
    assert_close(s_loss, loss, rtol=1e-5, what="loss")
    assert_close(s_out.hist_loss, out.hist_loss, rtol=1e-5, what="hist")
    assert_close(s_grads[0], grads[0], rtol=1e-5, what="d u")
    assert_close(s_grads[1], grads[1], rtol=1e-5, what="d prototypes")
    # And the sharded result is the oracle's global-batch loss, not a per-shard average.
    assert_close(s_loss, _oracle(case, 0.3)[0], what="loss vs oracle")


def test_text_free_targets_and_collapse_monitors_match_float64():
    """target_emb: the Sinkhorn targets come from it, the predictions from token_emb; the
    monitors are the mean target entropy and the perplexity of the mean prediction."""
    case = _random_case(7)
    u0 = _normalised(np.random.default_rng(8), *case["u"].shape[:3], case["u"].shape[-1]).astype(np.float32)
    out = jax.jit(lambda u, c, b, t, u0: tma.tma_loss(u, c, b, case["grid"], t, target_emb=u0, **HYPER))(
        case["u"], case["protos"], case["boxes"], case["token_index"], u0)
    expected = ref.tma_loss(case["u"], case["protos"], case["token_index"], case["boxes"], case["grid"],
                            temperature=HYPER["temperature"], epsilon=HYPER["sinkhorn_epsilon"],
                            iters=HYPER["sinkhorn_iters"], target_u=u0)
    assert_close(out.token_loss, expected[1], what="token loss with text-free targets")
    q = expected[5]
    assert_close(out.target_entropy, -np.mean(np.sum(q * np.log(q), axis=-1)), what="target entropy")
    s = case["u"].astype(np.float64) @ case["protos"].astype(np.float64).T / HYPER["temperature"]
    p = np.exp(s - s.max(-1, keepdims=True))
    p = (p / p.sum(-1, keepdims=True)).reshape(-1, p.shape[-1]).mean(0)
    assert_close(out.prototype_perplexity, np.exp(-np.sum(p * np.log(p))), what="prototype perplexity")
    with pytest.raises(ValueError, match="target_emb must be shaped"):
        tma.tma_loss(case["u"], case["protos"], case["boxes"], case["grid"], case["token_index"],
                     target_emb=u0[:, :1], **HYPER)
