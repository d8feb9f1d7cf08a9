// The console in headless Chromium against a real kernel (started by
// tests/kernel/test_console_browser.py, which also seeds the instances this reads).
// Env: CONSOLE_URL, CHROMIUM, TENANT, TOKEN, WAITING (how many seeded instances wait), SCREENSHOTS (a dir).
import assert from "node:assert/strict";
import path from "node:path";
import { chromium } from "playwright-core";

const { CONSOLE_URL, CHROMIUM, TENANT, TOKEN, SCREENSHOTS } = process.env;
const WAITING = Number(process.env.WAITING);
const TIMEOUT = 30_000;

const browser = await chromium.launch({
  executablePath: CHROMIUM,
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run"],
});
const problems = [];
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  page.setDefaultTimeout(TIMEOUT);
  page.on("pageerror", (exc) => problems.push(`page error: ${exc.message}`));
  page.on("console", (msg) => { if (msg.type() === "error") problems.push(`console error: ${msg.text()}`); });
  const shot = (name) => page.screenshot({ path: path.join(SCREENSHOTS, `${name}.png`), fullPage: true });
  const text = (selector) => page.locator(selector).innerText();
  const status = (selector, value) => page.waitForSelector(`${selector} [data-status="${value}"]`);

  console.log("open: a wrong token is refused and the console asks again");
  await page.goto(CONSOLE_URL);
  await page.fill("#open-tenant", TENANT);
  await page.fill("#open-token", "tf_not-a-token");
  await page.click("#open-form button");
  await page.waitForSelector("#open-form ~ .error:has-text('unauthenticated')");
  problems.length = 0; // the browser logs the 401 itself: expected here
  await page.fill("#open-tenant", TENANT);
  await page.fill("#open-token", TOKEN);
  await page.click("#open-form button");
  await page.waitForSelector("#instances");

  console.log("playground: write a workflow that waits, Run, see it wait");
  await page.goto(`${CONSOLE_URL}#/playground`);
  await page.fill("#editor", [
    "from tenantflow.workflow import WorkflowEntrypoint",
    "",
    "class Approval(WorkflowEntrypoint):",
    "    async def run(self, event, step):",
    "        draft = await step.do('draft', lambda: 'release ' + event.payload['version'])",
    "        print('drafted', draft)",
    "        got = await step.wait_for_event('approval', type='approved', timeout='1 hour')",
    "        return await step.do('ship', lambda: {'shipped': draft, 'by': got['payload']['by']})",
    "",
  ].join("\n"));
  await page.fill("#params-json", '{"version": "2.1"}');
  await page.click("#run");
  await status("#run-status", "WAITING");
  await page.waitForSelector("#run-steps [data-step='approval'][data-status='waiting']");
  assert.equal(await page.inputValue("#run-card .event-type"), "approved", "the box names the awaited type");
  await page.waitForSelector("#run-log li[data-kind='log']");
  assert.match(await text("#run-log"), /drafted release 2\.1/);
  await shot("playground-waiting");

  console.log("playground: send the event from the page, see it complete with its output");
  await page.fill("#run-card .event-payload", '{"by": "ada"}');
  await page.click("#run-card .send-event-button");
  await status("#run-status", "COMPLETE");
  assert.deepEqual(JSON.parse(await text("#run-output")), { shipped: "release 2.1", by: "ada" });
  await page.waitForSelector("#run-steps [data-step='ship'][data-status='complete']");
  await page.waitForSelector("#run-card .send-event.hidden", { state: "attached" });
  await shot("playground");

  console.log("instance page: status, code, params, output, steps and the timeline");
  await page.click("#run-card h2 a");
  await status("#instance-status", "COMPLETE");
  assert.match(await text("#details"), /artifact:\/\/.*@sha256:/);
  assert.deepEqual(JSON.parse(await text("#params")), { version: "2.1" });
  assert.deepEqual(JSON.parse(await text("#output")), { shipped: "release 2.1", by: "ada" });
  assert.equal(await page.locator("#steps tr[data-step]").count(), 3);
  await page.waitForSelector("#timeline li[data-kind='event']");
  await page.waitForSelector("#live:has-text('ended')");
  await shot("instance");

  console.log("instances: filter by status, see the count, page forward and back");
  await page.goto(`${CONSOLE_URL}#/instances`);
  await page.selectOption("#filter-status", "WAITING");
  await page.selectOption("#filter-size", "10");
  await page.click("#filter-apply");
  await page.waitForSelector(`#count:has-text("${WAITING} instances")`);
  await page.waitForFunction(() => document.querySelectorAll("#instances tbody tr[data-id]").length === 10);
  assert.equal(await page.locator("#instances [data-status]:not([data-status='WAITING'])").count(), 0);
  assert.ok(await page.isDisabled("#page-prev"));
  await shot("instances");
  const first = await page.locator("#instances tbody tr[data-id]").first().getAttribute("data-id");
  await page.click("#page-next");
  await page.waitForSelector("#page-number:has-text('page 2')");
  assert.equal(await page.locator("#instances tbody tr[data-id]").count(), WAITING - 10);
  assert.ok(await page.isDisabled("#page-next"));
  await page.click("#page-prev");
  await page.waitForSelector("#page-number:has-text('page 1')");
  assert.equal(await page.locator("#instances tbody tr[data-id]").first().getAttribute("data-id"), first);
  await page.selectOption("#filter-status", "COMPLETE");
  await page.click("#filter-apply");
  await page.waitForSelector("#count:has-text('1 instance')");

  console.log("instance page: pause, resume, and terminate after confirming");
  await page.goto(`${CONSOLE_URL}#/instance/${encodeURIComponent(first)}`);
  await status("#instance-status", "WAITING");
  await page.click("[data-action='pause']");
  await status("#instance-status", "PAUSED");
  await page.click("[data-action='resume']");
  await page.waitForSelector("#instance-status [data-status]:not([data-status='PAUSED'])");
  await status("#instance-status", "WAITING");
  let asked = "";
  page.once("dialog", (dialog) => { asked = dialog.message(); dialog.dismiss(); });
  await page.click("[data-action='terminate']");
  assert.match(asked, /Terminate/);
  await page.waitForTimeout(300); // dismissed: nothing may change
  await status("#instance-status", "WAITING");
  page.once("dialog", (dialog) => dialog.accept());
  await page.click("[data-action='terminate']");
  await status("#instance-status", "TERMINATED");
  await page.waitForSelector("#timeline li[data-kind='status']:has-text('terminated')");
  await shot("instance-terminated");

  assert.deepEqual(problems, [], "no script errors on any page");
  console.log("console browser test: ok");
} finally {
  await browser.close();
}
