"""patchslim.figures.write_png: kaleido when it works, else the fallback, and it says which."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from patchslim.figures import write_png


class _Figure:
    """Stands in for a plotly figure: ``write_image`` writes a PNG, or fails like kaleido without Chromium."""

    def __init__(self, works: bool) -> None:
        self.works = works

    def write_image(self, path: str, scale: float = 1) -> None:
        if not self.works:
            raise RuntimeError("Kaleido requires Google Chrome to be installed")
        Image.new("RGB", (int(10 * scale), 10)).save(path)


def _draw(path: Path) -> None:
    Image.new("RGB", (7, 7), (255, 0, 0)).save(path)


def test_kaleido_writes_when_it_can(tmp_path):
    writer, error = write_png(_Figure(True), tmp_path / "a.png", _draw)
    assert (writer, error) == ("kaleido", None)
    assert Image.open(tmp_path / "a.png").size == (20, 10)  # scale 2


def test_fallback_draws_when_kaleido_cannot(tmp_path):
    writer, error = write_png(_Figure(False), tmp_path / "b.png", _draw)
    assert writer == "fallback" and isinstance(error, RuntimeError)
    assert Image.open(tmp_path / "b.png").size == (7, 7)


def test_nothing_written_without_a_fallback(tmp_path):
    writer, error = write_png(_Figure(False), tmp_path / "c.png")
    assert writer is None and error is not None
    assert not (tmp_path / "c.png").exists()


def test_evaluate_draws_its_plot_with_matplotlib_when_kaleido_cannot(tmp_path):
    from patchslim.evaluate import AccuracyRow, EvaluationResult, _write_png

    rows = [AccuracyRow(m, m, "default", rho, rho, rho, top1, 0.9, 100, int(100 * top1), 90)
            for m, top1s in (("random", (0.8, 0.6)), ("attention", (0.85, 0.8)))
            for rho, top1 in zip((0.7, 0.3), top1s)]
    result = EvaluationResult("fashion-vit", "bundled", "test", 100, 0.86, rows)
    assert _write_png(result, _Figure(False), tmp_path / "accuracy.png") == "matplotlib"
    picture = Image.open(tmp_path / "accuracy.png")
    assert picture.size == (1080, 672)  # 9 x 5.6 inches at 120 dpi: drawn by matplotlib, not by the stand-in
    assert _write_png(result, _Figure(True), tmp_path / "k.png") == "kaleido"
