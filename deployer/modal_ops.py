"""The Modal edge: deploy rendered apps, see what is live, stop an app.

    ModalClient     the protocol: live apps with their tags, secret names, prefetch, deploy, stop
    ModalCli        the real one: the ``modal`` CLI (argument lists) and, for tags, modal's Python API
    deploy_all      manifests → plan → render → (unchanged? skip) → prefetch → deploy, one result each
    app_status      manifests joined with the live apps: deployed / not deployed / drifted / orphan
    find_app        the live app a ``destroy NAME`` means

Credentials are checked before any call to Modal (:func:`check_credentials`). Every failure of
the ``modal`` CLI or library becomes a :class:`~deployer.errors.ModalError` here, with the CLI's
own last words as the reason. Results only say "deployed" after ``modal deploy`` returned 0.
"""

from __future__ import annotations

import difflib
import json
import re
import subprocess
import sys
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, Protocol

from deployer.errors import GgufDeployError, ModalAuthError, ModalError, Problem
from deployer.loading import LoadedManifest
from deployer.plan import Plan
from deployer.render import MANAGED_BY, Provenance, app_data, render, write_app
from deployer.runtime.config import API_KEY_ENV

DEPLOYED = "deployed"  # `modal app list` state of a deployed app
CREDENTIALS_HINT = "set MODAL_TOKEN_ID and MODAL_TOKEN_SECRET, or run `modal token new`"


@dataclass(frozen=True)
class LiveApp:
    """A deployed Modal app."""

    name: str
    app_id: str
    state: str
    tags: Mapping[str, str] = field(default_factory=dict)


class ModalClient(Protocol):
    """What deploying needs from Modal. Implementations raise only :class:`ModalError`."""

    def list_apps(self, env: str | None, prefix: str) -> list[LiveApp]:
        """Deployed apps; those whose name starts with ``prefix`` carry their tags."""
        ...

    def list_secrets(self, env: str | None) -> set[str]:
        """Names of the secrets in the environment."""
        ...

    def prefetch(self, app_file: Path, env: str | None) -> None:
        """Run the app's ``download_weights``: the model into the shared Volume."""
        ...

    def deploy(self, app_file: Path, env: str | None, tag: str) -> None:
        """``modal deploy`` the app file; ``tag`` labels the deployment (the config hash)."""
        ...

    def stop(self, app_name: str, env: str | None) -> None:
        """Stop a deployed app."""
        ...


# ## The real client


def check_credentials() -> None:
    """Raise :class:`ModalAuthError` unless modal has a token (environment or ``~/.modal.toml``)."""
    try:
        from modal.config import config
    except Exception as exc:  # modal reads ~/.modal.toml when imported; a broken one is the user's to fix
        raise ModalAuthError(f"cannot read the Modal configuration ({exc}); {CREDENTIALS_HINT}") from exc
    if not (config.get("token_id") and config.get("token_secret")):
        raise ModalAuthError(f"no Modal credentials: {CREDENTIALS_HINT}")


