"""One rank of ``python -m moecomm.bench coldstart``: run as a script (by path), so the
clock starts before moecomm is imported. Args: hidden tokens. Rank 0 prints one line,
``COLDSTART {json}``, with the slowest rank's times."""

import os
import sys
import time

T0 = time.perf_counter()
# Run by path, this folder heads sys.path: drop it, so its modules shadow nothing.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(
    os.path.abspath(__file__))]


def main() -> None:
    hidden, tokens = int(sys.argv[1]), int(sys.argv[2])
    import moecomm
    from moecomm.fusion import (AllReduceFusionOptions, AllReduceFusionOutputs,
                                AllReduceFusionPattern, allreduce_fusion,
                                create_allreduce_fusion_workspace)
    t_import = time.perf_counter()

    group = moecomm.init()
    t_init = time.perf_counter()

    import cupy
    import numpy as np
    from moecomm import kernels
    from moecomm.tensors import bfloat16

    ws = create_allreduce_fusion_workspace(group, max_token_num=tokens, hidden_dim=hidden)
    t_ws = time.perf_counter()

    def call():
        # Inputs are copied from host arrays: cupy.ones would JIT-compile CuPy's own fill
        # kernel on first use, which is not moecomm's cold start.
        x = cupy.asarray(np.ones((tokens, hidden), bfloat16))
        opts = AllReduceFusionOptions(residual=cupy.zeros((tokens, hidden), bfloat16),
                                      rms_gamma=cupy.asarray(np.ones(hidden, bfloat16)))
        outs = AllReduceFusionOutputs(residual_out=cupy.empty((tokens, hidden), bfloat16),
                                      norm_out=cupy.empty((tokens, hidden), bfloat16))
        allreduce_fusion(x, ws, AllReduceFusionPattern.kARResidualRMSNorm, opts, outs)
        cupy.cuda.get_current_stream().synchronize()
        return outs

    outs = call()
    t_first = time.perf_counter()
    call()
    t_second = time.perf_counter()
    expected = float(group.size)  # every rank contributes ones; residual 0
    if not np.allclose(cupy.asnumpy(outs.residual_out).astype(np.float32), expected):
        raise SystemExit(f"rank {group.rank}: wrong all-reduce result")

    s = kernels.stats()
    mine = {"import_s": t_import - T0, "init_s": t_init - t_import, "workspace_s": t_ws - t_init,
            "first_call_s": t_first - t_ws, "total_s": t_first - T0,
            "second_call_s": t_second - t_first,
            "origins": {"prebuilt": len(s["prebuilt"]), "compiled": len(s["compiled"]),
                        "waited": len(s["waited"]), "cached": len(s["cached"])},
            "arch": kernels.current_arch()}
    everyone = group.allgather(mine)
    ws.close()
    if group.rank == 0:
        import json

        slowest = max(everyone, key=lambda r: r["total_s"])
        origins = {k: sum(r["origins"][k] for r in everyone) for k in mine["origins"]}
        print("COLDSTART " + json.dumps({**slowest, "origins": origins,
                                         "ranks": everyone}), flush=True)


if __name__ == "__main__":
    main()
