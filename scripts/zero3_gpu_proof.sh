#!/usr/bin/env bash
# ZeRO-3 on 2 GPUs must train like 1 GPU: the same CoLA (heuristic) and Chain-of-LoRA runs on the
# real SmolLM2-135M, each as 1 GPU without DeepSpeed, 1 GPU under ZeRO-3, and 2 GPUs under ZeRO-3
# (NCCL, one rank per GPU), with the same global batch (16 = 1 x 16 = 2 x 8) and adapter dropout
# off so the runs see identical maths. The curves and the table land in $OUT_DIR (docs/zero3_gpu).
#
#   MODEL_DIR=/root/gpucache/smol OUT_DIR=$OUT/zero3 bash scripts/zero3_gpu_proof.sh
set -euo pipefail
: "${MODEL_DIR:?the SmolLM2-135M-Instruct HF dir (scripts/gguf_to_hf.py)}"
: "${OUT_DIR:?where the curves go}"
RUNS=${RUNS:-/root/zero3_runs}
# NVLink multicast stays off on shared hosts (the device tool's KINDS.md).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
common=(model=smollm2_135m "model.path=$MODEL_DIR" model.gguf_file=null model.gguf_package=null
        data=math data.max_samples=512 trainer.epochs=2 trainer.logging_steps=1
        trainer.save_steps=1000000 eval.before=false method.dropout=0 seed=1)

mkdir -p "$RUNS"
pids=()
for method in cola_heuristic chain_of_lora; do
  CUDA_VISIBLE_DEVICES=0 python -m cola_train "method=$method" "${common[@]}" trainer.batch_size=16 \
      "hydra.run.dir=$RUNS/${method}_1gpu" > "$RUNS.${method}_1gpu.log" 2>&1 & pids+=($!)
  CUDA_VISIBLE_DEVICES=1 python -m cola_train "method=$method" "${common[@]}" trainer.batch_size=16 \
      deepspeed=zero3 "hydra.run.dir=$RUNS/${method}_1gpu_zero3" > "$RUNS.${method}_1gpu_zero3.log" 2>&1 & pids+=($!)
  python -m cola_train "method=$method" "${common[@]}" trainer.batch_size=8 trainer.devices=2 \
      deepspeed=zero3 "hydra.run.dir=$RUNS/${method}_2gpu_zero3" > "$RUNS.${method}_2gpu_zero3.log" 2>&1 & pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=1; done
for method in cola_heuristic chain_of_lora; do
  mkdir -p "$OUT_DIR/$method"
  cp "$RUNS".${method}_*.log "$OUT_DIR/$method/" || true
  python scripts/compare_curves.py --out "$OUT_DIR/$method" "1gpu_zero3=$RUNS/${method}_1gpu_zero3" \
      "2gpu_zero3=$RUNS/${method}_2gpu_zero3" "1gpu_no_deepspeed=$RUNS/${method}_1gpu" \
      | tee "$OUT_DIR/$method/table.md" || rc=1
done
exit $rc
