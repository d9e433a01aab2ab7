"""The app's model picker takes timm-style sources safely: ``local-dir:`` only inside the operator's models folder,
``hf-hub:`` only when allowed, everything else refused with one sentence (app/model_sources.py), and the page
stays usable after a refusal."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from app import model_sources
from app.model_sources import ModelSourceRefused, SourcePolicy, check, local_choices

REPO = Path(__file__).resolve().parent.parent
MAIN = REPO / "app" / "main.py"
TIMEOUT = 180
LISTED = ("fashion-vit", "deit_small_patch16_224")


@pytest.fixture()
def models_dir(tmp_path) -> Path:
    """A models folder with two timm folders (``tiny``, ``other``), a folder without config, and beside it
    (outside) a folder with a config that a symlink inside points to."""
    root = tmp_path / "models"
    for name in ("tiny", "other"):
        (root / name).mkdir(parents=True)
        (root / name / "config.json").write_text("{}")
    (root / "no_config").mkdir()
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "config.json").write_text("{}")
    (root / "escape").symlink_to(outside, target_is_directory=True)
    (root / "alias").symlink_to(root / "tiny", target_is_directory=True)
    return root


def _refused(name: str, policy: SourcePolicy, match: str) -> str:
    with pytest.raises(ModelSourceRefused, match=match) as info:
        check(name, policy, LISTED)
    message = str(info.value)
    assert message.endswith(".") and not re.search(r"[.!?]\s+[A-Z]", message), message  # one sentence
    if policy.models_dir is not None and str(policy.models_dir) not in name:
        assert str(policy.models_dir) not in message  # never names the server's folder
    return message


# --------------------------------------------------------------------------- the pure rules

def test_listed_names_pass_and_unlisted_plain_names_are_refused():
    policy = SourcePolicy()
    assert check(" fashion-vit ", policy, LISTED) == "fashion-vit"
    _refused("vit_huge_patch14_224", policy, "not one of the app's models")
    _refused("file:/etc/passwd", policy, "not 'file' sources")
    _refused("   ", policy, "Type a model source")


def test_local_dir_is_refused_when_no_models_folder_is_configured(models_dir):
    policy = SourcePolicy(models_dir=None, allow_hub=True)
    _refused("local-dir:tiny", policy, "has not configured a models folder")
    _refused(f"local-dir:{models_dir / 'tiny'}", policy, "has not configured a models folder")
    assert local_choices(policy) == []


def test_local_dir_inside_the_models_folder_is_accepted(models_dir):
    policy = SourcePolicy(models_dir=models_dir.resolve())
    tiny = (models_dir / "tiny").resolve()
    assert check("local-dir:tiny", policy, LISTED) == f"local-dir:{tiny}"
    assert check(f"local-dir:{models_dir / 'tiny'}", policy, LISTED) == f"local-dir:{tiny}"  # absolute, inside
    assert check("LOCAL-DIR:tiny", policy, LISTED) == f"local-dir:{tiny}"  # timm's prefixes ignore case
    assert check("local-dir:alias", policy, LISTED) == f"local-dir:{tiny}"  # a symlink that stays inside


def test_dot_dot_is_refused_even_when_it_would_land_inside(models_dir):
    policy = SourcePolicy(models_dir=models_dir.resolve())
    _refused("local-dir:../secret", policy, r"'\.\.'")
    _refused("local-dir:tiny/../other", policy, r"'\.\.'")
    _refused(f"local-dir:{models_dir}/../secret", policy, r"'\.\.'")


def test_paths_outside_and_symlinks_out_are_refused(models_dir, tmp_path):
    policy = SourcePolicy(models_dir=models_dir.resolve())
    _refused(f"local-dir:{tmp_path / 'secret'}", policy, "outside the app's models folder")
    _refused("local-dir:/etc", policy, "outside the app's models folder")
    _refused("local-dir:escape", policy, "outside the app's models folder")  # symlink out
    _refused("local-dir:.", policy, "outside the app's models folder")  # the folder itself: not strictly inside
    _refused(f"local-dir:{models_dir}", policy, "outside the app's models folder")
    _refused("local-dir:missing", policy, "not a folder in the app's models folder")
    _refused("local-dir:tiny/config.json", policy, "not a folder")
    _refused("local-dir:", policy, "needs the name of a folder")
    _refused("local-dir:a\x00b", policy, "needs the name of a folder")


def test_a_symlink_loop_is_refused(models_dir):
    (models_dir / "loop").symlink_to(models_dir / "loop")
    _refused("local-dir:loop", SourcePolicy(models_dir=models_dir.resolve()), "not a folder")


def test_hub_names_need_the_operators_permission():
    closed, open_ = SourcePolicy(allow_hub=False), SourcePolicy(allow_hub=True)
    _refused("hf-hub:timm/vit_tiny_patch16_224.augreg_in21k", closed, "does not download models")
    _refused("hf_hub:timm/vit_tiny_patch16_224", closed, "does not download models")  # timm's old spelling
    assert check("hf-hub:timm/vit_tiny_patch16_224.augreg_in21k", open_, LISTED) == \
        "hf-hub:timm/vit_tiny_patch16_224.augreg_in21k"
    for bad in ("hf-hub:timm", "hf-hub:../x/y", "hf-hub:a/b/c", "hf-hub:org/na me", "hf-hub:/etc/passwd",
                "hf-hub:org/..", "hf-hub:https://example.com/x"):
        _refused(bad, open_, "not a Hub model name")


def test_the_policy_comes_from_the_environment(tmp_path):
    assert SourcePolicy.from_environment({}) == SourcePolicy(None, False)
    policy = SourcePolicy.from_environment({model_sources.MODELS_DIR_ENV: str(tmp_path),
                                            model_sources.ALLOW_HUB_ENV: "1"})
    assert policy == SourcePolicy(tmp_path.resolve(), True)
    for value in ("0", "", "no", "false"):
        assert not SourcePolicy.from_environment({model_sources.ALLOW_HUB_ENV: value}).allow_hub


def test_the_picker_offers_the_timm_folders_inside(models_dir):
    policy = SourcePolicy(models_dir=models_dir.resolve())
    assert local_choices(policy) == ["local-dir:alias", "local-dir:other", "local-dir:tiny"]
    assert local_choices(SourcePolicy(models_dir=models_dir / "missing")) == []


# --------------------------------------------------------------------------- in the app

def _app():
    pytest.importorskip("streamlit")
    from streamlit.testing.v1 import AppTest

    return AppTest.from_file(str(MAIN), default_timeout=TIMEOUT)


def _tokens_shown(at) -> bool:
    return any(m.label == "Tokens in last block" and m.value for m in at.metric)


def _errors(at) -> list[str]:
    """Error boxes other than the Explore page's "label flipped" banner (a result, not a problem)."""
    return [e.value for e in at.error if not e.value.startswith("**Label flipped")]


