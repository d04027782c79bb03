"""export.py: a DG-Net run and a teacher run as ONNX; onnxruntime on the CPU gives PyTorch's features on the
synthetic dataset's images, and test.py --onnx gives test.py's metrics; bad input is one line."""
from __future__ import annotations

import ast
import json
import sys

import numpy as np
import pytest
import torch
from test_train import tiny  # the tiny settings the training tests use

import export
import features
import test as evaluation
import train
from data.loaders import load_splits
from data.transforms import IMAGENET_MEAN, IMAGENET_STD
from utils import REPO_ROOT

onnx = pytest.importorskip("onnx", reason="onnx is an export extra (requirements-dev.txt)")
pytest.importorskip("onnxruntime", reason="onnxruntime is an export extra (requirements-dev.txt)")

# onnxruntime and PyTorch sum in different orders: on these unit-length features they differ by at most
# 4e-7 (measured 2026-11-28, torch 2.14 and onnxruntime 1.32 on the CPU); 1e-5 leaves room for other
# CPUs and releases and is still far below a difference that changes a ranking here.
ATOL = 1e-5
METRICS = ("R1", "R5", "R10", "mAP", "mINP", "num_queries", "num_valid_queries")


@pytest.fixture(scope="module")
def runs(tiny_dgnet_run, tmp_path_factory, no_onednn):
    """{"dgnet": (output_path, name), "teacher": (output_path, name)}: the shared tiny DG-Net run and a tiny
    teacher trained for 2 iterations by train.py --trainer baseline on the same data."""
    output_path, name, data_root = tiny_dgnet_run
    base = tmp_path_factory.mktemp("export_teacher")
    code = train.main(["--config", str(REPO_ROOT / "configs" / "quickstart" / "teacher.yaml"), "--trainer",
                       "baseline", "--name", "teacher", "--output_path", str(base),
                       *tiny(data_root, "max_iter=2", "batch_size=8", "num_instances=2")])
    assert code == 0
    return {"dgnet": (output_path, name), "teacher": (base, "teacher")}


def call(main, output_path, name, *args):
    return main(["--name", name, "--output_path", str(output_path), *args])


@pytest.mark.parametrize("kind", ["dgnet", "teacher"])
def test_onnxruntime_gives_test_pys_features_and_metrics(runs, kind, capsys):
    output_path, name = runs[kind]
    assert call(export.main, output_path, name, "--format", "onnx") == 0
    out = capsys.readouterr().out
    state, cfg, run_dir = features.load_run(name, str(output_path))
    path = run_dir / "export" / f"{name}_{state['iteration']:08d}.onnx"
    assert out.splitlines()[0] == f"written: {path}" and "largest difference" in out

    # The metadata says how to feed the graph and read its output; the batch is dynamic
    proto = onnx.load(str(path))
    meta = {p.key: p.value for p in proto.metadata_props}
    dgnet = kind == "dgnet"
    assert meta["kind"] == ("DGNet" if dgnet else "baseline") and meta["iteration"] == str(state["iteration"])
    assert (meta["input_height"], meta["input_width"]) == ("64", "32") and meta["channel_order"] == "RGB"
    assert [float(v) for v in meta["mean"].split(",")] == list(IMAGENET_MEAN)
    assert [float(v) for v in meta["std"].split(",")] == list(IMAGENET_STD)
    assert meta["flip"] == "graph" and meta["feature_dim"] == ("1024" if dgnet else "512")
    assert ("query_alpha" in meta) == dgnet
    (image,) = proto.graph.input
    assert [d.dim_param or d.dim_value for d in image.type.tensor_type.shape.dim] == ["batch", 3, 64, 32]

    # test.py on the checkpoint: its metrics, and its features of the dataset's real images
    assert call(evaluation.main, output_path, name, "--batch_size", "16") == 0
    results = run_dir / "results"
    direct = json.loads((results / f"{state['iteration']:08d}.json").read_text())
    splits = load_splits(cfg)
    records = splits.query + splits.gallery
    with np.load(results / f"features_{state['iteration']:08d}.npz") as npz:
        assert list(npz["query_path"]) + list(npz["gallery_path"]) == [r.path for r in records]
        expected = np.concatenate([npz["query_f"], npz["gallery_f"]])

    # onnxruntime on the same images, in other batch sizes than the export's example: the same features
    exported = export.OnnxReID(path)
    got = evaluation.onnx_features(exported, cfg, records, batch_size=7).numpy()
    assert got.shape == expected.shape == (len(records), 1024 if dgnet else 512)
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)

    # test.py on the file: the same metrics
    assert call(evaluation.main, output_path, name, "--batch_size", "16", "--onnx", str(path)) == 0
    onnx_result = json.loads((results / f"{state['iteration']:08d}_onnx.json").read_text())
    assert onnx_result["onnx"] == str(path) and onnx_result["flip"] and onnx_result["alpha"] == direct["alpha"]
    for metric in METRICS:
        assert onnx_result[metric] == pytest.approx(direct[metric], abs=1e-6), metric


