"""Every figure a library function returns displays as an image in Jupyter; tables as tables.

A plain ``matplotlib.figure.Figure`` made without pyplot has no image repr: JupyterLab and
``executed.ipynb`` then show the text ``<Figure size ... with 1 Axes>``. Each public function of
``dfkd.figures`` and ``dfkd.viz`` that returns a figure is called here on minimal inputs (a tiny
fake distillation run with a real student, toy images) and must return an object whose
``_repr_png_`` gives PNG bytes, as IPython's formatter would call it. The list of such functions
is discovered by name, so a new figure function without a case here fails the test.
"""
from __future__ import annotations

import dataclasses
import inspect

import numpy as np
import pytest
import torch

from dfkd import figures, tracking

pytest.importorskip("matplotlib")

PNG = b"\x89PNG\r\n\x1a\n"
FIGURE_NAME = ("_figure", "_grid", "_panels", "scatter_embedding")  # how figure functions are named
NOT_FIGURES = {"viz.style:save_figure"}  # takes a figure, returns paths
TOY = dict(dataset="toy_fgvc", image_size=32, toy_num_classes=4, toy_train_per_class=4, toy_test_per_class=4)


def _modules():
    import dfkd.viz.cams
    import dfkd.viz.embed
    import dfkd.viz.grids
    import dfkd.viz.style
    import dfkd.viz.widgets
    return [figures, dfkd.viz.grids, dfkd.viz.embed, dfkd.viz.cams, dfkd.viz.style, dfkd.viz.widgets]


def figure_functions() -> set[str]:
    """``module:function`` of every public function whose name says it returns a figure."""
    out = set()
    for mod in _modules():
        for name, fn in vars(mod).items():
            if (inspect.isfunction(fn) and fn.__module__ == mod.__name__ and not name.startswith("_")
                    and any(name.endswith(s) for s in FIGURE_NAME)):
                out.add(f"{mod.__name__.removeprefix('dfkd.')}:{name}")
    return out - NOT_FIGURES


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory):
    """A finished distillation run: params, metrics, summary, student weights, synthetic samples."""
    from dfkd.config import DataConfig
    from dfkd.train import build_model
    root = tmp_path_factory.mktemp("reprs") / "runs"
    params = {**TOY, "method": "dfkd_fgvc", "beta": 10.0, "student_arch": "resnet_tiny_s"}
    run = tracking.start_run("distill", "fake_method_dfkd_fgvc", params, runs_root=root)
    for i in range(3):
        run.log({"epoch": i + 1, "iter": (i + 1) * 5, "test_top1": 25.0 + i, "g_bn": 1.0 / (i + 1),
                 "g_adv": 0.5, "s_kd": 2.0 - i / 2, "s_mhad": 0.1})
    torch.manual_seed(0)
    student = build_model("resnet_tiny_s", 4, 32)
    run.save_weights("student", student, {"arch": student.arch, "num_classes": 4, "image_size": 32,
                                          "build_kwargs": dict(getattr(student, "build_kwargs", {}) or {})})
    run.samples_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"images": torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8),
                "teacher_pred": torch.arange(8) % 4, "epoch": 3}, run.samples_dir / "last.pt")
    run.finish({"method": "dfkd_fgvc", "dataset": "toy_fgvc", "student_top1_last": 27.0,
                "student_top1_best": 27.0, "teacher_top1": 90.0, "budget": {"s_steps": 15}})
    cfg = DataConfig(**{k: v for k, v in TOY.items() if k in {f.name for f in dataclasses.fields(DataConfig)}})
    cfg.num_workers, cfg.seed, cfg.batch_size, cfg.test_batch_size = 0, 0, 16, 16
    return run, cfg


def _drawn(fig):
    fig.subplots().plot([0, 1], [1, 0])
    return fig


def _cases(run, cfg):
    from dfkd.viz import cams, embed, grids, style
    imgs = torch.rand(6, 3, 16, 16)
    feats = np.random.default_rng(0).normal(size=(12, 8)).astype(np.float32)
    labels = np.arange(12) % 3
    return {
        "figures:curves_figure": lambda: figures.curves_figure([run]),
        "figures:loss_terms_figure": lambda: figures.loss_terms_figure(run),
        "figures:sweep_figure": lambda: figures.sweep_figure([run], "beta", baseline=20.0),
        "figures:synthetic_grid_figure": lambda: figures.synthetic_grid_figure([run], cfg, n=4),
        "figures:tsne_figure": lambda: figures.tsne_figure([run], cfg, classes=4, n=12, perplexity=3.0),
        "figures:gradcam_figure": lambda: figures.gradcam_figure(run, cfg, n=2),
        "viz.grids:image_grid": lambda: grids.image_grid(imgs, labels=[0, 1, 2, 0, 1, 2],
                                                          class_names=["a_very_long_class_name"] * 3),
        "viz.grids:compare_grid": lambda: grids.compare_grid({"real": imgs, "dfkd_fgvc": imgs[:3]}),
        "viz.grids:attention_grid": lambda: grids.attention_grid(torch.rand(6, 4, 4), imgs),
        "viz.embed:scatter_embedding": lambda: embed.scatter_embedding(feats[:, :2], labels, ["a", "b", "c"]),
        "viz.embed:tsne_panels": lambda: embed.tsne_panels({"m": (feats, labels)}, max_iter=250),
        "viz.style:new_figure": lambda: _drawn(style.new_figure((2.0, 1.5))),
        "viz.cams:cam_overlay_figure": lambda: cams.cam_overlay_figure(imgs, np.random.rand(6, 16, 16),
                                                                      titles=list("abcdef")),
    }


