"""test.py end to end on a tiny trained DG-Net run: metrics, saved features, rank lists, search, bad input."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from conftest import bench_module
from test_train import tiny  # the tiny DG-Net settings the training tests use

import features
import test as evaluation
import train
from data import synthetic
from data.loaders import load_splits
from utils import REPO_ROOT, UserError


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A DG-Net run trained for 2 iterations on tiny synthetic data: (output_path, data_root)."""
    base = tmp_path_factory.mktemp("evaluation")
    data_root = base / "data"
    synthetic.generate(data_root, ids=8, images_per_id=6, height=64, width=32, seed=1)
    saved = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False  # plain kernels: faster for tiny CPU convolutions (see conftest)
    try:
        code = train.main(["--config", str(REPO_ROOT / "configs" / "quickstart" / "dgnet.yaml"), "--name", "tiny",
                           "--output_path", str(base), *tiny(data_root, "max_iter=2")])
    finally:
        torch.backends.mkldnn.enabled = saved
    assert code == 0
    return base, data_root


def run_test(tiny_run, *args):
    return evaluation.main(["--name", "tiny", "--output_path", str(tiny_run[0]), "--batch_size", "16", *args])


def test_evaluates_and_writes_metrics_features_and_rank_lists(tiny_run, capsys):
    assert run_test(tiny_run, "--ranklist", "3", "--ranklist_queries", "4") == 0
    out = capsys.readouterr().out
    assert "R1" in out and "mAP" in out and "queries with a match" in out
    results = tiny_run[0] / "outputs" / "tiny" / "results"
    summary = json.loads((results / "00000002.json").read_text())
    assert summary["kind"] == "DGNet" and summary["alpha"] == 0.5 and summary["num_valid_queries"] > 0
    assert 0 <= summary["mAP"] <= 1 and summary["R1"] <= summary["R5"] <= summary["R10"]
    with np.load(results / "features_00000002.npz") as npz:
        assert npz["query_f"].shape[1] == 1024 and len(npz["query_path"]) == len(npz["query_label"])
        # each 512-d half is unit length (flip sum, then per-half normalization)
        np.testing.assert_allclose(np.linalg.norm(npz["gallery_f"][:, :512], axis=1), 1, atol=1e-5)
        mat = scipy.io.loadmat(results / "pytorch_result.mat")
        for key in ("gallery_f", "gallery_label", "gallery_cam", "query_f", "query_label", "query_cam"):
            assert key in mat
        np.testing.assert_array_equal(mat["query_f"], npz["query_f"])
        assert mat["gallery_label"].ravel().tolist() == npz["gallery_label"].tolist()
    ranklists = sorted((results / "ranklist_00000002").glob("*.jpg"))
    assert len(ranklists) == 4


