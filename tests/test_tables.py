"""The shared result tables: what each cell says follows from the rows."""

import pytest

from pml_mutual.tables import format_gallery, format_recall_table, gap_by_stage, mean_std


def results_row(method, seed, per_stage, all_):
    return {
        "method": method,
        "seed": seed,
        "recall@1": {"old": per_stage[0], "new": per_stage[-1], "all": all_, "per_stage": per_stage},
    }


def test_multi_task_table_has_a_line_per_stage_and_the_methods_asked_for_in_order():
    rows = [
        results_row("ours", 0, [90.0, 80.0], 85.0),
        results_row("ours", 1, [92.0, 82.0], 87.0),
        results_row("finetune", 0, [50.0, 95.0], 70.0),
    ]
    text = format_recall_table(rows, "multi-task", "T", methods=["finetune", "ours", "absent"])
    lines = text.strip().splitlines()
    assert lines[1].split()[1:] == ["finetune", "ours"]
    assert lines[2].startswith("stage 0") and "91.00 ± 1.41" in lines[2] and "50.00 ± 0.00" in lines[2]
    assert lines[-1].startswith("all") and "86.00 ± 1.41" in lines[-1]


def test_gallery_table_gap_and_time_ratio():
    row = {
        "method": "ours",
        "after_stage": 4,
        "stored": 0.2,
        "translation": 0.3,
        "learned": 0.6,
        "reembedded": 0.7,
        "learned_seconds": 0.01,
        "reembed_seconds": 1.0,
    }
    earlier = dict(row, after_stage=3, learned=0.0)  # only the last stage is reported
    line = format_gallery([earlier, row]).strip().splitlines()[-1].split()
    assert (
        line[0] == "ours" and float(line[-3]) == pytest.approx(0.2) and float(line[-2]) == pytest.approx(0.8)
    )
    assert float(line[-1]) == pytest.approx(0.01)


def test_mean_std_is_the_sample_deviation():
    mean, std = mean_std([[1.0, 2.0], [3.0, 2.0]])
    assert list(mean) == [2.0, 2.0] and std[0] == pytest.approx(2**0.5) and std[1] == 0


def test_gap_recovered_by_stage_of_origin():
    def cells(*values):
        return {"per_stage": [{1: v} for v in values]}

    report = {
        "stored": cells(0.1, 0.2, 0.9),
        "learned": cells(0.5, 0.2, 0.9),
        "reembedded": cells(0.9, 0.6, 0.902),
    }
    gaps = gap_by_stage(report, "learned")
    assert gaps[0] == pytest.approx(0.5) and gaps[1] == pytest.approx(0.0)
    assert gaps[2] != gaps[2]  # NaN: re-embedding gains under half a point there
    row = {
        "method": "ours",
        "after_stage": 2,
        "stored": 0.4,
        "translation": 0.4,
        "learned": 0.5,
        "reembedded": 0.8,
        "report": report,
    }
    assert "stage 0: 0.50 stage 1: 0.00 stage 2: –" in format_gallery([row])
