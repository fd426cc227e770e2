"""micl.figures and pipelines/figures.py: attention, PCA and kNN-curve pictures of finished runs,
against a real MLflow SQLite store (no Ray)."""

from __future__ import annotations

import importlib.util
import pathlib
import tempfile

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from helpers import sqlite_uri
from mlflow.tracking import MlflowClient
from PIL import Image

from micl.artifacts import export_encoder
from micl.config import Config, ModelConfig
from micl.driver import check
from micl.figures import (
    attention_figure,
    attention_plot,
    cls_attention,
    embedding_figure,
    embedding_plot,
    knn_curves_figure,
    knn_curves_plot,
    metric_history,
    pca_2d,
)
from micl.models import MaskedViT
from micl.tracking import get_or_create_experiment, log_params

ROOT = pathlib.Path(__file__).resolve().parents[1]
FMNIST = pathlib.Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_encoder(seed: int = 0) -> MaskedViT:
    torch.manual_seed(seed)
    enc = MaskedViT(img_size=28, patch_size=7, in_chans=1, embed_dim=32, depth=2, num_heads=2)
    with torch.no_grad():  # break the symmetric init so attention is not near-uniform
        for p in enc.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return enc.eval()


def png_size(path: pathlib.Path) -> tuple[int, int]:
    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


# ----------------------------------------------------------------------------- cls attention


def test_cls_attention_is_a_distribution_over_patches():
    enc = tiny_encoder()
    x = torch.randn(3, 1, 28, 28)
    attn = cls_attention(enc, x)
    assert attn.shape == (3, 16)
    assert (attn >= 0).all()
    assert (attn.sum(-1) < 1).all()


def test_cls_attention_matches_a_hand_computation():
    enc = tiny_encoder()
    x = torch.randn(2, 1, 28, 28)
    last = enc.blocks[-1]
    seen = {}
    hook = last.attn.register_forward_hook(lambda m, args, out: seen.update(h=args[0]))
    with torch.no_grad():
        enc.forward_features(x)  # the encoder's own path up to the last block's norm1
    hook.remove()
    h = seen["h"]  # [N, 1 + L, D]
    w, b = last.attn.qkv.weight, last.attn.qkv.bias  # [3D, D], [3D]
    heads, d = 2, 16
    q = (h @ w[:32].T + b[:32]).view(2, 17, heads, d).transpose(1, 2)  # [N, heads, 1 + L, d]
    k = (h @ w[32:64].T + b[32:64]).view(2, 17, heads, d).transpose(1, 2)
    full = torch.softmax(q @ k.transpose(-2, -1) / d ** 0.5, dim=-1)  # [N, heads, 1+L, 1+L]
    expected = full[:, :, 0, 1:].mean(1)  # [N, L]
    attn = cls_attention(enc, x)
    torch.testing.assert_close(attn, expected, rtol=1e-5, atol=1e-6)
    cls_to_cls = full[:, :, 0, 0].mean(1)
    torch.testing.assert_close(attn.sum(-1) + cls_to_cls, torch.ones(2), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- PCA and figures


def test_pca_2d_recovers_the_top_variance_directions():
    g = torch.Generator().manual_seed(0)
    u, v = torch.linalg.qr(torch.randn(16, 2, generator=g))[0].T  # orthonormal directions [D]
    a, b = 5 * torch.randn(500, 1, generator=g), 2 * torch.randn(500, 1, generator=g)
    feats = a * u + b * v + 0.05 * torch.randn(500, 16, generator=g) + 3.0  # [N, D], offset
    xy = pca_2d(feats)
    assert xy.shape == (500, 2)
    assert abs(torch.corrcoef(torch.stack([xy[:, 0], a[:, 0]]))[0, 1]) > 0.999
    assert abs(torch.corrcoef(torch.stack([xy[:, 1], b[:, 0]]))[0, 1]) > 0.99
    assert xy.mean(0).abs().max() < 1e-3  # centred


def test_figures_write_pngs(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 28, 28, 1), dtype=np.uint8)
    attn = torch.softmax(torch.randn(4, 16), -1)
    w, h = png_size(attention_figure(images, attn, 7, tmp_path / "attn.png"))
    assert w > 0 and h > 0
    rgb = rng.integers(0, 256, (2, 28, 28, 3), dtype=np.uint8)
    assert png_size(attention_figure(rgb, attn[:2], 7, tmp_path / "attn_rgb.png"))[0] > 0
    feats, labels = torch.randn(60, 8), torch.arange(60) % 3
    assert png_size(embedding_figure(feats, labels, ["a", "b", "c"], tmp_path / "emb.png",
                                     "test"))[0] > 0
    curves = {"micl": [(0, 0.6), (1, 0.7), (2, 0.75)], "mae": [(0, 0.5), (2, 0.68)]}
    assert png_size(knn_curves_figure(curves, tmp_path / "knn.png", "kNN",
                                      {"raw pixels": 0.846, "random init": 0.65}))[0] > 0


