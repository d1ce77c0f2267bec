#!/usr/bin/env bash
# The COVID-SemiSeg benchmark under JAX on a lent GPU machine (the device tool), in one call.
#
# Prepare here, once (both folders are git-ignored through .git/info/exclude and carried):
#   echo /.whl/ >> .git/info/exclude; echo /.devdata/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     -d .whl keras==3.15.1 namex==0.1.0 optree==0.20.0 pydicom==3.0.2
#   mkdir -p .devdata && cp -r ../shared/data/covid-semiseg .devdata/
# Then, through the device tool (carry [".whl", ".devdata"], timeout_s 600):
#   bash experiments/device/semiseg_gpu.sh $OUT 535 --width full --size 256
# The machine has JAX but no Keras or pydicom (the wheels above) and no TensorFlow. The
# recipe is the shipped model's (TTA 8, intensity augmentation, 40 epochs, patience 10,
# 12 student epochs); options after SECONDS are added. Each call starts a fresh run
# folder; the log and results come back in $OUT, and a run cut at SECONDS keeps the folds
# it finished.
set -u
out=$1; limit=$2; shift 2
run=/tmp/semiseg-$(date +%s)
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export KERAS_BACKEND=jax PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=/tmp/jaxcache
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc) > "$out/machine.txt" 2>&1
python3 -c "import jax, keras; print('jax', jax.__version__, jax.devices(), 'keras', keras.__version__)" 2>&1 | tee "$out/log.txt"
start=$(date +%s)
timeout "$limit" python3 -m tfcovseg.benchmarks.semiseg \
  --train-dir .devdata/covid-semiseg/train --unlabelled-dir .devdata/covid-semiseg/unlabelled \
  --models coarse_refine --tta 8 --intensity --epochs 40 --patience 10 --semi-epochs 12 \
  --out "$run" "$@" 2>&1 | tee -a "$out/log.txt"
echo "exit ${PIPESTATUS[0]}, wall $(( $(date +%s) - start )) s" | tee -a "$out/log.txt"
cp "$run/results.json" "$run/results.md" "$out/" 2>/dev/null
exit 0
