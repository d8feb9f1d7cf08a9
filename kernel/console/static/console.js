// The tenantflow console: a client of the kernel's HTTP/JSON API (the Connect protocol) like any
// other, with no private routes. Pages: #/instances, #/instance/<id>, #/schedules, #/playground.
// Every value from the API reaches the page as text (textContent), never as HTML.
import { codeEditor, json as jsonSpans } from "./highlight.js";

const STATUSES = ["QUEUED", "RUNNING", "PAUSED", "WAITING_FOR_PAUSE", "WAITING", "COMPLETE", "ERRORED", "TERMINATED"];
const ENDED = new Set(["COMPLETE", "ERRORED", "TERMINATED"]);
const SAMPLE = `from tenantflow.workflow import WorkflowEntrypoint


class Approval(WorkflowEntrypoint):
    async def run(self, event, step):
        draft = await step.do("draft", lambda: f"release {event.payload['version']}")
        print("drafted", draft)
        got = await step.wait_for_event("approval", type="approved", timeout="1 hour")
        return await step.do("ship", lambda: {"shipped": draft, "by": got["payload"]["by"]})
`;

// -- DOM ---------------------------------------------------------------------------------------
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") el.className = value;
    else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "value") el.value = value;
    else el.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat(Infinity)) {
    if (child !== undefined && child !== null && child !== false) el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

const short = (status) => (status || "STATUS_UNSPECIFIED").replace(/^STATUS_/, "");
const pill = (status) => h("span", { class: `pill ${short(status).toLowerCase()}`, "data-status": short(status) }, short(status).toLowerCase());
const when = (at) => (at ? new Date(at).toLocaleString() : "");
const pretty = (json) => {
  if (!json) return "null";
  try { return JSON.stringify(JSON.parse(json), null, 2); } catch { return json; }
};
const link = (id) => h("a", { href: `#/instance/${encodeURIComponent(id)}` }, id);
const jsonPre = (json, attrs = {}) => h("pre", { class: "json", ...attrs }, jsonSpans(pretty(json)));
const time = (at) => (at ? new Date(at).toLocaleTimeString() : "");

/** 850 ms, 4.2 s, 3 min 5 s, 2 h 10 min. */
function duration(ms) {
  if (!(ms >= 0)) return "";
  if (ms < 1000) return `${Math.round(ms)} ms`;
  if (ms < 60_000) return `${(ms / 1000).toFixed(1)} s`;
  const min = Math.floor(ms / 60_000);
  return min < 60 ? `${min} min ${Math.round((ms % 60_000) / 1000)} s` : `${Math.floor(min / 60)} h ${min % 60} min`;
}

function errorBox(error) {
  const box = h("div", { class: "error", role: "alert" });
  if (error) box.textContent = error.code ? `${error.code}: ${error.message}` : String(error.message || error);
  return box;
}

function errorView(error) {
  if (!error || !(error.name || error.message)) return null;
  return h("div", {}, h("div", { class: "error" }, `${error.name || "Error"}: ${error.message || ""}`),
    error.traceback ? h("pre", { class: "trace" }, error.traceback) : null);
}

// -- session: the tenant and token this console acts as ------------------------------------------
const session = {
  get tenant() { return sessionStorage.getItem("tenantflow.tenant") || ""; },
  get token() { return sessionStorage.getItem("tenantflow.token") || ""; },
  open(tenant, token) {
    sessionStorage.setItem("tenantflow.tenant", tenant);
    sessionStorage.setItem("tenantflow.token", token);
  },
  close() { sessionStorage.removeItem("tenantflow.tenant"); sessionStorage.removeItem("tenantflow.token"); },
};

// -- the API --------------------------------------------------------------------------------------
class ApiError extends Error {
  constructor(code, message) { super(message); this.code = code; }
}

function headers(contentType, token = session.token) {
  const out = { "Content-Type": contentType, "Connect-Protocol-Version": "1" };
  if (token) out.Authorization = `Bearer ${token}`;
  return out;
}

async function refusal(response) {
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    return new ApiError(body.code || "unknown", body.message || `HTTP ${response.status}`);
  } catch {
    return new ApiError("unknown", `HTTP ${response.status}: ${text.slice(0, 200)}`);
  }
}

