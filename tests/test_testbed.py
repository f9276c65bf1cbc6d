"""The bundled testbed: data loader, checkpoints, training resume, and the shipped weights."""

import gzip
import json
import math
import os

import numpy as np
import pytest
import torch

from harmonica import evaluate as ev
from harmonica import testbed as tb
from harmonica.testbed import checkpoint as ckpt
from harmonica.testbed import data


# ---------------------------------------------------------------------------------------------- data

def test_loader_shapes_and_range():
    images, labels = data.load_split("test")
    assert images.dtype == np.uint8 and images.shape == (10000, 28, 28)
    assert labels.dtype == np.uint8 and labels.shape == (10000,)
    assert np.bincount(labels).tolist() == [1000] * 10
    x, y = data.load_tensors("test")
    assert x.shape == (10000, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min().item() == -1.0 and x.max().item() == 1.0
    train_images, _ = data.load_split("train")
    assert train_images.shape == (60000, 28, 28)


def _write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_loader_reads_idx_from_env_dir(tmp_path, monkeypatch):
    imgs = np.arange(3 * 28 * 28).reshape(3, 28, 28) % 256
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", imgs)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([7, 0, 9]))
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path))
    images, labels = data.load_split("test")
    np.testing.assert_array_equal(images, imgs.astype(np.uint8))
    assert labels.tolist() == [7, 0, 9]
    x = data.to_tensor(images)
    assert x[0, 0, 0, 0].item() == -1.0
    assert x[0, 0, 9, 3].item() == pytest.approx((9 * 28 + 3) % 256 / 127.5 - 1)


def test_missing_data_names_the_debian_package(tmp_path, monkeypatch):
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        data.load_split("train")


def test_corrupt_idx_is_rejected(tmp_path, monkeypatch):
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((2, 28, 28)))
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 0x08, 1]) + (5).to_bytes(4, "big") + bytes(3))
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path))
    with pytest.raises(ValueError, match="promises 5 bytes"):
        data.load_split("test")


# ------------------------------------------------------------------------------------- checkpoints

def test_checkpoint_roundtrip_with_optimizer_state(tmp_path):
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    tensors, meta = ckpt.pack_optimizer(opt)
    path = tmp_path / "c.safetensors"
    ckpt.atomic_save({**ckpt.prefixed(model.state_dict(), "m."), **tensors}, {"optimizer": meta, "step": 1}, path)
    assert os.listdir(tmp_path) == ["c.safetensors"]  # no temp file left behind
    loaded, loaded_meta = ckpt.load(path)
    assert loaded_meta["step"] == 1
    model2 = torch.nn.Linear(4, 3)
    model2.load_state_dict(ckpt.unprefixed(loaded, "m."))
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
    ckpt.unpack_optimizer(opt2, loaded, loaded_meta["optimizer"])
    for a, b in zip(opt.state.values(), opt2.state.values()):
        for k in a:
            torch.testing.assert_close(torch.as_tensor(a[k]), torch.as_tensor(b[k]), rtol=0, atol=0)


def test_dit_training_resume_is_exact(tmp_path):
    from harmonica.testbed.train import build_parser, train_dit

    def run(run_dir, steps):
        args = build_parser().parse_args(["--run-dir", str(run_dir), "--dit-steps", str(steps),
                                          "--batch-size", "4", "--warmup", "2", "--log-every", "1"])
        return train_dit(args)

    run(tmp_path / "a", 1)
    resumed, _ = ckpt.load(run(tmp_path / "a", 2))
    straight, meta = ckpt.load(run(tmp_path / "b", 2))
    assert meta["step"] == 2 and resumed.keys() == straight.keys()
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], rtol=0, atol=0, msg=k)


def test_dit_run_with_held_out_evaluation_writes_best_weights_and_curves(tmp_path):
    """A short run with evaluations and --out: the files a remote (GPU) run brings back, and the
    export from them that the bundled weights go through."""
    from harmonica.testbed import curves
    from harmonica.testbed.train import export_dit, load_exported_weights, main

    out = tmp_path / "out"
    main(["--what", "dit", "--run-dir", str(tmp_path / "run"), "--dit-steps", "3", "--batch-size", "4",
          "--warmup", "2", "--log-every", "1", "--eval-every", "2", "--eval-samples", "8",
          "--eval-loss-images", "8", "--final-guidance", "2", "--out", str(out)])
    doc = curves.load(out / "dit_L8-d128-p4_curves.json")
    # Evaluated at step 2 and, since training stopped between intervals, at the last step.
    assert [e["step"] for e in doc["evals"]] == [2, 3]
    assert [r["step"] for r in doc["train"]] == [1, 2, 3]
    for key in ("test_loss", "fid_fmnist", "accuracy", "accuracy_rel", "precision", "recall"):
        assert all(math.isfinite(e[key]) for e in doc["evals"]), key
    assert list(doc["guidance_sweep"]["rows"]) == ["2"]
    best_eval = min(doc["evals"], key=lambda e: e["fid_fmnist"])
    state, config, meta = load_exported_weights(out / "dit_L8-d128-p4.safetensors", "best")
    assert meta["best_eval"] == best_eval and config["num_layers"] == 8
    assert all(v.dtype == torch.float16 for v in state.values())
    last, _, _ = load_exported_weights(out / "dit_L8-d128-p4.safetensors", "last")
    assert state.keys() == last.keys()
    # The run directory's checkpoint holds the same best EMA weights (fp32 there).
    tensors, _ = ckpt.load(tmp_path / "run" / "dit" / "ckpt.safetensors")
    for k, v in state.items():
        torch.testing.assert_close(tensors["best." + k].half(), v, rtol=0, atol=0)
    target = export_dit(out / "dit_L8-d128-p4.safetensors", tmp_path / "assets", "best")
    info = json.loads((target / "training.json").read_text())
    assert info["step"] == best_eval["step"] and info["weights"] == "best"
    bed = tb.load(dit_dir=target)
    for k, v in bed.transformer.state_dict().items():
        torch.testing.assert_close(v, state[k].float(), rtol=0, atol=0)
    assert "| run |" in curves.summary([doc])
    assert curves.plot([doc], tmp_path / "curves.png").stat().st_size > 10_000


