"""Self-contained HTML report of one run (``xbench report RUN_DIR -o report.html``).

One file that opens from disk with nothing fetched: every picture is an embedded base64 PNG
(plots drawn by matplotlib's Agg backend, overlays composed with Pillow) and the little
interactivity (sortable tables, gallery pages) is the plain JavaScript and CSS of
``xbench/report_assets``, inlined. Everything is derived from the run folder: ``run.json``,
``rows.jsonl`` and the uint8 map previews ``maps/<unit>.npz`` the runner keeps; the input
images are re-read from the run's dataset (the crop the model saw) when they are still there.

Sections: run header and protocol variant, the leaderboard matrix (mean [95% CI], best and
ties as in LEADERBOARD.md), a gallery (input + every explainer's overlay with its per-image
scores, true and predicted class), insertion/deletion curves (mean and per image), the layer
sweep when the run has several layers, cost per explainer, failures and degenerate maps.
"""

from __future__ import annotations

import base64
import html
import io
import random
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from PIL import Image

from xbench import leaderboard, view
from xbench.errors import UserError
from xbench.records import ResultRow, RunFolder, RunHeader

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from xbench.plugins import Registry

THUMB = 176  # gallery picture size in pixels
CURVE_METRICS = ("insertion", "deletion")
COST_METRICS = ("forward-passes", "backward-passes", "time")
OVERLAY_ALPHA = 0.5


@dataclass(frozen=True)
class GalleryImage:
    """One gallery line: an image's classification facts and where its input file is."""

    image: str
    index: int
    label: int | None
    predicted: int | None
    target: int | None
    confidence: float | None
    path: Path | None


# -- entry points ---------------------------------------------------------------------------


