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


def choose_words(draws, word_index, prob, max_tokens=None):
    """[B, L] bool: word w chosen when draws[k, w] < prob; with max_tokens, an example's chosen
    words go in increasing order of their draws until the first one that would pass max_tokens
    tokens, which and all after it stay unchosen."""
    b, length = word_index.shape
    chosen = np.zeros((b, length), bool)
    for k in range(b):
        words = sorted({int(w) for w in word_index[k] if w >= 0 and draws[k, w] < prob}, key=lambda w: draws[k, w])
        total = 0
        for w in words:
            size = int(np.sum(word_index[k] == w))
            if max_tokens is not None and total + size > max_tokens:
                break
            total += size
            chosen[k] = chosen[k] | (word_index[k] == w)
    return chosen


def gelu(x):
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def layer_norm(x, scale, bias, eps):
    mean = np.mean(x, axis=-1, keepdims=True)
    var = np.mean((x - mean) ** 2, axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def mlm_head(x, p):
    """BERT's prediction head on one state vector (or a stack): dense, GELU (erf), LayerNorm
    (eps 1e-12), vocabulary logits."""
    h = gelu(np.asarray(x, np.float64) @ p["w1"] + p["b1"])
    return layer_norm(h, p["scale"], p["shift"], 1e-12) @ p["w2"] + p["b2"]


def mlm_term(states, targets, chosen, p):
    """L_senMLM's token term on the full [B, L, H] states: mean over the chosen tokens, token by
    token, of the cross-entropy of the head's logits (every position considered, no gathering)."""
    total, count = 0.0, 0
    for k in range(states.shape[0]):
        for i in range(states.shape[1]):
            if chosen[k, i]:
                z = mlm_head(states[k, i], p)
                total += float(np.log(np.sum(np.exp(z - z.max()))) + z.max() - z[targets[k, i]])
                count += 1
    return total / max(count, 1)


def upsample2(x, axis):
    """x2 linear upsampling of one axis, half-pixel centres, edges clamped (np.interp per line)."""
    x = np.moveaxis(np.asarray(x, np.float64), axis, -1)
    n = x.shape[-1]
    src = np.clip((np.arange(2 * n) + 0.5) / 2.0 - 0.5, 0, n - 1)
    out = np.apply_along_axis(lambda line: np.interp(src, np.arange(n), line), -1, x)
    return np.moveaxis(out, -1, axis)


def conv3d_same(x, kernel, bias):
    """[X, Y, Z, Ci] with a [k, k, k, Ci, Co] kernel, zero padding k // 2, stride 1."""
    k = kernel.shape[0]
    r = k // 2
    xp = np.pad(x, [(r, r)] * 3 + [(0, 0)])
    sx, sy, sz, _ = x.shape
    out = np.zeros((sx, sy, sz, kernel.shape[-1])) + bias
    for dx in range(k):
        for dy in range(k):
            for dz in range(k):
                out += xp[dx:dx + sx, dy:dy + sy, dz:dz + sz] @ kernel[dx, dy, dz]
    return out


def upsample_head(grid_tokens, convs, out, plan):
    """MG-3D's decoder on one example [gx, gy, gz, H], in the code's order: per block conv,
    InstanceNorm (no affine, eps 1e-5), LeakyReLU(0.01), x2 linear upsampling of the plan's
    axes; then the 1^3 conv at full resolution."""
    x = np.asarray(grid_tokens, np.float64)
    for (w, b), factor in zip(convs, plan):
        x = conv3d_same(x, w, b)
        x = (x - x.mean(axis=(0, 1, 2))) / np.sqrt(x.var(axis=(0, 1, 2)) + 1e-5)
        x = np.where(x >= 0, x, 0.01 * x)
        for axis, f in enumerate(factor):
            if f == 2:
                x = upsample2(x, axis)
    return conv3d_same(x, *out)
