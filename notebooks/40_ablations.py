# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 40 · Ablations
# Reads finished distillation runs and tabulates the paper's ablations:
# loss components (Table 3), the SAM weight lambda (Table 4), the MHA order R (Table 5) and the
# beta / gamma sweeps (Fig. 7). Runs are found by name: `<runs_prefix>loss_*`, `<runs_prefix>lam_*`,
# `<runs_prefix>order_*`, `<runs_prefix>beta_*`, `<runs_prefix>gamma_*` (see `batches/workbench.yaml`).
# Tables are written to `runs/viz/<run_name>/`.

# %% tags=["parameters"]
run_name: str = 'ablations_dev'           # runs/viz/<run_name>/ keeps the tables this notebook writes
runs_prefix: str = ''                     # distill runs whose name starts with this (see batches/*.yaml)
interactive: bool = False

# %%
from dfkd import figures, tracking
from dfkd.config import VizConfig, collect

cfg = collect(VizConfig, globals())
run = tracking.start_run("viz", run_name, cfg)
tables = figures.ablation_tables(runs_prefix)
for name, (keys, rows) in tables.items():
    table = figures.markdown_table(rows, [*keys, "top1_last", "top1_best", "run"])
    display(figures.MarkdownTable(f"**{name}** ({', '.join(keys)})\n\n{table}"))  # rendered as a table
    figures.write_table(rows, run.dir / name)

# %% [markdown]
# Fig. 7: student top-1 against beta and gamma.

# %%
for key in ("beta", "gamma"):
    runs = figures.finished_runs("distill", prefix=f"{runs_prefix}{key}_")
    if runs:
        display(figures.sweep_figure(runs, key))

# %%
summary = run.finish({"tables": {k: len(v[1]) for k, v in tables.items()}})
summary