def test_ranked_gallery_follows_the_given_distances():
    """Rank lists show the ranking the metrics scored: cosine by default, the re-ranked distances when given."""
    from data.datasets import Record

    query = [Record("q.jpg", 1, 1)]
    gallery = [Record(f"g{i}.jpg", 2 + i, 2) for i in range(4)] + [Record("same_cam.jpg", 1, 1)]
    qf = torch.tensor([[1.0, 0.0]])
    gf = torch.tensor([[1.0, 0.1], [1.0, 0.5], [1.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    (cosine,) = evaluation.ranked_gallery(qf, gf, query, gallery, [0], k=3)
    assert cosine.tolist() == [0, 1, 2]  # the same-camera image of the same identity is junk: never shown
    distmat = np.array([[0.1, 0.4, 0.3, 0.2, 0.0]], np.float32)
    (given,) = evaluation.ranked_gallery(qf, gf, query, gallery, [0], k=3, distmat=distmat)
    assert given.tolist() == [0, 3, 2]
    assert evaluation.ranked_gallery(qf, gf, query, gallery, [], k=3) == []


def test_rerank_and_no_flip(tiny_run):
    assert run_test(tiny_run, "--rerank", "--no-flip", "--ranklist", "2", "--ranklist_queries", "1") == 0
    results = tiny_run[0] / "outputs" / "tiny" / "results"
    summary = json.loads((results / "00000002_noflip_rerank.json").read_text())
    assert summary["rerank"] and not summary["flip"] and 0 <= summary["mAP"] <= 1
    assert len(list((results / "ranklist_00000002_noflip_rerank").glob("*.jpg"))) == 1  # beside the default rank lists
    assert (results / "features_00000002_noflip.npz").is_file()  # beside the default features, not over them


def test_multi_scale_feature_sums_the_scaled_images(tiny_run):
    """--ms: each scale's image (area times s: each side times sqrt(s), rounded down) adds its feature to the
    sum. Without flip each term is unit per half, so the sum is checkable from single-scale features."""
    x = torch.randn(2, 3, 64, 32, generator=torch.Generator().manual_seed(0))
    assert features.scaled(x, 1) is x
    assert features.scaled(x, 1.1).shape[-2:] == (67, 33) and features.scaled(x, 0.5).shape[-2:] == (45, 22)
    state, cfg, _ = features.load_run("tiny", str(tiny_run[0]))
    model = features.load_model(state, cfg, torch.device("cpu"))
    with torch.no_grad():
        def feature(images, scales=(1.0,)):
            return features.evaluated_feature(model, images, True, flip=False, scales=scales)

        one, larger = feature(x), feature(features.scaled(x, 1.1))
        both = feature(x, (1.0, 1.1))
    assert not torch.allclose(one, larger, atol=1e-4)  # the scale changes the feature
    torch.testing.assert_close(both, features.normalize_halves(one + larger), atol=1e-5, rtol=1e-5)


def test_scales_and_the_doubling_of_small_images():
    """scale2 doubles images at most 128 pixels high: scales must be doubled all or none, and the smallest
    side is the one the network sees."""
    features.check_scales([1, 1.1], (64, 32), doubles_small=True)  # 64 and 67 pixels high: both doubled
    features.check_scales([1, 0.5], (64, 32), doubles_small=True)  # 45x22, doubled to 90x44
    with pytest.raises(UserError, match="too small"):
        features.check_scales([1, 0.5], (64, 32))  # 45x22 as it is
    for scales, size in (([1, 1.1], (128, 64)), ([1, 0.25], (256, 128))):
        with pytest.raises(UserError, match="double"):
            features.check_scales(scales, size, doubles_small=True)
        features.check_scales(scales, size)


def test_multi_scale_evaluation_and_its_files(tiny_run, capsys):
    assert run_test(tiny_run, "--ms", "1,1.1") == 0
    assert "multi-scale (1, 1.1)" in capsys.readouterr().out
    results = tiny_run[0] / "outputs" / "tiny" / "results"
    summary = json.loads((results / "00000002_ms1_1.1.json").read_text())
    assert summary["ms"] == [1.0, 1.1] and summary["flip"] and 0 <= summary["mAP"] <= 1
    # its features beside the single-scale ones, never over them; --features scores them again alike
    features = results / "features_00000002_ms1_1.1.npz"
    assert features.is_file() and (results / "pytorch_result_ms1_1.1.mat").is_file()
    assert evaluation.main(["--features", str(features)]) == 0
    again = json.loads((results / "features_00000002_ms1_1.1_scores.json").read_text())
    assert again["mAP"] == pytest.approx(summary["mAP"], abs=1e-6) and again["R1"] == summary["R1"]


@pytest.mark.parametrize("args, message", [
    (("--ms", "0"), "positive number"),
    (("--ms", "1,nan"), "positive number"),
    (("--ms", "1,1"), "gives a scale twice"),
    (("--ms", "1,0.5"), "too small for the network"),
    (("--ms", "1,x"), None),  # argparse's own message
])
def test_bad_scales_are_one_line(tiny_run, capsys, args, message):
    if message is None:
        with pytest.raises(SystemExit):
            run_test(tiny_run, *args)
        assert "give numbers separated by commas" in capsys.readouterr().err
        return
    assert run_test(tiny_run, *args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_scales_are_refused_where_the_features_are_given(tiny_run, capsys):
    """Saved features were extracted already (an exported model's scales: tests/test_export.py)."""
    features = tiny_run[0] / "outputs" / "tiny" / "results" / "features_00000002.npz"
    for args in (("--features", str(features), "--ms", "1,1.1"), ("--features", str(features), "--no-flip")):
        assert evaluation.main(list(args)) == 2
        err = capsys.readouterr().err
        assert "--ms" in err and len(err.strip().splitlines()) == 1


def test_options_that_would_be_ignored_are_refused(tiny_run, capsys):
    """--which_iter with saved features (they hold their iteration), --topk with no search: one line each."""
    features = tiny_run[0] / "outputs" / "tiny" / "results" / "features_00000002.npz"
    for args, named in (((*("--features", str(features)), "--which_iter", "2"), "--which_iter"),
                        (("--name", "tiny", "--output_path", str(tiny_run[0]), "--topk", "3"), "--topk")):
        assert evaluation.main(list(args)) == 2
        err = capsys.readouterr().err
        assert named in err and len(err.strip().splitlines()) == 1


def test_verification_rates(tiny_run, capsys):
    """--roc adds TPR@FPR to the metrics (every alpha of a sweep, re-ranked or not); saved features give the
    same rates."""
    assert run_test(tiny_run, "--roc", "--alpha", "0.5,-1") == 0
    assert "verification: TPR" in capsys.readouterr().out
    results = tiny_run[0] / "outputs" / "tiny" / "results"
    summary = json.loads((results / "00000002_alpha0.5_-1.json").read_text())
    v = summary["verification"]
    assert set(v["rates"]) == {"0.0001", "0.001", "0.01"} and v["positive_pairs"] > 0 and v["negative_pairs"] > 0
    assert all(0 <= r["tpr"] <= 1 and r["fpr"] <= float(f) for f, r in v["rates"].items())
    curve = v["curve"]  # the ROC: rising, ending where every pair is accepted
    assert curve["fpr"] == sorted(curve["fpr"]) and curve["tpr"] == sorted(curve["tpr"]) and curve["fpr"][-1] == 1.0
    assert 0 <= curve["auc"] <= 1 and len(curve["fpr"]) == len(curve["bin_edge"]) > 10
    assert summary["by_alpha"]["-1"]["verification"]["positive_pairs"] == v["positive_pairs"]
    assert evaluation.main(["--features", str(results / "features_00000002.npz"), "--roc"]) == 0
    again = json.loads((results / "features_00000002_scores.json").read_text())["verification"]
    assert (again["positive_pairs"], again["negative_pairs"]) == (v["positive_pairs"], v["negative_pairs"])
    assert all(again["rates"][f] == pytest.approx(r, rel=1e-6) for f, r in v["rates"].items())
    assert evaluation.main(["--features", str(results / "features_00000002.npz"), "--roc", "0.05,0.2"]) == 0
    other = json.loads((results / "features_00000002_scores.json").read_text())["verification"]
    assert set(other["rates"]) == {"0.05", "0.2"} and other["negative_pairs"] == v["negative_pairs"]
    assert run_test(tiny_run, "--roc", "--rerank") == 0
    reranked = json.loads((results / "00000002_rerank.json").read_text())["verification"]
    assert reranked["positive_pairs"] == v["positive_pairs"] and reranked["rates"]["0.01"]["threshold"] <= 0
    capsys.readouterr()
    assert run_test(tiny_run, "--roc", "0,0.1") == 2  # refused before any feature is extracted
    err = capsys.readouterr().err
    assert "above 0 and below 1" in err and len(err.strip().splitlines()) == 1


def test_multi_query(tiny_run, tmp_path, capsys):
    assert run_test(tiny_run, "--multi") == 2
    err = capsys.readouterr().err
    assert "no multi-query images" in err and len(err.strip().splitlines()) == 1
    # A copy of the dataset with gt_bbox/ (here: the query images again) evaluates with --data_root.
    root = tmp_path / "with_gt_bbox"
    shutil.copytree(tiny_run[1], root)
    shutil.copytree(root / "query", root / "gt_bbox")
    assert run_test(tiny_run, "--multi", "--data_root", str(root)) == 0
    # another data_root than the run's: its results are named after it
    summary = json.loads((tiny_run[0] / "outputs" / "tiny" / "results" / "00000002_on-with_gt_bbox_multi.json"
                          ).read_text())
    assert summary["multi"] and summary["multi_query_missing"] == 0
    # the saved features, multi-query ones included, score the same again without the model
    saved = tiny_run[0] / "outputs" / "tiny" / "results" / "features_00000002_on-with_gt_bbox.npz"
    assert evaluation.main(["--features", str(saved), "--multi"]) == 0
    again = json.loads(saved.with_name("features_00000002_on-with_gt_bbox_scores_multi.json").read_text())
    assert again["mAP"] == summary["mAP"] and again["multi_query_missing"] == 0


def test_multi_query_features_average_identity_and_camera():
    from data.datasets import Record

    query = [Record("q0", 1, 1), Record("q1", 2, 1)]
    multi = [Record("m0", 1, 1), Record("m1", 1, 1), Record("m2", 1, 2)]
    mqf = torch.tensor([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    out, missing = evaluation.multi_query_features(torch.zeros(2, 2), query, mqf, multi)
    assert out[0].tolist() == [0.5, 0.5] and out[1].tolist() == [0.0, 0.0] and missing == 1


def test_search_command_and_predictor(tiny_run, capsys):
    query_dir = tiny_run[1] / "query"
    assert run_test(tiny_run, "--query", str(query_dir), "--gallery", str(query_dir), "--topk", "2") == 0
    found = json.loads((tiny_run[0] / "outputs" / "tiny" / "results" / "search_00000002_query-in-query.json"
                        ).read_text())
    assert found["iteration"] == 2 and found["flip"] and found["alpha"] == 0.5
    queries = sorted(str(p) for p in query_dir.glob("*.jpg"))
    assert [r["query"] for r in found["results"]] == queries
    assert all(len(r["matches"]) == 2 for r in found["results"])
    assert all(r["matches"][0]["path"] == r["query"] for r in found["results"])  # an image finds itself first
    capsys.readouterr()
    predictor = evaluation.Predictor.from_run("tiny", str(tiny_run[0]), batch_size=8)
    assert predictor.embed(queries[:3]).shape == (3, 1024)
    hits = predictor.search(queries[:2], queries, topk=1)
    assert [h["matches"][0]["path"] for h in hits] == queries[:2]
    multi_scale = evaluation.Predictor.from_run("tiny", str(tiny_run[0]), scales=(1, 1.2), batch_size=8)
    assert not torch.allclose(multi_scale.embed(queries[:3]), predictor.embed(queries[:3]), atol=1e-4)
    with pytest.raises(UserError, match="too small"):
        evaluation.Predictor.from_run("tiny", str(tiny_run[0]), scales=(0.1,))


def test_evaluate_model_for_validation(tiny_run):
    state, cfg, _ = features.load_run("tiny", str(tiny_run[0]))
    model = features.load_model(state, cfg, torch.device("cpu")).train()
    splits = load_splits(cfg)
    got = evaluation.evaluate_model(model, cfg, splits.query, splits.gallery, torch.device("cpu"), batch_size=16)
    assert model.training  # given back in the mode it came in
    assert set(evaluation.METRICS) <= got.keys() and got["num_queries"] == len(splits.query)
    again = evaluation.evaluate_model(model, cfg, splits.query, splits.gallery, torch.device("cpu"), batch_size=16)
    assert got == again


@pytest.mark.parametrize("args,message", [
    (("--which_iter", "abc"), "--which_iter must be"),
    (("--which_iter", "7"), "checkpoint"),
    (("--config", "missing.yaml"), "no such file"),
    (("--query", "nowhere", "--gallery", "nowhere"), "no such folder"),
    (("--query", "README.md", "--gallery", "."), "README.md is a file"),
    (("--query", "."), "both --query"),
    (("--ranklist", "-1"), "--ranklist"),
    (("--alpha", "0.5,-2"), "--alpha must be"),
    (("--alpha", "0.5,0", "--query", ".", "--gallery", "."), "single value"),
    (("--alpha", "0.5,0,0.5"), "gives a value twice"),
    (("--features", "README.md"), "give saved features"),
])
def test_bad_input_is_one_line(tiny_run, capsys, args, message):
    assert run_test(tiny_run, *args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


def test_bench_quick_runs():
    """bench/eval_bench.py's cases, each in this process (its command, a process per case, runs in the test of
    bench/gpu_run.sh --tiny)."""
    bench = bench_module("eval_bench")
    names = ["quick-distmat", "quick-distmat-reference", "quick-roc"]
    cases = [bench.run_case(name, 512, True, "cpu") for name in names]
    assert [c["case"] for c in cases] == names
    assert cases[0]["mAP"] == pytest.approx(cases[1]["mAP"], abs=1e-6)
    assert set(cases[2]["tpr"]) == {"0.0001", "0.001", "0.01"} and 0 < cases[2]["pairs"] <= 300 * 1500


def test_metrics_are_printed_before_an_unwritable_results_folder_fails(tiny_run, tmp_path, capsys):
    """The results/ folder cannot be made (a file stands in its place: a robust stand-in for a read-only
    folder, which root could write anyway). Everything is computed and printed, then one line says what could
    not be written."""
    copy = tmp_path / "outputs" / "tiny"
    shutil.copytree(tiny_run[0] / "outputs" / "tiny", copy, ignore=shutil.ignore_patterns("results"))
    (copy / "results").write_text("in the way")
    assert evaluation.main(["--name", "tiny", "--output_path", str(tmp_path), "--batch_size", "16"]) == 2
    captured = capsys.readouterr()
    assert "mAP" in captured.out and "queries with a match" in captured.out and "written:" not in captured.out
    err = captured.err.strip().splitlines()[-1]
    assert err.startswith("error: could not write") and "results" in err and "metrics above were not saved" in err


def test_alpha_weighting_and_its_use_in_re_ranking():
    torch.manual_seed(0)
    half = features.HALF
    qf, gf = torch.randn(3, 2 * half), torch.randn(4, 2 * half)
    alpha = 0.25
    wq = features.weight_query(qf, True, alpha)
    assert torch.equal(wq[:, :half], qf[:, :half]) and torch.allclose(wq[:, half:], alpha * qf[:, half:])
    only_fine = features.weight_query(qf, True, -1)  # the original's -1: the fine-grained half alone
    assert not only_fine[:, :half].any() and torch.equal(only_fine[:, half:], qf[:, half:])
    for bad in (-0.5, float("nan"), float("inf")):
        with pytest.raises(UserError, match="--alpha must be at least 0"):
            features.weight_query(qf, True, bad)

    def dgnet_score(a, b):  # s_prim + alpha s_fine
        return a[:, :half] @ b[:, :half].T + alpha * a[:, half:] @ b[:, half:].T

    bq, bg = features.weighted_both_sides(qf, gf, True, alpha)
    assert torch.allclose(bq @ bg.T, dgnet_score(qf, gf), atol=1e-3)  # DG-Net's query-gallery score
    assert torch.allclose(bq @ bg.T, wq @ gf.T, atol=1e-3)
    assert torch.allclose(bg @ bg.T, dgnet_score(gf, gf), atol=1e-3)  # and the same metric between gallery images
    assert torch.allclose(bq @ bq.T, dgnet_score(qf, qf), atol=1e-3)


def test_a_negative_alpha_is_one_line(tiny_run, capsys):
    assert run_test(tiny_run, "--alpha", "-2") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--alpha must be at least 0" in err[0]


def test_evaluation_does_not_check_the_training_split(tiny_run, capsys):
    # a model trained on one dataset evaluated on another's test split: its ID_class is not that dataset's
    assert run_test(tiny_run, "--opts", "ID_class=999", "val_ids=1") == 0
    assert "queries with a match" in capsys.readouterr().out


def test_results_on_another_dataset_are_written_beside_the_runs_own(tiny_run, tmp_path):
    results = tiny_run[0] / "outputs" / "tiny" / "results"
    assert run_test(tiny_run) == 0
    own = (results / "00000002.json").read_bytes()
    other = tmp_path / "other set"
    synthetic.generate(other, ids=8, images_per_id=6, height=64, width=32, seed=2)
    assert run_test(tiny_run, "--data_root", str(other)) == 0
    assert (results / "00000002.json").read_bytes() == own
    summary = json.loads((results / "00000002_on-other-set.json").read_text())
    assert summary["data_root"] == str(other) and summary["num_queries"] > 0
    assert (results / "features_00000002_on-other-set.npz").is_file()
    assert (results / "pytorch_result_on-other-set.mat").is_file()
    # a mistyped data_root is an error, not a dataset generated there
    assert run_test(tiny_run, "--data_root", str(tmp_path / "typo")) == 2
    assert not (tmp_path / "typo").exists()


def test_results_with_another_protocol_or_boxes_are_named_by_it():
    """Evaluating with cross_camera or CUHK03-NP's boxes other than the run's own writes beside its results."""
    trained = {"dataset": "cuhk03", "data_root": "/data/cuhk03", "cuhk03_labeled": False, "cross_camera": True}
    assert evaluation.other_data_tag(dict(trained), trained) == ""
    assert evaluation.other_data_tag({**trained, "cross_camera": False}, trained) == "_samecam"
    assert evaluation.other_data_tag({**trained, "cuhk03_labeled": True}, trained) == "_labeled"
    assert evaluation.other_data_tag(trained, {**trained, "cuhk03_labeled": True}) == "_detected"
    other = {**trained, "dataset": "market1501", "data_root": "/data/Market", "cross_camera": False}
    assert evaluation.other_data_tag(other, trained) == "_on-Market_samecam"


def test_the_same_data_named_another_way_is_not_other_data(tmp_path, monkeypatch):
    """The dataset's parent, a relative path or a symbolic link name the data trained on: no _on- tag."""
    from test_datasets import make_market
    make_market(tmp_path / "Market" / "Market-1501-v15.09.15")
    (tmp_path / "link").symlink_to(tmp_path / "Market")
    trained = {"dataset": "market1501", "data_root": str(tmp_path / "Market" / "Market-1501-v15.09.15")}
    monkeypatch.chdir(tmp_path)
    for same in (tmp_path / "Market", "Market", "link/Market-1501-v15.09.15"):
        assert evaluation.other_data_tag({**trained, "data_root": str(same)}, trained) == ""
    make_market(tmp_path / "copy")
    assert evaluation.other_data_tag({**trained, "data_root": "copy"}, trained) == "_on-copy"


def test_opts_apply_to_a_run_without_config_yaml(tiny_run, tmp_path):
    # the checkpoint's own config stands in for a lost config.yaml; --opts still change it
    shutil.copytree(tiny_run[0] / "outputs" / "tiny", tmp_path / "outputs" / "lost")
    (tmp_path / "outputs" / "lost" / "config.yaml").unlink()
    _, cfg, _ = features.load_run("lost", str(tmp_path), opts=["data_root=/elsewhere", "batch_size=3"])
    assert cfg["data_root"] == "/elsewhere" and cfg["batch_size"] == 3
    _, cfg, _ = features.load_run("lost", str(tmp_path))
    assert cfg["data_root"] == str(tiny_run[1])
    with pytest.raises(UserError, match="--opts"):
        features.load_run("lost", str(tmp_path), opts=["no_such_key=1"])


def test_an_alpha_sweep_equals_single_alpha_runs_and_both_ap_conventions_are_reported(tiny_run, capsys):
    results = tiny_run[0] / "outputs" / "tiny" / "results"
    single = {}
    for alpha in ("0", "-1", "0.5"):
        assert run_test(tiny_run, "--alpha", alpha) == 0
        single[alpha] = json.loads((results / f"00000002{'' if alpha == '0.5' else '_alpha' + alpha}.json").read_text())
    capsys.readouterr()
    assert run_test(tiny_run, "--alpha", "-1,0") == 0  # a sweep that starts with -1 is an --alpha value
    assert list(json.loads((results / "00000002_alpha-1_0.json").read_text())["by_alpha"]) == ["-1", "0"]
    assert run_test(tiny_run, "--alpha", "0.5,0,-1") == 0
    out = capsys.readouterr().out
    assert "by alpha" in out and "mAP under the other AP convention (precision)" in out
    swept = json.loads((results / "00000002_alpha0.5_0_-1.json").read_text())
    assert swept["alpha"] == 0.5 and list(swept["by_alpha"]) == ["0.5", "0", "-1"]
    for alpha, want in single.items():
        got = swept["by_alpha"][alpha]
        for key in ("R1", "R5", "R10", "R20", "mAP", "mINP", "mAP_market", "mAP_precision", "cmc"):
            assert got[key] == want[key], (alpha, key)
    assert swept["mAP"] == single["0.5"]["mAP"] == single["0.5"]["mAP_market"]  # the headline: the first alpha
    assert len(swept["cmc"]) == 50 and swept["cmc"][0] == swept["R1"] and swept["cmc"][19] == swept["R20"]
    assert run_test(tiny_run, "--ap", "precision") == 0
    precision = json.loads((results / "00000002_ap-precision.json").read_text())
    assert precision["mAP"] == precision["mAP_precision"] == single["0.5"]["mAP_precision"]
    assert precision["mAP_market"] == single["0.5"]["mAP_market"]


def test_every_snapshot_kept_and_evaluated_as_a_curve(tiny_run, tmp_path, capsys):
    data_root = tiny_run[1]
    code = train.main(["--config", str(REPO_ROOT / "configs" / "quickstart" / "dgnet.yaml"), "--name", "all",
                       "--output_path", str(tmp_path),
                       *tiny(data_root, "max_iter=3", "snapshot_save_iter=1", "keep_last=0")])
    assert code == 0
    checkpoints = sorted(p.name for p in (tmp_path / "outputs" / "all" / "checkpoints").glob("*.pt"))
    assert checkpoints == ["00000001.pt", "00000002.pt", "00000003.pt"]  # keep_last 0: none deleted
    capsys.readouterr()
    args = ["--name", "all", "--output_path", str(tmp_path), "--batch_size", "16"]
    assert evaluation.main([*args, "--which_iter", "all"]) == 0
    assert "| iteration |" in capsys.readouterr().out
    results = tmp_path / "outputs" / "all" / "results"
    curve = json.loads((results / "curve.json").read_text())
    assert [r["iteration"] for r in curve["rows"]] == [1, 2, 3]
    assert evaluation.main([*args, "--which_iter", "2"]) == 0
    single = json.loads((results / "00000002.json").read_text())
    assert {k: single[k] for k in curve["rows"][1] if k != "iteration"} == \
        {k: v for k, v in curve["rows"][1].items() if k != "iteration"}
    assert evaluation.main([*args, "--which_iter", "all", "--rerank"]) == 0
    assert json.loads((results / "curve_rerank.json").read_text())["rerank"] is True


def test_the_original_releases_files_evaluate_as_the_same_weights_in_a_run_do(tiny_dgnet_run, tmp_path, capsys):
    from test_visualize import original_layout

    output_path, name, data_root = tiny_dgnet_run
    folder = tmp_path / "E0.5new_reid0.5_w30000"
    original_layout(output_path / "outputs" / name, folder)
    data = ["--data_root", str(data_root), "--batch_size", "16"]
    assert evaluation.main(["--name", name, "--output_path", str(output_path), *data]) == 0
    ours = json.loads((output_path / "outputs" / name / "results" / "00000002.json").read_text())
    capsys.readouterr()
    # the original's config names its per-identity copy (dataset: folder); the synthetic set is Market's layout
    assert evaluation.main(["--original", str(folder), "--output_path", str(tmp_path), *data,
                            "--opts", "dataset=market1501", "num_workers=0"]) == 0
    assert "the original's files in" in capsys.readouterr().out
    results = tmp_path / "outputs" / folder.name / "results"
    tag = f"_on-{data_root.name}"  # the original's files do not say what they trained on: the data is named
    theirs = json.loads((results / f"original_00000002{tag}.json").read_text())
    assert theirs["kind"] == "DGNet" and theirs["iteration"] == 2 and theirs["original"] == str(folder)
    for key in ("R1", "R5", "mAP", "mINP", "cmc", "num_valid_queries"):
        assert theirs[key] == ours[key], key
    assert (results / f"features_original_00000002{tag}.npz").is_file()
    assert (results / f"pytorch_result{tag}.mat").is_file()
    # the original's own layout: outputs/<name>/config.yaml and outputs/<name>/checkpoints/*.pt, given either way
    (folder / "checkpoints").mkdir()
    for f in folder.glob("*.pt"):
        f.rename(folder / "checkpoints" / f.name)
    for given in (folder, folder / "checkpoints"):
        assert evaluation.main(["--original", str(given), "--name", "again", "--output_path", str(tmp_path), *data,
                                "--opts", "dataset=market1501", "num_workers=0"]) == 0
        again = json.loads((tmp_path / "outputs" / "again" / "results" / f"original_00000002{tag}.json").read_text())
        assert again["mAP"] == ours["mAP"]
    assert evaluation.main(["--original", str(folder), "--output_path", str(tmp_path), "--onnx", "x.onnx"]) == 2
    assert "--original evaluates the original's files" in capsys.readouterr().err


def test_the_original_baseline_teacher_evaluates(tiny_run, tmp_path, capsys):
    from reIDmodel import Teacher

    teacher = Teacher(5, backbone="resnet50", last_stride=1, pretrained="none", scale2=True).eval()
    folder = tmp_path / "ft_ResNet50"
    folder.mkdir()
    torch.save({f"module.{k}": v for k, v in teacher.state_dict().items()}, folder / "net_last.pth")  # DataParallel
    (folder / "opts.yaml").write_text("stride: 1\nname: ft_ResNet50\n")
    opts = [f"data_root={tiny_run[1]}", "dataset=market1501", "crop_image_height=64", "crop_image_width=32",
            "num_workers=0"]
    assert evaluation.main(["--original", str(folder), "--output_path", str(tmp_path), "--batch_size", "16",
                            "--opts", *opts]) == 0
    got = json.loads((tmp_path / "outputs" / "ft_ResNet50" / "results" / f"original_baseline_on-{tiny_run[1].name}.json"
                      ).read_text())
    assert got["kind"] == "baseline" and got["iteration"] is None and got["alpha"] is None
    cfg = evaluation.load_config(None, opts)
    splits = load_splits(cfg, evaluation_only=True)
    want = evaluation.evaluate_model(teacher, cfg, splits.query, splits.gallery, torch.device("cpu"), batch_size=16)
    assert got["mAP"] == want["mAP"] and got["R1"] == want["R1"]
    capsys.readouterr()  # a teacher's feature has no fine-grained half for --alpha to weight
    assert evaluation.main(["--original", str(folder), "--output_path", str(tmp_path), "--alpha", "0",
                            "--opts", *opts]) == 2
    assert "leave --alpha out" in capsys.readouterr().err
    (folder / "net_last.pth").write_bytes(b"not a checkpoint")
    assert evaluation.main(["--original", str(folder), "--output_path", str(tmp_path), "--opts", *opts]) == 2


def test_saved_features_score_again_without_the_model(tiny_run, capsys):
    results = tiny_run[0] / "outputs" / "tiny" / "results"
    assert run_test(tiny_run, "--alpha", "0.5,-1", "--rerank") == 0
    want = json.loads((results / "00000002_alpha0.5_-1_rerank.json").read_text())
    for saved in ("features_00000002.npz", "pytorch_result.mat"):
        capsys.readouterr()
        code = evaluation.main(["--features", str(results / saved), "--alpha", "0.5,-1", "--rerank"])
        assert code == 0 and "the features in" in capsys.readouterr().out
        got = json.loads((results / f"{saved.split('.')[0]}_scores_alpha0.5_-1_rerank.json").read_text())
        assert got["kind"] == "DGNet" and got["by_alpha"] == want["by_alpha"], saved
        for key in ("R1", "mAP", "mINP", "cmc"):
            assert got[key] == want[key], (saved, key)
    assert evaluation.main(["--features", str(results / "nothing.npz")]) == 2
    assert "no such file" in capsys.readouterr().err
    np.savez(results / "bad.npz", query_f=np.zeros((2, 4), np.float32))
    assert evaluation.main(["--features", str(results / "bad.npz")]) == 2
    assert "needs query_f" in capsys.readouterr().err
    assert evaluation.main(["--features", str(results / "features_00000002.npz"), "--multi"]) == 2
    assert "holds no multi-query features" in capsys.readouterr().err
    (results / "broken.npz").write_bytes((results / "features_00000002.npz").read_bytes()[:300])
    assert evaluation.main(["--features", str(results / "broken.npz")]) == 2
    assert "not a readable .npz or .mat" in capsys.readouterr().err
    np.savez(results / "widths.npz", **{f"{s}_{k}": v for s in ("query", "gallery") for k, v in
                                        (("f", np.zeros((2, 4 if s == "query" else 8), np.float32)),
                                         ("label", np.ones(2, int)), ("cam", np.ones(2, int)))})
    assert evaluation.main(["--features", str(results / "widths.npz")]) == 2
    assert "differ in width" in capsys.readouterr().err
    # the original's test_2label.py wrote the multi-query features to a multi_query.mat beside its own file
    import scipy.io

    original = results / "original"
    original.mkdir()
    mat = scipy.io.loadmat(results / "pytorch_result.mat")
    scipy.io.savemat(original / "pytorch_result.mat", {k: v for k, v in mat.items() if not k.startswith("__")})
    scipy.io.savemat(original / "multi_query.mat", {"mquery_f": mat["query_f"], "mquery_label": mat["query_label"],
                                                    "mquery_cam": mat["query_cam"]})
    assert evaluation.main(["--features", str(original / "pytorch_result.mat"), "--multi"]) == 0


def test_query_expansion_of_a_run_and_of_its_saved_features(tiny_run, capsys):
    """--aqe scores the run's features expanded in the alpha-weighted space (every alpha of a sweep in its
    own); the saved features give the same numbers; results are named by the expansion."""
    from expansion import alpha_query_expansion

    results = tiny_run[0] / "outputs" / "tiny" / "results"
    assert run_test(tiny_run, "--aqe", "--aqe_k", "3", "--alpha", "0.5,-1", "--rerank") == 0
    assert "alpha-query-expanded (k 3, alpha 3)" in capsys.readouterr().out
    got = json.loads((results / "00000002_alpha0.5_-1_aqe3-3_rerank.json").read_text())
    assert got["aqe"] == {"k": 3, "alpha": 3.0} and got["rerank"]
    assert run_test(tiny_run, "--aqe", "--alpha", "0.5,-1") == 0
    summary = json.loads((results / "00000002_alpha0.5_-1_aqe.json").read_text())
    with np.load(results / "features_00000002.npz") as npz:
        qf, gf = torch.from_numpy(npz["query_f"]), torch.from_numpy(npz["gallery_f"])
    cfg = evaluation.load_config(None, ["dataset=synthetic", f"data_root={tiny_run[1]}"])
    splits = load_splits(cfg, evaluation_only=True)
    for alpha in (0.5, -1):
        q, g = alpha_query_expansion(*features.weighted_both_sides(qf, gf, True, alpha))
        want = evaluation.score(q, g, splits.query, splits.gallery)
        assert summary["by_alpha"][f"{alpha:g}"]["mAP"] == pytest.approx(want["mAP"]), alpha
    assert summary["mAP"] == summary["by_alpha"]["0.5"]["mAP"]
    assert evaluation.main(["--features", str(results / "features_00000002.npz"), "--aqe", "--alpha", "0.5,-1"]) == 0
    again = json.loads((results / "features_00000002_scores_alpha0.5_-1_aqe.json").read_text())
    assert again["by_alpha"] == summary["by_alpha"] and again["aqe"] == summary["aqe"]


def test_query_expansion_bad_options(tiny_run, capsys):
    for given in (("--aqe_k", "3"), ("--aqe_k", "5"), ("--aqe_alpha", "3")):  # the defaults too: a forgotten --aqe
        assert run_test(tiny_run, *given) == 2
        assert "add --aqe" in capsys.readouterr().err
    assert run_test(tiny_run, "--aqe", "--aqe_k", "0") == 2
    assert "at least 1" in capsys.readouterr().err
    assert run_test(tiny_run, "--aqe", "--aqe_k", "1000") == 2
    err = capsys.readouterr().err
    assert "lower --aqe_k" in err and "gallery [" not in err  # refused before any feature was extracted


def test_search_refuses_evaluation_options(tiny_run, capsys):
    folder = str(tiny_run[1] / "query")
    for option in (("--aqe",), ("--rerank",), ("--multi",), ("--roc",), ("--ranklist", "3"), ("--ap", "precision")):
        assert run_test(tiny_run, "--query", folder, "--gallery", folder, *option) == 2
        assert "leave out --multi, --rerank, --aqe, --roc, --ranklist and --ap" in capsys.readouterr().err
    for option in (("--data_root", folder), ("--opts", "pad=3")):  # the run's own model and config decide
        assert run_test(tiny_run, "--query", folder, "--gallery", folder, *option) == 2
        assert "leave out --config, --data_root and --opts" in capsys.readouterr().err


def test_results_table_lists_every_evaluation_of_every_run(tiny_run, tmp_path, capsys):
    """results.py: each results file of a run as a row, its options from the file name, its metrics as test.py
    wrote them; --sort, --last and --csv; one line for a missing run or an empty outputs folder."""
    import results

    assert run_test(tiny_run) == 0 and run_test(tiny_run, "--ap", "precision") == 0
    written = {name: json.loads((tiny_run[0] / "outputs" / "tiny" / "results" / f"{name}.json").read_text())
               for name in ("00000002", "00000002_ap-precision")}
    capsys.readouterr()
    table = tmp_path / "table.csv"
    assert results.main(["--output_path", str(tiny_run[0]), "--sort", "mAP", "--csv", str(table)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| run | kind | iteration | options | data | R1 | R5 | R10 | mAP | mINP |")
    rows = {Path(r["file"]).stem: r for r in csv.DictReader(table.open())}
    for options, name in (("", "00000002"), ("ap-precision", "00000002_ap-precision")):
        row = rows[name]
        assert (row["run"], row["kind"], row["iteration"], row["options"]) == ("tiny", "DGNet", "2", options)
        assert all(float(row[m]) == written[name][m] for m in results.METRICS)
        assert f"| tiny | DGNet | 2 | {options or '-'} | synthetic | {100 * written[name]['R1']:.2f} |" in out
    assert results.options_of("features_00000002_scores_alpha0_rerank") == "scores of features_00000002 alpha0_rerank"
    assert results.options_of("original_baseline_on-Market") == "on-Market"
    maps = [float(r["mAP"]) for r in csv.DictReader(table.open())]
    assert maps == sorted(maps, reverse=True)
    assert results.main(["--output_path", str(tiny_run[0]), "--runs", "tiny", "--last"]) == 0
    assert results.main(["--output_path", str(tiny_run[0]), "--runs", "tiny", "nope"]) == 2
    assert "no run folder" in capsys.readouterr().err
    assert results.main(["--output_path", str(tmp_path)]) == 2
    assert f"no runs under {tmp_path / 'outputs'}" in capsys.readouterr().err
