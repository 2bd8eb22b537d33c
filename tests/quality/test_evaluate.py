"""The lab's evaluation without a host: compositions, prompts, the measures and the report, checked against
figures worked out by hand or from published tables, and on the world's own clean renders."""
from __future__ import annotations

import random

import pytest

from quality import detect, evaluate, lab, report, world
from quality.evaluate import Job, Outcome, Settings


def test_compositions_are_composlora_style_and_deterministic():
    combos = evaluate.compositions(per_size=3, sizes=range(2, 6), seed=0)
    assert [len(c) for c in combos] == [2] * 3 + [3] * 3 + [4] * 3 + [5] * 3
    assert len(set(combos)) == 12
    for combo in combos:
        categories = [world.concept_category(n) for n in combo]
        assert categories[0] == "character" and len(set(categories)) == len(combo)
        assert categories == sorted(categories, key=world.CATEGORIES.index)
    assert evaluate.compositions(per_size=3, seed=0) == combos
    assert evaluate.compositions(per_size=3, seed=1) != combos


@pytest.mark.parametrize("bad, words", [([], "non-empty list"), ("orb", "non-empty list"), ([1, 2], "non-empty list"),
                                        (["orb", "nope"], "no concept named 'nope'"),
                                        (["orb", "block"], "two character concepts")])
def test_a_bad_composition_is_named(bad, words):
    with pytest.raises((ValueError, KeyError), match=words):
        evaluate.check_composition(bad)


