"""Security commands of the ``shopml`` command line: audit, erasure, bucket checks.

shopml audit [--asset A] [--since T]   # audit events as JSON lines
shopml audit verify [--expect-head H]  # check the hash chain; exit 1 when broken
shopml forget --user ID                # erase one person everywhere
shopml security setup [--admin]        # SSE, versioning, bucket and role policies
shopml security check [--admin]        # every deviation from the declared setup

``shopml/cli.py`` mounts them: ``app.add_typer(audit_app, name="audit")``,
``app.add_typer(security_app, name="security")`` and
``app.command("forget")(forget)``.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated

import typer

from shopml.config import Settings, load_settings

if TYPE_CHECKING:
    from minio import Minio, MinioAdmin

logger = logging.getLogger(__name__)

audit_app = typer.Typer(
    help="Query and verify the audit log.", invoke_without_command=True
)
security_app = typer.Typer(
    help="Encryption and access control of the object store.", no_args_is_help=True
)


def _parse_since(text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as err:
        raise typer.BadParameter(
            f"--since {text!r} is not ISO-8601; use e.g. 2026-05-01 or "
            "2026-05-01T10:00:00+00:00"
        ) from err
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@audit_app.callback()
def audit(
    ctx: typer.Context,
    asset: Annotated[
        str | None, typer.Option(help="Asset name or name@version.")
    ] = None,
    since: Annotated[
        str | None, typer.Option(help="Earliest event time, ISO-8601 (UTC if naive).")
    ] = None,
) -> None:
    """Print audit events as JSON lines, oldest first."""
    if ctx.invoked_subcommand is not None:
        return
    from shopml.audit import audit_log_from_settings

    log = audit_log_from_settings(load_settings())
    for event in log.query(asset=asset, since=_parse_since(since)):
        typer.echo(event.to_json())


@audit_app.command("verify")
def audit_verify(
    expect_head: Annotated[
        str | None,
        typer.Option(
            help="A head hash recorded earlier; catches deleted newest events."
        ),
    ] = None,
) -> None:
    """Check every hash and link of the audit log; exit 1 when it is broken."""
    from shopml.audit import audit_log_from_settings

    report = audit_log_from_settings(load_settings()).verify(expect_head)
    for problem in report.problems:
        typer.echo(f"BROKEN {problem}")
    state = "intact" if report.is_intact else f"{len(report.problems)} problem(s)"
    typer.echo(f"audit log: {report.events} events, head {report.head}, {state}")
    if not report.is_intact:
        raise typer.Exit(code=1)


def forget(
    user: Annotated[
        str, typer.Option("--user", help="The person's raw id, in any notation.")
    ],
) -> None:
    """Erase one person from curated assets and both feature stores."""
    from shopml.assets import AssetStore
    from shopml.audit import audit_log_from_settings
    from shopml.erasure import forget_user
    from shopml.security import load_pseudonymizer
    from shopml.storage import open_store

    settings = load_settings()
    audit_log = audit_log_from_settings(settings)
    result = forget_user(
        user,
        assets=AssetStore(open_store(settings), audit=audit_log),
        pseudonymizer=load_pseudonymizer(settings),
        settings=settings,
        audit=audit_log,
    )
    # The raw id is never echoed: the subject reference names the erasure.
    typer.echo(f"erased subject {result.subject_ref}")
    for name, ref in sorted(result.new_versions.items()):
        typer.echo(f"  {name}: {result.rows_removed[name]} row(s) removed -> {ref}")
    typer.echo(f"  purged versions: {', '.join(result.purged_versions) or 'none'}")
    typer.echo(f"  offline feature rows removed: {result.offline_rows_removed}")
    typer.echo(f"  online entries removed: {result.online_entities_removed}")
    typer.echo(f"  models to retrain: {', '.join(result.models_to_retrain) or 'none'}")


def _clients(settings: Settings, admin: bool) -> tuple[Minio, MinioAdmin | None, str]:
    if settings.s3 is None:
        raise typer.BadParameter(
            "the object store is a local folder (SHOPML_S3_ENDPOINT unset): it has no "
            "server-side encryption or policies; point shopml at MinIO first"
        )
    from minio import Minio, MinioAdmin
    from minio.credentials import StaticProvider

    s3 = settings.s3
    client = Minio(
        s3.endpoint,
        access_key=s3.access_key,
        secret_key=s3.secret_key,
        secure=s3.secure,
        region=s3.region,
    )
    admin_client = None
    if admin:
        admin_client = MinioAdmin(
            endpoint=s3.endpoint,
            credentials=StaticProvider(s3.access_key, s3.secret_key),
            secure=s3.secure,
        )
    return client, admin_client, s3.bucket


@security_app.command("setup")
def security_setup(
    admin: Annotated[
        bool, typer.Option(help="Also create the role policies (admin credentials).")
    ] = False,
    kms_key_id: Annotated[
        str | None, typer.Option(help="KMS key for SSE-KMS; default SSE-S3.")
    ] = None,
) -> None:
    """Apply encryption, versioning, the bucket policy and (with --admin) roles."""
    from shopml.access import secure_bucket

    settings = load_settings()
    client, admin_client, bucket = _clients(settings, admin)
    secure_bucket(
        client,
        bucket,
        kms_key_id=kms_key_id,
        require_tls=settings.s3 is not None and settings.s3.secure,
        admin=admin_client,
    )
    typer.echo(f"bucket {bucket}: encryption, versioning and policies applied")


@security_app.command("check")
def security_check(
    admin: Annotated[
        bool, typer.Option(help="Also check the role policies (admin credentials).")
    ] = False,
    kms_key_id: Annotated[
        str | None, typer.Option(help="The KMS key expected; default SSE-S3.")
    ] = None,
) -> None:
    """Compare the live bucket with the declared setup; exit 1 on any deviation."""
    from shopml.access import check_bucket

    settings = load_settings()
    client, admin_client, bucket = _clients(settings, admin)
    deviations = check_bucket(
        client,
        bucket,
        kms_key_id=kms_key_id,
        require_tls=settings.s3 is not None and settings.s3.secure,
        admin=admin_client,
    )
    for deviation in deviations:
        typer.echo(f"DEVIATION {deviation}")
    if not admin:
        typer.echo("role policies not checked (pass --admin with admin credentials)")
    typer.echo(f"bucket {bucket}: {len(deviations)} deviation(s)")
    if deviations:
        raise typer.Exit(code=1)
