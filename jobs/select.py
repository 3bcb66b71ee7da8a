"""`ray job submit -- python jobs/select.py ARGS`: the `hnal score` command as a Ray job entry."""
import os
import sys

# This file's name shadows the standard library's `select` module for everything imported after
# it (Python puts the script's folder first on sys.path), so take that folder off the path.
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != _here]

from hnal_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["score", *sys.argv[1:]]))