/** One unary RPC, e.g. call("Workflows/Get", {tenant, id}); the session's token unless given. */
async function call(rpc, body, token = session.token) {
  const response = await fetch(`/tenantflow.v1.${rpc}`, {
    method: "POST", headers: headers("application/json", token), body: JSON.stringify(body),
  });
  if (!response.ok) throw await refusal(response);
  return response.json();
}

/** Workflows/Watch over Connect streaming: each enveloped frame is a flag byte, a 4-byte big-endian
 * length and the JSON; flag 2 ends the stream with {} or {"error": ...}. */
async function watch(ref, onEvent, signal) {
  const json = new TextEncoder().encode(JSON.stringify(ref));
  const body = new Uint8Array(5 + json.length);
  new DataView(body.buffer).setUint32(1, json.length);
  body.set(json, 5);
  const response = await fetch("/tenantflow.v1.Workflows/Watch", {
    method: "POST", headers: headers("application/connect+json"), body, signal,
  });
  if (!response.ok) throw await refusal(response);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = new Uint8Array(0);
  for (;;) {
    const { value, done } = await reader.read();
    if (done) throw new ApiError("unavailable", "the Watch stream ended without its end frame");
    const joined = new Uint8Array(buffer.length + value.length);
    joined.set(buffer);
    joined.set(value, buffer.length);
    buffer = joined;
    while (buffer.length >= 5) {
      const view = new DataView(buffer.buffer, buffer.byteOffset, buffer.length);
      const flags = view.getUint8(0);
      const size = view.getUint32(1);
      if (buffer.length < 5 + size) break;
      const message = JSON.parse(decoder.decode(buffer.subarray(5, 5 + size)) || "{}");
      buffer = buffer.slice(5 + size);
      if (flags & 2) {
        if (message.error) throw new ApiError(message.error.code, message.error.message);
        return;
      }
      onEvent(message);
    }
  }
}

function base64(text) {
  const bytes = new TextEncoder().encode(text);
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) binary += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(binary);
}

function parseJson(text, what) {
  if (!text.trim()) return "";
  try {
    return JSON.stringify(JSON.parse(text));
  } catch (exc) {
    throw new ApiError("invalid_argument", `${what} is not JSON: ${exc.message}`);
  }
}

// -- routing --------------------------------------------------------------------------------------
const main = document.getElementById("main");
let leaving = new AbortController(); // aborts the current page's Watch streams when the page changes

function route() {
  leaving.abort();
  leaving = new AbortController();
  const [path, query] = (location.hash.slice(1) || "/instances").split("?");
  const [, page, ...rest] = path.split("/");
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.page === page);
  renderWho();
  main.replaceChildren();
  if (!session.tenant) return renderOpen();
  if (page === "instance") return renderInstance(decodeURIComponent(rest.join("/")), leaving.signal);
  if (page === "playground") return renderPlayground(leaving.signal);
  if (page === "schedules") return renderSchedules();
  return renderInstances(new URLSearchParams(query || ""));
}

function renderWho() {
  const who = document.getElementById("who");
  who.replaceChildren();
  if (session.tenant) {
    who.append(`tenant ${session.tenant}`, h("button", {
      type: "button", id: "switch-tenant", onclick: () => { session.close(); route(); },
    }, "Switch"));
  }
}

