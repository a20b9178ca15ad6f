"""Method names for `qvla compare` and the baselines' API, parsed into `MethodSpec`s.

    fp                  the unquantized policy (weights counted as bfloat16: the 100% row)
    rtn-w{8,4,3,2}      round-to-nearest, one (scale, zero) per output channel (MixedBitLinear)
    rtn-g{G}-w{4,3,2}   round-to-nearest, one (scale, zero) per G inputs of a row (G = 128, 64, ...)
    sq-w{8,4}a8         SmoothQuant, per-channel weights, per-token dynamic int8 activations
    gptq-w{4,3}         GPTQ, weight-only, per channel
    gptq-g{G}-w{4,3}    GPTQ, one (scale, zero) per G inputs of a row (GroupWiseLinear)
    awq-w{4,3}          AWQ (block-output scale search folded into the preceding op, clip search),
                        weight-only, per channel
    awq-g{G}-w{4,3}     AWQ, group-wise as gptq-g{G} (the setting LLM users run: g128)
    qvla@METHOD         QVLA weight-only at METHOD's measured bits/param
    qvla-a8@METHOD      QVLA with 8-bit activations at METHOD's measured bits/param
    qvla-b{X}, qvla-a8-b{X}   QVLA at a budget of X bits/param (e.g. qvla-b4.25)
    qvla-b{X}-whole     QVLA at X bits/param over the WHOLE policy (quant/accounting.py: the
                        weights no method quantizes count at their stored width), e.g. qvla-b4.0-whole
    qvla-gptq...        any QVLA form above with its rows rounded by GPTQ at the widths QVLA
                        chose (e.g. qvla-gptq@gptq-w4, qvla-a8-gptq-b4.0); plain QVLA rounds
                        each row to nearest

Group-wise storage costs 32/G bits a weight on top of the codes (fp16 scale and zero per group:
0.25 at G = 128), measured from the stored tensors like every other method's memory.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

FAMILIES = ("fp", "rtn", "rtn-group", "smoothquant", "gptq", "awq", "qvla")

#: what `qvla compare` runs when --methods is not given
DEFAULT_METHODS = (
    "fp", "rtn-w8", "rtn-w4", "rtn-w3", "rtn-w2", "rtn-g128-w4", "rtn-g128-w3", "rtn-g128-w2",
    "sq-w8a8", "sq-w4a8", "gptq-w4", "gptq-w3", "awq-w4", "awq-w3",
    "gptq-g128-w4", "gptq-g128-w3", "awq-g128-w4", "awq-g128-w3",
    "qvla@rtn-w4", "qvla@rtn-w3", "qvla@rtn-w2", "qvla@gptq-w4", "qvla@gptq-w3",
    "qvla-a8@sq-w8a8", "qvla-a8@sq-w4a8",
)

_RTN = re.compile(r"rtn-w(\d+)")
_GROUP = re.compile(r"(rtn|gptq|awq)-g(\d+)-w(\d+)")
_SQ = re.compile(r"sq-w(\d+)a8")
_GPTQ = re.compile(r"gptq-w(\d+)")
_AWQ = re.compile(r"awq-w(\d+)")
_QVLA_MATCH = re.compile(r"qvla(-a8)?(-gptq)?@(.+)")
_QVLA_BUDGET = re.compile(r"qvla(-a8)?(-gptq)?-b(\d+(?:\.\d+)?)(-whole)?")


class MethodError(ValueError):
    """A method name `qvla compare` does not know, or one with unsupported settings."""


@dataclass(frozen=True)
class MethodSpec:
    """One quantization method with its settings.

    Args:
        name: canonical name (the grammar in the module docstring).
        family: one of FAMILIES.
        wbits: weight bits (None for fp and QVLA, whose widths vary per channel).
        abits: activation bits, 16 or 8.
        group_size: inputs per (scale, zero) for rtn-group, and for gptq and awq when they are
            group-wise (None: one per output channel).
        match: for QVLA, the method whose measured bits/param is the budget.
        budget: for QVLA, an explicit budget in bits/param.
        scope: what a QVLA budget counts: "planned" (the quantized Linears' weights) or "whole"
            (every weight of the policy, the rest at its stored width).
        rounding: for QVLA, how a row is rounded at its allocated width: "rtn" (to nearest, what
            a plan file alone reproduces) or "gptq" (GPTQ's error feedback, needs calibration).
    """

    name: str
    family: str
    wbits: int | None = None
    abits: int = 16
    group_size: int | None = None
    match: str | None = None
    budget: float | None = None
    rounding: str = "rtn"
    scope: str = "planned"

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def label(self) -> str:
        """The line a point belongs to in the comparison plot (a method across its bit-widths)."""
        if self.family == "rtn-group":
            return f"RTN group {self.group_size}"
        if self.family in ("gptq", "awq") and self.group_size:
            return f"{self.family.upper()} group {self.group_size}"
        if self.family == "qvla":
            rows = " + GPTQ rows" if self.rounding == "gptq" else ""
            return f"QVLA{rows} W+A8" if self.abits == 8 else f"QVLA{rows}"
        return {"fp": "fp", "rtn": "RTN per-channel", "smoothquant": "SmoothQuant (A8)",
                "gptq": "GPTQ", "awq": "AWQ"}[self.family]


def _wbits(name: str, bits: str, allowed: tuple[int, ...]) -> int:
    value = int(bits)
    if value not in allowed:
        raise MethodError(f"{name}: weight bits must be one of {list(allowed)}, got {value}")
    return value


def parse_method(name: str) -> MethodSpec:
    """The MethodSpec for a method name; MethodError naming the accepted forms otherwise."""
    if not isinstance(name, str):
        raise MethodError(f"a method name is a string, got {type(name).__name__}")
    text = name.strip().lower()
    if text in ("fp", "bf16", "fp32"):
        return MethodSpec("fp", "fp")
    if m := _RTN.fullmatch(text):
        return MethodSpec(text, "rtn", wbits=_wbits(text, m[1], (8, 4, 3, 2)))
    if m := _GROUP.fullmatch(text):
        group = int(m[2])
        if group <= 0 or group % 8:
            raise MethodError(f"{text}: group size must be a positive multiple of 8, got {group}")
        # A group size that does not divide a layer's inputs is not an error: GroupWiseLinear pads
        # the last group with zero weights, and the padding is counted in the measured memory.
        family = "rtn-group" if m[1] == "rtn" else m[1]
        return MethodSpec(text, family, wbits=_wbits(text, m[3], (8, 4, 3, 2)), group_size=group)
    if m := _SQ.fullmatch(text):
        return MethodSpec(text, "smoothquant", wbits=_wbits(text, m[1], (8, 4)), abits=8)
    if m := _GPTQ.fullmatch(text):
        return MethodSpec(text, "gptq", wbits=_wbits(text, m[1], (8, 4, 3, 2)))
    if m := _AWQ.fullmatch(text):
        return MethodSpec(text, "awq", wbits=_wbits(text, m[1], (8, 4, 3, 2)))
    if m := _QVLA_BUDGET.fullmatch(text):
        budget = float(m[3])
        scope = "whole" if m[4] else "planned"
        top = 32 if m[4] else 16   # a whole policy stored in float32 is 32 bits/param
        if not 0 < budget <= top:
            raise MethodError(f"{text}: a budget is in (0, {top}] bits/param, got {budget}")
        return MethodSpec(text, "qvla", abits=8 if m[1] else 16, budget=budget,
                          rounding="gptq" if m[2] else "rtn", scope=scope)
    if m := _QVLA_MATCH.fullmatch(text):
        target = parse_method(m[3])
        if target.family in ("qvla", "fp"):
            raise MethodError(f"{text}: QVLA matches the memory of a baseline, not of {target.name}")
        return MethodSpec(f"qvla{m[1] or ''}{m[2] or ''}@{target.name}", "qvla",
                          abits=8 if m[1] else 16, match=target.name,
                          rounding="gptq" if m[2] else "rtn")
    raise MethodError(f"unknown method {name!r}; known forms: fp, rtn-w{{8,4,3,2}}, "
                      f"rtn-g{{G}}-w{{4,3,2}}, sq-w{{8,4}}a8, gptq-w{{4,3}}, gptq-g{{G}}-w{{4,3}}, awq-w{{4,3}}, "
                      f"awq-g{{G}}-w{{4,3}} (G a multiple of 8), "
                      f"qvla@METHOD, qvla-a8@METHOD, qvla-b{{X}}, qvla-a8-b{{X}}, qvla-b{{X}}-whole (whole-policy bits), and each QVLA "
                      f"form with -gptq after qvla/qvla-a8")


def resolve_order(names: list[str]) -> list[MethodSpec]:
    """Parsed methods, each QVLA run after the baseline it matches (added if not listed)."""
    specs: list[MethodSpec] = []
    seen: set[str] = set()

    def add(spec: MethodSpec) -> None:
        if spec.name in seen:
            return
        if spec.match:
            add(parse_method(spec.match))
        seen.add(spec.name)
        specs.append(spec)

    for name in names:
        add(parse_method(name))
    return specs
