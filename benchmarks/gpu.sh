#!/usr/bin/env bash
# The overhead benchmark on one GPU, in one command (about 5 minutes on an H200; stops at 8): a ~0.5B Qwen2-shaped
# model built from a config, bf16. Run from the repository root on a machine with CUDA torch and this package
# installed (`pip install -e .`). Writes benchmarks/results/overhead_gpu.{md,json}.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch; assert torch.cuda.is_available(), 'benchmarks/gpu.sh needs a CUDA GPU'"
PYTHONPATH=. timeout 480 python benchmarks/overhead_gpu.py --shape qwen05b "$@"
