"""Every example workflow, run from ComfyUI's own frontend in a real browser, as an artist would.

For each example_workflows/*.json, in the Nodes 2.0 view (setting Comfy.VueNodes.Enabled) and in the
classic (LiteGraph canvas) view: the frontend the server ships loads the workflow
(app.loadGraphData), builds the prompt (app.graphToPrompt) and queues it the way the Run button
does (app.queuePrompt(0, 1): the Comfy.QueuePrompt command behind the Run button calls exactly that
in frontends 1.32.9 and 1.49.6). Then:
  * the server accepted the prompt the frontend built (no validation error: a widget value loaded
    into the wrong slot shows here, e.g. "Failed to convert an input value to a FLOAT value: cfg, euler");
  * the run finished without an execution error and saved an image;
  * every pack node that reported text (the CMLoRA Sampler's report, the stack's format line, ...)
    shows that text on the node: in one of its widgets and in what the page draws (the node's element
    in Nodes 2.0, the widget's DOM textarea in the classic view).

Each example runs once (a CPU run is the slow part), in one page that the examples share, loaded one
after another as an artist opens workflows (a page is reopened after an example that failed, so a
broken page never spills into the next). For each: the view is set to Nodes 2.0 (the page starts
there; later examples switch back to it with the frontend's own setting), the example runs and its
reports are checked; then the classic view, switched to with the same setting (the reports must
still show), loads the workflow again and queues it from there (the server answers from its cache,
so this second run is about the prompt the classic view builds). The two frontend versions differ:
features are detected in the page, versions are never compared.

Screenshots of each workflow x view are kept in test-artifacts/browser/comfyui-<version>/ (printed at
the end of the run), with the page's console log (<workflow>.console.log). Examples that name real
checkpoints (a node lists weights to download in `properties.models`, as ComfyUI's own templates do)
cannot run here as saved: each is loaded and converted as saved, then run with the generated demo
checkpoint and LoRAs in place of its download and its YOUR_... placeholders, at the demo's 64 pixels
(test_examples.with_demo_files; the SDXL example's graph runs on the SD1.5 demo model).
"""
from __future__ import annotations

import json
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import pytest

from _host import REPO

sys.path.insert(0, str(REPO / "scripts"))
from comfy_client import output_images  # noqa: E402
from test_examples import check_demo_run, check_real_use_run, with_demo_files  # noqa: E402

try:
    from playwright.sync_api import TimeoutError as PageTimeout
except ImportError:  # the browser fixture skips or fails with the reason
    PageTimeout = TimeoutError

WORKFLOWS = sorted((REPO / "example_workflows").glob("*.json"))
OURS = ("CMLoRA_", "CLoRA_")

PAGE_TIMEOUT_MS = 120_000  # the frontend's start, a load, a view switch, on a busy 2-core machine
RUN_TIMEOUT_MS = 600_000  # one example on the CPU (tiny random models; a run from the cache is instant)
SHOW_TIMEOUT_MS = 20_000  # a report reaching the node after the run's end

# Settings the page starts with. The server's settings file is never touched: the page's
# /api/settings requests are answered by the test (see open_frontend).
START_SETTINGS = {
    "Comfy.VueNodes.Enabled": True,  # start in Nodes 2.0
    # no template browser / getting-started panel on a first start (both frontends check this first)
    "Comfy.TutorialCompleted": True,
    "Comfy.Minimap.Visible": False,  # keeps the corner of the screenshots clear
}
# 1.32.9's "Introducing Nodes 2.0" banner remembers its dismissal in local storage
INIT_SCRIPT = "try { localStorage.setItem('vueNodesBannerDismissed', 'true'); } catch (e) {}"


def needs_real_weights(workflow: dict) -> list[str]:
    """The model files a workflow asks the artist to download: the frontend's model metadata,
    `properties.models` = [{name, url, directory}] on a node (also inside subgraphs). The demo
    examples use the generated random-weight models and list none."""
    nodes = list(workflow.get("nodes", []))
    for sub in (workflow.get("definitions") or {}).get("subgraphs") or []:
        nodes += sub.get("nodes", [])
    return [m.get("name", "?") for n in nodes for m in (n.get("properties") or {}).get("models") or []]


