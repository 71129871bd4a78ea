"""Notebook parameters, config dataclasses and batch manifests agree (a typo guard).

Field names of each stage's dataclass equal the notebook parameter names; every manifest and
parameter file validates against the notebooks without running anything.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from dfkd import batch, config, paths

ROOT = paths.project_root()
STAGE_NOTEBOOKS = {
    "10_teacher_pretraining.py": config.TeacherConfig,
    "20_generator_synthesis.py": config.SynthConfig,
    "30_distillation.py": config.DistillConfig,
}
VIZ_NOTEBOOKS = ["40_ablations.py", "50_synthetic_grids.py", "51_tsne.py", "52_gradcam.py", "90_figures.py"]
# The notebooks' defaults are the demo recipe (what `make demo` runs, measured in the README), while
# TeacherConfig() / SynthConfig() / DistillConfig() keep the library's (the paper preset, tests, bench
# rely on them); notebooks 20 and 30 read notebook 10's teacher, which the demo batch names demo_teacher.
RECIPES = {"10_teacher_pretraining.py": "params/demo/teacher.yaml",
           "20_generator_synthesis.py": "params/demo/distill.yaml",
           "30_distillation.py": "params/demo/distill.yaml"}
# notebook 20 shows the SAM maps, so it keeps the paper's lam where the demo's distillation turns SAM off
NOTEBOOK_ONLY_DEFAULTS = {"20_generator_synthesis.py": {"teacher_run", "lam"}, "30_distillation.py": {"teacher_run"}}
MAX_CELL_PARAMETERS = 35   # a parameters cell holds what a person sets for that notebook (issue 10)


def _types(cls):
    defaults = config.field_defaults(cls)
    return {f.name: (f.type if isinstance(f.type, str) else f.type.__name__, defaults[f.name])
            for f in dataclasses.fields(cls)}


@pytest.mark.parametrize("nb,cls", STAGE_NOTEBOOKS.items())
def test_stage_notebook_cell_holds_config_fields_at_the_recipe_defaults(nb, cls):
    """Every name in the cell is a field of the stage's config with the same type, at the config's
    default or the demo recipe's value; the cell is short (the other fields keep their defaults)."""
    declared = batch.notebook_parameters(ROOT / "notebooks" / nb)
    fields = _types(cls)
    assert set(declared) <= set(fields), f"{nb} declares names {cls.__name__} lacks: {set(declared) - set(fields)}"
    assert {"run_name", "interactive"} <= set(declared), nb
    assert len(declared) <= MAX_CELL_PARAMETERS, f"{nb}: {len(declared)} parameters; keep the cell short"
    recipe = {**{k: d for k, (_, d) in fields.items()}, **batch.load_yaml(ROOT / RECIPES[nb])}
    for name, (typ, default) in declared.items():
        assert typ == fields[name][0], name
        if name not in NOTEBOOK_ONLY_DEFAULTS.get(nb, ()) and name != "run_name":
            assert default == recipe[name], f"{nb}: default of {name} is {default!r}, the recipe's {recipe[name]!r}"
    assert batch.notebook_config(ROOT / "notebooks" / nb) is cls
    assert set(batch.job_parameters(ROOT / "notebooks" / nb)) == set(fields)   # a job may set every field


@pytest.mark.parametrize("nb", ["20_generator_synthesis.py", "30_distillation.py"])
def test_method_notebooks_take_method_options_as_one_dict(nb):
    declared = batch.notebook_parameters(ROOT / "notebooks" / nb)
    assert declared["method_options"] == ("dict", {})
    assert not [n for n in declared if config.moved_parameter(n)], "an old per-method parameter is back"


def test_notebooks_20_and_30_use_notebook_10s_default_teacher():
    teacher = batch.notebook_parameters(ROOT / "notebooks/10_teacher_pretraining.py")["run_name"][1]
    for nb in ("20_generator_synthesis.py", "30_distillation.py"):
        assert batch.notebook_parameters(ROOT / "notebooks" / nb)["teacher_run"][1] == teacher, nb
    assert teacher == config.TeacherConfig().run_name
    test_split = {nb: batch.job_parameters(ROOT / "notebooks" / nb)["toy_test_per_class"][1]
                  for nb in ("10_teacher_pretraining.py", "30_distillation.py")}
    assert len(set(test_split.values())) == 1, test_split   # the same 1,000 test images


@pytest.mark.parametrize("nb", VIZ_NOTEBOOKS)
def test_report_notebooks_declare_viz_config_fields(nb):
    declared = batch.notebook_parameters(ROOT / "notebooks" / nb)
    fields = _types(config.VizConfig)
    assert declared, nb
    for name, (typ, default) in declared.items():
        assert name in fields, f"{nb} declares {name!r}, which VizConfig lacks"
        assert typ == fields[name][0], name


@pytest.mark.parametrize("manifest", sorted((ROOT / "batches").glob("*.yaml")), ids=lambda p: p.name)
def test_every_manifest_validates(manifest):
    jobs = batch.resolve_jobs(manifest)
    assert jobs
    smoke = batch.resolve_jobs(manifest, smoke=True)
    assert len(smoke) == len(jobs)


