"""Generated bad input for every node of the pack, through the real server's /prompt.

One graph uses every node; each case changes one input of one pack node to a value that no
run may accept (wrong type, NaN/inf, out of range, unknown option, a path outside the loras
folder, a damaged or foreign file, a literal where a link belongs, a link of the wrong type).
Every case must end in the host's validation error or the pack's own error naming node,
input and fix — never a finished run (so never a NaN image) and never another exception.
The values are drawn with a fixed seed, so a failure reproduces.
"""
from __future__ import annotations

import copy
import json
import random
import re

import pytest

SEED = 20261123
PER_INPUT = 2  # values tried per input
CKPT = "cmlora_tiny_sd15.safetensors"
PACK_NODES = {"CMLoRA_LoraStack", "CMLoRA_StackFromLoraStack", "CMLoRA_ApplyClip", "CMLoRA_Apply", "CMLoRA_Sampler",
              "CMLoRA_Profiler", "CMLoRA_FrequencyScheduler", "CMLoRA_SaveProfile", "CMLoRA_LoadProfile",
              "CLoRA_AttentionMasker", "CLoRA_Masks", "CLoRA_SaveMasks", "CLoRA_LoadMasks", "CMLoRA_CompareMethods"}


def _graph(load_profile: bool) -> dict:
    """Every pack node in one small graph (64x64, 2 steps); every branch ends in an output node."""
    def n(cls, **inputs):
        return {"class_type": cls, "inputs": inputs}

    def stack(lora, concept, category="auto", prev=None):
        node = n("CMLoRA_LoraStack", lora_name=lora, strength_model=0.8, strength_clip=0.8, enabled=True,
                 category=category, concept=concept, trigger="")
        if prev:
            node["inputs"]["stack"] = [prev, 0]
        return node

    sampling = dict(seed=1, steps=2, cfg=5.0, sampler_name="euler", scheduler="normal")
    g = {
        "1": n("CheckpointLoaderSimple", ckpt_name=CKPT),
        "2": n("CLIPTextEncode", text="a cat and a dog", clip=["5", 0]),
        "3": n("CLIPTextEncode", text="blurry", clip=["1", 1]),
        "4": n("EmptyLatentImage", width=64, height=64, batch_size=1),
        "10": stack("test_kohya.safetensors", "cat", "character"),
        "11": stack("test_peft.safetensors", "dog", "object", prev="10"),
        "5": n("CMLoRA_ApplyClip", clip=["1", 1], stack=["11", 0]),
        # CMLoRA Apply + the stock KSampler
        "20": n("CMLoRA_Apply", model=["1", 0], stack=["11", 0], method="composite", switch_interval=1),
        "21": n("KSampler", model=["20", 0], positive=["2", 0], negative=["3", 0], latent_image=["4", 0],
                denoise=1.0, **sampling),
        "22": n("VAEDecode", samples=["21", 0], vae=["1", 2]),
        "23": n("SaveImage", images=["22", 0], filename_prefix="fuzz_apply"),
        # Profiler -> Scheduler -> CMLoRA Sampler; Save Profile
        "30": n("CMLoRA_Profiler", model=["1", 0], stack=["11", 0], positive=["2", 0], negative=["3", 0],
                latent_image=["4", 0], **sampling),
        "31": n("CMLoRA_FrequencyScheduler", profile=["30", 0], mode="offline", switch_interval=1, cache="deep",
                refresh="nonuniform", refresh_interval=2, h_to_l_fraction=0.5, online_threshold=0.5,
                w_dom="constant", dominant_full=True, preview_steps=4),
        "32": n("CMLoRA_Sampler", model=["1", 0], stack=["11", 0], method="cmlora", switch_interval=1,
                schedule=["31", 0], positive=["2", 0], negative=["3", 0], latent_image=["4", 0], denoise=1.0,
                **sampling),
        "33": n("VAEDecode", samples=["32", 0], vae=["1", 2]),
        "34": n("SaveImage", images=["33", 0], filename_prefix="fuzz_sampler"),
        "35": n("PreviewImage", images=["31", 1]),
        "36": n("CMLoRA_SaveProfile", profile=["30", 0], filename="fuzz"),
        # CLoRA
        "40": n("CLoRA_AttentionMasker", model=["1", 0], clip=["1", 1], stack=["11", 0], prompt="a cat and a dog",
                temperature=0.5, step_size=0.0, stop_fraction=0.5, extra_iterations=0, mask_threshold=0.4,
                attention="conditional", style_scope="global"),
        "41": n("KSampler", model=["40", 0], positive=["40", 1], negative=["3", 0], latent_image=["4", 0],
                denoise=1.0, **sampling),
        "42": n("CLoRA_Masks", model=["40", 0], samples=["41", 0], step=-1),
        "43": n("PreviewImage", images=["42", 1]),
        "44": n("CLoRA_SaveMasks", masks=["42", 0], filename="fuzz"),
        # Compare Methods
        "70": n("CMLoRA_CompareMethods", model=["1", 0], stack=["11", 0], positive=["2", 0], negative=["3", 0],
                latent_image=["4", 0], vae=["1", 2], methods="merge, composite", switch_interval=1, **sampling),
    }
    if load_profile:
        g["50"] = n("CMLoRA_LoadProfile", profile_file="fuzz.json")
        g["51"] = n("CMLoRA_FrequencyScheduler", profile=["50", 0], mode="async", switch_interval=1, cache="none",
                    refresh="uniform", refresh_interval=1, h_to_l_fraction=0.5, online_threshold=0.5,
                    w_dom="decay", dominant_full=False, preview_steps=4)
        g["52"] = n("PreviewImage", images=["51", 1])
        g["53"] = n("CLoRA_LoadMasks", masks_file="fuzz.safetensors")
        g["54"] = n("MaskPreview", mask=["53", 0])
    return g


