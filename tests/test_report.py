"""The human-readable reports: the summary is a well-formed two-column markdown table."""

from __future__ import annotations

import re

from pipeline.report import iteration_table, summary_markdown

MODEL = {
    "centers": [[0.0], [1.0]], "n_rows": 10, "features": ["x|y"], "inertia": 2.5, "n_iter": 3,
    "stop_reason": "loss-tol", "converged": True, "cluster_sizes": [4.0, 6.0],
    "init": {"method": "warm-start", "n_init": 1, "from": "/runs/a|b/model.json"},
    "parameters": {"step": "newton"}, "seconds": {"total": 1.25},
}  # fmt: skip


def test_summary_is_a_two_column_table_even_with_pipes_in_values() -> None:
    text = summary_markdown(MODEL | {"init": {"method": "k-means||", "n_init": 2}}, "/out")
    rows = [line for line in text.splitlines() if line.startswith("|")]
    for line in rows:
        cells = re.split(r"(?<!\\)\|", line)[1:-1]  # '|' not escaped by a backslash
        assert len(cells) == 2, line
    assert "| init | k-means\\|\\| (n_init=2) |" in rows
    assert "| cluster sizes | 4, 6 |" in rows


def test_summary_names_a_warm_start_file() -> None:
    text = summary_markdown(MODEL, "/out")
    assert "| init | warm-start from `/runs/a\\|b/model.json` (n_init=1) |" in text
    assert "| features | x\\|y |" in text


def test_iteration_table_of_a_minibatch_history() -> None:
    history = [{"iteration": 1, "loss": 3.0, "seconds": 0.123456, "rows": 100}]
    assert iteration_table(history) == [
        {"iteration": 1, "loss": 3.0, "relative_change": None, "changed_labels": None,
         "seconds": 0.1235}
    ]  # fmt: skip
