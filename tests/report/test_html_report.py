"""``fsad-bench report``: one self-contained ``report.html`` from a tiny real run (random + gaussian at
64 px; the run and the report take ~15 s of CPU, so those tests are ``slow``), parsed with ``html.parser``
and rendered in headless Chromium. Also the plot fixes that came with it: file mode, the ± wording, wrapped
map titles."""

from __future__ import annotations

import base64
import io
import os
import shutil
import stat
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fsad_bench.cli import main
from fsad_bench.records.store import FILE_MODE, ResultStore, with_train_seed
from fsad_bench.report.html import (
    REPORT_NAME,
    build_report,
    equivalent_command,
    table_html,
)
from fsad_bench.report.plots import spread_words, wrap_titles
from fsad_bench.report.tables import write_tables
from fsad_bench.run.plan import plan
from fsad_bench.run.schedule import run_suite

_BUILT: dict[str, Path] = {}  # one tiny run per test session, shared by the tests below


@pytest.fixture
def tiny_run(make_suite, tmp_path_factory) -> Path:
    """A finished results folder of random and gaussian (k 1, 2; 2 runs; 3 categories at 64 px) with its report."""
    if "out" not in _BUILT:
        out = tmp_path_factory.mktemp("report") / "results"
        suite = make_suite(methods=["random", "gaussian"])
        run_suite(suite, out, planned=plan(suite))
        build_report(out)
        _BUILT["out"] = out
    return _BUILT["out"]


