"""Profile the default QP backend (torch-ipm) and the machine's rates for its kernels.

    python tasks/profile_qp.py --threads 1                 # small and dense
    python tasks/profile_qp.py --quick                     # tiny sizes (smoke test)

Writes ``profile.json`` and ``profile.md`` (per size: forward/backward time, iterations, the
operators with the most self time, the kernels' rates and the resulting floor) to ``--out``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tasks.backends.qp_bench import SIZES
from tasks.backends.qp_profile import run
from tasks.common.cli import check_ranges, parse_config, run_main


@dataclass
class ProfileConfig:
    """Where torch-ipm's time goes on the QP sizes of tasks/bench_qp.py."""

    sizes: list[str] = field(
        default_factory=lambda: ["small", "dense"], metadata={"help": f"any of {list(SIZES)}"}
    )
    quick: bool = field(default=False, metadata={"help": "tiny sizes (smoke test)"})
    repeats: int = field(default=5, metadata={"help": "timed runs (medians)"})
    top: int = field(default=12, metadata={"help": "operators listed per size"})
    threads: int = field(default=1, metadata={"help": "torch threads (0: torch's default)"})
    out: str = field(default="results/bench_qp/profile", metadata={"help": "output folder"})

    def validate(self) -> None:
        bad = [s for s in self.sizes if s not in SIZES]
        if bad:
            raise ValueError(f"unknown sizes {bad}; choose from {list(SIZES)}")
        check_ranges(self, at_least={"repeats": 1, "top": 1, "threads": 0})


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run(parse_config(ProfileConfig, argv, description=__doc__.split("\n\n")[0]))


if __name__ == "__main__":
    run_main(main)
