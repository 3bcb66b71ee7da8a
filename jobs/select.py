"""`ray job submit -- python jobs/select.py ARGS`: the `hnal score` command as a Ray job entry."""
import sys

from hnal_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["score", *sys.argv[1:]]))
