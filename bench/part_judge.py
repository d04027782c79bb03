"""Where a swap loses A's clothes, body part by body part: which parts keep the identity judge's chroma figure
down, and whether a part's colour comes from A's code, from B's structure image, or from neither.

    python bench/part_judge.py --name RUN [--output_path P] [--which_iter N ...] [--json FILE]

Synthetic data only; the seeded test pairs and candidates of `visualize.py metrics`. For each body part (skin,
hair, upper, lower, shoes, bag), over the pairs where both the true swap and B's own image show it (a bag, a
cap, sleeves and skirts belong to the identity in the synthetic data, so B may lack A's):

- share: the part's share of the true swap's person pixels (the judge weights each part by its candidate's);
- from A: the least-squares slope of the swap's mean a*b* on the true swap's (A's colour in B's light), and
  their correlation. 1 and 1 is a swap that wears A's colour; a slope under 1 with a high correlation is the
  right hue, washed out towards the average;
- from B: in one joint fit of the swap's a*b* on A's and on B's own colour of that part (B's structure image
  through B's own part labels), B's coefficient: colour that leaks from the structure image. E_s sees only
  its grey levels, so anything here is read from B's shapes and shading;
- error: the mean a*b* distance (Delta E, chroma only) between the swap's and the true swap's part colour,
  and the same for B's own reconstruction G(s_B, f_B) against B, with its slope on B's colour: what G does
  with the code of the image it encoded; and B rebuilt from the code of another test image of B (the
  same-person reconstruction DG-Net trains with a pixel target), its slope on B's colour and error;
- judge counterfactuals: the chroma top-1 with only this part replaced by the true swap's pixels (the rest
  as G drew it), and with only this part as G drew it (the rest true). The first says how much fixing this
  part alone would gain; the second how much this part alone costs. The same for the upper and lower
  garments together.

Beside it, three checks of the judge itself and two more readings of the swap's colours:
- the judge on the garments alone (upper and lower), for the swap and the references: does the verdict hang on
  the parts that are not clothes;
- the precision it asks for: how far, on the judge's own chroma distance, the nearest other candidate is from
  A's for each pair (a swap must come closer to A's colours than that), beside how far the swap and the
  appearance image are from A's (medians), and how far A's own part colours as A's image shows them (A's light,
  A's pose) are, painted flat on B's parts: the part of the margin that no answer made from A's image alone can
  win back without undoing A's light; and the chroma top-1 on the pairs whose
  A has a look-alike among the test identities (the synthetic data's hard negatives) and on the others;
- the tolerance: the chroma top-1 of A's colours painted flat on the true swap's parts with every part's a*b*
  moved r Delta E in a random direction, from A's colours in B's light and from A's colours as A's image shows
  them: how close a swap must come for the judge's chroma bar;
- the parts' insides (each part less the pixels whose 3x3 neighbourhood holds another label): the slope on A
  and the judge with the part means taken there, for the swap, the true swap and the appearance image. A slope
  that rises inside is colour lost where G blurs across a part's edge, not a washed-out hue;
- where the layouts agree (the pixels whose part in the true swap is the one B's own image has there; A's
  sleeves, skirt, cap and bag belong to A, and E_s sees B's): the slope on A there. A slope that rises there is
  colour lost to the shapes G takes from B.

Prints a table per checkpoint; writes JSON (default bench/results/part_judge_<run>.json).
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from judge_cli import run_over_checkpoints  # noqa: E402

import quality  # noqa: E402
from data import synthetic  # noqa: E402

PARTS = synthetic.PART_NAMES[1:synthetic.PART_NAMES.index("occluder")]
GARMENTS = (synthetic.PART_NAMES.index("upper"), synthetic.PART_NAMES.index("lower"))
MIN_PIXELS = 5  # a part smaller than this in a pair's true swap or in B's image: that pair is left out of its fits


def part_ab(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean a*b* of each body part, (N, P, 2), and its pixel count (N, P), for images (N, 3, H, W) in [0, 1]
    read through part labels (N, H, W)."""
    means, counts = quality.part_means_lab(images, labels[:, None])
    return means[:, 0, :, 1:], counts[:, 0]


