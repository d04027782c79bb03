"""visualize.py on a tiny trained run: every subcommand writes what it says at the right size, the original
release's checkpoints give the same figures, existing outputs are never overwritten unasked, bad input is
one line."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from PIL import Image

import visualize as V
from data.datasets import read_dataset
from utils import load_checkpoint, load_config

H, W = 64, 32  # the tiny run's image size


def grid_size(rows: int, cols: int, zoom: int = 1, header: bool = False) -> tuple[int, int]:
    """(width, height) of a composed figure, from the layout rule: GAP between cells, HEADER_GAP after a header."""
    extra = V.HEADER_GAP - V.GAP if header else 0
    return (cols * (W * zoom + V.GAP) - V.GAP + extra, rows * (H * zoom + V.GAP) - V.GAP + extra)


@pytest.fixture(scope="module")
def run(tiny_dgnet_run):
    output_path, name, data_root = tiny_dgnet_run

    def call(*args):
        return V.main([*args, "--name", name, "--output_path", str(output_path)])

    call.visuals = output_path / "outputs" / name / "visuals"
    call.run_dir = output_path / "outputs" / name
    call.data_root = data_root
    return call


def test_swap_from_a_split(run, capsys):
    assert run("swap", "--count", "3", "--seed", "1") == 0
    path = run.visuals / "swap_00000002_seed1_n3.jpg"  # other picks than the default: named by them
    assert f"written {path}" in capsys.readouterr().out
    with Image.open(path) as img:
        assert img.format == "JPEG" and img.size == grid_size(rows=4, cols=3)


def test_figures_of_other_picks_are_written_beside_the_default(run):
    assert run("swap") == 0
    default = run.visuals / "swap_00000002.jpg"
    before = default.read_bytes()
    assert run("swap", "--seed", "2") == 0 and run("swap", "--split", "gallery") == 0
    assert default.read_bytes() == before
    assert (run.visuals / "swap_00000002_seed2.jpg").read_bytes() != before
    assert (run.visuals / "swap_00000002_gallery.jpg").is_file()
    assert run("rainbow", "--count", "2", "--seed", "3") == 0
    assert (run.visuals / "rainbow_2x2_00000002_seed3.jpg").is_file()
    query = sorted((run.data_root / "query").glob("*.jpg"))[:2]
    assert run("smooth", "--steps", "3", "--images", *map(str, query)) == 0
    stems = "-".join(q.stem for q in query)
    [gif] = (run.visuals / "smooth").glob(f"smooth_appearance_00000002_{stems}-*.gif")  # and a hash of the paths
    other = run.run_dir.parent / "elsewhere"  # the same file names in another folder: another figure
    other.mkdir()
    for q in query:
        shutil.copy(q, other / q.name)
    assert run("smooth", "--steps", "3", "--images", *(str(other / q.name) for q in query)) == 0
    assert len(list((run.visuals / "smooth").glob(f"smooth_appearance_00000002_{stems}-*.gif"))) == 2


def test_out_suffix_picks_the_format(run, tmp_path, capsys):
    assert run("swap", "--count", "2", "--out", str(tmp_path / "swap.png")) == 0
    with Image.open(tmp_path / "swap.png") as img:
        assert img.format == "PNG" and img.size == grid_size(rows=4, cols=2)
    capsys.readouterr()
    assert run("rainbow", "--count", "2", "--out", str(tmp_path / "rainbow.gif")) == 2
    err = capsys.readouterr().err
    assert ".jpg, .jpeg or .png" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "rainbow.gif").exists()


def test_swap_from_folders_with_zoom(run, tmp_path):
    train = sorted((run.data_root / "bounding_box_train").glob("*.jpg"))
    for folder, files in (("a", train[:2]), ("b", train[-3:])):
        (tmp_path / folder).mkdir()
        for f in files:
            shutil.copy(f, tmp_path / folder / f.name)
    out = tmp_path / "swap.jpg"
    args = ("swap", "--appearance", str(tmp_path / "a"), "--structure", str(tmp_path / "b"), "--zoom", "2")
    assert run(*args, "--out", str(out)) == 0
    with Image.open(out) as img:
        assert img.size == grid_size(rows=4, cols=2, zoom=2)  # pairs: the shorter set
    assert run(*args, "--out", str(out)) == 2  # an explicit --out that exists is not overwritten unasked
    assert run(*args, "--out", str(out), "--overwrite") == 0
    assert run(*args, "--count", "1", "--out", str(out), "--overwrite") == 0
    with Image.open(out) as img:
        assert img.size == grid_size(rows=4, cols=1, zoom=2)  # --count: the first pairs of the folders


def test_rainbow(run):
    assert run("rainbow", "--count", "3") == 0
    with Image.open(run.visuals / "rainbow_3x3_00000002.jpg") as img:
        assert img.size == grid_size(rows=4, cols=4, header=True)


def test_smooth_writes_strips_and_gifs(run):
    assert run("smooth", "--steps", "5") == 0
    for code in ("appearance", "structure"):
        with Image.open(run.visuals / "smooth" / f"smooth_{code}_00000002.jpg") as img:
            assert img.size == grid_size(rows=2, cols=5 + 2)  # both ends' real images around the steps
        with Image.open(run.visuals / "smooth" / f"smooth_{code}_00000002.gif") as gif:
            assert gif.n_frames == 5
            assert gif.size == (2 * W + V.GAP, H + 4)  # the two rows side by side, over the progress bar


def test_interpolation_ends_are_the_swaps(run):
    models = V.load_run(run.run_dir, "last", [], torch.device("cpu"))
    paths = sorted(str(p) for p in (run.data_root / "query").glob("*.jpg"))[:2]
    x = V.load_set(paths, models.size)
    import quality

    strip = V.interpolate(models, x, 3, "appearance")
    # row 0 keeps image 0's structure: w = 0 is its reconstruction, w = 1 is image 1's appearance in it
    ends = quality.swap(models.generator, models.appearance_encoder, quality.normalize(x[[0, 0]]),
                        quality.normalize(x[[0, 1]]))
    assert torch.allclose(strip[0, 0], ends[0], atol=1e-5) and torch.allclose(strip[0, -1], ends[1], atol=1e-5)


def test_generate_dg_market(run, tmp_path, capsys):
    out = tmp_path / "dgm"
    assert run("generate", "--limit", "3", "--per_image", "2", "--out", str(out)) == 0
    files = sorted((out / "train_all").rglob("*.jpg"))
    assert len(files) == 6
    for f in files:
        appearance, structure = f.stem.split("__s_")
        assert f.parent.name == appearance[:4]  # one folder per appearance identity
        assert structure[:4] != appearance[:4]  # structure from another identity
        assert (run.data_root / "bounding_box_train" / f"{structure}.jpg").is_file()
        with Image.open(f) as img:
            assert img.size == (W, H)
    manifest = json.loads((out / "dg-market.json").read_text())
    assert manifest["images"] == 6 and manifest["per_image"] == 2
    assert len(read_dataset("folder", out).train) == 6  # readable as a training set
    # an existing output folder is refused, and left as it was
    before = {f: f.read_bytes() for f in files}
    capsys.readouterr()
    assert run("generate", "--limit", "1", "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert {f: f.read_bytes() for f in sorted((out / "train_all").rglob("*.jpg"))} == before
    # --overwrite writes again, deleting nothing
    (out / "mine.txt").write_text("user file")
    assert run("generate", "--limit", "1", "--per_image", "1", "--out", str(out), "--overwrite") == 0
    assert (out / "mine.txt").is_file() and len(list((out / "train_all").rglob("*.jpg"))) == 6


def test_metrics(run, capsys):
    assert run("metrics", "--pairs", "8") == 0
    out = capsys.readouterr().out
    assert "swap fidelity over 8 test pairs" in out and "structure image" in out and "true swap at 1/8" in out
    assert "FID: off; to enable it" in out and "--fid-weights" in out
    # other picks than the default 64 pairs of seed 0: named by them, beside the default results
    result = json.loads((run.run_dir / "results" / "generation_00000002_pairs8.json").read_text())
    assert result["iteration"] == 2 and result["fid"] is None
    fidelity = result["swap_fidelity"]
    for key in ("swap", "structure_image", "appearance_image"):
        assert 0 < fidelity[key]["ssim"] < 1 and fidelity[key]["l1"] > 0
    assert result["reconstruction"]["images"] == 8
    assert any(p.name.startswith("events") for p in (run.run_dir / "logs").iterdir())


def test_metrics_with_fid_weights(run, tmp_path, capsys):
    from torchvision.models import inception_v3

    weights = tmp_path / "inception.pth"  # random weights in torchvision's layout: the path, not the value
    torch.save(inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict(), weights)
    assert run("metrics", "--pairs", "4", "--fid-weights", str(weights), "--fid-images", "4") == 0
    assert "FID (4 images): " in capsys.readouterr().out
    result = json.loads((run.run_dir / "results" / "generation_00000002_pairs4.json").read_text())
    assert result["fid"]["images"] == 4


def test_metrics_out_writes_there_and_nothing_into_the_run(run, tmp_path, capsys):
    def run_files():  # results/ and logs/ as they are: names and contents
        return {f: f.read_bytes() for d in ("results", "logs") for f in (run.run_dir / d).glob("*")}

    assert run("metrics", "--pairs", "4") == 0  # the run's own results and tensorboard events exist
    before = run_files()
    out = tmp_path / "m.json"
    assert run("metrics", "--pairs", "4", "--out", str(out)) == 0
    assert f"written to {out}" in capsys.readouterr().out
    assert json.loads(out.read_text())["iteration"] == 2
    assert run_files() == before  # neither the results file nor a tensorboard event
    assert run("metrics", "--pairs", "4", "--out", str(out)) == 2  # an existing --out is kept unless asked
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert run("metrics", "--pairs", "4", "--out", str(out), "--overwrite") == 0


def test_outputs_on_other_data_are_written_beside_the_runs_own(run, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from data import synthetic

    other = tmp_path / "other-data"
    synthetic.generate(other, ids=8, images_per_id=6, height=H, width=W, seed=2)
    on_other = ("--opts", f"data_root={other}")
    assert run("swap") == 0 and run("metrics", "--pairs", "4") == 0
    own = {f: f.read_bytes() for f in (run.visuals / "swap_00000002.jpg",
                                       run.run_dir / "results" / "generation_00000002_pairs4.json")}
    assert run("swap", *on_other) == 0 and run("metrics", "--pairs", "4", *on_other) == 0
    assert {f: f.read_bytes() for f in own} == own
    assert (run.visuals / "swap_00000002_on-other-data.jpg").is_file()
    result = json.loads((run.run_dir / "results" / "generation_00000002_on-other-data_pairs4.json").read_text())
    assert result["reconstruction"]["images"] == 4 and result["data_root"] == str(other)
    # other data's scalars: in a file of their own (not over the run's), on curves of their own
    [events] = (run.run_dir / "logs").glob("*.generation_on-other-data_pairs4.*")
    tags = EventAccumulator(str(events)).Reload().Tags()["scalars"]
    assert tags and all(t.startswith("generation_on-other-data_pairs4/") for t in tags)
    assert list((run.run_dir / "logs").glob("*.generation_pairs4.*"))  # the run's own, still there
    assert run("rainbow", "--count", "2", "--seed", "1", *on_other) == 0
    assert (run.visuals / "rainbow_2x2_00000002_on-other-data_seed1.jpg").is_file()
    assert run("smooth", "--steps", "2", *on_other) == 0
    assert (run.visuals / "smooth" / "smooth_structure_00000002_on-other-data.gif").is_file()
    assert run("generate", "--limit", "1", *on_other) == 0
    manifest = json.loads((run.visuals / "dg-market_00000002_on-other-data" / "dg-market.json").read_text())
    assert manifest["data_root"] == str(other)
    # images given as folders are the same whatever the data: their figures carry no data tag
    query = sorted((other / "query").glob("*.jpg"))
    assert run("smooth", "--steps", "2", "--images", *map(str, query[:2]), *on_other) == 0
    assert not list((run.visuals / "smooth").glob(f"*_on-other-data_{query[0].stem}*"))


def original_layout(run_dir, folder):
    """The tiny run's G and E_a saved as the original release saved them, with an original-style config."""
    state = load_checkpoint(sorted((run_dir / "checkpoints").glob("*.pt"))[-1])
    cfg = load_config(run_dir / "config.yaml")
    gen = dict(state["trainer"]["models"]["gen"])
    dec = cfg["gen"]["n_res"]
    for block in range(dec):  # the original's AdaIN layers carried two unused buffers each
        for conv in range(2):
            prefix = f"dec.model.1.model.{block}.model.{conv}.norm"
            gen[f"{prefix}.running_mean"] = torch.zeros(2 * cfg["gen"]["dim"] * 2 ** cfg["gen"]["n_downsample"])
            gen[f"{prefix}.running_var"] = torch.ones(2 * cfg["gen"]["dim"] * 2 ** cfg["gen"]["n_downsample"])
    ids = dict(state["trainer"]["models"]["id"])
    ids["model.fc.weight"], ids["model.fc.bias"] = torch.zeros(1000, 512), torch.zeros(1000)  # kept, never used
    folder.mkdir()
    torch.save({"a": gen}, folder / "gen_00000002.pt")
    torch.save({"a": ids}, folder / "id_00000002.pt")
    original_cfg = {"apex": False, "ID_class": 4, "ID_style": "AB", "new_size": 128, "backbone": "resnet18",
                    "crop_image_height": H, "crop_image_width": W, "input_dim_a": 1, "pool": "max",
                    "ID_stride": cfg["ID_stride"], "teacher": "best", "data_root": "../Market/pytorch/",
                    "gen": {**cfg["gen"], "dec": "basic", "mlp_norm": "none", "non_local": 0}}
    (folder / "config.yaml").write_text(yaml.safe_dump(original_cfg))