def write_report(run_dir: Path, output: Path | None = None, max_images: int = 24,
                 sample_seed: int = 0, page_size: int = 6,
                 class_names: Sequence[str] | None = None,
                 registry: Registry | None = None) -> Path:
    """Render the report of ``run_dir`` to ``output`` (default ``RUN_DIR/report.html``).

    ``class_names`` (index -> name) default to the run's model's names when the model can be
    loaded from ``registry`` (the installed plugins when None); otherwise classes show as
    indices. Raises UserError when ``run_dir`` is not a run folder or the options are invalid.
    """
    folder = RunFolder(Path(run_dir))
    if not folder.exists():
        raise UserError(f"{run_dir}: not a run folder (no run.json); pass a folder written by "
                        "xbench run, e.g. results/efficientnet-lite0_sample_quick")
    if class_names is None:
        class_names = model_class_names(folder.header(), registry)
    page = render(folder, max_images=max_images, sample_seed=sample_seed, page_size=page_size,
                  class_names=class_names)
    output = Path(output) if output is not None else folder.path / "report.html"
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(page, encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot write the report to {output}: {exc.strerror or exc}") from exc
    return output


def model_class_names(header: RunHeader, registry: Registry | None = None) -> tuple[str, ...] | None:
    """The class names of the run's model, or None when it cannot be built here.

    Loads the model the way the run did (registry name, ``--weights``, ``--member``); a model
    that needs what this machine lacks (a checkpoint, a download) is not an error for a report:
    its classes are then shown as indices.
    """
    if registry is None:
        from xbench.plugins import build_registry

        registry = build_registry()
    config = header.config
    try:
        cls = registry.model(header.model["name"])
        options = {"member": config["member"]} if config.get("member") is not None else {}
        return tuple(cls(weights=config.get("weights"), **options).load().class_names)
    except Exception:  # noqa: BLE001 - any failure only means "show indices"
        return None


def render(folder: RunFolder, max_images: int = 24, sample_seed: int = 0, page_size: int = 6,
           class_names: Sequence[str] | None = None) -> str:
    """The report page of ``folder`` as one HTML string."""
    if max_images < 0:
        raise UserError(f"--max-images must be >= 0, got {max_images}")
    if page_size < 1:
        raise UserError(f"--page-size must be >= 1, got {page_size}")
    from xbench.layer_plots import OVERALL_METRIC

    records = view.load(folder)
    header = records.header
    frame = records.frame(categorical=True)
    table = leaderboard.matrix(frame, seed=header.config.get("seed", 0),
                               families=leaderboard.run_families(frame, header))
    names = _Classes(class_names)
    images = gallery_images(header, frame)
    sections = [
        _header_section(folder, header, frame),
        _matrix_section(table),
        _gallery_section(folder, header, frame, images, names, max_images, sample_seed,
                         page_size),
        _curves_section(list(records.result_rows(CURVE_METRICS)), header),
        _layers_section(list(records.result_rows([OVERALL_METRIC], with_curves=False)), header,
                        _explainer_layers(frame)),
        _cost_section(table),
        _problems_section(frame, images),
    ]
    return _page(f"xbench report: {header.run_name}", "\n".join(s for s in sections if s))


# -- page frame -----------------------------------------------------------------------------


def _asset(name: str) -> str:
    return resources.files("xbench").joinpath("report_assets", name).read_text("utf-8")


def _page(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        # no network at view time: forbid every fetch except embedded data: images
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
        "img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'\">\n"
        f"<title>{_e(title)}</title>\n<style>\n{_asset('report.css')}</style>\n</head>\n"
        f"<body>\n{body}\n<script>\n{_asset('report.js')}</script>\n</body>\n</html>\n")


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _png(data: bytes, alt: str, css: str = "") -> str:
    encoded = base64.b64encode(data).decode("ascii")
    cls = f' class="{css}"' if css else ""
    return f'<img{cls} alt="{_e(alt)}" src="data:image/png;base64,{encoded}">'


def _figure_png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    return buffer.getvalue()


def _file_png(draw, *args: Any) -> bytes:
    """PNG bytes of a plotting function that writes to a path (xbench.layer_plots, plot)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "figure.png"
        draw(*args, path)
        return path.read_bytes()


# -- header ---------------------------------------------------------------------------------


def _header_section(folder: RunFolder, header: RunHeader, frame: pd.DataFrame) -> str:
    config, env, model, data = header.config, header.environment, header.model, header.dataset
    accuracy, labelled = leaderboard.top1_accuracy(frame)
    variants = frame[frame.explainer != ""].drop_duplicates(["explainer", "explainer_variant"])
    explainer_variants = ", ".join(
        f"{e} ({v})" if v else e for e, v in zip(variants.explainer, variants.explainer_variant))
    options = config.get("plugin_options") or {}
    option_text = "; ".join(f"{name}: {', '.join(f'{k}={v}' for k, v in sorted(opts.items()))}"
                            for name, opts in sorted(options.items()) if opts)
    packages = ", ".join(f"{k} {v}" for k, v in sorted(env.get("packages", {}).items()))
    facts = [
        ("protocol", f"v{header.protocol}, profile <code>{_e(header.profile)}</code>, target rule "
                     f"<code>{_e(config.get('target_rule'))}</code>, seed {_e(config.get('seed'))}"),
        ("explainers", _e(explainer_variants or ", ".join(config.get("explainers", [])))),
        ("plugin options", _e(option_text or "defaults")),
        ("model", f"<code>{_e(model.get('name'))}</code>, layer <code>{_e(_layers(header))}</code>, "
                  f"input {_e(model.get('input_size'))} px (resize {_e(model.get('resize_size'))}), "
                  f"weights {_e(model.get('weights') or '-')}"),
        ("data", f"<code>{_e(data.get('name'))}</code> ({_e(data.get('layout'))}), "
                 f"{_e(data.get('images'))} images, root {_e(data.get('root'))}, subset hash "
                 f"<code>{_e(data.get('subset_hash'))}</code>"),
        ("device", f"{_e(env.get('device'))}, {_e(env.get('threads'))} threads, dtype "
                   f"{_e(config.get('dtype'))}, batch {_e(config.get('batch_size'))}"),
        ("versions", f"xbench {_e(header.xbench_version)}; {_e(packages)}"),
        ("top-1 accuracy", f"{leaderboard.format_number(accuracy)} on {labelled} labelled images"),
    ]
    items = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts)
    done = len(folder.finished_units())
    warning = ""
    if done < header.units_total:
        warning = (f'<p class="warn">incomplete run: {done} of {header.units_total} units '
                   "finished (finish it with xbench run ... --resume)</p>")
    return (f"<h1>xbench report: {_e(header.run_name)}</h1>\n{warning}"
            f'<dl class="header">{items}</dl>')


def _layers(header: RunHeader) -> str:
    layers = header.config.get("layers")
    return layers if layers not in (None, "", "last") else header.model.get("default_layer", "")


# -- leaderboard matrix ---------------------------------------------------------------------


def _matrix_section(table: pd.DataFrame) -> str:
    if table.empty:
        return "<h2>Leaderboard</h2><p>No scores in this run.</p>"
    groups = leaderboard.column_families(table)
    columns = [column for _, members in groups for column in members]
    directions = table.drop_duplicates("column").set_index("column").direction
    show_layer = len({layer for layer in table.layer if layer != "-"}) > 1
    families = ('<th class="family" colspan="' + str(2 if show_layer else 1) + '"></th>'
                + "".join(f'<th class="family" colspan="{len(members)}">{_e(family)}</th>'
                          for family, members in groups))
    head = ['<th class="name">explainer<span class="sorted"></span></th>']
    if show_layer:
        head.append('<th class="name">layer<span class="sorted"></span></th>')
    for column in columns:
        arrow = leaderboard.ARROWS.get(directions[column], "")
        better = (f' <span class="better" title="{directions[column]} is better">{arrow}</span>'
                  if arrow else "")
        head.append(f'<th data-column="{_e(column)}">{_e(column).replace("@", "<wbr>@")}{better}'
                    '<span class="sorted"></span></th>')
    body = []
    for explainer, layer in leaderboard.explainer_layers(table):
        cells = table[(table.explainer == explainer) & (table.layer == layer)].set_index("column")
        line = [f'<td class="name">{_e(explainer)}</td>']
        if show_layer:
            line.append(f'<td class="name">{_e(layer)}</td>')
        line += [_matrix_cell(cells.loc[c]) if c in cells.index else '<td data-value=""></td>'
                 for c in columns]
        body.append(f'<tr data-explainer="{_e(explainer)}" data-layer="{_e(layer)}">'
                    + "".join(line) + "</tr>")
    return (
        "<h2>Leaderboard</h2>\n"
        '<p class="note">Mean over images [95% bootstrap interval]; time: median seconds per '
        "image (IQR). ↑ higher is better, ↓ lower is better. Bold green: best in the column; "
        "light green ≈: not significantly different from the best (paired bootstrap, 95%). "
        "Columns are grouped by metric family. Click a column header to sort.</p>\n"
        f'<div class="scroll"><table id="leaderboard" class="sortable"><thead><tr>{families}</tr>'
        f'<tr>{"".join(head)}</tr></thead><tbody>{"".join(body)}</tbody></table></div>')


def _matrix_cell(line: pd.Series) -> str:
    """A cell: the sort key in data-value (the median for time, else the mean) and its text."""
    is_time = line.metric == "time"
    key = line["median"] if is_time else line["mean"]
    main = leaderboard.format_number(key)
    if is_time:
        interval = f"IQR {leaderboard.format_number(line.q1)}–{leaderboard.format_number(line.q3)}"
    elif line.ci_low != line.ci_high:
        interval = f"[{leaderboard.format_number(line.ci_low)}, {leaderboard.format_number(line.ci_high)}]"
    else:
        interval = ""
    css = "best" if line.best else ("tied" if line.tied_with_best else "")
    mark = " ≈" if line.tied_with_best and not line.best else ""
    extra = f' <span class="ci">{_e(interval)}</span>' if interval else ""
    return (f'<td class="{css}" data-value="{float(key)!r}" title="{int(line.images)} images">'
            f"{_e(main)}{mark}{extra}</td>")


def _label(explainer: str, layer: str, several_layers: bool) -> str:
    """An explainer's name, with ``@layer`` when the run compares several layers."""
    return f"{explainer}@{layer}" if several_layers and layer != "-" else explainer


# -- gallery --------------------------------------------------------------------------------


class _Classes:
    def __init__(self, names: Sequence[str] | None) -> None:
        self.names = names

    def __call__(self, index: Any) -> str:
        if index is None or (isinstance(index, float) and not np.isfinite(index)):
            return "–"
        index = int(index)
        if self.names is not None and 0 <= index < len(self.names):
            return f"{self.names[index]} ({index})"
        return str(index)


def gallery_images(header: RunHeader, frame: pd.DataFrame) -> list[GalleryImage]:
    """One GalleryImage per image the run read (its per-image row), in dataset order.

    The input path comes from re-opening the run's dataset; None when it is gone."""
    per_image = frame[(frame.explainer == "") & (frame.metric == "confidence")]
    paths = _dataset_paths(header)
    out = []
    for line in per_image.sort_values("index").itertuples():
        out.append(GalleryImage(
            image=line.image, index=int(line.index), label=_int(line.label),
            predicted=_int(line.predicted), target=_int(line.target),
            confidence=None if line.status != "ok" or pd.isna(line.value) else float(line.value),
            path=paths.get(line.image)))
    return out


def _int(value: Any) -> int | None:
    return None if value is None or pd.isna(value) else int(value)


def _dataset_paths(header: RunHeader) -> dict[str, Path]:
    from xbench.data import open_dataset

    config = header.config
    try:
        dataset = open_dataset(config["data"], config.get("labels")).subset(
            config.get("limit"), config.get("seed", 0))
    except (UserError, OSError, KeyError):
        return {}
    return {item.id: item.path for item in dataset.items}


def sample_gallery(images: list[GalleryImage], max_images: int, seed: int) -> list[GalleryImage]:
    """At most ``max_images`` of the readable images: a seeded sample, kept in dataset order."""
    readable = [image for image in images if image.predicted is not None]
    if len(readable) <= max_images:
        return readable
    chosen = random.Random(seed).sample(range(len(readable)), max_images)
    return [readable[i] for i in sorted(chosen)]


def preview_file(folder: RunFolder, unit: str) -> Path:
    """Where the runner keeps a unit's map previews (xbench.runner._save_previews)."""
    return folder.path / "maps" / (unit.replace(":", "__").replace("/", "_") + ".npz")


def load_previews(folder: RunFolder, header: RunHeader, pairs: list[tuple[str, str]],
                  wanted: set[str]) -> dict[tuple[str, str, str], np.ndarray]:
    """{(image, explainer, layer): uint8 preview} of the ``wanted`` images, read from every
    batch's ``maps/`` file (missing files, e.g. a run with --no-maps, are skipped)."""
    batch_size = int(header.config.get("batch_size") or 1)
    batches = -(-int(header.dataset.get("images") or 0) // batch_size)
    out = {}
    for explainer, layer in pairs:
        for index in range(batches):
            path = preview_file(folder, f"batch{index:06d}:{explainer}:{layer}")
            if not path.exists():
                continue
            with np.load(path) as data:
                for image, preview in zip(data["images"], data["maps"], strict=True):
                    if str(image) in wanted:
                        out[(str(image), explainer, layer)] = preview
    return out


def _input_pixels(image: GalleryImage, header: RunHeader) -> np.ndarray | None:
    """The (S, S, 3) uint8 crop the model saw, or None when the file cannot be read now."""
    from xbench.data import load_image

    if image.path is None:
        return None
    model = header.model
    try:
        tensor = load_image(image.path, int(model["resize_size"]), int(model["input_size"]))
    except Exception:  # noqa: BLE001 - the failure is listed from the rows, not here
        return None
    return (tensor.permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)


def overlay(pixels: np.ndarray | None, preview: np.ndarray, size: int = THUMB,
            boxes: np.ndarray | None = None, input_size: int | None = None) -> bytes:
    """PNG of the ``preview`` heat map (jet) blended over the input (or alone without one),
    with the object ``boxes`` ((K, 4+) x0, y0, x1, y1 inclusive input pixels of an
    ``input_size`` square input) outlined in white."""
    from matplotlib import colormaps

    heat = Image.fromarray(preview).resize((size, size), Image.Resampling.BILINEAR)
    colored = colormaps["jet"](np.asarray(heat, dtype=np.float64) / 255.0)[..., :3]
    if pixels is not None:
        base = np.asarray(Image.fromarray(pixels).resize((size, size), Image.Resampling.LANCZOS),
                          dtype=np.float64) / 255.0
        colored = (1 - OVERLAY_ALPHA) * base + OVERLAY_ALPHA * colored
    picture = (colored * 255.0).round().astype(np.uint8)
    if boxes is not None and len(boxes) and input_size:
        from PIL import ImageDraw

        canvas = Image.fromarray(picture)
        draw = ImageDraw.Draw(canvas)
        scale = size / input_size
        for x0, y0, x1, y1 in np.asarray(boxes)[:, :4].tolist():
            draw.rectangle((round(x0 * scale), round(y0 * scale),
                            round((x1 + 1) * scale) - 1, round((y1 + 1) * scale) - 1),
                           outline=(255, 255, 255), width=1)
        picture = np.asarray(canvas)
    return _png_bytes(picture)


def gallery_boxes(header: RunHeader, images: list[GalleryImage]) -> dict[str, np.ndarray]:
    """{image id: (K, 5) boxes in input pixels}, re-derived from the run's boxes file (the
    header's ``dataset.boxes.source``) through the image's resize and crop (xbench.boxes);
    empty when the run had no boxes or the file cannot be read now."""
    from xbench.boxes import input_boxes, read_boxes

    source = ((header.dataset or {}).get("boxes") or {}).get("source")
    if not source:
        return {}
    try:
        table = read_boxes(Path(source))
    except Exception:  # noqa: BLE001 - the gallery then shows no boxes
        return {}
    model = header.model
    out = {}
    for image in images:
        found = table.get(image.image)
        if found is None or image.path is None:
            continue
        try:
            with Image.open(image.path) as opened:
                stored = opened.size
        except OSError:
            continue
        out[image.image] = input_boxes(found, stored, int(model["resize_size"]),
                                       int(model["input_size"]), image.label).numpy()
    return out


def _png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _gallery_section(folder: RunFolder, header: RunHeader, frame: pd.DataFrame,
                     images: list[GalleryImage], names: _Classes, max_images: int,
                     sample_seed: int, page_size: int) -> str:
    explained = frame[frame.explainer != ""]
    pairs = sorted(set(zip(explained.explainer, explained.layer)))
    shown = sample_gallery(images, max_images, sample_seed)
    if not pairs or not shown:
        return ""
    previews = load_previews(folder, header, pairs, {image.image for image in shown})
    several_layers = len({layer for _, layer in pairs if layer != "-"}) > 1
    scores = _per_image_scores(explained[explained.image.isin([image.image for image in shown])])
    boxes = gallery_boxes(header, shown)
    lines = []
    for position, image in enumerate(shown):
        pixels = _input_pixels(image, header)
        cells = [_input_figure(image, pixels, names)]
        for explainer, layer in pairs:
            title = _label(explainer, layer, several_layers)
            cells.append(_explainer_figure(image, title, previews.get((image.image, explainer, layer)),
                                           pixels, scores.get((image.image, explainer, layer), {}),
                                           boxes.get(image.image), int(header.model["input_size"])))
        lines.append(f'<div class="gallery-row" data-page="{position // page_size}" '
                     f'data-image="{_e(image.image)}">{"".join(cells)}</div>')
    pages = -(-len(shown) // page_size)
    readable = sum(image.predicted is not None for image in images)
    sampled = (f"a seeded sample (seed {sample_seed}) of {len(shown)} of the {readable} "
               f"explained images" if len(shown) < readable else f"all {len(shown)} explained images")
    pager = ('<div class="pager"><button class="prev">◀ previous</button><button class="next">'
             'next ▶</button><button class="all">show all</button> <span class="page-label">'
             "</span></div>") if pages > 1 else ""
    missing = ("" if previews else '<p class="warn">This run kept no map previews (it ran '
               "with --no-maps): the gallery shows inputs and scores only.</p>\n")
    return (
        f"<h2>Gallery</h2>\n{missing}"
        f'<p class="note">{_e(sampled)}: the input as the model saw it (centre crop) and each '
        "explainer's normalised map (jet, blended 50%) with the image's scores.</p>\n"
        f'<div class="gallery" data-pages="{pages}">{pager}{"".join(lines)}</div>')


def _per_image_scores(explained: pd.DataFrame) -> dict[tuple[str, str, str], dict[str, Any]]:
    """{(image, explainer, layer): {"scores": [(column, arrow, value)], "failed": [...],
    "degenerate": bool}} in the order the metrics produced the columns."""
    out: dict[tuple[str, str, str], dict[str, Any]] = defaultdict(
        lambda: {"scores": [], "failed": [], "degenerate": False})
    for line in explained.itertuples():
        entry = out[(line.image, line.explainer, line.layer)]
        if line.metric in COST_METRICS:
            continue  # batch time / batch size and pass counts: shown per explainer, not image
        if line.status != "ok":
            entry["failed"].append(line.error)
            continue
        entry["degenerate"] = entry["degenerate"] or bool(line.degenerate)
        entry["scores"].append((line.column, leaderboard.ARROWS.get(line.direction, ""),
                                float(line.value)))
    return out


def _input_figure(image: GalleryImage, pixels: np.ndarray | None, names: _Classes) -> str:
    if pixels is not None:
        picture = _png(_png_bytes(np.asarray(Image.fromarray(pixels).resize(
            (THUMB, THUMB), Image.Resampling.LANCZOS))), f"input {image.image}")
    else:
        picture = _png(_png_bytes(np.full((THUMB, THUMB, 3), 200, np.uint8)),
                       f"input {image.image} (file not available)")
    confidence = ("" if image.confidence is None
                  else f"<br>p(target) = {leaderboard.format_number(image.confidence)}")
    correct = ""
    if image.label is not None and image.predicted is not None:
        correct = " ✓" if image.label == image.predicted else " ✗"
    return (f"<figure>{picture}<figcaption><b>{_e(image.image)}</b><br>"
            f"true: {_e(names(image.label))}<br>predicted: {_e(names(image.predicted))}{correct}"
            f"<br>explained: {_e(names(image.target))}{confidence}</figcaption></figure>")


def _explainer_figure(image: GalleryImage, title: str, preview: np.ndarray | None,
                      pixels: np.ndarray | None, entry: dict[str, Any],
                      boxes: np.ndarray | None = None, input_size: int | None = None) -> str:
    if preview is not None:
        picture = _png(overlay(pixels, preview, boxes=boxes, input_size=input_size),
                       f"{title} on {image.image}")
    else:
        picture = _png(_png_bytes(np.full((THUMB, THUMB, 3), 235, np.uint8)),
                       f"{title} on {image.image}: no map")
    badges = ""
    if entry.get("degenerate"):
        badges += ' <span class="badge" title="constant or non-finite map, scored as all-zero">' \
                  "degenerate</span>"
    for error in entry.get("failed", [])[:1]:
        badges += f' <span class="badge fail" title="{_e(error)}">failed</span>'
    rows = "".join(f'<tr><td class="k">{_e(column)} {arrow}</td>'
                   f"<td>{_e(leaderboard.format_number(value))}</td></tr>"
                   for column, arrow, value in entry.get("scores", []))
    return (f"<figure>{picture}<figcaption><b>{_e(title)}</b>{badges}"
            f'<table class="scores">{rows}</table></figcaption></figure>')


# -- curves, layers, cost -------------------------------------------------------------------


def _curve_groups(rows: list[ResultRow]) -> dict[str, dict[tuple[str, str, str], list[ResultRow]]]:
    """{variant: {(metric, explainer, layer): rows with a curve}}."""
    groups: dict[str, dict[tuple[str, str, str], list[ResultRow]]] = defaultdict(
        lambda: defaultdict(list))
    for row in rows:
        if row.metric in CURVE_METRICS and row.status == "ok" and row.curve is not None:
            groups[row.variant][(row.metric, row.explainer, row.layer)].append(row)
    return groups


def _curves_section(rows: list[ResultRow], header: RunHeader) -> str:
    from xbench.curves import draw_curves, mean_curves

    groups = _curve_groups(rows)
    if not groups:
        return ""
    parts = ["<h2>Insertion and deletion curves</h2>",
             '<p class="note">p(target) as pixels are inserted into a blurred image (insertion, '
             "higher AUC is better) or deleted to the baseline (deletion, lower is better), in "
             "the map's order. Thick line: mean over images; thin lines: single images.</p>"]
    for variant, group in sorted(groups.items()):
        means = mean_curves(rows, variant)
        images = max(curve.images for curve in means)
        overview = _file_png(draw_curves, means, f"{header.run_name}: {variant}, {images} images")
        parts.append(f"<h3>{_e(variant or 'curves')}: mean per explainer</h3>"
                     f'<div class="plot">{_png(overview, f"mean curves {variant}")}</div>')
        pairs = sorted({(explainer, layer) for _, explainer, layer in group})
        several = len({layer for _, layer in pairs if layer != "-"}) > 1
        figures = []
        for explainer, layer in pairs:
            label = _label(explainer, layer, several)
            png = _figure_png(_explainer_curves(group, explainer, layer, label))
            figures.append(f'<div class="plot">{_png(png, f"curves {label} {variant}")}</div>')
        parts.append(f"<h3>{_e(variant or 'curves')}: per image</h3>"
                     f'<div class="plots">{"".join(figures)}</div>')
    return "\n".join(parts)


def _explainer_curves(group: dict[tuple[str, str, str], list[ResultRow]], explainer: str,
                      layer: str, label: str) -> Figure:
    from matplotlib.collections import LineCollection
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 2.7), layout="constrained")
    axes = figure.subplots(1, 2, sharey=True)
    for ax, metric in zip(axes, CURVE_METRICS):
        members = group.get((metric, explainer, layer), [])
        if members:
            curves = np.array([row.curve for row in members], dtype=float)
            x = np.linspace(0.0, 1.0, curves.shape[1])
            ax.add_collection(LineCollection(  # one artist for all images: fast for many
                [np.column_stack([x, curve]) for curve in curves], linewidths=0.8, alpha=0.25,
                colors="tab:blue" if metric == "insertion" else "tab:red"))
            auc = float(np.mean([row.value for row in members]))
            ax.plot(x, curves.mean(axis=0), color="black", linewidth=2,
                    label=f"mean, AUC {auc:.3f}")
            ax.legend(fontsize="x-small", loc="upper right")
        ax.set_title(f"{label}: {metric} ({len(members)} images)", fontsize="small")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize="x-small")
    axes[0].set_ylabel("p(target)", fontsize="small")
    return figure