def slope_and_correlation(target: torch.Tensor, output: torch.Tensor) -> tuple[float, float]:
    """Least-squares slope of output on target and their correlation, both (n, 2), over the pairs and both
    chroma channels, each channel centred on its own mean."""
    t, o = target - target.mean(0), output - output.mean(0)
    return float((t * o).sum() / (t * t).sum().clamp_min(1e-12)), \
        float((t * o).sum() / (t.norm() * o.norm()).clamp_min(1e-12))


def joint_fit(a: torch.Tensor, b: torch.Tensor, output: torch.Tensor) -> tuple[float, float]:
    """Coefficients (on A, on B) of output ~ α·a + β·b + c per channel, one α and β for both channels."""
    centred = [x - x.mean(0) for x in (a, b, output)]
    design = torch.stack([centred[0].flatten(), centred[1].flatten()], 1).double()
    alpha, beta = torch.linalg.lstsq(design, centred[2].flatten()[:, None].double()).solution.flatten().tolist()
    return alpha, beta


def interior(parts: torch.Tensor) -> torch.Tensor:
    """Part labels (..., H, W) with every pixel whose 3x3 neighbourhood holds another label set to 0 (left
    out): each part's inside, where a colour blurred across the part's edge no longer mixes in."""
    x = parts.reshape(-1, 1, *parts.shape[-2:]).float()
    same = F.max_pool2d(x, 3, 1, 1) == -F.max_pool2d(-x, 3, 1, 1)
    return torch.where(same, x, 0).reshape(parts.shape).to(parts.dtype)


