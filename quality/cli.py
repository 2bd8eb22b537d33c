"""``bash scripts/quality.sh``: train the lab once, evaluate every method on ComfyUI servers, write the report.

    quality.sh [--list] [--compositions FILE] [--seeds N] [--out DIR] [--servers URL,...] [--smoke]

Training runs in this process on the CPU (cached under ``.cache/quality``); the evaluation queues API
prompts on ComfyUI servers: by default one this command starts on the set-up host, or the running
servers ``--servers`` names, which must load the lab's nodes and files (``server_config`` says how).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("CMLORA_QUALITY_CACHE") or REPO / ".cache" / "quality")
DEFAULT_OUT = REPO / "quality" / "report"
KEPT = REPO / "quality" / "models"  # the trained lab kept in the repository for the demo
# the demo's composition, seed and what its grid shows, from the evaluation this repository's report holds
DEMO = {"concepts": ["orb", "red", "checker", "dusk", "ball"], "seed": 1,
        "why": "five LoRAs at once (see quality/report/QUALITY.md for what each method keeps on average)"}
sys.path.insert(0, str(REPO / "scripts"))

from . import evaluate, lab, report  # noqa: E402
from .world import CATEGORIES, CONCEPTS  # noqa: E402


def import_host(host: Path):
    """The host's modules on the CPU in this process (for training: its model classes and the CLIP)."""
    for p in (str(host),):
        if p in sys.path:
            sys.path.remove(p)
        sys.path.insert(0, p)
    from comfy.cli_args import args

    args.cpu = True
    args.use_pytorch_cross_attention = True
    import comfy.model_management  # noqa: F401


def prepare_checkpoint(host: Path, models: Path) -> Path:
    """The generated checkpoint whose CLIP-L the lab reads prompts with, in ``models``/checkpoints (made
    there by scripts/make_fixtures.py when missing)."""
    checkpoint = models / "checkpoints" / evaluate.CHECKPOINT
    if not checkpoint.is_file():
        subprocess.run([sys.executable, str(REPO / "scripts" / "make_fixtures.py"), "--models-dir", str(models)],
                       check=True, env={**os.environ, "PYTHONPATH": str(host)}, stdout=subprocess.DEVNULL)
    return checkpoint


def train(host: Path, models: Path, recipe: lab.Recipe, log=print) -> lab.LabFiles:
    checkpoint = prepare_checkpoint(host, models)
    files = lab.LabFiles(CACHE, recipe)
    if files.complete():
        log(f"lab: trained models found in {files.folder}")
        return files
    import_host(host)
    import torch
    import comfy.sd

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    clip = comfy.sd.load_checkpoint_guess_config(str(checkpoint), output_vae=False, output_clip=True)[1]
    return lab.train_lab(recipe, clip, CACHE, log=log)


def server_config(files: lab.LabFiles, models: Path, path: Path) -> Path:
    """An extra-model-paths file that gives a ComfyUI server the lab's nodes, base model, LoRAs and the
    generated checkpoint (pass it with ``--extra-model-paths-config``)."""
    return lab.server_paths(path, files.base.parent, files.folder / "loras", models / "checkpoints")


def save_models(files: lab.LabFiles) -> None:
    """The trained files into the repository's quality/models (fp16 safetensors, as trained)."""
    (KEPT / "loras").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(files.base, KEPT / files.base.name)
    for name in lab.CONCEPT_NAMES:
        shutil.copyfile(files.lora(name), KEPT / "loras" / files.lora(name).name)
    (KEPT / "demo.json").write_text(json.dumps({**DEMO, "recipe": dataclasses.asdict(files.recipe)}, indent=1) + "\n")
    print(f"quality: the trained models are in {KEPT}")


def read_compositions(path: Path) -> list[tuple[str, ...]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"quality: --compositions {path}: cannot read it as JSON ({e})") from None
    if not isinstance(data, list) or not data:
        raise SystemExit(f"quality: --compositions {path}: expected a non-empty JSON list of compositions, "
                         "each a list of concept names (see --list)")
    out = []
    for i, c in enumerate(data):
        try:
            out.append(evaluate.check_composition(c))
        except (ValueError, KeyError) as e:
            raise SystemExit(f"quality: --compositions {path}: composition {i + 1}: {e}") from None
    return out


