"""The Audit page reads data on the server only inside the operator's data folder (``PATCHSLIM_APP_DATA_DIR``,
app/data_sources.py, through the same check as the models folder: app/server_paths.py); refusals are one sentence
that names no server path, and the page stays usable."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from PIL import Image

from app import data_sources, server_paths
from app.data_sources import DataPolicy, DataSourceRefused, check, choices

REPO = Path(__file__).resolve().parent.parent
MAIN = REPO / "app" / "main.py"
TIMEOUT = 180
FOLDER_OPTION = "A folder, CSV or zip on this server"


def _class_folder(root: Path, classes, per_class: int = 4) -> Path:
    """ROOT/<class>/<image> with small grey PNGs (canvas-sized for the bundled model)."""
    for index, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("L", (28, 28), 40 * index + 10 * i).save(root / name / f"{i}.png")
    return root


@pytest.fixture()
def data_dir(tmp_path) -> Path:
    """A data folder with a class folder (``shirts``), a manifest, a zip, a text file, a hidden folder, a symlink
    out and a symlink that stays inside; beside it (outside) a folder ``secret``."""
    root = tmp_path / "data"
    _class_folder(root / "shirts", ["Pullover", "Trouser"])
    (root / "sets").mkdir()
    (root / "sets" / "test.csv").write_text("path,label\n")
    (root / "photos.zip").write_bytes(b"PK\x05\x06" + bytes(18))  # an empty zip
    (root / "notes.txt").write_text("hello")
    (root / ".hidden").mkdir()
    outside = tmp_path / "secret"
    _class_folder(outside, ["Trouser"])
    (root / "escape").symlink_to(outside, target_is_directory=True)
    (root / "alias").symlink_to(root / "shirts", target_is_directory=True)
    return root


def _refused(typed: str, policy: DataPolicy, match: str) -> str:
    with pytest.raises(DataSourceRefused, match=match) as info:
        check(typed, policy)
    message = str(info.value)
    assert message.endswith(".") and not re.search(r"[.!?]\s+[A-Z]", message), message  # one sentence
    assert "/" not in message  # names no path, not even the typed one
    return message


# --------------------------------------------------------------------------- the pure rules

def test_not_configured_reads_nothing(data_dir):
    policy = DataPolicy(None)
    assert not policy.enabled
    _refused("shirts", policy, "has not configured a data folder")
    _refused(str(data_dir / "shirts"), policy, "has not configured a data folder")
    assert choices(policy) == []


def test_folders_and_files_inside_are_allowed_and_named_relative(data_dir):
    policy = DataPolicy(data_dir.resolve())
    shirts = (data_dir / "shirts").resolve()
    assert check("shirts", policy) == data_sources.ServerData(shirts, "folder shirts")
    assert check(str(data_dir / "shirts"), policy) == data_sources.ServerData(shirts, "folder shirts")  # absolute
    assert check("shirts/Trouser", policy).shown == "folder shirts/Trouser"
    assert check("sets/test.csv", policy) == data_sources.ServerData((data_dir / "sets" / "test.csv").resolve(),
                                                                     "manifest sets/test.csv")
    assert check("photos.zip", policy).shown == "zip photos.zip"
    assert check("alias", policy).path == shirts  # a symlink that stays inside
    assert str(data_dir) not in check(str(data_dir / "shirts"), policy).shown


def test_dot_dot_outside_and_symlinks_out_are_refused(data_dir, tmp_path):
    policy = DataPolicy(data_dir.resolve())
    _refused("../secret", policy, r"'\.\.'")
    _refused("shirts/../sets", policy, r"'\.\.'")  # even when it would land inside
    _refused(f"{data_dir}/../secret", policy, r"'\.\.'")
    _refused(str(tmp_path / "secret"), policy, "outside the app's data folder")
    _refused("/etc", policy, "outside the app's data folder")
    _refused("/etc/passwd", policy, "outside the app's data folder")
    _refused("escape", policy, "outside the app's data folder")  # symlink out
    _refused("escape/Trouser", policy, "outside the app's data folder")
    _refused(".", policy, "outside the app's data folder")  # the folder itself: not strictly inside
    _refused(str(data_dir), policy, "outside the app's data folder")
    _refused("missing", policy, "no such folder")
    _refused("notes.txt", policy, "neither a folder")
    _refused("", policy, "Pick or type")
    _refused("a\x00b", policy, "Pick or type")


def test_the_picker_offers_the_entries_inside(data_dir):
    assert choices(DataPolicy(data_dir.resolve())) == ["alias", "photos.zip", "sets", "shirts"]
    assert choices(DataPolicy(data_dir / "missing")) == []


def test_the_policy_comes_from_the_environment(tmp_path):
    assert DataPolicy.from_environment({}) == DataPolicy(None)
    assert DataPolicy.from_environment({data_sources.DATA_DIR_ENV: "  "}) == DataPolicy(None)
    assert DataPolicy.from_environment({data_sources.DATA_DIR_ENV: str(tmp_path)}) == DataPolicy(tmp_path.resolve())


def test_models_and_data_share_one_containment_check(tmp_path):
    """Both folders are guarded by server_paths.resolve_inside (written once), whose reasons the two word."""
    import inspect

    from app import model_sources

    for module in (model_sources, data_sources):
        assert "resolve_inside" in inspect.getsource(module)
        assert ".resolve(" not in inspect.getsource(module).replace(".resolve() if folder", "")
    (tmp_path / "inside").mkdir()
    assert server_paths.resolve_inside(tmp_path, "inside") == (tmp_path / "inside").resolve()
    for typed, reason in (("..", server_paths.DOT_DOT), ("nope", server_paths.MISSING), (".", server_paths.OUTSIDE),
                          ("", server_paths.EMPTY)):
        with pytest.raises(server_paths.PathRefused) as info:
            server_paths.resolve_inside(tmp_path, typed)
        assert info.value.reason == reason


# --------------------------------------------------------------------------- in the app

def _audit_page(monkeypatch, data_dir: Path | None):
    pytest.importorskip("streamlit")
    from streamlit.testing.v1 import AppTest

    from patchslim import bundled

    if data_dir is None:
        monkeypatch.delenv(data_sources.DATA_DIR_ENV, raising=False)
    else:
        monkeypatch.setenv(data_sources.DATA_DIR_ENV, str(data_dir))
    at = AppTest.from_file(str(MAIN), default_timeout=TIMEOUT).run()
    at.selectbox(key="model_name").set_value(bundled.BUNDLED_NAME).run()
    at.switch_page("app_pages/audit.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_without_a_data_folder_the_server_option_is_not_offered(monkeypatch):
    at = _audit_page(monkeypatch, None)
    assert FOLDER_OPTION not in at.radio(key="audit_source").options
    assert any(data_sources.DATA_DIR_ENV in c.value for c in at.caption)
    assert not at.text_input and not at.error


def test_with_a_data_folder_a_good_folder_audits_and_a_bad_path_is_one_message(monkeypatch, data_dir, tmp_path,
                                                                                   page_text):
    from patchslim import bundled

    _class_folder(data_dir / "garments", bundled.CLASS_NAMES[1:4], per_class=3)
    at = _audit_page(monkeypatch, data_dir)
    at.radio(key="audit_source").set_value(FOLDER_OPTION).run()
    assert "garments" in at.selectbox(key="audit_server_pick").options
    assert "escape" not in at.selectbox(key="audit_server_pick").options
    at.multiselect(key="audit_methods").set_value(["uniform"])
    at.multiselect(key="audit_ratios").set_value([0.5])

    # a path outside, typed: one sentence, no path, the page goes on
    at.selectbox(key="audit_server_pick").set_value(at.selectbox(key="audit_server_pick").options[-1]).run()
    at.text_input(key="audit_folder").set_value(str(tmp_path / "secret")).run()
    at.button[0].click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert [e.value for e in at.error] == ["The audit could not run: That path is refused: it is outside the app's "
                                           "data folder."]
    for bad in ("../secret", "escape"):
        at.text_input(key="audit_folder").set_value(bad).run()
        at.button[0].click().run()
        assert len(at.error) == 1 and "refused" in at.error[0].value
    assert str(tmp_path) not in page_text(at)

    # then a good folder from the picker audits
    at.selectbox(key="audit_server_pick").set_value("garments").run()
    at.button[0].click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert [m.value for m in at.metric if m.label == "Images audited"] == ["9"]
    assert str(tmp_path) not in page_text(at)
    outcome = [v for v in at.session_state["_results"]._items.values() if hasattr(v, "files")][-1]
    assert outcome.report.data == "folder garments"
    for name, content in outcome.files.items():
        assert str(tmp_path).encode() not in content, name


def test_a_loading_error_names_the_data_relative_to_the_folder(data_dir, tmp_path):
    import patchslim
    from patchslim import bundled
    from patchslim.errors import DataError

    model = patchslim.load_model(bundled.BUNDLED_NAME, pretrained=False)
    (data_dir / "empty").mkdir()
    with pytest.raises(DataError) as info:
        data_sources.load("empty", model, DataPolicy(data_dir.resolve()))
    assert "folder empty" in str(info.value) and str(tmp_path) not in str(info.value)
    with pytest.raises(DataSourceRefused):
        data_sources.load("escape", model, DataPolicy(data_dir.resolve()))
