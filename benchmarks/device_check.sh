#!/usr/bin/env bash
# GPU check of the training stack, run in one call on a lent CUDA machine (the repository root is the cwd).
#
# 1. ct-rate.yaml (full-scale recipe) on a small phantom corpus: s/step and peak GPU memory at batch 8, bf16,
#    with and without gradient checkpointing; the same under torchrun (NCCL process group).
# 2. export -> `ctvl analyze --device cuda` -> `training evaluate --device cuda` on that run (CUDA inference path).
# 3. model compute alone (`benchmarks/train_step_speed.py`, synthetic inputs) for both configs: with (1) it tells
#    whether a run waits on its data loader.
# 4. phantom-demo.yaml on the GPU for DEMO_STEPS steps, evaluated on the held-out test split: what the demo recipe
#    reaches with more steps than the 60-minute CPU budget allows.
#
# The machine has PyTorch + transformers but not SimpleITK / MONAI (carried as wheels in .whl) and no MiniLM
# files (no network): the text tower is a randomly initialised MiniLM-shaped BERT (same config and tokenizer,
# carried in .gpu/text), so compute and memory match the recipe while text features are meaningless; the frozen
# tower is cached per sentence, so this barely touches the vision-side figures.
#
#   (here)   mkdir -p .gpu/text && cp <minilm>/{config.json,vocab.txt,tokenizer*.json,special_tokens_map.json} .gpu/text
#            pip download SimpleITK monai -d .whl ...   (see /work/.library/device/README.md)
#   (device) bash benchmarks/device_check.sh          -> $OUT: log.txt, device_check.json (+ the CSVs it summarises)
#   (here)   python -m benchmarks.device_summary <files_at> --note "..."   -> benchmarks/results/device_check.json
# The device tool returns at most 8 files from $OUT: keep it to those listed above.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/device_check}
N_TRAIN=${N_TRAIN:-64}
CT_STEPS=${CT_STEPS:-30}
DEMO_STEPS=${DEMO_STEPS:-1500}
DEMO_TIMEOUT=${DEMO_TIMEOUT:-330}
WORKERS=${WORKERS:-16}
DATA=${DATA:-/tmp/ctvl_data}
PY=${PY:-python3}
mkdir -p "$OUT" "$DATA"
ROOT=$PWD
t_start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t_start )) s] $*"; }

