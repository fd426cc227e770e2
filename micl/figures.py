"""Pictures of what a pre-trained encoder learned (issue 9), made from finished MLflow runs.

    attn = cls_attention(encoder, normalize(x, mean, std))   # [N, L]
    attention_figure(images, attn, patch, "attention.png")
    embedding_figure(feats, labels, class_names, "embedding.png", "MiCL r=0.9")
    knn_curves_figure({"micl": metric_history(run_id, "knn_top1", uri)}, "knn.png", "kNN")

`make_run_figures` does all three for a list of runs (pipelines/figures.py is its CLI). Test
images are read straight from the IDX files, without Ray, so a figure costs seconds.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from micl.artifacts import load_encoder  # noqa: E402
from micl.config import Config, ConfigError  # noqa: E402
from micl.data.sources import FASHION_MNIST_CLASSES, read_fashion_mnist  # noqa: E402
from micl.data.transforms import center_resize, normalize  # noqa: E402
from micl.models.vit import MaskedViT  # noqa: E402

# ----------------------------------------------------------------------------- computations


@torch.no_grad()
def cls_attention(encoder: MaskedViT, images: torch.Tensor) -> torch.Tensor:
    """Last block's attention of the cls query over the L patch tokens, mean over heads.

    images: normalised [N, C, H, W], the whole image (no mask) -> [N, L]. Rows sum to 1 minus
    the cls->cls weight. timm's fused attention never materialises the weights, so the last
    block's q and k are recomputed from its norm1 input (nothing in timm is patched).
    """
    x = encoder.embed_patches(images)  # [N, L, D]
    x = torch.cat([encoder.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # [N, 1 + L, D]
    for block in encoder.blocks[:-1]:
        x = block(x)
    attn = encoder.blocks[-1].attn
    h = encoder.blocks[-1].norm1(x)
    n, t, _ = h.shape
    qkv = attn.qkv(h).reshape(n, t, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])  # [N, heads, 1 + L, d]
    w = (q[:, :, :1] * attn.scale @ k.transpose(-2, -1)).softmax(dim=-1)  # [N, heads, 1, 1 + L]
    return w[:, :, 0, 1:].mean(dim=1)  # [N, L]


def pca_2d(feats: torch.Tensor) -> torch.Tensor:
    """feats: [N, D] -> coordinates on the top two principal axes [N, 2] (exact SVD of the
    centred features: deterministic, unlike torch.pca_lowrank, and cheap at D <= 1024)."""
    x = feats.float() - feats.float().mean(dim=0, keepdim=True)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)  # vh: [min(N, D), D]
    return x @ vh[:2].T


@torch.no_grad()
def cls_features(encoder: MaskedViT, images: torch.Tensor, batch_size: int = 256
                 ) -> torch.Tensor:
    """L2-normalised cls features [N, D] of normalised images [N, C, H, W] (the kNN's view)."""
    return torch.cat([F.normalize(encoder(b).float(), dim=-1)
                      for b in images.split(batch_size)])


def metric_history(run_id: str, metric: str, tracking_uri: str) -> list[tuple[int, float]]:
    """(step, value) of one metric of a run, by step (steps are epochs here). A step logged
    twice (a resumed run repeats its last epoch) keeps its latest value."""
    from mlflow.tracking import MlflowClient

    history = MlflowClient(tracking_uri).get_metric_history(run_id, metric)
    latest = {m.step: m.value for m in sorted(history, key=lambda m: (m.step, m.timestamp))}
    return sorted(latest.items())


# ----------------------------------------------------------------------------- figures


def _gray_or_rgb(image: np.ndarray) -> np.ndarray:
    return image[..., 0] if image.shape[-1] == 1 else image  # [H, W, 1] -> [H, W]


def _save(fig: Any, path: str | Path) -> Path:
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def attention_figure(images_uint8: np.ndarray, attn: torch.Tensor | np.ndarray, patch: int,
                     path: str | Path) -> Path:
    """`attention_plot` as a PNG at `path`."""
    return _save(attention_plot(images_uint8, attn, patch), path)


def attention_plot(images_uint8: np.ndarray, attn: torch.Tensor | np.ndarray, patch: int
                   ) -> Any:
    """One column per image: the image on top, its cls attention (one value per patch, each
    image scaled to its own max) over a faded copy of it below. A pyplot Figure (close it).

    images_uint8: [N, H, W, C]; attn: [N, L] with L = (H / patch) * (W / patch).
    """
    attn = torch.as_tensor(attn).float().cpu().numpy()
    n, h, w = images_uint8.shape[:3]
    grid = attn.reshape(n, h // patch, w // patch)  # [N, H / p, W / p]
    heat = grid.repeat(patch, axis=1).repeat(patch, axis=2)  # [N, H, W], nearest per patch
    fig, axes = plt.subplots(2, n, figsize=(1.6 * n, 3.4), squeeze=False)
    for i in range(n):
        img = _gray_or_rgb(images_uint8[i])
        axes[0, i].imshow(img, cmap="gray", vmin=0, vmax=255)
        axes[1, i].imshow(img, cmap="gray", vmin=0, vmax=255, alpha=0.5)
        axes[1, i].imshow(heat[i] / max(heat[i].max(), 1e-12), cmap="inferno", vmin=0, vmax=1,
                          alpha=0.6, interpolation="nearest")
        for ax in axes[:, i]:
            ax.set_axis_off()
    axes[0, 0].set_title("image", fontsize=8, loc="left")
    axes[1, 0].set_title("cls attention", fontsize=8, loc="left")
    fig.tight_layout()
    return fig


def embedding_figure(feats: torch.Tensor, labels: torch.Tensor | np.ndarray,
                     class_names: Sequence[str], path: str | Path, title: str) -> Path:
    """`embedding_plot` as a PNG at `path`."""
    return _save(embedding_plot(feats, labels, class_names, title), path)


def embedding_plot(feats: torch.Tensor, labels: torch.Tensor | np.ndarray,
                   class_names: Sequence[str], title: str) -> Any:
    """2-D PCA of features [N, D], one colour per class (labels [N]), class names in a legend.
    A linear projection: clusters seen here are also there for a linear probe. A pyplot
    Figure (close it)."""
    xy = pca_2d(torch.as_tensor(feats)).numpy()  # [N, 2]
    labels = np.asarray(torch.as_tensor(labels).cpu())
    cmap = plt.get_cmap("tab10" if len(class_names) <= 10 else "tab20")
    fig, ax = plt.subplots(figsize=(6.5, 5))
    for c, name in enumerate(class_names):
        sel = labels == c
        if sel.any():
            ax.scatter(xy[sel, 0], xy[sel, 1], s=4, alpha=0.6, color=cmap(c % cmap.N),
                       label=name, rasterized=True)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, markerscale=3, loc="center left", bbox_to_anchor=(1.0, 0.5),
              frameon=False)
    fig.tight_layout()
    return fig


def knn_curves_figure(curves: dict[str, list[tuple[int, float]]], path: str | Path, title: str,
                      baselines: dict[str, float] | None = None) -> Path:
    """`knn_curves_plot` as a PNG at `path`."""
    return _save(knn_curves_plot(curves, title, baselines), path)


def knn_curves_plot(curves: dict[str, list[tuple[int, float]]], title: str,
                    baselines: dict[str, float] | None = None) -> Any:
    """kNN top-1 against epoch, one line per run (the dict key is its label), the last value
    written at its end; baselines (raw pixels, random init, ...) as dashed horizontal lines.
    A pyplot Figure (close it)."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, points in curves.items():
        if not points:
            continue
        steps, values = zip(*points, strict=True)
        line, = ax.plot(steps, values, marker="o", markersize=3, label=label)
        ax.annotate(f"{values[-1]:.3f}", (steps[-1], values[-1]), textcoords="offset points",
                    xytext=(4, 2), fontsize=8, color=line.get_color())
    for i, (name, value) in enumerate((baselines or {}).items()):
        ax.axhline(value, linestyle="--", linewidth=1, color=f"C{7 + i % 3}",
                   label=f"{name} ({value:.3f})")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.margins(x=0.08)  # room for the last value's label
    ax.set_xlabel("epoch")
    ax.set_ylabel("kNN top-1")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- from runs


def read_test_images(cfg: Config, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first n Fashion-MNIST test images as the model sees them, uint8 [n, S, S, C]
    (S = model.img_size, centre-resized as the eval stream does), and their labels [n].
    Read from the IDX files directly: no Ray for a few thousand 28x28 images."""

    if cfg.data.source != "fashion_mnist":
        raise ConfigError(f"config error: data.source = {cfg.data.source!r}: figures support "
                          "only Fashion-MNIST (IDX) sources for now")
    images, labels = read_fashion_mnist(cfg.data.path, "test")
    images, labels = images[:n], labels[:n]  # [n, 28, 28], [n]
    size, chans = cfg.model.img_size, cfg.model.in_chans
    if images.shape[1:3] != (size, size):
        images = np.stack([center_resize(img, size) for img in images])
    images = images.reshape(*images.shape[:3], -1)  # [n, S, S, 1]
    return np.repeat(images, chans // images.shape[-1], axis=-1), labels.astype(np.int64)


@dataclass
class RunFigures:
    run_id: str
    label: str
    paths: list[Path] = field(default_factory=list)


def _file_label(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_") or "run"


def make_run_figures(run_ids: Sequence[str], labels: Sequence[str] | None, tracking_uri: str,
                     out: str | Path, num_images: int = 8, num_embed: int = 5000,
                     log: bool = True, baselines: dict[str, float] | None = None
                     ) -> tuple[list[RunFigures], Path | None]:
    """attention_<label>.png and embedding_<label>.png per run and one knn_curves.png over all
    runs (those with a knn_top1 history) in `out`; with log, each run gets its own PNGs and the
    shared curves under its `figures/` artifacts. Labels default to the MLflow run names.

    Raises ConfigError (one line) for an unknown run or a source other than Fashion-MNIST,
    before any file is written.
    """
    if labels and len(labels) != len(run_ids):
        raise ConfigError(f"config error: {len(labels)} labels for {len(run_ids)} runs")
    client = MlflowClient(tracking_uri)
    loaded = _load_encoders(_fashion_mnist_runs(client, run_ids, tracking_uri), labels,
                            tracking_uri)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    curves = {}
    for enc, rf in loaded:
        rf.paths += _encoder_figures(enc, rf.label, out, num_images, num_embed)
        history = metric_history(rf.run_id, "knn_top1", tracking_uri)
        if history:
            curves[rf.label] = history
    knn_path = None
    if curves:
        knn_path = knn_curves_figure(curves, out / "knn_curves.png", "kNN top-1 (test split)",
                                     baselines)
    for _, rf in loaded:
        if knn_path is not None:
            rf.paths.append(knn_path)
        if log:
            for p in rf.paths:
                client.log_artifact(rf.run_id, str(p), "figures")
    return [rf for _, rf in loaded], knn_path


def _fashion_mnist_runs(client: MlflowClient, run_ids: Sequence[str], tracking_uri: str
                        ) -> list:
    """Every run, checked before any encoder is downloaded."""
    runs = []
    for run_id in run_ids:
        try:
            run = client.get_run(run_id)
        except MlflowException:
            raise ConfigError(f"config error: MLflow run {run_id!r} not found in "
                              f"{tracking_uri}") from None
        source = run.data.params.get("data.source")
        if source != "fashion_mnist":
            raise ConfigError(f"config error: run {run_id}: data.source = {source!r}; figures "
                              "support only Fashion-MNIST (IDX) sources for now")
        runs.append(run)
    return runs


def _load_encoders(runs: list, labels: Sequence[str] | None, tracking_uri: str) -> list:
    loaded = []
    for i, run in enumerate(runs):
        run_id = run.info.run_id
        label = labels[i] if labels else run.info.run_name or run_id[:8]
        enc = load_encoder(run_id=run_id, tracking_uri=tracking_uri)
        if enc.config is None:  # params that this version cannot read back into a Config
            raise ConfigError(f"config error: run {run_id}: its params do not parse as a config "
                              "(normalisation statistics unknown)")
        loaded.append((enc, RunFigures(run_id, label)))
    return loaded


def _encoder_figures(enc, label: str, out: Path, num_images: int, num_embed: int
                     ) -> list[Path]:
    """The cls-attention maps and the PCA embedding of one encoder on test images."""
    cfg, name = enc.config, _file_label(label)
    images, classes = read_test_images(cfg, max(num_images, num_embed))  # [n, S, S, C]
    x = normalize(torch.from_numpy(images).permute(0, 3, 1, 2), cfg.data.mean,
                  cfg.data.std)  # [n, C, S, S]
    attn = cls_attention(enc.encoder, x[:num_images])  # [num_images, L]
    feats = cls_features(enc.encoder, x[:num_embed])  # [num_embed, D]
    return [attention_figure(images[:num_images], attn, cfg.model.patch_size,
                             out / f"attention_{name}.png"),
            embedding_figure(feats, classes[:num_embed], FASHION_MNIST_CLASSES,
                             out / f"embedding_{name}.png",
                             f"{label}: PCA of cls features ({len(feats)} test images)")]
