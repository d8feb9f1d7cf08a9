// A platform backend in Node.js, as a user would write one with @grpc/grpc-js and the published
// .proto: lifecycle, error codes, deadlines, Watch streaming, and RFC 8259 JSON in every *_json field.
// Run by tests/clients/test_node_client.py against a real kernel: TENANTFLOW_ADDRESS, TENANTFLOW_TENANT.
import assert from "node:assert/strict";
import { fileURLToPath } from "node:url";
import path from "node:path";
import { test } from "node:test";
import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";

const here = path.dirname(fileURLToPath(import.meta.url));
const PROTO = path.resolve(here, "../../../proto/tenantflow/v1/tenantflow.proto");
const ADDRESS = process.env.TENANTFLOW_ADDRESS;
const TENANT = process.env.TENANTFLOW_TENANT ?? "node-tenant";
assert.ok(ADDRESS, "TENANTFLOW_ADDRESS must name a running kernel");

const definition = protoLoader.loadSync(PROTO, { keepCase: true, longs: String, enums: String, defaults: true });
const api = grpc.loadPackageDefinition(definition).tenantflow.v1;
const workflows = new api.Workflows(ADDRESS, grpc.credentials.createInsecure());
const code = new api.Code(ADDRESS, grpc.credentials.createInsecure());

const call = (client, method, request, deadlineMs = 20000) =>
  new Promise((resolve, reject) => {
    client[method](request, { deadline: new Date(Date.now() + deadlineMs) }, (err, reply) =>
      err ? reject(err) : resolve(reply));
  });

const rejects = async (promise, code, pattern) => {
  const err = await promise.then(() => null, (e) => e);
  assert.ok(err, `expected gRPC ${code}, the call succeeded`);
  assert.equal(err.code, code, `expected code ${code}, got ${err.code}: ${err.details}`);
  if (pattern) assert.match(err.details, pattern);
  return err;
};

// Every *_json field must parse with the strict JSON.parse of this language.
const checkJson = (instance) => {
  for (const field of ["output_json", "params_json"]) if (instance[field]) JSON.parse(instance[field]);
  for (const step of instance.steps ?? []) if (step.output_json) JSON.parse(step.output_json);
};

const SOURCE = `
from tenantflow.workflow import WorkflowEntrypoint, StepError

class Deploy(WorkflowEntrypoint):
    async def run(self, event, step):
        built = await step.do("build", lambda: {"artifact": event.payload["repo"] + ".tar"})
        await step.sleep("cool-down", 0.05)
        approval = await step.wait_for_event("approval", type="deploy-approval", timeout="1 hour")
        return {"deployed": built["artifact"], "by": approval["payload"]["by"]}

class Ratio(WorkflowEntrypoint):
    def run(self, event, step):
        try:
            step.do("ratio", lambda: float("nan"))
        except StepError as exc:
            return {"step_error": exc.error_name}

class Infinite(WorkflowEntrypoint):
    def run(self, event, step):
        return {"max": float("inf")}
`;

let ref;
test.before(async () => {
  const version = await call(code, "Publish",
    { tenant: TENANT, name: "node-app", runtime: "python", files: { "app.py": Buffer.from(SOURCE) } });
  assert.match(version.ref, /^artifact:\/\/.+@sha256:[0-9a-f]{64}$/);
  assert.deepEqual([...version.workflows].sort(), ["Deploy", "Infinite", "Ratio"]);
  ref = version.ref;
});

const waitFor = async (id, predicate, timeoutMs = 20000) => {
  const until = Date.now() + timeoutMs;
  for (;;) {
    const instance = await call(workflows, "Get", { tenant: TENANT, id });
    if (predicate(instance)) return instance;
    assert.ok(Date.now() < until, `instance ${id} still ${instance.status}`);
    await new Promise((r) => setTimeout(r, 20));
  }
};

