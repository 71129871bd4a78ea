"""Each method's own hyper-parameters: its ``Options`` dataclass, reached as ``method_options``.

The defaults equal the flat ``DistillConfig`` fields they replaced (pinned below: the documented
defaults, so results do not change); a typo, a wrong type or an old flat name fails before anything
runs, naming the key, the method and its known options: through ``collect`` (the notebooks),
``DistillConfig`` itself, ``check_overrides`` and the batch runner with a YAML job; a resume with
the same options is accepted; ``docs/methods.md`` is generated from the dataclasses.
"""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import yaml

from dfkd import batch, config, options, paths, tracking
from dfkd.config import ConfigError, DistillConfig, collect
from dfkd.methods import METHODS

ROOT = paths.project_root()

# The defaults of the flat fields before issue 10 (lib/dfkd/config.py at 3a69ab9), by their old names.
PREVIOUS_DEFAULTS = {
    "zskd_beta": 1.0, "zskd_T": 20.0, "zskd_lr": 0.01, "zskd_craft_steps": 0,
    "zskt_at": 250.0,
    "dafl_oh": 1.0, "dafl_a": 0.1, "dafl_ie": 5.0,
    "adi_bn": 0.05, "adi_tv": 1e-4, "adi_l2": 1e-5, "adi_first_bn_mul": 10.0, "adi_competition": 0.2,
    "adi_lr": 0.2, "adi_jitter": 0, "adi_craft_steps": 0, "adi_lr_schedule": "cosine",
    "dfq_bn": 1.0, "dfq_adv": 1.0, "dfq_oh": 1.0, "dfq_balance": 20.0,
    "mad_momentum": 0.9, "mad_bn": 1.0, "mad_ema_fraction": 0.5,
    "cmi_bn": 1.0, "cmi_oh": 0.5, "cmi_adv": 0.5, "cmi_adv_mask": False, "cmi_contrast": 0.8, "cmi_tau": 0.1,
    "cmi_dim": 256, "cmi_bank_size": 4096, "cmi_reset_generator": False,
    "fast_lr_z": 0.015, "fast_bn": 10.0, "fast_oh": 0.5, "fast_adv": 1.1, "fast_bn_mmt": 0.9, "fast_T": 20.0,
    "fast_meta": "fomaml", "fast_reset_l0": True, "fast_warmup": 0,
}
POOLED = ("zskd", "adi", "cmi")          # the old shared pool_size (default 0 = 2048 images)
NO_OPTIONS = ("dfad",)
# options added after the flat names moved (no old name to point from)
NEW_OPTIONS = {"dfkd_fgvc": {"sam_blocks": 4}}


def test_options_defaults_equal_the_previous_flat_defaults():
    expected = {m: {} for m in METHODS}
    for old, value in PREVIOUS_DEFAULTS.items():
        method, key = old.split("_", 1)
        expected[method][key] = value
    for m in POOLED:
        expected[m]["pool_size"] = 0
    for m, new in NEW_OPTIONS.items():
        expected[m].update(new)
    got = {m: options.defaults(cls.Options) for m, cls in METHODS.items()}
    assert got == expected
    for m, d in got.items():   # types too: 0.0 == 0 would hide an int default on a float option
        for k, v in d.items():
            assert type(v) is type(expected[m][k]), (m, k)


def test_every_old_flat_name_points_to_its_option():
    for old in [*PREVIOUS_DEFAULTS, "pool_size"]:
        msg = config.moved_parameter(old)
        assert msg and "method_options" in msg, old
    assert "method='cmi'" in config.moved_parameter("cmi_tau") and "'tau'" in config.moved_parameter("cmi_tau")
    assert all(f"method={m!r}" in config.moved_parameter("pool_size") for m in POOLED)
    assert config.moved_parameter("alpha") is None and config.moved_parameter("cmi") is None
    assert not set(PREVIOUS_DEFAULTS) & {f.name for f in dataclasses.fields(DistillConfig)}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_options_are_documented_frozen_dataclasses(method):
    cls = METHODS[method].Options
    assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen, method
    assert (cls.__doc__ or "").strip(), f"{method}: cite the paper and the source of the defaults"
    for f in dataclasses.fields(cls):
        assert f.metadata.get("help"), f"{method}.{f.name}: no description"
        assert options.option_type(f) in (int, float, str, bool), f"{method}.{f.name}"
    assert (method in NO_OPTIONS) == (not dataclasses.fields(cls)), method


# ------------------------------------------------------------------ validation
def test_typo_through_collect_names_key_method_and_known_keys():
    ns = {"method": "cmi", "method_options": {"tua": 0.2}}   # a notebook's globals
    with pytest.raises(ConfigError) as e:
        collect(DistillConfig, ns)
    msg = str(e.value)
    assert "'tua'" in msg and "'cmi'" in msg and "did you mean 'tau'" in msg
    for key in options.defaults(METHODS["cmi"].Options):
        assert key in msg, key
    with pytest.raises(ConfigError, match="'tua'.*'cmi'"):
        collect(DistillConfig, {}, method="cmi", method_options={"tua": 0.2})


