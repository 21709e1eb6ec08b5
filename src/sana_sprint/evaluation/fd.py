"""FD_shapes: Frechet distance in the feature space of a small CNN trained on the shapes world.

Inception weights cannot be downloaded here, so FID's feature network is replaced by one trained
to read what matters in this world (per class x colour object counts and where objects are); its
128-d penultimate activations play the role of Inception's pool features. The distance itself is
FID's (Heusel et al. 2017): FD = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), in float64.

``ShapesFeatureNet`` is also a valid ``feature=`` module for torchmetrics'
``FrechetInceptionDistance`` (it has ``num_features`` and takes uint8 [0, 255] or float [0, 1]
NCHW images, the two conventions torchmetrics passes through unchanged to custom modules).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

FEATURE_DIM = 128
NET_SIZE = 64  # the net sees 64x64 images; other sizes are resized (antialiased) first
REFERENCE_SEED = 4242  # world seed of the reference set; not used to train the net or the VAE
DEFAULT_NET_DIR = Path(__file__).resolve().parents[3] / "models" / "shapes-fd"
NET_ENV = "SANA_SPRINT_FD_NET"  # override the weights folder


# ----------------------------------------------------------------------------- network
class ShapesFeatureNet(nn.Module):
    """Strided conv trunk -> 4x4 map -> [flatten (keeps *where*), global mean (eases counting)]
    -> 128-d features -> heads.

    ``forward`` returns the features (for FD); ``heads`` maps features to training targets.
    """

    def __init__(self, width: int = 32, feature_dim: int = FEATURE_DIM, num_outputs: int = 0):
        super().__init__()
        w = width
        act = nn.SiLU

        def block(cin, cout, stride):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), act())

        self.trunk = nn.Sequential(
            block(3, w, 1),  # 64
            block(w, w, 2),  # 32
            block(w, 2 * w, 2),  # 16
            block(2 * w, 2 * w, 1),
            block(2 * w, 4 * w, 2),  # 8
            block(4 * w, 4 * w, 1),
            block(4 * w, 2 * w, 2),  # 4
        )
        self.proj = nn.Linear(2 * w * 17, feature_dim)
        self.heads = nn.Linear(feature_dim, num_outputs) if num_outputs else nn.Identity()
        self.config = {"width": width, "feature_dim": feature_dim, "num_outputs": num_outputs}

    @property
    def num_features(self) -> int:
        return self.config["feature_dim"]

    def features_from_unit(self, x: torch.Tensor) -> torch.Tensor:
        """x: float [N, 3, H, W] in [-1, 1] -> [N, feature_dim] float32."""
        if x.shape[-2:] != (NET_SIZE, NET_SIZE):
            x = F.interpolate(x, size=(NET_SIZE, NET_SIZE), mode="bilinear", antialias=True, align_corners=False)
        h = self.trunk(x)
        return F.silu(self.proj(torch.cat([h.flatten(1), h.mean((2, 3))], 1)))

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 3, H, W] in [0, 255] or float in [0, 1] (torchmetrics' conventions)."""
        dtype = self.proj.weight.dtype  # follows torchmetrics' set_dtype
        x = imgs.to(dtype) / 255.0 if imgs.dtype == torch.uint8 else imgs.to(dtype)
        return self.features_from_unit(x * 2.0 - 1.0)