class ModalCli:
    """:class:`ModalClient` on the ``modal`` CLI, run as ``python -m modal`` with argument lists.

    ``echo`` receives the CLI's output line by line while a prefetch or deploy runs (they take
    minutes); ``tags_of`` reads one app's tags (modal's Python API: no CLI command shows them).
    """

    def __init__(
        self,
        command: Sequence[str] = (sys.executable, "-m", "modal"),
        *,
        echo: Callable[[str], None] | None = None,
        tags_of: Callable[[str], dict[str, str]] | None = None,
    ) -> None:
        self.command = list(command)
        self.echo = echo or (lambda line: print(line, file=sys.stderr))
        self.tags_of = tags_of or _tags_via_api

    @classmethod
    def from_env(cls, *, echo: Callable[[str], None] | None = None) -> ModalCli:
        """The production client, after checking that credentials exist (before any call)."""
        check_credentials()
        return cls(echo=echo)

    def list_apps(self, env: str | None, prefix: str) -> list[LiveApp]:
        rows = self._json(["app", "list", "--json", *_env(env)], "modal app list")
        apps = []
        for row in rows:
            name, app_id, state = str(row.get("description", "")), str(row.get("app_id", "")), str(row.get("state"))
            if state != DEPLOYED:
                continue  # ephemeral runs (a prefetch among them) and stopped apps are not live
            tags = self.tags_of(app_id) if name.startswith(f"{prefix}-") else {}
            apps.append(LiveApp(name, app_id, state, tags))
        return apps

    def list_secrets(self, env: str | None) -> set[str]:
        rows = self._json(["secret", "list", "--json", *_env(env)], "modal secret list")
        return {str(row.get("name")) for row in rows}

    def prefetch(self, app_file: Path, env: str | None) -> None:
        self._stream(["run", *_env(env), f"{app_file}::download_weights"], "downloading the weights")

    def deploy(self, app_file: Path, env: str | None, tag: str) -> None:
        self._stream(["deploy", *_env(env), "--tag", tag, str(app_file)], "modal deploy")

    def stop(self, app_name: str, env: str | None) -> None:
        self._stream(["app", "stop", "--yes", *_env(env), app_name], "modal app stop")

    def _json(self, args: list[str], what: str) -> list[dict]:
        try:
            proc = subprocess.run([*self.command, *args], capture_output=True, text=True, errors="replace", check=False)
        except OSError as exc:
            raise ModalError(f"{what}: cannot run {self.command[0]}: {exc.strerror or exc}") from exc
        if proc.returncode != 0:
            raise ModalError(f"{what} failed: {last_words(proc.stderr.splitlines() + proc.stdout.splitlines())}")
        try:
            rows = json.loads(proc.stdout)
        except json.JSONDecodeError as exc:
            raise ModalError(f"{what}: the output is not JSON ({exc.msg})") from exc
        if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
            raise ModalError(f"{what}: expected a JSON list of objects")
        return rows

    def _stream(self, args: list[str], what: str) -> None:
        tail: deque[str] = deque(maxlen=40)
        try:
            proc = subprocess.Popen(
                [*self.command, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
            )
        except OSError as exc:
            raise ModalError(f"{what}: cannot run {self.command[0]}: {exc.strerror or exc}") from exc
        assert proc.stdout is not None
        with proc:
            for line in proc.stdout:
                self.echo(line.rstrip("\n"))
                tail.append(line.rstrip("\n"))
        if proc.returncode != 0:
            raise ModalError(f"{what} failed: {last_words(tail)}")


def _env(env: str | None) -> list[str]:
    return ["--env", env] if env else []


def _tags_via_api(app_id: str) -> dict[str, str]:
    import modal
    import modal.exception

    try:
        return dict(modal.App.lookup(app_id).get_tags())
    except (modal.exception.Error, OSError) as exc:  # OSError: the connection itself failed
        raise ModalError(f"cannot read the tags of app {app_id}: {exc}") from exc


_DECORATION = re.compile(r"[│┃╭╮╰╯─━┏┓┗┛╷╵]+")


def last_words(lines: Iterable[str]) -> str:
    """The last meaningful line of the CLI's output: its error, without rich's box drawing."""
    cleaned = [_DECORATION.sub(" ", line).strip() for line in lines]
    meaningful = [line for line in cleaned if line and not line.startswith(("Traceback", "File "))]
    if not meaningful:
        return "no output (see above)"
    last = meaningful[-1]
    return last if len(last) <= 300 else last[:297] + "..."


# ## Deploy


Outcome = Literal["deployed", "unchanged", "failed", "rendered"]


@dataclass(frozen=True)
class DeployResult:
    """What happened to one manifest. ``deployed`` only after ``modal deploy`` succeeded."""

    path: str
    app_name: str
    outcome: Outcome
    detail: str = ""
    gpu: str = ""
    config_hash: str = ""
    app_file: str = ""


PlanOne = Callable[[LoadedManifest], Plan]


def deploy_all(
    manifests: Sequence[LoadedManifest],
    *,
    plan_one: PlanOne,
    client: ModalClient | None,
    out_dir: str | Path,
    env: str | None = None,
    dry_run: bool = False,
    force: bool = False,
    problems: Sequence[Problem] = (),
    source_commit: str | None = None,
    on_plan: Callable[[Plan, Path], None] | None = None,
) -> list[DeployResult]:
    """Plan, render and (unless ``dry_run``) deploy every manifest; one failure stops no other.

    ``client`` is not touched when ``dry_run`` (it may be None). ``problems`` are manifests that
    failed to load: each becomes a failed result. ``on_plan`` sees each plan and its rendered file.
    """
    results = [DeployResult(p.path, "", "failed", str(p)) for p in problems]
    live: dict[str, LiveApp] = {}
    secrets: set[str] = set()
    if not dry_run:
        if client is None:
            raise ModalError("deploying needs a Modal client")
        prefixes = {item.app_prefix for item in manifests}
        for prefix in prefixes:
            live.update((app.name, app) for app in client.list_apps(env, prefix))
        secrets = client.list_secrets(env) if manifests else set()
    for item in manifests:
        try:
            results.append(
                _deploy_one(item, plan_one, client, out_dir, env, dry_run, force, live, secrets, source_commit, on_plan)
            )
        except GgufDeployError as exc:
            results.append(DeployResult(item.path, item.app_name, "failed", _one_line(exc)))
    return results


def _deploy_one(
    item: LoadedManifest,
    plan_one: PlanOne,
    client: ModalClient | None,
    out_dir: str | Path,
    env: str | None,
    dry_run: bool,
    force: bool,
    live: Mapping[str, LiveApp],
    secrets: set[str],
    source_commit: str | None,
    on_plan: Callable[[Plan, Path], None] | None,
) -> DeployResult:
    plan = plan_one(item)
    rendered = render(plan, Provenance(item.path, source_commit))
    path = write_app(rendered, out_dir)
    if on_plan is not None:
        on_plan(plan, path)
    done = DeployResult(item.path, item.app_name, "rendered", "", plan.gpu.modal, rendered.config_hash, str(path))
    if dry_run:
        return done
    assert client is not None
    current = live.get(item.app_name)
    if current is not None and current.tags.get("config") == rendered.config_hash and not force:
        return replace(done, outcome="unchanged", detail="the live app has this config hash")
    for name, key in _needed_secrets(item):
        if name not in secrets:
            where = f" in environment '{env}'" if env else ""
            raise ModalError(
                f"Modal secret '{name}' not found{where}; create it: modal secret create {name} {key}=<value>"
            )
    client.prefetch(path, env)
    client.deploy(path, env, rendered.config_hash)
    detail = f"config {current.tags.get('config', '?')} -> {rendered.config_hash}" if current else "new app"
    return replace(done, outcome="deployed", detail=detail)


def _needed_secrets(item: LoadedManifest) -> list[tuple[str, str]]:
    auth = item.manifest.auth
    needed = [(auth.secret, API_KEY_ENV)] if auth.enabled else []
    return needed + ([(auth.hf_token_secret, "HF_TOKEN")] if auth.hf_token_secret else [])


def _one_line(exc: GgufDeployError) -> str:
    """The error as one table cell: its lines as the CLI shows them, joined, without "error: "."""
    return "; ".join(line.removeprefix("error: ") for line in exc.show())


# ## Status and destroy


State = Literal["deployed", "not deployed", "drifted", "orphan", "unmanaged", "unknown"]


@dataclass(frozen=True)
class AppStatus:
    """One manifest (or one orphan app) and what is live."""

    app_name: str
    state: State
    path: str = ""  # the manifest; empty for an orphan
    config_hash: str = ""  # what the manifest would deploy now ("" when not computed)
    live_config: str = ""  # the live app's config tag
    app_id: str = ""
    detail: str = ""


def app_status(
    manifests: Sequence[LoadedManifest],
    apps: Sequence[LiveApp],
    *,
    plan_one: PlanOne,
    prefix: str,
    orphans: bool = True,
) -> list[AppStatus]:
    """Join manifests with live apps. A live manifest is planned to compare config hashes.

    ``orphans``: also list the live apps under ``prefix`` that no manifest produces; only
    meaningful when ``manifests`` are all of them (of a subset, the others' apps would be listed).
    """
    by_name = {app.name: app for app in apps}
    out = []
    for item in manifests:
        app = by_name.get(item.app_name)
        if app is None:
            out.append(AppStatus(item.app_name, "not deployed", item.path))
            continue
        live_config = app.tags.get("config", "")
        try:
            config = app_data(plan_one(item))["app"]["tags"]["config"]
        except GgufDeployError as exc:
            out.append(AppStatus(item.app_name, "unknown", item.path, "", live_config, app.app_id, _one_line(exc)))
            continue
        state: State = "deployed" if config == live_config else "drifted"
        out.append(AppStatus(item.app_name, state, item.path, config, live_config, app.app_id))
    known = {item.app_name for item in manifests}
    for app in apps if orphans else ():
        if app.name.startswith(f"{prefix}-") and app.name not in known:
            # only an app gguf-deploy made is an orphan (and may be destroyed by a full sync); an app
            # that merely shares the prefix belongs to someone else and is only reported
            if app.tags.get(MANAGED_BY[0]) == MANAGED_BY[1]:
                state: State = "orphan"
                detail = f"tagged manifest '{app.tags['manifest']}'" if "manifest" in app.tags else "no manifest tag"
            else:
                state, detail = "unmanaged", "has the prefix but not the managed-by: gguf-deploy tag; left alone"
            out.append(AppStatus(app.name, state, "", "", app.tags.get("config", ""), app.app_id, detail))
    return out


def find_app(name: str, apps: Sequence[LiveApp], prefix: str) -> LiveApp:
    """The live app ``name`` means: an app name, or a manifest name under ``prefix``."""
    by_name = {app.name: app for app in apps}
    for candidate in (name, f"{prefix}-{name}"):
        if candidate in by_name:
            return by_name[candidate]
    wanted = name if name.startswith(f"{prefix}-") else f"{prefix}-{name}"
    close = difflib.get_close_matches(wanted, list(by_name), n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise ModalError(f"no deployed Modal app named '{name}' or '{prefix}-{name}'{hint}")


__all__ = [
    "AppStatus",
    "DeployResult",
    "LiveApp",
    "ModalCli",
    "ModalClient",
    "app_status",
    "check_credentials",
    "deploy_all",
    "find_app",
    "last_words",
]
