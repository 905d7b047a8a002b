"""Command-line pieces for rollouts: ``shopml deploy``, ``shopml canary ...`` and the
local canary stack behind ``shopml serve --canary PERCENT``.

``shopml deploy --storage-uri s3://shopml/models/recommender/<version>`` creates or
patches the cluster's InferenceService (a canary at ``--canary-percent``); with
``--dry-run`` it prints what it would send and changes nothing. Without a cluster (no
kubeconfig at all, or ``--offline``) a dry run prints the full object it would create,
as YAML for ``kubectl apply -f -``; a kubeconfig whose server fails is an error naming
that server, never a silent fallback; each API call gives up after ``--timeout``
seconds (10). On an InferenceService in RawDeployment mode, where KServe runs no
canary, a canary is refused and ``--no-canary`` replaces the model at once.
``shopml canary analyze`` compares canary and stable from an impression log and
feedback events and, with ``--apply``, promotes or rolls back on the local splitter or
the cluster.
:func:`start_local_canary` runs a stable and a canary model server and the splitter
(:mod:`serving.splitter`) on 127.0.0.1, so the same analysis runs on one machine.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import httpx
import pandas as pd
import typer
import yaml

from shopml.audit import AuditEvent
from shopml.canary import CanaryDecision
from shopml.config import load_settings
from shopml.local_serving import (
    LOOPBACK,
    DeploymentError,
    LocalDeployment,
    deploy_local,
    free_port,
    stop_local,
)

# Cluster options shared by the commands that talk to the Kubernetes API.
KubeconfigOption = Annotated[
    Path | None,
    typer.Option(help="Kubeconfig file (default: in-cluster, ~/.kube)."),
]
ContextOption = Annotated[str | None, typer.Option(help="Kubeconfig context.")]
TimeoutOption = Annotated[
    float,
    typer.Option(min=0.1, help="Seconds each API call may take to connect/answer."),
]

if TYPE_CHECKING:
    from shopml.kserve_objects import ClusterTarget, RolloutPlan

logger = logging.getLogger(__name__)

canary_app = typer.Typer(help="Canary analysis and decisions.", no_args_is_help=True)
bundles_app = typer.Typer(
    help="Search bundles (serving/search/) the search InferenceService downloads.",
    no_args_is_help=True,
)


def deploy(
    storage_uri: Annotated[
        str, typer.Option(help="Model version: s3://<bucket>/models/<name>/<version>.")
    ],
    name: Annotated[str, typer.Option(help="InferenceService name.")] = "recommender",
    namespace: Annotated[str, typer.Option(help="Namespace.")] = "shopml",
    canary_percent: Annotated[
        int, typer.Option(help="Traffic share of a new version, 1..99.")
    ] = 10,
    dry_run: Annotated[
        bool, typer.Option(help="Print what would be sent; change nothing.")
    ] = False,
    offline: Annotated[
        bool,
        typer.Option(
            help="With --dry-run: contact no cluster; print the object a first "
            "rollout would create."
        ),
    ] = False,
    kubeconfig: KubeconfigOption = None,
    context: ContextOption = None,
    timeout: TimeoutOption = 10.0,
    no_canary: Annotated[
        bool,
        typer.Option(
            "--no-canary",
            help="Send the new version all traffic at once (a RawDeployment "
            "InferenceService cannot run a canary).",
        ),
    ] = False,
) -> None:
    """Roll a model version out to the cluster's InferenceService as a canary."""
    from components.deploy import deploy_kserve
    from shopml.kserve_api import ClusterAccessError
    from shopml.kserve_objects import ClusterTarget, check_storage_uri, plan_rollout

    if offline and not dry_run:
        raise typer.BadParameter("--offline only prints a plan: add --dry-run")
    try:
        check_storage_uri(storage_uri)
        target = ClusterTarget(
            name=name, namespace=namespace, canary_percent=canary_percent
        )
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err

    try:
        api, unread = _rollout_api(
            kubeconfig, context, offline=offline, dry_run=dry_run, timeout_s=timeout
        )
        if api is None:
            plan = plan_rollout(target, storage_uri, None)
        else:
            plan = deploy_kserve(
                storage_uri, target, api=api, dry_run=dry_run, canary=not no_canary
            )
    except (ClusterAccessError, FileNotFoundError, ValueError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from err
    _print_plan(plan, target, dry_run, unread)


def _rollout_api(
    kubeconfig: Path | None,
    context: str | None,
    *,
    offline: bool,
    dry_run: bool,
    timeout_s: float,
) -> tuple[Any, str]:
    """The API to use, or ``None`` and why the live object cannot be read.

    Only a dry run may go without a cluster, and only when none is configured at all
    (or ``--offline``); a kubeconfig that exists is used, and its failures are errors.
    """
    from shopml.kserve_api import KubeconfigNotFoundError, kubernetes_api

    if offline:
        return None, "--offline"
    try:
        api = kubernetes_api(
            str(kubeconfig) if kubeconfig else None, context, timeout_s
        )
        return api, ""
    except KubeconfigNotFoundError as err:
        if not dry_run:
            raise
        return None, str(err)


def _print_plan(
    plan: RolloutPlan, target: ClusterTarget, dry_run: bool, unread: str
) -> None:
    """Print the plan: YAML of the object when the cluster was not read, else JSON."""
    verb = "would" if dry_run else "did"
    typer.echo(
        f"# {verb} {plan.action} inferenceservice {target.namespace}/{target.name}"
    )
    if unread:
        typer.echo(f"# could not read the live object ({unread}); showing a create")
        typer.echo(yaml.safe_dump(plan.body, sort_keys=False), nl=False)
        return
    typer.echo(
        json.dumps(
            {
                "action": plan.action,
                "stable": plan.stable_uri,
                "canary": plan.canary_uri,
                "body": plan.body,
            },
            indent=2,
        )
    )


@bundles_app.command("prune")
def bundles_prune(
    keep: Annotated[
        int, typer.Option(min=1, help="Newest bundles kept besides the served ones.")
    ] = 3,
    dry_run: Annotated[bool, typer.Option(help="Only list what would go.")] = False,
    name: Annotated[str, typer.Option(help="The search InferenceService.")] = "search",
    namespace: Annotated[str, typer.Option(help="Namespace.")] = "shopml",
    kubeconfig: KubeconfigOption = None,
    context: ContextOption = None,
    timeout: TimeoutOption = 10.0,
) -> None:
    """Delete old search bundles; never one the InferenceService still serves.

    The cluster is always read (what it serves decides what stays), so this needs a
    reachable API server; ``shopml deploy`` prunes the same way after each search
    rollout.
    """
    from components.deploy import prune_unserved_bundles
    from shopml.kserve_api import ClusterAccessError, kubernetes_api
    from shopml.kserve_objects import search_target

    try:
        api = kubernetes_api(str(kubeconfig) if kubeconfig else None, context, timeout)
        cluster = replace(search_target(namespace=namespace), name=name)
        doomed = prune_unserved_bundles(
            cluster, api=api, keep_last=keep, dry_run=dry_run
        )
    except (ClusterAccessError, FileNotFoundError, ValueError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from err
    verb = "would delete" if dry_run else "deleted"
    typer.echo(f"{verb} {len(doomed)} search bundle(s)")
    for bundle in doomed:
        typer.echo(f"  {bundle.ref} ({bundle.model_ref}, {bundle.index_ref})")


@canary_app.command("analyze")
def canary_analyze(
    impressions: Annotated[Path, typer.Option(help="Impression log (JSON lines).")],
    feedback: Annotated[Path, typer.Option(help="Feedback events (Parquet or CSV).")],
    model_ref: Annotated[str, typer.Option(help="Canary model, name@version.")],
    splitter: Annotated[
        str | None, typer.Option(help="Apply on the local splitter at this URL.")
    ] = None,
    kserve: Annotated[
        str | None,
        typer.Option(help="Apply on this InferenceService, namespace/name."),
    ] = None,
) -> None:
    """Decide promote / rollback / wait; apply it when a target is given."""
    from shopml.canary import analyze_canary, read_impressions

    frame = (
        pd.read_csv(feedback, parse_dates=["timestamp"])
        if feedback.suffix == ".csv"
        else pd.read_parquet(feedback)
    )
    result = analyze_canary(read_impressions(impressions), frame)
    typer.echo(json.dumps(result.details(), indent=2))
    if splitter or kserve:
        event = apply_canary_decision(
            result, model_ref, splitter=splitter, kserve=kserve
        )
        if event is not None:
            typer.echo(f"recorded audit event seq={event.seq}")


def apply_canary_decision(
    result: CanaryDecision,
    model_ref: str,
    *,
    splitter: str | None = None,
    kserve: str | None = None,
) -> AuditEvent | None:
    """Apply a :class:`shopml.canary.CanaryDecision` locally or on the cluster.

    Args:
        result: the analysis result.
        model_ref: the canary model, ``name@version``.
        splitter: the local splitter URL.
        kserve: ``namespace/name`` of the InferenceService.

    Returns:
        The audit event, or ``None`` for ``wait``.
    """
    from shopml.assets import asset_store_from_settings
    from shopml.audit import audit_log_from_settings
    from shopml.canary import (
        KServeTraffic,
        LocalTraffic,
        Traffic,
        apply_decision,
    )
    from shopml.kserve_api import kubernetes_api
    from shopml.kserve_objects import ClusterTarget

    traffic: Traffic
    if splitter:
        traffic = LocalTraffic(splitter)
    else:
        namespace, _, name = (kserve or "").partition("/")
        traffic = KServeTraffic(
            kubernetes_api(), ClusterTarget(name=name, namespace=namespace)
        )
    settings = load_settings()
    return apply_decision(
        result,
        traffic,
        audit_log_from_settings(settings),
        model_ref=model_ref,
        assets=asset_store_from_settings(settings),
    )


@dataclass
class LocalCanary:
    """Stable and canary model servers and the splitter, all on 127.0.0.1.

    Attributes:
        stable: the stable server.
        canary: the canary server.
        url: the splitter's root URL (what applications call).
        impressions: the impression log the splitter writes.
        process: the splitter process.
    """

    stable: LocalDeployment
    canary: LocalDeployment
    url: str
    impressions: Path
    process: subprocess.Popen[bytes]

    def stop(self) -> None:
        """Stop the splitter and both servers."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        stop_local(self.canary)
        stop_local(self.stable)


def _last_error_line(log: Path) -> str:
    """The last line of ``log`` that reports an error, or its last line."""
    try:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line]
    except OSError as err:
        return f"(log {log} unreadable: {err})"
    errors = [line for line in lines if "ERROR" in line or "Error" in line]
    return (errors or lines or ["(empty log)"])[-1].strip()


def _wait_splitter(process: subprocess.Popen[bytes], url: str, log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise DeploymentError(
                f"the splitter exited with status {process.returncode}: "
                f"{_last_error_line(log)} (log: {log})"
            )
        try:
            httpx.get(f"{url}/splitter/traffic", timeout=1).raise_for_status()
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise DeploymentError(
        f"the splitter at {url} did not answer within 30 s; see {log}"
    )


def start_local_canary(
    stable_dir: Path,
    canary_dir: Path,
    canary_percent: int,
    *,
    port: int = 0,
    name: str = "recommender",
    use_feature_store: bool = True,
    impressions: Path | None = None,
) -> LocalCanary:
    """Start stable and canary servers and the splitter in front of them.

    Args:
        stable_dir: the stable model artifact folder.
        canary_dir: the canary model artifact folder.
        canary_percent: the canary's traffic share, 0..100.
        port: the splitter's port; 0 picks a free one.
        name: the model name in the URLs.
        use_feature_store: servers read user histories from the online store.
        impressions: the impression log; default
            ``$SHOPML_HOME/runs/impressions.jsonl``.

    Returns:
        The running stack; call ``stop()`` when done.

    Raises:
        ValueError: ``canary_percent`` is not 0..100.
        DeploymentError: a server or the splitter did not start.

    Whatever was started is stopped again when start-up fails or is interrupted
    (Ctrl-C, or SIGTERM where :func:`serve_canary` turns it into an interrupt).
    """
    if not 0 <= canary_percent <= 100:
        raise ValueError(f"canary_percent={canary_percent} must be from 0 to 100")
    settings = load_settings()
    impressions = impressions or settings.home / "runs" / "impressions.jsonl"
    stable = deploy_local(stable_dir, name=name, use_feature_store=use_feature_store)
    try:
        canary = deploy_local(
            canary_dir, name=name, use_feature_store=use_feature_store
        )
    except BaseException:
        stop_local(stable)
        raise
    port = port or free_port()
    url = f"http://{LOOPBACK}:{port}"
    log = settings.home / "logs" / f"splitter-{port}.log"
    command = [
        sys.executable, "-m", "serving.splitter", "--stable", stable.url,
        "--canary", canary.url, "--canary-percent", str(canary_percent),
        "--port", str(port), "--impressions", str(impressions),
    ]  # fmt: skip
    with log.open("ab") as log_file:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT
        )
    stack = LocalCanary(stable, canary, url, impressions, process)
    try:
        _wait_splitter(process, url, log)
    except BaseException:
        stack.stop()
        raise
    logger.info("local canary at %s canary_percent=%d", url, canary_percent)
    return stack


def _ignore_stop_signals() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _interrupt(signum: int, frame: Any) -> None:
    """Turn the first SIGTERM or Ctrl-C into an interrupt; ignore any that follow, so
    a second signal cannot cut the clean-up short."""
    _ignore_stop_signals()
    raise KeyboardInterrupt(f"signal {signum}")


def stop_child_processes(timeout_s: float = 10) -> list[int]:
    """SIGTERM every process this one started, wait, SIGKILL what is left.

    The safety net under :func:`serve_canary`: an interrupt can land between a
    ``Popen`` and the line that records its process (inside a ``logger`` call, or
    between a ``return`` and the caller's ``try``), and a process nobody recorded
    would outlive the command. The model servers run in their own sessions but stay
    this process's children, so none escapes.

    Returns:
        The pids that were still running.
    """
    import psutil

    children = psutil.Process().children(recursive=True)
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.terminate()
    _, alive = psutil.wait_procs(children, timeout=timeout_s)
    for child in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    psutil.wait_procs(alive, timeout=5)
    if children:
        logger.warning(
            "stopped %d process(es) the interrupt left behind: %s",
            len(children),
            ", ".join(str(child.pid) for child in children),
        )
    return [child.pid for child in children]


def serve_canary(
    stable_dir: Path,
    canary_dir: Path,
    canary_percent: int,
    port: int = 8080,
    name: str = "recommender",
) -> None:
    """``shopml serve --canary PERCENT``: run the local canary stack until stopped.

    Ctrl-C and SIGTERM both stop the splitter and both servers, during start-up too:
    the stack stops them in order, and :func:`stop_child_processes` then stops any
    the interrupt caught before it was recorded.

    Args:
        stable_dir: the stable model folder (the latest promoted model).
        canary_dir: the new model folder.
        canary_percent: the canary's traffic share, 0..100.
        port: the splitter's port (the URL applications call).
        name: the model name in the URLs.

    Raises:
        DeploymentError: a server or the splitter did not start (all are stopped).
    """
    previous = {
        number: signal.signal(number, _interrupt)
        for number in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        _run_canary(stable_dir, canary_dir, canary_percent, port, name)
    except KeyboardInterrupt:
        logger.info("local canary stopped")
    finally:
        try:  # the handler fires once at most, and this is the one place left
            _ignore_stop_signals()
        except KeyboardInterrupt:
            logger.info("local canary stopped")
        stop_child_processes()
        for number, handler in previous.items():
            signal.signal(number, handler)


def _run_canary(
    stable_dir: Path, canary_dir: Path, canary_percent: int, port: int, name: str
) -> None:
    """Start the stack, wait until the splitter exits or an interrupt, stop it."""
    stack = start_local_canary(
        stable_dir, canary_dir, canary_percent, port=port, name=name
    )
    try:
        typer.echo(
            f"canary {canary_percent}% of {name!r} on {stack.url} "
            f"(stable {stack.stable.url}, canary {stack.canary.url}); "
            f"impressions in {stack.impressions}; Ctrl-C stops"
        )
        while stack.process.poll() is None:
            time.sleep(1)
    finally:
        stack.stop()
