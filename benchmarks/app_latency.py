"""Server time of the app's Explore page: a rho-slider change, and the first result for a new image.

Targets (DeiT-S on a 2-core CPU): a slider change <= 150 ms, the first result for a newly uploaded image
<= 1.5 s. Both are measured as the wall time of a full script rerun in ``streamlit.testing.v1.AppTest``
(sidebar, engine calls, drawing, and serializing every element, as the server does for a browser), with
the model already loaded (it is loaded once per process). DeiT-S runs with random weights (no pretrained
weights on this machine): the cost of a forward does not depend on the weights' values.

A breakdown of the same work outside Streamlit (decode, unslimmed forward, slimmed forward, overlay,
attention maps) is printed too, to see where the time goes.

Usage::

    python benchmarks/app_latency.py                       # DeiT-S, random weights, method random
    python benchmarks/app_latency.py --method tome --repeats 8
    python benchmarks/app_latency.py --model fashion-vit

Writes ``benchmarks/results/app_latency.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "app_latency.json"


def photos(count: int) -> list[tuple[str, bytes]]:
    """``count`` distinct PNG uploads made from scikit-image's sample photos (flipped / rotated copies)."""
    from skimage import data

    base = [Image.fromarray(getattr(data, name)()).convert("RGB") for name in
            ("chelsea", "coffee", "rocket", "astronaut", "camera")]
    out = []
    for i in range(count):
        image = base[i % len(base)].rotate(90 * (i // len(base)), expand=True)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        out.append((f"photo_{i}.png", buffer.getvalue()))
    return out


def app_timings(model: str, weights: str, method: str, repeats: int) -> dict:
    """Full reruns of the Explore page in AppTest: new uploads, then fresh rho values on one image."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(REPO / "app" / "main.py"), default_timeout=600).run()
    at.selectbox(key="model_name").set_value(model).run()
    if weights and model != "fashion-vit":
        at.radio(key="weights_mode").set_value(weights).run()
    at.selectbox(key="method").set_value(method).run()
    at.radio(key="image_source").set_value("Upload").run()
    assert not at.exception, [e.value for e in at.exception]
    loaded = at.session_state["settings"].choice.model
    uploads = photos(repeats + 1)
    new_image = []
    for i, (name, data) in enumerate(uploads):
        at.file_uploader(key="uploader").set_value((name, data, "image/png"))
        start = time.perf_counter()
        at.run()
        elapsed = time.perf_counter() - start
        assert not at.exception, [e.value for e in at.exception]
        if i > 0:  # the first upload also warms up code paths (vis, plotly); not counted
            new_image.append(elapsed)
    slider = []
    ratios = [0.45, 0.4, 0.35, 0.3, 0.25, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.2, 0.15, 0.85, 0.9]
    for rho in ratios[: repeats + 1]:
        at.slider(key="keep_ratio").set_value(rho)
        start = time.perf_counter()
        at.run()
        slider.append(time.perf_counter() - start)
        assert not at.exception, [e.value for e in at.exception]
    slider = slider[1:]
    return dict(model=loaded.name, weights=loaded.weights_source, device=str(loaded.device),
                new_image_s=new_image, slider_change_s=slider)


def breakdown(model_name: str, method: str, repeats: int) -> dict:
    """The same work as the page, step by step, outside Streamlit (median seconds)."""
    import patchslim
    from patchslim import vis
    from patchslim.explain import attention
    from patchslim.images import open_image

    from app import compute

    model = patchslim.load_model(model_name, device="auto", pretrained=model_name == "fashion-vit")
    _, data = photos(1)[0]
    steps: dict[str, list[float]] = {k: [] for k in
                                     ("decode", "model input", "unslimmed forward", "slimmed forward", "readouts",
                                      "overlay", "attention maps")}

    def clock(name, fn):
        start = time.perf_counter()
        out = fn()
        steps[name].append(time.perf_counter() - start)
        return out

    for i in range(repeats + 1):
        image = clock("decode", lambda: open_image(data))
        pixels = clock("model input", lambda: model.preprocess(image))  # cached per image by the app
        base = clock("unslimmed forward", lambda: compute.baseline(model, pixels))
        slim = clock("slimmed forward", lambda: compute.slimmed(model, pixels, method, 0.5 - 0.02 * i))
        clock("readouts", lambda: compute.readouts(base, slim))
        clock("overlay", lambda: vis.patch_overlay(pixels, model, slim.trace))
        clock("attention maps", lambda: [vis.heatmap_overlay(pixels, attention.cls_attention(t, 11 if
                                         model.spec.depth == 12 else model.spec.depth - 1), model=model)
                                         for t in (base.trace, slim.trace)])
    return {k: statistics.median(v[1:]) for k, v in steps.items() if len(v) > 1}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--weights", default="random weights (for timing only)",
                        help="the sidebar's weights choice for ImageNet models")
    parser.add_argument("--method", default="random")
    parser.add_argument("--repeats", type=int, default=6)
    args = parser.parse_args(argv)

    app = app_timings(args.model, args.weights, args.method, args.repeats)
    parts = breakdown(args.model, args.method, args.repeats)
    summary = dict(
        slider_change_median_ms=1000 * statistics.median(app["slider_change_s"]),
        slider_change_max_ms=1000 * max(app["slider_change_s"]),
        new_image_median_s=statistics.median(app["new_image_s"]),
        new_image_max_s=max(app["new_image_s"]),
    )
    record = dict(
        what="Explore page server time per rerun (AppTest), model loaded once beforehand",
        targets=dict(slider_change_ms=150, new_image_s=1.5),
        method=args.method, **app, summary=summary,
        breakdown_median_ms={k: 1000 * v for k, v in parts.items()},
        machine=dict(platform=platform.platform(), cpus=os.cpu_count(), torch_threads=torch.get_num_threads(),
                     torch=torch.__version__, python=platform.python_version()),
        measured_at=time.strftime("%Y-%m-%d %H:%M:%S"),
        command=" ".join(["python", "benchmarks/app_latency.py", *(sys.argv[1:] if argv is None else argv)]),
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(record, indent=2) + "\n")

    print(f"{app['model']} ({app['weights']}) on {app['device']}, method {args.method}, "
          f"{torch.get_num_threads()} threads")
    print(f"  slider change (fresh rho):  median {summary['slider_change_median_ms']:.0f} ms, "
          f"max {summary['slider_change_max_ms']:.0f} ms   (target <= 150 ms)")
    print(f"  new image, first result:    median {summary['new_image_median_s']:.2f} s, "
          f"max {summary['new_image_max_s']:.2f} s   (target <= 1.5 s)")
    print("  breakdown outside Streamlit (median): "
          + ", ".join(f"{k} {1000 * v:.0f} ms" for k, v in parts.items()))
    print(f"  written to {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