class Page(HTMLParser):
    """Collects tables (ids), images (src), every src/href and the text."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[str | None] = []
        self.images: list[str] = []
        self.links: list[tuple[str, str, str]] = []
        self.tags: set[str] = set()
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.add(tag)
        if tag == "table":
            self.tables.append(a.get("id"))
        if tag == "img":
            self.images.append(a.get("src") or "")
        for key in ("src", "href", "action", "data", "poster"):
            if key in a:
                self.links.append((tag, key, a[key] or ""))

    def handle_data(self, data):
        self.text.append(data)


def parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    return page


@pytest.mark.slow
def test_report_is_self_contained_with_every_table_and_figure(tiny_run):
    path = tiny_run / REPORT_NAME
    assert path.is_file() and stat.S_IMODE(path.stat().st_mode) == FILE_MODE
    page = parse(path)
    text = "".join(page.text)
    # every table the table functions build is in the page, by name
    tables = write_tables(tiny_run, reference_method="gaussian")
    assert {"synthetic_image_auroc", "synthetic_pixel_auroc", "synthetic_aupro", "cost", "cost_ratio"} <= set(tables)
    for name, t in tables.items():
        assert f"table-{name}" in page.tables, name
        for note in t.attrs.get("notes", []):
            assert note in text
    assert "table-significance" in page.tables
    # every figure written to plots/ is inline, as a PNG that decodes
    plots = sorted((tiny_run / "plots").glob("*.png"))
    names = {p.name for p in plots}
    assert {
        "synthetic_image_auroc_vs_k.png",
        "synthetic_image_auroc_categories.png",
        "synthetic_image_auroc_vs_adapt_cost.png",
        "synthetic_roc.png",
    } <= names
    assert {f"synthetic_{c}_maps.png" for c in ResultStore(tiny_run).frame()["category"].unique()} <= names
    assert len(page.images) == len(plots)
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as im:
            assert im.format == "PNG" and im.width > 100 and im.height > 100
    for p in plots:
        assert stat.S_IMODE(p.stat().st_mode) == FILE_MODE  # like tables and records, not mkstemp's 0600
    # nothing leaves the file: no script, no stylesheet link, every href an in-page anchor
    assert not {"script", "link", "iframe", "object", "embed"} & page.tags
    for tag, key, value in page.links:
        assert value.startswith(("#", "data:image/png;base64,")), (tag, key, value[:80])
    anchors = {v[1:] for t, k, v in page.links if k == "href"}
    html_text = path.read_text(encoding="utf-8")
    for a in anchors:
        assert f'id="{a}"' in html_text, a
    assert "http://" not in html_text and "https://" not in html_text
    assert "url(" not in html_text and "@import" not in html_text
    # provenance from the records and suite.json
    for needle in (
        "fsad-bench run --suite t",
        "--methods random,gaussian",
        "torch",
        "config hashes",
        "cpu",
        "± is the sample std over support draws",
        "Significance against gaussian",
    ):
        assert needle in text, needle
    records = ResultStore(tiny_run).records()
    assert all(r["config_hash"] in text for r in records)


@pytest.mark.slow
def test_report_command(tiny_run, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(tiny_run, out)
    (out / REPORT_NAME).unlink()
    main(["report", str(out), "--reference-method", "random"])
    assert "written" in capsys.readouterr().out
    assert "Significance against random" in "".join(parse(out / REPORT_NAME).text)
    with pytest.raises(SystemExit) as exc:
        main(["report", str(tmp_path / "nowhere")])
    assert exc.value.code == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit) as exc:
        main(["report", str(empty)])
    assert exc.value.code == 2


def test_tables_render_whatever_the_table_functions_return():
    """Marks, notes and extra rows of tables.py pass through as text; Mean rows are marked; Δ one decimal."""
    cols = pd.MultiIndex.from_tuples([("k=1", "a [x]"), ("k=1", "b")], names=["k", "method"])
    t = pd.DataFrame(
        [["50.0 ± 1.0", "–"], ["50.0 ± 1.0*", "60.0"], ["1.0", "2.0"]],
        index=pd.Index(["c0", "Mean", "Std (categories)"], name="category"),
        columns=cols,
    )
    out = table_html(t, "table-x")
    assert 'id="table-x"' in out and out.count('<tr class="mean">') == 2 and "50.0 ± 1.0*" in out
    assert "<th>category</th>" in out and "<script" not in table_html(t.rename(index={"c0": "<script>"}), "y")
    d = pd.DataFrame({"measured": [80.04], "paper": [82.0], "diff": [-1.96]}, index=pd.Index(["r"], name="label"))
    assert "−" in table_html(d, "d") and "-2.0" in table_html(d, "d") and "80.0" in table_html(d, "d")


def test_equivalent_command():
    cmd = equivalent_command(
        {
            "name": "quick",
            "methods": ["random", "gaussian"],
            "k": [2, 4],
            "runs": 2,
            "train_seeds": 2,
            "categories": [],
            "data_root": ["/a b", "/c"],
            "weights": "auto",
            "image_size": 128,
            "seed": 0,
            "preset": "cpu",
            "arch": None,
        },
        Path("/tmp/out"),
    )
    assert cmd == (
        "fsad-bench run --suite quick --methods random,gaussian --k 2,4 --runs 2 --train-seeds 2 "
        "--data-root '/a b' --data-root /c --weights auto --preset cpu --image-size 128 --seed 0 "
        "--out /tmp/out"
    )


def test_spread_words_names_training_seeds_only_when_there_are_several():
    base = {"dataset": "d", "category": "c", "k": 1, "label": "m"}
    one = pd.DataFrame([dict(base, run=r) for r in range(2)])
    assert spread_words(one) == "support draws"
    two = pd.DataFrame([dict(base, run=r, train_seed=t) for r in range(2) for t in range(2)])
    assert spread_words(two) == "support draws × training seeds"
    assert spread_words(pd.DataFrame([dict(base, run=0)])) == ""
    assert (
        spread_words(with_train_seed(pd.DataFrame([dict(base, run=0, train_seed=t) for t in range(3)])))
        == "training seeds"
    )


def test_wrap_titles():
    titles, key = wrap_titles(["random", "patchcore [paper, wide_resnet50_2, random-init]"])
    assert key == [] and titles[0] == "random" and all(len(line) <= 24 for line in titles[1].split("\n"))
    long = "x" * 200
    titles, key = wrap_titles(["a", long])
    assert titles == ["(a)", "(b)"] and key == ["(a) a", f"(b) {long}"]


def _chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


@pytest.mark.slow
def test_report_renders_in_headless_chromium(tiny_run, tmp_path):
    browser = _chromium()
    if browser is None:
        if os.environ.get("FSAD_BENCH_REQUIRE_CHROMIUM"):
            pytest.fail("no chromium binary on PATH, and FSAD_BENCH_REQUIRE_CHROMIUM is set (CI)")
        pytest.skip("no chromium binary on PATH (CI installs Debian's chromium: apt-get install chromium)")
    shot = tmp_path / "shot.png"
    proc = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--screenshot={shot}",
            "--window-size=1280,2000",
            "--hide-scrollbars",
            (tiny_run / REPORT_NAME).resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "HOME": str(tmp_path)},
        check=False,
    )
    assert shot.is_file(), proc.stderr[-2000:]
    with Image.open(shot) as im:
        px = np.asarray(im.convert("RGB"), dtype=np.float32)
    assert px.shape[:2] == (2000, 1280)
    assert px.var() > 0  # not blank
    assert (px < 128).mean() > 0.002  # some dark text or figure drawn, not a white page