def test_a_refused_source_shows_one_message_and_the_page_stays_usable(monkeypatch, models_dir):
    from app import sidebar
    from patchslim import bundled

    monkeypatch.delenv(model_sources.MODELS_DIR_ENV, raising=False)
    monkeypatch.delenv(model_sources.ALLOW_HUB_ENV, raising=False)
    at = _app().run()
    at.selectbox(key="model_name").set_value(sidebar.TYPED_SOURCE).run()
    at.text_input(key="model_source").input(f"local-dir:{models_dir / 'tiny'}").run()
    assert not at.exception, [e.value for e in at.exception]
    errors = _errors(at)
    assert errors == ["This server loads no local-dir: models: its operator has not configured a models folder "
                      f"({model_sources.MODELS_DIR_ENV})."], errors
    at.text_input(key="model_source").input("hf-hub:timm/vit_tiny_patch16_224").run()
    assert _errors(at) == [
        f"This server does not download models from the Hugging Face Hub: its operator has not allowed it "
        f"({model_sources.ALLOW_HUB_ENV}=1)."]
    at.selectbox(key="model_name").set_value(bundled.BUNDLED_NAME).run()
    assert not at.exception and not _errors(at)
    assert _tokens_shown(at)


def test_an_allowed_local_dir_reaches_the_loader_resolved(monkeypatch, models_dir):
    """With the loader stubbed (returns the bundled model): the picker offers the folder and the loader is asked
    for the resolved folder, once; a symlink out is never loaded."""
    import patchslim
    from app import state
    from patchslim import bundled

    monkeypatch.setenv(model_sources.MODELS_DIR_ENV, str(models_dir))
    asked = []
    model = patchslim.load_model(bundled.BUNDLED_NAME, pretrained=bundled.CHECKPOINT_PATH.exists())

    def load(name, device, precision, random_weights, stamp=()):
        asked.append(name)
        return model

    monkeypatch.setattr(state, "_load", load)
    at = _app().run()
    options = at.selectbox(key="model_name").options
    assert {"local-dir:tiny", "local-dir:other"} <= set(options) and "local-dir:escape" not in options
    at.selectbox(key="model_name").set_value("local-dir:tiny").run()
    assert not at.exception and not _errors(at), _errors(at)
    assert _tokens_shown(at)
    folders = {name for name in asked if name.startswith("local-dir:")}  # (the first screen loads fashion-vit)
    assert folders == {f"local-dir:{(models_dir / 'tiny').resolve()}"}
    at.selectbox(key="model_name").set_value(at.selectbox(key="model_name").options[-1]).run()  # type a source
    at.text_input(key="model_source").input("local-dir:escape").run()
    assert any("outside the app's models folder" in e for e in _errors(at))
    assert {name for name in asked if name.startswith("local-dir:")} == folders  # the symlink out never loaded


