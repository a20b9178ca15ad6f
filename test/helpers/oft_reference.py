"""An independent OpenVLA-OFT forward for tests, written from the published description
(moojink/openvla-oft: prismatic's PrismaticForConditionalGeneration.predict_action, timm's
VisionTransformer, Llama-2, the L1 MLP-ResNet head) as plain functions over a flat state dict
under the published key names. It imports nothing from qvla_ros: a test compares the package's
OFTPolicy against it, so a shared mistake cannot hide.

One sample at a time, unpadded, exactly as the reference runs it (batch 1):

    input_ids = BOS + prompt tokens (+ the empty token 29871 when missing)
              + 56 placeholder ids + STOP
    embeddings of the 56 placeholders zeroed
    sequence  = [BOS, patches of image 1, patches of image 2, proprio token, prompt[1:], placeholders, STOP]
    decoder   : no attention mask at all (fully bidirectional), positions 0..L-1
    read-out  : hidden[NUM_PATCHES + NUM_PROMPT_TOKENS : + 56] with NUM_PATCHES = patches + 1 (proprio),
                NUM_PROMPT_TOKENS = len(input_ids before placeholders) - 1
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))   # timm DINOv2 data config
SIGLIP = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))                  # timm SigLIP data config
TIMM_HEADS = 16          # both published towers (ViT-L/14 and so400m/14) have 16 heads
PROMPT = "In: What action should the robot take to {}?\nOut:"


def _linear(sd, name, x):
    return F.linear(x, sd[f"{name}.weight"], sd.get(f"{name}.bias"))


def _layer_norm(sd, name, x, eps):
    return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], eps)


def vit_features(sd, prefix, pixels, *, class_token, reg_tokens, depth, no_embed_class):
    """timm VisionTransformer.get_intermediate_layers(n={depth - 2}) with prefix tokens dropped:
    the output of block depth-2 (0-based), no final norm. pixels [1, 3, S, S]."""
    w = sd[f"{prefix}.patch_embed.proj.weight"]
    x = F.conv2d(pixels, w, sd[f"{prefix}.patch_embed.proj.bias"], stride=w.shape[-1])
    x = x.flatten(2).transpose(1, 2)
    pre = []
    if class_token:
        pre.append(sd[f"{prefix}.cls_token"])
    if reg_tokens:
        pre.append(sd[f"{prefix}.reg_token"])
    if no_embed_class:
        x = torch.cat(pre + [x + sd[f"{prefix}.pos_embed"]], dim=1)
    else:
        x = torch.cat(pre + [x], dim=1) + sd[f"{prefix}.pos_embed"]
    n, d = x.shape[1], x.shape[2]
    hd = d // TIMM_HEADS
    for i in range(depth - 1):
        b = f"{prefix}.blocks.{i}"
        h = _layer_norm(sd, f"{b}.norm1", x, 1e-6)
        q, k, v = _linear(sd, f"{b}.attn.qkv", h).reshape(n, 3, TIMM_HEADS, hd).permute(1, 2, 0, 3)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1) @ v        # [H, n, hd]
        h = _linear(sd, f"{b}.attn.proj", att.transpose(0, 1).reshape(1, n, d))
        x = x + h * sd.get(f"{b}.ls1.scale_factor", torch.tensor(1.0))
        h = _linear(sd, f"{b}.mlp.fc2", F.gelu(_linear(sd, f"{b}.mlp.fc1", _layer_norm(sd, f"{b}.norm2", x, 1e-6))))
        x = x + h * sd.get(f"{b}.ls2.scale_factor", torch.tensor(1.0))
    return x[:, int(class_token) + reg_tokens:]


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rotate(x, pos, theta):
    """Llama rotary embedding (halves rotated), x [H, L, hd]."""
    hd = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    ang = pos[:, None].float() * inv[None, :]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def llama_bidirectional(sd, x, *, num_layers, num_heads, num_kv_heads, eps, theta):
    """Llama-2 decoder over embeddings x [1, L, D] with no mask (every token sees every token);
    returns the final-norm hidden states."""
    p = "language_model.model"
    L, D = x.shape[1], x.shape[2]
    hd = D // num_heads
    pos = torch.arange(L)
    for i in range(num_layers):
        b = f"{p}.layers.{i}"
        h = _rms(x, sd[f"{b}.input_layernorm.weight"], eps)[0]
        q = _linear(sd, f"{b}.self_attn.q_proj", h).reshape(L, num_heads, hd).transpose(0, 1)
        k = _linear(sd, f"{b}.self_attn.k_proj", h).reshape(L, num_kv_heads, hd).transpose(0, 1)
        v = _linear(sd, f"{b}.self_attn.v_proj", h).reshape(L, num_kv_heads, hd).transpose(0, 1)
        q, k = _rotate(q, pos, theta), _rotate(k, pos, theta)
        rep = num_heads // num_kv_heads
        k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1) @ v
        x = x + _linear(sd, f"{b}.self_attn.o_proj", att.transpose(0, 1).reshape(1, L, D))
        h = _rms(x, sd[f"{b}.post_attention_layernorm.weight"], eps)
        x = x + _linear(sd, f"{b}.mlp.down_proj", F.silu(_linear(sd, f"{b}.mlp.gate_proj", h))
                        * _linear(sd, f"{b}.mlp.up_proj", h))
    return _rms(x, sd[f"{p}.norm.weight"], eps)


def mlp_resnet(sd, prefix, x, num_blocks):
    x = F.relu(_linear(sd, f"{prefix}.fc1", _layer_norm(sd, f"{prefix}.layer_norm1", x, 1e-5)))
    for i in range(num_blocks):
        b = f"{prefix}.mlp_resnet_blocks.{i}.ffn"
        x = x + F.relu(_linear(sd, f"{b}.1", _layer_norm(sd, f"{b}.0", x, 1e-5)))
    return _linear(sd, f"{prefix}.fc2", _layer_norm(sd, f"{prefix}.layer_norm2", x, 1e-5))


def pixels_6ch(image_uint8_hwc):
    """One S x S RGB uint8 image -> [1, 6, S, S]: DINOv2-normalized, then SigLIP-normalized."""
    x = image_uint8_hwc.permute(2, 0, 1).float()[None] / 255.0
    out = []
    for mean, std in (IMAGENET, SIGLIP):
        out.append((x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))
    return torch.cat(out, dim=1)


def reference_forward(sd, sizes, prompt_ids, images, proprio, stats=None):
    """Actions [horizon, action_dim] of one sample, and the read-out hidden states.

    sd: flat float32 state dict under published names (vision_backbone.*, projector.*,
    language_model.model.*, proprio_projector.*, action_head.*); sizes: the numbers the published
    config gives (see below); prompt_ids: BOS + tokenized prompt (python ints); images uint8
    [n_cams, S, S, 3]; proprio float [proprio_dim] already normalized; stats: dict with
    'q01', 'q99', 'mask' for the actions (BOUNDS_Q99), or None for normalized actions.
    """
    ids = list(prompt_ids)
    if ids[-1] != sizes["empty_id"]:
        ids.append(sizes["empty_id"])
    n_prompt = len(ids) - 1
    n_act = sizes["horizon"] * sizes["action_dim"]
    ids = ids + [1] * n_act + [sizes["stop_id"]]
    emb = sd["language_model.model.embed_tokens.weight"][torch.tensor(ids)][None]
    action_mask = torch.zeros(len(ids), dtype=torch.bool)
    action_mask[n_prompt + 1: n_prompt + 1 + n_act] = True
    emb = emb * ~action_mask[None, :, None]
    feats = []
    for img in images:
        px = pixels_6ch(img)
        a = vit_features(sd, "vision_backbone.featurizer", px[:, :3], class_token=True, reg_tokens=4,
                         depth=sizes["featurizer_depth"], no_embed_class=True)
        b = vit_features(sd, "vision_backbone.fused_featurizer", px[:, 3:], class_token=False, reg_tokens=0,
                         depth=sizes["fused_depth"], no_embed_class=False)
        feats.append(torch.cat([a, b], dim=2))
    patches = torch.cat(feats, dim=1)
    h = _linear(sd, "projector.fc1", patches)
    h = _linear(sd, "projector.fc3", F.gelu(_linear(sd, "projector.fc2", F.gelu(h))))
    prop = _linear(sd, "proprio_projector.fc2", F.gelu(_linear(sd, "proprio_projector.fc1", proprio[None])))
    h = torch.cat([h, prop[:, None]], dim=1)
    seq = torch.cat([emb[:, :1], h, emb[:, 1:]], dim=1)
    hidden = llama_bidirectional(sd, seq, num_layers=sizes["num_layers"], num_heads=sizes["num_heads"],
                                 num_kv_heads=sizes["num_kv_heads"], eps=sizes["rms_norm_eps"],
                                 theta=sizes["rope_theta"])
    num_patches = h.shape[1]
    start = num_patches + n_prompt
    read = hidden[:, start: start + n_act]
    actions = mlp_resnet(sd, "action_head.model", read.reshape(1, sizes["horizon"], -1), sizes["head_blocks"])[0]
    if stats is not None:
        lo, hi, m = stats["q01"], stats["q99"], stats["mask"]
        actions = torch.where(m, 0.5 * (actions + 1) * (hi - lo + 1e-8) + lo, actions)
    return actions, read[0]