def test_the_plots_draw_what_they_are_given():
    """Not only PNGs: the curves, baselines, PCA points and attention maps are the inputs."""
    curves = {"micl": [(0, 0.6), (1, 0.7), (2, 0.75)], "mae": [(0, 0.5), (2, 0.68)]}
    fig = knn_curves_plot(curves, "kNN", {"raw pixels": 0.846})
    lines = fig.axes[0].lines
    for line, (label, points) in zip(lines, curves.items(), strict=False):
        assert line.get_label() == label
        assert list(zip(line.get_xdata(), line.get_ydata(), strict=True)) == points
    assert list(lines[2].get_ydata()) == [0.846, 0.846] and lines[2].get_linestyle() == "--"
    plt.close(fig)

    feats, labels = torch.randn(60, 8), torch.arange(60) % 3
    fig = embedding_plot(feats, labels, ["a", "b", "c"], "test")
    xy = pca_2d(feats).numpy()
    for c, points in enumerate(fig.axes[0].collections):
        np.testing.assert_allclose(points.get_offsets(), xy[labels.numpy() == c], rtol=1e-6)
    plt.close(fig)

    images = np.zeros((2, 8, 8, 1), np.uint8)
    attn = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]])  # 2 x 2 patches of 4 px
    fig = attention_plot(images, attn, 4)
    heat = fig.axes[2].images[1].get_array()  # column 0, bottom row: the attention overlay
    assert heat.shape == (8, 8)
    np.testing.assert_allclose(heat[::4, ::4], [[0.25, 0.5], [0.75, 1.0]], rtol=1e-6)
    plt.close(fig)


# ----------------------------------------------------------------------------- MLflow


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    tmp = tmp_path_factory.mktemp("mlflow")
    return sqlite_uri(tmp / 'mlflow.db')


def test_metric_history_is_sorted_by_step(store):
    client = MlflowClient(store)
    run = client.create_run(get_or_create_experiment(store, "figures-test"))
    for step, value in ((2, 0.7), (1, 0.6), (3, 0.8)):
        client.log_metric(run.info.run_id, "knn_top1", value, step=step)
    assert metric_history(run.info.run_id, "knn_top1", store) == [(1, 0.6), (2, 0.7), (3, 0.8)]
    assert metric_history(run.info.run_id, "missing", store) == []


def fake_training_run(store: str, cfg: Config, name: str) -> str:
    """A run laid out as micl.train leaves it: flattened config params (checked, so with every
    method field), encoder/ artifacts (micl.artifacts.export_encoder's two files) and a knn_top1
    metric per epoch."""
    client = MlflowClient(store)
    run_id = client.create_run(get_or_create_experiment(store, "figures-test"),
                               run_name=name).info.run_id
    log_params(client, run_id, check(cfg).flat())
    with tempfile.TemporaryDirectory() as d:
        export_encoder(tiny_encoder(), cfg.model, d)
        client.log_artifacts(run_id, d, "encoder")
    for epoch, knn in enumerate((0.55, 0.62, 0.66)):
        client.log_metric(run_id, "knn_top1", knn, step=epoch)
    client.set_terminated(run_id)
    return run_id


def tiny_config(**data) -> Config:
    cfg = Config()
    cfg.model = ModelConfig(name="vit_tiny", img_size=28, patch_size=7, in_chans=1,
                            embed_dim=32, depth=2, num_heads=2)
    cfg.method.args["mask_ratio"] = 0.25  # 16 patches: MiCL's default 0.9 leaves none per view
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg


def figures_cli():
    spec = importlib.util.spec_from_file_location("figures_cli", ROOT / "pipelines/figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not FMNIST.is_dir(), reason=f"no Fashion-MNIST at {FMNIST}")
def test_cli_makes_and_logs_the_figures_of_a_run(store, tmp_path, capsys):
    run_id = fake_training_run(store, tiny_config(path=str(FMNIST)), "micl-tiny")
    out = tmp_path / "figs"
    rc = figures_cli().main(["--run-id", run_id, "--tracking-uri", store, "--out", str(out),
                             "--num-images", "4", "--num-embed", "300",
                             "--baseline", "raw pixels=0.846"])
    assert rc == 0
    printed = capsys.readouterr().out
    names = ["attention_micl-tiny.png", "embedding_micl-tiny.png", "knn_curves.png"]
    for name in names:
        png_size(out / name)
        assert str((out / name).resolve()) in printed
    logged = {f.path for f in MlflowClient(store).list_artifacts(run_id, "figures")}
    assert logged == {f"figures/{n}" for n in names}


def test_cli_fails_in_one_line_for_unknown_runs_and_other_sources(store, tmp_path, capsys):
    cli = figures_cli()
    assert cli.main(["--run-id", "0" * 32, "--tracking-uri", store, "--out",
                     str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not found" in err and "Traceback" not in err
    run_id = fake_training_run(store, tiny_config(source="synthetic"), "synthetic-run")
    assert cli.main(["--run-id", run_id, "--tracking-uri", store, "--out", str(tmp_path),
                     "--no-log"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "only Fashion-MNIST" in err
    assert not list(tmp_path.glob("*.png"))
