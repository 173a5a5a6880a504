#!/usr/bin/env bash
# Every GPU test binary in $B/tests (kernels, quant, lora CUDA parity, the fixture model's CUDA
# parity, bf16 training agreement), with MOE_PEFT_REQUIRE_CUDA=1 so that none passes by
# skipping. The binaries find the fixtures under the checkout path they were built in, so that
# path is linked to this checkout first.
set -u
. tools/gpu/common.sh nocheckpoint
BUILT=${BUILT:-/work/main}
if [ ! -e "$BUILT/fixtures" ]; then
  mkdir -p "$(dirname "$BUILT")" && ln -sfn "$PWD" "$BUILT"
fi
fail=0
for tb in "$B"/tests/*; do
  [ -x "$tb" ] || continue
  MOE_PEFT_REQUIRE_CUDA=1 stage "test_$(basename "$tb")" 300 "$tb" --test-threads 1 || fail=1
done
grep -h "^test result\|FAILED\|panicked" "$O"/test_*.log | cut -c1-300
exit $fail
