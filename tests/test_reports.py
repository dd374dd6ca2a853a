import pytest

from pml_mutual.evaluation import summarize_run

pytest.importorskip("matplotlib")
from pml_mutual import reports  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_summary(method, drop):
    stage_results = []
    for i in range(3):
        per = [{1: max(0.0, 0.9 - drop * (i - j)), 2: 0.95} for j in range(i + 1)]
        stage_results.append(
            {"stage": i, "old": per[0] if i else None, "new": per[-1], "all": per[0], "per_stage": per}
        )
    return summarize_run(stage_results, method=method, ks=(1, 2))


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_plots_are_written_with_the_expected_size(tmp_path):
    s = fake_summary("ours", 0.1)
    heat = reports.plot_accuracy_matrix(s, tmp_path / "heat.png")
    curves = reports.plot_stage_curves(s, tmp_path / "curves.png")
    both = reports.plot_methods(
        {"ours": s, "finetune": fake_summary("finetune", 0.3)}, tmp_path / "methods.png"
    )
    assert png_size(heat) == (int(100 * (1.2 * 3 + 2.5)), 100 * (3 + 2))
    assert png_size(curves) == (600, 400)
    assert png_size(both) == (1100, 400)
    for p in (heat, curves, both):
        assert p.stat().st_size > 5000  # drawn, not blank


def test_the_gallery_report_is_drawn_per_method_and_its_absence_is_named(tmp_path):
    def with_gallery(method, drop):
        s = fake_summary(method, drop)
        for i, st in enumerate(s["stages"]):
            rec = {"old": None, "new": {"1": 0.9}, "all": {"1": 0.9 - drop * i}, "per_stage": []}
            st["gallery"] = {name: rec for name in ("stored", "translation", "learned", "reembedded")}
        return s

    one = reports.plot_gallery(with_gallery("ours", 0.1), tmp_path / "one.png")
    two = reports.plot_gallery(
        {"ours": with_gallery("ours", 0.1), "finetune": with_gallery("finetune", 0.2)}, tmp_path / "two.png"
    )
    assert png_size(one) == (500, 400) and png_size(two) == (950, 400)
    assert two.stat().st_size > 5000
    with pytest.raises(ValueError, match=r"no gallery report in the results of \['plain'\]"):
        reports.plot_gallery({"plain": fake_summary("plain", 0.1)}, tmp_path / "none.png")