@pytest.mark.parametrize("kw,match", [
    (dict(method="cmi", method_options={"tau": "0.2"}), r"method_options\['tau'\] of method 'cmi'.*float.*str"),
    (dict(method="cmi", method_options={"adv_mask": 1}), r"'adv_mask'.*bool.*int"),
    (dict(method="adi", method_options={"jitter": 2.5}), r"'jitter'.*int.*float"),
    (dict(method="fast", method_options={"meta": "maml"}), r"\['meta'\] of method 'fast' is 'maml', not one of"),
    (dict(method="adi", method_options={"lr_schedule": "linear"}), r"'lr_schedule'.*not one of"),
    (dict(method="dfq", method_options={"tau": 0.1}), r"'tau' for method 'dfq'.*dfq's options: bn, adv, oh, balance"),
    (dict(method="dfkd_fgvc", method_options={"alpha": 3.0}), r"'alpha' is a parameter of its own"),
    (dict(method="dfad", method_options={"bn": 1.0}), r"'dfad' has no options of its own"),
    (dict(method="nope", method_options={"bn": 1.0}), r"method='nope' is not a registered method"),
    (dict(method="dfq", method_options=[("bn", 1.0)]), r"method_options must be a mapping"),
])
def test_wrong_keys_types_and_values_fail_when_the_config_is_built(kw, match):
    with pytest.raises(ConfigError, match=match):
        DistillConfig(**kw)


def test_values_are_normalised_and_defaults_fill_the_rest():
    cfg = DistillConfig(method="cmi", method_options={"tau": 1, "bank_size": 64})
    assert cfg.method_options == {"tau": 1.0, "bank_size": 64} and isinstance(cfg.method_options["tau"], float)
    opts = options.resolve(METHODS["cmi"].Options, cfg.method_options, "cmi")
    assert opts.tau == 1.0 and opts.bank_size == 64 and opts.contrast == 0.8
    assert DistillConfig().method_options == {}
    with pytest.raises(ConfigError, match="'tua'"):   # dataclasses.replace checks again
        dataclasses.replace(cfg, method_options={"tua": 1.0})
    with pytest.raises(ConfigError, match="'(tau|bank_size)' for method 'dfq' \\(an option of cmi, not of dfq\\)"):   # switching the method alone
        dataclasses.replace(cfg, method="dfq")


def test_old_flat_names_fail_with_where_they_went():
    with pytest.raises(ConfigError, match=r"'cmi_tau' is now a method option: set method='cmi' with method_options=\{'tau'"):
        collect(DistillConfig, {"cmi_tau": 0.2})            # an old line left in a parameters cell
    with pytest.raises(ConfigError, match=r"'fast_bn' is now a method option"):
        collect(DistillConfig, {}, fast_bn=3.0)
    with pytest.raises(ConfigError, match=r"'pool_size' is now a method option"):
        config.check_overrides(DistillConfig, {"pool_size": 32})
    with pytest.raises(TypeError):
        DistillConfig(cmi_tau=0.2)
    assert collect(config.TeacherConfig, {"cmi_tau": 0.2}).epochs == 60   # not a distill config: not its concern


def test_check_overrides_checks_method_options_against_the_method():
    config.check_overrides(DistillConfig, {"method": "cmi", "method_options": {"tau": 0.3}})
    with pytest.raises(ConfigError, match="'tau' for method 'dfkd_fgvc'"):   # the default method
        config.check_overrides(DistillConfig, {"method_options": {"tau": 0.3}})
    with pytest.raises(ConfigError, match="must be a mapping"):
        config.check_overrides(DistillConfig, {"method_options": "tau=0.3"})


def test_methods_read_their_options_through_opts():
    from test_methods import build
    m = build("cmi", method_options={"bank_size": 24, "dim": 8})
    assert m.opts.bank_size == 24 and m.cmi_bank.shape[0] == 24 and m.head.net[-1].out_features == 8
    assert build("cmi").opts.contrast == 0.8
    assert build("adi", method_options={"pool_size": 40}).pool.capacity == 40
    paper = build("dfkd_fgvc")
    assert paper.opts == METHODS["dfkd_fgvc"].Options()
    assert len(paper.generator.sams) == 4
    assert [s.channels for s in build("dfkd_fgvc", method_options={"sam_blocks": 3}).generator.sams] == \
        [s.channels for s in paper.generator.sams][:3]
    from dfkd.methods import create_method
    from dfkd.models import create_model
    cfg = DistillConfig(method="cmi", method_options={"tau": 0.3}, device="cpu", batch_size=4)
    with pytest.raises(ConfigError, match="given for method 'cmi', but this is 'dfq'"):
        create_method("dfq", create_model("resnet_tiny_t", 4), create_model("resnet_tiny_s", 4), cfg,
                      num_classes=4, image_size=32, device="cpu")


# ------------------------------------------------------------------ batch runner
def _manifest(tmp_path, set_: dict, params: list | None = None) -> str:
    job = {"name": "d", "notebook": "notebooks/30_distillation.py", "stage": "distill", "run": "opt_{method}",
           "set": {"teacher_run": "", **set_}}
    if params:
        job["params"] = params
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump({"jobs": [job]}))
    return str(path)


