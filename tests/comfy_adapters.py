"""ComfyUI's handling of adapter files, written again from its source (comfy/lora.py: model_lora_keys_unet,
load_lora, calculate_weight and weight_decompose) to check our files against it without ComfyUI."""

from __future__ import annotations

import torch


def comfy_key_map(model_keys: list[str]) -> dict[str, str]:
    """model_lora_keys_unet's generic part: lora_unet_<path with _> -> diffusion_model.<path>.weight."""
    key_map = {}
    for key in model_keys:
        key = "diffusion_model." + key
        if key.endswith(".weight"):
            path = key[len("diffusion_model.") : -len(".weight")]
            key_map["lora_unet_" + path.replace(".", "_")] = key
            key_map[path] = key
    return key_map


LORA_PARTS = ("lora_up.weight", "lora_down.weight")
LOHA_PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
LOKR_PARTS = ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b")


def comfy_load(lora: dict[str, torch.Tensor], key_map: dict[str, str]) -> tuple[dict, set[str]]:
    """load_lora: model key -> (kind, parts, alpha, dora_scale), and the file keys it left unloaded."""
    patches, loaded = {}, set()
    for prefix, target in key_map.items():
        alpha = lora.get(f"{prefix}.alpha")
        dora = lora.get(f"{prefix}.dora_scale")
        loaded |= {k for k in (f"{prefix}.alpha", f"{prefix}.dora_scale") if k in lora}
        alpha = None if alpha is None else alpha.item()
        for kind, names in (("lora", LORA_PARTS), ("loha", LOHA_PARTS), ("lokr", LOKR_PARTS)):
            parts = {n: lora[f"{prefix}.{n}"] for n in names if f"{prefix}.{n}" in lora}
            if (
                (kind == "lora" and "lora_up.weight" in parts)
                or (kind == "loha" and "hada_w1_a" in parts)
                or (kind == "lokr" and parts)
            ):
                patches[target] = (kind, parts, alpha, dora)
                loaded |= {f"{prefix}.{n}" for n in parts}
    return patches, set(lora) - loaded


def _weight_decompose(dora_scale, weight, diff, alpha, strength):
    calc = weight + alpha * diff
    norm = calc.transpose(0, 1).reshape(calc.shape[1], -1).norm(dim=1, keepdim=True).reshape(calc.shape[1], 1)
    calc = calc * (dora_scale.float() / norm.transpose(0, 1))
    return weight + strength * (calc - weight) if strength != 1.0 else calc


def comfy_weight(patch, weight: torch.Tensor, strength: float) -> torch.Tensor:
    """calculate_weight for one lora / loha / lokr patch, in fp32."""
    kind, p, alpha_value, dora = patch
    weight = weight.float().clone()
    if kind == "lora":
        up, down = p["lora_up.weight"].float(), p["lora_down.weight"].float()
        alpha = alpha_value / down.shape[0] if alpha_value is not None else 1.0
        diff = up @ down
    elif kind == "loha":
        alpha = alpha_value / p["hada_w1_b"].shape[0] if alpha_value is not None else 1.0
        diff = (p["hada_w1_a"].float() @ p["hada_w1_b"].float()) * (p["hada_w2_a"].float() @ p["hada_w2_b"].float())
    else:
        dim = None
        if "lokr_w1" in p:
            w1 = p["lokr_w1"].float()
        else:
            dim, w1 = p["lokr_w1_b"].shape[0], p["lokr_w1_a"].float() @ p["lokr_w1_b"].float()
        if "lokr_w2" in p:
            w2 = p["lokr_w2"].float()
        else:
            dim, w2 = p["lokr_w2_b"].shape[0], p["lokr_w2_a"].float() @ p["lokr_w2_b"].float()
        alpha = alpha_value / dim if alpha_value is not None and dim is not None else 1.0
        diff = torch.kron(w1, w2).reshape(weight.shape)
    if dora is not None:
        return _weight_decompose(dora, weight, diff, alpha, strength)
    return weight + strength * alpha * diff