def test_no_flip_export_and_bad_input(runs, tmp_path, capsys):
    output_path, name = runs["dgnet"]
    out = tmp_path / "noflip.onnx"
    assert call(export.main, output_path, name, "--which_iter", "2", "--no-flip", "--out", str(out)) == 0
    exported = export.OnnxReID(out)
    assert not exported.flip and exported.size == (64, 32) and exported.halves
    state, cfg, _ = features.load_run(name, str(output_path), "2")
    records = load_splits(cfg).query[:4]
    model = features.load_model(state, cfg, torch.device("cpu"))
    expected = features.extract_features(model, cfg, records, torch.device("cpu"), flip=False)
    np.testing.assert_allclose(evaluation.onnx_features(exported, cfg, records).numpy(), expected.numpy(),
                               rtol=0, atol=ATOL)
    capsys.readouterr()

    bad = [
        (export.main, ("--out", str(out)), "already exists"),
        (export.main, ("--out", str(tmp_path / "model.pt")), "ending in .onnx"),
        (export.main, ("--which_iter", "abc"), "--which_iter must be"),
        (evaluation.main, ("--onnx", str(tmp_path / "missing.onnx")), "no ONNX file"),
        (evaluation.main, ("--onnx", str(out), "--rerank"), "leave out --multi, --rerank"),
    ]
    bad.append((lambda argv: evaluation.main([*argv[:1], "elsewhere", *argv[2:]]), ("--onnx", str(out)),
                f"exported from run '{name}', not 'elsewhere'"))  # its results would go to another run
    flipped = sorted((output_path / "outputs" / name / "export").glob("*.onnx"))
    if flipped:  # written by the test above when it ran first
        bad.append((evaluation.main, ("--onnx", str(flipped[0]), "--no-flip"), "export.py --no-flip"))
    for main, args, message in bad:
        assert call(main, output_path, name, *args) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, err


def test_multi_scale_export(runs, capsys):
    """--ms puts test.py's multi-scale feature in the graph (bicubic resizing included); test.py --onnx takes the
    file's scales and names its results by them."""
    output_path, name = runs["dgnet"]
    assert call(export.main, output_path, name, "--which_iter", "2", "--ms", "1,1.1") == 0
    state, cfg, run_dir = features.load_run(name, str(output_path), "2")
    path = run_dir / "export" / f"{name}_00000002_ms1_1.1.onnx"
    exported = export.OnnxReID(path)
    assert exported.scales == [1.0, 1.1] and exported.flip
    records = load_splits(cfg).query[:6]
    model = features.load_model(state, cfg, torch.device("cpu"))
    expected = features.extract_features(model, cfg, records, torch.device("cpu"), scales=(1.0, 1.1))
    single = features.extract_features(model, cfg, records, torch.device("cpu"))
    got = evaluation.onnx_features(exported, cfg, records, batch_size=4).numpy()
    np.testing.assert_allclose(got, expected.numpy(), rtol=0, atol=ATOL)
    assert np.abs(got - single.numpy()).max() > 100 * ATOL  # the second scale is really in the graph
    capsys.readouterr()
    assert call(evaluation.main, output_path, name, "--onnx", str(path), "--ap", "precision") == 0
    result = json.loads((run_dir / "results" / "00000002_onnx_ms1_1.1_ap-precision.json").read_text())
    assert result["ms"] == [1.0, 1.1] and result["flip"] and result["ap"] == "precision"
    capsys.readouterr()
    assert call(evaluation.main, output_path, name, "--onnx", str(path), "--ms", "1,1.2") == 2
    err = capsys.readouterr().err
    assert "sums the scales 1,1.1 in its graph" in err and len(err.strip().splitlines()) == 1
    assert call(export.main, output_path, name, "--ms", "1,0") == 2  # the same checks as test.py --ms
    assert "--ms" in capsys.readouterr().err


def test_missing_packages_are_one_line(runs, monkeypatch, tmp_path, capsys):
    output_path, name = runs["teacher"]
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now raises ImportError
    assert call(export.main, output_path, name, "--out", str(tmp_path / "t.onnx")) == 2
    err = capsys.readouterr().err
    assert "export needs the onnx package: pip install onnx onnxruntime" in err and err.count("\n") == 1
    assert not (tmp_path / "t.onnx").exists()
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert call(evaluation.main, output_path, name, "--onnx", str(tmp_path / "t.onnx")) == 2
    assert "needs the onnxruntime package" in capsys.readouterr().err


def test_no_module_imports_onnx_when_loaded():
    """onnx and onnxruntime are optional: no module imports them, or export.py, when it is loaded (only inside
    the functions that export or run a file), so nothing a training or evaluation imports pulls them in."""
    optional = {"onnx", "onnxruntime", "onnxscript", "export"}
    for path in sorted([*REPO_ROOT.glob("*.py"), *(REPO_ROOT / "data").glob("*.py")]):
        if path.name == "export.py":
            continue
        tree = ast.parse(path.read_text(), str(path))
        loaded = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom, ast.If, ast.Try))]
        names = set()
        for node in (n for top in loaded for n in ast.walk(top)):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module.split(".")[0])
        assert not names & optional, f"{path.name} imports {names & optional} when it is loaded"
