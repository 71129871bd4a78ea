"""The laptop protocol's report (dfkd.protocol) reads the runs batches/laptop.yaml writes.

The run names live in two places (the manifest and ``dfkd.protocol.PARTS``); when the embedded
teacher changed in 2026-12-06's eighth session both had to move together. These tests fail when
one moves without the other, and check that a part's table is built from its own runs only.
"""
from __future__ import annotations

from dfkd import batch, paths, protocol, tracking
from dfkd.config import DistillConfig

ROOT = paths.project_root()
CURRENT = ("toy", "cub")   # parts the manifest runs today; the others table older runs


def _jobs():
    return batch.resolve_jobs(ROOT / "batches" / "laptop.yaml")


def _time_jobs():
    return batch.resolve_jobs(ROOT / "batches" / "laptop_time.yaml")


def _iterations(params: dict) -> int:
    return params["epochs"] * params["iters_per_epoch"]


def test_each_current_part_names_the_manifests_runs():
    jobs = _jobs()
    teachers = {j.run_name for j in jobs if j.stage == "teacher"}
    for part in CURRENT:
        spec = protocol.PARTS[part]
        assert spec["teacher"] in teachers and spec["supervised"] in teachers, part
        distill = [j for j in jobs if j.stage == "distill" and j.run_name.startswith(spec["prefix"])]
        assert distill, f"no job of batches/laptop.yaml writes {spec['prefix']}*"
        assert {j.params["teacher_run"] for j in distill} == {spec["teacher"]}, part
        assert {"dfkd_fgvc", "fast", "dfq"} <= {j.params["method"] for j in distill}, part


def test_the_teachers_are_robust_and_the_supervised_students_are_not():
    """The protocol's teachers are adversarially trained (the embedded one since 2026-12-06's eighth
    session, the CUB one since 2026-12-07's tenth); Table 1's second row (the student on the real
    images) keeps standard training, the stronger reference."""
    by_run = {j.run_name: j for j in _jobs()}
    for part in CURRENT:
        spec = protocol.PARTS[part]
        assert by_run[spec["teacher"]].params["adv_eps"] > 0, part
        assert by_run[spec["supervised"]].params.get("adv_eps", 0.0) == 0.0, part


def test_parts_prefixes_do_not_overlap():
    prefixes = [s["prefix"] for s in protocol.PARTS.values()]
    for a in prefixes:
        assert not [b for b in prefixes if b != a and b.startswith(a)], a


def _finished_run(runs_root, stage, name, summary, params):
    """A finished run folder with a two-point curve and ``summary``."""
    run = tracking.start_run(stage, name, params, runs_root=runs_root)
    for epoch, (t, acc) in enumerate(((1.0, 10.0), (2.0, 20.0))):
        run.log({"epoch": epoch, "time_s": t, "test_top1": acc})
    run.finish(summary)


def test_write_part_tables_only_its_own_runs(tmp_path):
    """Two finished runs under different parts' prefixes: each part's table names only its own."""
    def fake(*a):
        _finished_run(tmp_path, *a)
    fake("teacher", "laptop_toy_teacher_r", {"top1_last": 93.0}, {"arch": "resnet_tiny_t"})
    fake("teacher", "laptop_toy_teacher", {"top1_last": 97.0}, {"arch": "resnet_tiny_t"})
    fake("teacher", "laptop_toy_student", {"top1_last": 92.0}, {"arch": "resnet_tiny_s"})
    for name, acc in (("laptop_toy100r_m_dfkd_fgvc_s0", 77.7), ("laptop_toy100_m_dfkd_fgvc_s0", 66.6)):
        fake("distill", name, {"student_top1_last": acc, "student_top1_best": acc, "method": "dfkd_fgvc",
                               "chance_top1": 10.0, "time_s": 2.0}, {"method": "dfkd_fgvc", "seed": 0})
    out = tmp_path / "fig"
    written = protocol.write_part("toy", out, runs_root=tmp_path)
    assert [p.name for p in written] == ["laptop_toy_table.md", "laptop_toy_curves.png"]
    table = (out / "laptop_toy_table.md").read_text()
    assert "77.7" in table and "66.6" not in table
    assert "at equal steps, not at equal time" in table
    assert "93.0" in table and "97.0" not in table
    protocol.write_part("toy_standard", out, runs_root=tmp_path)
    table = (out / "laptop_toy_standard_table.md").read_text()
    assert "66.6" in table and "77.7" not in table and "97.0" in table


