"""The `visa` command line."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.text import Text

from visa import __version__

app = typer.Typer(
    name="visa",
    help="Pick the most valuable samples of a visual instruction-tuning set (ViSA).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts are plain text: 'visa[ray]' and '*.tar' print as written
)
console = Console(stderr=True)
out = Console()
_debug = False

DEFAULT_RECIPE = "embedded"
RecipeOpt = Annotated[
    str, typer.Option("--recipe", "-r", help="bundled recipe name (embedded, gpu-lite, paper) or a YAML path")
]
DataOpt = Annotated[
    Path,
    typer.Option(
        "--data", "-d",
        help="input: .json array, .jsonl, .parquet (file or folder), a datasets save_to_disk folder, "
        "or WebDataset .tar shards (a file, a folder or a glob such as 'shards/train-*.tar')",
    ),
]
RootOpt = Annotated[
    Path | None, typer.Option("--image-root", help="folder that relative image paths resolve under (default: the data's folder)")
]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="run folder (created; rerun the same command to resume)")]
WorkersOpt = Annotated[int, typer.Option("--workers", "-w", min=1, help="worker processes for the local executor")]
ExecutorOpt = Annotated[
    str, typer.Option("--executor", help="local: this machine (--workers processes); ray: a Ray cluster (visa[ray])")
]
WaitOpt = Annotated[
    bool, typer.Option("--wait", help="if another visa command is using the run folder, wait for it instead of stopping")
]
RayAddressOpt = Annotated[
    str | None,
    typer.Option("--ray-address", help="for --executor ray: 'auto' on a cluster node, ray://HOST:10001; default: start Ray here"),
]
AllowMissingOpt = Annotated[
    bool,
    typer.Option(
        "--allow-missing-images",
        help="score on even when most image files are missing (by default the run stops once more than "
        "half of the records so far name missing files: usually a wrong --image-root)",
    ),
]


def _user_errors() -> tuple[type[BaseException], ...]:
    from visa.agents.base import MissingDependency
    from visa.executors.ray import ExecutorError
    from visa.readers import InputError
    from visa.recipe import RecipeError
    from visa.run_folder import RunFolderError
    from visa.run_lock import RunFolderBusy
    from visa.selection import SelectionError
    from visa.store import WorkDirMismatch

    return (
        RecipeError, InputError, WorkDirMismatch, FileNotFoundError, NotADirectoryError, PermissionError,
        MissingDependency, ExecutorError, SelectionError, RunFolderBusy, RunFolderError,
    )


def _one_line(err: BaseException) -> str:
    """The first line of an error; an operating-system error raised by the system (it has an errno)
    in the words of :mod:`visa.os_errors`, which say what to do. With ``visa --debug`` the error is
    raised again instead, traceback and all."""
    if _debug:
        raise err
    if isinstance(err, OSError) and err.errno is not None:
        from visa.os_errors import describe

        return describe(err)
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def _fail(message: str) -> None:
    console.print(Text.assemble(("error: ", "bold red"), message), soft_wrap=True)
    raise typer.Exit(2)


def _executor(executor: str, workers: int, ray_address: str | None) -> Any:
    if executor not in ("local", "ray"):
        _fail(f"--executor must be 'local' or 'ray', not '{executor}'")
    if executor == "local":
        if ray_address:
            _fail("--ray-address needs --executor ray")
        return None
    if workers != 1:
        _fail("--workers is for the local executor; size Ray pools with the recipe's pool: fields")
    from visa.executors.ray import RayExecutor

    return RayExecutor(address=ray_address)


def check_paths(data: Path, out_dir: Path, image_root: Path | None) -> None:
    """Fail with one line unless the input exists (or its glob matches), the image root is a folder
    and the run folder can be created and written."""
    from visa.readers.webdataset import is_glob

    if not data.exists() and not is_glob(str(data)):
        raise FileNotFoundError(f"input not found: {data}")
    if image_root is not None and not image_root.is_dir():
        raise NotADirectoryError(f"--image-root is not a folder: {image_root}")
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"--out {out_dir} exists and is not a folder")
    existing = next((p for p in (out_dir.absolute(), *out_dir.absolute().parents) if p.exists()), None)
    if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"--out {out_dir}: cannot create or write in {existing}")


def prepare_score(
    recipe_name: str, data: Path, out_dir: Path, image_root: Path | None, workers: int,
    executor: str = "local", ray_address: str | None = None,
) -> tuple[Any, Any]:
    """Everything `visa score` checks before any model loads: executor, recipe (and that its optional
    dependencies are installed), paths and the input's format. Returns the recipe and the executor."""
    from visa.readers import open_input
    from visa.recipe import load_recipe
    from visa.scoring import check_runnable

    runner = _executor(executor, workers, ray_address)
    recipe = load_recipe(recipe_name)
    check_paths(data, out_dir, image_root)
    open_input(data)
    check_runnable(recipe)
    return recipe, runner


