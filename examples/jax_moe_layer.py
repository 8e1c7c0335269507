"""An expert-parallel MoE layer in JAX whose tokens travel between ``jax.jit`` functions
through moecomm's ``MoeAlltoAll.dispatch`` / ``combine``.

    mpiexec -n 2 python examples/jax_moe_layer.py

Each rank routes its own tokens (a jitted router: logits, top-k, softmax over the k),
``dispatch`` sends every token with its expert ids and weights to the ranks owning those
experts, a jitted expert function computes the local experts as einsums
(``silu(x @ W1[e]) @ W2[e]``, weighted by the router), and ``combine`` sums the results
back on the token's rank. Arrays cross the boundary zero-copy both ways: JAX arrays into
moecomm through DLPack (JAX makes moecomm's stream wait for the computation producing
them: no ``block_until_ready``), moecomm's ``cupy.ndarray`` results into JAX through
``jax.dlpack.from_dlpack``, called inside ``with stream:`` so that CuPy orders the
stream moecomm wrote on before JAX's.

Checked against the same layer computed on one GPU for this rank's tokens with every
expert, in fp32 (no communication). The distributed path rounds each rank's weighted
expert sum to bf16 (the combine payload) and ``combine`` sums them in fp32 and rounds
once: with u = 2^-9, every element satisfies
``|got - want| <= 2u * (sum_j w_j |expert_j(x)| + |want|)`` (two roundings of partial
sums of at most top_k terms), plus 1e-5 of the magnitude for fp32 summation order.
Exits non-zero (on every rank) on a mismatch; without JAX it says so and exits with 2.
"""

import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # share the GPU with CuPy
try:
    import jax
    import jax.dlpack
    import jax.numpy as jnp
except ImportError as exc:
    print(f"jax_moe_layer: JAX is not installed here ({exc}); install jax with CUDA "
          "support (pip install 'jax[cuda12]') to run this example", file=sys.stderr)
    sys.exit(2)

import cupy  # noqa: E402
import numpy as np  # noqa: E402
from mpi4py import MPI  # noqa: E402

import moecomm  # noqa: E402
from moecomm.moe import MoeAlltoAll  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")  # fp32 means fp32 here

group = moecomm.init()
dev, rank, world = group.device_id, group.rank, group.size
gpus = [d for d in jax.devices() if d.platform == "gpu" and d.id == dev]
if not gpus:
    print(f"jax_moe_layer: JAX sees no GPU {dev} ({jax.devices()})", file=sys.stderr)
    sys.exit(2)
gpu = gpus[0]
cupy.cuda.Device(dev).use()  # JAX's start leaves the last GPU it set up current

H, FE, TOP_K, EPR = 256, 512, 2, 4          # hidden, expert FFN width, top-k, experts/rank
E = EPR * world
MAX_T = 64
T = [24 + 5 * r for r in range(world)]      # token counts differ per rank
RMAX = max(T)                               # the same on every rank, >= every T


def put(a):
    return jax.device_put(a, gpu)


w_rng = np.random.default_rng(1234)         # the same weights on every rank
Wg = put(w_rng.standard_normal((H, E)).astype(np.float32) / H ** 0.5)
W1 = put((w_rng.standard_normal((E, H, FE)) / H ** 0.5).astype(jnp.bfloat16))
W2 = put((w_rng.standard_normal((E, FE, H)) / FE ** 0.5).astype(jnp.bfloat16))
W1_local, W2_local = W1[rank * EPR:(rank + 1) * EPR], W2[rank * EPR:(rank + 1) * EPR]


@jax.jit
def route(x):
    """Router: top-k experts of each token and their softmax weights."""
    logits = x.astype(jnp.float32) @ Wg
    top, ids = jax.lax.top_k(logits, TOP_K)
    return ids.astype(jnp.int32), jax.nn.softmax(top, axis=-1)