LINK_LIST = [1, 2, 3]  # a list that is not a [node, slot] link
POOLS = {
    "INT": ["abc", "nan", 1e30, -1e30, LINK_LIST],
    "FLOAT": ["nan", "inf", "-inf", "abc", 1e300, -1e300, LINK_LIST],
    "BOOLEAN": [LINK_LIST],  # the host turns any other literal into true or false, both valid
    "STRING": ["a\x00b", "x" * 30_000, LINK_LIST],
    "COMBO": ["nope", "", "/proc/self/environ", "../../../../../../etc/hostname", "x" * 10_000, "a\x00b", 5,
              LINK_LIST],
    "LINK": ["literal", 5, 2.5, {"a": 1}, LINK_LIST, ["1", 2]],  # ["1", 2]: the checkpoint's VAE, a wrong type
}
FILES = {  # damaged, foreign or outside files for the file-name inputs
    "lora_name": ["test_not_a_lora.safetensors", "test_corrupt.safetensors", "test_sdxl_kohya.safetensors",
                  "../checkpoints/" + CKPT, "/etc/passwd"],
    "profile_file": ["../" + CKPT, "/etc/passwd"],
    "masks_file": ["../" + CKPT, "/etc/passwd"],
}


def _kind(spec) -> str:
    kind = spec[0]
    if isinstance(kind, list) or kind == "COMBO":
        return "COMBO"
    return kind if kind in POOLS else "LINK"


def _cases(graph: dict, object_info: dict) -> list[tuple[str, str, str, object]]:
    """(case id, node id, input, value): PER_INPUT drawn values for every input of every pack node."""
    rng = random.Random(SEED)
    cases = []
    for nid, node in sorted(graph.items()):
        cls = node["class_type"]
        if cls not in PACK_NODES:
            continue
        info = object_info[cls]["input"]
        for section in ("required", "optional"):
            for name, spec in info.get(section, {}).items():
                pool = FILES.get(name, []) + POOLS[_kind(spec)]
                if name == "images" or (_kind(spec) == "LINK" and name == "vae"):
                    pool = [v for v in pool if v != ["1", 2]]  # a VAE is the right type there
                for value in rng.sample(pool, min(PER_INPUT, len(pool))):
                    cases.append((f"{cls}.{name}={json.dumps(value)[:40]}", nid, name, value))
    # the LORA_STACK converter has no source among the host's nodes: its cases add it in front of the stack
    for value in ("a stack", 5, {"a": 1}, [["test_kohya.safetensors", 1.0, 1.0]], LINK_LIST):
        cases.append((f"CMLoRA_StackFromLoraStack.lora_stack={json.dumps(value)[:40]}", "60", "lora_stack", value))
    return cases


def _pack_error(message: str, display_names: set[str]) -> bool:
    m = re.match(r"\[([^\]]+)\] input '[^']+': .+ Fix: .+", message, re.S)
    return bool(m) and m.group(1) in display_names


@pytest.fixture(scope="module")
def fuzz_base(server):
    """The valid graph runs (so every case changes exactly one thing of a working workflow)."""
    kind, result = server.outcome(_graph(load_profile=False))
    assert kind == "ok", result
    graph = _graph(load_profile=True)
    kind, result = server.outcome(graph)
    assert kind == "ok", result
    return graph


def test_bad_input_never_runs_and_always_gets_a_clear_error(server, fuzz_base):
    info = server.get("/object_info")
    names = {info[c]["display_name"] for c in PACK_NODES}
    cases = _cases(fuzz_base, info)
    assert len(cases) > 150
    problems, counts = [], {"rejected": 0, "error": 0, "ok": 0}
    for case_id, nid, name, value in cases:
        graph = copy.deepcopy(fuzz_base)
        if nid == "60":
            graph["60"] = {"class_type": "CMLoRA_StackFromLoraStack", "inputs": {"lora_stack": value}}
            graph["10"]["inputs"]["stack"] = ["60", 0]
        else:
            graph[nid]["inputs"][name] = value
        kind, result = server.outcome(graph, timeout=300, poll=0.05)
        counts[kind] += 1
        if kind == "ok":
            problems.append(f"{case_id}: the run finished")
        elif kind == "error" and not _pack_error(result.get("exception_message", ""), names):
            problems.append(f"{case_id}: {result.get('node_type')} raised {result.get('exception_type')}: "
                            f"{result.get('exception_message', '')[:200]}")
    print(f"fuzz: {len(cases)} cases, {counts['rejected']} refused by the host's validation, {counts['error']} by "
          f"the pack's checks, {counts['ok']} finished")
    assert not problems, f"{len(problems)} of {len(cases)} cases:\n" + "\n".join(problems)
    # the server still answers and still runs the good graph
    assert server.get("/system_stats")
    assert server.get("/queue")["queue_running"] == []
    kind, result = server.outcome(fuzz_base)
    assert kind == "ok", result
