"""A tensor-parallel MLP block in PyTorch whose row-parallel output is all-reduced by
moecomm together with the residual add, RMSNorm and FP8 quantization, in one kernel.

    mpiexec -n 2 python examples/torch_tp_mlp.py

Each rank holds a column shard of W1 and the matching row shard of W2 (Megatron-style):
``h = gelu(x @ W1[:, shard])`` needs no communication, ``h @ W2[shard]`` is this rank's
share of the output, and ``allreduce_fusion`` sums the shares and writes the residual
stream, its RMSNorm and FP8 e4m3 codes of it into torch tensors (a ``torch.float8_e4m3fn``
tensor for the codes), all zero-copy, on torch's current stream. The block runs eagerly,
then captured in a ``torch.cuda.CUDAGraph`` and replayed on new inputs.

Checked against one GPU computing the same block in fp32 (``x @ W1`` and ``h @ W2``
unsharded, no all-reduce):

- ``residual_out``: the TP block rounds ``pre = x @ W1_r``, ``h = gelu(pre)``, each
  rank's share and their sum to bf16 (unit roundoff u = 2^-9), then ``+ residual``; one
  GPU in fp32 rounds nothing. To first order an element is off by at most
  u * ((2|h| + 1.13|pre|) @ |W2| + 2|y| + |residual|) (|gelu'| <= 1.13), so every element
  must lie within 2^-7 * ((|h| + |pre|) @ |W2| + |y| + |residual|); and, as the
  roundings are independent, the relative RMS error is about 2u, asserted <= 2^-6
  (losing or doubling a rank's share gives about 0.4).
- ``norm_out``: torch's RMSNorm of moecomm's own ``residual_out``, within a relative
  error of 2^-6 (2-4 bf16 ulps; the fused kernel rounds once where the unfused ops do, but
  may sum squares in another order).
- ``quant_out``: bit-exact with torch's ``(norm_out * (1 / scale)).to(float8_e4m3fn)``
  (scale 1/16: its reciprocal and the products are exact in fp32, so only the e4m3
  rounding, round-to-nearest-even on both sides, remains).

Prints what it checked; exits non-zero (on every rank) on a mismatch.
"""

import sys

import torch
import torch.nn.functional as F
from mpi4py import MPI

import moecomm
from moecomm.fusion import (AllReduceFusionOptions, AllReduceFusionOutputs,
                            AllReduceFusionPattern, allreduce_fusion,
                            create_allreduce_fusion_workspace)

group = moecomm.init()  # one rank per GPU; moecomm and torch on the same device
dev, rank, world = group.device_id, group.rank, group.size
torch.cuda.set_device(dev)
torch.backends.cuda.matmul.allow_tf32 = False  # an fp32 reference, not a TF32 one
torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
cuda = torch.device("cuda", dev)