def expert_outputs(x, w1, w2):
    """silu(x @ W1[e]) @ W2[e] for every expert e of w1/w2: [N, experts, H], fp32."""
    a = jax.nn.silu(jnp.einsum("nh,ehf->nef", x, w1, preferred_element_type=jnp.float32))
    return jnp.einsum("nef,efh->neh", a, w2.astype(jnp.float32))


def gates(ids, weights, first, count):
    """[N, count]: the router weight of expert first + e for each token (0 if not chosen;
    ids < 0, the sanitized ids of other ranks' experts and of padding rows, choose none)."""
    local = jnp.where(ids >= 0, ids - first, -1)
    return jnp.einsum("nk,nke->ne", weights, jax.nn.one_hot(local, count, dtype=jnp.float32))


@jax.jit
def local_experts(h, ids, weights):
    """This rank's experts on the received rows [world, RMAX, ...] -> the combine payload."""
    n = h.reshape(-1, H)
    g = gates(ids.reshape(-1, TOP_K), weights.reshape(-1, TOP_K), rank * EPR, EPR)
    y = jnp.einsum("ne,neh->nh", g, expert_outputs(n, W1_local, W2_local))
    return y.astype(jnp.bfloat16).reshape(h.shape)


@jax.jit
def one_gpu_layer(x, ids, weights):
    """The experts of the layer for this rank's tokens, every expert on this GPU, fp32:
    (output, magnitude). Takes the router's choice as computed once (a recomputation in
    another fusion could break a near-tie differently)."""
    g = gates(ids, weights, 0, E)
    o = expert_outputs(x, W1, W2)
    return jnp.einsum("ne,neh->nh", g, o), jnp.einsum("ne,neh->nh", g, jnp.abs(o))


@jax.jit
def compare(got, want, magnitude):
    err = jnp.abs(got.astype(jnp.float32) - want)
    bound = 2 * 2.0 ** -9 * (magnitude + jnp.abs(want)) + 1e-5 * magnitude
    return jnp.all(err <= bound), jnp.max(err / (magnitude + 1e-6))


stream = cupy.cuda.Stream(non_blocking=True)
# bf16 hidden states, int32 ids and fp32 weights: what the default sizing counts
a2a = MoeAlltoAll(group, MAX_T, TOP_K, E, hidden_size=H)
if rank == 0:
    print(f"jax_moe_layer: {E} experts (top-{TOP_K}) over {world} ranks, hidden {H}, "
          f"tokens per rank {T}")
results = []
for step in range(3):
    x = put(np.random.default_rng([step, rank]).standard_normal((T[rank], H))
            .astype(jnp.bfloat16))
    ids, weights = route(x)                     # asynchronous: nothing waits here
    # JAX arrays in: DLPack with stream=, so `stream` waits for route() on the device.
    h, rid, rw = a2a.dispatch(ids, [x, ids, weights], RMAX, invalid_token_expert_id=-1,
                              expert_id_payload_index=1, stream=stream)
    with stream:  # moecomm's arrays out: CuPy orders `stream` before JAX's stream
        h, rid, rw = (jax.dlpack.from_dlpack(a) for a in (h, rid, rw))
    y = local_experts(h, rid, rw)
    out = a2a.combine(y, RMAX, stream=stream)   # y (JAX) in, ordered as above
    with stream:
        out = jax.dlpack.from_dlpack(out)
    want, magnitude = one_gpu_layer(x, ids, weights)
    ok, worst = compare(out, want, magnitude)
    ok = bool(ok) and out.shape == (T[rank], H)
    results.append(ok)
    line = group.comm.gather(f"rank {rank}: {'OK' if ok else 'MISMATCH'} "
                             f"(max err / magnitude {float(worst):.2e})")
    if rank == 0:
        print(f"  step {step}: dispatch -> jitted experts -> combine vs one GPU: "
              + "; ".join(line))
stream.synchronize()
a2a.check_error(stream, synchronize=True)
ok = group.comm.allreduce(int(all(results)), op=MPI.MIN)
a2a.close()
if rank == 0:
    print(f"jax_moe_layer: {'OK' if ok else 'MISMATCH'}")
group.close()
sys.exit(0 if ok else 1)