def open_frontend(browser, server, log: list[str]):
    """A fresh context (own storage) and page on the server's frontend, started in Nodes 2.0."""
    settings = dict(START_SETTINGS)

    def settings_api(route, request):
        # GET /api/settings(/<id>) reads these settings; POSTs change them for this page only
        path = urlparse(request.url).path
        setting = path[len("/api/settings/"):] if path.startswith("/api/settings/") else None
        if request.method == "GET":
            route.fulfill(json=settings.get(setting) if setting else settings)
            return
        body = json.loads(request.post_data or "null")
        if setting:
            settings[setting] = body
        elif isinstance(body, dict):
            settings.update(body)
        route.fulfill(json={})

    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    context.set_default_timeout(PAGE_TIMEOUT_MS)
    context.add_init_script(INIT_SCRIPT)
    context.route("**/api/settings", settings_api)
    context.route("**/api/settings/*", settings_api)
    page = context.new_page()
    page.on("console", lambda m: log.append(f"console.{m.type}: {m.text}"))
    page.on("pageerror", lambda e: log.append(f"pageerror: {e}"))
    page.goto(server.url)
    # started: the app, its canvas and settings exist and the start-up graph is loaded
    # (a workflow loaded earlier could be replaced by the start-up load)
    page.wait_for_function("() => window.app?.canvas && app.extensionManager?.setting && app.graph?.nodes?.length > 0")
    page.evaluate("""() => {
        // the frontend's own event stream: the end of each prompt as the page sees it
        window.__cmloraRun = {};
        for (const type of ["execution_success", "execution_error", "execution_interrupted"])
            app.api.addEventListener(type, (e) => { window.__cmloraRun[e.detail.prompt_id] = {type, ...e.detail}; });
    }""")
    return context, page


def set_view(page, vue: bool):
    """Switch the view with the frontend's setting (what its settings dialog and banner do) and wait
    until it is drawn: every node an element in Nodes 2.0, none in the classic view."""
    page.evaluate("(vue) => app.extensionManager.setting.set('Comfy.VueNodes.Enabled', vue)", vue)
    wait_for_view(page, vue)


def wait_for_view(page, vue: bool):
    now = page.evaluate("() => app.extensionManager.setting.get('Comfy.VueNodes.Enabled')")
    assert now is vue, f"Comfy.VueNodes.Enabled is {now}, wanted {vue}"
    page.wait_for_function(
        "(vue) => { const n = document.querySelectorAll('[data-node-id]').length;"
        " return vue ? n >= app.graph.nodes.length : n === 0; }", arg=vue)


def post(server, path: str, data: dict):
    req = urllib.request.Request(server.url + path, data=json.dumps(data).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30):
        pass


