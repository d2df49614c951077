// Drives Debian's chromium through the agent's live page like a person would, and prints what
// the page showed as one JSON object: `node page.mjs URL OUTDIR [AGENT_PID]` (screenshot:
// OUTDIR/page.png). With AGENT_PID it then stops the agent (SIGTERM) and reads the page again.
// The assertions live in tests/tests/page.rs; this script only reads, drags and clicks.
import { chromium } from "playwright-core";
import path from "node:path";

const [url, outdir, agentPid] = process.argv.slice(2);
if (!url || !outdir) {
  console.error("usage: node page.mjs URL OUTDIR [AGENT_PID]");
  process.exit(2);
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// The request profile shown under the selection table.
function readProfile(page) {
  return page.evaluate(() => {
    const p = document.getElementById("profile");
    const cells = (tr) => [...tr.cells].map((td) => td.textContent);
    return {
      seq: Number(p.dataset.seq),
      title: p.querySelector("h3")?.textContent ?? "",
      breakdownBars: p.querySelectorAll(".breakdown .track").length,
      timelineCalls: p.querySelectorAll(".timeline .call").length,
      // protocol, peer, operation, outcome, offset, duration
      calls: [...p.querySelectorAll("#calls tbody tr")].map(cells),
      text: p.textContent,
    };
  });
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const out = { url, consoleErrors: [], pageErrors: [] };
try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
  page.on("console", (m) => { if (m.type() === "error") out.consoleErrors.push(m.text()); });
  page.on("pageerror", (e) => out.pageErrors.push(String(e)));

  await page.goto(url);
  await page.waitForSelector("body[data-ready='1']", { timeout: 20000 });
  await page.waitForFunction(() => Number(document.getElementById("xview").dataset.dots) > 0, null, { timeout: 20000 });
  // The page polls every second: wait until its cursor has not moved for two polls, so it
  // has read every record the agent holds.
  let cursor = null, since = Date.now();
  for (const start = Date.now(); Date.now() - since < 2500 && Date.now() - start < 15000;) {
    const c = await page.evaluate(() => document.body.dataset.cursor);
    if (c !== cursor) { cursor = c; since = Date.now(); }
    await sleep(250);
  }

  Object.assign(out, await page.evaluate(() => {
    const data = (sel) => [...document.querySelectorAll(sel)].map((e) => ({ ...e.dataset, text: e.textContent }));
    return {
      ready: document.body.dataset.ready,
      cursor: Number(document.body.dataset.cursor),
      dots: Number(document.getElementById("xview").dataset.dots),
      workers: data("#active .worker").map((w) => ({ ...w, worker: Number(w.worker), pid: Number(w.pid) })),
      routes: [...document.querySelectorAll("#routes tbody tr")].map((tr) => ({
        ...tr.dataset, requests: Number(tr.dataset.requests), routeText: tr.querySelector("td.route").textContent,
      })),
      unreachableShown: !document.getElementById("unreachable").hidden,
      missedShown: !document.getElementById("missed").hidden,
      // Set only if a hostile route, peer or operation ran as script.
      xss: window.__xss ?? null,
    };
  }));

  // Sorting: a click on the requests header orders the route rows by it, largest first.
  await page.click("#routes th[data-key='requests']");
  out.routesByRequests = await page.evaluate(() =>
    [...document.querySelectorAll("#routes tbody tr")].map((tr) => Number(tr.dataset.requests)));

  // Box-select: a real mouse drag from the canvas's top-left corner to its bottom-right one.
  const box = await page.locator("#xview").boundingBox();
  await page.mouse.move(box.x + 2, box.y + 2);
  await page.mouse.down();
  await page.mouse.move(box.x + box.width / 2, box.y + box.height / 2, { steps: 5 });
  await page.mouse.move(box.x + box.width - 2, box.y + box.height - 2, { steps: 5 });
  await page.mouse.up();
  out.dotsAtSelection = Number(await page.locator("#xview").getAttribute("data-dots"));
  out.selected = Number(await page.locator("#selection").getAttribute("data-selected"));
  out.selectionRows = await page.locator("#selection tbody tr").count();

  if (out.selectionRows > 0) {
    const first = page.locator("#selection tbody tr").first();
    out.firstRowSeq = Number(await first.getAttribute("data-seq"));
    await first.click();
    await page.waitForSelector("#profile:not([hidden])", { timeout: 15000 });
    out.profile = await readProfile(page);
    // And the first request that made downstream calls, for its list of calls.
    const withCalls = page.locator("#selection tbody tr:not([data-calls='0'])").first();
    if (await withCalls.count() > 0) {
      await withCalls.click();
      await page.waitForFunction((seq) => document.getElementById("profile").dataset.seq === seq,
        await withCalls.getAttribute("data-seq"), { timeout: 15000 });
      out.callsProfile = await readProfile(page);
    }
  }
  await page.screenshot({ path: path.join(outdir, "page.png"), fullPage: true });
  out.screenshot = path.join(outdir, "page.png");

  if (agentPid) {
    // The agent goes away: the page must say so, and throw nothing. The browser's own
    // messages about the refused connections are kept apart from any other error.
    const before = out.consoleErrors.length;
    process.kill(Number(agentPid), "SIGTERM");
    await page.waitForSelector("#unreachable:not([hidden])", { timeout: 10000 });
    await sleep(2500); // two more polls against the dead agent
    out.unreachableAfterStop = !(await page.locator("#unreachable").evaluate((e) => e.hidden));
    out.consoleErrorsAfterStop = out.consoleErrors.splice(before);
  }
} catch (e) {
  out.driverError = String(e && e.stack || e);
} finally {
  await browser.close();
}
console.log(JSON.stringify(out));