// -- open a tenant --------------------------------------------------------------------------------
function renderOpen(problem) {
  const tenant = h("input", { name: "tenant", id: "open-tenant", required: true, autocomplete: "off" });
  const token = h("input", { name: "token", id: "open-token", type: "password", autocomplete: "off" });
  // With --list-tenants the kernel lists the tenants a token may see: offer them; else type one.
  const picker = h("select", { id: "tenant-picker", onchange: () => { tenant.value = picker.value; } });
  const pick = h("label", { class: "hidden", id: "tenant-pick" }, "Tenants this token may open", picker);
  let asked = 0;
  async function offer() {
    const mine = ++asked;
    try {
      const answer = await call("Tenants/List", { pageSize: 200 }, token.value.trim());
      if (mine !== asked) return;
      const found = answer.tenants || [];
      picker.replaceChildren(h("option", { value: "" }, `${found.length} tenant${found.length === 1 ? "" : "s"}…`),
        ...found.map((t) => h("option", { value: t.tenant },
          `${t.tenant} · ${Number(t.instances || 0)} instances, ${Number(t.live || 0)} live, ${Number(t.schedules || 0)} schedules`)));
      pick.classList.toggle("hidden", !found.length);
    } catch { if (mine === asked) pick.classList.add("hidden"); } // listing off, or not this token's to see
  }
  let typing = null;
  token.addEventListener("input", () => { clearTimeout(typing); typing = setTimeout(offer, 250); });
  main.replaceChildren(h("div", { class: "card" },
    h("h1", {}, "Open a tenant"),
    h("p", { class: "muted" }, "The console acts for one tenant. With --auth-tokens, give a token that may act for it."),
    h("form", {
      class: "row", id: "open-form",
      onsubmit: (e) => { e.preventDefault(); session.open(tenant.value.trim(), token.value.trim()); route(); },
    }, h("label", {}, "Token (bearer)", token), pick, h("label", {}, "Tenant", tenant),
    h("button", { class: "primary" }, "Open")),
    problem ? errorBox(problem) : null));
  token.focus();
  offer();
}

function unauthorized(exc) {
  if (exc.code !== "unauthenticated" && exc.code !== "permission_denied") return false;
  session.close();
  renderWho();
  renderOpen(exc);
  return true;
}

// -- instances ------------------------------------------------------------------------------------
function renderInstances(query) {
  const filters = {
    status: query.get("status") || "", workflow: query.get("workflow") || "",
    after: query.get("after") || "", before: query.get("before") || "", size: query.get("size") || "50",
  };
  const tokens = [""]; // page tokens of the pages seen so far: Previous goes back one
  const status = h("select", { name: "status", id: "filter-status" },
    h("option", { value: "" }, "every status"),
    STATUSES.map((s) => h("option", { value: s, selected: s === filters.status }, s.toLowerCase())));
  const workflow = h("input", { name: "workflow", id: "filter-workflow", value: filters.workflow, placeholder: "every class" });
  const after = h("input", { name: "after", type: "datetime-local", value: filters.after });
  const before = h("input", { name: "before", type: "datetime-local", value: filters.before });
  const size = h("select", { name: "size", id: "filter-size" },
    ["10", "50", "200"].map((n) => h("option", { value: n, selected: n === filters.size }, n)));
  const count = h("span", { id: "count", class: "muted" });
  const rows = h("tbody");
  const problem = errorBox();
  const prev = h("button", { type: "button", id: "page-prev", disabled: true }, "← Previous");
  const next = h("button", { type: "button", id: "page-next", disabled: true }, "Next →");
  const where = h("span", { id: "page-number", class: "muted" });

  async function load(page) {
    problem.textContent = "";
    const request = {
      tenant: session.tenant, pageSize: Number(filters.size), pageToken: tokens[page], includeCount: true,
      workflow: filters.workflow,
    };
    if (filters.status) request.status = `STATUS_${filters.status}`;
    if (filters.after) request.createdAfter = new Date(filters.after).toISOString();
    if (filters.before) request.createdBefore = new Date(filters.before).toISOString();
    try {
      const answer = await call("Workflows/List", request);
      const total = Number(answer.totalCount || 0);
      count.textContent = `${total} instance${total === 1 ? "" : "s"}`;
      rows.replaceChildren(...(answer.instances || []).map((i) => h("tr", { "data-id": i.id },
        h("td", {}, link(i.id)), h("td", {}, i.workflow), h("td", {}, pill(i.status)),
        h("td", {}, when(i.createdAt)), h("td", {}, when(i.updatedAt)))));
      if (!(answer.instances || []).length) rows.append(h("tr", {}, h("td", { colspan: 5, class: "muted" }, "No instances match.")));
      tokens.length = page + 1;
      if (answer.nextPageToken) tokens.push(answer.nextPageToken);
      prev.disabled = page === 0;
      next.disabled = !answer.nextPageToken;
      prev.onclick = () => load(page - 1);
      next.onclick = () => load(page + 1);
      where.textContent = `page ${page + 1}`;
    } catch (exc) {
      if (!unauthorized(exc)) problem.textContent = `${exc.code}: ${exc.message}`;
    }
  }

  const form = h("form", {
    class: "row card", id: "filters",
    onsubmit: (e) => {
      e.preventDefault();
      const q = new URLSearchParams();
      for (const [k, v] of Object.entries({ status: status.value, workflow: workflow.value.trim(), after: after.value, before: before.value, size: size.value })) {
        if (v && !(k === "size" && v === "50")) q.set(k, v);
      }
      const target = `#/instances${q.toString() ? `?${q}` : ""}`;
      if (location.hash === target) route(); else location.hash = target;
    },
  }, h("label", {}, "Status", status), h("label", {}, "Workflow", workflow),
  h("label", {}, "Created after", after), h("label", {}, "Created before", before),
  h("label", {}, "Per page", size), h("button", { class: "primary", id: "filter-apply" }, "Apply"));

  main.append(h("h1", {}, "Instances", count), form, problem,
    h("table", { id: "instances" }, h("thead", {}, h("tr", {}, ["Id", "Workflow", "Status", "Created", "Updated"].map((t) => h("th", {}, t)))), rows),
    h("div", { class: "row pager" }, prev, next, where));
  load(0);
}