def check_selection(recipe: Any, overrides: dict[str, Any]) -> None:
    """Validate selection options as `visa select` will resolve them (the recipe's ``selection:``
    section with ``overrides`` on top), so that a bad one fails before scoring starts."""
    from visa.families import VISUAL_FAMILIES
    from visa.registry import did_you_mean
    from visa.selection import SelectionError, resolve_options

    options = resolve_options({"recipe": recipe.model_dump(mode="json")}, overrides)
    known = sorted({*VISUAL_FAMILIES, *recipe.scores})
    unknown = sorted(set(options.visual_weights or {}) - set(known))
    if unknown:
        raise SelectionError(
            f"unknown visual family '{unknown[0]}'{did_you_mean(unknown[0], known)}; known: {', '.join(known)}"
        )


def run_score(
    recipe_name: str, data: Path, out_dir: Path, image_root: Path | None, workers: int,
    executor: str = "local", ray_address: str | None = None, *, allow_missing_images: bool = False,
    selection: dict[str, Any] | None = None, wait: bool = False,
) -> dict[str, Any]:
    """`visa score`. ``selection`` holds the options of a `visa select` that follows (`visa run`):
    they are validated with everything else before scoring."""
    from visa.progress import RunProgress, make_progress, summary_table
    from visa.scoring import score

    try:
        recipe, runner = prepare_score(recipe_name, data, out_dir, image_root, workers, executor, ray_address)
        if selection is not None:
            check_selection(recipe, selection)
        with make_progress(console) as bars:
            record = score(
                recipe, data, out_dir, image_root=image_root, workers=workers, executor=runner,
                progress=RunProgress(bars), stop_on_missing=not allow_missing_images, wait=wait,
            )
    except _user_errors() as err:
        _fail(_one_line(err))
    out.print(summary_table(record))
    return record


@app.command("score")
def score_cmd(
    data: DataOpt, out: OutOpt, recipe: RecipeOpt = DEFAULT_RECIPE, image_root: RootOpt = None,
    workers: WorkersOpt = 1, executor: ExecutorOpt = "local", ray_address: RayAddressOpt = None,
    allow_missing_images: AllowMissingOpt = False, wait: WaitOpt = False,
) -> None:
    """Score every record with the recipe's agents into OUT/scores.parquet (resumable)."""
    run_score(
        recipe, data, out, image_root, workers, executor, ray_address, allow_missing_images=allow_missing_images,
        wait=wait,
    )


