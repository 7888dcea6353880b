"""The table of one `bench/gpu.sh` run: reads its JSON results and prints markdown.

    python bench/gpu_report.py bench/results/gpu
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# the host's parts of a profiled end-to-end step (bench_e2e.HOST_PARTS; data_loader_ms in older runs)
HOST_PARTS = {"forward_backward_ms": "forward+backward", "optimizer_ms": "optimizer",
              "after_optimizer_ms": "schedule+zeroing", "between_steps_ms": "between steps (data, logging)",
              "data_loader_ms": "data loader"}


def read(path: Path) -> dict | None:
    """A part's JSON result, or None (with a line saying so) when the part left none."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        print(f"({path.name}: no result; see {path.with_suffix('.log').name})")
        return None


def rows(folder: Path) -> list[str]:
    out = ["| recipe | path | samples/s | MFU | first steps (s) | eval clips/s to cap | eval clips/s, same length |",
           "|---|---|---|---|---|---|---|"]
    bare = read(folder / "bare.json") if (folder / "bare.json").exists() else None
    if bare:
        for name, r in bare["results"].items():
            batch128 = r.get("eval_clips_per_s_same_length_batch128")
            out.append(f"| {name} | bare loop | {r['train_samples_per_s']:.1f} | {100 * r['mfu']:.1f}% | "
                       f"{r['first_steps_s']:.1f} ({r['warmup_steps']} steps) | {_f(r.get('eval_clips_per_s_to_cap'))} | "
                       f"{_f(r.get('eval_clips_per_s_same_length'))}"
                       + ("" if batch128 is None else f" ({batch128:.1f} at batch 128)") + " |")
    for path in sorted(folder.glob("e2e-*.json")):
        r = read(path)
        if r is None:
            continue
        evaluation = ("(cut short after training)" if r.get("partial") else
                      f"{r['eval_clips_per_s']:.1f} ({r['eval_clips']} clips, cap {r.get('generation_max_length', '?')} "
                      "tokens)")
        batch = r.get("settings", {}).get("batch_size", 16)
        out.append(f"| {r['recipe']} | end to end, {r['steps']} steps, batch {batch} | {r['train_samples_per_s']:.1f} | "
                   f"{100 * r['mfu']:.1f}% | {r['first_steps_s']:.1f} ({r['skip_steps']} steps) | {evaluation} | |")
    return out


def _quiet(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _f(x) -> str:
    return "" if x is None else f"{x:.1f}"


def main(argv: list[str]) -> int:
    folder = Path(argv[0]) if argv else Path("bench/results/gpu")
    machine = folder / "gpu.txt"  # nvidia-smi's card line, the versions and the date, from gpu.sh
    print("whisper-small shape, random weights; " + ("; ".join(machine.read_text().split("\n")).strip("; ")
                                                      if machine.is_file() else "machine not recorded"))
    peaks = {r.get("peak") for p in folder.glob("*.json") if (d := _quiet(p)) for r in [d, *d.get("results", {}).values()]}
    print("MFU peak: " + ("; ".join(sorted(p for p in peaks if p)) or "?"))
    print("\n".join(rows(folder)))
    # the agreement check: its own part (agreement.json), or inside the bare loop's (older runs)
    for data in filter(None, map(_quiet, (folder / "agreement.json", folder / "bare.json"))):
        for precision in ("fp32", "bf16"):
            if f"agreement_{precision}" in data:
                floor = data.get(f"agreement_{precision}_generate_batch16_vs_64")
                print(f"{precision}: {100 * data[f'agreement_{precision}']:.1f}% identical transcripts, "
                      "whisper_ft.decoding vs generate" + ("" if floor is None else
                      f" (generate against itself at another batch size: {100 * floor:.1f}%)"))
    for path in sorted(folder.glob("e2e-*.json")):
        result = _quiet(path) or {}
        prof = result.get("profile")
        if result.get("host_hotspots"):
            calls = f" ({result['host_calls_per_step']:.0f} Python calls)" if result.get("host_calls_per_step") else ""
            print(f"{path.stem}, the host's hot spots per step{calls}: " + "; ".join(result["host_hotspots"][:6]))
        if result.get("eval_hotspots"):
            print(f"{path.stem}, the host's hot spots in the check after the last step: "
                  + "; ".join(result["eval_hotspots"][:6]))
        same = result.get("same_process")
        if same:
            ways = [("trainer_step_loader_ms", "its step on a new data loader"),
                    ("trainer_step_ms", "on batches collated ahead"), ("bare_step_ms", "the bare loop's step on them"),
                    ("bare_step_no_cudnn_autotune_ms", "the same, cuDNN autotuning off")]
            print(f"{path.stem}, ms per step in the same process after step {same['at_step']}: the Trainer's loop "
                  f"{same['loop_ms']:.1f}; " + "; ".join(f"{name} {same[k]:.1f}" for k, name in ways if k in same)
                  + f" ({same['steps']} steps each)")
        if prof and prof.get("gpu_busy") is not None:
            host = ", ".join(f"{name} {prof[key]:.1f}" for key, name in HOST_PARTS.items() if key in prof)
            print(f"{path.stem}, last {prof['profiled_steps']} steps profiled: {prof['wall_ms']:.1f} ms per step, GPU busy "
                  f"{100 * prof['gpu_busy']:.0f}% ({prof['gpu_kernel_ms']:.1f} ms of kernels); host ms per step: {host}")
            if "host_syncs_per_step" in prof:
                print(f"  waits for the GPU: {prof['host_syncs_per_step']:.2f} per step "
                      f"({', '.join(prof['host_sync_sites']) or 'none'})")
    saves = _quiet(folder / "saves.json")
    if saves:
        data = saves["results"]
        print("checkpoint saves (" + f"{data['synchronous']['checkpoint_bytes'] / 1e9:.2f} GB): training held "
              + "; ".join(f"{mode} {' '.join(f'{x:.2f}' for x in r['held_s'])} s" for mode, r in data.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
