"""Cross-check our SmoothQuant and GPTQ against llmcompressor's on the same small Llama, on CPU.

llmcompressor is NOT a dependency of the project: run this in a separate environment that has it
next to the project's own requirements, from the checkout's root:

    python -m venv /tmp/peer-venv
    /tmp/peer-venv/bin/pip install torch==2.13.0 transformers==5.17.0 'llmcompressor==0.14.*'
    PYTHONPATH=. /tmp/peer-venv/bin/python bench/compare/peer_check.py --out bench/compare/peer_check.json

The model is a random 4-layer LlamaForCausalLM (hidden 256) whose norms are given a few outlier
channels (as trained LLMs and VLA decoders have); calibration and evaluation are random token
sequences. What is compared, on the same calibration tokens:

* SmoothQuant (alpha 0.5 and 0.8): the smoothing vectors both sides fold into
  input_layernorm -> q/k/v and post_attention_layernorm -> gate/up (relative difference), the fp
  logits after smoothing alone (both must equal the fp model's), and the logits error after W8A8
  (per-channel asymmetric weights, per-token dynamic int8 activations) with each side's smoothing.
* GPTQ W4 and W3 (per-channel asymmetric, act-order, 1% damping, block 128) and RTN on the same
  grid: relative logits error of each, and the share of weights on which the two RTNs agree.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from qvla_ros.quant.baselines.calibration import collect_input_stats
from qvla_ros.quant.baselines.gptq import apply_gptq
from qvla_ros.quant.baselines.smoothing import scale_groups
from qvla_ros.quant.baselines.smoothquant import smooth_, smoothing_factors
from qvla_ros.quant.quantizer import fake_quantize_activations, fake_quantize_rows

VOCAB, SEQ = 512, 64


class TokensAsPolicy(nn.Module):
    """Gives the LM the policy contract our baselines drive (images slot = token ids)."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, images, instruction, proprio):
        return self.lm(input_ids=images).logits


def build_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=SEQ,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                outliers = torch.randperm(cfg.hidden_size, generator=gen)[:6]
                norm.weight[outliers] *= 20.0
    return model


def token_batches(n: int, batch: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (batch, SEQ), generator=gen) for _ in range(n // batch)]


def as_policy_batches(tokens):
    return [{"images": t, "instruction": [""] * t.shape[0], "proprio": torch.zeros(t.shape[0], 1)} for t in tokens]


@torch.no_grad()
def logits(model, tokens) -> torch.Tensor:
    return torch.cat([model(input_ids=t).logits for t in tokens])


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a - ref).norm() / ref.norm())


def decoder_linears(model) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and "lm_head" not in n}


# ---- fake quantization on our grid (for comparing numbers, not storage) -----------------------
class FakeW8A8(nn.Module):
    def __init__(self, linear: nn.Linear, wbits: int = 8):
        super().__init__()
        self.weight = nn.Parameter(fake_quantize_rows(linear.weight, wbits), requires_grad=False)
        self.bias = linear.bias

    def forward(self, x):
        return nn.functional.linear(fake_quantize_activations(x, 8), self.weight, self.bias)


def swap(model, names, make):
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, make(model.get_submodule(name)))


# ---- llmcompressor side -----------------------------------------------------------------------
def word_tokenizer():
    """A tokenizer for the VOCAB ids (llmcompressor requires a processor whenever data is passed;
    the data here is already token ids, so it is never used to encode)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t0")


def peer_oneshot(model, recipe, tokens):
    from llmcompressor import oneshot

    loader = torch.utils.data.DataLoader(
        [{"input_ids": row, "attention_mask": torch.ones_like(row)} for t in tokens for row in t],
        batch_size=tokens[0].shape[0])
    with tempfile.TemporaryDirectory() as tmp:
        model.config.save_pretrained(tmp)
        model.config._name_or_path = tmp
        model.name_or_path = tmp
        return oneshot(model=model, recipe=recipe, dataset=loader, tokenizer=word_tokenizer(),
                       num_calibration_samples=10**6, output_dir=None, pipeline="sequential")


SQ_MAPPINGS = [[["re:.*q_proj", "re:.*k_proj", "re:.*v_proj"], "re:.*input_layernorm"],
               [["re:.*gate_proj", "re:.*up_proj"], "re:.*post_attention_layernorm"]]


def peer_smoothquant(model, alpha, tokens):
    from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

    return peer_oneshot(model, [SmoothQuantModifier(smoothing_strength=alpha, mappings=SQ_MAPPINGS)], tokens)


def peer_gptq(model, bits, tokens):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.quantization import GPTQModifier

    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=bits, type="int", symmetric=False, strategy="channel"))
    return peer_oneshot(model, [GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"],
                                             dampening_frac=0.01, block_size=128, actorder="weight")],
                        tokens)


def peer_rtn(model, bits):
    """llmcompressor's per-channel asymmetric RTN (QuantizationModifier, no calibration data)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier

    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=bits, type="int", symmetric=False, strategy="channel"))
    with tempfile.TemporaryDirectory() as tmp:
        model.config.save_pretrained(tmp)
        model.config._name_or_path = tmp
        return oneshot(model=model, recipe=[QuantizationModifier(config_groups={"g": scheme},
                                                                  ignore=["lm_head"])], output_dir=None)


