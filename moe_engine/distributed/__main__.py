"""``torchrun --nproc-per-node N -m moe_engine.distributed [options]``: one expert-parallel rank of generate."""

from __future__ import annotations

import argparse
import sys

from moe_engine.distributed.launch import add_arguments, run_rank


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moe_engine.distributed", description=__doc__)
    add_arguments(p)
    return run_rank(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