// -- one instance ---------------------------------------------------------------------------------
function stepMark(status) {
  return { complete: "✓", failed: "✗", running: "…", retrying: "↻", sleeping: "☾", waiting: "⏸" }[status] || "·";
}

function timelineItem(event) {
  const text = event.kind === "status" ? short(event.status).toLowerCase()
    : [event.step, event.attempt ? `attempt ${event.attempt}` : "", event.message].filter(Boolean).join(" · ");
  return h("li", { class: event.kind, "data-kind": event.kind },
    h("span", { class: "at" }, event.at ? new Date(event.at).toLocaleTimeString() : ""),
    h("span", { class: "kind" }, event.kind), text);
}

/** Follows an instance: Get at once and after each Watch event (at most every 100 ms), the timeline
 * as events come (each also to ``onEvent``). */
function follow(id, signal, { onInstance, timeline, live, onEvent }) {
  let pending = null;
  const refresh = (delay = 100) => {
    if (pending) return;
    pending = setTimeout(async () => {
      pending = null;
      try { onInstance(await call("Workflows/Get", { tenant: session.tenant, id })); } catch (exc) { if (!signal.aborted) live.textContent = `${exc.code}: ${exc.message}`; }
    }, delay);
  };
  refresh(0);
  live.textContent = "following live…";
  watch({ tenant: session.tenant, id }, (event) => {
    timeline.append(timelineItem(event));
    timeline.scrollTop = timeline.scrollHeight;
    onEvent?.(event);
    refresh();
  }, signal).then(() => { live.textContent = "ended"; refresh(); }, (exc) => {
    if (!signal.aborted) live.textContent = `stream ended: ${exc.code}: ${exc.message}`;
  });
}

function sendEventForm(id, onSent) {
  const type = h("input", { name: "type", class: "event-type", required: true, placeholder: "approved" });
  const payload = h("textarea", { name: "payload", class: "json event-payload", placeholder: '{"by": "ada"}' });
  const problem = errorBox();
  const form = h("form", {
    class: "send-event",
    onsubmit: async (e) => {
      e.preventDefault();
      problem.textContent = "";
      try {
        const answer = await call("Workflows/SendEvent", {
          tenant: session.tenant, id, type: type.value.trim(), payloadJson: parseJson(payload.value, "The payload"),
        });
        problem.textContent = "";
        onSent?.(answer);
      } catch (exc) { problem.textContent = `${exc.code}: ${exc.message}`; }
    },
  }, h("div", { class: "row" }, h("label", {}, "Event type", type), h("button", { class: "primary send-event-button" }, "Send event")),
  h("label", {}, "Payload (JSON)", payload), problem);
  form.setType = (value) => { if (value && !type.value) type.value = value; };
  return form;
}

/** When each step ran, from the timeline: a step's span opens at its first step_started, sleeping
 * or waiting and closes at step_completed or step_failed (a retry reopens it); a step named again
 * (occurrence n) is its name's n-th span. After a restart a step that runs again starts afresh. */
class StepTimes {
  constructor() { this.spans = new Map(); }

