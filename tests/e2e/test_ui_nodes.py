"""What the ComfyUI frontend makes of the pack's nodes, read from the real server.

The frontend adds a "control after generate" widget after any INT input named ``seed`` or
``noise_seed`` unless its spec says ``control_after_generate``; that widget takes a slot in a
saved workflow's widgets_values. These tests hold the pack's node specs to the rule the
frontend bundles apply (``inputSpec.control_after_generate ?? ['seed', 'noise_seed'].includes(name)``).
"""
from __future__ import annotations

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