def test_original_checkpoints_give_the_same_figure(run, tmp_path):
    original_layout(run.run_dir, tmp_path / "E0.5new_reid0.5_w30000")
    query = sorted((run.data_root / "query").glob("*.jpg"))
    for folder, files in (("a", query[:3]), ("b", query[3:6])):
        (tmp_path / folder).mkdir()
        for f in files:
            shutil.copy(f, tmp_path / folder / f.name)
    sets = ("--appearance", str(tmp_path / "a"), "--structure", str(tmp_path / "b"))
    assert run("swap", *sets, "--out", str(tmp_path / "ours.jpg")) == 0
    assert V.main(["swap", "--original", str(tmp_path / "E0.5new_reid0.5_w30000"), *sets, "--output_path",
                   str(tmp_path), "--out", str(tmp_path / "original.jpg")]) == 0
    assert (tmp_path / "ours.jpg").read_bytes() == (tmp_path / "original.jpg").read_bytes()
    # figures of an original model go to outputs/<its folder name>/visuals by default
    assert V.main(["rainbow", "--original", str(tmp_path / "E0.5new_reid0.5_w30000"), *sets, "--count", "2",
                   "--output_path", str(tmp_path)]) == 0
    visuals = tmp_path / "outputs" / "E0.5new_reid0.5_w30000" / "visuals"
    assert len(list(visuals.glob("rainbow_2x2_00000002_a-b-*.jpg"))) == 1
    # its files do not say what they trained on: images picked from data always name it, as test.py's results do
    assert V.main(["swap", "--original", str(tmp_path / "E0.5new_reid0.5_w30000"), "--count", "2", "--opts",
                   f"data_root={run.data_root}", "dataset=synthetic", "--output_path", str(tmp_path)]) == 0
    assert (visuals / f"swap_00000002_on-{run.data_root.name}_n2.jpg").is_file()