def test_wilson_interval_matches_published_values():
    # 95% Wilson score intervals as tabulated (Newcombe 1998, Table I: 81/263 -> 0.2553..0.3662; 0/20 -> 0..0.1611)
    assert evaluate.wilson(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    assert evaluate.wilson(0, 20) == pytest.approx((0.0, 0.1611), abs=1e-4)
    assert evaluate.wilson(20, 20) == pytest.approx((0.8389, 1.0), abs=1e-4)


def _outcome(concepts, method, scenes) -> Outcome:
    return Outcome(Job(tuple(concepts), method), [world.render(s) for s in scenes], seconds=2.0)


def test_measures_on_clean_renders():
    """Renders of the whole composition are read entirely right; renders that drop one concept of three in
    half the images give recall 5/6 and all-concepts 1/2 (worked out by hand)."""
    combo = ("spike", "stripes", "sea")
    full = [world.Scene.of(combo, seed=s) for s in range(4)]
    partial = full[:2] + [world.Scene.of(("spike", "stripes"), seed=s) for s in (2, 3)]
    measured = evaluate.measure([_outcome(combo, "merge", full), _outcome(combo, "switch", partial)])
    merge, switch = measured["merge"]["3"], measured["switch"]["3"]
    assert merge["recall"] == 1.0 and merge["all_concepts"] == 1.0 and merge["images"] == 4
    assert merge["fidelity"] >= 0.95
    assert switch["recall"] == round(10 / 12, 4) and switch["all_concepts"] == 0.5
    assert switch["fidelity"] < merge["fidelity"]
    assert merge["seconds_per_image"] == 0.5  # 2 s for 4 images


@pytest.mark.parametrize("category", world.CATEGORIES)
def test_confidence_is_high_on_a_render_and_low_without_the_concept(category):
    rng = random.Random(7)
    for name in world.CONCEPTS[category]:
        for _ in range(3):
            seed = rng.randrange(2**31)
            shown = world.render(world.Scene.of([name], seed=seed))
            # without it: the world's default for the category (or, for the character, another character)
            other = {"character": [c for c in world.CONCEPTS["character"] if c != name][0]}.get(category)
            missing = world.render(world.Scene.of([other] if other else [], seed=seed))
            assert detect.confidence(shown, {category: name}) >= 0.8, (name, seed)
            assert detect.confidence(missing, {category: name}) < 0.5, (name, seed)


def test_missing_widgets_take_the_nodes_defaults():
    info = {"Node": {"input": {"required": {
        "given": ["INT", {"default": 3}], "number": ["FLOAT", {"default": 0.5}],
        "v1_combo": [["a", "b"], {}], "v3_combo": ["COMBO", {"options": ["x", "y"]}],
        "v3_default": ["COMBO", {"options": ["x", "y"], "default": "y"}], "link": ["MODEL"]}}}}
    prompt = {"1": {"class_type": "Node", "inputs": {"given": 9, "link": ["0", 0]}}}
    filled = evaluate.with_defaults(prompt, info)["1"]["inputs"]
    assert filled == {"given": 9, "link": ["0", 0], "number": 0.5, "v1_combo": "a", "v3_combo": "x", "v3_default": "y"}
    assert prompt["1"]["inputs"] == {"given": 9, "link": ["0", 0]}  # the prompt given is not changed


def test_prompts_use_the_pack_nodes_per_method():
    combo = ("orb", "dots", "hatch", "box")
    settings = Settings(seeds=5)
    for method in evaluate.METHODS:
        p = evaluate.build_prompt(Job(combo, method), settings)
        kinds = [n["class_type"] for n in p.values()]
        stacks = [n for n in p.values() if n["class_type"] == "CMLoRA_LoraStack"]
        assert p["lab"]["inputs"]["batch_size"] == 5
        assert kinds.count("SaveImage") == 1
        if method == "base":
            assert not stacks and "KSampler" in kinds
            continue
        assert [s["inputs"]["lora_name"] for s in stacks] == [f"lab_{c}.safetensors" for c in combo]
        masked = [s["inputs"]["concept"] for s in stacks if "mask" in s["inputs"]]
        assert masked == (["orb", "dots", "box"] if method == "regions" else [])
        categories = {s["inputs"]["concept"]: s["inputs"]["category"] for s in stacks}
        assert categories == ({c: "auto" for c in combo} if method == "cmlora"
                              else {"orb": "character", "dots": "clothing", "hatch": "style", "box": "object"})
        if method == "clora":
            assert p["clora"]["inputs"]["prompt"] == "orb character wearing dots clothes with a box, hatch style"
        else:
            assert p["pos"]["inputs"]["text"] == ("laborbx orb character wearing labdotx dots clothes with a "
                                                  "labboxx box, labhatx hatch style")
        assert ("CMLoRA_Profiler" in kinds) == (method == "cmlora")


def test_profile_split_against_the_world():
    def profile(sets):
        return {"loras": [{"name": f"lab_{n}.safetensors", "measured_set": s} for n, s in sets.items()]}

    outcomes = [Outcome(Job(("orb", "sea"), "cmlora"), [], 1.0, profile({"orb": "H", "sea": "L"})),
                Outcome(Job(("orb", "sea"), "cmlora"), [], 1.0, profile({"orb": "H", "sea": "H"})),
                Outcome(Job(("orb", "meadow"), "cmlora"), [], 1.0, profile({"orb": "L", "meadow": "H"}))]
    split = evaluate.profile_split(outcomes)
    assert split["orb"] == {"expected": "H", "measured_high_share": round(2 / 3, 3), "profiles": 3, "agrees": True}
    assert split["sea"]["agrees"] is False and split["sea"]["measured_high_share"] == 0.5
    assert split["meadow"] == {"expected": "L", "measured_high_share": 1.0, "profiles": 1, "agrees": False}


def test_the_report_states_the_validation_first(tmp_path):
    methods = {"merge": {"2": {"recall": 0.9, "recall_ci": (0.8, 0.95), "all_concepts": 0.8, "all_concepts_ci": (0.6, 0.9),
                               "fidelity": 0.7, "fidelity_ci": (0.65, 0.75), "images": 20, "seconds_per_image": 0.3},
                         "5": {"recall": 0.5, "recall_ci": (0.4, 0.6), "all_concepts": 0.1, "all_concepts_ci": (0.0, 0.3),
                               "fidelity": 0.4, "fidelity_ci": (0.35, 0.45), "images": 20, "seconds_per_image": 0.5}}}
    results = {"settings": Settings().__dict__, "compositions": [["orb", "red"]], "methods": methods,
               "validation": {"detectors_on_held_out_renders": {"character": 1.0}, "lora_alone_shows_its_concept": {"orb": 0.95},
                              "base_alone_shows_the_concept": {"orb": 0.2}, "merge_recall_by_n": {"2": 0.9, "5": 0.5},
                              "holds": {"detectors": True, "each_lora_alone": True, "base_alone": False,
                                        "merge_loses_concepts": True}},
               "profile_split": {}, "figures": {"evaluation_minutes": 3.5}}
    paths = report.write(tmp_path, results)
    text = (tmp_path / "QUALITY.md").read_text()
    assert [p.name for p in paths] == ["QUALITY.md", "results.json", "recall.png"]
    assert text.index("validates itself") < text.index("Methods compared")
    assert "| the base model with the same prompt (<= 10%) | max 20% | **does not hold** |" in text
    assert "| merge | 5 | 0.50 [0.40, 0.60] | 0.10 [0.00, 0.30] | 0.40 [0.35, 0.45] | 0.5 |" in text
    comparable = report.comparable(results)
    assert "figures" not in comparable and "seconds_per_image" not in comparable["methods"]["merge"]["2"]
    assert results["methods"]["merge"]["2"]["seconds_per_image"] == 0.3  # the results given are not changed


def test_recipes_name_their_files():
    recipe = lab.Recipe()
    assert lab.Recipe(lora_steps=300).base_digest() == recipe.base_digest()
    assert lab.Recipe(lora_steps=300).digest() != recipe.digest()
    assert lab.Recipe(base_steps=10).base_digest() != recipe.base_digest()
