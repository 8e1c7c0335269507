#!/usr/bin/env bash
# The whole GPU check in one call, on a GPU host without registry access (runs from source):
# every GPU test (no GPU is a failure here, not a skip) and every benchmark, with 2 ranks
# and with one rank per GPU. Logs and result JSON go to OUTDIR. PART picks the tests or the
# benchmarks alone (each fits a 10-minute limit on 2 x H200; both together may not).
#   bash bench/gpu_suite.sh OUTDIR [all|tests|bench]
set -uo pipefail
out=${1:?usage: bench/gpu_suite.sh OUTDIR [all|tests|bench]}
part=${2:-all}
case $part in all|tests|bench) ;; *) echo "gpu_suite: PART must be all, tests or bench" >&2; exit 2;; esac
mkdir -p "$out"
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 MOECOMM_REQUIRE_GPU=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# The commit the results belong to: git's, else what the caller exported (a copied tree
# may carry no history).
commit=$(git rev-parse --verify -q HEAD 2>/dev/null) || commit=${MOECOMM_COMMIT:-unknown}
export MOECOMM_COMMIT=$commit

mpi=(mpiexec)
if mpiexec --version 2>&1 | grep -qE "Open MPI|OpenRTE"; then
  mpi+=(--oversubscribe --bind-to none)
  [ "$(id -u)" = 0 ] && mpi+=(--allow-run-as-root)
fi
ngpu=$(nvidia-smi -L | wc -l)
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
nvidia-smi topo -m >> "$out/nvidia-smi.txt" 2>&1

status=0
if [ "$part" != bench ]; then
  # The GPU tests; the CPU tests (NVRTC builds of every kernel for three architectures
  # among them, minutes of host time) are CI's, on every landing.
  python3 -m pytest tests/gpu -q -rfEs -p no:cacheprovider 2>&1 \
    | tee "$out/tests.log" || status=1
fi
if [ "$part" = tests ]; then
  echo "gpu_suite: exit $status"
  exit $status
fi

ranks="2"
[ "$ngpu" -gt 2 ] && ranks="2 $ngpu"
for n in $ranks; do
  fusion="fusion" moe="moe --plot" dcp="dcp" mixed="mixed" prepare="prepare"
  # Ranks sharing a GPU time-slice (milliseconds a handshake): small sweeps only.
  if [ "$n" -gt "$ngpu" ]; then
    fusion="fusion --tokens 1,128 --hidden 4096 --iters 5"
    moe="moe --tokens 1,128 --iters 5"
    dcp="dcp --batch 1,64 --heads 32 --iters 5"
    mixed="mixed --tokens 1,128 --ar-sizes 8192 --iters 5"
    prepare="prepare --sizes 8192,1048576 --tokens 128 --iters 5"
  fi
  for suite in p2p "allreduce --plot" "$fusion" "$moe" "$dcp" "$mixed" "$prepare"; do
    name=${suite%% *}
    # shellcheck disable=SC2086  # the suite's options are meant to split
    "${mpi[@]}" -n "$n" python3 -m moecomm.bench $suite --out "$out" 2>&1 \
      | tee "$out/bench-$name-r$n.log" || status=1
  done
done
# The examples as users run them; each checks itself and exits non-zero on a mismatch.
for ex in cupy_allreduce torch_tp_mlp jax_moe_layer; do
  "${mpi[@]}" -n 2 python3 "examples/$ex.py" 2>&1 | tee "$out/example-$ex.log" || status=1
done
# Host cost of an eager 8 KiB all_reduce per framework and way of giving the stream.
"${mpi[@]}" -n 2 python3 -m moecomm.bench dlpack --out "$out" 2>&1 | tee "$out/bench-dlpack.log" || status=1
# Overlap with a GEMM needs GPUs of their own (time-slicing ranks overlap nothing).
if [ "$ngpu" -ge 2 ]; then
  "${mpi[@]}" -n 2 python3 -m moecomm.bench overlap --plot --out "$out" 2>&1 \
    | tee "$out/bench-overlap-r2.log" || status=1
fi
"${mpi[@]}" -n 1 python3 -m moecomm.bench quant --out "$out" 2>&1 | tee "$out/bench-quant.log" || status=1
# One rank: the host cost of an eager all_reduce with no other process on the GPU.
"${mpi[@]}" -n 1 python3 -m moecomm.bench allreduce --sizes 8192,1048576 --out "$out" 2>&1 \
  | tee "$out/bench-allreduce-r1.log" || status=1
echo "gpu_suite: exit $status"
exit $status
