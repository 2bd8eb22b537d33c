"""The example workflows in example_workflows/ (written by scripts/build_workflows.py), on the real server.

The template browser shows these files to artists, the demo runs them, and the frontend
loads their widget values by position, so each must: be what the build script writes; save
its widget values in the layout the frontend saves for the node's /object_info; link outputs
to inputs of the same type; run with what its own graph says it makes (check_demo_run,
check_real_use_run); and (the real-use ones) name the checkpoint to download and LoRAs to replace.

Each example runs once per host: from the frontend in test_browser.py, which makes the same checks
of its run, where a browser exists (always in CI); through /prompt here only where none does.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _host import REPO, browser_missing

sys.path.insert(0, str(REPO / "scripts"))
from comfy_client import output_images, output_texts, ui_to_api  # noqa: E402

EXAMPLES = REPO / "example_workflows"
FILES = sorted(EXAMPLES.glob("*.json"))
FRONTEND_ONLY = {"MarkdownNote", "Note"}  # notes the frontend draws; the server has no such node
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
DEMO_SIZE = 64  # pixels: the demo examples' image size
DEMO_CLORA_STEPS, DEMO_CLORA_EXTRA_ITERATIONS = 6, 3  # the CLoRA demo's
DEMO_CMLORA_STEPS = 8  # the real-use CMLoRA example's profiler, scheduler preview and sampler steps on the demo files
# where each of those nodes saves its steps in widgets_values
STEPS_WIDGET = {"CMLoRA_Profiler": 1, "CMLoRA_FrequencyScheduler": 9, "CMLoRA_Sampler": 4}
OUTPUT_NODES = {"SaveImage", "PreviewImage", "MaskPreview", "CMLoRA_CompareMethods"}


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def downloads(workflow: dict) -> list[dict]:
    """The models a workflow lists for the frontend to download (`properties.models`)."""
    return [m for n in workflow["nodes"] for m in (n.get("properties") or {}).get("models") or []]


DEMO = [p for p in FILES if not downloads(load(p))]
REAL = [p for p in FILES if downloads(load(p))]


def ids(paths):
    return [p.stem for p in paths]


def with_demo_files(workflow: dict) -> dict:
    """A real-use example with the generated demo files in place of what the artist downloads: the SD1.5
    demo checkpoint for its checkpoint, the demo LoRAs (in order) for its YOUR_... placeholders, and the
    demo's 64-pixel image (the demo checkpoint has SD1.5's full-size UNet: 512 pixels took over ten
    minutes on two CPU cores); with CLoRA also the demo's steps and extra iterations (its latent updates
    differentiate through the full-size UNet: the example's 30 steps and 20 extra iterations ran at
    minutes per step here); with the CMLoRA Sampler the steps of its profiler, scheduler preview and
    sampler cut from 20 to DEMO_CMLORA_STEPS (the profiler samples every LoRA over all of them).
    Every other node, link and value as saved. The SDXL example's graph thus
    runs on an SD1.5 model: the fixtures make no full SDXL checkpoint (both text encoders at full size),
    and CLoRA on an SDXL UNet is tested in tests/host/test_interop.py."""
    import build_workflows

    workflow = json.loads(json.dumps(workflow))
    demo_loras = iter(lora.file for lora in build_workflows.DEMO_LORAS)
    for node in workflow["nodes"]:
        if (node.get("properties") or {}).pop("models", None):
            node["widgets_values"][0] = build_workflows.DEMO_CKPT
        if node["type"] == "CMLoRA_LoraStack" and node["widgets_values"][0].startswith("YOUR_"):
            node["widgets_values"][0] = next(demo_loras)
        if node["type"] == "EmptyLatentImage":
            node["widgets_values"][:2] = [DEMO_SIZE, DEMO_SIZE]
    masker = [n for n in workflow["nodes"] if n["type"] == "CLoRA_AttentionMasker"]
    if masker:  # CLoRA's updates differentiate through the UNet: the demo's steps and extra iterations
        masker[0]["widgets_values"][4] = DEMO_CLORA_EXTRA_ITERATIONS
        for node in workflow["nodes"]:
            if node["type"] == "KSampler":
                node["widgets_values"][2] = DEMO_CLORA_STEPS
    if any(n["type"] == "CMLoRA_Sampler" for n in workflow["nodes"]):
        for node in workflow["nodes"]:
            if node["type"] in STEPS_WIDGET:
                at = STEPS_WIDGET[node["type"]]
                assert node["widgets_values"][at] == 20, (node["type"], node["widgets_values"])  # the saved steps
                node["widgets_values"][at] = DEMO_CMLORA_STEPS
    return workflow


def frontend_widgets(info: dict) -> list[tuple[str, str, dict]]:
    """(name, kind, options) of each value the frontend saves in widgets_values for a node of
    this /object_info entry, in order: one per widget input (required, then optional, in
    input_order), and a 'control after generate' value after an INT or COMBO that asks for
    one — or an INT named seed / noise_seed that does not say (the frontends' rule)."""
    out = []
    order = info.get("input_order", {})
    for section in ("required", "optional"):
        for name in order.get(section) or list(info["input"].get(section, {})):
            spec = info["input"][section][name]
            kind = "COMBO" if isinstance(spec[0], list) else spec[0]
            opts = spec[1] if len(spec) > 1 else {}
            if kind not in WIDGET_TYPES or opts.get("forceInput"):
                continue
            if isinstance(spec[0], list):
                opts = dict(opts, options=spec[0])
            out.append((name, kind, opts))
            control = opts.get("control_after_generate")
            if control is None:
                control = kind == "INT" and name in ("seed", "noise_seed")
            if control and kind in ("INT", "COMBO"):
                out.append((f"{name} (control after generate)", "CONTROL", {}))
    return out


@pytest.fixture(scope="module")
def object_info(server):
    return server.get("/object_info")


def test_every_example_has_a_thumbnail_and_the_demo_and_real_use_kinds_exist():
    assert DEMO and REAL, f"demo examples {ids(DEMO)}, real-use examples {ids(REAL)}"
    for path in FILES:
        assert path.with_suffix(".jpg").exists(), f"{path.name} has no thumbnail"


def test_examples_are_what_the_build_script_writes(tmp_path):
    import build_workflows

    build_workflows.write(tmp_path)
    fresh = sorted(p.name for p in tmp_path.iterdir())
    assert fresh == sorted(p.name for p in EXAMPLES.iterdir()), "run: python scripts/build_workflows.py"
    for name in fresh:
        if name.endswith(".json"):
            assert (tmp_path / name).read_text() == (EXAMPLES / name).read_text(), \
                f"{name} differs from what scripts/build_workflows.py writes; run it"
        else:  # the same drawing, JPEG-encoded here and when committed
            a = np.asarray(Image.open(tmp_path / name).convert("RGB"), dtype=np.float32)
            b = np.asarray(Image.open(EXAMPLES / name).convert("RGB"), dtype=np.float32)
            assert a.shape == b.shape and np.abs(a - b).mean() < 1.0, f"{name} is not the script's drawing"


def test_thumbnails_tell_the_examples_apart():
    """No two thumbnails alike (the template browser showed seven near-identical noise images):
    somewhere in every pair, an eighth of the picture differs by 20 grey levels on average."""
    pics = {p.stem: np.asarray(Image.open(p.with_suffix(".jpg")).convert("L").resize((64, 64)), dtype=np.float32)
            for p in FILES}
    names = sorted(pics)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            blocks = np.abs(pics[a] - pics[b]).reshape(8, 8, 8, 8).mean(axis=(1, 3))
            assert blocks.max() > 20.0, f"thumbnails of {a!r} and {b!r} differ by at most {blocks.max():.1f} grey levels"


@pytest.mark.parametrize("path", FILES, ids=ids(FILES))
def test_widget_values_are_saved_as_the_frontend_saves_them(object_info, path):
    workflow = load(path)
    for node in workflow["nodes"]:
        where = f"{path.stem}: node {node['id']} ({node['type']})"
        if node["type"] in FRONTEND_ONLY:
            assert len(node["widgets_values"]) == 1 and isinstance(node["widgets_values"][0], str), where
            continue
        assert node["type"] in object_info, f"{where}: the server has no such node"
        expected = frontend_widgets(object_info[node["type"]])
        values = node.get("widgets_values") or []
        assert len(values) == len(expected), \
            f"{where}: {len(values)} widget values for the frontend's {[n for n, _, _ in expected]}"
        for (name, kind, opts), value in zip(expected, values):
            what = f"{where}, widget {name}: {value!r}"
            if kind == "CONTROL":
                assert value in CONTROL_VALUES, what
            elif kind == "COMBO":
                options = opts.get("options", [])
                if path in DEMO or value in options:
                    assert value in options, f"{what} is not one of its options"
                else:  # real-use files name models this machine does not have
                    assert name in ("ckpt_name", "lora_name"), f"{what} is not one of its options"
            elif kind == "INT":
                assert isinstance(value, int) and not isinstance(value, bool), what
                assert opts.get("min", value) <= value <= opts.get("max", value), what
            elif kind == "FLOAT":
                assert isinstance(value, (int, float)) and not isinstance(value, bool), what
                assert opts.get("min", value) <= value <= opts.get("max", value), what
            elif kind == "BOOLEAN":
                assert isinstance(value, bool), what
            else:
                assert isinstance(value, str), what


@pytest.mark.parametrize("path", FILES, ids=ids(FILES))
def test_links_join_outputs_and_inputs_of_one_type(object_info, path):
    workflow = load(path)
    nodes = {n["id"]: n for n in workflow["nodes"]}
    for link_id, src, slot, dst, dst_slot, type_ in workflow["links"]:
        source, target = nodes[src], nodes[dst]
        assert object_info[source["type"]]["output"][slot] == type_, f"{path.stem}: link {link_id}"
        assert source["outputs"][slot]["type"] == type_ and link_id in source["outputs"][slot]["links"]
        socket = target["inputs"][dst_slot]
        assert socket["link"] == link_id and "widget" not in socket, f"{path.stem}: link {link_id}"
        schema = object_info[target["type"]]["input"]
        spec = {**schema.get("required", {}), **schema.get("optional", {})}[socket["name"]]
        assert spec[0] == type_, f"{path.stem}: link {link_id} brings {type_} to {target['type']}.{socket['name']}"


def check_demo_run(server, workflow: dict, entry: dict) -> None:
    """What a demo example's run (its history entry) must show: every output node showed or saved its
    images, at the graph's size; the CMLoRA Sampler's report names its method, LoRAs (and the
    schedule's mode and cache); CLoRA's masks come one per subject LoRA. Made on the browser's run
    (test_browser.py) where a browser exists, else on a run through /prompt (below)."""
    by_type = {}
    for node in workflow["nodes"]:
        by_type.setdefault(node["type"], []).append(node)
    # every output node of the graph showed or saved its images
    for node in workflow["nodes"]:
        if node["type"] in OUTPUT_NODES:
            assert entry["outputs"].get(str(node["id"]), {}).get("images"), f"{node['type']} {node['id']} got no image"
    assert output_images(entry), "no image saved"
    width, height, _ = by_type["EmptyLatentImage"][0]["widgets_values"]
    links = {link[0]: link for link in workflow["links"]}
    nodes = {n["id"]: n for n in workflow["nodes"]}
    for save in by_type["SaveImage"]:
        (image,) = entry["outputs"][str(save["id"])]["images"]
        size = Image.open(server.output_dir_path / image.get("subfolder", "") / image["filename"]).size
        source = nodes[links[save["inputs"][0]["link"]][1]]
        if source["type"] == "VAEDecode":  # the sampled image, at the latent's size
            assert size == (width, height)
        else:  # Compare Methods' grid: a tile per method side by side, labels below
            n_methods = len(source["widgets_values"][6].split(","))
            assert source["type"] == "CMLoRA_CompareMethods" and size[0] >= n_methods * width and size[1] > height
    for sampler in by_type.get("CMLoRA_Sampler", []):
        method = sampler["widgets_values"][0]
        n_loras = len(by_type["CMLoRA_LoraStack"])
        reports = [t for t in output_texts(entry) if t.startswith("method ")]
        assert reports and reports[0].startswith(f"method {method}, {n_loras} LoRAs"), reports
        if method == "cmlora":
            mode = by_type["CMLoRA_FrequencyScheduler"][0]["widgets_values"][0]
            assert f"({mode}, cache deep)" in reports[0] and "x the model FLOPs of merge" in reports[0]
    if "CLoRA_Masks" in by_type:  # one mask per subject LoRA (the style one has none)
        preview = next(n for n in workflow["nodes"] if n["type"] == "MaskPreview")
        subjects = [n for n in by_type["CMLoRA_LoraStack"] if n["widgets_values"][4] != "style"]
        assert len(entry["outputs"][str(preview["id"])]["images"]) == len(subjects)


def check_real_use_run(server, workflow: dict, entry: dict) -> None:
    """What a real-use example's run on the demo files (``workflow`` is with_demo_files' copy) must
    show: its one saved image at the demo's size, and what its graph previews (the SD1.5 one's CMLoRA
    report and schedule timeline; the SDXL one's CLoRA overlay and a mask per subject)."""
    assert not downloads(workflow)
    (image,) = output_images(entry)
    assert Image.open(server.output_dir_path / image.get("subfolder", "") / image["filename"]).size == (DEMO_SIZE,) * 2
    types = {n["type"] for n in workflow["nodes"]}
    if "CMLoRA_Sampler" in types:  # SD1.5: profiler, scheduler, CMLoRA Sampler
        reports = [t for t in output_texts(entry) if t.startswith("method ")]
        assert reports and reports[0].startswith(f"method cmlora, 3 LoRAs, {DEMO_CMLORA_STEPS} steps"), reports
        assert len(output_images(entry, "temp")) == 1  # the schedule timeline preview
    else:  # SDXL: CLoRA with two subjects; the overlay and one mask per subject
        assert "CLoRA_AttentionMasker" in types
        assert len(output_images(entry, "temp")) == 1 + 2


def skip_where_the_browser_runs_it():
    """Each example runs once per host: from the frontend (test_browser.py) where a browser exists,
    through /prompt only where none does (a machine without Debian's chromium)."""
    if browser_missing() is None:
        pytest.skip("run from the frontend, with the same checks, in test_browser.py")


@pytest.mark.parametrize("path", DEMO, ids=ids(DEMO))
def test_demo_example_runs_through_prompt_api(server, object_info, path):
    skip_where_the_browser_runs_it()
    workflow = load(path)
    check_demo_run(server, workflow, server.run(ui_to_api(workflow, object_info)))


@pytest.mark.parametrize("path", REAL, ids=ids(REAL))
def test_real_use_example_offers_its_checkpoint_and_names_placeholder_loras(path):
    workflow = load(path)
    (loader,) = [n for n in workflow["nodes"] if n["type"] == "CheckpointLoaderSimple"]
    (model,) = loader["properties"]["models"]
    # the fields and match both frontends read: a listed model whose name is the widget's value
    assert model["name"] == loader["widgets_values"][0] and model["directory"] == "checkpoints"
    assert model["url"].startswith("https://huggingface.co/") and model["name"] in model["url"]
    loras = [n["widgets_values"][0] for n in workflow["nodes"] if n["type"] == "CMLoRA_LoraStack"]
    assert loras and all(name.startswith("YOUR_") for name in loras), loras
    notes = " ".join(n["widgets_values"][0] for n in workflow["nodes"] if n["type"] == "MarkdownNote")
    assert "YOUR_" in notes and model["name"] in notes and "concept" in notes


@pytest.mark.parametrize("path", REAL, ids=ids(REAL))
def test_real_use_example_runs_with_the_demo_files(server, object_info, path):
    """The example as saved (with_demo_files says what it changes) on the demo checkpoint and LoRAs: the
    prompt validates and runs, and what its graph shows comes out."""
    skip_where_the_browser_runs_it()
    workflow = with_demo_files(load(path))
    check_real_use_run(server, workflow, server.run(ui_to_api(workflow, object_info)))


def test_demo_runs_the_demo_examples_only():
    import demo

    assert demo.demo_workflows() == ids(DEMO)
