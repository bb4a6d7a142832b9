#!/usr/bin/env bash
# Train the shipped Shapes assets on a CUDA machine (preset "full"), then time fp32/fp16/bf16 sampling.
# Usage: OUT=/some/dir bash scripts/gpu_train_shapes.sh
set -euo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT/assets"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -m finetuners.shapes.train --preset full --device cuda --out "$OUT/assets" --max-minutes "${MAX_MINUTES:-7}" 2>&1 | tee "$OUT/train.log"
if [ "${SAMPLE_BENCH:-1}" = 1 ]; then
python3 - "$OUT/assets" <<'PY' 2>&1 | tee "$OUT/sample_bench.txt"
import sys, time, torch
from diffusers import StableDiffusionPipeline
folder = sys.argv[1] + "/shapes-sd"
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a red circle above a blue square"] * 16
    pipe(prompts, num_inference_steps=4, guidance_scale=1.0)
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    t = time.time(); n = 10
    for _ in range(n):
        pipe(prompts, num_inference_steps=4, guidance_scale=1.0, output_type="pt")
    torch.cuda.synchronize(); dt = time.time() - t
    print(f"{dtype}: {16 * n / dt:.1f} images/s at batch 16, 4 steps; peak {torch.cuda.max_memory_allocated() / 2**20:.1f} MiB")
PY
fi
tar -C "$OUT" -czf "$OUT/assets.tar.gz" assets && rm -rf "$OUT/assets"