def test_the_cub_teacher_trains_alone():
    """The CUB teacher's 45.57 % is a two-thread result (one thread beside the supervised student gave
    43.48 %, under issue 9's 45 % floor): under `--executor local:2` it must run with nothing beside it."""
    by_run = {j.run_name: j for j in _jobs()}
    assert by_run[protocol.PARTS["cub"]["teacher"]].alone


def test_a_table_says_when_its_teacher_is_under_issue_9s_floor(tmp_path):
    """The CUB recipe gave 45.57 % on an Intel Xeon and 44.64 % on an AMD EPYC (fp32, two threads):
    a table built on a teacher under the floor says so; one above it does not."""
    assert "44.64 %" in protocol.teacher_warning("cub", 44.64, "laptop_cub_teacher_r")
    assert protocol.teacher_warning("cub", 45.57, "laptop_cub_teacher_r") == ""
    assert protocol.teacher_warning("toy", 89.9, "t") and not protocol.teacher_warning("toy", 90.0, "t")
    assert "not finished" in protocol.teacher_warning("cub_standard", None, "t")

    def fake(*a):
        _finished_run(tmp_path, *a)
    fake("teacher", "laptop_cub_teacher_r", {"top1_last": 44.64}, {"arch": "efficientnet_lite0"})
    fake("distill", "laptop_cub16r_m_dfkd_fgvc_s0", {"student_top1_last": 8.0, "student_top1_best": 8.0,
         "method": "dfkd_fgvc", "chance_top1": 2.0, "time_s": 1.0}, {"method": "dfkd_fgvc", "seed": 0})
    protocol.write_part("cub", tmp_path / "fig", runs_root=tmp_path)
    table = (tmp_path / "fig" / "laptop_cub_table.md").read_text()
    assert "**Warning.**" in table and "under the 45 %" in table


def test_the_equal_time_part_names_its_manifests_runs(tmp_path):
    """batches/laptop_time.yaml writes part cub_time's runs, each alone on every core, on the CUB
    part's teacher, with more iterations for the method whose iteration is cheaper; its table says
    that it compares at equal time."""
    spec = protocol.PARTS["cub_time"]
    every = _time_jobs()
    assert every and all(j.alone for j in every)
    jobs = [j for j in every if j.run_name.startswith(spec["prefix"])]
    bf16 = [j for j in every if j.run_name.startswith(protocol.PARTS["cub_time_bf16"]["prefix"])]
    xeon = [j for j in every if j.run_name.startswith(protocol.PARTS["cub_time_bf16_xeon"]["prefix"])]
    assert jobs and bf16 and xeon and len(jobs) + len(bf16) + len(xeon) == len(every)   # every run in a part
    assert {j.params["teacher_run"] for j in every} == {spec["teacher"]} == {protocol.PARTS["cub"]["teacher"]}
    assert {j.params["amp"] for j in jobs} == {"auto"} and {j.params["amp"] for j in bf16 + xeon} == {"native"}
    assert spec["supervised"] == protocol.PARTS["cub"]["supervised"]
    iters = {j.job: _iterations(j.params) for j in jobs}
    # Eq. 11 with MHAD and SFCL is the dearest student step, its KL term alone the cheapest
    assert iters["cub_time_fast"] > iters["cub_time_dfkd_fgvc"] < iters["cub_time_dfkd_fgvc_kl"]
    assert {j.params["seed"] for j in jobs} == {0, 1, 2}
    assert all(0 < j.params["g_stop"] < 1 for j in jobs)          # every method gets the tail
    _finished_run(tmp_path, "distill", "laptop_cubtail_m_fast_s0", {
        "student_top1_last": 12.0, "student_top1_best": 12.0, "method": "fast", "chance_top1": 2.0,
        "time_s": 430.0}, {"method": "fast", "seed": 0})
    protocol.write_part("cub_time", tmp_path / "fig", runs_root=tmp_path)
    table = (tmp_path / "fig" / "laptop_cub_time_table.md").read_text()
    assert "at equal time, not at equal steps" in table and "at equal steps, not" not in table
    assert "`g_stop`" in table and "bf16" not in table
    assert protocol.PARTS["cub_time_notail"]["compare"] == "time"


def test_a_variant_of_a_method_has_a_line_of_its_own(tmp_path):
    """cub_time runs the paper's method three times (the whole Eq. 11 at gamma 1 and 0.1, and Eq. 11
    reduced to KL): the run names keep them apart in the table and the curves, and a variant's line
    says what it is."""
    spec = protocol.PARTS["cub_time"]
    jobs = _time_jobs()
    kl = [j for j in jobs if j.job == "cub_time_dfkd_fgvc_kl"]
    assert kl and all(not j.params["use_mhad"] and not j.params["use_sfcl"] for j in kl)
    for name in ("cub_time_dfkd_fgvc", "cub_time_dfkd_fgvc_g01"):   # the whole Eq. 11
        whole = [j for j in jobs if j.job == name]
        assert whole and all(j.params.get("use_mhad", True) and j.params.get("use_sfcl", True) for j in whole)
    assert {j.params["gamma"] for j in jobs if j.job == "cub_time_dfkd_fgvc_g01"} == {0.1}
    for name, acc in (("laptop_cubtail_m_dfkd_fgvc_s0", 11.0), ("laptop_cubtail_m_dfkd_fgvc_s1", 13.0),
                      ("laptop_cubtail_m_dfkd_fgvc_kl_s0", 17.0), ("laptop_cubtail_m_dfkd_fgvc_kl_s1", 19.0)):
        _finished_run(tmp_path, "distill", name, {
            "student_top1_last": acc, "student_top1_best": acc, "method": "dfkd_fgvc", "chance_top1": 2.0,
            "time_s": 500.0}, {"method": "dfkd_fgvc", "seed": int(name[-1])})
    protocol.write_part("cub_time", tmp_path / "fig", runs_root=tmp_path)
    lines = (tmp_path / "fig" / "laptop_cub_time_table.md").read_text().splitlines()
    whole_line = [ln for ln in lines if ln.startswith("| dfkd_fgvc |")]
    kl_line = [ln for ln in lines if ln.startswith(f"| {spec['labels']['dfkd_fgvc_kl']} |")]
    assert len(whole_line) == len(kl_line) == 1
    assert "| 12.00 |" in whole_line[0] and "| 18.00 |" in kl_line[0]
    assert "KL" in spec["labels"]["dfkd_fgvc_kl"] and "gamma 0.1" in spec["labels"]["dfkd_fgvc_g01"]


def _part_table(tmp_path, part: str, runs) -> str:
    """Part ``part``'s table from finished runs ``(name, method)`` of seed 0 (20 % in 600 s each)."""
    for name, method in runs:
        _finished_run(tmp_path, "distill", name, {
            "student_top1_last": 20.0, "student_top1_best": 20.0, "method": method, "chance_top1": 2.0,
            "time_s": 600.0}, {"method": method, "seed": 0})
    protocol.write_part(part, tmp_path / "fig", runs_root=tmp_path)
    return (tmp_path / "fig" / f"laptop_{part}_table.md").read_text()


def test_the_bf16_part_refits_each_methods_iterations(tmp_path):
    """Part cub_time_bf16 runs the fp32 part's KL-only line and `fast` in bf16: the same synthesis
    shares (g_stop) and switches as their fp32 jobs, more iterations for both (a bf16 step is cheaper
    on a CPU with bf16 instructions), and the same evaluations per iteration; its table says that the
    runs are bf16 and that the time is equal, and names the KL-only line."""
    spec = protocol.PARTS["cub_time_bf16"]
    jobs = {j.job: j for j in _time_jobs()}
    pairs = (("cub_time_bf16_dfkd_fgvc_kl", "cub_time_dfkd_fgvc_kl"), ("cub_time_bf16_fast", "cub_time_fast"),
             ("cub_time_bf16_dfkd_fgvc_g01", "cub_time_dfkd_fgvc_g01"))
    for new, old in pairs:
        n, o = jobs[new].params, jobs[old].params
        assert n["method"] == o["method"] and n["amp"] == "native" and n["g_stop"] == o["g_stop"]
        assert _iterations(n) > _iterations(o)
        for key in ("use_mhad", "use_sfcl", "gamma", "g_meta", "bn_momentum", "replay_size", "lam", "g_steps", "s_steps"):
            assert n.get(key) == o.get(key), (new, key)
    kl, fast = (jobs[a].params for a, _ in pairs[:2])
    assert kl["iters_per_epoch"] == fast["iters_per_epoch"]        # the same number of evaluations per run
    table = _part_table(tmp_path, "cub_time_bf16", (("laptop_cubbf16_m_dfkd_fgvc_kl_s0", "dfkd_fgvc"),
                                                     ("laptop_cubbf16_m_fast_s0", "fast")))
    assert "at equal time, not at equal steps" in table and "`amp: native`" in table
    assert f"| {spec['labels']['dfkd_fgvc_kl']} |" in table and "| fast |" in table