def test_batch_typo_in_a_yaml_job_fails_before_anything_runs(tmp_path, capsys):
    m = _manifest(tmp_path, {"method": "cmi", "method_options": {"tua": 0.2}})
    with pytest.raises(batch.BatchError) as e:
        batch.resolve_jobs(m)
    msg = str(e.value)
    assert "job 'd'" in msg and "'tua'" in msg and "'cmi'" in msg and "bank_size" in msg, msg
    runs = tmp_path / "runs"
    rc = batch.main([m, "--runs-dir", str(runs)])
    out = capsys.readouterr()
    assert rc != 0 and "'tua'" in out.out + out.err
    assert not runs.exists() or not any(runs.rglob("*")), "something ran"


def test_batch_options_merge_over_layers_and_are_checked_after_the_merge(tmp_path):
    pfile = tmp_path / "cmi.yaml"
    pfile.write_text("method: cmi\nmethod_options: {tau: 0.2, bank_size: 64}\n")
    m = _manifest(tmp_path, {"method_options": {"bank_size": 128}}, params=[str(pfile)])
    (job,) = batch.resolve_jobs(m, sets=["method_options={dim: 32}"])
    assert job.params["method_options"] == {"tau": 0.2, "bank_size": 128, "dim": 32}
    assert job.sources["method_options"].endswith("--set")
    cfg = collect(DistillConfig, job.values)   # what the notebook builds from the injected values
    assert cfg.method_options == {"tau": 0.2, "bank_size": 128, "dim": 32}
    with pytest.raises(batch.BatchError, match=r"'dim'.*must be int|'dim'.*expected int"):
        batch.resolve_jobs(m, sets=["method_options={dim: x}"])
    with pytest.raises(batch.BatchError, match="'tau' for method 'dfq'"):   # the grid's method decides
        batch.resolve_jobs(m, sets=["method=dfq"])


def test_batch_accepts_config_fields_outside_the_short_cell_and_names_old_keys(tmp_path):
    cell = batch.notebook_parameters(ROOT / "notebooks/30_distillation.py")
    assert "mha_order" not in cell and "use_sfcl" not in cell
    (job,) = batch.resolve_jobs(_manifest(tmp_path, {"mha_order": 2, "use_sfcl": False}))
    assert job.params["mha_order"] == 2 and job.params["use_sfcl"] is False
    with pytest.raises(batch.BatchError, match="'cmi_tau'.*is now a method option"):
        batch.resolve_jobs(_manifest(tmp_path, {"cmi_tau": 0.2}))
    with pytest.raises(batch.BatchError, match="'mha_ordre'"):
        batch.resolve_jobs(_manifest(tmp_path, {"mha_ordre": 2}))


def test_torchrun_entry_point_names_old_keys_of_a_params_file(tmp_path, capsys):
    from dfkd import launch
    p = tmp_path / "old.yaml"
    p.write_text("method: cmi\ncmi_tau: 0.2\n")
    with pytest.raises(SystemExit):
        launch.main(["distill", "--params", str(p), "--runs-dir", str(tmp_path / "runs")])
    assert "'cmi_tau' is now a method option" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------ params.yaml and resume
def test_params_yaml_round_trips_options_and_resume_accepts_the_same(runs_root):
    cfg = DistillConfig(run_name="r", method="cmi", method_options={"tau": 1, "adv_mask": True})
    run = tracking.start_run("distill", "r", cfg)
    saved = yaml.safe_load((run.dir / "params.yaml").read_text())
    assert saved["method_options"] == {"tau": 1.0, "adv_mask": True}
    assert DistillConfig(**saved) == cfg
    run.state_path.parent.mkdir(parents=True, exist_ok=True)
    run.state_path.write_bytes(b"resumable")          # start_run only checks that a state exists
    tracking.start_run("distill", "r", DistillConfig(**saved))                 # the same options: fine
    tracking.start_run("distill", "r", collect(DistillConfig, {"run_name": "r", "method": "cmi",
                                                                "method_options": {"adv_mask": True, "tau": 1}}))
    with pytest.raises(RuntimeError, match="method_options"):
        tracking.start_run("distill", "r", dataclasses.replace(cfg, method_options={"tau": 0.5}))


# ------------------------------------------------------------------ docs, imports
def test_docs_methods_md_lists_every_option_as_the_dataclasses_say():
    text = (ROOT / "docs" / "methods.md").read_text()
    assert options.doc_section(text) == options.markdown_table(METHODS), \
        "docs/methods.md is out of date: run `.venv/bin/python -m dfkd.options --write`"
    readme = (ROOT / "README.md").read_text()
    assert options.doc_section(readme) == options.summary_table(METHODS), \
        "README.md's table of methods is out of date: run `.venv/bin/python -m dfkd.options --write`"
    assert "docs/methods.md" in readme


def test_the_method_registry_does_not_import_config():
    """config imports the registry (lazily, to check method_options); the methods never import
    config, so there is no import cycle."""
    code = "import sys, dfkd.methods; print('dfkd.config' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr
