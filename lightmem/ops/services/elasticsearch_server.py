"""Elasticsearch as a local single-node cluster, security off, from Maven Central's
integration-test zip (run as an unprivileged user under root)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

from .config import (
    PrerequisiteError,
    Progress,
    ServiceName,
    es_url,
)
from .process import (
    _cmdline_has,
    _find_java_home,
    _maven_fetch,
    _pom,
)
from .server import LocalServer


class ElasticsearchServer(LocalServer):
    """Elasticsearch single node from the integ-test-zip, security off, run as a plain user."""

    name: ServiceName = "elasticsearch"
    title = "Elasticsearch node"

    @property
    def version(self) -> str:
        return self.config.es_version

    @property
    def port(self) -> int:
        return self.config.es_port

    @property
    def external(self) -> str | None:
        return self.config.external_es_url

    @property
    def address(self) -> str:
        return es_url(self.config).rstrip("/")

    @property
    def log_paths(self) -> list[Path]:
        return [self.log_path, self.run_dir / "logs" / "lightmem-local.log"]

    def fetch(self, progress: Progress) -> None:
        if (self.dist_dir / "bin" / "elasticsearch").exists():
            return
        download = self.config.root / "dist" / f".download-elasticsearch-{self.version}"
        _maven_fetch(
            self.config.mvn,
            _pom(
                f"elasticsearch-{self.version}",
                [
                    (
                        "org.elasticsearch.distribution.integ-test-zip",
                        "elasticsearch",
                        self.version,
                        "zip",
                    )
                ],
            ),
            download,
            progress,
            f"elasticsearch {self.version}",
        )
        try:
            archive = download / "lib" / f"elasticsearch-{self.version}.zip"
            progress(f"elasticsearch: unpacking {archive.name}")
            self._unzip(archive)
        finally:
            shutil.rmtree(download, ignore_errors=True)

    def _unzip(self, archive: Path) -> None:
        work = Path(tempfile.mkdtemp(prefix=".unzip-", dir=self.dist_dir.parent))
        try:
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    target = zf.extract(info, work)
                    mode = (info.external_attr >> 16) & 0o777
                    if info.is_dir():
                        os.chmod(target, 0o755)
                    else:
                        # zipfile drops the modes: restore them, readable by the server's user.
                        os.chmod(target, (mode | 0o444) if mode else 0o644)
            (top,) = list(work.iterdir())
            top.rename(self.dist_dir)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    #: Main class of the server JVM; ``bin/elasticsearch`` first starts a small launcher JVM
    #: (the process group's leader) that starts this one.
    SERVER_MAIN = "org.elasticsearch.bootstrap.Elasticsearch"

    def server_pid(self, leader: int) -> int:
        """The server JVM's pid; the launcher's while the server has not started yet."""
        for pid in self._group(leader):
            if pid != leader and _cmdline_has(pid, self.SERVER_MAIN):  # not the launcher
                return pid
        return leader

    def _run_user(self) -> tuple[int, int] | None:
        """(uid, gid) to run as when we are root, creating the system user if needed."""
        if os.geteuid() != 0:
            return None
        import grp
        import pwd

        user = self.config.es_user
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            useradd = shutil.which("useradd")
            if useradd is None:
                raise PrerequisiteError(
                    "elasticsearch: refuses to run as root and useradd is missing; "
                    f"create the user {user!r} or run as a non-root user"
                ) from None
            proc = subprocess.run(
                [
                    useradd,
                    "--system",
                    "--user-group",
                    "--no-create-home",
                    "--home-dir",
                    "/nonexistent",
                    "--shell",
                    "/usr/sbin/nologin",
                    user,
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode != 0:
                raise PrerequisiteError(
                    f"elasticsearch: useradd {user!r} failed: {proc.stderr.strip()}"
                ) from None
            entry = pwd.getpwnam(user)
        try:
            gid = grp.getgrgid(entry.pw_gid).gr_gid
        except KeyError:
            gid = entry.pw_gid
        return entry.pw_uid, gid

    def _config_yml(self) -> str:
        c = self.config
        return f"""# Generated by lightmem.ops.services: one node, security off, loopback only.
cluster.name: lightmem-local
node.name: lightmem-es
path.data: {self.run_dir / "data"}
path.logs: {self.run_dir / "logs"}
network.host: 127.0.0.1
http.port: {c.es_port}
transport.port: {c.es_transport_port}
discovery.type: single-node
xpack.security.enabled: false
# A developer's disk may be nearly full: never turn indices read-only for that.
cluster.routing.allocation.disk.threshold_enabled: false
action.destructive_requires_name: false
"""

    def _prepare(self, progress: Progress) -> None:
        ids = self._run_user()
        conf = self.run_dir / "config"
        for sub in ("config", "data", "logs", "tmp"):
            (self.run_dir / sub).mkdir(parents=True, exist_ok=True)
        for src in (self.dist_dir / "config").iterdir():
            dst = conf / src.name
            if src.name == "elasticsearch.yml" or dst.exists():
                continue
            if src.is_dir():
                shutil.copytree(src, dst)
            else:
                shutil.copy2(src, dst)
        (conf / "elasticsearch.yml").write_text(self._config_yml())
        if ids is not None:
            uid, gid = ids
            os.chown(self.run_dir, uid, gid)
            for sub in ("config", "data", "logs", "tmp"):
                top = self.run_dir / sub
                os.chown(top, uid, gid)
                if sub in ("config", "tmp"):
                    for dirpath, dirnames, filenames in os.walk(top):
                        for name in dirnames + filenames:
                            os.chown(os.path.join(dirpath, name), uid, gid)
            self._check_access(uid, gid)

    def _check_access(self, uid: int, gid: int) -> None:
        # Every parent folder must be traversable by the unprivileged user.
        probe = subprocess.run(
            [
                "/bin/sh",
                "-c",
                'test -r "$1" && test -w "$2" && test -w "$3"',
                "sh",
                str(self.dist_dir / "lib" / f"elasticsearch-{self.version}.jar"),
                str(self.run_dir / "data"),
                str(self.run_dir / "config"),
            ],
            user=uid,
            group=gid,
            extra_groups=[],
            check=False,
        )
        if probe.returncode != 0:
            raise PrerequisiteError(
                f"elasticsearch: user {self.config.es_user!r} cannot read {self.dist_dir} or "
                f"write {self.run_dir}; make the folders above {self.config.root} "
                "traversable (chmod o+x) or set LIGHTMEM_SERVICES_DIR"
            )

    def _command(self) -> tuple[list[str], dict[str, str], dict[str, Any]]:
        home = _find_java_home(self.config.es_java_home, 17, "elasticsearch")
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": os.environ.get("LANG", "C.UTF-8"),
            "HOME": str(self.run_dir),
            "ES_JAVA_HOME": str(home),
            "ES_JAVA_OPTS": self.config.es_java_opts,
            "ES_PATH_CONF": str(self.run_dir / "config"),
            "ES_TMPDIR": str(self.run_dir / "tmp"),
        }
        extra: dict[str, Any] = {"cwd": str(self.run_dir)}
        ids = self._run_user()
        if ids is not None:
            extra.update(user=ids[0], group=ids[1], extra_groups=[])
        return [str(self.dist_dir / "bin" / "elasticsearch")], env, extra

    def _get(self, path: str, timeout_s: float) -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(self.address + path, timeout=timeout_s) as resp:
                body = json.loads(resp.read())
        except (OSError, ValueError, urllib.error.URLError):
            return None
        return body if isinstance(body, dict) else None

    def probe(self, timeout_s: float = 2.0) -> bool:
        wait = max(1, int(timeout_s))
        health = self._get(
            f"/_cluster/health?wait_for_status=yellow&timeout={wait}s", timeout_s + 1.0
        )
        return bool(health) and health.get("status") in ("yellow", "green")

    def probe_version(self) -> str | None:
        # The integ-test-zip has no handler for ``GET /``: ask the node itself.
        body = self._get("/_nodes/_local?filter_path=nodes.*.version", 5.0)
        nodes = (body or {}).get("nodes") or {}
        for node in nodes.values():
            return str(node.get("version"))
        return None