def test_every_figure_function_has_a_case(fake_run):
    missing = figure_functions() - set(_cases(*fake_run))
    assert not missing, f"figure functions without a case in {__name__}: {sorted(missing)}"


@pytest.mark.parametrize("name", sorted(figure_functions()))
def test_figure_has_an_image_repr(fake_run, name):
    fig = _cases(*fake_run)[name]()
    repr_png = getattr(fig, "_repr_png_", None)
    assert callable(repr_png), f"{name} returned {type(fig).__name__}, which Jupyter shows as text"
    png = repr_png()
    assert isinstance(png, bytes) and png.startswith(PNG) and len(png) > 500


def test_ipython_shows_library_figures_as_png(fake_run):
    """What JupyterLab receives for a cell whose value is a figure: image/png, not only text."""
    pytest.importorskip("IPython")
    from IPython.core.formatters import DisplayFormatter
    fmt = DisplayFormatter()
    data, _ = fmt.format(figures.curves_figure([fake_run[0]]))
    assert data.get("image/png", b"").startswith(PNG), sorted(data)
    table = figures.markdown_table(figures.comparison_rows([fake_run[0]]))
    data, _ = fmt.format(table)
    assert data["text/markdown"].startswith("| run | method |"), sorted(data)
    assert str(table) == table and "|" in f"{table}"  # still a plain string for print and files


def test_table_helpers_return_markdown_tables(fake_run):
    rows = figures.comparison_rows([fake_run[0]])
    for table in (figures.markdown_table(rows), figures.markdown_table([])):
        assert isinstance(table, figures.MarkdownTable) and isinstance(table, str)
        assert table._repr_markdown_() == str(table)


def test_widget_images_have_a_fixed_display_size():
    """Widget images are shown at ``DISPLAY_PX``, not stretched to the cell width."""
    pytest.importorskip("ipywidgets")
    import ipywidgets

    from dfkd.viz import widgets
    x = torch.rand(4, 3, 32, 32)
    boxes = [widgets.browse_images(x, labels=[0, 1, 0, 1], class_names=["a", "b"]),
             widgets.browse_attention(x, torch.rand(4, 4, 4)), widgets.browse_cams(x, np.random.rand(4, 32, 32))]

    def images(w):
        if isinstance(w, ipywidgets.Image):
            yield w
        for c in getattr(w, "children", ()):
            yield from images(c)
    found = [im for b in boxes for im in images(b)]
    assert len(found) == 5
    px = f"{widgets.DISPLAY_PX}px"
    assert all(im.layout.width == px and im.layout.height == px for im in found)
    assert all(b.layout.align_items == "flex-start" for b in boxes)


def test_loss_terms_figure_leaves_out_the_step_counters(tmp_path):
    """``g_steps`` / ``s_steps`` (cumulative budget counters in the epoch rows of metrics.csv) share
    the loss prefixes but are not loss terms: drawn, they dwarfed the losses (0-1,000 against ~1)."""
    run = tracking.start_run("distill", "terms", {**TOY, "method": "dfkd_fgvc"}, runs_root=tmp_path)
    for i in range(4):
        row = {"iter": i, "epoch": i // 2, "g_bn": 2.0 - i / 4, "g_kd": 0.5, "s_kd": 1.0 - i / 8, "s_mhad": 0.1}
        if i % 2:
            row.update(g_steps=10 * (i + 1), s_steps=25 * (i + 1), test_top1=20.0 + i)
        run.log(row)
    fig = figures.loss_terms_figure(run)
    labels = [[line.get_label() for line in ax.get_lines()] for ax in fig.axes]
    assert labels == [["g_bn", "g_kd"], ["s_kd", "s_mhad"]], labels


def test_curves_grouped_by_method_share_a_colour_and_one_legend_entry(fake_run):
    """``group`` (what the laptop protocol's curves use): a method's seeds are one colour and one
    legend entry; other methods get other colours."""
    run = fake_run[0]
    labels = {0: "dfkd_fgvc (2 seeds)", 1: "dfkd_fgvc (2 seeds)", 2: "fast (1 seed)"}
    order = iter(range(3))
    fig = figures.curves_figure([run, run, run], x="epoch", group=lambda r: labels[next(order)])
    ax = fig.axes[0]
    lines = [ln for ln in ax.get_lines() if len(ln.get_xdata())]
    assert len(lines) == 3
    assert lines[0].get_color() == lines[1].get_color() != lines[2].get_color()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["dfkd_fgvc (2 seeds)", "fast (1 seed)"]
