// Syntax highlighting with no dependency: a small Python tokenizer for the playground's editor and
// a JSON one for params, outputs and payloads. Both build spans with textContent, never HTML.

const KEYWORDS = new Set(("False None True and as assert async await break case class continue def del elif else "
  + "except finally for from global if import in is lambda match nonlocal not or pass raise return try while with yield").split(" "));
const BUILTINS = new Set("self print len range dict list set tuple str int float bool isinstance super Exception ValueError".split(" "));
// One alternative per token kind, in the order they are tried at each position.
const PYTHON = new RegExp([
  /(#[^\n]*)/, // comment
  /((?:[rRbBuUfF]{1,2})?(?:"""[\s\S]*?(?:"""|$)|'''[\s\S]*?(?:'''|$)|"(?:\\.|[^"\\\n])*"?|'(?:\\.|[^'\\\n])*'?))/, // string
  /(@[A-Za-z_][\w.]*)/, // decorator
  /(\b(?:0[xXoObB][\da-fA-F_]+|\d[\d_]*(?:\.\d[\d_]*)?(?:[eE][+-]?\d+)?j?)\b)/, // number
  /([A-Za-z_]\w*)/, // name
].map((r) => r.source).join("|"), "g");
const JSON_TOKENS = /("(?:\\.|[^"\\])*")(\s*:)?|(-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)|\b(true|false|null)\b/g;

function span(kind, text) {
  const el = document.createElement("span");
  el.className = `tk-${kind}`;
  el.textContent = text;
  return el;
}

/** Python source as text nodes and spans (tk-kw, tk-str, tk-com, tk-num, tk-dec, tk-def, tk-bi). */
export function python(code) {
  const out = document.createDocumentFragment();
  let at = 0;
  let naming = false; // the previous word was def or class: this one is the name it defines
  for (const m of code.matchAll(PYTHON)) {
    if (m.index > at) out.append(code.slice(at, m.index));
    const [text, comment, string, decorator, number, name] = m;
    let kind = comment ? "com" : string ? "str" : decorator ? "dec" : number ? "num" : "";
    if (name) kind = naming ? "def" : KEYWORDS.has(name) ? "kw" : BUILTINS.has(name) ? "bi" : "";
    naming = name === "def" || name === "class";
    out.append(kind ? span(kind, text) : text);
    at = m.index + text.length;
  }
  out.append(code.slice(at));
  return out;
}

/** JSON text as text nodes and spans (tk-key, tk-str, tk-num, tk-kw). */
export function json(text) {
  const out = document.createDocumentFragment();
  let at = 0;
  for (const m of text.matchAll(JSON_TOKENS)) {
    if (m.index > at) out.append(text.slice(at, m.index));
    const [whole, string, colon, number, literal] = m;
    if (string) out.append(span(colon ? "key" : "str", string), colon || "");
    else out.append(span(number ? "num" : "kw", number || literal));
    at = m.index + whole.length;
  }
  out.append(text.slice(at));
  return out;
}

/** A <textarea> with its highlighted copy underneath, kept in step (input, scroll; Tab inserts
 * four spaces). The textarea's text is transparent: what shows is the copy, the caret and selection
 * are the textarea's own. Returns the wrapper; the textarea keeps ``attrs`` (id, name, value). */
export function codeEditor(attrs) {
  const area = document.createElement("textarea");
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "value") area.value = value; else area.setAttribute(key, value);
  }
  area.spellcheck = false;
  area.wrap = "off";
  const code = document.createElement("code");
  const copy = document.createElement("pre");
  copy.className = "highlighted";
  copy.setAttribute("aria-hidden", "true");
  copy.append(code);
  let queued = false;
  const paint = () => {
    queued = false;
    code.replaceChildren(python(area.value), "\n"); // the newline: a last empty line keeps its height
    copy.scrollTop = area.scrollTop;
    copy.scrollLeft = area.scrollLeft;
  };
  const schedule = () => { if (!queued) { queued = true; requestAnimationFrame(paint); } };
  area.addEventListener("input", schedule);
  area.addEventListener("scroll", () => { copy.scrollTop = area.scrollTop; copy.scrollLeft = area.scrollLeft; });
  area.addEventListener("keydown", (e) => {
    if (e.key !== "Tab" || e.shiftKey || e.ctrlKey || e.altKey || e.metaKey) return;
    e.preventDefault();
    area.setRangeText("    ", area.selectionStart, area.selectionEnd, "end");
    area.dispatchEvent(new Event("input"));
  });
  paint();
  const wrapper = document.createElement("div");
  wrapper.className = "editor";
  wrapper.append(copy, area);
  return wrapper;
}