def test_learning_rate_schedule_warmup_constant_cooldown():
    from harmonica.testbed.train import build_parser, learning_rate

    plain = build_parser().parse_args(["--lr", "1e-3", "--warmup", "10"])
    assert learning_rate(plain, 0) == pytest.approx(1e-4) and learning_rate(plain, 9) == 1e-3
    assert learning_rate(plain, 10 ** 6) == 1e-3
    wsd = build_parser().parse_args(["--lr", "1e-3", "--warmup", "10", "--cooldown-from", "100",
                                     "--cooldown-steps", "50"])
    assert learning_rate(wsd, 100) == 1e-3 and learning_rate(wsd, 125) == pytest.approx(5e-4)
    assert learning_rate(wsd, 150) == 0.0 and learning_rate(wsd, 400) == 0.0


@pytest.mark.parametrize("name", list(__import__("harmonica.testbed.model", fromlist=["x"]).ARCHITECTURES))
def test_candidate_architectures_build_as_named(name):
    from harmonica.testbed.model import architecture_config, build_dit

    blocks, width, patch = (int(part[1:]) for part in name.split("-"))
    model = build_dit(architecture_config(name))
    assert len(model.transformer_blocks) == blocks and model.config.patch_size == patch
    assert model.config.num_attention_heads * model.config.attention_head_dim == width
    with pytest.raises(ValueError, match="unknown testbed architecture 'L9'"):
        architecture_config("L9")


# --------------------------------------------------------------------------------- bundled weights

@pytest.fixture(scope="module")
def bed():
    return tb.load()


def test_bundled_model_shape(bed):
    from diffusers import DiTTransformer2DModel

    t = bed.transformer
    assert isinstance(t, DiTTransformer2DModel)
    assert not t.training and not any(p.requires_grad for p in t.parameters())
    assert len(t.transformer_blocks) >= 8
    assert t.config.in_channels == 1 and t.config.out_channels == 1 and t.config.sample_size == 28
    assert bed.null_class == 10 == tb.NULL_CLASS and len(bed.class_names) == 10
    table = t.transformer_blocks[0].norm1.emb.class_embedder.embedding_table
    assert table.num_embeddings == 11
    cfg = bed.scheduler_config
    assert (cfg["num_train_timesteps"], cfg["beta_start"], cfg["beta_end"], cfg["beta_schedule"],
            cfg["prediction_type"]) == (1000, 0.0001, 0.02, "linear", "epsilon")


def test_bundled_assets_size():
    total = sum(p.stat().st_size for p in tb.ASSETS_DIR.rglob("*") if p.is_file())
    assert total <= 25 * 2 ** 20
    assert not list(tb.ASSETS_DIR.rglob("*.pt")) and not list(tb.ASSETS_DIR.rglob("*.bin"))


def test_bundled_model_samples_its_classes(bed):
    labels = torch.arange(40) % 10
    images = tb.generate(bed, labels, seed=0)
    assert images.shape == (40, 1, 28, 28) and torch.isfinite(images).all()
    assert images.min() >= -1 and images.max() <= 1
    # Deterministic (fixed weights, noise and sampler): 0.85 when bundled; 0.75 leaves room for
    # platform round-off flipping a sample or two, not for a broken model or sampler.
    assert ev.classifier_accuracy(images, labels) >= 0.75
    again = tb.generate(bed, labels[:10], seed=0)
    torch.testing.assert_close(again, images[:10], rtol=0, atol=1e-5)


def test_guidance_changes_samples(bed):
    labels = torch.arange(4)
    a = tb.generate(bed, labels, seed=1, num_inference_steps=5, guidance_scale=1.0)
    b = tb.generate(bed, labels, seed=1, num_inference_steps=5, guidance_scale=tb.DEFAULT_GUIDANCE)
    assert (a - b).abs().max() > 1e-3
