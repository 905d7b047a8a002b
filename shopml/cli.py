"""The ``shopml`` command line.

shopml run                         # the whole lifecycle on MovieLens-100K, locally
shopml run --events E --catalog C  # the same on your own canonical files
shopml data fetch movielens-100k   # only download and map the dataset
shopml serve                       # serve the latest model on 127.0.0.1:8080
shopml pipeline compile -o F.yaml  # the pipeline YAML for the Kubeflow UI
shopml deploy --dry-run --offline --storage-uri URI  # the InferenceService, as YAML
shopml bundles prune --keep 3      # old search bundles, never a served one

A failed stage prints one line (``error: stage evaluate failed: GateError: ...``) and
exits 1; ``shopml --verbose ...`` (or ``--log-level DEBUG``) adds DEBUG logs and the
failed stage's traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from shopml.cli_assets import assets_app, synth
from shopml.cli_features import events_app
from shopml.cli_search import app as search_app
from shopml.cli_security import audit_app, forget, security_app
from shopml.cli_serving import bundles_app, canary_app
from shopml.cli_serving import deploy as deploy_command
from shopml.config import Settings, load_settings
from shopml.logs import configure_logging

if TYPE_CHECKING:
    from shopml.runner import PipelineFailedError

logger = logging.getLogger(__name__)

app = typer.Typer(
    help="shopml: MLOps for e-commerce search and recommendation.", no_args_is_help=True
)
data_app = typer.Typer(help="Public datasets.", no_args_is_help=True)
pipeline_app = typer.Typer(
    help="The Kubeflow pipeline definition.", no_args_is_help=True
)
app.add_typer(data_app, name="data")
app.add_typer(pipeline_app, name="pipeline")
app.add_typer(assets_app, name="assets")
app.add_typer(events_app, name="events")
app.add_typer(audit_app, name="audit")
app.add_typer(security_app, name="security")
app.command("forget")(forget)
app.command("deploy")(deploy_command)
app.add_typer(canary_app, name="canary")
app.add_typer(bundles_app, name="bundles")
app.add_typer(search_app, name="search")
data_app.command("synth")(synth)

DATASETS = ("movielens-100k",)


@app.callback()
def _main(
    log_level: Annotated[
        str, typer.Option(help="DEBUG, INFO, WARNING or ERROR.")
    ] = "INFO",
    verbose: Annotated[
        bool,
        typer.Option("--verbose", "-v", help="DEBUG logs and full tracebacks."),
    ] = False,
) -> None:
    configure_logging("DEBUG" if verbose else log_level.upper())


@data_app.command("fetch")
def data_fetch(
    name: Annotated[str, typer.Argument(help="Dataset name: movielens-100k.")],
    dest: Annotated[
        Path | None, typer.Option(help="Folder for the canonical tables.")
    ] = None,
) -> None:
    """Download a public dataset and map it into canonical events/catalog/users tables."""
    from shopml.datasets import fetch_movielens_100k

    if name not in DATASETS:
        raise typer.BadParameter(
            f"unknown dataset {name!r}; available: {', '.join(DATASETS)}"
        )
    settings = load_settings()
    folder = dest or settings.home / "datasets" / name
    files = fetch_movielens_100k(folder)
    typer.echo(f"{name}: canonical tables in {folder}")
    for path in (files.events, files.catalog, files.users):
        typer.echo(f"  {path}")


@pipeline_app.command("compile")
def pipeline_compile(
    output: Annotated[Path, typer.Option("-o", "--output", help="YAML file to write.")],
) -> None:
    """Write the lifecycle pipeline as YAML for upload to the Kubeflow Pipelines UI."""
    from kfp import compiler

    from pipelines.lifecycle import lifecycle_pipeline

    output.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(lifecycle_pipeline, str(output))
    typer.echo(f"wrote {output}")


@app.command("run")
def run(
    events: Annotated[Path | None, typer.Option(help="Canonical events file.")] = None,
    catalog: Annotated[
        Path | None, typer.Option(help="Canonical catalog file.")
    ] = None,
    users: Annotated[
        Path | None, typer.Option(help="Canonical users file (optional).")
    ] = None,
    epochs: Annotated[
        int, typer.Option(min=1, help="Upper bound on training epochs.")
    ] = 200,
    min_lift: Annotated[
        float,
        typer.Option(
            min=-1.0, help="NDCG@10 lift over the best baseline to pass (0.05: 5 %)."
        ),
    ] = 0.0,
    demo_users: Annotated[
        int, typer.Option(min=0, help="Users to show recommendations for.")
    ] = 3,
    keep_serving: Annotated[
        bool, typer.Option(help="Leave the model server running.")
    ] = False,
) -> None:
    """Run the whole lifecycle locally through kfp.local and show the results."""
    from shopml.local_serving import read_server_record, stop_local
    from shopml.runner import PipelineFailedError, run_local_pipeline

    if (events is None) != (catalog is None):
        raise typer.BadParameter(
            "--events and --catalog go together; give both or neither"
        )
    if users is not None and events is None:
        raise typer.BadParameter("--users needs --events and --catalog")
    arguments: dict[str, Any] = {"epochs": epochs, "min_lift": min_lift}
    if events is not None and catalog is not None:
        arguments |= _file_arguments(events, catalog, users)

    settings = load_settings()
    try:
        result = run_local_pipeline(settings, arguments)
    except PipelineFailedError as err:
        _report_failure(err)
        raise typer.Exit(1) from err
    try:
        _show_results(settings, result, demo_users)
    finally:
        if not keep_serving:
            stop_local(int(read_server_record(settings)["pid"]))


def _report_failure(err: PipelineFailedError) -> None:
    """One message for a failed stage; its traceback only at DEBUG (``--verbose``)."""
    import traceback

    verbose = logging.getLogger().isEnabledFor(logging.DEBUG)
    if verbose:
        shown = err.traceback or "".join(traceback.format_exception(err))
        typer.echo(shown.rstrip("\n"), err=True)
    typer.echo(f"error: {err.summary}", err=True)
    hint = "" if verbose else " (--verbose shows the traceback)"
    typer.echo(f"full log: {err.log_path}{hint}", err=True)


def _file_arguments(events: Path, catalog: Path, users: Path | None) -> dict[str, Any]:
    for flag, path in (
        ("--events", events),
        ("--catalog", catalog),
        ("--users", users),
    ):
        if path is not None and not path.is_file():
            raise typer.BadParameter(f"{flag} {path}: no such file")
    return {
        "source": "files",
        "events_uri": str(events.resolve()),
        "catalog_uri": str(catalog.resolve()),
        "users_uri": str(users.resolve()) if users else "",
    }


def _show_results(settings: Settings, result: Any, demo_users: int) -> None:
    from shopml.console import print_evaluation, print_recommendations, sample_raw_users

    typer.echo("")
    print_evaluation(result.evaluation)
    users = sample_raw_users(result.output("ingest", "raw"), demo_users, settings)
    print_recommendations(result.endpoint, users)
    typer.echo("")
    typer.echo(f"Evaluation report : {result.output('evaluate', 'report')}")
    typer.echo(f"Data quality      : {result.output('clean', 'report')}")
    typer.echo(f"Monitor report    : {result.output('monitor', 'report')}")
    typer.echo(f"Model             : {result.output('train', 'model')}")
    typer.echo(
        f"Assets            : {settings.s3.bucket if settings.s3 else settings.store_root}"
    )
    typer.echo(f"Full log          : {result.log_path}")
    typer.echo(f"Pipeline time     : {result.seconds:.0f} s")
    typer.echo(
        "Serve again       : .venv/bin/shopml serve   (curl examples in README.md)"
    )


@app.command("serve")
def serve(
    model_dir: Annotated[
        Path | None, typer.Option(help="Model folder; default: latest.")
    ] = None,
    port: Annotated[int, typer.Option(min=1, max=65535, help="HTTP port.")] = 8080,
    host: Annotated[str, typer.Option(help="Bind address.")] = "127.0.0.1",
    name: Annotated[str, typer.Option(help="Model name in the URL.")] = "recommender",
    canary: Annotated[
        int | None,
        typer.Option(
            min=0, max=100, help="Send this percent of traffic to --canary-model-dir."
        ),
    ] = None,
    canary_model_dir: Annotated[
        Path | None, typer.Option(help="Model folder of the canary.")
    ] = None,
) -> None:
    """Serve a trained model with KServe's ModelServer (v1 and v2 protocols).

    With ``--canary PERCENT`` a stable and a canary server run behind a local traffic
    splitter on the same port, as an InferenceService canary does on a cluster.
    """
    from shopml.console import latest_model_dir
    from shopml.local_serving import DeploymentError

    settings = load_settings()
    folder = model_dir or latest_model_dir(settings)
    if canary is not None:
        from shopml.cli_serving import serve_canary

        if canary_model_dir is None:
            raise typer.BadParameter("--canary needs --canary-model-dir")
        try:
            serve_canary(folder, canary_model_dir, canary, port=port, name=name)
        except DeploymentError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(1) from err
        return
    command = [
        sys.executable, "-m", "serving", "--model-dir", str(folder),
        "--model-name", name, "--http-port", str(port), "--host", host,
    ]  # fmt: skip
    typer.echo(f"serving {folder} as {name!r} on http://{host}:{port}")
    os.execv(sys.executable, command)


if __name__ == "__main__":
    app()
