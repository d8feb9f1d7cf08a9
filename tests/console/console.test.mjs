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

  console.log("open: the kernel lists the tenants this token may see (--list-tenants); pick one");
  await page.fill("#open-token", TOKEN);
  await page.waitForSelector("#tenant-pick:not(.hidden)");
  const offered = await page.locator("#tenant-picker option").evaluateAll((os) => os.map((o) => o.value).filter(Boolean));
  assert.deepEqual(offered, [TENANT, `${TENANT}-eu`], "only the tenants the token's patterns allow");
  assert.match(await text("#tenant-picker"), /acme · \d+ instances, \d+ live, 2 schedules/);
  await page.fill("#open-tenant", "");
  await page.selectOption("#tenant-picker", TENANT);
  assert.equal(await page.inputValue("#open-tenant"), TENANT);
  await page.click("#open-form button");
  await page.waitForSelector("#instances");
  problems.length = 0; // the browser logs the 401s of the wrong token and of listing without one: expected

  console.log("playground: the editor highlights Python as it is typed");
  await page.goto(`${CONSOLE_URL}#/playground`);
  await page.waitForSelector(".editor pre.highlighted .tk-kw");
  await page.fill("#editor", "@dataclass\nclass Late(Base):  # note\n    x = '''many\nlines''' + 0x1F\n");
  await page.waitForSelector(".editor .tk-def:has-text('Late')");
  const tokens = await page.locator(".editor pre.highlighted span").evaluateAll((ss) => ss.map((s) => [s.className, s.textContent]));
  assert.deepEqual(tokens, [["tk-dec", "@dataclass"], ["tk-kw", "class"], ["tk-def", "Late"], ["tk-com", "# note"],
    ["tk-str", "'''many\nlines'''"], ["tk-num", "0x1F"]]);
  await page.focus("#editor");
  await page.keyboard.press("Control+End");
  await page.keyboard.press("Tab");
  assert.match(await page.inputValue("#editor"), / {4}$/, "Tab inserts four spaces");

  console.log("playground: write a workflow that waits, Run, see it wait");
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
  await page.waitForSelector("#output .tk-key", { state: "attached" }); // outputs are highlighted JSON
  console.log("instance page: each step's times and duration, the inbox and who read it");
  for (const [step, attempts] of [["draft", "1"], ["approval", "0"], ["ship", "1"]]) { // a wait makes no attempt
    const row = `#steps tr[data-step='${step}']`;
    await page.waitForSelector(`${row} td.duration:not(:empty)`);
    assert.match(await text(`${row} td.duration`), /^\d+(\.\d)? (ms|s)$/, step);
    assert.match(await text(`${row} td.started`), /\d/, step);
    assert.equal(await text(`${row} td.attempts`), attempts, step);
  }
  await page.waitForSelector("#events tr[data-event='approved'] .read-by:has-text('step approval')");
  assert.deepEqual(JSON.parse(await text("#events tr[data-event='approved'] pre")), { by: "ada" });
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

  console.log("schedules: next and last fires, the last instance, pause and resume; delete asks");
  await page.click("nav a[data-page='schedules']");
  const hourly = "#schedules tr[data-schedule='hourly-report']";
  const ticking = "#schedules tr[data-schedule='every-second']";
  await page.waitForSelector(`${hourly}[data-paused='false']`);
  assert.match(await text(`${hourly} td.next-fire`), /\d/);
  assert.match(await text(`${hourly} .upcoming`), /then /);
  assert.match(await text(`${hourly}`), /Europe\/Paris/);
  assert.match(await text(`${ticking} td.fires`), /[1-9]\d* fired/);
  await page.waitForSelector(`${ticking}[data-paused='true'] .last-instance a`);
  await page.click(`${hourly} [data-action='pause']`);
  await page.waitForSelector(`${hourly}[data-paused='true'] [data-status='PAUSED']`);
  await page.click(`${hourly} [data-action='resume']`);
  await page.waitForSelector(`${hourly}[data-paused='false'] [data-status='ACTIVE']`);
  page.once("dialog", (dialog) => { asked = dialog.message(); dialog.dismiss(); });
  await page.click(`${hourly} [data-action='delete']`);
  assert.match(asked, /Delete schedule hourly-report/);
  await page.waitForSelector(hourly); // dismissed: still there
  await shot("schedules");
  await page.click(`${ticking} .last-instance a`);
  await status("#instance-status", "ERRORED");

  assert.deepEqual(problems, [], "no script errors on any page");
  console.log("console browser test: ok");
} finally {
  await browser.close();
}
