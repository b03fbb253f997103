"""tasks/bench_qp.py: the smoke run of the QP benchmark."""

from __future__ import annotations

import importlib.util

HAS_QPTH = importlib.util.find_spec("qpth") is not None
HAS_MOREAU = importlib.util.find_spec("moreau") is not None
HAS_PROXSUITE = importlib.util.find_spec("proxsuite") is not None


def test_bench_qp_quick(tmp_path):
    from tasks.bench_qp import main

    peers = (["qpth-default"] if HAS_QPTH else []) + (
        ["proxsuite-default"] if HAS_PROXSUITE else []
    )
    others = ["moreau-default"] if HAS_MOREAU else []
    methods = ["torch-ipm", "diffcp-clarabel", *peers, *others]
    out = main(["--quick", "--sizes", "small", "--methods", *methods, "--out", str(tmp_path)])
    assert (tmp_path / "bench_qp.json").is_file() and (tmp_path / "bench_qp.png").is_file()
    rows = {r["method"]: r for r in out["rows"]}
    assert rows["torch-ipm"]["status"] == "ok" and rows["torch-ipm"]["max_grad_err"] < 1e-6
    assert all(rows[p]["status"] == "ok" for p in peers + others)
    assert out["targets"]["small"]["grad_target_met"]
    if peers:  # the ratio is against the fastest peer that ran, with the size's target
        assert out["targets"]["small"]["fastest_peer"] in peers
        assert out["targets"]["small"]["time_target"] == 0.8
    if others:
        assert out["targets"]["small"]["time_ratio_vs_moreau-default"] > 0
    assert out["machine"]["cpu_count"] >= 1 and "torch" in out["machine"]["versions"]


def test_profile_qp_quick(tmp_path):
    from tasks.profile_qp import main

    out = main(["--quick", "--sizes", "small", "--repeats", "1", "--out", str(tmp_path)])
    row = out["sizes"][0]
    assert (tmp_path / "profile.json").is_file() and "## small" in (
        tmp_path / "profile.md"
    ).read_text()
    assert row["iterations"] >= 1 and row["forward_ms"] > 0 and row["top_ops"]
    assert row["kernels"]["gemm_gflops"] > 0 and row["floor_forward_ms"] > 0
