"""Cross-check of gptq-g128 against llmcompressor's GPTQ core, on the tiny policy's offline action error.

llmcompressor is not a dependency of this project; this runs in a throwaway venv that sees the
project's packages (never the project's .venv itself):

    python3.11 -m venv /tmp/llmc_venv
    echo /work/main/.venv/lib/python3.11/site-packages > /tmp/llmc_venv/lib/python3.11/site-packages/zz.pth
    /tmp/llmc_venv/bin/pip install 'llmcompressor==0.14.*'
    PYTHONPATH=. /tmp/llmc_venv/bin/python bench/quant/groupwise_llmcompressor_check.py --data DEMO_DIR

llmcompressor's oneshot pipeline expects a Hugging Face causal LM and its datasets, not a VLA
policy, so its GPTQ is run through this project's calibration instead: the same sequential
one-pass forward (apply_gptq: each group of Linears sees the inputs the already-quantized layers
produce, Hessian H = X X^T / n), with each group's rounding done by
`llmcompressor.modifiers.gptq.gptq_quantize.quantize_weight` (strategy "group", group 128,
asymmetric int, no act-order, its grid from compressed-tensors' calculate_qparams on the
unquantized weights, as its weight observer does) instead of ours. Its weights stay dense
(fake-quantized); ours are packed as GroupWiseLinear. Same frames, same metric as
groupwise_baselines.py.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from groupwise_baselines import calibration_and_held_out  # noqa: E402

from compressed_tensors.quantization import QuantizationArgs, fake_quantize  # noqa: E402
from compressed_tensors.quantization.utils import calculate_qparams  # noqa: E402
from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight  # noqa: E402

from qvla_ros.io import atomic_write_text  # noqa: E402
from qvla_ros.policy import load_policy  # noqa: E402
from qvla_ros.quant.action_error import action_error_per_frame  # noqa: E402
from qvla_ros.quant.baselines import gptq as our_gptq  # noqa: E402
from qvla_ros.quant.baselines import quantize_baseline  # noqa: E402
from qvla_ros.quant.baselines.calibration import batches_from_frames, calibration_actions  # noqa: E402
from qvla_ros.quant.groupwise_linear import fake_quantize_group_wise  # noqa: E402
from qvla_ros.quant.targets import quantizable_linears  # noqa: E402
from qvla_ros.sim.compare import machine  # noqa: E402


def llmc_args(bits: int, group: int) -> QuantizationArgs:
    return QuantizationArgs(num_bits=bits, type="int", symmetric=False, strategy="group", group_size=group)


def llmc_qparams(weight: torch.Tensor, args: QuantizationArgs):
    n, k = weight.shape
    g = weight.float().reshape(n, k // args.group_size, args.group_size)
    return calculate_qparams(g.amin(-1), g.amax(-1), args)


def llmc_gptq(weight, hessian, bits, *, group_size=None, damp=0.01, **_):
    """Drop-in for our gptq_quantize_weight: llmcompressor's GPTQ at `bits`, group `group_size`."""
    args = llmc_args(int(bits), group_size)
    scale, zero = llmc_qparams(weight, args)
    q, _, _ = quantize_weight(weight.float()[None].clone(), hessian.float()[None].clone(), scale[None],
                              zero[None], None, args, blocksize=128, percdamp=damp)
    return q[0]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data")
    ap.add_argument("--synthetic", action="store_true")
    ap.add_argument("--calib-frames", type=int, default=64)
    ap.add_argument("--eval-frames", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bits", default="4,3")
    ap.add_argument("--out", default=str(Path(__file__).with_name("groupwise_llmcompressor_check.json")))
    args = ap.parse_args(argv)
    if (args.data is None) == (not args.synthetic):
        ap.error("give exactly one of --data and --synthetic")
    policy = load_policy(None).eval()
    calib, held_out = calibration_and_held_out(policy, args)
    batches, eval_batches = batches_from_frames(calib), batches_from_frames(held_out, 32)
    with torch.no_grad():
        reference = calibration_actions(policy, eval_batches)

    def score(q) -> dict:
        with torch.no_grad():
            e = action_error_per_frame(calibration_actions(q, eval_batches), reference)
        return {"mean": float(e.mean()), "median": float(e.median())}

    rows = []
    for bits in [int(b) for b in args.bits.split(",")]:
        # The grids: compressed-tensors' group RTN against ours (ours rounds the scale to fp16, so
        # near-ties may round one step apart): the share of weights on another code.
        other_code = total = 0
        with torch.no_grad():
            for lin in quantizable_linears(policy).values():
                a = llmc_args(bits, 128)
                s, z = llmc_qparams(lin.weight, a)
                diff = (fake_quantize(lin.weight.float(), s, z, a) - fake_quantize_group_wise(lin.weight, bits, 128)).abs()
                other_code += int((diff > 0.5 * s.repeat_interleave(128, dim=1)).sum())
                total += diff.numel()
        ours = copy.deepcopy(policy)
        quantize_baseline(ours, f"gptq-g128-w{bits}", batches, progress=False)
        theirs = copy.deepcopy(policy)
        modules = quantizable_linears(theirs)
        with mock.patch.object(our_gptq, "gptq_quantize_weight", llmc_gptq):
            our_gptq.apply_gptq(theirs, modules, batches, bits, group_size=128, act_order=False, progress=False)
        rtn = copy.deepcopy(policy)
        quantize_baseline(rtn, f"rtn-g128-w{bits}", progress=False)
        row = {"bits": bits, "ours_gptq_g128": score(ours), "llmcompressor_gptq_g128": score(theirs),
               "ours_rtn_g128": score(rtn), "rtn_g128_share_of_weights_on_another_code": other_code / total}
        rows.append(row)
        print(json.dumps(row), flush=True)
    import llmcompressor
    doc = {"format": "qvla-groupwise-llmcompressor-check", "version": 1,
           "command": "PYTHONPATH=. /tmp/llmc_venv/bin/python bench/quant/groupwise_llmcompressor_check.py "
                      + " ".join(argv if argv is not None else sys.argv[1:]),
           "llmcompressor": llmcompressor.__version__, "calibration": calib.source, "evaluation": held_out.source,
           "machine": machine(), "rows": rows}
    atomic_write_text(Path(args.out), json.dumps(doc, indent=1, default=str))
    return doc


if __name__ == "__main__":
    main()
