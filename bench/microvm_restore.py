"""Micro-VM bench (issue 15): cold boot, the template's snapshot, restore to ready, warm acquire via the pool.

    python -m bench.microvm_restore [--quick]

Runs the micro-VM backend in this process (root, QEMU; under KVM where the probe finds it, else TCG) with a
data dir of its own under bench/.work/microvm (its access key keys its VM image, built once into the image
cache like `sandtrap image build`). Measures, one after the other (never two VMs booting at once):

- cold boot: QEMU's start to the guest's sshd taking the honeypot's key (``sandbox.microvm.snapshot: false``);
- the template: its cold boot and its save (QMP migrate to a file) and the state file's size, from the
  snapshot's manifest (made by this run if it was missing: then "made now");
- restore: QEMU's start with ``-incoming`` to sshd ready, then made unique and its baseline, each create's total;
- warm acquire: ``Pool.acquire`` with a warm VM ready (what an attacker's login waits for), pool_size 1,
  refilled (by a restore) between samples.

Writes bench/results/microvm_restore.md and microvm_restore.json (--quick: bench/.work/quick/). Skips (exit 0) where QEMU
or root is missing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from sandtrap.app import build_backend, cache_dir, vm_planted_files
from sandtrap.config import SandboxSettings, Settings
from sandtrap.sandbox.microvm import snapshot
from sandtrap.sandbox.microvm.backend import MicroVMBackend, access_key_path, guest_files
from sandtrap.sandbox.microvm.guest import load_access_key
from sandtrap.sandbox.microvm.image import build_vm_image
from sandtrap.sandbox.microvm.sandbox import MicroVMSandbox
from sandtrap.sandbox.pool import Pool

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "bench" / ".work" / "microvm-restore"


def _settings(use_snapshot: bool) -> Settings:
    return Settings.model_validate(
        {
            "storage": {"data_dir": str(DATA)},
            "image": {"cache_dir": str(ROOT / "data" / "cache")},
            "sandbox": {"backend": "microvm", "microvm": {"memory": "512m", "vcpus": 1, "snapshot": use_snapshot}},
        }
    )


def p50(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


async def _create(backend: MicroVMBackend) -> tuple[MicroVMSandbox, float]:
    t0 = time.perf_counter()
    box = await backend.create()
    return box, time.perf_counter() - t0


async def main(quick: bool) -> dict[str, Any]:
    settings = _settings(True)
    key = load_access_key(access_key_path(settings.data_dir / "microvm"))
    guest = guest_files(
        settings.sandbox, key, vm_planted_files(settings)
    )  # the capture CA too (the backend bakes it in)
    image, built = await build_vm_image(settings.image, guest, cache_dir(settings), console=Console(stderr=True))
    n_cold, n_restore, n_acquire = (1, 2, 3) if quick else (2, 5, 10)
    res: dict[str, Any] = {"quick": quick, "image": image.directory.name, "image_built_now": built}

    cold = build_backend(_settings(False))
    assert isinstance(cold, MicroVMBackend)
    res["accel"] = cold.accel.name
    res["cold_boot_s"] = []
    for _ in range(n_cold):
        box, _total = await _create(cold)
        res["cold_boot_s"].append(box.boot_s)
        print(f"cold boot to sshd: {box.boot_s:.1f}s")
        await box.remove()
    await cold.close()

    warm = build_backend(settings)
    assert isinstance(warm, MicroVMBackend)
    t0 = time.perf_counter()
    template = await warm._template(image)
    made_s = time.perf_counter() - t0
    if template is None:
        raise SystemExit("the template could not be saved (see the log): no restore figures")
    manifest = snapshot.read_manifest(template)
    res["template"] = {**manifest, "made_now": made_s > 1.0, "dir": template.directory.name}
    res["restore_ready_s"], res["restore_unique_s"], res["restore_create_s"] = [], [], []
    for _ in range(n_restore):
        box, total = await _create(warm)
        assert box.restored_from, "a create fell back to a cold boot (see the log)"
        res["restore_ready_s"].append(box.boot_s)
        res["restore_unique_s"].append(box.baseline_s)
        res["restore_create_s"].append(total)
        print(f"restore to sshd: {box.boot_s:.1f}s, unique + baseline {box.baseline_s:.1f}s, create {total:.1f}s")
        await box.remove()

    with tempfile.TemporaryDirectory(prefix="sandtrap-bench-microvm-") as ledger:
        pool = Pool(warm, SandboxSettings(pool_size=1, max_sandboxes=4), Path(ledger))
        await pool.start()
        res["acquire_ms"] = []
        try:
            for i in range(n_acquire):
                await pool.wait_refilled()
                t0 = time.perf_counter()
                box = await pool.acquire(f"bench-{i}", "198.51.100.7")
                res["acquire_ms"].append((time.perf_counter() - t0) * 1000)
                await pool.release(box)
                await warm.sandbox(box.id, box.name).remove()
        finally:
            await pool.close()
            for info in await warm.list_managed():
                await warm.sandbox(info.id, info.name).remove()
            await warm.close()
    print(f"warm acquire p50 {p50(res['acquire_ms']):.2f} ms")
    return res


def table(res: dict[str, Any]) -> str:
    tpl = res.get("template", {})
    rows = [
        ("accelerator", res.get("accel", "?")),
        ("cold boot to sshd, p50", f"{p50(res.get('cold_boot_s', [])):.1f} s (n={len(res.get('cold_boot_s', []))})"),
        ("template: cold boot to sshd", f"{tpl.get('boot_s', '?')} s" + (" (made now)" if tpl.get("made_now") else "")),
        ("template: save (QMP migrate to a file)", f"{tpl.get('save_s', '?')} s"),
        ("template: state file", f"{int(tpl.get('state_bytes', 0)) / 2**20:.0f} MiB"),
        ("restore to sshd, p50", f"{p50(res.get('restore_ready_s', [])):.1f} s (n={len(res.get('restore_ready_s', []))})"),
        ("restore: made unique + baseline, p50", f"{p50(res.get('restore_unique_s', [])):.1f} s"),
        ("restore: whole create, p50", f"{p50(res.get('restore_create_s', [])):.1f} s"),
        ("warm acquire via the pool, p50", f"{p50(res.get('acquire_ms', [])):.2f} ms (n={len(res.get('acquire_ms', []))})"),
    ]  # fmt: skip
    return "| measure | value |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="python -m bench.microvm", description=__doc__)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0 or shutil.which("qemu-system-x86_64") is None or shutil.which("qemu-img") is None:
        print("bench.microvm: skipped (needs root, qemu-system-x86 and qemu-utils)")
        raise SystemExit(0)
    result = asyncio.run(main(args.quick))
    out = ROOT / "bench" / (".work/quick" if args.quick else "results")
    out.mkdir(parents=True, exist_ok=True)
    (out / "microvm_restore.json").write_text(json.dumps(result, indent=1))
    text = table(result)
    (out / "microvm_restore.md").write_text(f"# micro-VM bench ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})\n\n"
                                    + text)  # fmt: skip
    print(text)
