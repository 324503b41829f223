// Drives `pgtrail serve`'s page in Debian's Chromium (playwright-core; the browser is the
// system's, never downloaded) the way a support engineer would, and reports what the page
// showed, one JSON object per line on stdout. It asserts nothing itself: the Rust test
// (tools/tests/serve.rs) compares every report with what PostgreSQL held.
//
//   node page.mjs --url http://127.0.0.1:8432/ --table public.customers --key 3 \
//        --as-of-version 1 --context user_id=7 [--live] [--screenshot page.png]
//
// With --live it ticks "live", prints {"step":"live-ready"} and waits (up to a minute) for a
// change to appear at the top of the changes list; the caller makes that change.
import { chromium } from "playwright-core";

function options(argv) {
  const o = { live: false };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === "--live") o.live = true;
    else if (a.startsWith("--")) o[a.slice(2).replace(/-(.)/g, (_, c) => c.toUpperCase())] = argv[++i];
  }
  for (const required of ["url", "table", "key"]) {
    if (!o[required]) throw new Error(`--${required} is required`);
  }
  return o;
}

const report = (step, fields) => process.stdout.write(JSON.stringify({ step, ...fields }) + "\n");

// Rows of a table element as arrays of cell texts, with each cell's class.
const cells = (locator) => locator.evaluate((table) =>
  [...table.querySelectorAll("tbody tr")].map((tr) =>
    [...tr.children].map((td) => ({ text: td.textContent, class: td.className }))));

async function main() {
  const o = options(process.argv.slice(2));
  // Flags as measured on these machines: without the background-networking ones, Chromium
  // keeps dialing Google's hosts through a closed network. Playwright gives the browser a
  // new empty profile of its own.
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
  try {
    const page = await browser.newPage({ viewport: { width: 1366, height: 900 } });
    // Script errors and CSP violations end up here; the test requires none.
    const problems = [];
    page.on("pageerror", (e) => problems.push(String(e)));
    page.on("console", (m) => { if (m.type() === "error") problems.push(m.text()); });
    page.setDefaultTimeout(30_000);

    await page.goto(o.url);
    const tables = page.locator("nav button[data-table]");
    await tables.first().waitFor();
    report("tables", { tables: await tables.evaluateAll((bs) => bs.map((b) => b.dataset.table)) });

    // Pick the table with the mouse, type the key and press Enter: the keyboard path.
    await page.locator(`nav button[data-table="${o.table}"]`).click();
    await page.locator("#key").fill(o.key);
    await page.locator("#key").press("Enter");
    const versions = page.locator("#timeline article.version");
    await versions.first().waitFor();
    const shown = [];
    for (const v of await versions.all()) {
      shown.push({
        op: await v.locator(".op").textContent(),
        committed_at: await v.locator("time").textContent(),
        who: await v.locator(".who").textContent(),
        columns: await v.locator("thead th").allTextContents(),
        rows: await cells(v.locator("table")),
      });
    }
    report("history", { title: await page.locator("#timeline h2").textContent(), versions: shown });

    if (o.asOfVersion !== undefined) {
      // Versions are shown newest first; the test names one by its index in that order.
      await versions.nth(Number(o.asOfVersion)).getByRole("button", { name: "table as of this version" }).click();
      const table = page.locator("#asof-table");
      await table.waitFor();
      report("as_of", {
        title: await page.locator("#asof h2").textContent(),
        columns: await table.locator("thead th").allTextContents(),
        rows: (await cells(table)).map((r) => r.map((c) => c.text)),
      });
    }

    if (o.context) {
      // What one user did in any table.
      await page.locator("#scope").selectOption("");
      await page.locator("#context").fill(o.context);
      // Wait for the list that answers this filter, not the one already on the page.
      const answered = page.waitForResponse((r) => r.url().includes("/api/changes?") && r.url().includes("context."));
      await page.getByRole("button", { name: "Filter" }).click();
      await answered;
      await page.waitForTimeout(100);
      report("filtered", { rows: (await cells(page.locator("#changes"))).map((r) => r.map((c) => c.text)) });
      if (o.live) await page.locator("#context").fill("");
    }

    if (o.live) {
      const before = await page.locator("#changes tbody tr.new").count();
      // The stream is open once the server has answered its request (waited for from
      // before the click: the answer can come before the click returns).
      const open = page.waitForResponse((r) => r.url().includes("/api/stream"));
      await page.locator("#live").check();
      await open;
      report("live-ready", {});
      const fresh = page.locator("#changes tbody tr.new");
      await fresh.nth(before).waitFor({ timeout: 60_000 });
      report("live", {
        row: await fresh.first().evaluate((tr) => [...tr.children].map((td) => td.textContent)),
        position: await page.locator("#position").textContent(),
      });
    }

    if (o.screenshot) {
      await page.screenshot({ path: o.screenshot, fullPage: false });
      report("screenshot", { path: o.screenshot });
    }
    report("done", { problems });
  } finally {
    await browser.close();
  }
}

main().catch((e) => {
  process.stderr.write(`page.mjs: ${e.stack || e}\n`);
  process.exit(1);
});