def _explainer_layers(frame: pd.DataFrame) -> set[str]:
    """The layers the run's explainers read ('-': none)."""
    return {str(layer) for layer in frame[frame.explainer != ""].layer.unique() if layer != "-"}


def _layers_section(rows: list[ResultRow], header: RunHeader, layers: set[str]) -> str:
    """The layer sweep plot from the ``insertion-deletion`` rows, when the run's explainers
    read several ``layers``."""
    from xbench.layer_plots import draw_layer_scores, layer_scores

    if len(layers) < 2:
        return ""
    try:
        order, points = layer_scores(rows, seed=header.config.get("seed", 0))
    except UserError as exc:
        return f"<h2>Layer sweep</h2><p>No layer plot: {_e(exc)}</p>"
    images = max(point.images for point in points)
    png = _file_png(draw_layer_scores, order, points,
                    f"{header.run_name}: overall score per layer ({images} images)")
    return f'<h2>Layer sweep</h2><div class="plot">{_png(png, "layer sweep")}</div>'


def _cost_section(table: pd.DataFrame) -> str:
    cost = table[table.metric.isin(COST_METRICS)]
    if cost.empty:
        return ""
    png = _figure_png(_cost_figure(cost))
    return ("<h2>Cost per explainer</h2>\n"
            '<p class="note">Forward and backward passes per image (mean) and explanation time '
            "per image (median, bar: interquartile range), warm-up excluded.</p>"
            f'<div class="plot">{_png(png, "cost per explainer")}</div>')


