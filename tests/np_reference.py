"""float64 NumPy references of the divergences, written from their definitions (docs/design.md),
shared by the loss tests and the teacher-cache tests."""

import numpy as np


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    z = x - x.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_kl_rows(p, q):
    """sum_v p log(p / q), with 0 log 0 = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0)
    return terms.sum(-1)


def np_divergence_rows(name, ps, pt, beta=0.5):
    """Per-position kl, reverse_kl, cakld, jsd or ce of two float64 distributions [..., F]
    (student ps, teacher pt), or None for another name."""
    if name == "kl":
        return np_kl_rows(pt, ps)
    if name == "reverse_kl":
        return np_kl_rows(ps, pt)
    if name == "cakld":
        return beta * np_kl_rows(ps, pt) + (1 - beta) * np_kl_rows(pt, ps)
    if name == "jsd":
        if beta in (0, 1):  # TRL's generalized JSD: forward KL at 0, reverse KL at 1
            return np_kl_rows(pt, ps) if beta == 0 else np_kl_rows(ps, pt)
        m = beta * pt + (1 - beta) * ps
        return beta * np_kl_rows(pt, m) + (1 - beta) * np_kl_rows(ps, m)
    if name == "ce":
        return -(pt * np.log(ps)).sum(-1)
    return None
