"""Helpers shared by the reference tests (fp32 bit views, random fp32 over many binades)."""

import numpy as np


def bits32(x):
    return np.ascontiguousarray(x, np.float32).view(np.uint32)


def f32_from_bits(b):
    return np.asarray(b, np.uint32).view(np.float32)


def random_f32(rng, n, lo_exp=-140, hi_exp=128):
    """Random fp32 over many binades, both signs."""
    mant = rng.uniform(1.0, 2.0, n)
    exp = rng.integers(lo_exp, hi_exp, n)
    sign = rng.choice([-1.0, 1.0], n)
    with np.errstate(over="ignore"):
        return (sign * np.ldexp(mant, exp)).astype(np.float32)