def test_collect_rejects_wrong_types_and_unknown_overrides():
    with pytest.raises(config.ConfigError, match="epochs"):
        config.collect(config.TeacherConfig, {"epochs": "3"})
    with pytest.raises(config.ConfigError, match="interactive"):
        config.collect(config.TeacherConfig, {"interactive": 1})
    with pytest.raises(config.ConfigError, match="no_such"):
        config.collect(config.DistillConfig, {}, no_such=1)
    with pytest.raises(config.ConfigError, match="sam_softmax"):
        config.collect(config.DistillConfig, {"sam_softmax": "rows"})
    cfg = config.collect(config.DistillConfig, {"lr_s": 1, "method": "dfq"})
    assert cfg.lr_s == 1.0 and isinstance(cfg.lr_s, float) and cfg.method == "dfq"


def test_unknown_set_key_fails_before_running(tmp_path, capsys):
    manifest = ROOT / "batches" / "smoke.yaml"     # from the repo, whatever the cwd
    assert manifest.is_file(), manifest
    rc = batch.main([str(manifest), "--smoke", "--runs-dir", str(tmp_path), "--set", "no_such_param=1"])
    assert rc != 0
    out = capsys.readouterr()
    assert "no_such_param" in out.out + out.err, "failed for another reason than the unknown key"
    assert not any(tmp_path.rglob("executed.ipynb"))


def test_manifests_are_found_from_another_cwd(tmp_path, monkeypatch):
    """The checks above read files relative to the repo: run from another folder they still find
    (and validate) every manifest instead of passing on a file-not-found."""
    monkeypatch.chdir(tmp_path)
    manifests = sorted((ROOT / "batches").glob("*.yaml"))
    assert manifests and all((ROOT / "notebooks" / nb).is_file() for nb in STAGE_NOTEBOOKS)
    for manifest in manifests:
        assert batch.resolve_jobs(manifest), manifest


def test_a_config_built_directly_is_type_checked():
    """DistillConfig(...) itself (not only collect / --set) rejects a mistyped value: the string
    'false' for a bool would otherwise read as true and run the term it meant to switch off."""
    from dfkd.config import ConfigError as Err, DistillConfig as DC, TeacherConfig as TC
    with pytest.raises(Err, match="use_adv"):
        DC(use_adv="false")
    with pytest.raises(Err, match="epochs"):
        TC(epochs="3")
    cfg = DC(lr_s=1)
    assert cfg.lr_s == 1.0 and isinstance(cfg.lr_s, float)


# Batches whose distillation recipes must not move when notebook 30's parameters cell (the embedded
# set's CPU preset, which `make demo` and a person in JupyterLab get) changes: a job inherits the
# cell's default for every key it leaves unset.
PINNED_BATCHES = ("paper.yaml", "workbench.yaml", "laptop.yaml", "cpu_cub.yaml")
# the presets that claim the paper's recipe: every such key pinned to the library default (the
# paper's reading), except what the paper states differently at their scale
PAPER_PARAMS = ("params/paper/distill.yaml", "params/workbench/distill.yaml")
PAPER_SCALE_KEYS = {"teacher_run", "dataset", "epochs", "iters_per_epoch", "g_steps", "s_steps", "batch_size",
                    "nz", "ngf", "num_workers", "toy_test_per_class"}


def _cell_levers() -> dict:
    """Keys whose default in notebook 30's cell differs from DistillConfig's: {name: cell default}."""
    defaults = config.field_defaults(config.DistillConfig)
    cell = batch.notebook_parameters(ROOT / "notebooks/30_distillation.py")
    return {k: v for k, (_, v) in cell.items() if k in defaults and defaults[k] != v}


@pytest.mark.parametrize("manifest", PINNED_BATCHES)
def test_reference_batches_set_every_key_notebook_30s_cell_changes(manifest):
    """A distillation job of these batches sets (params file, set or grid) every key whose default in
    notebook 30's cell differs from the library's, so editing the cell cannot change their recipes
    (the paper preset inherited the replay pool, block_norm bn and the class-coverage terms until
    2026-12-06). toy_* keys only matter on the embedded set."""
    levers = _cell_levers()
    assert {"replay", "g_oh", "block_norm"} <= set(levers)    # the check has something to check
    cell_dataset = batch.notebook_parameters(ROOT / "notebooks/30_distillation.py")["dataset"][1]
    jobs = [j for j in batch.resolve_jobs(ROOT / "batches" / manifest)
            if str(j.notebook).endswith("30_distillation.py")]
    assert jobs
    for j in jobs:
        toy = j.params.get("dataset", cell_dataset) == "toy_fgvc"   # an unset dataset is the cell's
        unset = sorted(k for k in levers if k not in j.params and (toy or not k.startswith("toy_")))
        assert not unset, (f"{manifest} job {j.run_name} inherits {unset} from notebook 30's cell: "
                           "set them in its params file")


@pytest.mark.parametrize("path", PAPER_PARAMS)
def test_paper_presets_pin_the_cpu_levers_to_the_papers_reading(path):
    """params/paper and params/workbench say 'the paper's recipe': every CPU-preset lever of notebook
    30's cell is set there to the library default (replay off, no class-coverage terms, ...)."""
    pinned = batch.load_yaml(ROOT / path)
    defaults = config.field_defaults(config.DistillConfig)
    for k in set(_cell_levers()) - PAPER_SCALE_KEYS:
        assert k in pinned, f"{path} does not pin {k}"
        assert pinned[k] == defaults[k], f"{path}: {k}={pinned[k]!r}, the library's (paper) default is {defaults[k]!r}"