SELECT_HELP = {
    "budget": "samples to keep: a count, a percentage of the pool ('2.5%'), or 'all'",
    "value": "Shapley value function: probes (agreement with the run's probes) or consensus (the paper's)",
    "image_keep": "visual stage: 'probes' (cut where the image probes say images look degraded) or a fraction",
    "visual_weights": "weights of the visual scores, e.g. 'dp=2' (families not named keep weight 1)",
    "text_only": "text-only samples: keep (compete on IM/PT) or drop",
    "im_min": "'probes' (cut calibrated on the IM probes), a raw IM value, or 'off'",
    "pt_tail": "drop this top fraction of PT, the garbled tail",
    "pt_blend": "weight of PT in the instruction ranking (0: IM only)",
    "quota_field": "column whose values share the budget, e.g. meta.source",
    "quota_mode": "proportional (to the pool) or capped (at --quota-max-share)",
    "quota_min": "every quota value keeps at least this many samples",
    "quota_max_share": "capped mode: the most one value may take of the budget",
    "dedupe": "drop samples whose image set and conversation repeat a better-ranked one",
    "max_per_image": "keep at most this many samples per image ('off': no cap)",
    "calibration_size": "rows (unique images for image scores) used to fit Shapley weights",
    "seed": "seed of the calibration sample and of Monte Carlo Shapley",
    "clusters": "content clusters: 'auto' (the scores' clusters), 'off', or a column such as meta.task",
    "cluster_balance": "budget over clusters: 0 proportional to their pools, 1 equal",
    "cluster_atypical": "each content cluster drops this fraction of its rows least typical of it",
}
#: What `visa select` uses when neither the option nor the recipe's ``selection:`` section sets a value
#: (the defaults of :class:`visa.selection.SelectionOptions`; a test keeps the two in step).
SELECT_DEFAULTS = {
    "budget": "all", "value": "probes", "image_keep": "probes", "visual_weights": "from the probes",
    "text_only": "keep", "im_min": "probes",
    "pt_tail": "0.02", "pt_blend": "0", "quota_field": "none", "quota_mode": "proportional", "quota_min": "1",
    "quota_max_share": "0.5", "dedupe": "dedupe", "max_per_image": "off", "calibration_size": "1000", "seed": "0",
    "clusters": "auto", "cluster_balance": "0", "cluster_atypical": "0.2",
}


def _opt(name: str, *flags: str) -> Any:
    """A `visa select` option: None when not given, so that the recipe's ``selection:`` value applies."""
    return typer.Option(
        *(flags or ("--" + name.replace("_", "-"),)), help=f"{SELECT_HELP[name]}  [default: {SELECT_DEFAULTS[name]}]"
    )


def run_select(
    run_dir: Path, overrides: dict[str, Any], write_records: bool = True, wait: bool = False
) -> dict[str, Any]:
    from visa.progress import selection_table
    from visa.selection import read_run, resolve_options, select

    try:
        options = resolve_options(read_run(run_dir), overrides)
        result = select(run_dir, options, write_records=write_records, wait=wait)
    except _user_errors() as err:
        _fail(_one_line(err))
    out.print(selection_table(result.summary))
    return result.summary


@app.command("select")
def select_cmd(
    run_dir: Annotated[Path, typer.Argument(help="a run folder written by `visa score`")],
    budget: Annotated[str | None, _opt("budget")] = None,
    value: Annotated[str | None, _opt("value")] = None,
    image_keep: Annotated[str | None, _opt("image_keep")] = None,
    visual_weights: Annotated[str | None, _opt("visual_weights")] = None,
    text_only: Annotated[str | None, _opt("text_only")] = None,
    im_min: Annotated[str | None, _opt("im_min")] = None,
    pt_tail: Annotated[float | None, _opt("pt_tail")] = None,
    pt_blend: Annotated[float | None, _opt("pt_blend")] = None,
    quota_field: Annotated[str | None, _opt("quota_field")] = None,
    quota_mode: Annotated[str | None, _opt("quota_mode")] = None,
    quota_min: Annotated[int | None, _opt("quota_min")] = None,
    quota_max_share: Annotated[float | None, _opt("quota_max_share")] = None,
    dedupe: Annotated[bool | None, _opt("dedupe", "--dedupe/--no-dedupe")] = None,
    max_per_image: Annotated[str | None, _opt("max_per_image")] = None,
    clusters: Annotated[str | None, _opt("clusters")] = None,
    cluster_balance: Annotated[float | None, _opt("cluster_balance")] = None,
    cluster_atypical: Annotated[float | None, _opt("cluster_atypical")] = None,
    calibration_size: Annotated[int | None, _opt("calibration_size")] = None,
    seed: Annotated[int | None, _opt("seed")] = None,
    no_records: Annotated[
        bool,
        typer.Option("--no-records", help="write selection.parquet only (earlier record outputs and report are removed)"),
    ] = False,
    wait: WaitOpt = False,
) -> None:
    """Select a subset from scored RUN_DIR (model-free: reruns in seconds with other options).

    An option not given takes the value of the recipe's selection: section, else the default shown.
    """
    overrides = {k: v for k, v in locals().items() if k not in {"run_dir", "no_records", "wait"}}
    run_select(run_dir, overrides, write_records=not no_records, wait=wait)