def _cost_figure(cost: pd.DataFrame) -> Figure:
    from matplotlib.figure import Figure

    metrics = [m for m in COST_METRICS if m in set(cost.metric)]
    several = len({layer for layer in cost.layer if layer != "-"}) > 1
    labels = sorted({(e, layer) for e, layer in zip(cost.explainer, cost.layer)})
    names = [_label(e, layer, several) for e, layer in labels]
    figure = Figure(figsize=(3.6 * len(metrics) + 1, 0.45 * len(labels) + 1.4),
                    layout="constrained")
    axes = np.atleast_1d(figure.subplots(1, len(metrics), sharey=True))
    for ax, metric in zip(axes, metrics):
        cells = cost[cost.metric == metric].set_index(["explainer", "layer"])
        y = np.arange(len(labels))
        if metric == "time":
            values = np.array([cells.loc[k, "median"] if k in cells.index else np.nan for k in labels])
            low = np.array([cells.loc[k, "q1"] if k in cells.index else np.nan for k in labels])
            high = np.array([cells.loc[k, "q3"] if k in cells.index else np.nan for k in labels])
            ax.barh(y, values, xerr=np.vstack([values - low, high - values]), color="tab:orange",
                    capsize=3)
            ax.set_xlabel("seconds per image (median, IQR)")
        else:
            values = np.array([cells.loc[k, "mean"] if k in cells.index else np.nan for k in labels])
            ax.barh(y, values, color="tab:blue")
            ax.set_xlabel(f"{metric} per image (mean)")
        for position, value in zip(y, values):
            if np.isfinite(value):
                ax.annotate(leaderboard.format_number(float(value)), (value, position),
                            xytext=(3, 0), textcoords="offset points", va="center",
                            fontsize="x-small")
        ax.set_yticks(y, names)
        ax.invert_yaxis()
        ax.margins(x=0.25)
        ax.grid(axis="x", alpha=0.3)
        ax.set_title(metric, fontsize="small")
    return figure


