"""Float64 NumPy oracles for the objectives (independent of JAX).

Each function returns the loss *and* its hand-derived gradients. The hand-derived gradients are
themselves checked against central finite differences of the float64 loss in the tests, so the
oracle does not rest on the same algebra as the code it checks (JAX autodiff).

Token matching is written as explicit Python loops over examples, view pairs and tokens, a
deliberately different formulation from the vectorised scatter/gather in t3d_jax.losses.tma.
"""

from __future__ import annotations

import math

import numpy as np


def _logsumexp(x, axis):
    m = np.max(x, axis=axis, keepdims=True)
    return np.squeeze(m, axis) + np.log(np.sum(np.exp(x - m), axis=axis))


def _softmax(x, axis):
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def _scale(logit_scale, max_scale):
    clamped = max_scale is not None and logit_scale >= math.log(max_scale)
    scale = max_scale if clamped else math.exp(logit_scale)
    return scale, (0.0 if clamped else scale)  # scale, d scale / d logit_scale


# --------------------------------------------------------------------------- contrastive


def clip_loss(img, txt, logit_scale, max_scale=100.0):
    """Symmetric InfoNCE, mean over views. img [B,V,D], txt [B,D]. Returns loss, d_img, d_txt, d_ls."""
    img = np.asarray(img, np.float64)
    txt = np.asarray(txt, np.float64)
    batch, views, _ = img.shape
    scale, dscale_dls = _scale(float(logit_scale), max_scale)
    loss, d_img, d_txt, d_scale = 0.0, np.zeros_like(img), np.zeros_like(txt), 0.0
    eye = np.eye(batch)
    norm = 1.0 / (2 * batch * views)
    for v in range(views):
        sims = img[:, v] @ txt.T
        logits = scale * sims
        pos = np.diag(logits)
        loss += norm * (np.sum(_logsumexp(logits, 1) - pos) + np.sum(_logsumexp(logits, 0) - pos))
        g_logits = norm * ((_softmax(logits, 1) - eye) + (_softmax(logits, 0) - eye))
        d_img[:, v] += scale * g_logits @ txt
        d_txt += scale * g_logits.T @ img[:, v]
        d_scale += np.sum(g_logits * sims)
    return loss, d_img, d_txt, d_scale * dscale_dls


def siglip_loss(img, txt, logit_scale, logit_bias, max_scale=100.0):
    """SigLIP loss, sum over pairs / B, mean over views. Returns loss, d_img, d_txt, d_ls, d_bias."""
    img = np.asarray(img, np.float64)
    txt = np.asarray(txt, np.float64)
    batch, views, _ = img.shape
    scale, dscale_dls = _scale(float(logit_scale), max_scale)
    signs = 2.0 * np.eye(batch) - 1.0
    loss, d_img, d_txt, d_scale, d_bias = 0.0, np.zeros_like(img), np.zeros_like(txt), 0.0, 0.0
    norm = 1.0 / (batch * views)
    for v in range(views):
        sims = img[:, v] @ txt.T
        z = signs * (scale * sims + logit_bias)
        loss += norm * np.sum(np.logaddexp(0.0, -z))  # -log sigmoid(z)
        g_logits = -norm * signs / (1.0 + np.exp(z))  # d/dlogits of -log sigmoid(sign*logits)
        d_img[:, v] += scale * g_logits @ txt
        d_txt += scale * g_logits.T @ img[:, v]
        d_scale += np.sum(g_logits * sims)
        d_bias += np.sum(g_logits)
    return loss, d_img, d_txt, d_scale * dscale_dls, d_bias


# --------------------------------------------------------------------------------- TMA


def sinkhorn(scores, epsilon, iters):
    """SwAV Sinkhorn-Knopp on scores [M, K] (all tokens of the global batch).

    Q = exp(s/eps)^T normalised to total mass 1, then `iters` times: every prototype row to
    mass 1/K, every token column to mass 1/M. Returned transposed and times M, so each token's
    target distribution sums to 1 and each prototype receives ~M/K.
    """
    scores = np.asarray(scores, np.float64)
    tokens, k = scores.shape
    q = np.exp((scores - scores.max()) / epsilon).T
    q /= q.sum()
    for _ in range(iters):
        q /= q.sum(axis=1, keepdims=True)
        q /= k
        q /= q.sum(axis=0, keepdims=True)
        q /= tokens
    return (q * tokens).T


