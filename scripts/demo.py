"""The main job: run example workflows on a real ComfyUI server (CPU) with generated models.

    python scripts/demo.py [--workflow "LoRA Composite - predictions averaged (demo)"] [--out demo_output]

Writes the images and report.md into --out. Run through scripts/demo.sh, which sets up
the environment and the host first. The examples that name real checkpoints (SD1.5, SDXL:
they list a model download, see build_workflows.model_downloads) need weights this machine
does not have, so the demo runs only the others.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

sys.path.append(str(REPO))  # the quality lab's modules (after the host's: the repo has a nodes/ package)
from build_workflows import model_downloads  # noqa: E402
from comfy_client import Server, output_images, output_texts, ui_to_api  # noqa: E402


def prepare_models(host: Path) -> None:
    """Generate the demo checkpoint and LoRAs into the host's models folder (once)."""
    subprocess.run([sys.executable, str(HERE / "make_fixtures.py"), "--models-dir", str(host / "models")],
                   check=True, env={**os.environ, "PYTHONPATH": str(host)}, stdout=subprocess.DEVNULL)


def demo_workflows() -> list[str]:
    """The example workflows that run on the generated models: every one that lists no download."""
    names = []
    for path in sorted((REPO / "example_workflows").glob("*.json")):
        if not model_downloads(json.loads(path.read_text())):
            names.append(path.stem)
    return names


def run_workflows(server: Server, names: list[str], out: Path, output_dir: Path) -> list[dict]:
    info = server.get("/object_info")
    results = []
    for name in names:
        workflow = json.loads((REPO / "example_workflows" / f"{name}.json").read_text())
        started = time.time()
        entry = server.run(ui_to_api(workflow, info))
        seconds = time.time() - started
        images = output_images(entry)
        if not images:
            raise RuntimeError(f"{name}: the workflow produced no image")
        copied = []
        for img in images:
            src = output_dir / img.get("subfolder", "") / img["filename"]
            dst = out / f"{name}.png"
            shutil.copyfile(src, dst)
            copied.append(dst)
        results.append({"workflow": name, "seconds": seconds, "images": copied, "report": output_texts(entry)})
    return results


LAB_MODELS = REPO / "quality" / "models"  # the quality lab's trained model and LoRAs, kept in the repository
LAB_COMPARE = "Quality lab - methods compared on the trained lab model"


def lab_paths(path: Path) -> Path | None:
    """An extra-model-paths file giving the demo server the lab's nodes, model and LoRAs (None: none kept)."""
    if not (LAB_MODELS / "lab_base.safetensors").is_file():
        return None
    from quality import lab

    return lab.server_paths(path, LAB_MODELS, LAB_MODELS / "loras")


def run_lab_compare(server: Server, out: Path, output_dir: Path) -> dict:
    """Compare Methods on the lab's trained model: pictures of a world the model learned, not noise."""
    from quality import evaluate

    composition = json.loads((LAB_MODELS / "demo.json").read_text())
    settings = evaluate.Settings(seed=composition["seed"])
    prompt = evaluate.with_defaults(evaluate.compare_prompt(composition["concepts"], settings, prefix="lab_compare"),
                                    server.get("/object_info"))
    started = time.time()
    entry = server.run(prompt)
    seconds = time.time() - started
    images = output_images(entry)
    if not images:
        raise RuntimeError(f"{LAB_COMPARE}: the workflow produced no image")
    dst = out / f"{LAB_COMPARE}.png"
    shutil.copyfile(output_dir / images[0].get("subfolder", "") / images[0]["filename"], dst)
    return {"workflow": LAB_COMPARE, "seconds": seconds, "images": [dst], "report": output_texts(entry),
            "about": f"prompt '{evaluate.prompt_text(composition['concepts'])}': {composition['why']}"}


def write_report(out: Path, results: list[dict], host: Path, version: str) -> Path:
    lines = ["# CMLoRA demo run", "",
             f"ComfyUI {version} at `{host}`, CPU, generated random-weight SD1.5-architecture checkpoint "
             "and LoRAs (so the images show the machinery, not a picture).", ""]
    for r in results:
        lines += [f"## {r['workflow']}", "", *([r["about"], ""] if r.get("about") else []),
                  f"- time: {r['seconds']:.1f} s (queued through /prompt)",
                  *[f"- image: `{p.name}`" for p in r["images"]], ""]
        for text in r["report"]:
            lines += ["```", text, "```", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Run the CMLoRA example workflows on a real ComfyUI server.")
    ap.add_argument("--host", type=Path, required=True, help="the ComfyUI folder (scripts/setup.sh prints it)")
    ap.add_argument("--workflow", action="append",
                    help="example workflow name, the file name without .json (repeatable); default: every example "
                         "that runs on the generated models")
    ap.add_argument("--out", type=Path, default=REPO / "demo_output")
    args = ap.parse_args(argv)
    names = args.workflow or demo_workflows()
    args.out.mkdir(parents=True, exist_ok=True)
    prepare_models(args.host)
    comfy_out = args.out / "comfy_output"
    lab = lab_paths(args.out / "lab_paths.yaml") if not args.workflow else None
    with Server(args.host, output_dir=comfy_out, log_path=args.out / "comfyui.log", extra_model_paths=lab) as server:
        version = server.get("/system_stats")["system"].get("comfyui_version", "?")
        results = run_workflows(server, names, args.out, comfy_out)
        if lab is not None:
            results.append(run_lab_compare(server, args.out, comfy_out))
    report = write_report(args.out, results, args.host, version)
    print(f"demo: {len(results)} workflows ran; images and report in {args.out} ({report.name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
