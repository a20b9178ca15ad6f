"""`qvla import-oft`: a random oft-micro-sized checkpoint written in exactly the published
OpenVLA-OFT layout (transformers shards + index under the published key names, the heads as
torch.save .pt files, one of them DDP-prefixed, dataset_statistics.json, a Llama-2-structured
tokenizer.json), imported and checked against the in-memory model and the independent reference
forward; then each bad input refused with an error naming the file and the key.

The tokenizer: the real Llama-2 vocabulary cannot be had offline (no hub; sentencepiece is not
installed), so the test builds a tokenizer.json with Llama-2's structure (BPE with byte fallback,
<unk>/<s>/</s> at 0/1/2, the 256 byte tokens next, the `▁`-prepending normalizer, a `<s> $A`
template, <PAD> added after the vocabulary) trained on the benchmark's instructions. No
tokenizer.model is written: the importer reads tokenizer.json only.
"""
import json
import pickle
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from qvla_ros.policy.configuration_oft import OFT_PROMPT, get_oft_config
from qvla_ros.policy.import_oft import dropped_published_specs, import_oft, infer_config
from qvla_ros.policy.modeling_oft import OFTPolicy, make_oft_policy
from qvla_ros.policy.modeling_vla import CheckpointError, load_policy, make_policy
from qvla_ros.policy.processing_oft import OFTTokenizer
from qvla_ros.policy.processing_vla import DEFAULT_INSTRUCTIONS

sys.path.insert(0, str(Path(__file__).resolve().parent / "helpers"))
import oft_reference  # noqa: E402
from test_policy_oft import inputs, scramble, sizes  # noqa: E402

UNNORM = "libero_spatial_no_noops"