@app.command("run")
def run_cmd(
    data: DataOpt,
    out: OutOpt,
    budget: Annotated[str, typer.Option("--budget", help=SELECT_HELP["budget"])],
    recipe: RecipeOpt = DEFAULT_RECIPE,
    image_root: RootOpt = None,
    workers: WorkersOpt = 1,
    executor: ExecutorOpt = "local",
    ray_address: RayAddressOpt = None,
    allow_missing_images: AllowMissingOpt = False,
) -> None:
    """Score, then select BUDGET samples, then write the report (every option is checked first)."""
    run_score(
        recipe, data, out, image_root, workers, executor, ray_address,
        allow_missing_images=allow_missing_images, selection={"budget": budget},
    )
    run_select(out, {"budget": budget})
    run_report(out)


def run_report(run_dir: Path, gallery_size: int = 12) -> Path:
    from visa.report import ReportError, build_report
    from visa.run_folder import RunFolder

    folder = RunFolder(run_dir)
    try:
        if not folder.path.is_dir():
            path = build_report(run_dir, gallery_size=gallery_size)  # says what is missing
        else:
            with folder.lock():  # no other command writes meanwhile; an interrupted selection is completed
                folder.recover()
                path = build_report(run_dir, gallery_size=gallery_size)
    except (ReportError, *_user_errors()) as err:
        _fail(_one_line(err))
    out.print(f"report: {path}")
    return path


@app.command("report")
def report_cmd(
    run_dir: Annotated[Path, typer.Argument(help="a run folder")],
    gallery_size: Annotated[int, typer.Option("--gallery-size", min=0, help="thumbnails per gallery strip")] = 12,
) -> None:
    """Write RUN_DIR/report.html: one self-contained page with plots and galleries."""
    run_report(run_dir, gallery_size)


def examples_dir() -> Path:
    """The examples folder of a source checkout."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidate = parent / "examples" / "llava.json"
        if candidate.is_file():
            return candidate.parent
    raise FileNotFoundError("examples/ not found: run `visa demo` from a source checkout of visa")


@app.command("demo")
def demo_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="run folder")] = Path("runs/demo"),
    recipe: RecipeOpt = DEFAULT_RECIPE,
    workers: WorkersOpt = 1,
    budget: Annotated[str, typer.Option("--budget", help="selection budget ('off': score only)")] = "50%",
) -> None:
    """Run the embedded recipe on the bundled examples: score, select half, report."""
    try:
        examples = examples_dir()
    except FileNotFoundError as err:
        _fail(str(err))
    selecting = budget.lower() not in {"none", "off"}
    selection = {"budget": budget} if selecting else None
    run_score(recipe, examples / "llava.json", out, None, workers, selection=selection)
    if selecting:
        run_select(out, {"budget": budget})
        run_report(out)


@app.command("doctor")
def doctor_cmd() -> None:
    """What is installed, and which agents, backends and recipes can run here (and why not)."""
    from visa.doctor import doctor_report

    out.print(doctor_report())


@app.command("version")
def version_cmd() -> None:
    """Print the version."""
    out.print(__version__)


def _print_version(value: bool) -> None:
    if value:
        out.print(__version__)
        raise typer.Exit()


@app.callback()
def _main_options(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="print the version and exit")
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="on an error, show the full traceback")] = False,
) -> None:
    """Pick the most valuable samples of a visual instruction-tuning set (ViSA)."""
    global _debug
    _debug = debug


def _register_subcommands() -> None:
    from visa.bench import register as register_bench

    register_bench(app, console, _fail, _user_errors)


_register_subcommands()


def main() -> None:
    from visa.os_errors import FIXABLE, describe

    try:
        app()
    except KeyboardInterrupt:
        console.print("interrupted: rerun the same command to resume")
        sys.exit(130)
    except FIXABLE as err:  # the disk, the permissions, a killed worker: one line, not a traceback
        if _debug:
            raise
        console.print(Text.assemble(("error: ", "bold red"), describe(err)), soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
