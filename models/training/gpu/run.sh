#!/bin/bash
# One short session on a GPU machine that cannot hold the datasets, from the repository root, with .gpu/
# holding pack.npz.xz (pack.py), la8.pt (the shipped model's model.pt: the weights to start from and to
# check) and site/ (nibabel, where the machine lacks it): PyTorch on CUDA against the shipped ONNX file,
# then two fine-stage trainings side by side (fine-tuned from la8.pt, and from scratch) for SECONDS each.
# OUT names the folder for the results (8 files); DEVICE=cpu WORKERS=1 runs it anywhere, slowly.
set -u
OUT=${OUT:?} SECONDS_EACH=${1:-380} WORKERS=${WORKERS:-6} DEVICE=${DEVICE:-cuda} EXTRA=${EXTRA:-}
mkdir -p "$OUT" /tmp/pkg/heartseg && cp heartseg/__init__.py /tmp/pkg/heartseg/
for d in runtime train export models; do ln -sfn "$PWD/$d" /tmp/pkg/heartseg/$d; done
export PYTHONPATH=/tmp/pkg:$PWD/.gpu/site PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  nproc; python3 -c "import torch, numpy, scipy, onnxruntime, nibabel; print(torch.__version__, numpy.__version__, scipy.__version__, onnxruntime.__version__, nibabel.__version__)"
  timeout 150 python3 models/training/gpu/cuda_parity.py --model .gpu/la8.pt --onnx models/heartseg-la.onnx \
    --scan examples/la_029_crop.nii.gz --out "$OUT/parity.json" --device "$DEVICE"
  echo "parity exit $? at ${SECONDS} s"
} > "$OUT/main.log" 2>&1
T=models/training/gpu/train_packed.py
python3 $T --pack .gpu/pack.npz.xz --out "$OUT/A" --seconds "$SECONDS_EACH" --init-from .gpu/la8.pt --lr 5e-4 \
  --flip-prob 0.1 --permute-prob 0.02 --workers "$WORKERS" --device "$DEVICE" $EXTRA > "$OUT/A.log" 2>&1 &
python3 $T --pack .gpu/pack.npz.xz --out "$OUT/B" --seconds "$SECONDS_EACH" --lr 2e-3 --workers "$WORKERS" \
  --device "$DEVICE" $EXTRA > "$OUT/B.log" 2>&1 &
wait
echo "trainings done at ${SECONDS} s" >> "$OUT/main.log"
