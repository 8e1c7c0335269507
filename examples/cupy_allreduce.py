"""The plain CuPy path: sum a bf16 array over the ranks, on a stream of your own.

    mpiexec -n 2 python examples/cupy_allreduce.py

Every rank builds every rank's input from one seed, so each can check the result against
NumPy: moecomm sums the peers in rank order in fp32 and rounds once, hence bit-exact.
Prints what it checked; exits non-zero (on every rank) on a mismatch.
"""

import sys

import cupy
import numpy as np
from mpi4py import MPI

import moecomm
from moecomm.allreduce import all_reduce, create_allreduce_workspace
from moecomm.tensors import bfloat16

group = moecomm.init()  # one rank per GPU (rank r takes device r % count)
tokens, hidden = 16, 4096
inputs = [np.random.default_rng([7, r]).standard_normal((tokens, hidden)).astype(bfloat16)
          for r in range(group.size)]
want = np.zeros((tokens, hidden), np.float32)
for x in inputs:  # rank order, fp32, one rounding at the end
    want += x.astype(np.float32)
want = want.astype(bfloat16)

stream = cupy.cuda.Stream(non_blocking=True)
with create_allreduce_workspace(group, max_token_num=tokens, hidden_dim=hidden) as ws:
    with stream:  # allocate and upload on the stream the op runs on
        bits = cupy.asarray(inputs[group.rank].view(np.uint16))
        x = cupy.ndarray(bits.shape, bfloat16, bits.data)  # CuPy holds bf16 as a view
        out = cupy.ndarray(bits.shape, bfloat16, cupy.empty_like(bits).data)
    for _ in range(3):  # repeated calls reuse the workspace
        all_reduce(x, ws, out=out, stream=stream)
    y = all_reduce(x, ws, stream=stream)  # a new output, allocated on `stream`
    stream.synchronize()
    ws.check()  # raises PeerTimeoutError if a peer never arrived
    ok = all(np.array_equal(cupy.ndarray(a.shape, np.uint16, a.data).get(), want.view(np.uint16))
             for a in (out, y))

ok = group.comm.allreduce(int(ok), op=MPI.MIN)
if group.rank == 0:
    print(f"cupy_allreduce: all_reduce of bf16 [{tokens}, {hidden}] over {group.size} ranks "
          f"(out= and new output) bit-exact against NumPy: {'OK' if ok else 'MISMATCH'}")
group.close()
sys.exit(0 if ok else 1)