def test_a_real_timm_folder_model_runs_in_the_app(monkeypatch, tmp_path):
    """A vit_tiny with 64-px images and 3 classes, saved the timm way, is offered, loaded and explored."""
    timm = pytest.importorskip("timm")
    from timm.models import save_for_hf

    import patchslim.models

    if not hasattr(patchslim.models, "LOCAL_DIR_PREFIX"):
        pytest.skip("patchslim.load_model does not take local-dir: names yet")
    root = tmp_path / "models"
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=3)
    save_for_hf(model, str(root / "tiny3"), model_config={"label_names": ["cat", "dog", "bird"]},
                safe_serialization=True)
    assert {p.name for p in (root / "tiny3").iterdir()} >= {"config.json", "model.safetensors"}
    monkeypatch.setenv(model_sources.MODELS_DIR_ENV, str(root))
    at = _app().run()
    at.selectbox(key="model_name").set_value("local-dir:tiny3").run()
    assert not at.exception, [e.value for e in at.exception]
    assert not _errors(at), _errors(at)
    assert _tokens_shown(at)
    tokens = [m for m in at.metric if m.label == "Tokens in last block"][0]
    assert tokens.delta == "of 17"  # (64 / 16)^2 patches + CLS
    assert any(label in " ".join(s.value for s in [*at.success, *at.error]) for label in ("cat", "dog", "bird"))
    assert os.environ[model_sources.MODELS_DIR_ENV] == str(root)


def _save_tiny(folder: Path, seed: int = 0) -> None:
    """A vit_tiny with 64-px images and 3 classes, saved the timm way (config.json + model.safetensors)."""
    timm = pytest.importorskip("timm")
    import torch
    from timm.models import save_for_hf

    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=3)
    save_for_hf(model, str(folder), model_config={"label_names": ["cat", "dog", "bird"]}, safe_serialization=True)


