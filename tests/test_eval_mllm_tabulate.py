"""Tabulator of the 16 MLLM benchmarks: paper numbers, averaging rules, lmms-eval result parsing (no model needed)."""

import json

import pytest

from pivot_hf.mllm_eval import benchmarks as bm
from pivot_hf.mllm_eval.registration import require_lmms_eval


# Written out independently of the library: Table U's domains, and the paper's rule (E.2) that MME is divided by 20.
DOMAINS = {
    "General": ["mme", "mmbench", "seed", "gqa"],
    "Knowledge": ["sqa", "mmmu", "mathvista", "ai2d"],
    "OCR & Chart": ["chartqa", "ocrbench", "textvqa", "docvqa"],
    "Vision-Centric": ["mmvp", "realworldqa", "cvbench_2d", "cvbench_3d"],
}
# The paper prints one decimal; a recomputed average may sit exactly on a .x5 boundary that the authors rounded down.
ROUNDING = 0.05 + 1e-9


def _independent_averages(raw: dict) -> dict:
    scaled = {k: (v / 20.0 if k == "mme" else v) for k, v in raw.items()}
    out = {d: sum(scaled[k] for k in keys) / 4 for d, keys in DOMAINS.items()}
    out["All"] = sum(scaled.values()) / 16
    return out


def _rows(prefix):
    return [r for r in bm.load_paper_results()["rows"] if r["id"].startswith(prefix)]


def test_paper_data_covers_the_16_benchmarks():
    assert [b.key for b in bm.BENCHMARKS if b.group == "General"] == DOMAINS["General"]
    assert {b.key for b in bm.BENCHMARKS} == {k for keys in DOMAINS.values() for k in keys}
    for row in _rows("table_o/") + _rows("table_s/"):
        assert set(row["benchmarks"]) == {k for keys in DOMAINS.values() for k in keys}, row["id"]
    assert len(_rows("table1/")) == 22 and len(_rows("table_o/")) == 4 and len(_rows("table_s/")) == 8


@pytest.mark.parametrize("row", _rows("table_o/"), ids=lambda r: r["id"])
def test_table_o_rows_reproduce_the_printed_domain_averages(row):
    expected = _independent_averages(row["benchmarks"])
    ours = bm.compute_averages(row["benchmarks"])
    assert ours["counts"] == {"General": 4, "Knowledge": 4, "OCR & Chart": 4, "Vision-Centric": 4, "All": 16}
    printed = dict(row["averages"])  # Table E (bottom)
    if "same_as" in row:  # and the same MLLM's row of Table 1
        table1 = bm.paper_row(row["same_as"])["averages"]
        assert table1 == printed
    for domain, value in expected.items():
        assert ours["averages"][domain] == pytest.approx(value, abs=1e-9)
        assert abs(value - printed[domain]) <= ROUNDING, (domain, value, printed[domain])
    # With four benchmarks per domain the overall mean equals the mean of the domain means.
    assert expected["All"] == pytest.approx(sum(expected[d] for d in DOMAINS) / 4)


@pytest.mark.parametrize("row", _rows("table_s/"), ids=lambda r: r["id"])
def test_table_s_rows_reproduce_the_printed_overall_average(row):
    assert abs(_independent_averages(row["benchmarks"])["All"] - row["averages"]["All"]) <= ROUNDING


def test_mme_is_rescaled_only_inside_averages():
    scores = {"mme": 1500.0, "mmbench": 70.0, "seed": 60.0, "gqa": 50.0}
    result = bm.compute_averages(scores)
    assert result["averages"]["General"] == pytest.approx((75.0 + 70.0 + 60.0 + 50.0) / 4)
    assert result["counts"]["Knowledge"] == 0 and result["averages"]["Knowledge"] is None
    table = bm.tabulate(scores, paper_rows=["table_o/siglip2-so400m/pivot"], name="mine")
    markdown = bm.to_markdown(table)
    assert "| General | MME^P | 1500.0 | 1427.5 |" in markdown
    assert "| **General avg** | | 63.8 | 68.1 |" in markdown
    assert "(4/16)" in markdown  # a partial overall average says so
    json.dumps(table)  # the JSON output is serialisable as is


def test_scores_from_lmms_eval_results_use_each_metric_and_unit():
    # The shape lmms-eval writes: results[task]["<metric>,<filter>"], fractions for most metrics.
    results = {
        "results": {
            "mme": {"alias": "mme", "mme_perception_score,none": 1427.5, "mme_cognition_score,none": 300.0},
            "gqa": {"exact_match,none": 0.614, "exact_match_stderr,none": "N/A"},
            "mmvp": {"mmvp_accuracy,none": 0.383, "mmvp_pair_accuracy,none": 0.2},
            "mathvista_testmini_format": {"llm_as_judge_eval,none": 12.3},
            "ocrbench": {"ocrbench_accuracy,none": 0.483},
            "not_a_paper_task": {"acc,none": 1.0},
        }
    }
    scores = bm.scores_from_lmms_results(results)
    assert scores == pytest.approx({"mme": 1427.5, "gqa": 61.4, "mmvp": 38.3, "mathvista": 12.3, "ocrbench": 48.3})


def test_benchmark_tasks_are_the_lmms_eval_names():
    assert bm.benchmark_tasks(["mme", "cvbench_3d"]) == ["mme", "cv_bench_3d"]
    assert len(set(bm.benchmark_tasks())) == 16
    with pytest.raises(ValueError):
        bm.benchmark_tasks(["imagenet"])


def test_missing_lmms_eval_gives_a_clear_error(monkeypatch):
    from pivot_hf.mllm_eval import registration

    monkeypatch.setattr(registration, "LMMS_EVAL_AVAILABLE", False)
    with pytest.raises(ImportError, match=r'pip install -e "\.\[eval\]"'):
        require_lmms_eval()
