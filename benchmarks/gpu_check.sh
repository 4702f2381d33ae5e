#!/usr/bin/env bash
# On a CUDA machine: the Dataset job (the nonlinear tutorial's CustomDataset with random
# augmentation, tests/user_job/tutorial_dataset.py) in bf16 and in fp16, each trained once
# uninterrupted and once SIGKILLed after its first checkpoint then resumed; checks that both end
# bit for bit alike and prints epochs per second. CI has no GPU: run it by hand.
#
#     . .venv/bin/activate && bash benchmarks/gpu_check.sh [EPOCHS]   # default 300 epochs, 3 chunks
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: nothing to check')"
EPOCHS=${1:-300}
OUT=$(mktemp -d)
JOB=tests.user_job.tutorial_dataset:AUGMENTED
FOLDER=tests.user_job.tutorial_dataset.AUGMENTED
status=0
for precision in bf16 fp16; do
  args=(--job "$JOB" --device cuda --precision "$precision" --num-workers 2 --epochs "$EPOCHS"
        --chunk-epochs $((EPOCHS / 3)) --batch-size 16 --artifacts-dir "$OUT/$precision")
  python flows/train_flow.py "${args[@]}" --run-name reference > "$OUT/$precision-reference.log" 2>&1
  setsid python flows/train_flow.py "${args[@]}" --run-name resumed > "$OUT/$precision-killed.log" 2>&1 &
  pid=$!
  until grep -q "wrote checkpoint-1.pt" "$OUT/$precision-killed.log" 2>/dev/null; do
    kill -0 "$pid" 2>/dev/null || { echo "$precision: the run ended before its first checkpoint"; exit 1; }
    sleep 0.2
  done
  kill -KILL -- "-$pid"; wait "$pid" || true
  python flows/train_flow.py "${args[@]}" --run-name resumed > "$OUT/$precision-resumed.log" 2>&1
  python - "$OUT/$precision/$FOLDER" "$precision" <<'EOF' || status=1
import json, sys
from pathlib import Path
import torch
folder, precision = Path(sys.argv[1]), sys.argv[2]
a, b = (torch.load(folder / run / "model_state_dict.pt", weights_only=True) for run in ("reference", "resumed"))
same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
chunks = json.loads((folder / "reference" / "run.json").read_text())["chunks"].values()
epochs = max(c["epoch"] for c in chunks)
seconds = sum(c["seconds"] for c in chunks)  # training time of the chunks, without start-up
print(f"{precision}: resumed after SIGKILL {'bit-exact' if same else 'DIFFERS'}; {epochs / seconds:.1f} epochs/s "
      f"({torch.cuda.get_device_name()})")
sys.exit(0 if same else 1)
EOF
done
echo "logs and runs: $OUT"
exit $status
