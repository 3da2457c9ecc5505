"""The `visa` command line."""

from __future__ import annotations

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
)
console = Console(stderr=True)
out = Console()

RecipeOpt = Annotated[str, typer.Option("--recipe", "-r", help="bundled recipe name (e.g. embedded) or a YAML path")]
DataOpt = Annotated[Path, typer.Option("--data", "-d", help="input: .json array, .jsonl, .parquet, or a datasets folder")]
RootOpt = Annotated[
    Path | None, typer.Option("--image-root", help="folder that relative image paths resolve under (default: the data's folder)")
]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="run folder (created; rerun the same command to resume)")]
WorkersOpt = Annotated[int, typer.Option("--workers", "-w", min=1, help="worker processes for the local executor")]


def _user_errors() -> tuple[type[BaseException], ...]:
    from visa.readers import InputError
    from visa.recipe import RecipeError
    from visa.store import WorkDirMismatch

    return (RecipeError, InputError, WorkDirMismatch, FileNotFoundError, NotADirectoryError)


def _fail(message: str) -> None:
    console.print(Text.assemble(("error: ", "bold red"), message), soft_wrap=True)
    raise typer.Exit(2)


def run_score(recipe_name: str, data: Path, out_dir: Path, image_root: Path | None, workers: int) -> dict[str, Any]:
    from visa.progress import RunProgress, make_progress, summary_table
    from visa.recipe import load_recipe
    from visa.scoring import score

    try:
        recipe = load_recipe(recipe_name)
        if not data.exists():
            raise FileNotFoundError(f"input not found: {data}")
        if image_root is not None and not image_root.is_dir():
            raise NotADirectoryError(f"--image-root is not a folder: {image_root}")
        with make_progress(console) as bars:
            record = score(recipe, data, out_dir, image_root=image_root, workers=workers, progress=RunProgress(bars))
    except _user_errors() as err:
        _fail(str(err).splitlines()[0] if str(err) else type(err).__name__)
    out.print(summary_table(record))
    return record


@app.command("score")
def score_cmd(recipe: RecipeOpt, data: DataOpt, out: OutOpt, image_root: RootOpt = None, workers: WorkersOpt = 1) -> None:
    """Score every record with the recipe's agents into OUT/scores.parquet (resumable)."""
    run_score(recipe, data, out, image_root, workers)


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
    recipe: Annotated[str, typer.Option("--recipe", "-r")] = "embedded",
    workers: WorkersOpt = 1,
) -> None:
    """Run the embedded recipe on the bundled examples."""
    try:
        examples = examples_dir()
    except FileNotFoundError as err:
        _fail(str(err))
    run_score(recipe, examples / "llava.json", out, None, workers)


@app.command("doctor")
def doctor_cmd() -> None:
    """What is installed, and which agents, backends and recipes can run here (and why not)."""
    from visa.doctor import doctor_report

    out.print(doctor_report())


@app.command("version")
def version_cmd() -> None:
    """Print the version."""
    out.print(__version__)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        console.print("interrupted: rerun the same command to resume")
        sys.exit(130)


if __name__ == "__main__":
    main()