def peer_weights(model) -> dict[str, torch.Tensor]:
    """The fake-quantized weights llmcompressor leaves in memory (its observers' qparams applied)."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    out = {}
    for name, m in decoder_linears(model).items():
        scheme = getattr(m, "quantization_scheme", None)
        if scheme is not None and hasattr(m, "weight_scale"):
            out[name] = fake_quantize(m.weight, m.weight_scale, m.weight_zero_point, scheme.weights).detach()
        else:
            out[name] = m.weight.detach().clone()
    return out


def load_weights(model, weights):
    with torch.no_grad():
        for name, w in weights.items():
            model.get_submodule(name).weight.copy_(w)


def strip_quantization(model):
    """A plain copy of a model that llmcompressor has wrapped (weights kept as they are)."""
    clean = build_model()
    clean.load_state_dict({k: v for k, v in model.state_dict().items() if k in clean.state_dict()})
    return clean


@torch.no_grad()
def input_ranges(policy, names, batches) -> dict[str, torch.Tensor]:
    """max - min of each input channel of the named Linears over the batches."""
    lo, hi, handles = {}, {}, []

    def hook_for(name):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1])
            lo[name] = torch.minimum(lo.get(name, x.amin(0)), x.amin(0))
            hi[name] = torch.maximum(hi.get(name, x.amax(0)), x.amax(0))
        return hook

    for name in names:
        handles.append(policy.get_submodule(name).register_forward_pre_hook(hook_for(name)))
    try:
        for batch in batches:
            policy(batch["images"], batch["instruction"], batch["proprio"])
    finally:
        for h in handles:
            h.remove()
    return {n: hi[n] - lo[n] for n in names}


# ---- checks -----------------------------------------------------------------------------------
def check_smoothquant(base, calib, evaluation, alphas):
    ref = logits(base, evaluation)
    names = [n for n in decoder_linears(base) if n.rsplit(".", 1)[-1] in
             ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")]
    rows = []
    plain = copy.deepcopy(base)
    swap(plain, list(decoder_linears(plain)), FakeW8A8)
    no_smooth = rel_err(logits(plain, evaluation), ref)
    for alpha in alphas:
        ours = TokensAsPolicy(copy.deepcopy(base))
        pnames = [f"lm.{n}" for n in names]
        stats = collect_input_stats(ours, {n: ours.get_submodule(n) for n in pnames}, as_policy_batches(calib))
        ranges = input_ranges(ours, pnames, as_policy_batches(calib))
        our_s, peer_formula = {}, {}
        for group in scale_groups(ours, pnames):
            weights = [ours.get_submodule(n).weight for n in group.linears]
            our_s[group.norm[3:]] = smoothing_factors(stats[group.linears[0]].absmax, weights, alpha)
            # llmcompressor's variant of the statistic: activation range (max - min) instead of
            # max|x|, and 2 max|W|; a constant factor on s changes nothing after per-row weight and
            # per-token activation quantization, the range-vs-max difference does (slightly).
            w_range = 2 * torch.cat([w.detach().abs() for w in weights]).amax(0)
            peer_formula[group.norm[3:]] = ranges[group.linears[0]].pow(alpha) / w_range.pow(1 - alpha)
        explicit = smooth_(ours, pnames, stats, alpha)
        assert not explicit  # every smoothed Linear here has a norm to fold into
        ours_lm = ours.lm
        theirs_lm = strip_quantization(peer_smoothquant(copy.deepcopy(base), alpha, calib))
        # Their smoothing vector, read back from the norm they divided: s = w_before / w_after.
        diffs, formula_diffs = [], []
        for norm, s in our_s.items():
            s_theirs = base.get_submodule(norm).weight / theirs_lm.get_submodule(norm).weight
            diffs.append(float(((s - s_theirs).abs() / s_theirs.abs()).max().detach()))
            formula_diffs.append(float(((peer_formula[norm] - s_theirs).abs() / s_theirs.abs()).max().detach()))
        fp_ours = rel_err(logits(ours_lm, evaluation), ref)
        fp_theirs = rel_err(logits(theirs_lm, evaluation), ref)
        swap(ours_lm, list(decoder_linears(ours_lm)), FakeW8A8)
        swap(theirs_lm, list(decoder_linears(theirs_lm)), FakeW8A8)
        rows.append({"alpha": alpha, "max_relative_difference_of_smoothing_vectors": max(diffs),
                     "same_with_llmcompressor_statistic": max(formula_diffs),
                     "logits_rel_err_smoothing_only": {"ours": fp_ours, "llmcompressor": fp_theirs},
                     "logits_rel_err_w8a8": {"no_smoothing": no_smooth,
                                              "ours": rel_err(logits(ours_lm, evaluation), ref),
                                              "llmcompressor_smoothing": rel_err(logits(theirs_lm, evaluation), ref)}})
    return rows


def check_gptq(base, calib, evaluation, bits_list):
    ref = logits(base, evaluation)
    rows = []
    for bits in bits_list:
        names = list(decoder_linears(base))
        rtn = copy.deepcopy(base)
        load_weights(rtn, {n: fake_quantize_rows(m.weight, bits) for n, m in decoder_linears(rtn).items()})
        peer_rtn_w = peer_weights(peer_rtn(copy.deepcopy(base), bits))
        ours_rtn_w = {n: m.weight for n, m in decoder_linears(rtn).items()}
        agree = sum(int(torch.isclose(peer_rtn_w[n], ours_rtn_w[n], rtol=1e-3, atol=1e-6).sum()) for n in names)
        total = sum(w.numel() for w in ours_rtn_w.values())
        peer_rtn_model = copy.deepcopy(base)
        load_weights(peer_rtn_model, peer_rtn_w)

        ours = TokensAsPolicy(copy.deepcopy(base))
        started = time.perf_counter()
        apply_gptq(ours, {f"lm.{n}": ours.get_submodule(f"lm.{n}") for n in names}, as_policy_batches(calib),
                   bits, progress=False)
        ours_s = time.perf_counter() - started
        started = time.perf_counter()
        theirs = peer_gptq(copy.deepcopy(base), bits, calib)
        theirs_s = time.perf_counter() - started
        theirs_model = copy.deepcopy(base)
        load_weights(theirs_model, peer_weights(theirs))
        rows.append({"bits": bits,
                     "rtn_weights_agreeing_share": agree / total,
                     "logits_rel_err": {"rtn_ours": rel_err(logits(rtn, evaluation), ref),
                                        "rtn_llmcompressor": rel_err(logits(peer_rtn_model, evaluation), ref),
                                        "gptq_ours": rel_err(logits(ours.lm, evaluation), ref),
                                        "gptq_llmcompressor": rel_err(logits(theirs_model, evaluation), ref)},
                     "seconds": {"gptq_ours": round(ours_s, 1), "gptq_llmcompressor": round(theirs_s, 1)}})
    return rows


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench/compare/peer_check.json")
    parser.add_argument("--calib", type=int, default=64, help="calibration sequences")
    args = parser.parse_args()
    import llmcompressor

    base = build_model()
    calib = token_batches(args.calib, 8, seed=1)
    evaluation = token_batches(32, 8, seed=2)
    result = {
        "model": "random LlamaForCausalLM, 4 layers, hidden 256, 6 outlier channels per norm (x20)",
        "calibration": f"{args.calib} random sequences of {SEQ} tokens", "evaluation": f"32 sequences of {SEQ} tokens",
        "llmcompressor": llmcompressor.__version__, "torch": torch.__version__,
        "cpu": cpu_model(), "cores": os.cpu_count(),
        "smoothquant": check_smoothquant(base, calib, evaluation, (0.5, 0.8)),
        "gptq": check_gptq(base, calib, evaluation, (4, 3)),
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
