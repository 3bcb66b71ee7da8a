"""`ray job submit -- python jobs/al_loop.py CONFIG --out DIR`: the active-learning loop as a Ray job."""
import sys

from hnal_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["loop", *sys.argv[1:]]))