# -- failures -------------------------------------------------------------------------------


def _problems_section(frame: pd.DataFrame, images: list[GalleryImage]) -> str:
    """Failed cells (unreadable images included) and degenerate maps, with their files."""
    paths = {image.image: image.path for image in images}
    failed = leaderboard.failures(frame)
    degenerate = frame[(frame.status == "ok") & frame.degenerate.astype(bool)][
        ["image", "explainer", "layer"]].drop_duplicates()
    parts = ["<h2>Failures and degenerate maps</h2>"]
    if failed.empty and degenerate.empty:
        parts.append("<p>None: every image was read, explained and scored, and no map was "
                     "constant or non-finite.</p>")
        return "\n".join(parts)

    def file_of(image: str) -> str:
        path = paths.get(image)
        return str(path) if path is not None else image

    if not failed.empty:
        body = [(line.image, file_of(line.image), line.explainer or "(reading the image)",
                 line.layer, line.metric, line.error) for line in failed.itertuples()]
        parts.append(f"<h3>{_count(len(failed), 'failed cell')}</h3>" + _text_table(
            "failures", ("image", "file", "explainer", "layer", "metric", "error"), body))
    if not degenerate.empty:
        body = [(line.image, file_of(line.image), line.explainer, line.layer)
                for line in degenerate.itertuples()]
        parts.append(f"<h3>{_count(len(degenerate), 'degenerate map')}</h3>"
                     '<p class="note">Constant or non-finite maps, scored as the all-zero map '
                     "(docs/protocol.md).</p>"
                     + _text_table("degenerate", ("image", "file", "explainer", "layer"), body))
    return "\n".join(parts)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _text_table(table_id: str, head: Sequence[str], body: list[Sequence[Any]]) -> str:
    """A plain left-aligned table of escaped text."""
    cells = lambda values, tag: "".join(  # noqa: E731
        f'<{tag} class="name">{_e(value)}</{tag}>' for value in values)
    rows = "".join(f"<tr>{cells(line, 'td')}</tr>" for line in body)
    return (f'<div class="scroll"><table id="{table_id}"><thead><tr>{cells(head, "th")}</tr>'
            f"</thead><tbody>{rows}</tbody></table></div>")
