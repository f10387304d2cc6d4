"""Command line: parse, then call into the app. `sandtrap --help` lists the commands."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from sandtrap import __version__
from sandtrap.cli_config import ConfigOption, reset, settings
from sandtrap.cli_sessions import sessions_app
from sandtrap.config import Settings, settings_as_yaml
from sandtrap.errors import SandtrapError
from sandtrap.logs import setup_logging

app = typer.Typer(help="sandtrap: a high-interaction SSH honeypot with real sandboxes.", no_args_is_help=True)
config_app = typer.Typer(help="Inspect the configuration.", no_args_is_help=True)
image_app = typer.Typer(help="Build and check the sandbox image.", no_args_is_help=True)
app.add_typer(config_app, name="config")
seccomp_app = typer.Typer(
    help="sandtrap's seccomp profile (Docker's default rules, io_uring refused).", no_args_is_help=True
)
app.add_typer(image_app, name="image")
app.add_typer(seccomp_app, name="seccomp")
app.add_typer(sessions_app, name="sessions")

console = Console(stderr=True)
out = Console()


def _fail(exc: BaseException) -> typer.Exit:
    console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
    return typer.Exit(1)


def _print_version(value: bool) -> None:
    if value:  # eager: before click asks for the command that `sandtrap --version` does not give
        out.print(__version__)
        raise typer.Exit(0)


@app.callback()
def main_options(
    config: ConfigOption = None,
    version: Annotated[
        bool, typer.Option("--version", help="print the version and exit", callback=_print_version, is_eager=True)
    ] = False,
) -> None:
    reset(config)


@config_app.command("show")
def config_show(
    as_json: Annotated[bool, typer.Option("--json", help="JSON instead of YAML")] = False, config: ConfigOption = None
) -> None:
    """Print the effective configuration (file values over defaults)."""
    s = settings(config)
    if as_json:
        out.print_json(json.dumps(s.model_dump(mode="json")))
    else:
        sys.stdout.write(settings_as_yaml(s))


@image_app.command("build")
def image_build(
    base: Annotated[
        str | None, typer.Option("--from", help="customise this local image instead of debootstrap")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="rebuild even if the inputs are unchanged")] = False,
    config: ConfigOption = None,
) -> None:
    """Build the sandbox image (debootstrap + our layer; with sandbox.backend: microvm, the VM's disk image and
    kernel); a no-op when its inputs are unchanged."""
    from sandtrap.sandbox.docker.image import build_image

    s = settings(config)
    setup_logging(s.log_level)
    if s.sandbox.backend == "microvm":
        if base is not None:
            raise _fail(SandtrapError("--from: the VM image is built from the debootstrap base only"))
        _vm_image_build(s, force)
        return
    if s.sandbox.backend == "nspawn":
        if base is not None:
            raise _fail(SandtrapError("--from: the nspawn tree is built from the debootstrap base only"))
        _nspawn_tree_build(s, force)
        return
    cache = Path(s.image.cache_dir) if s.image.cache_dir else s.data_dir / "cache"
    try:
        result = asyncio.run(
            build_image(
                s.image,
                s.sandbox.docker.image,
                cache,
                base=base,
                force=force,
                endpoint=s.sandbox.docker,
                console=console,
            )
        )
    except SandtrapError as exc:
        raise _fail(exc) from None
    verb = "built" if result.built else "up to date"
    console.print(f"image {result.tag} {verb} ({result.image_id[:19]}, inputs {result.inputs[:12]})")
    _persona_images_build(s, cache, force)


def _persona_images_build(s: Settings, cache: Path, force: bool) -> None:
    """Each persona's own image (personas[].extra_packages): the sandbox image's packages and its own, from
    debootstrap (a tarball of its own in the cache, keyed by the packages), then the same layer."""
    from sandtrap.sandbox.docker.image import build_image

    todo = s.persona_images()
    for i, (name, tag, image) in enumerate(todo, 1):
        console.print(f"persona {name} ({i}/{len(todo)}): image {tag} with {', '.join(image.extra_packages)}")
        try:
            result = asyncio.run(
                build_image(image, tag, cache, force=force, endpoint=s.sandbox.docker, console=console)
            )
        except SandtrapError as exc:
            raise _fail(exc) from None
        verb = "built" if result.built else "up to date"
        console.print(f"image {result.tag} {verb} ({result.image_id[:19]}, inputs {result.inputs[:12]})")


def _vm_image_build(s: Settings, force: bool) -> None:
    from sandtrap.app import cache_dir, vm_planted_files
    from sandtrap.sandbox.microvm.backend import access_key_path, guest_files
    from sandtrap.sandbox.microvm.guest import load_access_key
    from sandtrap.sandbox.microvm.image import build_vm_image

    key = load_access_key(access_key_path(s.data_dir / "microvm"))
    guest = guest_files(s.sandbox, key, vm_planted_files(s))
    try:
        image, built = asyncio.run(
            build_vm_image(s.image, guest, cache_dir(s), force=force, endpoint=s.sandbox.docker, console=console)
        )
    except SandtrapError as exc:
        raise _fail(exc) from None
    verb = "built" if built else "up to date"
    console.print(f"VM image {image.directory.name} {verb} (kernel {image.release}, inputs {image.inputs[:12]})")


def _nspawn_tree_build(s: Settings, force: bool) -> None:
    from sandtrap.app import cache_dir
    from sandtrap.sandbox.nspawn.image import build_tree

    try:
        tree, built = asyncio.run(
            build_tree(
                s.image, s.sandbox.docker.image, cache_dir(s), force=force, endpoint=s.sandbox.docker,
                console=console,
            )
        )  # fmt: skip
    except SandtrapError as exc:
        raise _fail(exc) from None
    console.print(f"nspawn tree {tree.parent.name} {'built' if built else 'up to date'} ({tree})")


@image_app.command("check")
def image_check(config: ConfigOption = None) -> None:
    """Exit 0 if the sandbox image is present and current."""
    from sandtrap.sandbox.docker.image import check_image

    s = settings(config)
    try:
        r = asyncio.run(check_image(s.image, s.sandbox.docker.image, s.sandbox.docker))
    except SandtrapError as exc:
        raise _fail(exc) from None
    out.print(f"present={r.present} current={r.current} expected={r.expected[:12]} actual={(r.actual or '-')[:12]}")
    current = r.current
    for name, tag, image in s.persona_images():  # each persona's own image too
        try:
            p = asyncio.run(check_image(image, tag, s.sandbox.docker))
        except SandtrapError as exc:
            raise _fail(exc) from None
        out.print(f"persona {name}: {tag} present={p.present} current={p.current}")
        current = current and p.current
    raise typer.Exit(0 if current else 1)


@seccomp_app.command("build")
def seccomp_build(
    source: Annotated[Path, typer.Option("--from", help="Docker's default.json (profiles/seccomp in its source)")],
) -> None:
    """Derive sandtrap's profile from Docker's default one and install it for every data dir (no config read)."""
    from sandtrap.sandbox.docker import seccomp

    try:
        path, changed = seccomp.build(source, seccomp.installed_path())
    except SandtrapError as exc:
        raise _fail(exc) from None
    console.print(
        f"seccomp profile {path} {'written' if changed else 'up to date'} (io_uring refused: ENOSYS)",
        highlight=False,
        soft_wrap=True,
    )


@seccomp_app.command("check")
def seccomp_check(
    installed: Annotated[
        bool, typer.Option("--installed", help="for 'sandtrap': the installed profile, not a data dir's own copy")
    ] = False,
    config: ConfigOption = None,
) -> None:
    """Exit 0 if the configured profile can be used (sandtrap's: present and refusing io_uring)."""
    from sandtrap.sandbox.docker import seccomp

    s = settings(config)
    setting = s.sandbox.docker.seccomp_profile
    try:
        seccomp.resolve(setting, None if installed else s.data_dir)
    except SandtrapError as exc:
        raise _fail(exc) from None
    where = f" ({seccomp.find(None if installed else s.data_dir)})" if setting == seccomp.SANDTRAP else ""
    out.print(f"sandbox.docker.seccomp_profile: {setting}{where} usable", highlight=False, soft_wrap=True)


@app.command("stats")
def stats_command(
    top: Annotated[int, typer.Option(min=1, max=1000, help="how many of each")] = 10,
    since: Annotated[str | None, typer.Option(help="30m, 2h, 7d or an ISO time")] = None,
    sensor: Annotated[str | None, typer.Option(help="only this sensor's (a fleet sharing one database)")] = None,
    config: ConfigOption = None,
) -> None:
    """Top usernames, passwords, pairs, source IPs, commands and client versions."""
    from sandtrap import cli_sessions

    cli_sessions.stats(settings(config), top, since, sensor)


@app.command()
def doctor(config: ConfigOption = None) -> None:
    """Check that this machine can run the honeypot; non-zero exit on any failure."""
    from sandtrap.doctor import run_checks

    s = settings(config)
    checks = asyncio.run(run_checks(s))
    table = Table(title="sandtrap doctor")
    table.add_column("check")
    table.add_column("result")
    table.add_column("detail", overflow="fold")
    for c in checks:
        table.add_row(c.name, "[green]ok[/]" if c.ok else "[red]FAIL[/]", c.detail)
    out.print(table)
    raise typer.Exit(0 if all(c.ok for c in checks) else 1)


@app.command()
def run(config: ConfigOption = None) -> None:
    """Run the honeypot with the configured settings until interrupted."""
    from sandtrap.app import serve

    s = settings(config)
    setup_logging(s.log_level)
    progress = Progress(
        TextColumn("warming sandbox pool"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )
    task = progress.add_task("pool", total=s.sandbox.pool_size)
    progress.start()

    def on_progress(done: int, total: int) -> None:
        progress.update(task, completed=done, total=total)
        if done >= total:
            progress.stop()

    try:
        asyncio.run(serve(s, on_progress))
    except SandtrapError as exc:
        raise _fail(exc) from None
    except KeyboardInterrupt:
        pass
    finally:
        progress.stop()


@app.command("loadavgfs")
def loadavgfs_command(
    mountpoint: Annotated[
        str | None, typer.Argument(help="where to mount (default: sandbox.loadavg_dir)", show_default=False)
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Serve each box's own /proc/loadavg (a FUSE file system; root on the engine's host) until stopped."""
    s = settings(config)
    setup_logging(s.log_level)
    target = mountpoint or s.sandbox.loadavg_dir
    if not target:
        raise _fail(ValueError("sandbox.loadavg_dir is '' (off): give a mount point or set sandbox.loadavg_dir"))
    try:
        from sandtrap.sandbox.host.loadavgfs import serve  # loads libfuse: an OSError naming the fix without it

        serve(target)
    except OSError as exc:
        raise _fail(exc) from None


@app.command("api")
def api_command(config: ConfigOption = None) -> None:
    """Serve the API (and web UI) alone against the configured storage, until interrupted."""
    from sandtrap.api.console import serve_console

    s = settings(config)
    setup_logging(s.log_level)
    try:
        asyncio.run(serve_console(s))
    except SandtrapError as exc:
        raise _fail(exc) from None
    except KeyboardInterrupt:
        pass


def main() -> None:
    app()


if __name__ == "__main__":
    main()