def check_servers(servers, files: lab.LabFiles) -> None:
    """Stop with a clear message when a server lacks the lab's nodes or files."""
    needed = {f"lab_{n}.safetensors" for n in lab.CONCEPT_NAMES}
    for s in servers:
        info = s.get("/object_info/CMLoRALab_ModelLoader")
        if "CMLoRALab_ModelLoader" not in info:
            raise SystemExit(f"quality: {s.url} has no 'Lab Model Loader' node: start it with "
                             f"--extra-model-paths-config pointing at a file like {files.folder / 'server.yaml'}")
        spec = s.get("/object_info/CMLoRA_LoraStack")["CMLoRA_LoraStack"]["input"]["required"]["lora_name"]
        loras = set(spec[0] if isinstance(spec[0], list) else spec[1].get("options", []))  # V1 or V3 combo
        missing = sorted(needed - loras)
        if missing:
            raise SystemExit(f"quality: {s.url} does not list the lab's LoRAs ({', '.join(missing[:3])}...): copy "
                             f"{files.folder / 'loras'} into its loras folder or use the extra-model-paths file")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="quality.sh", description="The quality lab: train, evaluate every method, report.")
    ap.add_argument("--host", type=Path, help="the ComfyUI folder (quality.sh passes the set-up host)")
    ap.add_argument("--models-dir", type=Path, help="where the generated checkpoint is or goes (default: the "
                                                    "host's models folder)")
    ap.add_argument("--list", action="store_true", help="print the concept names by category and exit")
    ap.add_argument("--compositions", type=Path, help="JSON list of compositions, each a list of concept names")
    ap.add_argument("--seeds", type=int, help="images per composition and method (default 20; smoke 2)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"where QUALITY.md and results.json go ({DEFAULT_OUT})")
    ap.add_argument("--servers", help="comma-separated URLs of running ComfyUI servers to shard the evaluation over")
    ap.add_argument("--save-models", action="store_true",
                    help=f"copy the trained base model and LoRAs into {KEPT.relative_to(REPO)} (what the demo's lab "
                         "grid loads), with the demo's composition")
    ap.add_argument("--smoke", action="store_true", help="the plumbing only: a few training steps, two "
                                                         "compositions, two seeds (what CI runs)")
    args = ap.parse_args(argv)
    if args.list:
        for category in CATEGORIES:
            print(f"{category}: {', '.join(CONCEPTS[category])}")
        return 0
    if args.seeds is not None and not 1 <= args.seeds <= 256:
        raise SystemExit(f"quality: --seeds {args.seeds}: give 1 to 256 images per composition and method")
    if args.host is None:
        raise SystemExit("quality: --host is required (scripts/quality.sh passes the set-up ComfyUI folder)")
    recipe = lab.SMOKE if args.smoke else lab.Recipe()
    settings = evaluate.Settings(seeds=args.seeds or (2 if args.smoke else 20), steps=4 if args.smoke else 20)
    if args.compositions:
        chosen = read_compositions(args.compositions)
    else:
        chosen = evaluate.compositions(per_size=1 if args.smoke else 3, sizes=(2, 3) if args.smoke else range(2, 6))
    started = time.perf_counter()
    if args.save_models and args.smoke:
        raise SystemExit("quality: --save-models keeps the full recipe's models; leave out --smoke")
    models = args.models_dir or args.host / "models"
    files = train(args.host, models, recipe)
    if args.save_models:
        save_models(files)
    args.out.mkdir(parents=True, exist_ok=True)
    config = server_config(files, models, files.folder / "server.yaml")
    evaluated = time.perf_counter()
    with ExitStack() as stack:
        from comfy_client import Server

        if args.servers:
            servers = [Server.at(u.strip()) for u in args.servers.split(",") if u.strip()]
        else:
            servers = [stack.enter_context(Server(args.host, output_dir=files.folder / "comfy_output",
                                                  extra_model_paths=config, log_path=args.out / "comfyui.log"))]
        check_servers(servers, files)
        results = report.evaluate_all(servers, chosen, settings, log=print)
    trained = json.loads(files.report.read_text())
    results["figures"] = {"training": {k: trained[k] for k in ("base_minutes", "lora_minutes")},
                          "evaluation_minutes": round((time.perf_counter() - evaluated) / 60, 2),
                          "total_minutes": round((time.perf_counter() - started) / 60, 2)}
    results["recipe"] = dataclasses.asdict(recipe)
    paths = report.write(args.out, results)
    print(f"quality: {', '.join(str(p) for p in paths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
