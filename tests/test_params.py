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


def _types(cls):
    return {f.name: (f.type if isinstance(f.type, str) else f.type.__name__, f.default)
            for f in dataclasses.fields(cls)}


@pytest.mark.parametrize("nb,cls", STAGE_NOTEBOOKS.items())
def test_stage_notebook_declares_exactly_the_config_fields(nb, cls):
    declared = batch.notebook_parameters(ROOT / "notebooks" / nb)
    fields = _types(cls)
    assert set(declared) == set(fields), (set(declared) ^ set(fields))
    for name, (typ, default) in declared.items():
        assert typ == fields[name][0], name
        assert default == fields[name][1], f"{nb}: default of {name} differs from {cls.__name__}"


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


def test_unknown_set_key_fails_before_running(tmp_path):
    rc = batch.main(["batches/smoke.yaml", "--smoke", "--runs-dir", str(tmp_path), "--set", "no_such_param=1"])
    assert rc != 0
    assert not any(tmp_path.rglob("executed.ipynb"))