def match_tokens(token_index, boxes, grid):
    """Explicit loops: list of (b, v, n, w, n') with token n of view v matched to kept token n' of w."""
    token_index = np.asarray(token_index)
    boxes = np.asarray(boxes, np.float64)
    grid = np.asarray(grid)
    batch, views, _ = token_index.shape
    pairs = []
    for b in range(batch):
        for v in range(views):
            lo_v, hi_v = boxes[b, v, 0], boxes[b, v, 1]
            for w in range(views):
                if w == v:
                    continue
                lo_w, hi_w = boxes[b, w, 0], boxes[b, w, 1]
                for n, flat in enumerate(token_index[b, v]):
                    cell = np.array(np.unravel_index(int(flat), tuple(grid)))
                    centre = lo_v + (cell + 0.5) / grid * (hi_v - lo_v)
                    if not np.all((centre >= lo_w) & (centre < hi_w)):
                        continue
                    target = np.floor((centre - lo_w) / (hi_w - lo_w) * grid).astype(int)
                    target = np.minimum(target, grid - 1)
                    target_flat = np.ravel_multi_index(tuple(target), tuple(grid))
                    kept = np.nonzero(token_index[b, w] == target_flat)[0]
                    if kept.size:
                        pairs.append((b, v, n, w, int(kept[0])))
    return pairs


def tma_loss(u, prototypes, token_index, boxes, grid, *, temperature, epsilon, iters,
             hist_weight=0.0, targets=None, target_u=None):
    """TMA loss and gradients w.r.t. u [B,V,N,D] and the (normalised) prototypes [K,D].

    L = L_tok + hist_weight * L_hist with
      L_tok  = -1/|P| sum_{(b,v,n,w,n') in P} sum_k q[b,v,n,k] log p[b,w,n',k]
      L_hist = mean_{b, v != w} KL(mean_n q[b,v] || mean_n p[b,w]).
    q (Sinkhorn targets over all B*V*N tokens) is a constant for the gradient; `targets`
    overrides it (so finite differences can hold q fixed, as the stop-gradient does);
    `target_u` [B,V,N,D] (the text-free embeddings) gives the scores the Sinkhorn targets use.
    Returns loss, l_tok, l_hist, d_u, d_prototypes, q, pairs.
    """
    u = np.asarray(u, np.float64)
    protos = np.asarray(prototypes, np.float64)
    batch, views, tokens, _ = u.shape
    k = protos.shape[0]
    scores = u @ protos.T  # [B,V,N,K]
    p = _softmax(scores / temperature, -1)
    logp = np.log(p)
    target_scores = scores if target_u is None else np.asarray(target_u, np.float64) @ protos.T
    q = sinkhorn(target_scores.reshape(-1, k), epsilon, iters).reshape(scores.shape)
    if targets is not None:
        q = np.asarray(targets, np.float64)
    pairs = match_tokens(token_index, boxes, grid)

    g_scores = np.zeros_like(scores)
    l_tok = 0.0
    if pairs:
        norm = 1.0 / len(pairs)
        for b, v, n, w, m in pairs:
            target = q[b, v, n]
            l_tok -= norm * np.sum(target * logp[b, w, m])
            # d/ds of -sum_k q_k log softmax(s/T)_k = (p * sum(q) - q) / T
            g_scores[b, w, m] += norm * (p[b, w, m] * target.sum() - target) / temperature

    l_hist = 0.0
    if hist_weight and views > 1:
        norm = hist_weight / (batch * views * (views - 1))
        for b in range(batch):
            for v in range(views):
                qbar = q[b, v].mean(0)
                for w in range(views):
                    if w == v:
                        continue
                    pbar = p[b, w].mean(0)
                    l_hist += norm / hist_weight * np.sum(qbar * (np.log(qbar) - np.log(pbar)))
                    g_pbar = -norm * qbar / pbar
                    # p_n = softmax(s_n / T): dL/ds_nj = p_nj (g_j - sum_k g_k p_nk) / (N T)
                    pn = p[b, w]
                    inner = (pn * g_pbar).sum(-1, keepdims=True)
                    g_scores[b, w] += pn * (g_pbar - inner) / (tokens * temperature)

    d_u = g_scores @ protos
    d_protos = np.einsum("bvnk,bvnd->kd", g_scores, u)
    loss = l_tok + hist_weight * l_hist
    return loss, l_tok, l_hist, d_u, d_protos, q, pairs


def finite_difference(fn, x, eps=1e-6):
    """Central differences of a scalar float64 function w.r.t. every entry of array x."""
    x = np.array(x, np.float64)
    grad = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        orig = x[idx]
        x[idx] = orig + eps
        up = fn(x)
        x[idx] = orig - eps
        down = fn(x)
        x[idx] = orig
        grad[idx] = (up - down) / (2 * eps)
    return grad


def assert_close(actual, expected, rtol, what=""):
    """max |actual - expected| / max |expected| <= rtol (error relative to the reference's scale)."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    scale = max(np.max(np.abs(expected)), 1e-12)
    err = np.max(np.abs(actual - expected)) / scale
    assert err <= rtol, f"{what}: max abs error / max |ref| = {err:.3g} > {rtol}"
