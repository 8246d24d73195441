#!/usr/bin/env bash
# The GPU benchmark in one device command (run from the repository root, with .whl/ carried):
#   benchmarks/gpu_run.sh speed   # self-test (CUDA graphs vs eager), local vs swarm public/internal,
#                                 # exactness bf16 vs fp32, concurrency, memory floor, SIGTERM stops
#   benchmarks/gpu_run.sh quant   # int8 and nf4 servers: weight memory and decode latency
#   benchmarks/gpu_run.sh profile # py-spy on the client and a server during swarm prefills
# Results, logs and a copy of the server logs land in $OUT (at most 8 files come back).
set -uo pipefail
part="${1:-speed}"
out="${OUT:-/tmp/fincluster-out}"
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    > "$out/pip-$part.log" 2>&1 || { tail -20 "$out/pip-$part.log"; exit 1; }
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 - <<'PY'
import grpc, google.protobuf, torch, transformers, bitsandbytes
from fincluster.wire import fincluster_pb2_grpc  # refuses to import on a grpcio it does not support
print("versions:", "torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__,
      "grpcio", grpc.__version__, "protobuf", google.protobuf.__version__, "bitsandbytes", bitsandbytes.__version__,
      "gpu", torch.cuda.get_device_name())
PY
status=$?
if [ $status -eq 0 ]; then
    if [ "$part" = profile ]; then
        python3 benchmarks/prefill_profile.py --out "$out" 2>&1 | tee "$out/profile.log"
    else
        python3 benchmarks/harness.py --device cuda --part "$part" --out "$out" 2>&1 | tee "$out/harness-$part.log"
    fi
    status=${PIPESTATUS[0]}
fi
tar -czf "$out/server-logs-$part.tgz" -C /tmp/fincluster-bench logs 2>/dev/null || true
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm,clocks.mem --format=csv > "$out/nvidia-smi-$part.csv" 2>&1 || true
exit $status
