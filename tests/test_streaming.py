"""Streaming reads and shard cutting: every blocked path against a whole-table read, and a job over
shards of any size against the dense single-process reference."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import dense_run, write_inputs
from hnal_ray.api import select
from hnal_ray.data.synthetic import make_example
from hnal_ray.io import InputError, embedding_array, iter_embeddings, read_embeddings, read_rows, row_group_starts
from hnal_ray.score.plan import cut_rows


@pytest.fixture
def table(tmp_path):
    """Three files of 1000-1074 rows in row groups of 128."""
    rng = np.random.default_rng(0)
    for k in range(3):
        n = 1000 + k * 37
        pq.write_table(pa.table({"image_id": np.arange(n) + 10_000 * k,
                                 "embedding": embedding_array(rng.normal(size=(n, 8)))}),
                       tmp_path / f"p{k}.parquet", row_group_size=128)
    return tmp_path


def test_streamed_blocks_equal_the_whole_read(table):
    full = read_embeddings(table, "image_id")
    rng = np.random.default_rng(1)
    for _ in range(30):
        a = int(rng.integers(0, 3111))
        b = int(rng.integers(a + 1, 3112))
        batch = int(rng.integers(1, 700))
        parts = list(iter_embeddings(table, "image_id", start=a, stop=b, batch_rows=batch))
        assert max(len(p.ids) for p in parts) <= batch
        assert np.array_equal(np.concatenate([p.ids for p in parts]), full.ids[a:b])
        assert np.array_equal(np.concatenate([p.emb for p in parts]), full.emb[a:b])


def test_sampled_rows_equal_the_whole_read(table):
    full = read_embeddings(table, "image_id")
    rows = np.sort(np.random.default_rng(2).choice(3111, 200, replace=False))
    got = read_rows(table, "image_id", rows)
    assert np.array_equal(got.ids, full.ids[rows]) and np.array_equal(got.emb, full.emb[rows])


def test_a_bad_row_in_a_streamed_block_names_file_and_row(tmp_path):
    emb = np.ones((300, 4), np.float32)
    emb[211] = np.nan
    pq.write_table(pa.table({"image_id": np.arange(300), "embedding": embedding_array(emb)}),
                   tmp_path / "pool.parquet", row_group_size=64)
    with pytest.raises(InputError, match=r"pool.parquet: column 'embedding' row 211 contains NaN"):
        list(iter_embeddings(tmp_path / "pool.parquet", "image_id", start=150, stop=300, batch_rows=50))


def test_shards_cover_the_table_at_group_boundaries(table):
    starts = row_group_starts(table)
    assert starts[0] == 0 and starts[-1] == 3111
    for shard_rows in (1, 100, 128, 300, 1000, 5000):
        cuts = cut_rows(starts, shard_rows)
        assert cuts[0][0] == 0 and cuts[-1][1] == 3111
        assert all(a < b <= a + shard_rows for a, b in cuts)
        assert all(x[1] == y[0] for x, y in zip(cuts, cuts[1:]))
        if shard_rows >= 128:  # groups fit: every cut is a group boundary
            assert {b for _, b in cuts} <= set(starts.tolist())


def test_example_pool_is_streamed_to_many_files(tmp_path):
    a = make_example(tmp_path / "a", n_images=50, n_pool=1000, n_pool_texts=5, dim=8, file_rows=300)
    b = make_example(tmp_path / "b", n_images=50, n_pool=1000, n_pool_texts=5, dim=8, file_rows=300)
    files = sorted(a["pool_images"].glob("*.parquet"))
    assert [pq.ParquetFile(f).metadata.num_rows for f in files] == [300, 300, 300, 100]
    assert all(f.read_bytes() == (b["pool_images"] / f.name).read_bytes() for f in files)
    ids = read_embeddings(a["pool_images"], "image_id").ids
    assert len(np.unique(ids)) == 1000 and not np.isin(ids, read_embeddings(a["paired_images"], "image_id").ids).any()


@pytest.mark.parametrize("side", ["image", "text"])
def test_any_shard_and_block_size_gives_the_dense_answer(tmp_path, side):
    paths, raw = write_inputs(tmp_path / "in", np.random.default_rng(4), n_pool=60, side=side)
    want_ids, want_scores = dense_run(raw, side, "surplus", 2, 8)
    id_col = "image_id" if side == "image" else "text_id"
    for shard_rows, stream_rows in ((10**6, 65536), (13, 4), (7, 1), (1, 1)):
        res = select(paths["paired_images"], paths["paired_texts"], paths["pool"], 8, side=side, k=2,
                     shard_rows=shard_rows, stream_rows=stream_rows)
        assert res.selection[id_col].to_pylist() == list(want_ids)
        got = dict(zip(res.scores[id_col].to_pylist(), res.scores["score"].to_pylist()))
        assert got == pytest.approx({int(k): v for k, v in want_scores.items()}, rel=1e-6)
        assert len(res.summary["shards"]) == len(cut_rows(row_group_starts(paths["pool"]), shard_rows))


def test_embedding_offsets_switch_to_64_bit_before_they_wrap(tmp_path, monkeypatch):
    """Issue 22 (7): past 2^31 values the embedding column gets 64-bit list offsets (here the limit is
    lowered to 10 values), and the readers take it as any other table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    import hnal_ray.io as hio

    monkeypatch.setattr(hio, "LIST_OFFSET_MAX", 10)
    emb = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)
    col = hio.embedding_array(emb)
    assert pa.types.is_large_list(col.type)
    pq.write_table(pa.table({"image_id": np.arange(6, dtype=np.int64), "embedding": col}), tmp_path / "t.parquet")
    got = hio.read_embeddings(tmp_path / "t.parquet", "image_id")
    assert np.allclose(got.emb, emb / np.linalg.norm(emb, axis=1, keepdims=True))