def test_no_page_shows_the_server_path_of_a_local_dir_model(monkeypatch, tmp_path, page_text):
    """Picked as local-dir:tiny3 or typed as its absolute path, the model is named local-dir:tiny3 on every page
    (sidebar caption, Benchmark caption, Audit caption, and the name the downloads and audit reports take)."""
    import patchslim.models

    if not hasattr(patchslim.models, "LOCAL_DIR_PREFIX"):
        pytest.skip("patchslim.load_model does not take local-dir: names yet")
    root = tmp_path / "models"
    _save_tiny(root / "tiny3")
    monkeypatch.setenv(model_sources.MODELS_DIR_ENV, str(root))
    at = _app().run()
    for typed in (None, str(root / "tiny3")):
        if typed is None:
            at.selectbox(key="model_name").set_value("local-dir:tiny3").run()
        else:
            at.selectbox(key="model_name").set_value(at.selectbox(key="model_name").options[-1]).run()
            at.text_input(key="model_source").input(f"local-dir:{typed}").run()
        assert not at.exception, [e.value for e in at.exception]
        choice = at.session_state["settings"].choice
        assert choice.model.name == "local-dir:tiny3"  # what metrics_record / audit reports write as `model`
        assert any("local-dir:tiny3" in c.value for c in at.sidebar.caption)
        for page in ("explore", "compare", "explain", "benchmark", "audit"):
            at.switch_page(f"app_pages/{page}.py").run()
            assert not at.exception, (page, [e.value for e in at.exception])
            text = page_text(at)
            if typed is not None:  # the typed text sits in the text box; nothing else may show it
                text = text.replace(f"local-dir:{typed}", "")
            assert str(tmp_path) not in text and str(tmp_path.resolve()) not in text, page
        at.switch_page("app_pages/explore.py").run()


def test_a_broken_local_dir_folder_is_told_without_its_path(monkeypatch, tmp_path, page_text):
    root = tmp_path / "models"
    (root / "broken").mkdir(parents=True)
    (root / "broken" / "config.json").write_text('{"architecture": "vit_tiny_patch16_224"}')  # no weights
    (root / "no_config").mkdir()
    monkeypatch.setenv(model_sources.MODELS_DIR_ENV, str(root))
    at = _app().run()
    for name in ("broken", "no_config"):
        at.selectbox(key="model_name").set_value(at.selectbox(key="model_name").options[-1]).run()
        at.text_input(key="model_source").input(f"local-dir:{name}").run()
        assert not at.exception, [e.value for e in at.exception]
        errors = _errors(at)
        assert errors and f"local-dir:{name}" in errors[0], errors
        assert str(tmp_path) not in page_text(at)


def test_replaced_weights_of_a_local_dir_model_are_loaded_again(monkeypatch, tmp_path):
    """The cached model's key holds the folder's config / weights modification times and sizes."""
    import patchslim.models

    if not hasattr(patchslim.models, "LOCAL_DIR_PREFIX"):
        pytest.skip("patchslim.load_model does not take local-dir: names yet")
    root = tmp_path / "models"
    _save_tiny(root / "tiny3", seed=0)
    monkeypatch.setenv(model_sources.MODELS_DIR_ENV, str(root))
    at = _app().run()
    at.selectbox(key="model_name").set_value("local-dir:tiny3").run()
    first = at.session_state["settings"].choice
    at.run()
    assert at.session_state["settings"].choice.key == first.key  # unchanged files: the cache serves it
    assert at.session_state["settings"].choice.model.model is first.model.model
    weights = root / "tiny3" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    _save_tiny(root / "tiny3", seed=1)
    os.utime(weights, ns=(before + 2_000_000_000, before + 2_000_000_000))  # a coarse clock still sees a change
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    second = at.session_state["settings"].choice
    assert second.key != first.key and second.model.model is not first.model.model
    old, new = (dict(c.model.model.named_parameters())["head.weight"] for c in (first, second))
    assert not (old == new).all()  # the new weights, not the stale ones
    assert second.model.name == "local-dir:tiny3"


def test_the_folder_stamp_follows_config_and_weights(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"1234")
    stamp = model_sources.folder_stamp(folder)
    assert [entry[0] for entry in stamp] == ["config.json", "model.safetensors"]
    assert stamp[1][2] == 4
    (folder / "model.safetensors").write_bytes(b"12345")
    assert model_sources.folder_stamp(folder) != stamp
    (folder / "notes.txt").write_text("not read by timm")
    assert model_sources.folder_stamp(folder)[1:] == model_sources.folder_stamp(folder)[1:]