def test_bad_input_is_one_line(run, tmp_path, capsys):
    cases = [
        (["swap", "--name", "nothing", "--output_path", str(tmp_path)], "no checkpoint"),
        (["swap", "--name", "tiny", "--output_path", str(run.run_dir.parent.parent), "--which_iter", "abc"],
         "--which_iter"),
        (["swap", "--name", "tiny", "--output_path", str(run.run_dir.parent.parent), "--which_iter", "7"],
         "no checkpoint of iteration 7"),
        (["swap", "--name", "tiny", "--output_path", str(run.run_dir.parent.parent), "--appearance",
          str(tmp_path)], "both --appearance"),
        (["smooth", "--name", "tiny", "--output_path", str(run.run_dir.parent.parent), "--steps", "1"], "--steps"),
        (["smooth", "--name", "tiny", "--output_path", str(run.run_dir.parent.parent), "--duration", "0"],
         "--duration"),
        (["swap", "--original", str(tmp_path), "--output_path", str(tmp_path)], "config.yaml"),
    ]
    for argv, words in cases:
        assert V.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and words in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("argv, option", [
    (["metrics", "--zoom", "2"], "--zoom"),  # metrics draws no figure
    (["metrics", "--quality", "80"], "--quality"),
    (["metrics", "--split", "gallery"], "--split"),  # it measures on the test split, its own choice of images
    (["generate", "--split", "query"], "--split"),  # training data from test identities would leak
    (["generate", "--zoom", "2"], "--zoom"),  # training images at the run's size
])
def test_options_a_subcommand_cannot_use_are_refused(run, capsys, argv, option):
    with pytest.raises(SystemExit) as exit_:
        run(*argv)
    assert exit_.value.code == 2
    assert f"unrecognized arguments: {option}" in capsys.readouterr().err


def test_options_that_given_images_make_useless_are_refused(run, tmp_path, capsys):
    query = [str(p) for p in sorted((run.data_root / "query").glob("*.jpg"))[:2]]
    for argv, words in [(["smooth", "--images", *query, "--seed", "3"], "--seed picks images"),
                        (["swap", "--appearance", str(run.data_root / "query"), "--structure",
                          str(run.data_root / "query"), "--split", "gallery"], "--split picks images")]:
        with pytest.raises(SystemExit) as exit_:
            run(*argv)
        assert exit_.value.code == 2 and words in capsys.readouterr().err
    out = tmp_path / "swap.png"  # lossless: a JPEG quality would do nothing
    assert run("swap", "--count", "2", "--out", str(out), "--quality", "80") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--quality" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
