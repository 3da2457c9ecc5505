"""Benchmarks shipped with the tool: `visa bench noise` (selection quality) and `visa bench speed`.

``register(app, ...)`` adds the ``bench`` sub-command group to the `visa` Typer app.
"""

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any


def register(
    app: Any,
    console: Any,
    fail: Callable[[str], None],
    user_errors: Callable[[], tuple[type[BaseException], ...]],
) -> None:
    """Add ``visa bench noise`` and ``visa bench speed`` to ``app`` (a typer.Typer), reporting through
    the CLI's own ``console`` (stderr), ``fail`` (one-line error, exit 2) and ``user_errors``."""
    import typer
    from rich.console import Console

    bench = typer.Typer(
        name="bench",
        help="Measure selection quality on injected noise, and speed.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        rich_markup_mode=None,
    )
    out = Console(width=200)

    def bench_errors() -> tuple[type[BaseException], ...]:
        from visa.bench.noise import BenchError

        return (BenchError, *user_errors())

    @bench.command("noise")
    def noise_cmd(
        data: Annotated[
            Path,
            typer.Option("--data", "-d", help="clean LLaVA records in any input format visa reads (meta.kind 'clean' records, or all)"),
        ],
        out_dir: Annotated[
            Path, typer.Option("--out", "-o", help="folder for the pool, the run and the report")
        ],
        recipe: Annotated[
            str, typer.Option("--recipe", "-r", help="bundled recipe name or YAML path")
        ] = "embedded",
        image_root: Annotated[
            Path | None, typer.Option("--image-root", help="folder image paths resolve under (default: the data's folder)")
        ] = None,
        seed: Annotated[int, typer.Option("--seed", help="seed of the pool and the random baseline")] = 0,
        budget: Annotated[
            str, typer.Option("--budget", help="selection budget: a count or a percentage")
        ] = "50%",
        misaligned: Annotated[
            float, typer.Option("--misaligned", min=0, help="misaligned samples per clean sample")
        ] = 0.25,
        degraded: Annotated[
            float,
            typer.Option("--degraded", min=0, help="degraded samples per clean sample, per degradation"),
        ] = 0.08,
        text_only: Annotated[
            float, typer.Option("--text-only", min=0, help="text-only samples per clean sample")
        ] = 0.15,
        kinds: Annotated[
            str, typer.Option("--kinds", help="comma-separated noise kinds to inject")
        ] = "misaligned,blank,blur,thumbnail,noise,jpeg,text_only",
        max_clean: Annotated[
            int | None, typer.Option("--max-clean", min=2, help="use at most this many clean records (default: all)")
        ] = None,
        workers: Annotated[int, typer.Option("--workers", "-w", min=1, help="worker processes for the local executor")] = 1,
    ) -> None:
        """Inject labelled noise into clean data, score and select it, and rate every signal by AUROC and precision."""
        from visa.bench.noise import PoolOptions, breakdown_markdown, rich_table, run_noise
        from visa.progress import RunProgress, make_progress

        options = PoolOptions(
            seed=seed,
            misaligned=misaligned,
            degraded=degraded,
            text_only=text_only,
            kinds=tuple(k.strip() for k in kinds.split(",") if k.strip()),
            max_clean=max_clean,
        )
        if image_root is not None and not image_root.is_dir():
            fail(f"--image-root is not a folder: {image_root}")
        try:
            with make_progress(console) as bars:
                report = run_noise(
                    recipe,
                    data,
                    out_dir,
                    image_root=image_root,
                    seed=seed,
                    budget=budget,
                    pool_options=options,
                    workers=workers,
                    progress=RunProgress(bars),
                )
        except bench_errors() as err:
            fail(str(err).splitlines()[0] if str(err) else type(err).__name__)
            return
        out.print(rich_table(report))
        out.print(
            "selection by noise kind:\n" + breakdown_markdown(report["selection_by_kind"]), markup=False
        )
        out.print(f"report: {out_dir / 'noise.json'}, {out_dir / 'noise.md'}")

    @bench.command("speed")
    def speed_cmd(
        data: Annotated[
            Path | None, typer.Option("--data", "-d", help="input (default: the bundled examples)")
        ] = None,
        out_dir: Annotated[
            Path, typer.Option("--out", "-o", help="folder for the run and the report")
        ] = Path("runs/bench-speed"),
        recipe: Annotated[
            str, typer.Option("--recipe", "-r", help="bundled recipe name or YAML path")
        ] = "embedded",
        image_root: Annotated[
            Path | None, typer.Option("--image-root", help="folder image paths resolve under (default: the data's folder)")
        ] = None,
        workers: Annotated[int, typer.Option("--workers", "-w", min=1, help="worker processes for the local executor")] = 1,
        ratios: Annotated[
            bool, typer.Option("--ratios", help="also rerun the cheap naive-vs-optimised benchmarks")
        ] = False,
    ) -> None:
        """Images/s and samples/s per agent and end to end, and peak memory, of one scoring run."""
        from visa.bench.speed import rich_table, run_speed

        try:
            report = run_speed(recipe, data, out_dir, image_root=image_root, workers=workers, ratios=ratios)
        except bench_errors() as err:
            fail(str(err).splitlines()[0] if str(err) else type(err).__name__)
            return
        out.print(rich_table(report))
        out.print(f"report: {out_dir / 'speed.json'}, {out_dir / 'speed.md'}")

    app.add_typer(bench, name="bench")