def save_feature_net(net: ShapesFeatureNet, out_dir, extra: dict | None = None,
                     dtype: torch.dtype = torch.float16) -> Path:
    """safetensors (fp16 by default: half the size; features are computed in fp32 after loading)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(dtype).contiguous() for k, v in net.state_dict().items()}
    save_file(tensors, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({**net.config, **(extra or {})}, indent=2))
    return out


def load_feature_net(path=None) -> ShapesFeatureNet:
    """Load the shipped net (``models/shapes-fd`` or ``$SANA_SPRINT_FD_NET``), eval mode, no grads."""
    from safetensors.torch import load_file

    path = Path(path or os.environ.get(NET_ENV) or DEFAULT_NET_DIR)
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(f"no FD_shapes feature net at {path} (train one with scripts/train_fd_net.py)")
    cfg = json.loads((path / "config.json").read_text())
    net = ShapesFeatureNet(cfg["width"], cfg["feature_dim"], cfg.get("num_outputs", 0))
    net.load_state_dict({k: v.float() for k, v in load_file(str(path / "model.safetensors")).items()})
    return net.eval().requires_grad_(False)


@functools.lru_cache(maxsize=2)
def _default_net(path: str | None) -> ShapesFeatureNet:
    return load_feature_net(path)


def net_digest(net: ShapesFeatureNet) -> str:
    h = hashlib.sha1()
    for k, v in sorted(net.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().numpy().tobytes())
    return h.hexdigest()[:12]


# ----------------------------------------------------------------------------- images
def to_uint8_nchw(images) -> torch.Tensor:
    """Canonical input: uint8 [N, 3, H, W].

    Accepts a list of / stacked uint8 HxWx3 numpy images, a uint8 NCHW tensor, or a float NCHW
    tensor in [-1, 1] (the project's image convention; rounded like a saved PNG would be).
    """
    if isinstance(images, (list, tuple)):
        images = np.stack([np.asarray(im) for im in images])
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError("numpy images must be uint8 [N, H, W, 3]")
        return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()
    if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError("tensor images must be [N, 3, H, W]")
    if images.dtype == torch.uint8:
        return images
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


@torch.no_grad()
def extract_features(images, net: ShapesFeatureNet | None = None, batch: int = 250) -> np.ndarray:
    """[N, feature_dim] float64 features of images (any format ``to_uint8_nchw`` accepts)."""
    net = net if net is not None else _default_net(None)
    x = to_uint8_nchw(images)
    out = [net(x[i:i + batch]).double() for i in range(0, len(x), batch)]
    return torch.cat(out).numpy()


# ----------------------------------------------------------------------------- math
def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (float64), as FID implementations use."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError("need [N >= 2, D] features")
    return f.mean(0), np.cov(f, rowvar=False)


def _sym_sqrt(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)) for Gaussians, in float64.

    tr((S1 S2)^(1/2)) = tr((S1^(1/2) S2 S1^(1/2))^(1/2)): the inner matrix is symmetric PSD, so
    symmetric eigendecompositions suffice (no complex parts from a non-symmetric sqrtm).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    r1 = _sym_sqrt(s1)
    inner = r1 @ s2 @ r1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


# ----------------------------------------------------------------------------- API
def world_images(n: int, seed: int, size: int = 64, start: int = 0) -> np.ndarray:
    """uint8 [n, size, size, 3] ground-truth world renders."""
    from sana_sprint.data.shapes import ShapesWorld

    world = ShapesWorld(size)
    return np.stack([world.sample(seed, start + i).image for i in range(n)])


def fd_shapes(images_a, images_b, net: ShapesFeatureNet | None = None) -> float:
    """FD_shapes between two image sets (each: anything ``to_uint8_nchw`` accepts)."""
    fa, fb = extract_features(images_a, net), extract_features(images_b, net)
    return frechet_distance(*feature_stats(fa), *feature_stats(fb))


def reference_stats(n: int = 2000, seed: int = REFERENCE_SEED, size: int = 64,
                    net: ShapesFeatureNet | None = None, cache_dir=None) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of ``n`` ground-truth renders; cached as ``.npz`` in ``cache_dir`` if given
    (keyed by n, seed, size and a digest of the net's weights, so a retrained net never reuses stale stats)."""
    net = net if net is not None else _default_net(None)
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"fd_ref_n{n}_s{seed}_{size}px_{net_digest(net)}.npz"
        if path.exists():
            d = np.load(path)
            return d["mu"], d["sigma"]
    mu, sigma = feature_stats(extract_features(world_images(n, seed, size), net))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, mu=mu, sigma=sigma)
        os.replace(tmp, path)
    return mu, sigma


def fd_to_reference(images, n_ref: int = 2000, seed: int = REFERENCE_SEED,
                    net: ShapesFeatureNet | None = None, cache_dir=None) -> float:
    """FD_shapes of generated images against the fixed ground-truth reference set (at their size)."""
    x = to_uint8_nchw(images)
    mu_r, s_r = reference_stats(n_ref, seed, x.shape[-1], net, cache_dir)
    return frechet_distance(*feature_stats(extract_features(x, net)), mu_r, s_r)


def shapes_fid_metric(net: ShapesFeatureNet | None = None):
    """torchmetrics ``FrechetInceptionDistance`` on FD_shapes features (pass uint8 images, or
    float [0, 1] images with ``normalize=True`` semantics)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    return FrechetInceptionDistance(feature=net if net is not None else load_feature_net(), normalize=True)
