"""Encryption and access control of the shopml bucket on MinIO, set up and checked.

:func:`secure_bucket` configures, through the ``minio`` SDK:

* default server-side encryption (SSE-S3, or SSE-KMS with a key id);
* versioning, so an overwritten or deleted object stays recoverable;
* the bucket policy of :func:`bucket_policy`: nobody may delete audit events or change
  object versions under ``audit/``, and (with TLS) requests without TLS are refused;
* with admin credentials (:class:`minio.MinioAdmin`), one IAM policy per role
  (:data:`ROLES`), attached to users or groups by the platform team.

:func:`check_bucket` compares the live setup with the declared one and returns every
deviation; ``shopml security check`` prints them and fails when there is any.

Roles and what they may do (prefixes are asset zones):

=============== ==========================================================
ingest-writer   write ``raw/``; list the bucket
pipeline        read/write ``raw/ curated/ features/ models/``; append ``audit/``
serving         read ``models/`` and ``features/`` only
auditor         read ``audit/`` and every manifest; no data files
=============== ==========================================================
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from minio import Minio, MinioAdmin
from minio.error import MinioAdminException, S3Error
from minio.sseconfig import Rule, SSEConfig
from minio.versioningconfig import ENABLED, VersioningConfig

logger = logging.getLogger(__name__)

_READ = ["s3:GetObject"]
_WRITE = ["s3:PutObject"]
_LIST = ["s3:ListBucket", "s3:GetBucketLocation"]
ROLES: tuple[str, ...] = ("ingest-writer", "pipeline", "serving", "auditor")
POLICY_PREFIX = "shopml-"


@dataclass(frozen=True)
class Deviation:
    """One way the live setup differs from the declared one.

    Attributes:
        subject: what was checked (``encryption``, ``versioning``, ``bucket-policy``,
            ``role-policy:<role>``).
        expected: what is declared.
        actual: what the server reports.
    """

    subject: str
    expected: str
    actual: str

    def __str__(self) -> str:
        return f"{self.subject}: expected {self.expected}, found {self.actual}"


def _objects(bucket: str, *prefixes: str) -> list[str]:
    return [f"arn:aws:s3:::{bucket}/{prefix}*" for prefix in prefixes]


def _statement(sid: str, actions: list[str], resources: list[str]) -> dict[str, Any]:
    return {"Sid": sid, "Effect": "Allow", "Action": actions, "Resource": resources}


def role_policy(role: str, bucket: str) -> dict[str, Any]:
    """The IAM policy document of one role (least privilege, by prefix).

    Args:
        role: one of :data:`ROLES`.
        bucket: the shopml bucket.

    Returns:
        The policy document.

    Raises:
        ValueError: the role is unknown.
    """
    bucket_arn = [f"arn:aws:s3:::{bucket}"]
    zones = ("raw/", "curated/", "features/", "models/")
    statements = {
        "ingest-writer": [
            _statement("List", _LIST, bucket_arn),
            _statement("WriteRaw", _WRITE, _objects(bucket, "raw/")),
        ],
        "pipeline": [
            _statement("List", _LIST, bucket_arn),
            _statement("ReadWriteZones", _READ + _WRITE, _objects(bucket, *zones)),
            _statement(
                "DeleteWorkZones", ["s3:DeleteObject"], _objects(bucket, *zones)
            ),
            _statement("AppendAudit", _READ + _WRITE, _objects(bucket, "audit/")),
        ],
        "serving": [
            _statement("List", _LIST, bucket_arn),
            _statement("ReadModels", _READ, _objects(bucket, "models/", "features/")),
        ],
        "auditor": [
            _statement("List", [*_LIST, "s3:ListBucketVersions"], bucket_arn),
            _statement(
                "ReadAuditAndManifests",
                [*_READ, "s3:GetObjectVersion"],
                _objects(bucket, "audit/", "*/_manifest.json"),
            ),
        ],
    }
    if role not in statements:
        raise ValueError(f"role {role!r} is unknown; use one of {list(ROLES)}")
    return {"Version": "2012-10-17", "Statement": statements[role]}


def bucket_policy(bucket: str, *, require_tls: bool = False) -> dict[str, Any]:
    """The bucket (resource) policy: audit events are append-only.

    Args:
        bucket: the shopml bucket.
        require_tls: also deny every request made without TLS.

    Returns:
        The policy document.
    """
    statements: list[dict[str, Any]] = [
        {
            "Sid": "AuditIsAppendOnly",
            "Effect": "Deny",
            "Principal": {"AWS": ["*"]},
            "Action": ["s3:DeleteObject", "s3:DeleteObjectVersion"],
            "Resource": _objects(bucket, "audit/"),
        }
    ]
    if require_tls:
        statements.append(
            {
                "Sid": "TlsOnly",
                "Effect": "Deny",
                "Principal": {"AWS": ["*"]},
                "Action": ["s3:*"],
                "Resource": [f"arn:aws:s3:::{bucket}", *_objects(bucket, "")],
                "Condition": {"Bool": {"aws:SecureTransport": "false"}},
            }
        )
    return {"Version": "2012-10-17", "Statement": statements}


def _sse_config(kms_key_id: str | None) -> SSEConfig:
    if kms_key_id:
        return SSEConfig(Rule.new_sse_kms_rule(kms_key_id))
    return SSEConfig(Rule.new_sse_s3_rule())


def secure_bucket(
    client: Minio,
    bucket: str,
    *,
    kms_key_id: str | None = None,
    require_tls: bool = False,
    admin: MinioAdmin | None = None,
) -> None:
    """Create the bucket if needed and apply encryption, versioning and policies.

    Args:
        client: a client with rights to configure the bucket.
        bucket: the shopml bucket.
        kms_key_id: KMS key for SSE-KMS; None uses SSE-S3.
        require_tls: deny requests made without TLS.
        admin: a MinIO admin client; when given, the role policies are created
            (``shopml-<role>``). Attach them to users or groups with ``mc``.
    """
    if not client.bucket_exists(bucket):
        client.make_bucket(bucket)
    client.set_bucket_encryption(bucket, _sse_config(kms_key_id))
    client.set_bucket_versioning(bucket, VersioningConfig(ENABLED))
    policy = bucket_policy(bucket, require_tls=require_tls)
    client.set_bucket_policy(bucket, json.dumps(policy))
    if admin is not None:
        for role in ROLES:
            admin.policy_add(POLICY_PREFIX + role, policy=role_policy(role, bucket))
    logger.info(
        "secured bucket=%s sse=%s versioning=on role_policies=%s",
        bucket,
        "kms" if kms_key_id else "s3",
        "set" if admin is not None else "skipped (no admin client)",
    )


def check_bucket(
    client: Minio,
    bucket: str,
    *,
    kms_key_id: str | None = None,
    require_tls: bool = False,
    admin: MinioAdmin | None = None,
) -> list[Deviation]:
    """Compare the live bucket with the declared setup.

    Args:
        client: a client allowed to read the bucket configuration.
        bucket: the shopml bucket.
        kms_key_id: the KMS key expected; None expects SSE-S3.
        require_tls: whether the TLS-only statement is expected.
        admin: a MinIO admin client to read role policies; None skips them with a
            warning (reading them needs admin credentials).

    Returns:
        Every deviation; empty when the setup is as declared.
    """
    if not client.bucket_exists(bucket):
        return [Deviation("bucket", f"{bucket!r} exists", "no such bucket")]
    deviations = _check_encryption(client, bucket, kms_key_id)
    status = client.get_bucket_versioning(bucket).status
    if status != ENABLED:
        deviations.append(
            Deviation("versioning", ENABLED, str(status or "never enabled"))
        )
    declared = bucket_policy(bucket, require_tls=require_tls)
    live = _live_bucket_policy(client, bucket)
    if live is None or _canonical(live) != _canonical(declared):
        deviations.append(
            Deviation("bucket-policy", json.dumps(declared), json.dumps(live))
        )
    deviations += _check_roles(admin, bucket)
    return deviations


def _check_encryption(
    client: Minio, bucket: str, kms_key_id: str | None
) -> list[Deviation]:
    config = client.get_bucket_encryption(bucket)
    expected = "aws:kms" if kms_key_id else "AES256"
    if config is None or config.rule is None:
        return [Deviation("encryption", expected, "no default encryption")]
    actual = str(config.rule.sse_algorithm)
    if actual != expected or (
        kms_key_id and config.rule.kms_master_key_id != kms_key_id
    ):
        found = f"{actual} key={config.rule.kms_master_key_id}"
        return [Deviation("encryption", f"{expected} key={kms_key_id}", found)]
    return []


def _live_bucket_policy(client: Minio, bucket: str) -> dict[str, Any] | None:
    try:
        return dict(json.loads(client.get_bucket_policy(bucket)))
    except S3Error as err:
        if err.code == "NoSuchBucketPolicy":
            return None
        raise


def _check_roles(admin: MinioAdmin | None, bucket: str) -> list[Deviation]:
    if admin is None:
        logger.warning(
            "role policies of bucket=%s not checked: no MinIO admin client", bucket
        )
        return []
    deviations = []
    for role in ROLES:
        declared = role_policy(role, bucket)
        try:
            info = json.loads(admin.policy_info(POLICY_PREFIX + role))
        except (MinioAdminException, ValueError) as err:
            deviations.append(Deviation(f"role-policy:{role}", "present", str(err)))
            continue
        live = info.get("Policy", info)
        if _canonical(live) != _canonical(declared):
            deviations.append(
                Deviation(f"role-policy:{role}", json.dumps(declared), json.dumps(live))
            )
    return deviations


def _canonical(policy: dict[str, Any]) -> str:
    """Policy JSON with one-item lists as scalars and statements sorted.

    Servers return ``"Action": "s3:GetObject"`` for ``["s3:GetObject"]`` and may
    reorder statements; neither is a deviation.
    """

    def normalize(value: Any) -> Any:
        if isinstance(value, list):
            items = sorted((normalize(v) for v in value), key=json.dumps)
            return items[0] if len(items) == 1 else items
        if isinstance(value, dict):
            return {k: normalize(v) for k, v in value.items()}
        return value

    return json.dumps(normalize(policy), sort_keys=True)
