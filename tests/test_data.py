"""The one labelled-data path: every format loads, every command reads the same images in the same order, and
``--limit N`` means the same N images everywhere; bad input gives one clear error."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from patchslim import bundled
from patchslim.data import (
    LabelledImages,
    canvas_images,
    decode,
    iter_batches,
    limit_indices,
    load_labelled,
)
from patchslim.errors import DataError, DataNotFoundError, PatchslimError


def _png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(1, 255, size=(20, 20)).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "L").save(buffer, format="PNG")
    return buffer.getvalue()


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


CLASSES = ("Trouser", "Bag", "Coat")


@pytest.fixture()
def class_folder(tmp_path) -> Path:
    """ROOT/<class>/<image>: 3 classes x 4 distinct images."""
    root = tmp_path / "classes"
    for k, c in enumerate(CLASSES):
        for i in range(4):
            _write(root / c / f"{i}.png", _png(10 * k + i))
    return root


@pytest.fixture()
def every_format(tmp_path, class_folder) -> dict[str, object]:
    """The same 12 labelled images as a class folder, a grouped folder, a CSV manifest, a zip path and zip bytes."""
    grouped = tmp_path / "grouped"
    rows = ["path,label,group"]
    entries = {}
    for k, c in enumerate(CLASSES):
        for i in range(4):
            data = (class_folder / c / f"{i}.png").read_bytes()
            group = "a" if i < 2 else "b"
            _write(grouped / group / c / f"{i}.png", data)
            rows.append(f"classes/{c}/{i}.png,{c},{group}")
            entries[f"wrap/{c}/{i}.png"] = data
    manifest = tmp_path / "list.csv"
    manifest.write_text("\n".join(rows) + "\n")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    zipped = tmp_path / "data.zip"
    zipped.write_bytes(buffer.getvalue())
    return {"class folder": class_folder, "grouped folder": grouped, "manifest": manifest, "zip": zipped,
            "zip bytes": buffer.getvalue()}


def test_every_format_loads_the_same_labelled_images(fashion_random, every_format):
    expected = None
    for kind, source in every_format.items():
        data = load_labelled(source, fashion_random)
        assert isinstance(data, LabelledImages) and len(data) == 12, kind
        labels = [data.class_names[i] for i in data.labels]
        assert sorted(labels) == sorted(CLASSES * 4), kind
        pixels = {tuple(data.items[i].split("/")[-2:]): decode(data, fashion_random, [i]).images[0]
                  for i in range(len(data))}
        if kind == "grouped folder":
            assert sorted(set(data.groupings["group"])) == ["a", "b"]
        if expected is None:
            expected = pixels
        assert pixels.keys() == expected.keys(), kind
        assert all(np.array_equal(pixels[k], expected[k]) for k in expected), kind
    groups = load_labelled(every_format["manifest"], fashion_random).groupings["group"]
    assert groups.tolist()[:4] == ["a", "a", "b", "b"]


def test_bundled_sets_load_as_canvases(fashion_random):
    images, labels = bundled.load_bundled_sample()
    data = load_labelled("bundled", fashion_random)
    assert len(data) == len(labels) and data.canvases is not None and data.items[3] == "test image 3"
    assert np.array_equal(data.labels, labels)
    batch = next(iter_batches(data, fashion_random, 0, 5, 5))
    assert batch.images.shape == (5, 1, 48, 48) and batch.ok.all()
    same = canvas_images(images, labels, "sample")
    assert np.array_equal(decode(same, fashion_random, [7, 2]).images, decode(data, fashion_random, [7, 2]).images)


def test_limit_is_evenly_spaced_and_exact():
    assert limit_indices(10, 5).tolist() == [0, 2, 4, 6, 8]
    assert limit_indices(10, 3).tolist() == [0, 3, 6]
    assert limit_indices(10, 1).tolist() == [0]
    assert limit_indices(10, None).tolist() == list(range(10)) == limit_indices(10, 99).tolist()
    for n in (7, 100, 10_000):
        for limit in (1, 2, 3, n // 3 + 1, n - 1):
            chosen = limit_indices(n, limit)
            assert len(chosen) == limit and len(set(chosen.tolist())) == limit and chosen[0] == 0
            assert np.all(np.diff(chosen) >= 1)
    with pytest.raises(DataError, match="--limit must be at least 1"):
        limit_indices(10, 0)


def test_subset_keeps_every_class_of_a_sorted_folder(fashion_random, class_folder):
    data = load_labelled(class_folder, fashion_random)
    small = data.subset(6)
    assert len(small) == 6 and sorted(set(small.labels.tolist())) == sorted(set(data.labels.tolist()))
    assert small.items == [data.items[i] for i in limit_indices(12, 6)]
    assert "6 of 12, evenly spaced" in small.name and small.fingerprint != data.fingerprint
    assert data.subset(None) is data and data.subset(12) is data


def _evaluated_items(capsys, argv) -> dict:
    from patchslim.cli import main

    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_evaluate_audit_and_train_policy_read_the_same_images_with_the_same_limit(fashion_random, class_folder,
                                                                                    tmp_path, monkeypatch, capsys):
    """One source, ``--limit 5``: the three commands see the same five images in the same order."""
    from patchslim.cli import main
    import patchslim.data as data_module

    seen: dict[str, list[str]] = {}
    original = data_module.load_labelled

    def spy(command):
        def load(*args, **kwargs):
            data = original(*args, **kwargs)
            subset = data.subset

            def recorded(limit):
                chosen = subset(limit)
                seen[command] = list(chosen.items)
                return chosen
            data.subset = recorded
            return data
        return load

    common = ["--model", "fashion-vit", "--no-pretrained", "--data", str(class_folder), "--limit", "5"]
    monkeypatch.setattr(data_module, "load_labelled", spy("evaluate"))
    record = _evaluated_items(capsys, ["evaluate", *common, "--methods", "random", "--keep", "1.0", "--json",
                                       "--no-progress", "--device", "cpu"])
    assert record["n"] == 5
    monkeypatch.setattr(data_module, "load_labelled", spy("audit"))
    assert main(["audit", *common, "--methods", "random", "--keep", "0.5", "--out", str(tmp_path / "audit"),
                 "--workers", "0", "--bootstrap", "20", "--no-progress", "--device", "cpu"]) == 0
    monkeypatch.setattr(data_module, "load_labelled", spy("train-policy"))
    assert main(["train-policy", *common, "--steps", "1", "--batch-size", "2", "--samples", "2", "--val", "1",
                 "--out", str(tmp_path / "policy.safetensors"), "--no-progress"]) == 0
    capsys.readouterr()
    assert seen["evaluate"] == seen["audit"] == seen["train-policy"]
    all_items = original(class_folder, fashion_random).items
    assert seen["evaluate"] == [all_items[i] for i in (0, 2, 4, 7, 9)]  # i * 12 // 5


def test_the_app_reads_data_through_the_same_loader(fashion_random, class_folder):
    from app import compute

    via_app = compute.audit_data(fashion_random, "folder", folder=str(class_folder), limit=5)
    direct = load_labelled(class_folder, fashion_random).subset(5)
    assert via_app.items == direct.items and np.array_equal(via_app.labels, direct.labels)


def test_bad_inputs_give_one_clear_error(fashion_random, deit_tiny_random, class_folder, tmp_path, capsys):
    from patchslim.cli import main

    with pytest.raises(DataNotFoundError, match="no such data folder, manifest or zip"):
        load_labelled(tmp_path / "nowhere", fashion_random)
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    with pytest.raises(DataError, match="neither a folder, a .csv manifest nor a .zip"):
        load_labelled(other, fashion_random)
    (tmp_path / "empty" / "spaceship").mkdir(parents=True)
    _write(tmp_path / "empty" / "spaceship" / "x.png", _png(1))
    with pytest.raises(DataError, match="no usable labelled images .* left out: folder name 'spaceship'"):
        load_labelled(tmp_path / "empty", fashion_random)
    with pytest.raises(DataError, match="not a readable zip"):
        load_labelled(b"PK\x03\x04 broken", fashion_random)
    with pytest.raises(DataError, match="labelled for 'fashion-vit'"):
        load_labelled("bundled", deit_tiny_random)
    assert issubclass(DataError, PatchslimError) and issubclass(DataNotFoundError, FileNotFoundError)
    # The same message, one line, from each command.
    messages = []
    for command, extra in (("evaluate", ["--methods", "random"]),
                           ("audit", ["--methods", "random", "--out", str(tmp_path / "out")]),
                           ("train-policy", ["--steps", "1"])):
        assert main([command, "--no-pretrained", "--data", str(tmp_path / "empty"), *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: no usable labelled images")
        messages.append(err)
    assert len(set(messages)) == 1
    for command, extra in (("evaluate", ["--methods", "random"]),
                           ("audit", ["--methods", "random", "--out", str(tmp_path / "out")]),
                           ("train-policy", ["--steps", "1"])):
        assert main([command, "--no-pretrained", "--data", str(class_folder), "--limit", "0", *extra]) == 2
        assert capsys.readouterr().err == "error: --limit must be at least 1, got 0\n"
