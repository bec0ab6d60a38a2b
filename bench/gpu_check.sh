#!/usr/bin/env bash
# The GPU checks for #5 in one command, for a machine with CUDA PyTorch already installed
# (the project's device machine: python3 holds torch 2.11 + transformers, nothing can be fetched).
#
#   bash bench/gpu_check.sh [tests|bench|fused|compile|serve|all]   (default: all; results in $OUT or ./gpu-out)
#
# tests:   tests/test_fast_path.py, test_fused.py, test_memory.py on the GPU (graph == eager codes)
# bench:   csm-1b bf16, batch 1 4 8, ours (eager, CUDA graph) vs transformers, same weights
# fused:   the same with fused layers in the graph (--fuse), ours only
# compile: CUDA graph + torch.compile'd steps, batch 1, ours only
# serve:   the scheduler (#16): N requests at once against one at a time, per-stream speed, joining TTFA
#
# The packages the image lacks travel as wheels in .whl/ (git-ignored; fetch them here with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     torchtune==0.6.1 torchao==0.15.0 torchdata==0.11.0 moshi==0.2.13 silentcipher==1.0.5 sphn==0.2.1 \
#     cachetools librosa soundfile soxr audioread pooch decorator pydub pyaml omegaconf \
#     antlr4-python3-runtime==4.9.3 datasets dill multiprocess cffi pycparser
# and name .whl in the run's carry).
set -uo pipefail
cd "$(dirname "$0")/.."
what="${1:-all}"
out="${OUT:-gpu-out}"
mkdir -p "$out"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
if [ -d .whl ] && ! "$PY" -c "import torchtune, moshi" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())" \
  || exit 1
gpu=$("$PY" -c "import torch; print(torch.cuda.get_device_name().split()[1].lower())")
rc=0
run() { echo "== $*"; "$@" 2>&1 | tee -a "$out/log.txt"; [ "${PIPESTATUS[0]}" = 0 ] || rc=1; }
case "$what" in tests|all)
  run "$PY" -m pytest -q -p no:cacheprovider tests/test_fast_path.py tests/test_fused.py tests/test_memory.py ;;
esac
case "$what" in bench|all)
  run "$PY" -m csm_multi.bench --device cuda --batch 1 4 8 --frames 40 --rounds 2 --json "$out/$gpu-csm-1b-bf16.json" ;;
esac
case "$what" in fused|all)
  run "$PY" -m csm_multi.bench --device cuda --batch 1 8 --frames 40 --rounds 2 --fuse --no-transformers \
    --json "$out/$gpu-csm-1b-bf16-fused.json" ;;
esac
case "$what" in compile|all)
  run "$PY" -m csm_multi.bench --device cuda --batch 1 --frames 40 --rounds 2 --compile --no-transformers \
    --json "$out/$gpu-csm-1b-bf16-compile.json" ;;
esac
case "$what" in serve|all)
  run "$PY" -m csm_multi.serve_bench --device cuda --preset csm-1b --concurrent 1 8 32 64 --frames 40 --rounds 2 \
    --json "$out/$gpu-csm-1b-bf16-serve.json" ;;
esac
exit $rc
