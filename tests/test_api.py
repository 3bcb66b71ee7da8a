"""The public Python API driven with NumPy arrays: same answer as the dense reference and as Parquet
paths, the CLI's validation and errors, outputs kept only when asked."""
import numpy as np
import pyarrow.parquet as pq
import pytest

import hnal_ray
from helpers import dense_run, write_inputs


def arrays(raw, side="image"):
    pool_col = "image_id" if side == "image" else "text_id"
    return ({"image_id": raw["image_ids"], "embedding": raw["image_emb"]},
            {"text_id": raw["text_ids"], "image_id": raw["owner"], "embedding": raw["text_emb"]},
            {pool_col: raw["pool_ids"], "embedding": raw["pool_emb"]})


@pytest.mark.parametrize("side,weight,k", [("image", "surplus", 1), ("image", "counting", 2), ("text", "surplus", 1)])
def test_select_from_arrays_matches_the_dense_reference(tmp_path, side, weight, k):
    _, raw = write_inputs(tmp_path, np.random.default_rng(3), n_pool=60, side=side)
    res = hnal_ray.select(*arrays(raw, side), budget=7, weight=weight, k=k, side=side)
    want_ids, want_scores = dense_run(raw, side, weight, k, 7)
    assert res.ids.tolist() == list(want_ids)
    assert res.selection.column_names == [("image_id" if side == "image" else "text_id"), "score", "rank"]
    assert res.selection["rank"].to_pylist() == list(range(1, 8))
    scores = dict(zip(res.scores.column(0).to_pylist(), res.scores["score"].to_pylist()))
    assert scores.keys() == set(raw["pool_ids"].tolist())
    assert all(scores[i] == pytest.approx(want_scores[i], rel=1e-6, abs=1e-6) for i in scores)
    assert res.summary["counts"]["selected"] == 7


def test_arrays_and_parquet_paths_give_the_same_tables(tmp_path):
    paths, raw = write_inputs(tmp_path / "in", np.random.default_rng(4), n_pool=50)
    from_arrays = hnal_ray.select(*arrays(raw), budget=9, weight="counting", seed=5)
    from_files = hnal_ray.select(str(paths["paired_images"]), paths["paired_texts"], paths["pool"], budget=9,
                                 weight="counting", seed=5, out=tmp_path / "out")
    assert from_arrays.selection.equals(from_files.selection) and from_arrays.scores.equals(from_files.scores)
    assert pq.read_table(tmp_path / "out" / "selection.parquet").equals(from_files.selection)


def test_bad_arrays_get_the_cli_errors_naming_the_argument(tmp_path):
    _, raw = write_inputs(tmp_path, np.random.default_rng(5), n_pool=30)
    images, texts, pool = arrays(raw)
    bad = dict(pool, embedding=pool["embedding"].copy())
    bad["embedding"][4, 2] = np.nan
    with pytest.raises(hnal_ray.InputError, match=r"^pool \(in-memory table\): column 'embedding' row 4"):
        hnal_ray.select(images, texts, bad, budget=3)
    with pytest.raises(hnal_ray.ConfigError, match="--budget must be >= 1"):
        hnal_ray.select(images, texts, pool, budget=0)
    with pytest.raises(hnal_ray.InputError, match="larger than the pool"):
        hnal_ray.select(images, texts, pool, budget=31)
    with pytest.raises(hnal_ray.InputError, match="^pool: expected a Parquet path"):
        hnal_ray.select(images, texts, raw["pool_emb"], budget=3)
    assert not (tmp_path / "out").exists()


def test_the_package_exports_only_the_api_and_loads_lazily():
    import subprocess
    import sys

    code = "import sys, hnal_ray; print(sorted(m for m in ('torch', 'ray') if m in sys.modules)); print(hnal_ray.__all__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0] == "[]"
    assert set(eval(out[1])) == {"select", "run_loop", "load_features", "Selection", "FeatureSet", "InputError",
                                 "ConfigError"}
    with pytest.raises(AttributeError):
        hnal_ray.score_pool  # noqa: B018 (internal names are not exported)


def test_an_in_process_selection_does_not_start_or_import_ray(tmp_path):
    """shards=0 runs in this process: Ray is imported only by a job that asks for actors."""
    import subprocess
    import sys

    paths, _ = write_inputs(tmp_path / "in", np.random.default_rng(6), n_pool=20)
    code = ("import sys, hnal_ray; r = hnal_ray.select(*sys.argv[1:4], 3); "
            "print(len(r.ids), 'ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, *(str(paths[k]) for k in ("paired_images", "paired_texts", "pool"))],
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["3", "False"]
