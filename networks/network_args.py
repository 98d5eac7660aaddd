"""The ``--network_args`` options of each adapter, read without importing torch (training checks them
before anything heavy loads)."""

from __future__ import annotations

import ast

COMMON_ARGS = {
    "include_patterns": list,
    "exclude_patterns": list,
    "rank_dropout": float,
    "module_dropout": float,
    "dora_wd": bool,
    "verbose": bool,
}
# --network_module -> (the adapter's kind, the options it takes beyond the common ones)
ADAPTERS = {
    "networks.lora_kandinsky": ("LoRA", {"loraplus_lr_ratio": float}),
    "networks.loha_kandinsky": ("LoHa", {}),
    "networks.lokr_kandinsky": ("LoKr", {"factor": int}),
}
MODULE_OF_KIND = {kind: module for module, (kind, _) in ADAPTERS.items()}


def parse_network_args(values: list[str] | None, extra: dict[str, type] | None = None, kind: str = "LoRA") -> dict:
    """``key=value`` strings (values are Python literals) into typed options; unknown keys are errors."""
    known = {**COMMON_ARGS, **(extra or {})}
    parsed = {}
    for text in values or []:
        key, sep, value = text.partition("=")
        key = key.strip()
        if not sep or key not in known:
            raise ValueError(
                f"--network_args {text!r}: expected key=value with key one of {', '.join(known)} (for {kind})"
            )
        try:
            parsed[key] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            parsed[key] = value.strip()
        wanted = known[key]
        if wanted is float and isinstance(parsed[key], int | float) and not isinstance(parsed[key], bool):
            parsed[key] = float(parsed[key])
        if not isinstance(parsed[key], wanted) or (wanted is int and isinstance(parsed[key], bool)):
            raise ValueError(f"--network_args {key}: expected a {wanted.__name__}, got {value!r}")
    return parsed


def check_network_args(module: str, network_args: list[str] | None) -> None:
    """--network_args checked against the adapter's options and ranges."""
    kind, extra = ADAPTERS[module]
    options = parse_network_args(network_args, extra, kind)
    if options.get("factor", -1) == 0 or options.get("factor", -1) < -1:
        raise ValueError(
            f"--network_args factor={options['factor']}: expected a positive integer (or -1, the most square split)"
        )
    if options.get("loraplus_lr_ratio") is not None and options["loraplus_lr_ratio"] <= 0:
        raise ValueError(f"--network_args loraplus_lr_ratio={options['loraplus_lr_ratio']}: expected a positive number")
