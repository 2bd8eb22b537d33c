"""What the ComfyUI frontend makes of the pack's nodes, read from the real server.

The frontend adds a "control after generate" widget after any INT input named ``seed`` or
``noise_seed`` unless its spec says ``control_after_generate``; that widget takes a slot in a
saved workflow's widgets_values. These tests hold the pack's node specs to the rule the
frontend bundles apply (``inputSpec.control_after_generate ?? ['seed', 'noise_seed'].includes(name)``).
"""
from __future__ import annotations

import ast
import re
import urllib.error
import urllib.parse
import urllib.request

from _host import REPO

PACK_PREFIXES = ("CMLoRA_", "CLoRA_")
SEED_NAMES = ("seed", "noise_seed")
# seeds that must not change between runs: the Profiler's profile is cached and saved per seed
FIXED_SEEDS = {("CMLoRA_Profiler", "seed")}


def _pack_nodes(info: dict) -> dict:
    return {k: v for k, v in info.items() if k.startswith(PACK_PREFIXES)}


def _inputs(node: dict):
    for section in ("required", "optional"):
        for name, spec in node["input"].get(section, {}).items():
            yield name, spec[0], (spec[1] if len(spec) > 1 else {})


def frontend_adds_control(name: str, kind, opts: dict) -> bool:
    """Whether the frontend puts a "control after generate" widget after this input."""
    if kind != "INT":
        return bool(opts.get("control_after_generate"))
    value = opts.get("control_after_generate")
    return bool(name in SEED_NAMES if value is None else value)


def test_profiler_seed_gets_no_control_widget(server):
    spec = server.get("/object_info/CMLoRA_Profiler")["CMLoRA_Profiler"]["input"]["required"]["seed"]
    assert spec[0] == "INT"
    # present and false: absent would let the frontend add the widget because of the name
    assert "control_after_generate" in spec[1] and spec[1]["control_after_generate"] is False
    assert not frontend_adds_control("seed", spec[0], spec[1])


def test_every_seed_of_the_pack_says_what_the_frontend_does_with_it(server):
    seeds = []
    for node_id, node in _pack_nodes(server.get("/object_info")).items():
        for name, kind, opts in _inputs(node):
            if kind == "INT" and name in SEED_NAMES:
                seeds.append((node_id, name))
                assert "control_after_generate" in opts, f"{node_id}.{name} leaves the control widget to the name rule"
                expected = (node_id, name) not in FIXED_SEEDS
                assert frontend_adds_control(name, kind, opts) is expected, f"{node_id}.{name}"
    assert ("CMLoRA_Profiler", "seed") in seeds and ("CMLoRA_Sampler", "seed") in seeds


# ---------------------------------------------------------------- help pages

def _fetch(server, path: str) -> tuple[int, str, str]:
    """(status, content type, text) of a GET on the server."""
    try:
        with urllib.request.urlopen(server.url + path, timeout=30) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read().decode("utf-8")
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), ""


def help_url(node_id: str, node: dict, locale: str = "en") -> str:
    """Where the frontend (1.32 and 1.49, nodeHelpService) first looks for a custom node's help:
    /extensions/<pack folder without an @version>/docs/<node id>/<locale>.md."""
    pack = node["python_module"].split(".")[1].split("@")[0]
    return f"/extensions/{pack}/docs/{node_id}/{locale}.md"


JARGON = ("reference code", "../shared", "N - 0.5", "the paper's code")


def test_every_node_has_a_help_page_listing_all_its_inputs_and_outputs(server):
    nodes = _pack_nodes(server.get("/object_info"))
    assert len(nodes) >= 11
    for node_id, node in nodes.items():
        status, kind, text = _fetch(server, help_url(node_id, node))
        assert status == 200 and "text/html" not in kind, f"{node_id}: {help_url(node_id, node)} gave {status} {kind}"
        assert text.startswith(f"# {node['display_name']}\n"), f"{node_id}: the page starts with another title"
        for name, _, _ in _inputs(node):
            assert f"| `{name}` |" in text, f"{node_id}: input {name} is not in the inputs table"
        for name in node["output_name"]:
            assert f"| `{name}` |" in text, f"{node_id}: output {name} is not in the outputs table"
        if not node["output_name"]:
            assert "## Outputs\n\nNone" in text, f"{node_id}: the page does not say the node has no outputs"
        for section in ("## Inputs", "## Outputs", "## Tips", "## Common errors"):
            assert section in text, f"{node_id}: no '{section}' section"
        for word in JARGON:
            assert word not in text, f"{node_id}: the page says '{word}'"


# ---------------------------------------------------------------- the report box (web/js/cmlora_reports.js)

JS = REPO / "web" / "js" / "cmlora_reports.js"


def _nodes_sending_text() -> set[str]:
    """Node ids of the pack's node classes whose code sends text to the frontend (ui PreviewText)."""
    found = set()
    for path in (REPO / "nodes").glob("*.py"):
        source = path.read_text()
        for cls in ast.walk(ast.parse(source)):
            if not isinstance(cls, ast.ClassDef):
                continue
            ids = [k.value.value for k in ast.walk(cls) if isinstance(k, ast.keyword) and k.arg == "node_id"
                   and isinstance(k.value, ast.Constant)]
            if ids and "PreviewText" in ast.get_source_segment(source, cls):
                found.add(ids[0])
    return found


def test_the_report_box_is_created_with_every_node_that_sends_text():
    listed = re.search(r"const REPORTING = \[(.*?)\];", JS.read_text(), re.S)
    assert listed, "no REPORTING list in cmlora_reports.js"
    names = set(re.findall(r'"([A-Za-z_]+)"', listed.group(1)))
    senders = _nodes_sending_text()
    assert {"CMLoRA_Sampler", "CMLoRA_LoraStack", "CMLoRA_SaveProfile", "CLoRA_Masks"} <= senders
    # Nodes 2.0 of frontend 1.32 draws only widgets that exist when the node is set up
    assert senders <= names, f"nodes that send text but get no report box at creation: {senders - names}"


def test_the_extension_is_served_and_its_imports_resolve(server):
    listed = server.get("/extensions")
    path = "/extensions/comfyui_cmlora/js/cmlora_reports.js"
    assert path in listed
    status, _, text = _fetch(server, path)
    assert status == 200 and text == JS.read_text()
    imports = re.findall(r'^import .* from "([^"]+)";', text, re.M)
    assert imports
    for target in imports:
        url = urllib.parse.urljoin(server.url + path, target)
        status, _, module = _fetch(server, urllib.parse.urlparse(url).path)
        assert status == 200 and "export const" in module, f"{target} resolves to {url}, which is not served"
