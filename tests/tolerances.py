"""Bounds for comparing float32 results computed in different orders (meshes, processes,
scanned vs unrolled layers), each derived from the arithmetic, not from one machine's output.

Float32 reassociation: a mesh regroups the sums of a step (over tokens, heads, the
vocabulary), and regrouping a sum of n terms moves it by at most (n - 1) x 2^-24 of the sum of
its magnitudes (Higham, "Accuracy and Stability of Numerical Algorithms", 4.2). The longest
chains in the tests' models, a few hundred tokens per weight gradient behind 2-4 layers of
~100-term dots forward and back, give n of order 2^11; two regroupings compared: 2^12 x 2^-24.
Each value is bounded relative to the largest magnitude of its tensor.
"""

import numpy as np

from soft_jax.train.run_config import default_config

REASSOC = 2.0 ** -12


def adam_step_bound(t: int) -> float:
    """Largest |m_hat / sqrt(v_hat)| of bias-corrected Adam at step t (the default b1, b2),
    whatever the gradients: by Cauchy-Schwarz sqrt(sum a_i^2 / b_i) over the weights a_i, b_i
    of the two moments (1.0 at t = 1)."""
    b1, b2 = default_config().optimizer.b1, default_config().optimizer.b2
    i = np.arange(1, t + 1)
    a = (1 - b1) * b1 ** (t - i) / (1 - b1 ** t)
    b = (1 - b2) * b2 ** (t - i) / (1 - b2 ** t)
    return float(np.sqrt(np.sum(a * a / b)))


def adam_divergence_bound(lrs) -> float:
    """How far two AdamW runs (no weight decay) whose gradients differ only by rounding can
    place a weight after the steps with learning rates `lrs`: each step moves it by at most
    lr_t x adam_step_bound(t), and where a gradient is below the rounding noise its sign (so a
    step of ~lr) may differ, so twice the sum of those steps."""
    return 2 * sum(lr * adam_step_bound(t) for t, lr in enumerate(lrs, 1))
