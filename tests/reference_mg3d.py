"""Float64 NumPy oracles for MG-3D's pieces (t3d_jax/models/mg3d.py, t3d_jax/losses/mg3d.py).

Written as explicit loops over examples, tokens, sentences and patient pairs, a different
formulation from the vectorised JAX code; gradients are taken by central finite differences of
these float64 functions (tests/reference_numpy.finite_difference). The SSM oracle follows the
released code's form: for each pair, the L1 mean over all n_k x n_l entries of
|P * (sim + dis) - G * sim|.
"""

from __future__ import annotations

import math

import numpy as np


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def gate(a, b, p, key_mask=None):
    """One gating layer: out_i = v_i * mean_{valid j} sigmoid(q_i . k_j / sqrt(D)); a [Na, da], b [Nb, db]."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    dim = p["wq"].shape[1]
    out = np.zeros((a.shape[0], p["wv"].shape[1]))
    for i in range(a.shape[0]):
        q = a[i] @ p["wq"] + p["bq"]
        v = a[i] @ p["wv"] + p["bv"]
        gates = [sigmoid(q @ (b[j] @ p["wk"] + p["bk"]) / math.sqrt(dim))
                 for j in range(b.shape[0]) if key_mask is None or key_mask[j]]
        out[i] = v * (np.mean(gates) if gates else 0.0)
    return out


def gate_stack(a, b, params, key_mask=None):
    for p in params:
        a = gate(a, b, p, key_mask)
    return a


def sentence_aggregation(g, sentences, valid, params):
    """(sentence-wise features [S, H], tanh(mean over valid)) for one example."""
    x = np.stack([gate_stack(np.asarray(g, np.float64)[None], sentences[s][None], params)[0]
                  for s in range(sentences.shape[0])])
    keep = [s for s in range(sentences.shape[0]) if valid[s]]
    return x, np.tanh(np.mean(x[keep], axis=0) if keep else np.zeros(x.shape[1]))


def sentence_pool(states, sentence_index, num_sentences):
    """[B, L, D], [B, L] -> ([B, S, D], [B, S] bool)."""
    b, length, d = states.shape
    out, valid = np.zeros((b, num_sentences, d)), np.zeros((b, num_sentences), bool)
    for k in range(b):
        for s in range(num_sentences):
            rows = [i for i in range(length) if sentence_index[k, i] == s]
            if rows:
                out[k, s] = np.mean(np.asarray(states[k, rows], np.float64), axis=0)
                valid[k, s] = True
    return out, valid


def voxel_mask(token_mask, grid, patch):
    """[B, N] token mask (row-major grid) -> [B, X, Y, Z] voxel mask, token by token."""
    b = token_mask.shape[0]
    out = np.zeros((b, *(g * p for g, p in zip(grid, patch))), bool)
    for k in range(b):
        for n in range(token_mask.shape[1]):
            if token_mask[k, n]:
                gx, gy, gz = n // (grid[1] * grid[2]), (n // grid[2]) % grid[1], n % grid[2]
                out[k, gx * patch[0]:(gx + 1) * patch[0], gy * patch[1]:(gy + 1) * patch[1],
                    gz * patch[2]:(gz + 1) * patch[2]] = True
    return out


def mim_loss(pred, target, vmask):
    """(loss, d pred): mean squared error over the masked voxels and channels."""
    pred, target = np.asarray(pred, np.float64), np.asarray(target, np.float64)
    count = vmask.sum() * pred.shape[-1]
    diff = (pred - target) * vmask[..., None]
    return np.sum(diff ** 2) / count, 2.0 * diff / count


def mlm_loss(logits, targets, chosen):
    """(loss, d logits): mean cross-entropy over the chosen tokens."""
    logits = np.asarray(logits, np.float64)
    count = max(int(chosen.sum()), 1)
    loss, grad = 0.0, np.zeros_like(logits)
    for k, i in zip(*np.nonzero(chosen)):
        z = logits[k, i] - np.max(logits[k, i])
        p = np.exp(z) / np.sum(np.exp(z))
        loss -= math.log(p[targets[k, i]]) / count
        p[targets[k, i]] -= 1.0
        grad[k, i] = p / count
    return loss, grad


def cos(a, b):
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return 0.0 if na == 0 or nb == 0 else float(a @ b / (na * nb))


def sentence_cosine_term(pred, target, valid):
    terms = [1.0 - cos(pred[k, s], target[k, s]) for k in range(pred.shape[0]) for s in range(pred.shape[1])
             if valid[k, s]]
    return float(np.mean(terms)) if terms else 0.0


def ssm_loss(e, v, valid, *, groups=1, high=0.9, low=0.6):
    """L_SSM over the pairs k < l of the same group (contiguous blocks of B / groups)."""
    e, v = np.asarray(e, np.float64), np.asarray(v, np.float64)
    b = e.shape[0]
    size = b // groups
    losses = []
    for k in range(b):
        for l in range(k + 1, b):
            if k // size != l // size:
                continue
            sk = [s for s in range(e.shape[1]) if valid[k, s]]
            sl = [t for t in range(e.shape[1]) if valid[l, t]]
            if not sk or not sl:
                continue
            total = 0.0
            for s in sk:
                for t in sl:
                    g = cos(e[k, s], e[l, t])
                    p = cos(v[k, s], v[l, t])
                    sim, dis = float(g >= high), float(g <= low)
                    total += abs(p * (sim + dis) - g * sim)
            losses.append(total / (len(sk) * len(sl)))
    return float(np.mean(losses)) if losses else 0.0