def test_the_bf16_part_has_every_method_of_issue_9s_cub_part_on_one_loop():
    """Part cub_time_bf16 compares the paper's method with every baseline issue 9 names for the CUB
    part (fast, dfq, cmi and the prior-free dafl), one seed at least each, three for the paper's
    method and fast, on one loop: the same G and S steps per iteration, evaluations per iteration and
    teacher; the baselines beside fast take the KL-only line's synthesis share. The line with the
    SAM differs from the KL-only line only in lam and in its iterations (fewer: a dearer G step)."""
    every = _time_jobs()
    jobs = {j.job: j for j in every}
    bf16 = [j for j in every if j.run_name.startswith(protocol.PARTS["cub_time_bf16"]["prefix"])]
    methods = {j.params["method"] for j in bf16}
    assert {"dfkd_fgvc", "fast", "dfq", "cmi", "dafl"} <= methods
    for job in ("cub_time_bf16_dfkd_fgvc_kl", "cub_time_bf16_fast"):
        assert {j.params["seed"] for j in bf16 if j.job == job} == {0, 1, 2}
    for key in ("g_steps", "s_steps", "iters_per_epoch", "teacher_run", "batch_size", "image_size"):
        assert len({j.params[key] for j in bf16}) == 1, key
    kl = jobs["cub_time_bf16_dfkd_fgvc_kl"].params
    for m in ("dfq", "cmi", "dafl"):
        assert jobs[f"cub_time_bf16_{m}"].params["g_stop"] == kl["g_stop"], m
    sam = jobs["cub_time_bf16_dfkd_fgvc_klsam"].params
    assert kl["lam"] == 0 < sam["lam"] == 0.05                        # the paper's lambda (Sec. 5.1)
    assert _iterations(sam) < _iterations(kl)
    differ = ("lam", "epochs", "seed", "run_name")
    assert {k: v for k, v in sam.items() if k not in differ} == {k: v for k, v in kl.items() if k not in differ}
    assert "SAM" in protocol.PARTS["cub_time_bf16"]["labels"]["dfkd_fgvc_klsam"]


def test_the_xeon_part_runs_the_bf16_parts_jobs_unchanged(tmp_path):
    """Part cub_time_bf16_xeon repeats the bf16 part's KL-only line and fast on another CPU: every
    parameter but the run name is its bf16 job's (so the two parts differ only in the machine and the
    teacher trained on it), three seeds each; its third line changes the KL-only line's kd_T only.
    Its table names the temperature line and says the CPU."""
    spec = protocol.PARTS["cub_time_bf16_xeon"]
    every = _time_jobs()
    by_job = {}
    for j in every:
        by_job.setdefault(j.job, {})[j.params["seed"]] = j.params
    same = ("run_name",)
    for new, old in (("cub_xeon_dfkd_fgvc_kl", "cub_time_bf16_dfkd_fgvc_kl"), ("cub_xeon_fast", "cub_time_bf16_fast")):
        assert set(by_job[new]) == set(by_job[old]) == {0, 1, 2}
        for seed, n in by_job[new].items():
            o = by_job[old][seed]
            assert {k: v for k, v in n.items() if k not in same} == {k: v for k, v in o.items() if k not in same}
            assert n["run_name"].startswith(spec["prefix"]) and not o["run_name"].startswith(spec["prefix"])
    for seed, t4 in by_job["cub_xeon_dfkd_fgvc_klT4"].items():
        kl = by_job["cub_xeon_dfkd_fgvc_kl"][seed]
        assert kl.get("kd_T", DistillConfig.kd_T) == 1.0 < t4["kd_T"] == 4.0   # 1: the default
        assert {k: v for k, v in t4.items() if k not in ("kd_T", "run_name")} == \
            {k: v for k, v in kl.items() if k not in ("kd_T", "run_name")}
    table = _part_table(tmp_path, "cub_time_bf16_xeon", (("laptop_cubx_m_dfkd_fgvc_klT4_s0", "dfkd_fgvc"),
                                                          ("laptop_cubx_m_fast_s0", "fast")))
    assert f"| {spec['labels']['dfkd_fgvc_klT4']} |" in table and "| fast |" in table
    assert "Xeon" in table and "at equal time, not at equal steps" in table