test("lifecycle with Watch streaming: create, hibernate on an event, send it, complete", async () => {
  const created = await call(workflows, "Create",
    { tenant: TENANT, workflow: "Deploy", code: ref, params_json: JSON.stringify({ repo: "shop" }) });
  assert.equal(created.tenant, TENANT);
  assert.equal(created.code, ref);
  const stream = workflows.Watch({ tenant: TENANT, id: created.id },
    { deadline: new Date(Date.now() + 30000) });
  const kinds = [];
  let sent = false;
  await new Promise((resolve, reject) => {
    stream.on("data", (event) => {
      kinds.push(event.kind);
      if (event.data_json) JSON.parse(event.data_json);
      if (event.kind === "waiting" && !sent) {
        sent = true;
        call(workflows, "SendEvent", { tenant: TENANT, id: created.id, type: "deploy-approval",
          payload_json: JSON.stringify({ by: "ada" }) }).catch(reject);
      }
    });
    stream.on("end", resolve);
    stream.on("error", reject);
  });
  assert.ok(sent, `never saw a waiting event: ${kinds}`);
  for (const kind of ["step_started", "step_completed", "sleeping", "waiting", "event"]) {
    assert.ok(kinds.includes(kind), `watch kinds ${kinds} lack ${kind}`);
  }
  const done = await call(workflows, "Get", { tenant: TENANT, id: created.id });
  assert.equal(done.status, "STATUS_COMPLETE");
  assert.deepEqual(JSON.parse(done.output_json), { deployed: "shop.tar", by: "ada" });
  assert.deepEqual(done.steps.map((s) => [s.name, s.kind]),
    [["build", "do"], ["cool-down", "sleep"], ["approval", "wait_for_event"]]);
  checkJson(done);
});

test("errors carry the documented codes and say what to do", async () => {
  const S = grpc.status;
  await rejects(call(workflows, "Get", { tenant: TENANT, id: "no-such-instance" }), S.NOT_FOUND);
  await rejects(call(workflows, "Create",
    { tenant: TENANT, workflow: "Deploy", code: ref, params_json: '{"ratio": NaN}' }), S.INVALID_ARGUMENT, /JSON/);
  await rejects(call(workflows, "Create",
    { tenant: TENANT, workflow: "Deploy", code: ref, params_json: '{"max": Infinity}' }), S.INVALID_ARGUMENT);
  await rejects(call(workflows, "Create", { tenant: TENANT, workflow: "Deploy", code: "nonsense" }),
    S.INVALID_ARGUMENT, /code ref/);
  const first = await call(workflows, "Create",
    { tenant: TENANT, workflow: "Deploy", code: ref, id: "node-dup", params_json: '{"repo": "x"}' });
  assert.equal(first.id, "node-dup");
  await rejects(call(workflows, "Create",
    { tenant: TENANT, workflow: "Deploy", code: ref, id: "node-dup", params_json: '{"repo": "y"}' }),
    S.ALREADY_EXISTS);
  // A lone surrogate: protobufjs writes it as bytes that are not UTF-8 (what JavaScript strings allow).
  await rejects(call(workflows, "Get", { tenant: TENANT, id: "bad\ud800id" }), S.INVALID_ARGUMENT);
  await call(workflows, "Terminate", { tenant: TENANT, id: "node-dup" });
});

test("deadlines: a Watch that outlives its deadline ends with DEADLINE_EXCEEDED", async () => {
  const created = await call(workflows, "Create",
    { tenant: TENANT, workflow: "Deploy", code: ref, params_json: '{"repo": "slow"}' });
  await waitFor(created.id, (i) => i.status === "STATUS_WAITING");
  const stream = workflows.Watch({ tenant: TENANT, id: created.id }, { deadline: new Date(Date.now() + 300) });
  const err = await new Promise((resolve) => {
    stream.on("data", () => {});
    stream.on("error", resolve);
    stream.on("end", () => resolve(null));
  });
  assert.ok(err, "the stream ended without an error");
  assert.equal(err.code, grpc.status.DEADLINE_EXCEEDED);
  await call(workflows, "Terminate", { tenant: TENANT, id: created.id });
});

test("NaN and Infinity from tenant code never reach this client", async () => {
  const ratio = await call(workflows, "Create", { tenant: TENANT, workflow: "Ratio", code: ref });
  const caught = await waitFor(ratio.id, (i) => i.status === "STATUS_COMPLETE");
  checkJson(caught);
  assert.deepEqual(JSON.parse(caught.output_json), { step_error: "TypeError" });
  const inf = await call(workflows, "Create", { tenant: TENANT, workflow: "Infinite", code: ref });
  const errored = await waitFor(inf.id, (i) => i.status === "STATUS_ERRORED");
  checkJson(errored);
  assert.match(errored.error.message, /not JSON/);
});
