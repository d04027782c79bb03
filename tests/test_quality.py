"""quality.py: SSIM against known values and an independent formula, L1, swap fidelity on the synthetic ground
truth (the truth scores perfectly, the trivial answers do not), mode restoring, FID pieces."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import linalg, ndimage

import quality
from data import synthetic
from data.loaders import load_splits
from utils import UserError
from visualize import load_run


def reference_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """SSIM of two (C, H, W) images written independently: scipy's Gaussian filter (sigma 1.5, truncated to
    radius 5, i.e. an 11x11 window), valid region only, sample statistics without the N/(N-1) correction."""
    c1, c2, r = 0.01**2, 0.03**2, 5
    values = []
    for a, b in zip(x.astype(np.float64), y.astype(np.float64)):
        def f(t):
            return ndimage.gaussian_filter(t, 1.5, truncate=3.5)[r:-r, r:-r]
        mu_a, mu_b = f(a), f(b)
        va, vb, cov = f(a * a) - mu_a**2, f(b * b) - mu_b**2, f(a * b) - mu_a * mu_b
        values.append(((2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a**2 + mu_b**2 + c1) * (va + vb + c2))).mean())
    return float(np.mean(values))


def test_ssim_identical_is_one_and_batched():
    x = torch.rand(3, 3, 40, 24, generator=torch.Generator().manual_seed(0))
    s = quality.ssim(x, x)
    assert s.shape == (3,) and torch.allclose(s, torch.ones(3), atol=1e-6)


def test_ssim_of_constant_images_is_the_luminance_term():
    # flat images: no variance, so SSIM = (2ab + C1) / (a^2 + b^2 + C1) exactly
    a, b = 0.2, 0.6
    x, y = torch.full((1, 3, 32, 16), a), torch.full((1, 3, 32, 16), b)
    expected = (2 * a * b + 0.01**2) / (a * a + b * b + 0.01**2)
    assert quality.ssim(x, y).item() == pytest.approx(expected, abs=1e-6)


def test_ssim_matches_an_independent_formula():
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 48, 30, generator=gen)
    y = (0.7 * x + 0.3 * torch.rand(2, 3, 48, 30, generator=gen)).clamp(0, 1)
    ours = quality.ssim(x, y)
    for i in range(2):
        assert ours[i].item() == pytest.approx(reference_ssim(x[i].numpy(), y[i].numpy()), abs=1e-5)
    assert torch.allclose(ours, quality.ssim(y, x), atol=1e-6)  # symmetric
    assert (ours < 1).all() and (ours > 0).all()


def test_ssim_small_images_and_bad_shapes():
    x = torch.rand(1, 3, 8, 6)
    assert quality.ssim(x, x).item() == pytest.approx(1.0, abs=1e-6)  # window shrunk to 5x5
    with pytest.raises(ValueError, match="one shape"):
        quality.ssim(x, torch.rand(1, 3, 8, 7))


def test_l1_and_unit_round_trip():
    x, y = torch.full((2, 3, 4, 4), 0.2), torch.full((2, 3, 4, 4), 0.5)
    assert torch.allclose(quality.l1(x, y), torch.full((2,), 0.3))
    z = torch.rand(2, 3, 4, 4)
    assert torch.allclose(quality.to_unit(quality.normalize(z)), z, atol=1e-6)


@pytest.fixture(scope="module")
def tiny(tiny_dgnet_run):
    output_path, name, _ = tiny_dgnet_run
    models = load_run(output_path / "outputs" / name, "last", [], torch.device("cpu"))
    return models, load_splits(models.cfg)


def test_ground_truth_scores_perfectly_and_trivial_answers_do_not(tiny):
    models, splits = tiny
    data = quality.fidelity_set(models.cfg, splits, n_pairs=12, seed=0)
    assert data.target.shape == data.structure.shape == data.appearance.shape == (12, 3, 64, 32)
    truth = quality.score(data.target, data.target)
    assert truth["ssim"] == pytest.approx(1.0, abs=1e-6) and truth["l1"] == 0.0
    for trivial in (data.structure, data.appearance):
        s = quality.score(trivial, data.target)
        assert s["ssim"] < 0.99 and s["l1"] > 0.01
    # the structure image shares the background with the truth, the appearance image shares nothing
    assert quality.score(data.structure, data.target)["l1"] < quality.score(data.appearance, data.target)["l1"]
    assert all(a.split("_")[0] != b.split("_")[0] for a, b in data.pairs)  # different identities


def test_true_swap_of_an_image_with_itself_is_its_file(tiny):
    from data import synthetic

    models, splits = tiny
    meta = synthetic.load_metadata(models.cfg["data_root"])
    record = next(r for r in splits.query if r.pid > 0)
    drawn = quality._true_swap(meta, record, record, (64, 32))
    assert torch.equal(drawn, quality.load_unit(record.path, (64, 32)))


def test_swap_fidelity_is_seeded_and_restores_modes(tiny):
    models, splits = tiny
    g, e = models.generator, models.appearance_encoder
    g.train()
    e.eval()
    e.classifier1.train()  # a mixed state must come back as it was
    first = quality.swap_fidelity(g, e, models.cfg, splits, torch.device("cpu"), n_pairs=8, seed=3)
    assert g.training and all(m.training for m in g.modules())
    assert not e.training and e.classifier1.training and not e.classifier2.training
    assert set(first) == {"pairs", "seed", "swap", "structure_image", "appearance_image", "true_swap_blur4",
                          "true_swap_blur8", "true_colours_structure_luma", "flat_mean_colour",
                          "appearance_part_colours", "identity_judge"}
    judged = first["identity_judge"]
    assert set(judged) == {"identities", "chance", *quality.JUDGE_LABELS}
    assert judged["identities"] == 4 and judged["chance"] == 0.25
    assert judged["true_swap"]["top1"] == 1.0 and judged["structure_image"]["as_structure"] == 1.0
    assert all(0 <= v <= 1 for k, v in judged["swap"].items() if "rank" not in k)
    assert all(0 <= v <= 1 for k, v in judged["reconstruction"].items() if "rank" not in k)
    # true colours on the structure image's brightness: the structure image's luma error, almost no chroma error
    recoloured, structure = first["true_colours_structure_luma"], first["structure_image"]
    assert recoloured["person_luma_l1"] == pytest.approx(structure["person_luma_l1"], abs=0.01)
    assert recoloured["person_chroma_l1"] < 0.5 * structure["person_chroma_l1"]
    # the reference rows: the truth, only blurred; the more blurred the further from the truth
    fine, coarse = first["true_swap_blur4"], first["true_swap_blur8"]
    assert 0 < fine["l1"] < coarse["l1"] and 1 > fine["ssim"] > coarse["ssim"]
    assert fine["person_l1"] < coarse["person_l1"]
    # the floor: one flat image scores worse than the truth blurred, on the person's pixels and in SSIM
    flat = first["flat_mean_colour"]
    assert flat["person_l1"] > coarse["person_l1"] and flat["ssim"] < coarse["ssim"]
    # A's part colours on B's parts: beats both trivial answers and the floor on every measure
    painted = first["appearance_part_colours"]
    for other in ("structure_image", "appearance_image", "flat_mean_colour"):
        assert painted["ssim"] > first[other]["ssim"] and painted["l1"] < first[other]["l1"]
        assert painted["person_ssim"] > first[other]["person_ssim"]
        assert painted["person_l1"] < first[other]["person_l1"]
    for answer in ("swap", "structure_image", "appearance_image"):
        assert first[answer]["person_luma_l1"] > 0 and first[answer]["person_chroma_l1"] > 0
    assert 0 < first["swap"]["ssim"] < 1 and first["swap"]["l1"] > 0
    again = quality.swap_fidelity(g, e, models.cfg, splits, torch.device("cpu"), n_pairs=8, seed=3)
    assert again == first
    other = quality.fidelity_set(models.cfg, splits, n_pairs=8, seed=4)
    assert other.pairs != quality.fidelity_set(models.cfg, splits, n_pairs=8, seed=3).pairs
    tags = quality.scalars({"swap_fidelity": first})
    assert tags["generation/swap_fidelity/swap/ssim"] == first["swap"]["ssim"]
    assert tags["generation/swap_fidelity/identity_judge/swap/chroma_top1"] == judged["swap"]["chroma_top1"]
    assert "generation/swap_fidelity/identity_judge/chance" not in tags
    assert "generation/swap_fidelity/pairs" not in tags


def test_part_colours_fills_each_target_part_with_the_appearance_images_part_mean():
    upper, lower, occluder = (synthetic.PART_NAMES.index(n) for n in ("upper", "lower", "occluder"))
    appearance = torch.zeros(1, 3, 4, 2)
    appearance[0, 0, :2] = torch.tensor([[0.2, 0.4], [0.6, 0.8]])  # upper rows: red 0.2..0.8, mean 0.5
    appearance[0, 2, 2:] = 1.0  # lower rows: blue
    appearance_parts = torch.tensor([[[upper, upper], [upper, upper], [lower, lower], [lower, lower]]],
                                    dtype=torch.uint8)
    canvas = torch.full((1, 3, 4, 2), 0.3)
    target_parts = torch.tensor([[[0, upper], [lower, lower], [occluder, upper], [0, 0]]], dtype=torch.uint8)
    out = quality.part_colours(appearance, appearance_parts, canvas, target_parts)
    red, blue = torch.tensor([0.5, 0.0, 0.0]), torch.tensor([0.0, 0.0, 1.0])
    assert torch.allclose(out[0, :, 0, 1], red) and torch.allclose(out[0, :, 2, 1], red)
    assert torch.equal(out[0, :, 1, 0], blue) and torch.equal(out[0, :, 1, 1], blue)
    # background and occluders keep the canvas (the structure image)
    for y, x in ((0, 0), (2, 0), (3, 0), (3, 1)):
        assert torch.equal(out[0, :, y, x], canvas[0, :, y, x])
    # a part the appearance image does not show takes its mean person colour
    shoes = synthetic.PART_NAMES.index("shoes")
    out = quality.part_colours(appearance, appearance_parts, canvas, torch.full((1, 4, 2), shoes, dtype=torch.uint8))
    assert torch.allclose(out[0, :, 0, 0], appearance[0].mean((1, 2)))


def test_swap_fidelity_needs_the_synthetic_dataset(tiny):
    models, splits = tiny
    cfg = {**models.cfg, "dataset": "market1501"}
    assert not quality.has_ground_truth(cfg)
    with pytest.raises(UserError, match="synthetic"):
        quality.swap_fidelity(models.generator, models.appearance_encoder, cfg, splits)


def test_reconstruction_and_diversity(tiny):
    models, splits = tiny
    rec = quality.reconstruction(models.generator, models.appearance_encoder, models.cfg, splits, n_images=6)
    assert rec["images"] == 6 and 0 < rec["ssim"] < 1
    div = quality.ssim_diversity(models.generator, models.appearance_encoder, models.cfg, splits,
                                 n_appearances=3, n_structures=3)
    assert div["identities"] == 3 and 0 < div["generated"] <= 1 and 0 < div["real"] < 1


def test_luma_chroma_split():
    grey = torch.full((1, 3, 4, 4), 0.5)
    y, c = quality.luma_chroma(grey)
    assert torch.allclose(y, grey[:, :1]) and torch.allclose(c, torch.zeros_like(c), atol=1e-6)
    red, green = torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4)
    red[:, 0], green[:, 1] = 1.0, 0.299 / 0.587  # a green exactly as bright as the red: luma 0.299
    (y_r, c_r), (y_g, c_g) = quality.luma_chroma(red), quality.luma_chroma(green)
    assert torch.allclose(y_r, y_g) and (y_r - 0.299).abs().max() < 1e-6 and (c_r - c_g).abs().mean() > 0.2
    x = torch.rand(2, 3, 4, 4)
    assert torch.allclose(quality.from_luma_chroma(*quality.luma_chroma(x)), x, atol=1e-5)
    person = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    same_colour_darker = quality.score(grey * 0.5, grey, person)  # brightness differs, colour (none) does not
    assert same_colour_darker["person_luma_l1"] == pytest.approx(0.25) and same_colour_darker["person_chroma_l1"] < 1e-6


def test_downsampled_keeps_size_and_flat_images():
    flat = torch.full((2, 3, 16, 8), 0.25)
    assert torch.allclose(quality.downsampled(flat, 4), flat)
    x = torch.rand(2, 3, 16, 8)
    y = quality.downsampled(x, 8)
    assert y.shape == x.shape and torch.allclose(y.mean(dim=(2, 3)), x.mean(dim=(2, 3)), atol=0.05)


def test_frechet_distance():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 4))
    assert quality.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shift = np.array([1.0, -2.0, 0.5, 0.0])
    assert quality.frechet_distance(a, a + shift) == pytest.approx(float((shift**2).sum()), abs=1e-6)
    # against the textbook formula with a general matrix square root: more samples than dimensions, and fewer
    for n, d in ((200, 4), (12, 30)):
        a = rng.normal(size=(n, d))
        b = rng.normal(size=(n + 3, d)) @ rng.normal(size=(d, d)) + 1.0
        ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
        root = linalg.sqrtm(ca @ cb).real
        textbook = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(ca + cb) - 2 * np.trace(root)
        assert quality.frechet_distance(a, b) == pytest.approx(float(textbook), rel=1e-6)


def test_fid_weights_must_exist(tmp_path):
    with pytest.raises(UserError, match="--fid-weights .* does not exist"):
        quality.load_inception(tmp_path / "missing.pth", torch.device("cpu"))
    (tmp_path / "junk.pth").write_bytes(b"not a state dict")
    with pytest.raises(UserError, match="not torchvision's Inception v3 weights"):
        quality.load_inception(tmp_path / "junk.pth", torch.device("cpu"))
    assert "--fid-weights" in quality.fid_hint() and "\n" not in quality.fid_hint()


# ---------------------------------------------------------------------------------------------------
# the identity judge


def test_srgb_to_lab_known_values():
    rgb = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.5, 0.5, 0.5]])
    lab = quality.srgb_to_lab(rgb)
    expected = torch.tensor([[100.0, 0.0, 0.0], [0.0, 0.0, 0.0], [53.24, 80.09, 67.20], [32.30, 79.19, -107.86],
                             [53.39, 0.0, 0.0]])
    assert torch.allclose(lab, expected, atol=0.05)


def test_lab_to_srgb_inverts_srgb_to_lab():
    rgb = torch.rand(500, 3, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(quality.lab_to_srgb(quality.srgb_to_lab(rgb)), rgb, atol=1e-4)
    # outside the gamut (a saturated green brighter than sRGB holds): clipped, not wrapped
    out = quality.lab_to_srgb(torch.tensor([90.0, -120.0, 90.0]))
    assert out.min() >= 0 and out.max() <= 1


def test_part_means_pool_each_image_through_every_layout():
    upper, lower, occluder = (synthetic.PART_NAMES.index(n) for n in ("upper", "lower", "occluder"))
    image = torch.zeros(1, 3, 2, 2)
    image[0, :, 0, :] = 1.0  # top row white, bottom row black
    layouts = torch.tensor([[[[upper, upper], [lower, lower]], [[upper, lower], [occluder, 0]]]], dtype=torch.uint8)
    means, counts = quality.part_means_lab(image, layouts)
    u, lo = upper - 1, lower - 1
    assert means.shape == (1, 2, quality._body_parts(), 3)
    assert counts[0, 0, u] == 2 and counts[0, 0, lo] == 2 and counts[0, 1, u] == 1 and counts[0, 1, lo] == 1
    assert means[0, 0, u, 0] == pytest.approx(100, abs=0.01) and means[0, 0, lo, 0] == pytest.approx(0, abs=0.01)
    assert means[0, 1, lo, 0] == pytest.approx(100, abs=0.01)  # the second layout reads the top row as lower
    assert counts[0, 1].sum() == 2  # background and occluder are no part


@pytest.fixture(scope="module")
def judged(tmp_path_factory):
    """12 test identities at 64x32, 16 seeded pairs, every reference answer judged."""
    from utils import load_config

    root = tmp_path_factory.mktemp("judge") / "data"
    synthetic.generate(root, ids=24, images_per_id=4, height=64, width=32, seed=2)
    cfg = load_config(None, ["dataset=synthetic", f"data_root={root}", "crop_image_height=64",
                             "crop_image_width=32"])
    splits = load_splits(cfg)
    data = quality.fidelity_set(cfg, splits, n_pairs=16, seed=0)
    judge = quality.judge_set(cfg, splits, n_pairs=16, seed=0)
    flat = torch.cat([data.structure, data.appearance]).mean(dim=(0, 2, 3), keepdim=True).expand_as(data.target)
    recoloured = quality.from_luma_chroma(quality.luma_chroma(data.structure)[0], quality.luma_chroma(data.target)[1])
    answers = {"true_swap": data.target, "structure_image": data.structure, "appearance_image": data.appearance,
               "flat_mean_colour": flat, "true_colours_structure_luma": recoloured}
    return cfg, splits, data, judge, quality.identity_judge(answers, judge)


def test_judge_knows_the_answers(judged):
    _, _, data, judge, verdict = judged
    assert verdict["identities"] == len(judge.pids) == 12 and verdict["chance"] == pytest.approx(1 / 12)
    assert judge.candidate_parts.shape == (16, 12, 64, 32)
    for (a, b), ia, ib in zip(data.pairs, judge.appearance_index, judge.structure_index):
        assert judge.pids[int(ia)] == int(a.split("_")[0]) and judge.pids[int(ib)] == int(b.split("_")[0])
    # B's own part labels are those of B's identity drawn in B's structure, the judge's candidate for B
    own = judge.candidate_parts[torch.arange(16), judge.structure_index]
    assert torch.equal(data.structure_parts, own) and not torch.equal(data.structure_parts, data.target_parts)
    # the true swap is A's identity in B's structure: judged A, in full and on chroma alone
    truth = verdict["true_swap"]
    assert truth["top1"] == truth["chroma_top1"] == 1.0 and truth["as_structure"] == 0.0
    assert truth["mean_rank_appearance"] == 1.0
    # the structure image is B's identity in B's structure: judged B, never A
    structure = verdict["structure_image"]
    assert structure["as_structure"] == structure["chroma_as_structure"] == 1.0 and structure["top1"] == 0.0
    # A's colours on B's brightness: chroma alone finds A, the full judge is pulled towards B by L*
    recoloured = verdict["true_colours_structure_luma"]
    assert recoloured["chroma_top1"] >= 0.8 and recoloured["top1"] < recoloured["chroma_top1"]
    # A's own image in another pose: A's colours in the wrong places, well above chance and rarely B
    appearance = verdict["appearance_image"]
    assert appearance["top5"] > 0.5 and appearance["top1"] > 2 * verdict["chance"]
    assert appearance["as_structure"] <= 0.125
    # one flat image for every pair carries no identity: about chance, far below the truth
    flat = verdict["flat_mean_colour"]
    assert flat["top1"] <= 0.25 and flat["mean_rank_appearance"] > 3


def test_judge_on_chosen_parts(judged):
    """`parts` judges on some body parts only: the garments of the true swap are still A's; painting A's garments
    into the structure image fools a garment judge but not the whole-body one; all parts equals the default."""
    _, _, data, judge, _ = judged
    upper, lower = synthetic.PART_NAMES.index("upper"), synthetic.PART_NAMES.index("lower")
    everything = range(1, quality._body_parts() + 1)
    default, listed = quality.judge_distances(data.target, judge), quality.judge_distances(data.target, judge,
                                                                                          everything)
    assert torch.allclose(default[0], listed[0]) and torch.allclose(default[1], listed[1])
    garments = (upper, lower)
    assert quality.judge_verdicts(quality.judge_distances(data.target, judge, garments)[1], judge)["top1"] == 1.0
    garment_pixels = ((data.target_parts == upper) | (data.target_parts == lower))[:, None]
    dressed = torch.where(garment_pixels, data.target, data.structure)  # B with A's garments
    on_garments = quality.judge_verdicts(quality.judge_distances(dressed, judge, garments)[1], judge)
    whole = quality.judge_verdicts(quality.judge_distances(dressed, judge)[1], judge)
    assert on_garments["top1"] >= 0.9 and whole["top1"] < on_garments["top1"]


def test_judge_candidates_are_cached_beside_the_dataset(judged):
    cfg, splits, data, judge, _ = judged
    cached = quality._judge_cache_file(cfg, (64, 32), 16, 0)
    assert cached.is_file()
    quality._JUDGE_CACHE.clear()
    again = quality.judge_set(cfg, splits, n_pairs=16, seed=0)  # read back from the file
    assert again is not judge and torch.equal(again.candidate_parts, judge.candidate_parts)
    assert torch.equal(again.candidate_lab, judge.candidate_lab) and again.pids == judge.pids
    d_again, d_first = quality.judge_distances(data.target, again), quality.judge_distances(data.target, judge)
    assert torch.equal(d_again[0], d_first[0]) and torch.equal(d_again[1], d_first[1])
    # a file that does not match the dataset's metadata (another dataset, or a damaged file) is drawn again
    saved = torch.load(cached, weights_only=True)
    saved["stamp"] = [0, 0]
    saved["judge"]["candidate_lab"] = torch.zeros_like(saved["judge"]["candidate_lab"])
    torch.save(saved, cached)
    quality._JUDGE_CACHE.clear()
    redrawn = quality.judge_set(cfg, splits, n_pairs=16, seed=0)
    assert torch.equal(redrawn.candidate_lab, judge.candidate_lab)
