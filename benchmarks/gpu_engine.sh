export PYTHONPATH=$PWD
mkdir -p $OUT/r10k $OUT/scale
timeout 150 python3 benchmarks/bench_mc.py --realizations 10000 --inputs 100 --repeats 5 --out $OUT/r10k 2>&1 | grep -v -iE "warning"
timeout 170 python3 benchmarks/bench_scale.py --inputs 100 --max-exp 6 --tile 4096 --tiles 1024,4096 --throughput-n 400000 --out $OUT/scale 2>&1 | grep -v -iE "warning"