if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
mkdir -p /tmp/pkg && ln -sfn "$ROOT/CTVLExtension/Logic" /tmp/pkg/ctvl
export PYTHONPATH=/tmp/site:/tmp/pkg:$ROOT
TEXT=/tmp/ctvl_text
if [ ! -f "$TEXT/model.safetensors" ]; then
  mkdir -p "$TEXT" && cp "$ROOT"/.gpu/text/* "$TEXT"/ &&
  $PY -c "import sys; from transformers import BertConfig, BertModel; import torch; torch.manual_seed(0); \
BertModel(BertConfig.from_pretrained(sys.argv[1])).save_pretrained(sys.argv[1])" "$TEXT" || exit 1
fi
nvidia-smi -L 2>/dev/null | tee -a "$OUT/log.txt"
$PY -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-', 'transformers', transformers.__version__)" \
  | tee -a "$OUT/log.txt"

stamp "phantom corpus"
ctvl() { $PY -m ctvl.cli "$@"; }
ctvl phantom --out "$DATA/small" --n "$N_TRAIN" --seed 1 --split train --workers "$WORKERS" --no-progress >/dev/null &&
ctvl phantom --out "$DATA/small" --n 16 --seed 2 --split valid --workers "$WORKERS" --no-progress >/dev/null || exit 1

ct=(--config training/configs/ct-rate.yaml --data "$DATA/small" --no-progress
    --override "model.text_model=$TEXT" --override train.batch_size=8 --override train.log_every=5
    --override train.checkpoint_every=100000 --override "data.cache_workers=$WORKERS" --override data.num_workers=8
    ${CT_EXTRA:-})
stamp "ct-rate, gradient checkpointing"
$PY -m training train "${ct[@]}" --out /tmp/run_ckpt --override "train.max_steps=$CT_STEPS" \
  --override train.grad_checkpointing=true >> "$OUT/log.txt" 2>&1
cp /tmp/run_ckpt/log.csv "$OUT/ct_ckpt.csv"
stamp "ct-rate, no checkpointing"
$PY -m training train "${ct[@]}" --out /tmp/run_plain --override "train.max_steps=$CT_STEPS" \
  --override train.grad_checkpointing=false >> "$OUT/log.txt" 2>&1
cp /tmp/run_plain/log.csv "$OUT/ct_plain.csv"
stamp "ct-rate under torchrun (NCCL)"
$PY -m torch.distributed.run --standalone --nproc_per_node 1 -m training train "${ct[@]}" --out /tmp/run_ddp \
  --override train.max_steps=10 >> "$OUT/log.txt" 2>&1
cp /tmp/run_ddp/log.csv "$OUT/ct_torchrun.csv"

stamp "model compute alone"
for gc in "" "--grad-checkpointing"; do
  $PY -m benchmarks.train_step_speed --config training/configs/ct-rate.yaml --batch 8 --steps 8 \
    --override "model.text_model=$TEXT" ${CT_EXTRA:-} $gc 2>>"$OUT/log.txt" | tail -1 >> "$OUT/speed.jsonl"
done
$PY -m benchmarks.train_step_speed --config training/configs/phantom-demo.yaml --batch 16 --steps 10 \
  --override "model.text_model=$TEXT" 2>>"$OUT/log.txt" | tail -1 >> "$OUT/speed.jsonl"

stamp "export + analyze + evaluate on cuda"
{
  $PY -m training export /tmp/run_ckpt --out /tmp/w_ct &&
  vol=$(ls "$DATA"/small/valid/*/*/*.nii.gz | head -1) &&
  ctvl analyze "$vol" --model /tmp/w_ct --device cuda --query "nodule in the right upper lobe" \
    --out /tmp/analyze --no-progress && ls /tmp/analyze &&
  $PY -m training evaluate --weights /tmp/w_ct --data "$DATA/small" --split valid --device cuda \
    --out /tmp/ct_eval_valid.json --workers "$WORKERS"
} > "$OUT/ct_infer.log" 2>&1
echo "cuda inference rc=$?" | tee -a "$OUT/ct_infer.log"

stamp "demo recipe on the GPU"
ctvl phantom --out "$DATA/phantom" --n "${N_DEMO:-800}" --seed 1 --split train --workers "$WORKERS" --no-progress >/dev/null &&
ctvl phantom --out "$DATA/phantom" --n "${N_EVAL:-100}" --seed 2 --split valid --workers "$WORKERS" --no-progress >/dev/null &&
ctvl phantom --out "$DATA/phantom" --n "${N_EVAL:-100}" --seed 3 --split test --workers "$WORKERS" --no-progress >/dev/null ||
  exit 1
stamp "demo corpus written"
timeout "$DEMO_TIMEOUT" $PY -m training train --config training/configs/phantom-demo.yaml --data "$DATA/phantom" \
  --out /tmp/run_demo --no-progress --override "train.max_steps=$DEMO_STEPS" --override train.checkpoint_every=250 \
  --override "model.text_model=$TEXT" ${DEMO_EXTRA:-} \
  --override "data.cache_workers=$WORKERS" --override data.num_workers=8 >> "$OUT/log.txt" 2>&1
echo "demo train rc=$?" >> "$OUT/log.txt"
cat /tmp/run_demo/log.csv >> "$OUT/log.txt"
stamp "demo evaluate"
$PY -m training export /tmp/run_demo --out /tmp/w_demo > /dev/null 2>&1 &&
$PY -m training evaluate --weights /tmp/w_demo --data "$DATA/phantom" --split test --val-split valid --device cuda \
  --out "$OUT/demo_eval_test.json" --workers "$WORKERS" --batch-size 16 >> "$OUT/log.txt" 2>&1
tail -4 "$OUT/log.txt"
$PY -m benchmarks.device_summary "$OUT" --out "$OUT/device_check.json"
stamp "done"