def forget_results(server):
    """Empty the server's cache of node results, as the frontend's 'Free model and node cache' does
    (POST /free), so the next prompt runs every node (an earlier test may have run the same prompt).
    The server applies the request after the next prompt it runs (an idle queue waits without
    looking), so a one-node prompt follows it; the cache is empty when that one has run."""
    post(server, "/free", {"unload_models": False, "free_memory": True})
    server.run({"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
                "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}, poll=0.05)


def load_and_convert(page, workflow: dict, vue: bool) -> dict:
    """Load the workflow in the page and return the frontend's prompt for it (graphToPrompt's output)."""
    page.evaluate("(wf) => app.loadGraphData(wf)", workflow)
    loaded = page.evaluate("() => app.graph.nodes.map((n) => String(n.id)).sort()")
    assert loaded == sorted(str(n["id"]) for n in workflow["nodes"]), "the page's graph is not the workflow's"
    wait_for_view(page, vue)
    prompt = page.evaluate("async () => (await app.graphToPrompt()).output")
    # the nodes that run: not frontend-only (notes, reroutes), not muted (2) or bypassed (4)
    runnable = set(page.evaluate(
        "() => app.graph.nodes.filter((n) => !n.isVirtualNode && n.mode !== 2 && n.mode !== 4).map((n) => String(n.id))"))
    assert runnable and runnable <= set(prompt), f"graphToPrompt left out nodes {sorted(runnable - set(prompt))}"
    return prompt


def refusal(body: dict, prompt: dict) -> str:
    """The server's validation errors, one line per node and error."""
    lines = []
    for node_id, err in (body.get("node_errors") or {}).items():
        kind = err.get("class_type") or prompt.get(node_id, {}).get("class_type", "?")
        for e in err.get("errors", []):
            lines.append(f"{kind} #{node_id}: {e.get('message')}: {e.get('details')}")
    if not lines:
        error = body.get("error")
        lines.append(error.get("message", json.dumps(error)) if isinstance(error, dict) else str(error))
    return "\n  ".join(lines)


def queue_and_wait(page, server, prompt: dict, where: str) -> dict:
    """Queue the loaded graph as the Run button does, wait for its end as the page sees it, and return
    the server's history entry. Fails on a refused prompt or an execution error."""
    with page.expect_response(lambda r: r.request.method == "POST" and urlparse(r.url).path == "/api/prompt") as answer:
        page.evaluate("() => app.queuePrompt(0, 1)")
    response = answer.value
    try:
        body = response.json()
    except Exception:
        body = {"error": response.text()}
    assert response.status == 200 and not body.get("node_errors"), (
        f"{where}: the server refused the prompt the frontend built (HTTP {response.status}):\n  {refusal(body, prompt)}")
    prompt_id = body["prompt_id"]
    try:
        end = page.wait_for_function("(id) => window.__cmloraRun[id]", arg=prompt_id, timeout=RUN_TIMEOUT_MS).json_value()
    except BaseException as e:  # a timeout, or the page died (e.g. its renderer killed): stop the run
        for path, data in (("/interrupt", {}), ("/queue", {"clear": True})):  # leave the server idle
            try:
                post(server, path, data)
            except OSError:
                pass
        if isinstance(e, PageTimeout):
            raise AssertionError(f"{where}: the run did not end within {RUN_TIMEOUT_MS // 1000} s (interrupted)") from None
        raise
    assert end["type"] == "execution_success", (
        f"{where}: the run failed in {end.get('node_type')} #{end.get('node_id')}: {end.get('exception_message', end)}")
    # the history entry is written just after the server announces the end
    deadline = time.time() + 30
    while prompt_id not in (hist := server.get(f"/history/{prompt_id}")):
        assert time.time() < deadline, f"{where}: prompt {prompt_id} ended but has no history entry"
        time.sleep(0.2)
    entry = hist[prompt_id]
    assert entry.get("status", {}).get("status_str") == "success", f"{where}: history says {entry.get('status')}"
    images = output_images(entry)
    assert images, f"{where}: the run saved no image (outputs of nodes {sorted(entry.get('outputs', {}))})"
    for img in images:
        saved = server.output_dir_path / img.get("subfolder", "") / img["filename"]
        assert saved.is_file() and saved.stat().st_size > 0, f"{where}: {saved} was not written"
    return entry


# In the page: what node `id` shows of `parts` (the texts it reported). Looks at the node's widgets
# (a string value holding the text, not hidden) and at what the page draws: in Nodes 2.0 the node's
# own element ([data-node-id]); in the classic view the widgets' DOM elements (the canvas draws the
# rest, which a test cannot read). Whitespace is compared loosely (a textarea keeps line breaks,
# innerText may not).
SHOWN_JS = """([id, parts, vue]) => {
    const norm = (s) => String(s ?? "").split(/\\s+/).filter(Boolean).join(" ");
    const node = app.graph.getNodeById(id);
    if (!node) return {error: `node ${id} is not in the graph`};
    const visible = (el) => !!el && el.isConnected && (el.checkVisibility ? el.checkVisibility() : el.offsetParent !== null);
    const widgets = (node.widgets ?? []).filter((w) => typeof w.value === "string" && !w.hidden && !w.options?.hidden);
    const drawn = [];
    if (vue) {
        const el = document.querySelector(`[data-node-id="${node.id}"]`);
        if (visible(el)) {
            drawn.push(el.innerText);
            for (const box of el.querySelectorAll("textarea, input")) if (visible(box)) drawn.push(box.value);
        }
    } else {
        for (const w of node.widgets ?? []) {
            const el = w.element ?? w.inputEl;
            if (visible(el)) drawn.push(el.value ?? el.textContent);
        }
    }
    const has = (texts) => parts.every((p) => texts.some((t) => norm(t).includes(norm(p))));
    const domWidgets = (node.widgets ?? []).some((w) => w.element ?? w.inputEl);
    return {
        inWidget: has(widgets.map((w) => w.value)),
        drawn: vue || domWidgets ? has(drawn) : true,
        widgets: (node.widgets ?? []).map((w) => `${w.name}=${String(w.value).slice(0, 80)}`),
        drawnTexts: drawn.map((t) => String(t).slice(0, 200)),
    };
}"""


def reports_of(workflow: dict, entry: dict) -> dict[str, list[str]]:
    """The texts each pack node reported in this run (node id -> texts); every CMLoRA Sampler must report."""
    types = {str(n["id"]): n["type"] for n in workflow["nodes"]}
    reported = {nid: [t if isinstance(t, str) else json.dumps(t) for t in out["text"]]
                for nid, out in entry.get("outputs", {}).items()
                if types.get(nid, "").startswith(OURS) and out.get("text")}
    for nid, kind in types.items():
        if kind == "CMLoRA_Sampler":
            assert nid in reported, f"CMLoRA Sampler #{nid} finished without a report: {entry.get('outputs', {}).get(nid)}"
    return reported


def check_reports_show(page, workflow: dict, reported: dict, vue: bool, shots: str):
    """Each node that reported shows its text, looked at the way an artist would: centred, at 100 %.
    A screenshot of the CMLoRA Sampler (or the last reporting node) is kept as <shots>-report.png."""
    types = {str(n["id"]): n["type"] for n in workflow["nodes"]}
    view = "Nodes 2.0" if vue else "classic"
    for nid, parts in sorted(reported.items(), key=lambda kv: types[kv[0]] == "CMLoRA_Sampler"):
        node_id = int(nid) if nid.isdigit() else nid
        page.evaluate("""(id) => {
            const node = app.graph.getNodeById(id);
            app.canvas.ds.scale = 1;
            app.canvas.centerOnNode(node);
            app.canvas.setDirty(true, true);
        }""", node_id)
        try:
            page.wait_for_function(f"(a) => {{ const r = ({SHOWN_JS})(a); return r.inWidget && r.drawn; }}",
                                   arg=[node_id, parts, vue], timeout=SHOW_TIMEOUT_MS)
        except Exception:
            state = page.evaluate(SHOWN_JS, [node_id, parts, vue])
            page.screenshot(path=f"{shots}-node{nid}.png")
            raise AssertionError(f"{types[nid]} #{nid} reported {parts!r} but does not show it in the {view} view: "
                                 f"{json.dumps(state, indent=1)}") from None
    if reported:
        page.screenshot(path=f"{shots}-report.png")


class SharedPage:
    """The page the examples share (a page's start costs seconds of the two CPU cores), with its console
    log; closed when an example fails and opened again by the next."""

    def __init__(self, browser, server):
        self.browser, self.server = browser, server
        self.context = self.page = None
        self.log: list[str] = []

    def open(self):
        if self.page is None or self.page.is_closed():
            self.close()
            self.context, self.page = open_frontend(self.browser, self.server, self.log)
        return self.page

    def close(self):
        if self.context is not None:
            self.context.close()
        self.context = self.page = None


@pytest.fixture(scope="module")
def shared_page(browser, server):
    shared = SharedPage(browser, server)
    yield shared
    shared.close()


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_example_runs_from_the_frontend(shared_page, server, browser_artifacts, path):
    name = path.stem
    workflow = json.loads(path.read_text())
    page = shared_page.open()
    log_start = len(shared_page.log)
    shots = str(browser_artifacts / f"{name}-nodes2")
    passed = False
    try:
        set_view(page, True)
        real_use = bool(needs_real_weights(workflow))
        if real_use:
            # a real-use example loads and converts as saved (the frontend offers its download), then
            # runs on the demo checkpoint and LoRAs (see with_demo_files)
            load_and_convert(page, workflow, True)
            page.screenshot(path=f"{shots}-as-saved.png")
            workflow = with_demo_files(workflow)
        # Nodes 2.0 (on from the page's start): load, convert, run; the reports arrive live
        where = f"{name} (Nodes 2.0 view)"
        prompt = load_and_convert(page, workflow, True)
        forget_results(server)  # a run answered from the cache would report nothing to check
        entry = queue_and_wait(page, server, prompt, where)
        page.screenshot(path=f"{shots}.png")
        # the example's only run on this host: every check of test_examples' /prompt runs, on this entry
        (check_real_use_run if real_use else check_demo_run)(server, workflow, entry)
        reported = reports_of(workflow, entry)
        check_reports_show(page, workflow, reported, True, shots)

        # classic view, switched to in the same page: the reports still show; then load and run again
        set_view(page, False)
        shots = str(browser_artifacts / f"{name}-classic")
        check_reports_show(page, workflow, reported, False, shots)
        where = f"{name} (classic view)"
        prompt = load_and_convert(page, workflow, False)
        queue_and_wait(page, server, prompt, where)
        page.screenshot(path=f"{shots}.png")
        passed = True
    finally:
        log = shared_page.log[log_start:]
        if not Path(f"{shots}.png").exists():
            try:
                page.screenshot(path=f"{shots}.png")
            except Exception as e:  # the page died: keep its log anyway
                log.append(f"no screenshot: {e}")
        (browser_artifacts / f"{name}.console.log").write_text("\n".join(log) + "\n")
        if not passed:
            shared_page.close()