  add(event) {
    if (event.kind === "status" && /^restarted/.test(event.message || "")) {
      for (const spans of this.spans.values()) spans.before = true; // the rerun steps' spans replace them
      return;
    }
    if (!event.step) return;
    const spans = this.spans.get(event.step) || [];
    this.spans.set(event.step, spans);
    if (spans.before) { spans.length = 0; spans.before = false; }
    let last = spans[spans.length - 1];
    const open = () => { last = { start: event.at, end: "" }; spans.push(last); };
    if (["step_started", "sleeping", "waiting"].includes(event.kind)) { if (!last || last.end) open(); }
    else if (event.kind === "step_retrying") { if (last) last.end = ""; }
    else if (["step_completed", "step_failed"].includes(event.kind)) { if (!last || last.end) open(); last.end = event.at; }
  }

  of(step) { return (this.spans.get(step.name) || [])[step.occurrence || 0]; }
}

function stepsTable(steps, times) {
  const cells = (s) => {
    const span = times.of(s);
    if (!span) return [h("td"), h("td"), h("td")];
    const took = (span.end ? new Date(span.end) : Date.now()) - new Date(span.start);
    return [h("td", { class: "started", title: when(span.start) }, time(span.start)),
      h("td", { class: "ended", title: when(span.end) }, time(span.end)),
      h("td", { class: "duration" }, span.end ? duration(took) : `${duration(took)} so far`)];
  };
  return h("table", { class: "steps" }, h("thead", {}, h("tr", {}, ["Step", "Kind", "Status", "Attempts", "Started", "Ended", "Took", "Output / error", "Wakes"].map((t) => h("th", {}, t)))),
    h("tbody", {}, (steps || []).map((s) => h("tr", { "data-step": s.name },
      h("td", {}, s.name, s.occurrence ? ` #${s.occurrence + 1}` : ""), h("td", {}, s.kind || ""), h("td", {}, pill(s.status)),
      h("td", { class: "attempts" }, s.attempts || 0), cells(s),
      h("td", {}, s.outputJson ? jsonPre(s.outputJson) : null, errorView(s.error)),
      h("td", {}, ["sleeping", "waiting", "retrying"].includes(s.status) ? when(s.wakeAt) : "")))));
}

