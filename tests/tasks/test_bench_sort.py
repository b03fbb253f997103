"""tasks/bench_sort.py: the sweep's and the race's smoke runs and their files."""

from __future__ import annotations

import importlib.util
import json

from tasks import bench_sort


def test_race_quick(tmp_path):
    flags = ["--race", "--quick", "--threads", "1", "--no-progress", "--out", str(tmp_path)]
    out = bench_sort.main(flags)
    for f in ("race.json", "race.csv", "race.png", "config.json"):
        assert (tmp_path / f).is_file(), f
    rows = {(r["method"], r["n"]): r for r in out["rows"]}
    for m in ("soft_sort", "soft_rank", "lp_topk", "lp_permutahedron_sort", "lp_birkhoff_sort"):
        for b in ("native", "moreau"):
            assert rows[f"{m} ({b})", 16]["status"] == "ok"
    assert rows["neuralsort", 16]["fwd_bwd_ms"] > 0
    peers = [p for p in ("torchsort", "diffsort") if importlib.util.find_spec(p)]
    if "torchsort" in peers:
        ratio = {(r["method"], r["n"]): r["ratio"] for r in out["ratios"]}
        assert ratio["soft_rank (native)", 16] > 0
    saved = json.loads((tmp_path / "race.json").read_text())
    assert len(saved["rows"]) == len(out["rows"]) and saved["memory"] is None  # --quick: no memory


def test_sweep_quick(tmp_path):
    methods = ["neuralsort", "soft-rank"]
    flags = ["--quick", "--threads", "1", "--no-progress", "--lp_backend", "native"]
    out = bench_sort.main([*flags, "--methods", *methods, "--out", str(tmp_path)])
    assert {r["method"] for r in out["records"] if r["status"] == "ok"} == set(methods)
    assert (tmp_path / "bench_sort.png").is_file()
