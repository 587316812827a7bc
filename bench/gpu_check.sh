#!/usr/bin/env bash
# GPU checks in one command, under 8 minutes on one GPU (the parts' limits add up to 480 s): the
# CUDA-only tests, then the kernel and forward benchmarks, decoding in each mode with and without CUDA
# graphs, and the speculative modes at block 32 on the bundled model (issue 12: sparse quadratic
# against linear_spec where a forward's rows cost little; tok/s with graphs, TPF from bench/tpf.py). Tables and logs go to $OUT (the device tool's
# folder) or bench/gpu_out.
#
#   bash bench/gpu_check.sh            # on a machine whose python3 has torch with CUDA and triton
#
# The golden-parity tests need the fixture checkpoint: ../shared/fixtures/tiny-trimode-code, or
# TRISERVE_FIXTURE=PATH where it was copied (it is skipped, and said so, where it is missing). The
# device tool sends the checkout only: copy the fixture into a folder that .git/info/exclude ignores
# (e.g. .fixture/, 26 MB), carry it, and set TRISERVE_FIXTURE=.fixture/tiny-trimode-code. Ray is not
# needed here: the GPU tests and benchmarks import torch, triton, numpy, safetensors, Pillow, tqdm,
# pytest and (loading a model) tokenizers, which the device image holds.
#
# Each part has its own time limit, so one that hangs cannot take the others' time.
set -uo pipefail
cd "$(dirname "$0")/.."
DEST=${OUT:-bench/gpu_out}
PY=${PYTHON:-python3}
mkdir -p "$DEST"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "no CUDA GPU visible to $PY; nothing to check"
    exit 0
fi
$PY -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" | tee "$DEST/device.txt"
status=0
run() {  # name, seconds, command...
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$@" 2>&1 | tee "$DEST/$name.txt"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc"
    [ "$rc" -eq 0 ] || status=1
}
# test_gpu.py alone: the kernel test files turn on Triton's interpreter at import, for CPU CI
run gpu_tests 100 $PY -m pytest -q --tb=short -p no:cacheprovider tests/test_gpu.py
run kernels 50 $PY bench/kernels.py
run matmul_tilings 80 $PY bench/kernels.py --tilings
run forward_8b 70 $PY bench/forward.py --device cuda --context 4096 --blocks 4 8 16 32 --layers 34 --profile
run forward_tiny 30 $PY bench/forward.py --device cuda --model models/bundled/tiny-code --context 96
run step_graphs 70 $PY bench/step_graphs.py --rounds 1
run step_graphs_block32 40 $PY bench/step_graphs.py --rounds 1 --models models/bundled/tiny-code \
    --modes ar linear_spec quadratic_spec --concurrency 1 --block-length 32 --max-tokens 128
run tpf_block32 40 $PY bench/tpf.py --device cuda --model models/bundled/tiny-code --heldout --prompt-length 96 \
    --max-new-tokens 128 --prompts 8 --modes linear_spec quadratic_spec --block-length 32 --rounds 2 --bpb-bytes 0
exit $status
