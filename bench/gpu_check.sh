#!/usr/bin/env bash
# GPU-only checks, one prepared script (< 8 min on one H100): the pretraining stage's inner loop
# (DeepSpeed, under torchrun, no Ray) for a ~125M dense and a MoE model in bf16 and fp16 (dynamic
# loss scaling) and a ~350M dense model in bf16 (large enough not to be launch-bound), SDPA's flash
# kernel, tokens/s against HF Llama / Mixtral in the same run, and MFU; PPO's rollout sampler against
# the one before it and HF generate. Exits non-zero if a check fails.
#
#   bash bench/gpu_check.sh            # on a GPU machine with torch; wheels in .whl/ are installed first
#
# The lent GPU machine has torch and transformers but not deepspeed: carry them as
# wheels in .whl/ (deepspeed, hjson, pydantic, pydantic-core, annotated-types, typing-inspection,
# transformers of the project's version); see BENCHMARKS.md for the download line.
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/kiln-site .whl/*.whl
  export PYTHONPATH=/tmp/kiln-site:${PYTHONPATH:-}
fi
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, deepspeed; print('torch', torch.__version__, 'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__)"
log=${OUT:-/tmp}/gpu_check.log
failed=0  # every check runs; the script fails at the end if any did
echo "== GPU-only model tests (flash/efficient kernels, grouped experts, cached generation)"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_model.py tests/test_moe.py -k cuda 2>&1 | tail -5 | tee "$log" \
  || { failed=1; echo "FAILED: the GPU model tests"; }
echo "== MoE layer forward+backward: grouped matmul vs the loop over experts (bf16, eager and compiled)"
timeout 120 python3 bench/moe_layer.py --device cuda 2>&1 | grep -v -i "warn" | tee -a "$log" \
  || { failed=1; echo "FAILED: bench/moe_layer.py"; }
echo "== PPO rollouts: the preallocated-cache sampler vs the one before and HF generate (a random tiny policy)"
timeout 90 python3 bench/ppo.py --device cuda --ppo-iterations 0 --rank-iterations 0 --batch 64 \
  --max-new-tokens 128 --repeats 3 2>&1 | grep -v -i "warn" | tail -6 | tee -a "$log" \
  || { failed=1; echo "FAILED: bench/ppo.py --device cuda"; }
echo "== pretraining inner loop vs HF (bf16, fp16), and a ~350M dense model (bf16)"
timeout 420 python3 -m torch.distributed.run --nproc_per_node 1 bench/gpu_pretrain.py --steps ${STEPS:-25} 2>&1 \
  | grep -v -i "warn" | tee -a "$log" || { failed=1; echo "FAILED: bench/gpu_pretrain.py"; }
exit $failed
