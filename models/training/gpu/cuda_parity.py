"""PyTorch on CUDA against the shipped ONNX file on ONNX Runtime's CPU provider, through the runtime's pipeline.

Float32 with TF32 off (export's parity check), float32 with PyTorch's default TF32 convolutions, and
autocast (bfloat16, or float16 where the GPU lacks it: what training on CUDA runs), each against ONNX
Runtime; the pipeline's time per scan on each.

    python models/training/gpu/cuda_parity.py --model model.pt --onnx models/heartseg-la.onnx --scan S --out OUT.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from heartseg.export.model_file import load_trained_model
from heartseg.export.parity import ParityError, check_parity
from heartseg.export.pipeline_file import networks_file
from heartseg.runtime.formats.nifti import load_volume
from heartseg.runtime.inference import infer_canonical
from heartseg.runtime.postprocess import mask_from_prob
from heartseg.runtime.metrics import dice_score
from heartseg.runtime.preprocess import to_canonical
from heartseg.runtime.session import OnnxSession
from heartseg.train.trainer import torch_predictor


def main() -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--onnx", type=Path, required=True)
    parser.add_argument("--scan", type=Path, action="append", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model = load_trained_model(args.model)
    record: dict = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__}
    try:
        record["fp32"] = [r.to_dict() for r in check_parity(model, args.onnx, args.scan, torch_device=args.device)]
    except ParityError as exc:
        record["fp32"] = str(exc)
    record["autocast_dtype"] = str(torch.bfloat16 if not cuda or torch.cuda.is_bf16_supported() else torch.float16)
    with networks_file(args.onnx) as networks_path:  # the stages' networks, run one at a time as the reference runs them
        session = OnnxSession(networks_path, device="cpu")
    networks = {name: net.to(args.device) for name, net in model.networks.items()}
    for scan in args.scan:
        canonical = to_canonical(load_volume(scan), model.contract.orientation)
        started = time.perf_counter()
        ref = infer_canonical(canonical, model.contract, session.predict).prob
        onnx_s = time.perf_counter() - started
        ref_mask = mask_from_prob(ref, model.contract)
        rows = {"onnx_cpu_s": onnx_s}
        for name, tf32, amp in (("tf32", True, False), ("bf16_autocast", False, True), ("fp32", False, False)):
            torch.backends.cudnn.allow_tf32 = tf32
            predict = torch_predictor(networks, torch.device(args.device), amp=amp)
            infer_canonical(canonical, model.contract, predict)  # warm-up
            sync()
            started = time.perf_counter()
            prob = infer_canonical(canonical, model.contract, predict).prob
            sync()
            seconds = time.perf_counter() - started
            rows[name] = {"max_abs_diff": float(np.max(np.abs(prob.astype(np.float64) - ref))),
                          "mask_dice_vs_onnx": float(dice_score(mask_from_prob(prob, model.contract), ref_mask)),
                          "mask_voxels_differing": int(np.sum(mask_from_prob(prob, model.contract) != ref_mask)),
                          "pipeline_s": seconds}
        record[scan.name] = rows
    args.out.write_text(json.dumps(record, indent=1))
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
