"""The config system: defaults, _base_ inheritance, --opts, typos and types, dump and re-read."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from utils import REPO_ROOT, UserError, config_help, dump_config, load_config, parse_opts, saved_config, schema


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_are_the_original_dgnet_values():
    cfg = load_config()
    assert cfg["recon_x_w"] == 5.0 and cfg["recon_id_w"] == 0.5 and cfg["max_teacher_w"] == 2.0
    assert cfg["gen"]["dim"] == 16 and cfg["gen"]["mlp_dim"] == 512 and cfg["dis"]["num_scales"] == 3
    assert cfg["lr2"] == 0.002 and cfg["step_size"] == 60000 and cfg["max_iter"] == 100000
    assert (cfg["crop_image_height"], cfg["crop_image_width"], cfg["batch_size"]) == (256, 128, 8)


def test_every_key_has_one_comment_and_no_config_repeats_it():
    sch = schema()
    for key in sch.flat_defaults:
        assert sch.comments.get(key), f"{key} has no comment in defaults.yaml"
    # The shipped configs set values; the meaning of a key is documented only in defaults.yaml.
    for path in (REPO_ROOT / "configs").rglob("*.yaml"):
        if path.name == "defaults.yaml":
            continue
        for line in path.read_text().splitlines():
            m = re.match(r"^\s*([A-Za-z_]\w*):\s*[^#\s][^#]*#", line)
            assert m is None or m.group(1) in ("data_root", "teacher"), f"{path.name}: '{line.strip()}'"


def test_all_shipped_configs_load():
    for path in (REPO_ROOT / "configs").rglob("*.yaml"):
        cfg = load_config(path)
        assert set(cfg) == set(schema().defaults)


def test_latest_carries_the_original_market_settings():
    cfg = load_config(REPO_ROOT / "configs" / "latest.yaml")
    assert cfg["dataset"] == "market1501" and cfg["ID_class"] == 751
    for key in ("sqrt", "use_decoder_again", "input_dim_b", "new_size", "norm_id", "apex", "vgg_w"):
        assert key not in cfg


def test_base_inheritance_chain_and_override_order(tmp_path):
    write(tmp_path / "a.yaml", "lr_g: 0.5\nmax_iter: 10\ngen:\n  dim: 4\n")
    write(tmp_path / "b.yaml", "_base_: a.yaml\nmax_iter: 20\ngen:\n  mlp_dim: 8\n")
    sub = tmp_path / "sub"
    sub.mkdir()
    write(sub / "c.yaml", "_base_: ../b.yaml\nseed: 3\n")
    cfg = load_config(sub / "c.yaml", ["max_iter=30", "gen.n_res=1"])
    assert cfg["lr_g"] == 0.5 and cfg["seed"] == 3
    assert cfg["max_iter"] == 30  # --opts beat every file
    assert cfg["gen"] == {**schema().defaults["gen"], "dim": 4, "mlp_dim": 8, "n_res": 1}  # sections merge


def test_several_bases_apply_in_order(tmp_path):
    write(tmp_path / "x.yaml", "seed: 1\nlr_d: 0.1\n")
    write(tmp_path / "y.yaml", "seed: 2\n")
    cfg = load_config(write(tmp_path / "z.yaml", "_base_: [x.yaml, y.yaml]\n"))
    assert cfg["seed"] == 2 and cfg["lr_d"] == 0.1


def test_inheritance_loop_is_an_error(tmp_path):
    write(tmp_path / "p.yaml", "_base_: q.yaml\n")
    write(tmp_path / "q.yaml", "_base_: p.yaml\n")
    with pytest.raises(UserError, match="loop"):
        load_config(tmp_path / "p.yaml")


@pytest.mark.parametrize("text, closest", [
    ("recon_x_W: 5\n", "recon_x_w"),
    ("gen:\n  mlp_dims: 8\n", "gen.mlp_dim"),
    ("lr: 0.1\n", "lr2"),
    ("LAMBDA: 0.1\n", "dis.LAMBDA"),
])
def test_unknown_key_names_the_key_and_the_closest(tmp_path, text, closest):
    with pytest.raises(UserError) as info:
        load_config(write(tmp_path / "typo.yaml", text))
    assert f"did you mean '{closest}'" in str(info.value)
    assert "typo.yaml" in str(info.value)


@pytest.mark.parametrize("opts, message", [
    (["max_iter=ten"], "'max_iter' must be an integer"),
    (["max_iter=1.5"], "'max_iter' must be an integer"),
    (["train_bn=1"], "'train_bn' must be a boolean"),
    (["dataset=[1]"], "'dataset' must be a string"),
    (["dataset=true"], "'dataset' must be a string"),
    (["gen=3"], "'gen' is a section"),
    (["ID_class=many"], "'ID_class' must be an integer or null"),
    (["novel.key=1"], "unknown config key 'novel'"),
    (["max_iter"], "key=value"),
])
def test_wrong_values_are_errors(opts, message):
    with pytest.raises(UserError, match=re.escape(message)):
        load_config(None, opts)


def test_values_are_converted_to_the_default_type():
    cfg = load_config(None, ["lr_g=1e-4", "gan_w=2", "ID_class=10", "data_root=123", "ID_class=null"])
    assert cfg["lr_g"] == 1e-4 and isinstance(cfg["lr_g"], float)  # YAML reads 1e-4 as a string
    assert cfg["gan_w"] == 2.0 and isinstance(cfg["gan_w"], float)
    assert cfg["data_root"] == "123" and cfg["ID_class"] is None


def test_parse_opts_nests_and_reads_yaml_values():
    assert parse_opts(["a.b.c=1", "a.d=true", "e=[1, 2]", "f="]) == {"a": {"b": {"c": 1}, "d": True}, "e": [1, 2],
                                                                     "f": ""}


def test_dump_and_reread_is_identical(tmp_path):
    cfg = load_config(REPO_ROOT / "configs" / "quickstart" / "dgnet.yaml", ["lr_g=3e-5", "seed=7"])
    out = tmp_path / "config.yaml"
    dump_config(cfg, out)
    assert load_config(out) == cfg
    assert yaml.safe_load(out.read_text()) == cfg


def test_a_run_written_before_a_key_existed_keeps_how_it_was_trained(tmp_path):
    """A run's resolved config holds every key it knew: one it lacks was added later, and takes the value
    the run was trained with (utils.ADDED_KEYS), not today's default. A user's own file takes the default."""
    cfg = load_config(REPO_ROOT / "configs" / "latest.yaml")
    assert cfg["scale2"] is True  # the original's behaviour
    assert load_config(REPO_ROOT / "configs" / "quickstart" / "dgnet.yaml")["scale2"] is False
    old = dict(cfg)
    del old["scale2"]
    dump_config(old, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml")["scale2"] is False
    assert load_config(tmp_path / "config.yaml", ["scale2=true"])["scale2"] is True
    assert saved_config(old)["scale2"] is False and saved_config(cfg)["scale2"] is True
    del old["f_grad_w"]  # written before the key existed: f was detached
    assert saved_config(old)["f_grad_w"] == 0.0
    # any other key added since takes its default, nested ones included: the stored config reads whole
    old["dis"] = {k: v for k, v in cfg["dis"].items() if k != "r1_every"}
    del old["structure_jitter"]
    filled = saved_config(old)
    assert filled["dis"]["r1_every"] == 1 and filled["structure_jitter"] == 0.0
    assert filled["dis"]["dim"] == cfg["dis"]["dim"] and filled["max_iter"] == cfg["max_iter"]
    assert filled == {**cfg, "scale2": False, "f_grad_w": 0.0}
    mine = write(tmp_path / "mine.yaml", "max_iter: 5\n")
    assert load_config(mine)["scale2"] is True


def test_bad_yaml_and_missing_file_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(write(tmp_path / "bad.yaml", "a: [1, 2\n"))
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(UserError, match="mapping"):
        load_config(write(tmp_path / "list.yaml", "- 1\n- 2\n"))


def test_config_help_lists_every_key():
    text = config_help()
    for key in schema().flat_defaults:
        assert key in text


def test_every_numeric_key_has_a_range_that_its_default_is_in():
    from utils import RANGES

    sch = schema()
    numeric = {k for k, t in sch.types.items() if t in (int, float)}
    assert numeric == set(RANGES), "give each int/float key of defaults.yaml a range in utils.RANGES"
    for key in numeric:
        default = sch.flat_defaults[key]
        assert default is None or RANGES[key].holds(default), key
    for path in (REPO_ROOT / "configs").rglob("*.yaml"):
        load_config(path)  # the shipped configs are in range too


@pytest.mark.parametrize("opts, message", [
    (["batch_size=0"], "'batch_size' is 0: use an integer of 1 or more"),
    (["num_workers=-1"], "'num_workers' is -1: use an integer of 0 or more"),
    (["lr_g=nan"], "'lr_g' is nan: use a finite number of 0 or more"),
    (["lr_d=.inf"], "'lr_d' is inf"),
    (["erasing_p=1.01"], "'erasing_p' is 1.01: use a finite number from 0 to 1"),
    (["beta2=1"], "'beta2' is 1.0: use a finite number from 0 to below 1"),
    (["dis.r1_every=0"], "'dis.r1_every' is 0"),
    (["eval_iter=0"], "'eval_iter' is 0"),
    (["ID_class=0"], "'ID_class' is 0"),
    (["pad_mode=reflect"], "'pad_mode' is 'reflect': use edge or zero"),
])
def test_values_out_of_range_name_the_key_and_what_works(opts, message):
    with pytest.raises(UserError, match=re.escape(message)):
        load_config(None, opts)


def test_out_of_range_values_in_a_file_name_the_file(tmp_path):
    with pytest.raises(UserError, match=r"bad\.yaml: config key 'keep_last' is -1"):
        load_config(write(tmp_path / "bad.yaml", "keep_last: -1\n"))
    assert load_config(None, ["ID_class=null", "fidelity_iter=0", "val_ids=0"])["ID_class"] is None


def test_config_files_that_are_not_configs_are_one_line(tmp_path):
    bad_base = tmp_path / "base.yaml"
    bad_base.write_text("_base_: 3\n")
    with pytest.raises(UserError, match="_base_ names the config file"):
        load_config(bad_base)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"lr_g: \xff\xfe\n")
    with pytest.raises(UserError, match="not a text file in UTF-8"):
        load_config(binary)


def test_mismatch_reason_names_what_does_not_fit():
    from torch import nn

    from utils import mismatch_reason

    def error(a: nn.Module, b: nn.Module) -> RuntimeError:
        with pytest.raises(RuntimeError) as info:
            b.load_state_dict(a.state_dict())
        return info.value

    head = lambda n: nn.Sequential(nn.Linear(4, 4), nn.Linear(4, n))  # noqa: E731
    named = lambda n: nn.ModuleDict({"classifier": nn.Linear(8, n)})  # noqa: E731
    assert mismatch_reason(error(named(751), named(702))) == "its classifier has 751 identities, this config's data 702"
    assert "size mismatch for 1.weight" in mismatch_reason(error(head(3), head(5)))
    assert "Missing key" in mismatch_reason(error(nn.Sequential(nn.Linear(4, 4)), head(3)))
    assert mismatch_reason(RuntimeError("")) == "RuntimeError"


def test_a_yaml_boolean_for_a_word_says_to_quote_it():
    with pytest.raises(UserError, match="YAML reads yes/no/on/off as true/false: quote a word"):
        load_config(None, ["cuda_graph=off"])