def llama_structured_tokenizer() -> Tokenizer:
    texts = [OFT_PROMPT.format(t) for t in DEFAULT_INSTRUCTIONS] * 4
    norm = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    scratch = Tokenizer(models.BPE())
    scratch.normalizer = norm
    # Trained word by word (sentencepiece's pieces never span a word boundary); the tokenizer
    # itself has no pre-tokenizer, as Llama-2's tokenizer.json.
    scratch.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    scratch.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=120, show_progress=False))
    trained = json.loads(scratch.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = 3 + b
    for piece, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = norm
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.add_special_tokens(["<PAD>"])
    return tok


def published_extras(policy: OFTPolicy, g: torch.Generator) -> dict[str, torch.Tensor]:
    """What a published checkpoint holds beyond OFTPolicy's state: each tower's last block and
    final norm, SigLIP's MAP head (timm AttentionPoolLatent) and lm_head, random."""
    cfg = policy.config
    sd = policy.state_dict()
    extra = {}
    for tower, tc in (("featurizer", cfg.featurizer), ("fused_featurizer", cfg.fused_featurizer)):
        p = f"vision_backbone.{tower}"
        for key, v in sd.items():
            if key.startswith(f"{p}.blocks.0."):
                extra[key.replace(".blocks.0.", f".blocks.{tc.depth - 1}.")] = torch.randn(v.shape, generator=g)
        extra[f"{p}.norm.weight"] = torch.randn(tc.embed_dim, generator=g)
        extra[f"{p}.norm.bias"] = torch.randn(tc.embed_dim, generator=g)
    d, h = cfg.fused_featurizer.embed_dim, cfg.fused_featurizer.mlp_hidden
    pool = {"latent": (1, 1, d), "q.weight": (d, d), "q.bias": (d,), "kv.weight": (2 * d, d), "kv.bias": (2 * d,),
            "proj.weight": (d, d), "proj.bias": (d,), "norm.weight": (d,), "norm.bias": (d,),
            "mlp.fc1.weight": (h, d), "mlp.fc1.bias": (h,), "mlp.fc2.weight": (d, h), "mlp.fc2.bias": (d,)}
    for key, shape in pool.items():
        extra[f"vision_backbone.fused_featurizer.attn_pool.{key}"] = torch.randn(shape, generator=g)
    extra["language_model.lm_head.weight"] = torch.randn(cfg.vocab_size, cfg.hidden_size, generator=g)
    return extra


def stats_json(cfg):
    rng = np.random.default_rng(0)

    def part(dim):
        q01 = -1 - rng.random(dim)
        q99 = 1 + rng.random(dim)
        return {"mean": [0.0] * dim, "std": [1.0] * dim, "max": (q99 + 0.1).tolist(), "min": (q01 - 0.1).tolist(),
                "q01": q01.tolist(), "q99": q99.tolist(), "mask": [True] * (dim - 1) + [False]}

    def entry():
        return {"action": part(cfg.action_dim), "proprio": part(cfg.proprio_dim), "num_transitions": 100,
                "num_trajectories": 10}

    return {UNNORM: entry(), "libero_goal_no_noops": entry()}


def write_published(folder: Path, policy: OFTPolicy, tok: Tokenizer) -> None:
    """The folder a fine-tuned OpenVLA-OFT run leaves (moojink/openvla-oft), at policy's size."""
    cfg = policy.config
    g = torch.Generator().manual_seed(1)
    folder.mkdir(parents=True)
    sd = {k: v.clone() for k, v in policy.state_dict().items()}
    body = {k: v for k, v in sd.items() if k.startswith(("vision_backbone.", "projector.", "language_model."))}
    body.update(published_extras(policy, g))
    keys = sorted(body)
    thirds = [keys[: len(keys) // 3], keys[len(keys) // 3: 2 * len(keys) // 3], keys[2 * len(keys) // 3:]]
    weight_map = {}
    for i, part in enumerate(thirds):
        name = f"model-{i + 1:05d}-of-00003.safetensors"
        save_file({k: body[k].contiguous() for k in part}, folder / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    total = sum(v.numel() * v.element_size() for v in body.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    # The action head trained under DDP (keys "module.model.*"); the proprio projector without.
    torch.save({f"module.{k[len('action_head.'):]}": v for k, v in sd.items() if k.startswith("action_head.")},
               folder / "action_head--150000_checkpoint.pt")
    torch.save({k[len("proprio_projector."):]: v for k, v in sd.items() if k.startswith("proprio_projector.")},
               folder / "proprio_projector--150000_checkpoint.pt")
    stats = stats_json(cfg)
    (folder / "dataset_statistics.json").write_text(json.dumps(stats, indent=2))
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["OpenVLAForActionPrediction"],
        "auto_map": {"AutoConfig": "configuration_prismatic.OpenVLAConfig",
                     "AutoModelForVision2Seq": "modeling_prismatic.OpenVLAForActionPrediction"},
        "model_type": "openvla", "arch_specifier": "no-align+fused-gelu-mlp", "hf_llm_id": "meta-llama/Llama-2-7b-hf",
        "image_resize_strategy": "resize-naive", "image_sizes": [cfg.image_size, cfg.image_size],
        "llm_backbone_id": "llama2-7b-pure", "llm_max_length": 2048, "n_action_bins": 256,
        "norm_stats": stats, "output_projector_states": False, "pad_to_multiple_of": 64,
        "pad_token_id": cfg.pad_id,
        # transformers writes only the fields that differ from LlamaConfig's defaults.
        "text_config": {"model_type": "llama", "pad_token_id": cfg.pad_id, "torch_dtype": "bfloat16",
                        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
                        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
                        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads},
        "timm_model_ids": ["vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224"],
        "timm_override_act_layers": [None, None], "torch_dtype": "bfloat16", "transformers_version": "4.40.1",
        "use_fused_vision_backbone": True, "vision_backbone_id": "dinosiglip-vit-so-224px"}, indent=2))
    (folder / "tokenizer.json").write_text(tok.to_str())
    (folder / "added_tokens.json").write_text(json.dumps({"<PAD>": cfg.pad_id}))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<PAD>", "unk_token": "<unk>"}))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"add_bos_token": True, "add_eos_token": False, "model_max_length": 2048, "pad_token": "<PAD>",
         "padding_side": "right", "tokenizer_class": "LlamaTokenizer", "legacy": False}))


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """(folder, the in-memory policy it was written from)."""
    tok = llama_structured_tokenizer()
    size = tok.get_vocab_size(with_added_tokens=True)
    rows = -(-size // 64) * 64   # the published embedding is padded to a multiple of 64
    config = get_oft_config("oft-micro").replace(vocab_size=rows, empty_id=tok.token_to_id("\u2581"),
                                                 pad_id=tok.token_to_id("<PAD>"), name="published-micro")
    policy = scramble(make_oft_policy(config, tokenizer=OFTTokenizer(tok, config)), seed=3)
    folder = tmp_path_factory.mktemp("oft") / "openvla-7b-oft-finetuned-libero-spatial"
    write_published(folder, policy, tok)
    return folder, policy


def test_import_matches_the_model_it_was_written_from(published, tmp_path):
    folder, policy = published
    out = import_oft(folder, tmp_path / "imported", unnorm_key="libero_spatial",   # the _no_noops fallback
                     max_text_tokens=policy.config.max_text_tokens)
    loaded = load_policy(out)
    assert isinstance(loaded, OFTPolicy)
    # Every size read back from the published files (the padding length is the run's choice).
    assert loaded.config == policy.config
    stats = json.loads((folder / "dataset_statistics.json").read_text())[UNNORM]
    policy.set_norm_stats({f"{part}_{s}": np.asarray(stats[part][s], dtype=np.float32 if s != "mask" else bool)
                           for part in ("action", "proprio") for s in ("q01", "q99", "mask")})
    x = inputs(policy.config, batch=2)
    with torch.no_grad():
        want = policy(*x)
        got = loaded(*x)
    assert torch.equal(got, want)
    meta = json.loads((out / "config.json").read_text())
    assert meta["provenance"]["unnorm_key"] == UNNORM
    assert meta["provenance"]["action_head"] == "action_head--150000_checkpoint.pt"
    # Nothing the L1 forward does not read was carried over.
    stored = load_file(out / "model.safetensors")
    assert "language_model.lm_head.weight" not in stored
    assert not any(".attn_pool." in k or k.endswith(".norm.weight") and "featurizer" in k for k in stored)


def test_imported_forward_matches_the_reference(published, tmp_path):
    """Against the independent forward (helpers/oft_reference.py), with the tokenizer read from the
    published tokenizer.json directly and the statistics from dataset_statistics.json."""
    folder, _ = published
    loaded = load_policy(import_oft(folder, tmp_path / "imported", unnorm_key=UNNORM))
    tok = Tokenizer.from_str((folder / "tokenizer.json").read_text())
    stats = json.loads((folder / "dataset_statistics.json").read_text())[UNNORM]
    act = {k: torch.tensor(stats["action"][k], dtype=torch.bool if k == "mask" else torch.float32)
           for k in ("q01", "q99", "mask")}
    pq01, pq99 = (torch.tensor(stats["proprio"][k], dtype=torch.float32) for k in ("q01", "q99"))
    pmask = torch.tensor(stats["proprio"]["mask"])
    images, instr, proprio = inputs(loaded.config, batch=2, seed=5)
    with torch.no_grad():
        got = loaded(images, instr, proprio)
    sd = {k: v.float() for k, v in load_file(out_file(tmp_path)).items()}
    for row in range(2):
        ids = tok.encode(OFT_PROMPT.format(instr[row].lower())).ids          # <s> from the template
        p = proprio[row]
        pn = torch.where(pmask, 2 * (p - pq01) / (pq99 - pq01 + 1e-8) - 1, p).clamp(-1, 1)
        with torch.no_grad():
            want, _ = oft_reference.reference_forward(sd, sizes(loaded.config), ids, images[row], pn, act)
        torch.testing.assert_close(got[row], want, rtol=1e-4, atol=1e-4)


def out_file(tmp_path):
    return tmp_path / "imported" / "model.safetensors"


def test_bf16_shards_stay_bf16(copy, tmp_path):
    """The published weights are bf16: imported as stored, loaded in bf16 or float32 alike."""
    index = json.loads((copy / "model.safetensors.index.json").read_text())
    for shard in set(index["weight_map"].values()):
        save_file({k: v.to(torch.bfloat16) for k, v in load_file(copy / shard).items()}, copy / shard)
    out = import_oft(copy, tmp_path / "imported", unnorm_key=UNNORM)
    stored = load_file(out / "model.safetensors")
    assert stored["language_model.model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    assert stored["action_q01"].dtype == torch.float32 and stored["action_mask"].dtype == torch.bool
    x = inputs(get_oft_config("oft-micro"), batch=1)
    with torch.no_grad():
        full = load_policy(out)(*x)
        half = load_policy(out, dtype=torch.bfloat16)(*x)
    assert torch.isfinite(half).all() and half.dtype == torch.float32
    torch.testing.assert_close(half, full, rtol=0.1, atol=0.3)


def test_the_cli_verb(published, tmp_path, capsys):
    from qvla_ros.cli import main

    folder, _ = published
    assert main(["import-oft", str(folder), "--out", str(tmp_path / "a"), "--unnorm-key", UNNORM]) == 0
    assert "wrote" in capsys.readouterr().out and (tmp_path / "a" / "model.safetensors").is_file()
    assert main(["import-oft", str(folder), "--out", str(tmp_path / "b")]) == 2
    assert "name one with unnorm_key" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_imported_checkpoint_goes_through_calibrate_allocate_quantize(published, tmp_path, capsys):
    """The verbs take the imported checkpoint unchanged (synthetic frames: a smoke of the chain)."""
    from qvla_ros.cli import main
    from qvla_ros.quant.api import load_quantized_policy, mixed_bit_layers

    folder, _ = published
    ckpt, table, plan, q = (str(tmp_path / n) for n in ("imported", "s.safetensors", "plan.json", "q"))
    assert main(["import-oft", str(folder), "--out", ckpt, "--unnorm-key", UNNORM]) == 0
    assert main(["calibrate", "--policy", ckpt, "--synthetic", "--frames", "2", "--out", table]) == 0
    assert main(["allocate", "--sensitivity", table, "--budget", "4", "--budget-scope", "planned",
                 "--policy", ckpt, "--out", plan]) == 0
    assert main(["quantize", "--policy", ckpt, "--plan", plan, "--out", q]) == 0
    capsys.readouterr()
    policy = load_quantized_policy(q)
    assert any(n.startswith("language_model.model.layers.") for n in mixed_bit_layers(policy))
    with torch.no_grad():
        actions = policy(*inputs(policy.config, batch=1))
    assert actions.shape == (1, 8, 7) and torch.isfinite(actions).all()


def test_7b_sizes_are_inferred_from_the_published_shapes():
    """The shapes of the published 7B checkpoint (oft-7b on the meta device, plus the
    tensors the forward drops) and a config.json holding only what transformers writes."""
    preset = get_oft_config("oft-7b")
    skeleton = make_policy("oft-7b", device="meta")
    model = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    specs = {k: (s, "BF16") for k, s in {**model, **dropped_published_specs(preset, model)}.items()
             if not k.startswith(("action_head.", "proprio_projector."))}
    heads = {k: (s,) for k, s in model.items() if k.startswith(("action_head.", "proprio_projector."))}
    meta = {"vision_backbone_id": "dinosiglip-vit-so-224px", "image_sizes": [224, 224], "pad_token_id": 32000,
            "text_config": {"model_type": "llama", "pad_token_id": 32000, "vocab_size": 32064}}
    assert infer_config(meta, specs, head_specs=heads) == preset


# ---- refusals ---------------------------------------------------------------------------------------
@pytest.fixture
def copy(published, tmp_path):
    folder, _ = published
    dst = tmp_path / "ckpt"
    shutil.copytree(folder, dst)
    return dst


def shard_of(folder: Path, key: str) -> Path:
    return folder / json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][key]


def rewrite(folder: Path, key: str, value: torch.Tensor | None, new_key: str | None = None) -> None:
    """Change one tensor of its shard (None: remove it; new_key: add a tensor), index kept in step."""
    path = shard_of(folder, key)
    tensors = load_file(path)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    if new_key is not None:
        tensors[new_key] = value
        index["weight_map"][new_key] = path.name
    elif value is None:
        del tensors[key]
        del index["weight_map"][key]
    else:
        tensors[key] = value
    save_file(tensors, path)
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def refused(folder, tmp_path, *patterns, **kw):
    with pytest.raises(CheckpointError) as info:
        import_oft(folder, tmp_path / "out", **{"unnorm_key": UNNORM, **kw})
    for p in patterns:
        assert p in str(info.value), str(info.value)
    assert not (tmp_path / "out").exists()
    return str(info.value)


def test_missing_shard(copy, tmp_path):
    (copy / "model-00002-of-00003.safetensors").unlink()
    refused(copy, tmp_path, "model-00002-of-00003.safetensors", "is missing", "e.g. ")


def test_shard_disagreeing_with_the_index(copy, tmp_path):
    path = shard_of(copy, "projector.fc1.weight")
    tensors = load_file(path)
    del tensors["projector.fc1.weight"]
    save_file(tensors, path)
    refused(copy, tmp_path, path.name, "projector.fc1.weight")


def test_missing_and_unexpected_keys_are_named(copy, tmp_path):
    rewrite(copy, "language_model.lm_head.weight", None)
    rewrite(copy, "projector.fc1.weight", torch.zeros(3), new_key="vision_backbone.featurizer.mask_token")
    refused(copy, tmp_path, "missing ['language_model.lm_head.weight']",
            "unexpected ['vision_backbone.featurizer.mask_token']")


def test_wrong_shape(copy, tmp_path):
    key = "language_model.model.layers.1.self_attn.o_proj.weight"
    rewrite(copy, key, torch.zeros(64, 32))
    refused(copy, tmp_path, key, "(64, 32)", "(64, 64)")


def test_integer_tensor(copy, tmp_path):
    key = "projector.fc3.bias"
    rewrite(copy, key, torch.zeros(64, dtype=torch.int32))
    refused(copy, tmp_path, key, "not a float type")


class Payload:
    """A pickled object: what weights_only must refuse (and never construct)."""

    def __reduce__(self):
        return (print, ("unpickled!",))


def test_pt_holding_a_pickled_object(copy, tmp_path, capsys):
    path = copy / "action_head--150000_checkpoint.pt"
    state = torch.load(path, weights_only=True)
    state["module.extra"] = Payload()
    torch.save(state, path)
    refused(copy, tmp_path, str(path), "weights_only=True")
    assert "unpickled!" not in capsys.readouterr().out


def test_pt_that_is_a_bare_pickle_or_not_a_dict(copy, tmp_path):
    path = copy / "proprio_projector--150000_checkpoint.pt"
    path.write_bytes(pickle.dumps({"fc1.weight": [1, 2]}))
    refused(copy, tmp_path, str(path), "not a torch.save zip archive")
    torch.save([torch.zeros(2)], path)
    refused(copy, tmp_path, str(path), "holds a list")


def test_pt_with_wrong_keys_and_shapes(copy, tmp_path):
    path = copy / "action_head--150000_checkpoint.pt"
    state = torch.load(path, weights_only=True)
    state["module.model.layer_norm2.weight"] = torch.zeros(5)
    torch.save(state, path)
    refused(copy, tmp_path, str(path), "action_head.model.layer_norm2.weight", "(5,)")
    del state["module.model.layer_norm2.weight"]
    torch.save(state, path)
    refused(copy, tmp_path, str(path), "missing ['action_head.model.layer_norm2.weight']")


def test_several_heads_need_a_step(copy, tmp_path):
    shutil.copy(copy / "action_head--150000_checkpoint.pt", copy / "action_head--50000_checkpoint.pt")
    refused(copy, tmp_path, "several", "action_head--50000_checkpoint.pt")
    shutil.copy(copy / "proprio_projector--150000_checkpoint.pt", copy / "proprio_projector--50000_checkpoint.pt")
    import_oft(copy, tmp_path / "ok", unnorm_key=UNNORM, step=50000)


def test_missing_head_file(copy, tmp_path):
    (copy / "proprio_projector--150000_checkpoint.pt").unlink()
    refused(copy, tmp_path, "proprio_projector--STEP_checkpoint.pt")


def test_tokenizer_larger_than_the_vocabulary(copy, tmp_path):
    tok = Tokenizer.from_str((copy / "tokenizer.json").read_text())
    rows = json.loads((copy / "config.json").read_text())["text_config"]["vocab_size"]
    tok.add_tokens([f"extra{i}" for i in range(rows)])
    (copy / "tokenizer.json").write_text(tok.to_str())
    refused(copy, tmp_path, "tokenizer.json", "rows")


def test_tokenizer_ids_disagreeing_with_config(copy, tmp_path):
    meta = json.loads((copy / "config.json").read_text())
    meta["text_config"]["eos_token_id"] = 7
    (copy / "config.json").write_text(json.dumps(meta))
    refused(copy, tmp_path, "tokenizer.json", "'</s>'", "stop_id")


def test_pad_id_disagreeing_with_added_tokens(copy, tmp_path):
    (copy / "added_tokens.json").write_text(json.dumps({"<PAD>": 5}))
    refused(copy, tmp_path, "added_tokens.json", "<PAD>")


def test_tokenizer_model_only(copy, tmp_path):
    (copy / "tokenizer.json").unlink()
    (copy / "tokenizer.model").write_bytes(b"\x00")
    refused(copy, tmp_path, "no tokenizer.json", "tokenizer.model")


def test_statistics(copy, tmp_path):
    refused(copy, tmp_path, "name one with unnorm_key", unnorm_key=None)
    refused(copy, tmp_path, "no statistics for 'bridge'", unnorm_key="bridge")
    stats = json.loads((copy / "dataset_statistics.json").read_text())
    stats[UNNORM]["proprio"]["q99"] = stats[UNNORM]["proprio"]["q99"][:5]
    (copy / "dataset_statistics.json").write_text(json.dumps(stats))
    refused(copy, tmp_path, f"{UNNORM}.proprio.q99", "5 values")


def test_other_backbone_is_refused(copy, tmp_path):
    meta = json.loads((copy / "config.json").read_text())
    meta["vision_backbone_id"] = "siglip-vit-so400m"
    meta["timm_model_ids"] = ["vit_so400m_patch14_siglip_224"]
    (copy / "config.json").write_text(json.dumps(meta))
    refused(copy, tmp_path, "config.json", "siglip-vit-so400m")