/** The inbox: each event, when it came, and the wait step that read it (or unread). */
function eventsTable(events) {
  if (!events.length) return h("p", { class: "muted" }, "No events sent.");
  const reader = (key) => {
    if (!key) return h("span", { class: "pill waiting", "data-status": "UNREAD" }, "unread");
    const [name, occurrence] = key.split(" (")[0].split("#");
    const spent = key.includes(" (") ? " (before a restart)" : "";
    return h("span", { "data-status": "CONSUMED" }, `step ${name}${Number(occurrence) ? ` #${Number(occurrence) + 1}` : ""}${spent}`);
  };
  return h("table", { class: "events" }, h("thead", {}, h("tr", {}, ["#", "Type", "Sent", "Read by", "Payload"].map((t) => h("th", {}, t)))),
    h("tbody", {}, events.map((e) => h("tr", { "data-event": e.type, "data-seq": e.sequence },
      h("td", {}, e.sequence), h("td", {}, h("code", {}, e.type)), h("td", { title: when(e.at) }, time(e.at)),
      h("td", { class: "read-by" }, reader(e.consumedBy)), h("td", {}, jsonPre(e.payloadJson))))));
}

function renderInstance(id, signal) {
  const problem = errorBox();
  const head = h("h1", {}, h("span", { id: "instance-id" }, id), h("span", { id: "instance-status" }));
  const details = h("div", { class: "card", id: "details" }, h("p", { class: "muted" }, "Loading…"));
  const steps = h("div", { id: "steps" });
  const events = h("div", { id: "events" }, h("p", { class: "muted" }, "Loading…"));
  const times = new StepTimes();
  const timeline = h("ol", { class: "timeline", id: "timeline" });
  const live = h("span", { class: "muted", id: "live" });
  const sender = sendEventForm(id, () => { sender.querySelector(".error").textContent = "sent"; });

  const act = (label, rpc, body, question, { danger = false, after } = {}) => h("button", {
    type: "button", class: danger ? "danger" : "", "data-action": label.toLowerCase(),
    onclick: async () => {
      if (question && !window.confirm(question)) return;
      problem.textContent = "";
      try {
        const answer = await call(rpc, { tenant: session.tenant, id, ...body });
        if (after) after(answer); else show(answer);
      } catch (exc) { problem.textContent = `${exc.code}: ${exc.message}`; }
    },
  }, label);
  const buttons = {
    pause: act("Pause", "Workflows/Pause", {}),
    resume: act("Resume", "Workflows/Resume", {}),
    terminate: act("Terminate", "Workflows/Terminate", {}, `Terminate ${id}? It stops for good (its live children too).`, { danger: true }),
    rollback: act("Terminate with rollback", "Workflows/Terminate", { rollback: true }, `Terminate ${id} and run the undos of its completed steps?`, { danger: true }),
    restart: act("Restart", "Workflows/Restart", {}, `Restart ${id} from the start? Its steps run again.`, { danger: true, after: () => route() }),
    delete: act("Delete", "Workflows/Delete", {}, `Delete ${id} with its journal and history? This cannot be undone.`, { danger: true, after: () => { location.hash = "#/instances"; } }),
  };

  function show(instance) {
    const status = short(instance.status);
    head.querySelector("#instance-status").replaceChildren(pill(instance.status));
    buttons.pause.disabled = !["QUEUED", "RUNNING", "WAITING"].includes(status);
    buttons.resume.disabled = !["PAUSED", "WAITING_FOR_PAUSE"].includes(status);
    buttons.terminate.disabled = buttons.rollback.disabled = ENDED.has(status);
    buttons.restart.disabled = !ENDED.has(status);
    sender.parentElement?.classList.toggle("hidden", ENDED.has(status));
    const waiting = (instance.steps || []).find((s) => s.status === "waiting" && s.kind === "wait_for_event");
    const rows = [
      ["Workflow", instance.workflow], ["Pinned code", h("code", {}, instance.code)], ["Runtime", instance.runtime || "python"],
      ["Created", when(instance.createdAt)], ["Updated", when(instance.updatedAt)],
      instance.parentId ? ["Parent", link(instance.parentId)] : null,
      (instance.childIds || []).length ? ["Children", h("span", {}, instance.childIds.map((c) => [link(c), " "]))] : null,
      instance.rollback ? ["Rollback", h("span", {}, pill(instance.rollback.status), ` ${instance.rollback.reason || ""}`, errorView(instance.rollback.error))] : null,
      ["Params", jsonPre(instance.paramsJson, { id: "params" })],
      status === "COMPLETE" ? ["Output", jsonPre(instance.outputJson, { id: "output" })] : null,
      instance.error ? ["Error", h("div", { id: "error" }, errorView(instance.error))] : null,
      waiting ? ["Waiting for", h("span", { id: "waiting-for" }, `an event in step ${waiting.name}`)] : null,
    ].filter(Boolean);
    details.replaceChildren(h("dl", {}, rows.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)])));
    steps.replaceChildren((instance.steps || []).length ? stepsTable(instance.steps, times) : h("p", { class: "muted" }, "No steps yet."));
  }

  let reading = null; // the inbox is read from ExportHistory: at once, then after events come or are read
  const readEvents = (delay) => {
    if (reading) return;
    reading = setTimeout(async () => {
      reading = null;
      try {
        events.replaceChildren(eventsTable((await call("Workflows/ExportHistory", { tenant: session.tenant, id })).events || []));
      } catch (exc) { if (!signal.aborted) events.replaceChildren(errorBox(exc)); }
    }, delay);
  };

  main.append(h("p", {}, h("a", { href: "#/instances" }, "← Instances")), head,
    h("div", { class: "row card", id: "actions" }, Object.values(buttons)), problem,
    h("div", { class: "grid2" },
      details,
      h("div", {}, h("div", { class: "card" }, h("h2", {}, "Send an event"), sender),
        h("div", { class: "card" }, h("h2", {}, "Timeline ", live), timeline))),
    h("h2", {}, "Steps"), steps, h("h2", {}, "Events"), events);
  follow(id, signal, {
    onInstance: show, timeline, live,
    onEvent: (event) => {
      times.add(event);
      if (event.kind === "event" || event.kind === "step_completed") readEvents(200);
    },
  });
  readEvents(0);
}

