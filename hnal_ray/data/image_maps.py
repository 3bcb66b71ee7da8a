"""Cached inputs of the image encoder's last stage, for models that train that stage.

With frozen pooled features only the projection heads learn, so images the frozen encoder maps to
nearly the same vector stay inseparable whatever is annotated. A model with
`train.model.image_block_rank > 0` also trains a low-rank update of EfficientNet-Lite0's last stage
(the 1x1 conv_head, BN and ReLU6 before the average pool). Its input, the 7x7x320 activations of
the last MBConv block, does not change during training, so it is computed once per feature folder
and kept here:

  FEATURES/image_maps/ids.npy          (n,) int64 image ids, sorted (the feature tables' order)
  FEATURES/image_maps/maps.npy         (n, 49, 320) float16, one row per 7x7 position
  FEATURES/image_maps/last_stage.pt    the frozen stage: weight (1280, 320), scale, shift (1280,)
  FEATURES/image_maps/meta.json        the feature folder's cache key they were made for

Written to a temporary folder and renamed when complete; skipped when meta.json matches.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from hnal_ray.config import ConfigError
from hnal_ray.data.contract import image_column, is_precomputed
from hnal_ray.data.encoders import MAP_CHANNELS, MAP_POSITIONS, EncoderConfig
from hnal_ray.data.images import ImageError
from hnal_ray.io import InputError, write_json

log = logging.getLogger(__name__)

MAPS_DIR = "image_maps"


def _feature_key(feature_dir: Path) -> str:
    meta = feature_dir / "meta.json"
    if not meta.is_file():
        raise InputError(f"{feature_dir}: no meta.json: extract the features first (hnal features)")
    return json.loads(meta.read_text())["cache_key"]


def extract_image_maps(data_dir: str | Path, feature_dir: str | Path, encoders: EncoderConfig = EncoderConfig(),
                       threads: int | None = None, chunk: int = 256) -> dict:
    """FEATURES/image_maps/ for every image of DATA/images.parquet, streamed in chunks (memory is
    one chunk of decoded images plus the float16 output, written through a memory map)."""
    data_dir, feature_dir = Path(data_dir), Path(feature_dir)
    if is_precomputed(data_dir):
        raise ConfigError(f"train.model.image_block_rank needs the images, but {data_dir} holds precomputed "
                          f"embeddings: set it to 0")
    if encoders.image != "efficientnet-lite0":
        raise ConfigError(f"train.model.image_block_rank is built for efficientnet-lite0, not {encoders.image!r}")
    key = _feature_key(feature_dir)
    out = feature_dir / MAPS_DIR
    if (out / "meta.json").is_file() and json.loads((out / "meta.json").read_text()).get("cache_key") == key:
        return json.loads((out / "meta.json").read_text())
    t0 = time.perf_counter()
    source = data_dir / "images.parquet"
    pf = pq.ParquetFile(source)
    column = image_column(pf.schema_arrow)
    ids = pq.read_table(source, columns=["image_id"]).column("image_id").to_numpy()
    order = np.argsort(ids, kind="stable")
    where = np.argsort(order)  # file row -> row in id order
    tmp = out.with_name(f".{MAPS_DIR}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    encoder = encoders.image_encoder("cpu", num_threads=threads)
    maps = np.lib.format.open_memmap(tmp / "maps.npy", mode="w+", dtype=np.float16,
                                     shape=(len(ids), MAP_POSITIONS, MAP_CHANNELS))
    row = 0
    for batch in pf.iter_batches(batch_size=chunk, columns=["image_id", column]):
        images = batch.column(column).to_pylist()
        try:
            maps[where[row:row + len(images)]] = encoder.encode_maps(images)
        except ImageError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise InputError(f"{source}: rows {row}-{row + len(images) - 1}: {exc}") from None
        row += len(images)
    maps.flush()
    del maps
    np.save(tmp / "ids.npy", ids[order].astype(np.int64))
    torch.save(encoder.last_stage(), tmp / "last_stage.pt")
    meta = {"cache_key": key, "images": int(len(ids)), "model_id": encoder.model_id,
            "seconds": time.perf_counter() - t0}
    write_json(meta, tmp / "meta.json")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log.info("image maps: %d images in %.1f s -> %s", len(ids), meta["seconds"], out)
    return meta


def load_image_maps(feature_dir: str | Path, image_ids: np.ndarray) -> np.ndarray:
    """(len(image_ids), 49, 320) float16 maps of these images (memory-mapped when they are all of
    them, in order)."""
    d = Path(feature_dir) / MAPS_DIR
    if not (d / "meta.json").is_file():
        raise InputError(f"{d}: missing: train.model.image_block_rank > 0 needs the image maps "
                         f"(made by the loop's prepare step, or hnal_ray.data.image_maps.extract_image_maps)")
    if json.loads((d / "meta.json").read_text())["cache_key"] != _feature_key(Path(feature_dir)):
        raise InputError(f"{d}: made for other features than {feature_dir}/meta.json: run prepare again")
    ids = np.load(d / "ids.npy")
    maps = np.load(d / "maps.npy", mmap_mode="r")
    if len(ids) == len(image_ids) and np.array_equal(ids, image_ids):
        return maps
    rows = np.searchsorted(ids, image_ids)
    if (rows >= len(ids)).any() or not np.array_equal(ids[np.minimum(rows, len(ids) - 1)], image_ids):
        raise InputError(f"{d}: no maps for some of the images asked for (ids {image_ids[:5].tolist()}...)")
    return np.ascontiguousarray(maps[rows])


def load_last_stage(feature_dir: str | Path) -> dict[str, torch.Tensor]:
    return torch.load(Path(feature_dir) / MAPS_DIR / "last_stage.pt", map_location="cpu", weights_only=True)