T, H, FFN, EPS = 32, 2048, 8192, 1e-6
assert FFN % world == 0, "the FFN width must split evenly over the ranks"
gen = torch.Generator().manual_seed(1234)  # the same weights on every rank
W1 = (torch.randn(H, FFN, generator=gen) / H ** 0.5).to(torch.bfloat16)
W2 = (torch.randn(FFN, H, generator=gen) / FFN ** 0.5).to(torch.bfloat16)
gamma = (1 + 0.1 * torch.randn(H, generator=gen)).to(torch.bfloat16).to(cuda)
shard = slice(rank * FFN // world, (rank + 1) * FFN // world)
W1_r, W2_r = W1[:, shard].contiguous().to(cuda), W2[shard].contiguous().to(cuda)
W1f, W2f = W1.to(cuda).float(), W2.to(cuda).float()  # the one-GPU reference's weights
scale = torch.tensor([1 / 16], dtype=torch.float32, device=cuda)  # FP8 dequantization scale

fws = create_allreduce_fusion_workspace(group, max_token_num=T, hidden_dim=H)
PATTERN = AllReduceFusionPattern.kARResidualRMSNormOutFP8Quant


def new_outputs() -> AllReduceFusionOutputs:
    return AllReduceFusionOutputs(
        residual_out=torch.empty(T, H, dtype=torch.bfloat16, device=cuda),
        norm_out=torch.empty(T, H, dtype=torch.bfloat16, device=cuda),
        quant_out=torch.empty(T, H, dtype=torch.float8_e4m3fn, device=cuda))


def tp_block(x, residual, outs):
    """The TP MLP block; the result lands in ``outs``."""
    h = F.gelu(x @ W1_r)   # column-parallel: [T, FFN / world], no communication
    share = h @ W2_r       # row-parallel: this rank's share of [T, H]
    allreduce_fusion(share, fws, PATTERN,
                     AllReduceFusionOptions(residual=residual, rms_gamma=gamma, rms_eps=EPS,
                                            scale_factor=scale),
                     outs, stream=torch.cuda.current_stream())
    return outs


def inputs(seed: int):
    g = torch.Generator().manual_seed(seed)  # replicated activations, as in TP
    return (torch.randn(T, H, generator=g).to(torch.bfloat16).to(cuda),
            torch.randn(T, H, generator=g).to(torch.bfloat16).to(cuda))


def check(x, residual, outs, what) -> bool:
    torch.cuda.synchronize()
    pre = x.float() @ W1f
    h = F.gelu(pre)
    y = h @ W2f                                   # one GPU, fp32, unsharded
    want = y + residual.float()
    got = outs.residual_out.float()
    rel = ((got - want).norm() / want.norm()).item()
    bound = 2 ** -7 * ((h.abs() + pre.abs()) @ W2f.abs() + y.abs() + residual.float().abs())
    within = bool((got - want).abs().le(bound).all())
    r = got
    norm_ref = r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + EPS) * gamma.float()
    norm_err = ((outs.norm_out.float() - norm_ref).abs() /
                norm_ref.abs().clamp_min(1e-3)).max().item()
    codes = (outs.norm_out.float() * (1.0 / scale)).clamp(-448, 448).to(torch.float8_e4m3fn)
    differ = int((outs.quant_out.view(torch.uint8) != codes.view(torch.uint8)).sum())
    ok = rel <= 2 ** -6 and within and norm_err <= 2 * 2 ** -7 and differ == 0
    if rank == 0:
        print(f"  {what}: residual_out rel RMS {rel:.2e} (<= {2 ** -6:.2e}), elementwise "
              f"bound {'held' if within else 'BROKEN'}; norm_out max rel err {norm_err:.2e} "
              f"(<= {2 * 2 ** -7:.2e}); float8 codes differing: {differ} -> "
              f"{'OK' if ok else 'MISMATCH'}")
    return ok


if rank == 0:
    print(f"torch_tp_mlp: T={T} H={H} FFN={FFN} over {world} ranks, "
          f"allreduce_fusion {PATTERN.name} into torch tensors (quant_out float8_e4m3fn)")
results = []
x, residual = inputs(1)
outs = tp_block(x, residual, new_outputs())
results.append(check(x, residual, outs, "eager"))

# The same block captured in a CUDA graph: static inputs, outputs, weights.
static_x, static_res = torch.empty_like(x), torch.empty_like(residual)
static_x.copy_(x)
static_res.copy_(residual)
graph_outs = new_outputs()
side = torch.cuda.Stream()
side.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(side):  # warm-up off the default stream, as torch recommends
    for _ in range(2):
        tp_block(static_x, static_res, graph_outs)
torch.cuda.current_stream().wait_stream(side)
graph = torch.cuda.CUDAGraph()
with torch.cuda.graph(graph):
    tp_block(static_x, static_res, graph_outs)
for step in range(3):
    x, residual = inputs(100 + step)
    static_x.copy_(x)
    static_res.copy_(residual)
    for o in (graph_outs.residual_out, graph_outs.norm_out):
        o.fill_(float("nan"))  # poisoned: the replay must write every element
    graph_outs.quant_out.view(torch.uint8).fill_(0x7F)
    graph.replay()
    results.append(check(static_x, static_res, graph_outs, f"graph replay {step}"))

fws.check()
ok = group.comm.allreduce(int(all(results)), op=MPI.MIN)
del graph
fws.close()
if rank == 0:
    print(f"torch_tp_mlp: {'OK' if ok else 'MISMATCH'}")
group.close()
sys.exit(0 if ok else 1)