// -- schedules ----------------------------------------------------------------------------------
function renderSchedules() {
  const rows = h("tbody");
  const problem = errorBox();
  const tokens = [""];
  const prev = h("button", { type: "button", id: "schedules-prev", disabled: true }, "← Previous");
  const next = h("button", { type: "button", id: "schedules-next", disabled: true }, "Next →");

  function row(s) {
    const ref = { tenant: session.tenant, name: s.name };
    const act = (label, rpc, question) => h("button", {
      type: "button", class: label === "Delete" ? "danger" : "", "data-action": label.toLowerCase(),
      onclick: async () => {
        if (question && !window.confirm(question)) return;
        problem.textContent = "";
        try {
          const answer = await call(rpc, ref);
          if (label === "Delete") tr.remove(); else tr.replaceWith(row(answer));
        } catch (exc) { if (!unauthorized(exc)) problem.textContent = `${exc.code}: ${exc.message}`; }
      },
    }, label);
    const upcoming = (s.upcomingFires || []).slice(1, 4);
    const tr = h("tr", { "data-schedule": s.name, "data-paused": s.paused ? "true" : "false" },
      h("td", {}, h("strong", {}, s.name), s.lastError ? h("div", { class: "error last-error" }, s.lastError) : null),
      h("td", {}, h("code", {}, s.cron), h("div", { class: "muted" }, s.timeZone || "UTC")),
      h("td", {}, s.workflow),
      h("td", { class: "next-fire" }, s.paused ? h("span", { class: "muted" }, "none while paused") : when(s.nextFire),
        upcoming.length ? h("div", { class: "muted upcoming" }, "then ", upcoming.map(when).join(", ")) : null),
      h("td", {}, when(s.lastFire) || h("span", { class: "muted" }, "never"),
        s.lastInstanceId ? h("div", { class: "last-instance" }, link(s.lastInstanceId)) : null),
      h("td", { class: "fires" }, `${Number(s.fires || 0)} fired`, h("div", { class: "muted" }, `${Number(s.skippedFires || 0)} skipped`)),
      h("td", {}, h("span", { class: `pill ${s.paused ? "paused" : "running"}`, "data-status": s.paused ? "PAUSED" : "ACTIVE" }, s.paused ? "paused" : "active")),
      h("td", { class: "actions" }, s.paused ? act("Resume", "Schedules/Resume") : act("Pause", "Schedules/Pause"),
        act("Delete", "Schedules/Delete", `Delete schedule ${s.name}? It stops firing for good; the instances it started stay.`)));
    return tr;
  }

  async function load(page) {
    problem.textContent = "";
    try {
      const answer = await call("Schedules/List", { tenant: session.tenant, pageSize: 50, pageToken: tokens[page] });
      const found = answer.schedules || [];
      rows.replaceChildren(...found.map(row));
      if (!found.length) rows.append(h("tr", {}, h("td", { colspan: 8, class: "muted" }, "No schedules: create them with Schedules.Create (tenantflow schedule create).")));
      tokens.length = page + 1;
      if (answer.nextPageToken) tokens.push(answer.nextPageToken);
      prev.disabled = page === 0;
      next.disabled = !answer.nextPageToken;
      prev.onclick = () => load(page - 1);
      next.onclick = () => load(page + 1);
    } catch (exc) {
      if (!unauthorized(exc)) problem.textContent = `${exc.code}: ${exc.message}`;
    }
  }

  main.append(h("h1", {}, "Schedules"), problem,
    h("table", { id: "schedules" }, h("thead", {}, h("tr", {},
      ["Name", "Cron", "Workflow", "Next fire", "Last fire", "Fires", "State", ""].map((t) => h("th", {}, t)))), rows),
    h("div", { class: "row pager" }, prev, next));
  load(0);
}