def subset_slopes(data: quality.FidelitySet, swaps: torch.Tensor, target_ab: torch.Tensor, swap_ab: torch.Tensor,
                  counts: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """Per part, the swap's colour read only where `labels` (N, H, W; the true swap's part labels with some
    pixels set to 0) keeps it: the slope on the true swap's colour there and the error there (chroma Delta E),
    beside the whole part's slope; and the true swap's whole-part colour on its colour there (below 1: the
    left-out pixels dilute even a sharp drawing's part mean). `target_ab`, `swap_ab`, `counts`: the true swap's
    and the swap's whole-part colours and the true swap's part sizes (`part_ab`). Also the share of the person's
    pixels kept."""
    sub_ab, sub_counts = part_ab(swaps, labels)
    true_sub_ab, _ = part_ab(data.target, labels)
    parts = {}
    for k, name in enumerate(PARTS):
        shown = (counts[:, k] >= MIN_PIXELS) & (sub_counts[:, k] >= MIN_PIXELS)
        if int(shown.sum()) >= 3:
            a, a_sub = target_ab[shown, k], true_sub_ab[shown, k]
            parts[name] = {"pairs": int(shown.sum()), "slope_a": slope_and_correlation(a, swap_ab[shown, k])[0],
                           "subset_slope_a": slope_and_correlation(a_sub, sub_ab[shown, k])[0],
                           "true_whole_on_subset": slope_and_correlation(a_sub, a)[0],
                           "subset_error": float((sub_ab[shown, k] - a_sub).norm(dim=1).mean())}
    return {"pixels_kept": float(sub_counts.sum() / counts.sum().clamp_min(1)), "parts": parts}


def inside_parts(data: quality.FidelitySet, judge: quality.JudgeSet, swaps: torch.Tensor,
                 target_ab: torch.Tensor, swap_ab: torch.Tensor, counts: torch.Tensor) -> dict[str, Any]:
    """The swap's colours read on the parts' insides only (`subset_slopes` of `interior`): a slope that rises
    inside is colour lost where G blurs across an edge, not a washed-out hue. Then the judge with every image's
    part means taken inside the candidate's parts; the candidates' own means stay those of their whole parts
    (not kept as images), so the true swap's verdict here says how much that mismatch costs."""
    inside_judge = dataclasses.replace(judge, candidate_parts=interior(judge.candidate_parts), bins=None,
                                       references=None)
    answers = {"swap": swaps, "true_swap": data.target, "appearance_image": data.appearance}
    return {**subset_slopes(data, swaps, target_ab, swap_ab, counts, interior(data.target_parts)),
            "judge": {k: verdicts(v, inside_judge) for k, v in answers.items()}}


def layouts_agree(data: quality.FidelitySet, swaps: torch.Tensor, target_ab: torch.Tensor, swap_ab: torch.Tensor,
                  counts: torch.Tensor) -> dict[str, Any]:
    """The swap's colours read only where the true swap's part is the one B's own image has there: A's sleeves,
    skirt, cap and bag belong to A, so the true swap's layout differs from B's, which is all E_s sees. A slope
    that rises here is colour lost to the shapes G takes from B, not a washed-out hue."""
    agree = torch.where(data.target_parts == data.structure_parts, data.target_parts, 0)
    return subset_slopes(data, swaps, target_ab, swap_ab, counts, agree)


def chroma_top1(images: torch.Tensor, judge: quality.JudgeSet) -> float:
    return quality.identity_judge({"x": images}, judge)["x"]["chroma_top1"]


def verdicts(images: torch.Tensor, judge: quality.JudgeSet, parts: tuple[int, ...] | None = None,
             distances: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, float]:
    """top1 / top5 / as_structure in full and on chroma (chroma_*), on the chosen parts; `distances`: the
    images' judge_distances on those parts when the caller has them."""
    full, chroma = distances if distances is not None else quality.judge_distances(images, judge, parts)
    keep = ("top1", "top5", "as_structure")
    return {**{k: v for k, v in quality.judge_verdicts(full, judge).items() if k in keep},
            **{f"chroma_{k}": v for k, v in quality.judge_verdicts(chroma, judge).items() if k in keep}}


def look_alikes(cfg: dict[str, Any], judge: quality.JudgeSet) -> torch.Tensor:
    """For each pair, whether A belongs to a look-alike group among the judge's candidates: A is a near
    neighbour of another test identity, or another is one of A."""
    near = {i["pid"]: i["near_neighbour_of"] for i in synthetic.load_metadata(cfg["data_root"]).identities}
    candidates = set(judge.pids)
    grouped = {p for p in candidates if near.get(p) in candidates}
    grouped |= {near[p] for p in grouped}
    return torch.tensor([judge.pids[int(i)] in grouped for i in judge.appearance_index])


def judge_checks(cfg: dict[str, Any], data: quality.FidelitySet, judge: quality.JudgeSet,
                 swaps: torch.Tensor) -> dict[str, Any]:
    """The judge on the garments alone, the precision it asks for and its tolerance (see the module's
    docstring)."""
    flat = torch.cat([data.structure, data.appearance]).mean(dim=(0, 2, 3), keepdim=True).expand_as(data.target)
    # A's own part colours as A's image shows them (A's light and pose), flat on B's parts
    observed = quality.part_colours(data.appearance, data.appearance_parts, data.structure, data.target_parts)
    answers = {"swap": swaps, "appearance_image": data.appearance, "structure_image": data.structure,
               "flat_mean_colour": flat, "appearance_part_colours": observed}
    distances = {k: quality.judge_distances(v, judge) for k, v in answers.items()}
    judged_on = {k: {"all_parts": verdicts(v, judge, distances=distances[k]), "garments": verdicts(v, judge, GARMENTS)}
                 for k, v in answers.items()}
    margins = {}
    for name, parts in (("all_parts", None), ("garments", GARMENTS)):
        # the true swap is candidate A itself, drawn: its second-nearest candidate is the nearest other person
        chroma = quality.judge_distances(data.target, judge, parts)[1]
        nearest_other = chroma.scatter(1, judge.appearance_index[:, None], float("inf")).min(1).values
        q = torch.quantile(nearest_other, torch.tensor([0.25, 0.5, 0.75])).tolist()
        margins[name] = {"quartile_1": q[0], "median": q[1], "quartile_3": q[2]}
    grouped = look_alikes(cfg, judge)
    split = {}
    # how close each answer comes to A's colours (for A's observed colours: how much of the margin any answer
    # made from A's image alone already spends), and whether A's are the nearest, with and without look-alikes
    for key in ("swap", "appearance_image", "appearance_part_colours"):
        chroma = distances[key][1]
        margins[f"{key}_to_a"] = {"median": float(chroma[torch.arange(len(chroma)), judge.appearance_index].median())}
        hit = (chroma.argsort(dim=1, stable=True)[:, 0] == judge.appearance_index).float()
        split[key] = {"with_look_alike": float(hit[grouped].mean()) if grouped.any() else None,
                      "without": float(hit[~grouped].mean()) if (~grouped).any() else None}
    return {"judge_on": judged_on, "nearest_other_chroma": margins, "pairs_with_look_alike": int(grouped.sum()),
            "chroma_top1_by_look_alike": split, "tolerance": tolerance(data, judge, observed)}


TOLERANCE_RADII = (0, 2, 4, 6, 8)  # Delta E (a*b*) added to every body part's colour by `tolerance`
TOLERANCE_SEEDS = 3


def flat_parts(part_lab: torch.Tensor, parts: torch.Tensor, canvas: torch.Tensor) -> torch.Tensor:
    """`canvas` (N, 3, H, W) with each body part of `parts` (N, H, W) filled flat with its colour in `part_lab`
    (N, P, 3; CIELAB, parts 1..P)."""
    body = len(PARTS)
    table = quality.lab_to_srgb(part_lab)  # (N, P, 3)
    index = (parts.long() - 1).clamp(0, body - 1)
    painted = torch.gather(table, 1, index.flatten(1)[..., None].expand(-1, -1, 3))
    painted = painted.transpose(1, 2).reshape(canvas.shape)
    on_body = ((parts >= 1) & (parts <= body))[:, None]
    return torch.where(on_body, painted, canvas)


def tolerance(data: quality.FidelitySet, judge: quality.JudgeSet,
              observed: torch.Tensor) -> dict[str, list[dict[str, float]]]:
    """How far a swap's part colours may stray and still be judged A on chroma: every body part of the true
    swap's layout painted flat with A's colour, moved by r Delta E in a random a*b* direction (L* kept), judged
    on chroma (mean over TOLERANCE_SEEDS draws). From A's colours in B's light (the candidate's own), and from
    A's colours as A's image shows them: `observed`, `quality.part_colours` of the pairs."""
    sources = {name: quality.part_means_lab(images, data.target_parts[:, None])[0][:, 0]
               for name, images in (("a_in_b_light", data.target), ("a_as_a_image_shows", observed))}
    out = {}
    for name, lab in sources.items():
        rows = []
        for r in TOLERANCE_RADII:
            hits = []
            for k in range(TOLERANCE_SEEDS):
                angle = torch.rand(lab.shape[:2], generator=torch.Generator().manual_seed(k)) * 2 * torch.pi
                moved = lab + r * torch.stack([torch.zeros_like(angle), angle.cos(), angle.sin()], -1)
                hits.append(chroma_top1(flat_parts(moved, data.target_parts, data.structure), judge))
            rows.append({"radius": r, "chroma_top1": sum(hits) / len(hits)})
        out[name] = rows
    return out


def other_images_of_b(cfg: dict[str, Any], splits: Any, data: quality.FidelitySet) -> tuple[torch.Tensor, torch.Tensor]:
    """For each pair, another test image of B's identity ([0, 1]; B's own image where B has no other) and
    whether it has one: G(s_B, f of that image) is the same-person reconstruction that DG-Net trains on pixels,
    read on the same test people as the swaps."""
    people = quality._test_people(splits)  # the people the pairs are drawn from, in the same order
    by_name = {Path(r.path).name: r for r in people}
    size = quality.image_size(cfg)
    images, found = [], []
    for k, (_, b_name) in enumerate(data.pairs):
        b = by_name[b_name]
        other = next((r for r in people if r.pid == b.pid and r.path != b.path), None)
        images.append(quality.load_unit(other.path, size) if other is not None else data.structure[k])
        found.append(other is not None)
    return torch.stack(images), torch.tensor(found)


def part_rows(models: Any, splits: Any, n_pairs: int = 64, seed: int = 0) -> dict[str, Any]:
    data = quality.fidelity_set(models.cfg, splits, n_pairs, seed)
    judge = quality.judge_set(models.cfg, splits, n_pairs, seed)
    others, has_other = other_images_of_b(models.cfg, splits, data)
    with quality.eval_mode(models.generator, models.appearance_encoder):
        swaps = quality.swap(models.generator, models.appearance_encoder, quality.normalize(data.structure),
                             quality.normalize(data.appearance))
        rebuilt = quality.swap(models.generator, models.appearance_encoder, quality.normalize(data.structure),
                               quality.normalize(data.structure))
        from_other = quality.swap(models.generator, models.appearance_encoder, quality.normalize(data.structure),
                                  quality.normalize(others))
    target_ab, counts = part_ab(data.target, data.target_parts)
    swap_ab, _ = part_ab(swaps, data.target_parts)
    b_ab, b_counts = part_ab(data.structure, data.structure_parts)
    rebuilt_ab, _ = part_ab(rebuilt, data.structure_parts)
    other_ab, _ = part_ab(from_other, data.structure_parts)
    share = counts / counts.sum(1, keepdim=True).clamp_min(1)
    rows = []
    for k, name in enumerate(PARTS):
        shown = (counts[:, k] >= MIN_PIXELS) & (b_counts[:, k] >= MIN_PIXELS)
        mask = (data.target_parts == k + 1)[:, None]
        row: dict[str, Any] = {"part": name, "pairs": int(shown.sum()), "share": float(share[:, k].mean()),
                               "true_part": chroma_top1(torch.where(mask, data.target, swaps), judge),
                               "only_part_drawn": chroma_top1(torch.where(mask, swaps, data.target), judge)}
        if int(shown.sum()) >= 3:
            a, s, b = target_ab[shown, k], swap_ab[shown, k], b_ab[shown, k]
            row["slope_a"], row["correlation_a"] = slope_and_correlation(a, s)
            row["joint_a"], row["joint_b"] = joint_fit(a, b, s)
            row["error"] = float((s - a).norm(dim=1).mean())
            row["rebuilt_error"] = float((rebuilt_ab[shown, k] - b).norm(dim=1).mean())
            row["rebuilt_slope"] = slope_and_correlation(b, rebuilt_ab[shown, k])[0]
            same = shown & has_other
            if int(same.sum()) >= 3:
                row["same_person_slope"] = slope_and_correlation(b_ab[same, k], other_ab[same, k])[0]
                row["same_person_error"] = float((other_ab[same, k] - b_ab[same, k]).norm(dim=1).mean())
        rows.append(row)
    garments = ((data.target_parts == GARMENTS[0]) | (data.target_parts == GARMENTS[1]))[:, None]
    both = {"true_part": chroma_top1(torch.where(garments, data.target, swaps), judge),
            "only_part_drawn": chroma_top1(torch.where(garments, swaps, data.target), judge)}
    return {"iteration": models.iteration, "chroma_top1": chroma_top1(swaps, judge),
            "chance": 1 / len(judge.pids), "parts": rows, "garments": both,
            "checks": judge_checks(models.cfg, data, judge, swaps),
            "inside": inside_parts(data, judge, swaps, target_ab, swap_ab, counts),
            "layouts_agree": layouts_agree(data, swaps, target_ab, swap_ab, counts)}


def print_table(result: dict[str, Any]) -> None:
    print(f"iteration {result['iteration']}: swap chroma top-1 {result['chroma_top1']:.3f} "
          f"(chance {result['chance']:.3f})")
    print(f"{'part':<6} {'pairs':>5} {'share':>6} {'slope A':>8} {'corr A':>7} {'joint A':>8} {'joint B':>8} "
          f"{'error':>6} {'rebuilt':>8} {'slope':>6} {'true part':>10} {'only part':>10}")
    for r in result["parts"]:
        fits = (f"{r['slope_a']:>8.2f} {r['correlation_a']:>7.2f} {r['joint_a']:>8.2f} {r['joint_b']:>8.2f} "
                f"{r['error']:>6.1f} {r['rebuilt_error']:>8.1f} {r['rebuilt_slope']:>6.2f}") if "error" in r \
            else f"{'(too few pairs)':>59}"
        print(f"{r['part']:<6} {r['pairs']:>5} {r['share']:>6.2f} {fits} {r['true_part']:>10.3f} "
              f"{r['only_part_drawn']:>10.3f}")
    same = [f"{r['part']} {r['same_person_slope']:.2f} / {r['same_person_error']:.1f}" for r in result["parts"]
            if "same_person_slope" in r]
    print("B rebuilt from another image of B (slope on B / error): " + (", ".join(same) or "no B with two images"))
    both = result["garments"]
    print(f"upper and lower together: chroma top-1 {both['true_part']:.3f} with both true, "
          f"{both['only_part_drawn']:.3f} with only them drawn")
    checks = result["checks"]
    print(f"{'judged on':<10} {'answer':<24} {'top-1 A':>8} {'top-5 A':>8} {'B':>6} {'chroma top-1':>13} "
          f"{'chroma top-5':>13}")
    for answer, on in checks["judge_on"].items():
        for parts, v in on.items():
            print(f"{parts:<10} {answer:<24} {v['top1']:>8.3f} {v['top5']:>8.3f} {v['as_structure']:>6.3f} "
                  f"{v['chroma_top1']:>13.3f} {v['chroma_top5']:>13.3f}")
    margins = checks["nearest_other_chroma"]
    for parts in ("all_parts", "garments"):
        m = margins[parts]
        print(f"nearest other candidate from A's colours ({parts}, chroma Delta E): median {m['median']:.1f}, "
              f"quartiles {m['quartile_1']:.1f}-{m['quartile_3']:.1f}")
    print(f"distance from A's colours (all_parts, chroma Delta E), median: swap {margins['swap_to_a']['median']:.1f}, "
          f"appearance image {margins['appearance_image_to_a']['median']:.1f}, A's colours as A's image shows them "
          f"on B's parts {margins['appearance_part_colours_to_a']['median']:.1f}")

    def share(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f}"

    for answer, s in checks["chroma_top1_by_look_alike"].items():
        print(f"chroma top-1 of the {answer}: {share(s['with_look_alike'])} on the "
              f"{checks['pairs_with_look_alike']} pairs whose A has a look-alike, {share(s['without'])} on the others")
    for source, label in (("a_in_b_light", "A's colours in B's light"),
                          ("a_as_a_image_shows", "A's colours as A's image shows them")):
        steps = ", ".join(f"{row['radius']}: {row['chroma_top1']:.3f}" for row in checks["tolerance"][source])
        print(f"chroma top-1 of {label}, flat, every part moved by r Delta E: {steps}")
    for key, where in (("inside", "on the parts' insides"), ("layouts_agree", "where B's own layout agrees")):
        sub = result[key]
        print(f"{where} ({sub['pixels_kept']:.0%} of the person's pixels): the swap's slope on A, whole part -> "
              "there; the true swap's whole part on its colour there; the swap's error there (chroma Delta E)")
        for name, r in sub["parts"].items():
            print(f"  {name:<6} {r['pairs']:>3} pairs  {r['slope_a']:.2f} -> {r['subset_slope_a']:.2f}  "
                  f"{r['true_whole_on_subset']:.2f}  {r['subset_error']:.1f}")
    inside = result["inside"]
    for answer, v in inside["judge"].items():
        print(f"  judged inside: {answer:<17} top-1 {v['top1']:.3f}  top-5 {v['top5']:.3f}  "
              f"chroma top-1 {v['chroma_top1']:.3f}  chroma top-5 {v['chroma_top5']:.3f}")


def main(argv: list[str] | None = None) -> int:
    def show(results: list[dict[str, Any]]) -> None:
        for result in results:
            print_table(result)

    return run_over_checkpoints(argv, __doc__, "part_judge", "checkpoints",
                                lambda models, splits: [part_rows(models, splits)], show)


if __name__ == "__main__":
    sys.exit(main())
