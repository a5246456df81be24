"""`pmxfs qdevice setup` and `pmxfs qdevice remove` in the running daemon (the control socket's
"qdevice-setup" and "qdevice-remove"), like `pvecm qdevice setup` / `remove`.

Setup, on a quorate member, one lifecycle change at a time (the lifecycle lock):
1. the new corosync.conf is worked out first (core/conf/edit.py `with_qdevice`: pvecm's rules),
   so a refusal -- an odd node count without --force, two_node, an existing device -- spends
   no enrollment token;
2. a new cluster id (8 random bytes, hex) and an ECDSA P-256 key; the cluster enrolls with
   qnetd at HOST[:PORT] (`qnetd_pki.enroll`, which pins the CA fingerprint of the token and
   checks the certificate it gets back; the port defaults to the token's);
3. `priv/qdevice/ca.pem`, `client.pem` and `client.key` go into the tree, so every member has
   them (priv/ is root's only);
4. corosync.conf with `quorum.device` at config_version + 1, computed again from the tree's
   current text. Every node's device client (runtime/qdevice_client.py) starts once it sees
   both -- no restart.
Remove writes corosync.conf without the device (config_version + 1), then deletes the files;
with no device configured it only cleans up files a failed setup left.

Every wait is bounded (the tree's writability by `WRITABLE_TIMEOUT_S`, the enrollment by
`qnetd_pki.ENROLL_TIMEOUT_S`); every refusal is a `QdeviceError` (or the tree's
`LifecycleError`) with one line for the admin.
"""

from __future__ import annotations

import logging
import secrets
from typing import Any

import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pmxfs.core import conf
from pmxfs.core.conf import edit
from pmxfs.core.errors import LocalError
from pmxfs.core.fsop import Rmdir, Unlink
from pmxfs.core.join_token import format_host_port, parse_host_port
from pmxfs.core.qdevice_settings import device_settings
from pmxfs.core.qdevice_wire import valid_tie_breaker
from pmxfs.core.qnetd_token import TokenError, decode_token
from pmxfs.runtime.cluster_tree import ClusterTree, LifecycleError
from pmxfs.runtime.qdevice_client import TREE_CA, TREE_CERT, TREE_FILES, TREE_KEY, TREE_QDEVICE_DIR
from pmxfs.runtime.qnetd_pki import EnrollError, enroll
from pmxfs.runtime.replica_node import ReplicaNode

log = logging.getLogger("pmxfs")


class QdeviceError(LocalError):
    """Why `qdevice setup` or `remove` was refused or failed: one line."""


class QdeviceSetup:
    """The control socket's qdevice commands (module header)."""

    def __init__(self, node: ReplicaNode, tree: ClusterTree, lock: trio.Lock) -> None:
        self.node = node
        self.tree = tree
        self.lock = lock  # the lifecycle lock: one change of the cluster at a time

    async def setup(self, address: str, token_text: str, *, algorithm: str | None,
                    tie_breaker: str, force: bool) -> dict[str, Any]:
        try:
            token = decode_token(token_text)
            host, port = parse_host_port(address, token.port)
        except TokenError as exc:
            raise QdeviceError(str(exc)) from None
        if not valid_tie_breaker(tie_breaker):
            raise QdeviceError(f"tie-breaker {tie_breaker!r} is not lowest, highest or a node id")
        async with self.lock:
            await self._writable_member()
            self._edited(host, port, algorithm, tie_breaker, force)  # refuses before enrolling
            cluster_name = self.node.config.cluster_name
            cluster_id = secrets.token_hex(8)
            key = ec.generate_private_key(ec.SECP256R1())
            try:
                cert_pem, ca_pem = await enroll(host, port, token, cluster_name, cluster_id, key)
            except EnrollError as exc:
                raise QdeviceError(str(exc)) from None
            key_pem = key.private_bytes(serialization.Encoding.PEM,
                                        serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
            try:
                await self.tree.wait_writable("to store the quorum device's certificates")
                for path, data in ((TREE_CA, ca_pem), (TREE_KEY, key_pem), (TREE_CERT, cert_pem)):
                    await self.tree.put(path, data)
                text = self._edited(host, port, algorithm, tie_breaker, force)
                await self.tree.write_config(text)
            except (LifecycleError, QdeviceError) as exc:
                raise QdeviceError(f"the cluster enrolled with qnetd at "
                                   f"{format_host_port(host, port)}, but: {exc}; run setup "
                                   "again with a new token") from None
        config = _config_of(text)
        settings = device_settings(config)
        assert settings is not None  # with_qdevice wrote a model net device
        log.info("quorum device set up: qnetd %s, algorithm %s, tie-breaker %s, cluster id %s",
                 settings.address, settings.algorithm, settings.tie_breaker, cluster_id)
        return {"host": settings.address, "algorithm": settings.algorithm,
                "tie_breaker": settings.tie_breaker, "votes": conf.device_votes(config),
                "cluster_id": cluster_id, "config_version": config.config_version}

    async def remove(self) -> dict[str, Any]:
        async with self.lock:
            await self._writable_member()
            current = _config_of(self.tree.config_text())
            settings = device_settings(current)
            version = None
            if current.quorum.device is not None:
                try:
                    text = edit.without_qdevice(self.tree.config_text())
                except edit.EditError as exc:
                    raise QdeviceError(str(exc)) from None
                await self.tree.write_config(text)
                version = _config_of(text).config_version
            present = [path for path in TREE_FILES if self.tree.file(path) is not None]
            if version is None and not present:
                raise QdeviceError("no quorum device is configured")
            for path in present:
                await self.tree.write(Unlink(path))
            if self.node.memdb.lookup(TREE_QDEVICE_DIR) is not None:
                await self.tree.write(Rmdir(TREE_QDEVICE_DIR))
        shown = None if settings is None else settings.address
        log.info("quorum device removed%s", "" if shown is None else f" (qnetd {shown})")
        return {"removed": shown, "config_version": version, "files": present}

    # ------------------------------------------------------------------ helpers

    async def _writable_member(self) -> None:
        if self.node.standalone:
            raise QdeviceError("this node is not in a cluster: `pmxfs create` or `pmxfs add` "
                               "first")
        if not self.node.quorate():
            raise QdeviceError("this node is not quorate: run it on a quorate member")
        await self.tree.wait_writable("to change corosync.conf")

    def _edited(self, host: str, port: int, algorithm: str | None, tie_breaker: str,
                force: bool) -> str:
        try:
            return edit.with_qdevice(self.tree.config_text(), host, port, algorithm,
                                     tie_breaker, force=force)
        except (edit.EditError, LifecycleError) as exc:
            raise QdeviceError(str(exc)) from None


def _config_of(text: str) -> conf.ClusterConfig:
    config = conf.check(text).config
    if config is None:
        raise QdeviceError("the cluster's corosync.conf is not valid")
    return config
