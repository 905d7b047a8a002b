"""``shopml assets``: the catalog of versioned assets, their lineage and retention.

shopml assets list                      # every asset: zone, latest version, rows, bytes
shopml assets show events[@VERSION]     # schema with classes, quality, owner, inputs
shopml assets lineage recommender       # the chain back to the raw source files
shopml assets diff events@A events@B    # what changed between two versions
shopml assets prune --keep 3            # delete old versions, never a live model's

``synth`` is the ``shopml data synth`` command (synthetic logs with injected faults).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from shopml.assets import AssetStore, AssetVersion, asset_store_from_settings
from shopml.config import load_settings

assets_app = typer.Typer(
    help="Versioned data and model assets: catalog, lineage, retention.",
    no_args_is_help=True,
)


def _open() -> AssetStore:
    return asset_store_from_settings(load_settings())


def _split_ref(ref: str) -> tuple[str, str | None]:
    name, _, version = ref.partition("@")
    return name, version or None


def _get(assets: AssetStore, ref: str) -> AssetVersion:
    name, version = _split_ref(ref)
    try:
        return assets.get(name, version)
    except KeyError as err:
        raise typer.BadParameter(str(err.args[0])) from err


@assets_app.command("list")
def list_assets() -> None:
    """List every asset with its zone, latest version and size."""
    by_name: dict[str, list[AssetVersion]] = {}
    for version in _open().list():
        by_name.setdefault(version.name, []).append(version)
    header = (
        f"{'name':<22} {'zone':<9} {'latest':<17} {'n':>3} {'rows':>11} {'bytes':>13}"
    )
    typer.echo(header)
    for name, versions in sorted(by_name.items()):
        latest = versions[-1]
        rows = "-" if latest.rows is None else f"{latest.rows:,}"
        typer.echo(
            f"{name:<22} {latest.zone:<9} {latest.version:<17} {len(versions):>3} "
            f"{rows:>11} {latest.bytes:>13,}"
        )


@assets_app.command("show")
def show(
    ref: Annotated[str, typer.Argument(help="NAME or NAME@VERSION.")],
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the manifest.")
    ] = False,
) -> None:
    """Show one version: schema and classes, rows, bytes, quality, owner, inputs."""
    asset = _get(_open(), ref)
    if as_json:
        typer.echo(json.dumps(asdict(asset), indent=2, sort_keys=True))
        return
    rows = "-" if asset.rows is None else f"{asset.rows:,}"
    for label, value in (
        ("asset", asset.ref),
        ("zone", asset.zone),
        ("created", asset.created_at),
        ("owner", asset.owner),
        ("producer", asset.producer),
        ("rows", rows),
        ("bytes", f"{asset.bytes:,}"),
        ("inputs", ", ".join(asset.inputs) or "-"),
    ):
        typer.echo(f"{label:<9} {value}")
    classes = sorted({c["class"] for c in asset.schema})
    typer.echo(f"classes   {', '.join(classes) or '-'}")
    typer.echo("schema")
    for column in asset.schema:
        typer.echo(f"  {column['name']:<24} {column['type']:<28} {column['class']}")
    if asset.quality:
        typer.echo("quality")
        typer.echo(_indent(json.dumps(asset.quality, indent=2, sort_keys=True)))


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


def lineage_lines(assets: AssetStore, asset: AssetVersion) -> list[str]:
    """The upstream chain of ``asset`` as an indented tree, one line per node.

    Inputs that are asset versions are followed; other inputs (source files with
    their sha256, public datasets) end a branch as ``source``. A version reached a
    second time (curated tables sharing their raw inputs) is listed once more with
    ``(see above)`` instead of repeating its whole subtree.
    """
    known = {v.ref: v for v in assets.list()}
    lines: list[str] = []
    expanded: set[str] = set()

    def visit(node: AssetVersion, depth: int) -> None:
        head = f"{'  ' * depth}{'<- ' if depth else ''}{node.ref} [{node.zone}]"
        if node.ref in expanded:
            lines.append(f"{head} (see above)")
            return
        expanded.add(node.ref)
        lines.append(f"{head} by {node.producer}")
        for ref in node.inputs:
            if ref in known:
                visit(known[ref], depth + 1)
            else:
                lines.append(f"{'  ' * (depth + 1)}<- {ref} [source]")

    visit(asset, 0)
    return lines


@assets_app.command("lineage")
def lineage(
    ref: Annotated[str, typer.Argument(help="NAME or NAME@VERSION.")],
) -> None:
    """Show where a version came from, back to the raw source files."""
    assets = _open()
    for line in lineage_lines(assets, _get(assets, ref)):
        typer.echo(line)


def diff_versions(old: AssetVersion, new: AssetVersion) -> list[str]:
    """Human-readable differences between two versions (schema, size, lineage)."""
    changes = []
    old_cols = {c["name"]: c for c in old.schema}
    new_cols = {c["name"]: c for c in new.schema}
    for name in sorted(set(old_cols) | set(new_cols)):
        before, after = old_cols.get(name), new_cols.get(name)
        if before is None and after is not None:
            changes.append(f"+ column {name} {after['type']} ({after['class']})")
        elif after is None and before is not None:
            changes.append(f"- column {name} {before['type']} ({before['class']})")
        elif before != after and before is not None and after is not None:
            changes.append(
                f"~ column {name}: {before['type']} ({before['class']}) -> "
                f"{after['type']} ({after['class']})"
            )
    if old.rows != new.rows:
        changes.append(f"~ rows {old.rows} -> {new.rows}")
    if old.bytes != new.bytes:
        changes.append(f"~ bytes {old.bytes:,} -> {new.bytes:,}")
    for ref in sorted(set(new.inputs) - set(old.inputs)):
        changes.append(f"+ input {ref}")
    for ref in sorted(set(old.inputs) - set(new.inputs)):
        changes.append(f"- input {ref}")
    for key in sorted(set(old.quality or {}) | set(new.quality or {})):
        before_q, after_q = (old.quality or {}).get(key), (new.quality or {}).get(key)
        if before_q != after_q and not isinstance(after_q, dict):
            changes.append(f"~ quality {key}: {before_q} -> {after_q}")
    return changes


@assets_app.command("diff")
def diff(
    first: Annotated[str, typer.Argument(help="NAME@VERSION (older).")],
    second: Annotated[str, typer.Argument(help="NAME@VERSION or NAME (newer).")],
) -> None:
    """Compare two versions: columns, rows, bytes, inputs and quality figures."""
    assets = _open()
    old, new = _get(assets, first), _get(assets, second)
    typer.echo(f"{old.ref} -> {new.ref}")
    changes = diff_versions(old, new)
    for line in changes or ["(no differences in schema, size, inputs or quality)"]:
        typer.echo(line)


@assets_app.command("prune")
def prune(
    keep: Annotated[
        int, typer.Option(min=1, help="Newest versions kept per asset.")
    ] = 3,
    dry_run: Annotated[bool, typer.Option(help="Only list what would go.")] = False,
) -> None:
    """Delete old versions; live models and what they came from are always kept."""
    from shopml.assets import prune_versions

    doomed = prune_versions(_open(), keep_last=keep, dry_run=dry_run)
    verb = "would delete" if dry_run else "deleted"
    typer.echo(f"{verb} {len(doomed)} version(s)")
    for version in doomed:
        typer.echo(f"  {version.ref} [{version.zone}]")


def _parse_faults(faults: list[str]) -> dict[str, float]:
    rates = {}
    for text in faults:
        kind, sep, rate = text.partition("=")
        try:
            rates[kind.strip()] = float(rate)
        except ValueError as err:
            raise typer.BadParameter(
                f"--fault {text!r} must be KIND=RATE, e.g. duplicate=0.01"
            ) from err
        if not sep:
            raise typer.BadParameter(f"--fault {text!r} must be KIND=RATE")
    return rates


def synth(
    events: Annotated[int, typer.Option(min=1, help="Number of events.")] = 100_000,
    out: Annotated[Path, typer.Option(help="Folder for the files.")] = Path("synth"),
    users: Annotated[int, typer.Option(min=0, help="Users (0: events/50).")] = 0,
    items: Annotated[int, typer.Option(help="Items (0: events/100).")] = 0,
    fault: Annotated[
        list[str] | None,
        typer.Option(help="KIND=RATE, repeatable, e.g. --fault duplicate=0.01."),
    ] = None,
    file_format: Annotated[
        str, typer.Option("--format", help="parquet or csv.")
    ] = "parquet",
    seed: Annotated[int, typer.Option(help="Random seed.")] = 7,
) -> None:
    """Write synthetic events, catalog and users (Zipf items, sessions, PII-like
    profiles), with faults injected at chosen rates."""
    from shopml.synth import SynthConfig, write_synthetic

    try:
        config = SynthConfig(
            n_events=events, n_users=users, n_items=items, seed=seed,
            faults=_parse_faults(fault or []), file_format=file_format,
        )  # fmt: skip
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err
    files = write_synthetic(out, config)
    for kind in ("events", "catalog", "users"):
        typer.echo(f"{kind:<8} {files.rows[kind]:>12,} rows  {getattr(files, kind)}")
