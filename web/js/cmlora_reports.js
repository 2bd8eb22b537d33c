// Shows on the node the text a CMLoRA / CLoRA node reports when it runs (the server's `ui.text`:
// the CMLoRA Sampler's report, the LoRA Stack's format line, Save Profile's message, ...).
//
// The box is the frontend's own multiline text widget (ComfyWidgets.STRING with multiline), so each
// frontend version draws it its own way: a DOM textarea on the classic canvas, and in Nodes 2.0 (type
// "customtext") the Vue node's textarea widget. Both keep line breaks. The widget is named "report",
// is read-only, and is kept out of everything that is saved or sent:
//   widget.serialize = false          -> not in the workflow's widgets_values (LGraphNode.serialize
//                                        skips it, configure() skips it when loading), so a saved
//                                        workflow loads with every value in its own slot;
//   widget.options.serialize = false  -> not in the prompt (graphToPrompt skips it), so the report is
//                                        never an input and never changes the host's cache key.
// It is added after all of the node's input widgets; serialize() writes widgets_values by widget
// index, so a skipped widget in the middle would leave a hole there.
//
// The node types in REPORTING get the box when the node is created: Nodes 2.0 of frontend 1.32
// copies a node's widget list when the node is set up, so a widget added later is not drawn there.
// Any other CMLoRA/CLoRA node that sends text gets the box the first time it does.
import { app } from "../../../scripts/app.js";
import { ComfyWidgets } from "../../../scripts/widgets.js";

const WIDGET_NAME = "report";
const OUR_NODES = /^(CMLoRA|CLoRA)_/;
const ROW_PX = 15;
const MAX_ROWS = 12; // a longer report scrolls
// the pack's nodes whose execute() returns ui=PreviewText(...) (tests/e2e/test_ui_nodes.py checks this list)
const REPORTING = [
  "CMLoRA_LoraStack", "CMLoRA_Sampler", "CMLoRA_SaveProfile", "CMLoRA_CompareMethods", "CLoRA_Masks",
  "CLoRA_SaveMasks",
];

function isOurs(node) {
  return OUR_NODES.test(node?.comfyClass ?? node?.type ?? "");
}

// The text of an executed message or of stored node outputs, or null when it carries none.
function reportText(output) {
  const text = output?.text;
  if (text == null) return null;
  const parts = (Array.isArray(text) ? text : [text]).map((t) => (typeof t === "string" ? t : JSON.stringify(t)));
  return parts.join("\n");
}

// Rows the text takes in a box of the node's width (long lines wrap), at least 2 and at most MAX_ROWS.
function textRows(text, width) {
  const perRow = Math.max(20, Math.floor((width - 40) / 6.5));
  const rows = String(text ?? "").split("\n").reduce((n, line) => n + Math.max(1, Math.ceil(line.length / perRow)), 0);
  return Math.min(Math.max(rows, 2), MAX_ROWS);
}

function reportWidget(node) {
  const existing = node.widgets?.find((w) => w.name === WIDGET_NAME);
  if (existing) return existing;
  const spec = ["STRING", { multiline: true, placeholder: "the report of the last run shows here" }];
  const widget = ComfyWidgets.STRING(node, WIDGET_NAME, spec, app).widget;
  widget.serialize = false;
  widget.options.serialize = false;
  widget.options.read_only = true;
  // room for the text: the canvas lays DOM widgets out by their minimum height (also what computeSize()
  // adds up), Nodes 2.0 of 1.32 sizes its textarea to the text (autoResize), 1.49 follows the node's size
  widget.options.getMinHeight = () => textRows(widget.value, node.size[0]) * ROW_PX + 12;
  widget.options.rows = 2;
  widget.options.autoResize = true;
  if (widget.element) widget.element.readOnly = true;
  return widget;
}

function showReport(node, output) {
  const text = reportText(output);
  if (text == null || !isOurs(node)) return;
  const widget = reportWidget(node);
  if (widget.value !== text) {
    widget.value = text;
    // Nodes 2.0 of frontend 1.32 learns a new value through the widget's callback only
    widget.callback?.(text);
  }
  // grow the node to fit the box; never shrink what the artist sized
  const wanted = node.computeSize();
  if (wanted[0] > node.size[0] || wanted[1] > node.size[1]) {
    node.setSize([Math.max(node.size[0], wanted[0]), Math.max(node.size[1], wanted[1])]);
  }
  node.setDirtyCanvas?.(true, true);
}

// A node from a key of the stored outputs: "12" in the root graph, "<subgraph id>:12" inside a subgraph.
function nodeOfLocator(locator) {
  const graph = app.graph;
  if (!graph) return null;
  const key = String(locator);
  const cut = key.lastIndexOf(":");
  const owner = cut < 0 ? graph : graph.subgraphs?.get?.(key.slice(0, cut));
  const id = key.slice(cut + 1);
  return owner?.getNodeById(id) ?? owner?.getNodeById(Number(id)) ?? null;
}

app.registerExtension({
  name: "comfyui_cmlora.reports",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!OUR_NODES.test(nodeData?.name ?? "")) return;
    if (REPORTING.includes(nodeData.name)) {
      const onNodeCreated = nodeType.prototype.onNodeCreated;
      nodeType.prototype.onNodeCreated = function () {
        const result = onNodeCreated?.apply(this, arguments);
        reportWidget(this);
        return result;
      };
    }
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      const result = onExecuted?.apply(this, arguments);
      showReport(this, message);
      return result;
    };
  },
  // outputs put back without a run: a finished job opened from the queue, a workflow tab reopened
  onNodeOutputsUpdated(nodeOutputs) {
    for (const [locator, output] of Object.entries(nodeOutputs ?? {})) {
      if (reportText(output) == null) continue;
      const node = nodeOfLocator(locator);
      if (node) showReport(node, output);
    }
  },
});
