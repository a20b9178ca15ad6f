"""`import_oft(DIR, OUT)`: a published OpenVLA-OFT checkpoint folder -> the project's checkpoint.

The published layout (moojink/openvla-oft, a fine-tuned `OpenVLAForActionPrediction` saved by
transformers, plus the heads the fine-tuning script saves apart):

    config.json                         OpenVLAConfig (vision_backbone_id, timm_model_ids, image_sizes,
                                        text_config, pad_token_id, ...)
    model.safetensors.index.json        {"weight_map": {tensor name: shard file}}
    model-0000N-of-0000M.safetensors    the shards (or one model.safetensors, no index)
    dataset_statistics.json             {unnorm_key: {"action": {q01, q99, mask}, "proprio": {...}}}
    tokenizer.json (+ tokenizer_config.json, special_tokens_map.json, added_tokens.json, tokenizer.model)
    action_head--STEP_checkpoint.pt     L1RegressionActionHead state dict (maybe DDP `module.`-prefixed)
    proprio_projector--STEP_checkpoint.pt  ProprioProjector state dict

What is checked, each failure a CheckpointError naming the file and the key:
- config.json describes the fused DINOv2 + SigLIP backbone at one image size and a Llama decoder;
- every shard the index names exists, holds exactly the tensors the index maps to it, and the
  union is the published key set (missing and unexpected keys listed);
- every tensor has the shape the inferred configuration implies, and a float dtype;
- the .pt files are read with torch.load(weights_only=True) only (a pickle holding anything but
  tensors is refused, never executed); their keys and shapes are checked like the shards';
- the tokenizer's <s>, </s>, `▁` and <PAD> ids agree with config.json and it fits the embedding;
- the statistics under unnorm_key have the action and proprio lengths, finite.

Sizes come from the tensors' shapes wherever a shape tells them (widths, depths, vocabulary,
proprio and action lengths); head counts, norm epsilon and rope theta from config.json, with
transformers' LlamaConfig defaults where it omits them (transformers writes only the fields that
differ from the defaults, so the published text_config holds little more than vocab_size); the
towers' head counts from their timm ids. Two numbers are not stored anywhere in the published
files and are the run's settings (experiments/robot): the images per observation
(num_images_in_input, 2 on LIBERO) and the chunk length (NUM_ACTIONS_CHUNK, 8 on LIBERO).

Not carried over, because an L1-regression forward never reads them: language_model.lm_head
(the logits), each tower's last block and final norm (OFT reads the second-to-last block) and
SigLIP's attention-pooling head. lm_head and the norms are required (they are the published
layout); attn_pool's tensors are accepted by prefix and not required, their names following
timm's version.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from .configuration_oft import OFTConfig, ViTTowerConfig, dinov2_tower, siglip_tower
from .checkpoint_files import CheckpointError, default_dtype, stored_tensor_specs

CONFIG_JSON = "config.json"
INDEX_JSON = "model.safetensors.index.json"
SINGLE_SHARD = "model.safetensors"
STATS_JSON = "dataset_statistics.json"
TOKENIZER_JSON = "tokenizer.json"
ADDED_TOKENS_JSON = "added_tokens.json"
ACTION_HEAD_GLOB = "action_head--*_checkpoint.pt"
PROPRIO_GLOB = "proprio_projector--*_checkpoint.pt"

#: The published fused backbone (prismatic's "dinosiglip-vit-so-224px") and its towers' head counts.
FUSED_BACKBONE_ID = "dinosiglip-vit-so-224px"
TIMM_IDS = ("vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224")
TIMM_HEADS = {TIMM_IDS[0]: 16, TIMM_IDS[1]: 16}
#: transformers' LlamaConfig defaults (Llama-2-7B), for the text_config fields a config.json omits.
LLAMA_DEFAULTS = {"num_attention_heads": 32, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
                  "bos_token_id": 1, "eos_token_id": 2}
LIBERO_NUM_IMAGES, LIBERO_CHUNK = 2, 8

VB, LM = "vision_backbone", "language_model"


def _read_json(path: Path) -> object:
    if not path.is_file():
        raise CheckpointError(f"{path.parent} has no {path.name} (an OpenVLA-OFT checkpoint folder holds "
                              f"config.json, the safetensors shards, dataset_statistics.json, tokenizer.json "
                              f"and the action_head / proprio_projector .pt files)")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None


def _key_list(keys, limit: int = 5) -> str:
    keys = sorted(keys)
    return f"{keys[:limit]}{'...' if len(keys) > limit else ''}"


# ---- shards ---------------------------------------------------------------------------------------
def read_shard_specs(source: Path) -> dict[str, tuple[tuple[int, ...], str, Path]]:
    """{tensor name: (shape, safetensors dtype, shard path)} from the index and the shards'
    headers (no tensor data read)."""
    index_path = source / INDEX_JSON
    if index_path.is_file():
        index = _read_json(index_path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise CheckpointError(f"{index_path} has no 'weight_map' of tensor name -> shard file")
        by_shard: dict[str, set[str]] = {}
        for key, shard in weight_map.items():
            if Path(shard).name != shard:
                raise CheckpointError(f"{index_path}: tensor {key} maps to {shard!r}, not a file in the folder")
            by_shard.setdefault(shard, set()).add(key)
    elif (source / SINGLE_SHARD).is_file():
        by_shard = {SINGLE_SHARD: None}
    else:
        raise CheckpointError(f"{source} has neither {INDEX_JSON} nor {SINGLE_SHARD}")
    specs = {}
    for shard, keys in sorted(by_shard.items()):
        path = source / shard
        if not path.is_file():
            raise CheckpointError(f"shard {path} is missing ({INDEX_JSON} maps {len(keys)} tensors to it, "
                                  f"e.g. {sorted(keys)[0]})")
        stored = stored_tensor_specs(path)
        if keys is not None and set(stored) != keys:
            raise CheckpointError(f"{path} does not hold what {INDEX_JSON} maps to it: missing "
                                  f"{_key_list(keys - set(stored))}, unexpected {_key_list(set(stored) - keys)}")
        for key, (shape, dtype) in stored.items():
            specs[key] = (shape, dtype, path)
    return specs


# ---- configuration --------------------------------------------------------------------------------
def _shape(specs, key: str, where: str) -> tuple[int, ...]:
    if key not in specs:
        raise CheckpointError(f"{where} has no tensor {key} (not an OpenVLA-OFT fused-backbone checkpoint?)")
    return specs[key][0]


def _tower_config(specs, prefix: str, base: ViTTowerConfig, where: str) -> tuple[ViTTowerConfig, int]:
    """The tower under `prefix` sized from its tensors; returns (config, patch side)."""
    w = _shape(specs, f"{prefix}.patch_embed.proj.weight", where)
    if len(w) != 4 or w[1] != 3 or w[2] != w[3]:
        raise CheckpointError(f"{where}: tensor {prefix}.patch_embed.proj.weight has shape {w}, "
                              f"expected [embed_dim, 3, patch, patch]")
    pattern = re.compile(re.escape(prefix) + r"\.blocks\.(\d+)\.")
    blocks = {int(m.group(1)) for k in specs if (m := pattern.match(k))}
    depth = len(blocks)
    if blocks != set(range(depth)):
        raise CheckpointError(f"{where}: {prefix}.blocks are numbered {sorted(blocks)}, not 0..{depth - 1}")
    mlp = _shape(specs, f"{prefix}.blocks.0.mlp.fc1.weight", where)
    try:
        cfg = dataclasses.replace(base, embed_dim=w[0], depth=depth, mlp_hidden=mlp[0],
                                  num_heads=TIMM_HEADS[base.timm_id])
    except ValueError as exc:
        raise CheckpointError(f"{where}: the tower {prefix} is not a usable ViT: {exc}") from None
    return cfg, w[2]


def infer_config(meta: dict, specs: dict, *, num_images: int = LIBERO_NUM_IMAGES, horizon: int = LIBERO_CHUNK,
                 max_text_tokens: int = 48, head_specs: dict | None = None, where: str = "checkpoint",
                 empty_id: int = 29871) -> OFTConfig:
    """The OFTConfig a published checkpoint describes. meta: config.json; specs: {name: (shape, ...)}
    of the shards and (head_specs) of the two .pt files under their OFTPolicy names."""
    cj = f"{where}/{CONFIG_JSON}"
    if not isinstance(meta, dict):
        raise CheckpointError(f"{cj} is not a JSON object")
    backbone = meta.get("vision_backbone_id", FUSED_BACKBONE_ID)
    timm_ids = tuple(meta.get("timm_model_ids") or TIMM_IDS)
    if backbone != FUSED_BACKBONE_ID or timm_ids != TIMM_IDS or meta.get("use_fused_vision_backbone") is False:
        raise CheckpointError(f"{cj}: vision backbone {backbone!r} (timm {list(timm_ids)}); this importer reads "
                              f"the published fused {FUSED_BACKBONE_ID} ({list(TIMM_IDS)})")
    sizes = meta.get("image_sizes", [224, 224])
    if not isinstance(sizes, list) or len(sizes) != 2 or sizes[0] != sizes[1] or not isinstance(sizes[0], int):
        raise CheckpointError(f"{cj}: image_sizes {sizes!r} must be two equal sizes")
    text = meta.get("text_config") or {}
    if not isinstance(text, dict) or text.get("model_type", "llama") != "llama":
        raise CheckpointError(f"{cj}: text_config must describe a Llama decoder, got "
                              f"{text.get('model_type') if isinstance(text, dict) else text!r}")
    text = {**LLAMA_DEFAULTS, **text}
    shards = f"the shards of {where}"
    featurizer, patch = _tower_config(specs, f"{VB}.featurizer", dinov2_tower(), shards)
    fused, fused_patch = _tower_config(specs, f"{VB}.fused_featurizer", siglip_tower(), shards)
    if patch != fused_patch:
        raise CheckpointError(f"{shards}: the towers' patches differ ({patch} and {fused_patch} px)")
    embed = _shape(specs, f"{LM}.model.embed_tokens.weight", shards)
    layers = re.compile(re.escape(f"{LM}.model.layers.") + r"(\d+)\.")
    num_layers = len({int(m.group(1)) for k in specs if (m := layers.match(k))})
    heads = text["num_attention_heads"]
    kv_heads = text.get("num_key_value_heads") or heads
    hs = head_specs or {}
    head_fc1 = _shape(hs, "action_head.model.fc1.weight", f"{where}/{ACTION_HEAD_GLOB}")
    head_fc2 = _shape(hs, "action_head.model.fc2.weight", f"{where}/{ACTION_HEAD_GLOB}")
    head_blocks = len({k.split(".")[3] for k in hs if k.startswith("action_head.model.mlp_resnet_blocks.")})
    proprio = _shape(hs, "proprio_projector.fc1.weight", f"{where}/{PROPRIO_GLOB}")
    pad = meta.get("pad_token_id", text.get("pad_token_id", 32000))
    try:
        return OFTConfig(
            name=f"oft:{Path(where).name}", n_cams=num_images, image_size=sizes[0],
            patch_size=patch, proprio_dim=proprio[1], action_dim=head_fc2[0], horizon=horizon,
            featurizer=featurizer, fused_featurizer=fused, hidden_size=embed[1], num_layers=num_layers,
            num_heads=heads, num_kv_heads=kv_heads,
            intermediate_size=_shape(specs, f"{LM}.model.layers.0.mlp.gate_proj.weight", shards)[0],
            vocab_size=embed[0], rms_norm_eps=float(text["rms_norm_eps"]), rope_theta=float(text["rope_theta"]),
            bos_id=text["bos_token_id"], stop_id=text["eos_token_id"], empty_id=empty_id, pad_id=pad,
            max_text_tokens=max_text_tokens, head_blocks=head_blocks, head_hidden=head_fc1[0])
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{where}: the checkpoint does not describe a usable OFT policy: {exc}") from None


def dropped_published_specs(config: OFTConfig, model_specs: dict[str, tuple[int, ...]]) -> dict[str, tuple]:
    """The published tensors OFT's L1 forward never reads, with their shapes: each tower's last
    block (shaped as its block 0) and final norm, and lm_head."""
    out = {f"{LM}.lm_head.weight": (config.vocab_size, config.hidden_size)}
    for tower, cfg in (("featurizer", config.featurizer), ("fused_featurizer", config.fused_featurizer)):
        prefix = f"{VB}.{tower}"
        first = f"{prefix}.blocks.0."
        for key, shape in model_specs.items():
            if key.startswith(first):
                out[f"{prefix}.blocks.{cfg.depth - 1}.{key[len(first):]}"] = shape
        out[f"{prefix}.norm.weight"] = out[f"{prefix}.norm.bias"] = (cfg.embed_dim,)
    return out


#: Tensors accepted by prefix and left out: SigLIP's attention-pooling (MAP) head.
TOLERATED_PREFIXES = (f"{VB}.fused_featurizer.attn_pool.",)


# ---- the separate heads ---------------------------------------------------------------------------
def find_head_file(source: Path, pattern: str, step: int | None) -> Path:
    found = sorted(source.glob(pattern))
    if step is not None:
        found = [p for p in found if p.name == pattern.replace("*", str(step))]
    if not found:
        raise CheckpointError(f"{source} has no {pattern.replace('*', str(step) if step is not None else 'STEP')} "
                              f"(the L1-regression + proprio OpenVLA-OFT variant saves it beside the shards)")
    if len(found) > 1:
        raise CheckpointError(f"{source} holds several {pattern}: {[p.name for p in found]}; pick one with step")
    return found[0]


def load_head_state(path: Path) -> dict[str, torch.Tensor]:
    """A head's state dict, read with torch.load(weights_only=True) only; a DDP `module.` prefix
    is stripped. A pickle holding anything but tensors is refused (and never run)."""
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is not a torch.save zip archive")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refusals are UnpicklingError; corrupt archives RuntimeError
        # torch's message is a page of advice; keep the line that says what was found.
        lines = [re.sub(r"\x1b\[[0-9;]*m", "", ln).strip() for ln in str(exc).splitlines()]
        lines = [ln for ln in lines if ln] or [type(exc).__name__]
        why = next((ln for ln in lines if "Unsupported" in ln or "WeightsUnpickler error" in ln), lines[0])
        raise CheckpointError(f"{path} is refused: torch.load(weights_only=True) cannot read it as plain "
                              f"tensors ({why})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict of named tensors")
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: entry {key} is a {type(value).__name__}, not a tensor")
        name = key[len("module."):] if key.startswith("module.") else key
        if name in out:
            raise CheckpointError(f"{path}: {key} and another entry both name {name} once `module.` is stripped")
        out[name] = value
    return out


# ---- tokenizer and statistics ---------------------------------------------------------------------
def read_tokenizer(source: Path):
    """The `tokenizers` Tokenizer of tokenizer.json (a sentencepiece tokenizer.model alone is
    refused: converting it needs sentencepiece, which this package does not depend on)."""
    from tokenizers import Tokenizer

    path = source / TOKENIZER_JSON
    if not path.is_file():
        extra = " (there is a tokenizer.model: convert it once with transformers' LlamaTokenizerFast" \
                "(...).save_pretrained, which writes tokenizer.json)" if (source / "tokenizer.model").is_file() else ""
        raise CheckpointError(f"{source} has no {TOKENIZER_JSON}{extra}")
    try:
        return Tokenizer.from_str(path.read_text())
    except Exception as exc:  # the tokenizers library raises a bare Exception on bad JSON
        raise CheckpointError(f"{path} is not a valid tokenizer.json: {exc}") from None


def read_stats(source: Path, unnorm_key: str | None, action_dim: int, proprio_dim: int) -> tuple[str, dict]:
    """(the key used, OFTPolicy.set_norm_stats' dict) from dataset_statistics.json."""
    path = source / STATS_JSON
    data = _read_json(path)
    if not isinstance(data, dict) or not data:
        raise CheckpointError(f"{path} must be an object of unnorm_key -> statistics")
    if unnorm_key is None:
        if len(data) != 1:
            raise CheckpointError(f"{path} holds statistics for {sorted(data)}; name one with unnorm_key")
        unnorm_key = next(iter(data))
    if unnorm_key not in data and f"{unnorm_key}_no_noops" in data:   # the reference's fallback
        unnorm_key = f"{unnorm_key}_no_noops"
    if unnorm_key not in data:
        raise CheckpointError(f"{path} has no statistics for {unnorm_key!r}; it holds {sorted(data)}")
    stats = {}
    for part, dim in (("action", action_dim), ("proprio", proprio_dim)):
        entry = data[unnorm_key].get(part) if isinstance(data[unnorm_key], dict) else None
        if not isinstance(entry, dict):
            raise CheckpointError(f"{path}: {unnorm_key}.{part} is missing")
        for stat in ("q01", "q99", "mask"):
            where = f"{path}: {unnorm_key}.{part}.{stat}"
            if stat == "mask" and stat not in entry:   # the reference: no mask means every dimension
                value = np.ones(dim, dtype=bool)
            else:
                try:
                    value = np.asarray(entry[stat], dtype=bool if stat == "mask" else np.float64)
                except KeyError:
                    raise CheckpointError(f"{where} is missing") from None
                except (TypeError, ValueError):
                    raise CheckpointError(f"{where} is not a list of numbers") from None
            if value.shape != (dim,):
                raise CheckpointError(f"{where} has {value.size} values, the policy's {part} has {dim}")
            if stat != "mask" and not np.isfinite(value).all():
                raise CheckpointError(f"{where} holds NaN or inf")
            stats[f"{part}_{stat}"] = value.astype(np.float32) if stat != "mask" else value
    return unnorm_key, stats


# ---- the import -----------------------------------------------------------------------------------
def _check_specs(where: str, stored: dict[str, tuple], expected: dict[str, tuple[int, ...]],
                 tolerated: tuple[str, ...] = ()) -> None:
    kept = {k: v for k, v in stored.items() if not k.startswith(tolerated)} if tolerated else stored
    missing, unexpected = set(expected) - set(kept), set(kept) - set(expected)
    if missing or unexpected:
        raise CheckpointError(f"{where}: not the tensors of a published OpenVLA-OFT checkpoint: missing "
                              f"{_key_list(missing)}, unexpected {_key_list(unexpected)}")
    for key, spec in kept.items():
        if tuple(spec[0]) != tuple(expected[key]):
            raise CheckpointError(f"{where}: tensor {key} has shape {tuple(spec[0])}, the checkpoint's "
                                  f"configuration implies {tuple(expected[key])}")


def import_oft(source: str | os.PathLike, out: str | os.PathLike, *, unnorm_key: str | None = None,
               num_images: int = LIBERO_NUM_IMAGES, horizon: int = LIBERO_CHUNK, max_text_tokens: int = 48,
               step: int | None = None) -> Path:
    """Read the published OpenVLA-OFT checkpoint folder `source`, check all of it (module
    docstring), write the project's checkpoint to `out` (load_policy, calibrate, quantize and the
    node read it). Float tensors keep their stored dtype. Returns `out`."""
    from safetensors import safe_open

    from .modeling_oft import OFTPolicy, write_oft_checkpoint
    from .processing_oft import OFTTokenizer

    source = Path(source)
    if not source.is_dir():
        raise CheckpointError(f"OpenVLA-OFT checkpoint {source} is not a directory")
    meta = _read_json(source / CONFIG_JSON)
    specs = read_shard_specs(source)
    heads = {}
    files = {}
    for prefix, pattern in (("action_head", ACTION_HEAD_GLOB), ("proprio_projector", PROPRIO_GLOB)):
        path = find_head_file(source, pattern, step)
        files[prefix] = path
        heads[prefix] = {f"{prefix}.{k}": v for k, v in load_head_state(path).items()}
    head_specs = {k: (tuple(v.shape),) for part in heads.values() for k, v in part.items()}
    tok = read_tokenizer(source)
    empty = tok.token_to_id("\u2581")
    if empty is None:
        raise CheckpointError(f"{source / TOKENIZER_JSON} has no '\u2581' token (Llama-2: id 29871), which "
                              f"OFT appends to every prompt")
    config = infer_config(meta, specs, num_images=num_images, horizon=horizon, max_text_tokens=max_text_tokens,
                          head_specs=head_specs, where=str(source), empty_id=empty)
    try:
        tokenizer = OFTTokenizer(tok, config)
    except ValueError as exc:
        raise CheckpointError(f"{source / TOKENIZER_JSON} does not match {CONFIG_JSON}: {exc}") from None
    added = source / ADDED_TOKENS_JSON
    if added.is_file():
        pads = _read_json(added)
        if isinstance(pads, dict) and "<PAD>" in pads and pads["<PAD>"] != config.pad_id:
            raise CheckpointError(f"{added}: <PAD> is id {pads['<PAD>']}, {CONFIG_JSON} says pad_token_id "
                                  f"{config.pad_id}")
    key, stats = read_stats(source, unnorm_key, config.action_dim, config.proprio_dim)

    # Expected names and shapes from the architecture itself, built on the meta device (no memory).
    with torch.device("meta"), default_dtype(None):
        skeleton = OFTPolicy(config, tokenizer=tokenizer)
    model_specs = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    stat_names = set(stats)
    in_shards = {k: s for k, s in model_specs.items() if k not in stat_names
                 and not k.startswith(("action_head.", "proprio_projector."))}
    _check_specs(f"the shards of {source}", specs, {**in_shards, **dropped_published_specs(config, model_specs)},
                 TOLERATED_PREFIXES)
    for name in in_shards:
        shape, dtype, path = specs[name]
        if not dtype.startswith(("F", "BF")):
            raise CheckpointError(f"{path}: tensor {name} is stored as {dtype}, not a float type")
    for prefix, path in files.items():
        _check_specs(str(path), {k: (tuple(v.shape),) for k, v in heads[prefix].items()},
                     {k: s for k, s in model_specs.items() if k.startswith(prefix + ".")})

    state: dict[str, torch.Tensor] = {}
    by_shard: dict[Path, list[str]] = {}
    for name in in_shards:
        by_shard.setdefault(specs[name][2], []).append(name)
    for path, names in sorted(by_shard.items()):
        with safe_open(str(path), framework="pt") as f:
            for name in names:
                state[name] = f.get_tensor(name)
    for part in heads.values():
        state.update(part)
    for name, tensor in state.items():
        where = files.get(name.split(".")[0]) or specs[name][2]
        if not tensor.is_floating_point():
            raise CheckpointError(f"{where}: tensor {name} is {tensor.dtype}, not a float type")
        if not torch.isfinite(tensor).all():
            raise CheckpointError(f"{where}: tensor {name} holds NaN or inf")
    for name, value in stats.items():
        state[name] = torch.from_numpy(np.ascontiguousarray(value))
    state = {k: v.contiguous() for k, v in state.items()}
    provenance = {"imported_from": str(source.resolve()), "unnorm_key": key,
                  "action_head": files["action_head"].name, "proprio_projector": files["proprio_projector"].name,
                  "shards": sorted(p.name for p in by_shard), "num_images": num_images, "horizon": horizon}
    return write_oft_checkpoint(out, config, tokenizer, state, provenance)


# ---- `qvla import-oft` ----------------------------------------------------------------------------
def register(subparsers) -> None:
    p = subparsers.add_parser(
        "import-oft", help="import a published OpenVLA-OFT checkpoint",
        description="Read an OpenVLA-OFT checkpoint folder as moojink/openvla-oft publishes it (config.json, "
                    "sharded safetensors + index, dataset_statistics.json, tokenizer.json, "
                    "action_head--*_checkpoint.pt, proprio_projector--*_checkpoint.pt), check it and write the "
                    "project's checkpoint, which calibrate, allocate, quantize, eval and the node read.")
    p.add_argument("source", metavar="DIR", help="the published checkpoint folder")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--unnorm-key", default=None,
                   help="dataset_statistics.json entry to unnormalize with (needed when it holds several)")
    p.add_argument("--num-images", type=int, default=LIBERO_NUM_IMAGES,
                   help=f"images per observation, num_images_in_input (default: {LIBERO_NUM_IMAGES}, LIBERO)")
    p.add_argument("--chunk", type=int, default=LIBERO_CHUNK,
                   help=f"actions per chunk, NUM_ACTIONS_CHUNK (default: {LIBERO_CHUNK}, LIBERO)")
    p.add_argument("--max-text-tokens", type=int, default=48,
                   help="prompt tokens a batch is padded to; longer prompts are refused (default: 48)")
    p.add_argument("--step", type=int, default=None,
                   help="training step of the .pt heads, when the folder holds several")
    p.set_defaults(func=_run)


def _run(args) -> int:
    import sys

    try:
        out = import_oft(args.source, args.out, unnorm_key=args.unnorm_key, num_images=args.num_images,
                         horizon=args.chunk, max_text_tokens=args.max_text_tokens, step=args.step)
    except CheckpointError as exc:
        print(f"qvla import-oft: {exc}", file=sys.stderr)
        return 2
    meta = json.loads((out / "config.json").read_text())
    cfg = meta["config"]
    print(f"qvla import-oft: wrote {out} (Llama {cfg['num_layers']} x {cfg['hidden_size']}, "
          f"{cfg['n_cams']} images, chunk {cfg['horizon']} x {cfg['action_dim']}, "
          f"unnorm_key {meta['provenance']['unnorm_key']!r})")
    return 0
