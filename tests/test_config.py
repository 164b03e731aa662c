"""params.yaml loading: profiles, method sections, validation errors, overrides."""

import json
from pathlib import Path

import pytest
import yaml

import shipped
from hdmap_ad.core.config import flatten, load_params, parse_params
from hdmap_ad.core.errors import HdmapError

REPO_PARAMS = shipped.params_file()


def raw_params() -> dict:
    return yaml.safe_load(REPO_PARAMS.read_text())


def test_repo_params_load_with_quick_profile():
    params = load_params(REPO_PARAMS)
    assert params.profile == "quick"
    assert params.method == "baseline"
    assert params.data_root == Path("data/raw/synthetic")


def test_paper_profile_is_the_plan_setting():
    raw = raw_params()
    raw["profile"] = "paper"
    params = parse_params(raw)
    assert params.model.encoder == "base" and params.model.weights == "hub"
    assert params.preprocess.resize == (448, 448) and params.preprocess.crop == (392, 392)
    assert params.train.steps == 3000 and params.train.batch_size == 16 and params.train.val_every == 500
    assert params.data_root == Path("data/raw/synthetic")  # the real data folder is set with data.root itself
    # the profile overrides keys but leaves the rest of a section alone
    assert params.train.lr == 0.002


def test_only_the_chosen_method_section_is_kept():
    raw = raw_params()
    raw["method"] = "focal"
    params = parse_params(raw)
    assert params.method_params == {"gamma": 2.0}
    resolved = params.resolved()
    assert resolved["focal"] == {"gamma": 2.0} and "gem" not in resolved


def test_changing_another_methods_section_keeps_the_fingerprint():
    raw = raw_params()
    raw["method"] = "focal"
    a = parse_params(raw).training_fingerprint()
    raw["gem"] = {"p": 5.0, "factor": 0.3}
    assert parse_params(raw).training_fingerprint() == a
    raw["seed"] = 7
    assert parse_params(raw).training_fingerprint() != a


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda r: r["train"].update(steps=-1), "train.steps"),
        (lambda r: r["train"].update(stpes=5), "train.stpes"),
        (lambda r: r["runtime"].update(device="gpu"), "runtime.device"),
        (lambda r: r["preprocess"].update(crop=[500, 500]), "preprocess"),
        (lambda r: r["preprocess"].update(crop=[28, 50]), "multiple of the patch size"),
        (lambda r: r.update(method="magic"), "unknown method 'magic'"),
        (lambda r: r.update(profile="huge"), "profile 'huge'"),
        (lambda r: r["data"].update(domains=["domain_A", "domain_A"]), "data.domains"),
        (lambda r: r.update(gem={"p": -1}, method="gem"), "section `gem`"),
        (lambda r: r.update(seed=-1), "seed"),
        (lambda r: r.update(seed=2**32), "seed"),
        (lambda r: r["profiles"]["quick"].update(data={"root": "elsewhere"}), "profiles.quick.data.root"),
    ],
)
def test_bad_values_give_one_clear_line(edit, needle):
    raw = raw_params()
    edit(raw)
    with pytest.raises(HdmapError) as err:
        parse_params(raw)
    message = str(err.value)
    assert needle in message and "\n" not in message


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(HdmapError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(HdmapError, match="not valid YAML"):
        load_params(bad)


def test_overrides_apply_like_dvc_set():
    params = load_params(REPO_PARAMS, ["method=topk", "train.steps=7", "topk.q=5"])
    assert params.method == "topk" and params.train.steps == 7 and params.method_params["q"] == 5
    with pytest.raises(HdmapError, match="KEY=VALUE"):
        load_params(REPO_PARAMS, ["train.steps"])


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": {}}) == {"a.b": 1, "a.c.d": [1, 2], "e": {}}


def test_unquoted_off_from_dvc_set_is_understood():
    raw = raw_params()
    raw["train"].update(amp=False)  # what `-S train.amp=off` writes back
    raw["runtime"].update(feature_cache=False)
    params = parse_params(raw)
    assert params.train.amp == "off" and params.runtime.feature_cache == "off"


def test_runtime_settings_do_not_change_the_training_config():
    raw = raw_params()
    base = parse_params(raw).training_config()
    for key, value in (
        ("device", "cpu"),
        ("num_threads", 1),
        ("log_every", 3),
        ("resume", "never"),
        ("feature_cache", "off"),
        ("checkpoint_every", 7),
    ):
        changed = raw_params()
        changed["runtime"][key] = value
        assert parse_params(changed).training_config() == base, key
    for edit in (
        lambda r: r["train"].update(steps=151),
        lambda r: r.update(seed=43),
        lambda r: r["score"].update(top_ratio=0.02),
        lambda r: r["profiles"]["quick"].update(train={"lr": 0.001}),
    ):  # a change inside the active profile
        changed = raw_params()
        edit(changed)
        assert parse_params(changed).training_config() != base


def test_params_yaml_is_written_as_dvc_writes_it_back():
    """`dvc exp run -S` rewrites params.yaml through DVC's own serializer: the experiment's diff must be
    only the values it sets (no reflowed lists, no moved or dropped comments)."""
    import shutil
    import tempfile

    from dvc.utils.hydra import apply_overrides

    folder = Path(tempfile.mkdtemp())
    copy = folder / "params.yaml"
    shutil.copy(REPO_PARAMS, copy)
    apply_overrides(copy, ["method=focal", "seed=44", "train.steps=20"])
    before, after = REPO_PARAMS.read_text().splitlines(), copy.read_text().splitlines()
    assert len(before) == len(after)
    changed = [(a, b) for a, b in zip(before, after) if a != b]
    assert [b.split("#")[0].split() for _, b in changed] == [["method:", "focal"], ["seed:", "44"], ["steps:", "20"]]


@pytest.mark.parametrize("where", ["top", "profile"])
def test_a_run_time_key_left_under_train_names_its_new_place(where):
    raw = raw_params()
    if where == "top":
        raw["train"]["device"] = "cpu"
    else:
        raw["profiles"]["quick"] = {"train": {"checkpoint_every": 5}}
    with pytest.raises(HdmapError) as err:
        parse_params(raw)
    key = "device" if where == "top" else "checkpoint_every"
    prefix = "" if where == "top" else "profiles.quick."
    assert f"{prefix}train.{key} moved to {prefix}runtime.{key}" in str(err.value)


def test_configs_recorded_before_the_runtime_section_still_load():
    from hdmap_ad.core.checkpoint import params_from_resolved

    resolved = parse_params(raw_params()).resolved()
    old = json.loads(json.dumps(resolved))
    old["train"].update(old.pop("runtime"))  # the layout model files and MLflow runs had before
    old["train"]["device"] = "cpu"
    params = params_from_resolved(old)
    assert params.runtime.device == "cpu"
    assert params.training_config() == parse_params(raw_params()).training_config()
