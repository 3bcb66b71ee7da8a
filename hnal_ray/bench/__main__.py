"""`python -m hnal_ray.bench score ...`, the same as `hnal bench score ...`."""
import argparse
import logging
import sys

from hnal_ray.bench.cli import add_bench_parser

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    parser = argparse.ArgumentParser(prog="hnal")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *sys.argv[1:]])
    sys.exit(args.func(args))