// -- playground -----------------------------------------------------------------------------------
function renderPlayground(signal) {
  const saved = (key, fallback) => sessionStorage.getItem(`tenantflow.playground.${key}`) ?? fallback;
  const name = h("input", { name: "name", id: "code-name", value: saved("name", "playground") });
  const cls = h("input", { name: "workflow", id: "workflow-class", value: saved("workflow", ""), placeholder: "the only class" });
  const runtime = h("select", { name: "runtime", id: "runtime" },
    ["python", "python-wasm"].map((r) => h("option", { value: r, selected: r === saved("runtime", "python") }, r)));
  const editorBox = codeEditor({ class: "code", id: "editor", name: "code", value: saved("code", SAMPLE) });
  const editor = editorBox.querySelector("textarea");
  const params = h("textarea", { class: "json", id: "params-json", value: saved("params", '{"version": "1.0"}') });
  const problem = errorBox();
  const warnings = h("ul", { id: "warnings" });
  const card = h("div", { id: "run-card" });
  const run = h("button", { class: "primary", id: "run" }, "Run");

  async function start(e) {
    e.preventDefault();
    problem.textContent = "";
    warnings.replaceChildren();
    for (const [k, el] of Object.entries({ name, workflow: cls, runtime, code: editor, params })) sessionStorage.setItem(`tenantflow.playground.${k}`, el.value);
    run.disabled = true;
    try {
      const paramsJson = parseJson(params.value, "Params");
      const version = await call("Code/Publish", {
        tenant: session.tenant, name: name.value.trim(), runtime: runtime.value, files: { "workflow.py": base64(editor.value) },
      });
      warnings.replaceChildren(...(version.warnings || []).map((w) => h("li", {}, `line ${w.line}: ${w.message}`)));
      const classes = version.workflows || [];
      const workflow = cls.value.trim() || (classes.length === 1 ? classes[0] : "");
      if (!workflow) throw new ApiError("invalid_argument", `the code defines ${classes.length ? classes.join(", ") : "no workflow class"}: name the one to run`);
      const instance = await call("Workflows/Create", { tenant: session.tenant, workflow, code: version.ref, paramsJson });
      runCard(instance);
    } catch (exc) {
      if (!unauthorized(exc)) problem.textContent = `${exc.code}: ${exc.message}`;
    } finally {
      run.disabled = false;
    }
  }

  function runCard(instance) {
    const id = instance.id;
    const status = h("span", { id: "run-status" });
    const list = h("ul", { class: "steps", id: "run-steps" });
    const result = h("div", { id: "run-result" });
    const timeline = h("ol", { class: "timeline", id: "run-log" });
    const live = h("span", { class: "muted" });
    const sender = sendEventForm(id);
    sender.classList.add("hidden");
    card.replaceChildren(h("div", { class: "card" },
      h("h2", {}, "Run ", link(id), " ", status, " ", live),
      h("div", { class: "muted ref" }, instance.code), list, sender, result,
      h("h2", {}, "Log and events"), timeline));
    follow(id, signal, {
      timeline, live,
      onInstance: (now) => {
        status.replaceChildren(pill(now.status));
        list.replaceChildren(...(now.steps || []).map((s) => h("li", { "data-step": s.name, "data-status": s.status },
          h("span", { class: "mark" }, stepMark(s.status)), s.name, " ", pill(s.status),
          s.attempts > 1 ? h("span", { class: "muted" }, ` ${s.attempts} attempts`) : null, errorView(s.error))));
        const waiting = (now.steps || []).find((s) => s.status === "waiting" && s.kind === "wait_for_event");
        sender.classList.toggle("hidden", !waiting);
        if (waiting) {
          const ev = [...timeline.querySelectorAll("li.waiting")].pop();
          sender.setType(ev ? (ev.textContent.match(/type '([^']+)'/) || [])[1] : "");
        }
        result.replaceChildren(
          short(now.status) === "COMPLETE" ? h("div", {}, h("h2", {}, "Output"), jsonPre(now.outputJson, { id: "run-output" })) : "",
          errorView(now.error) || "");
      },
    });
  }

  main.append(h("h1", {}, "Playground"),
    h("form", { id: "playground", onsubmit: start },
      h("div", { class: "row card" }, h("label", {}, "Code name", name), h("label", {}, "Workflow class", cls),
        h("label", {}, "Runtime", runtime), run),
      h("div", { class: "grid2" },
        h("label", {}, "workflow.py", editorBox),
        h("div", {}, h("label", {}, "Params (JSON, the event's payload)", params), problem, warnings, card))));
}

window.addEventListener("hashchange", route);
route();
