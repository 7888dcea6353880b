"""The table of one `bench/gpu.sh` run: reads its JSON results and prints markdown.

    python bench/gpu_report.py bench/results/gpu
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def rows(folder: Path) -> list[str]:
    out = ["| recipe | path | samples/s | MFU | first steps (s) | eval clips/s to cap | eval clips/s, same length |",
           "|---|---|---|---|---|---|---|"]
    bare = folder / "bare.json"
    if bare.is_file():
        data = json.loads(bare.read_text())
        for name, r in data["results"].items():
            out.append(f"| {name} | bare loop | {r['train_samples_per_s']:.1f} | {100 * r['mfu']:.1f}% | "
                       f"{r['first_steps_s']:.1f} ({r['warmup_steps']} steps) | {_f(r.get('eval_clips_per_s_to_cap'))} | "
                       f"{_f(r.get('eval_clips_per_s_same_length'))} |")
    for path in sorted(folder.glob("e2e-*.json")):
        r = json.loads(path.read_text())
        out.append(f"| {r['recipe']} | end to end, {r['steps']} steps | {r['train_samples_per_s']:.1f} | "
                   f"{100 * r['mfu']:.1f}% | {r['first_steps_s']:.1f} ({r['skip_steps']} steps) | "
                   f"{r['eval_clips_per_s']:.1f} ({r['eval_clips']} clips) | |")
    return out


def _f(x) -> str:
    return "" if x is None else f"{x:.1f}"


def main(argv: list[str]) -> int:
    folder = Path(argv[0]) if argv else Path("bench/results/gpu")
    device = next((json.loads(p.read_text()).get("device") for p in folder.glob("*.json")), "?")
    print(f"whisper-small shape, random weights, {device}")
    print("\n".join(rows(folder)))
    bare = folder / "bare.json"
    if bare.is_file():
        data = json.loads(bare.read_text())
        for precision in ("fp32", "bf16"):
            if f"agreement_{precision}" in data:
                floor = data.get(f"agreement_{precision}_generate_batch16_vs_64")
                print(f"{precision}: {100 * data[f'agreement_{precision}']:.1f}% identical transcripts, "
                      "whisper_ft.decoding vs generate" + ("" if floor is None else
                      f" (generate against itself at another batch size: {100 * floor:.1f}%)"))
    for path in sorted(folder.glob("e2e-*.json")):
        prof = json.loads(path.read_text()).get("profile")
        if prof and prof.get("gpu_busy") is not None:
            print(f"{path.stem}, last {prof['profiled_steps']} steps profiled: {prof['wall_ms']:.1f} ms per step, GPU busy "
                  f"{100 * prof['gpu_busy']:.0f}%, host in the data loader {prof['data_loader_ms']:.1f} ms and in the "
                  f"optimizer {prof['optimizer_ms']:.1f} ms per step")
            if "host_syncs_per_step" in prof:
                print(f"  waits for the GPU: {prof['host_syncs_per_step']:.2f} per step "
                      f"({', '.join(prof['host_sync_sites']) or 'none'})")
    saves = folder / "saves.json"
    if saves.is_file():
        data = json.loads(saves.read_text())["results"]
        print("checkpoint saves (" + f"{data['synchronous']['checkpoint_bytes'] / 1e9:.2f} GB): training held "
              + "; ".join(f"{mode} {' '.join(f'{x:.2f}' for x in r['held_s'])} s" for mode, r in data.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
