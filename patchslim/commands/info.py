"""``info``: the models and methods available here, with their status."""

from __future__ import annotations

import json

NAME = "info"
HELP = "List the models and slimming methods, with whether weights are available here."


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def main(args) -> int:
    import torch

    from patchslim.device import available_devices
    from patchslim.methods import get_method, method_names
    from patchslim.models import model_names, weights_status

    models = [dict(name=name, status=weights_status(name)) for name in model_names()]
    methods = [get_method(name).info() for name in method_names()]
    devices = available_devices()
    if args.json:
        support = [dict(method=name, vit=vit, swin=swin) for name, vit, swin in support_table(methods)]
        print(json.dumps(dict(models=models, methods=methods, support=support, devices=devices,
                              torch=torch.__version__)))
        return 0
    print("Models:")
    for m in models:
        print(f"  {m['name']:<36} {m['status']}")
    print("Methods:")
    for m in methods:
        flags = [flag for flag in ("learned", "merges", "needs_attention", "adaptive_count") if m[flag]]
        print(f"  {m['name']:<12} {m['summary']}" + (f"  [{', '.join(flags)}]" if flags else ""))
        for option in m["options"]:
            print(f"  {'':<12}   --opt {option['name']}=...  {option['help']} ({option['allowed']})")
    print("Methods x architectures (vit: timm VisionTransformer; swin: timm SwinTransformer, window by window):")
    for name, vit, swin in support_table(methods):
        print(f"  {name:<12} vit: {vit:<4} swin: {swin}")
    print(f"Devices: {', '.join(devices)}")
    return 0


def support_table(methods: list[dict]) -> list[tuple[str, str, str]]:
    """(method, vit, swin) rows: "yes" (saying how for a merging method), or "no (reason)" where a method does
    not apply."""
    def swin(m: dict) -> str:
        if not m["windowed"]:
            return f"no ({m['window_reason']})"
        return "yes (merges in every window, unmerged after each block)" if m["merges"] else "yes"

    return [(m["name"], "yes", swin(m)) for m in methods]
