#!/usr/bin/env bash
# One prepared run of the benchmarks on a lent GPU (device tool). Writes JSON under $OUT.
# Usage (from the repo root on the GPU machine): OUT=/some/dir bash benchmarks/gpu_suite.sh
set -u
OUT=${OUT:-benchmarks/results}
export PYTHONPATH=$PWD:${PYTHONPATH:-}
PY=${PY:-python3}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
$PY -c "import jax, flax, optax; print('jax', jax.__version__, jax.devices())"
mkdir -p "$OUT/r1k" "$OUT/r10k" "$OUT/scale" "$OUT/analytic"
timeout 110 $PY benchmarks/bench_mc.py --realizations 1000 --inputs 100 --repeats 7 --out "$OUT/r1k" 2>&1 | grep -v Warning
timeout 110 $PY benchmarks/bench_mc.py --realizations 10000 --inputs 100 --repeats 5 --out "$OUT/r10k" 2>&1 | grep -v Warning
mkdir -p "$OUT/weight"
timeout 70 $PY benchmarks/bench_weight_noise.py --realizations 100 --inputs 10000 --repeats 5 --out "$OUT/weight" 2>&1 | grep -v Warning
if [ -f benchmarks/bench_analytic_vs_mc.py ]; then
  timeout 60 $PY benchmarks/bench_analytic_vs_mc.py --out "$OUT/analytic" 2>&1 | tail -n 25
fi
timeout 150 $PY benchmarks/bench_scale.py --inputs 100 --max-exp 6 --tile 1024 --tiles 1024,4096 --throughput-n 200000 --out "$OUT/scale" 2>&1 | grep -v Warning
timeout 60 $PY -m pytest -q -x -p no:cacheprovider tests/test_core_mc.py tests/test_rng.py -k "not device_count" 2>&1 | tail -n 3
