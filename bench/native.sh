#!/usr/bin/env bash
# Everything a session on a new kind of CPU runs to fill in its row of README's "By CPU kind"
# table, in one command, logs under $OUT (default /tmp/native-<date>):
#
#   bench/native.sh            # checks (~10 min of builds and tests), then the benchmarks
#   bench/native.sh --quick    # the checks and the forward-pass benchmark only (~20 min)
#
# 1. the CPU (`lscpu` model name, family/model, the flags that pick our kernels) and which
#    kernels run natively (`examples/isa.rs`);
# 2. the kernel tests that run only where the instructions exist (AMX, AVX512-BF16, AVX-512,
#    AVX2): each prints "ran … natively" or "SKIPPED", collected in native-tests.txt;
#    and the bf16 dataflow with free products (what bounds AMX, bench/README.md);
# 3. bench/backbone.py --rounds 5 (ours f32, ours bf16, PyTorch's modes; needs torch and
#    torchvision); ours alone: the slice budgets of the first stages (bf16), Winograd
#    against direct and F(2x2)-only 3x3 layers (f32, the network and each layer) and,
#    where bf16 is native, the bf16 blocking (`--bf16-blockings`); then, without --quick, bench/head/bench.py and
#    bench/wholejob.py on 10,000 images for ours bf16 and f32 against PyTorch's fp32 and
#    bf16 channels_last (~35 min on a Zen 4 with native bf16; up to 90 min where bf16 is
#    emulated on both sides).
#
# Nothing here is asserted on timings; read the medians and ratios, quote the load average.
# Do not build anything else while it runs: 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
QUICK=0
[[ "${1:-}" == "--quick" ]] && QUICK=1
# The benchmarks' Python modules, checked before the ~10 minutes of checks rather than after.
python3 -c "import numpy, safetensors, torch, torchvision" || {
  echo "bench/native.sh needs: pip install numpy safetensors torch torchvision" >&2
  exit 1
}
OUT=${OUT:-/tmp/native-$(date -u +%Y%m%d-%H%M)}
mkdir -p "$OUT"
echo "logs: $OUT"

{
  date -u
  lscpu | grep -E "^(Model name|CPU family|Model|Thread|Core|Socket)"
  echo -n "flags of interest:"
  for f in avx2 fma avx512f avx512bw avx512_vnni avx512_bf16 avx512_fp16 amx_tile amx_bf16 amx_int8; do
    grep -qw "$f" /proc/cpuinfo && echo -n " $f"
  done
  echo
  uptime
} | tee "$OUT/cpu.txt"

cargo build --release --examples --bin cifar-finetune 2>&1 | tail -1
cargo run --release -q --example isa | tee "$OUT/isa.txt"

# The native kernel tests (release: the same code the benchmarks time).
cargo test --release --lib -- gemm isa head::lanes --nocapture 2>&1 | tee "$OUT/lib-tests.log" | tail -3
cargo test --release --test fast_backbone --test arch_parity --test pipeline_learns -- --nocapture \
  2>&1 | tee "$OUT/network-tests.log" | tail -3
grep -hE "natively|emulation|SKIPPED" "$OUT/lib-tests.log" "$OUT/network-tests.log" | sort | uniq -c \
  | tee "$OUT/native-tests.txt"
# The bf16 dataflow with free products: beside bf16's images/s below, how much of its time
# the products take (per layer kind, then per convolution shape).
cargo test --release --lib products_cost_nothing -- --ignored --nocapture 2>&1 \
  | sed -n '/^bf16 dataflow/,/^test /p' | tee "$OUT/free-products.txt"

python3 bench/backbone.py --rounds 5 --shapes --json "$OUT/backbone.json" 2>&1 \
  | tee "$OUT/backbone.txt"
# The first stages' slice budget (SLICE_BYTES in src/backbone/fast/mod.rs, 8 MiB) against
# others, bf16, interleaved.
python3 bench/backbone.py --no-torch --rounds 9 --slices 2,4,16,32,inf 2>&1 | tee "$OUT/slices.txt"
# Winograd's 3x3 layers (F(4x4) under 512 channels, F(2x2) wider) against direct and F(2x2)
# everywhere, f32, over the network and per layer (tuned on an Ice Lake only).
python3 bench/backbone.py --no-torch --rounds 9 --algorithms direct,winograd2 2>&1 | tee "$OUT/winograd.txt"
cargo test --release --lib winograd_layer_timings -- --ignored --nocapture 2>&1 \
  | tee -a "$OUT/winograd.txt"
# Where bf16 is native (AVX512-BF16, AMX), the bf16 blocking (Bf16Blocking in
# src/backbone/fast/gemm/bf16.rs: a=512K,rows=256,stream=8M) against others, one key at a
# time, interleaved; features do not depend on it.
if grep -qwE "avx512_bf16|amx_bf16" /proc/cpuinfo; then
  python3 bench/backbone.py --no-torch --rounds 9 \
    --bf16-blockings "a=256K;a=1M;a=2M;rows=128;rows=512;stream=2M;stream=inf" 2>&1 \
    | tee "$OUT/bf16-blockings.txt"
fi
if [[ $QUICK == 0 ]]; then
  python3 bench/head/bench.py 2>&1 | tee "$OUT/head.txt"
  python3 bench/wholejob.py --images 10000 --only ours-bf16,ours-f32,torch-fp32-cl,torch-bf16-cl \
    --json "$OUT/wholejob.json" 2>&1 | tee "$OUT/wholejob.txt"
fi
uptime | tee -a "$OUT/cpu.txt"
echo "done: $OUT"
