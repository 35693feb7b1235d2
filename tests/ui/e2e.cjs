// Drives the demo's pages in headless Chromium: the dashboard (its top clients,
// top stocks and volume per sector) fills and agrees with the memory tables, the monitor's batch chart grows, nothing outside
// 127.0.0.1 is fetched. Usage: node e2e.cjs URL ARTIFACT_DIR CHROMIUM
const { chromium } = require('playwright-core');

const [url, artifacts, chromiumPath] = process.argv.slice(2);
const fail = (message) => { throw new Error(message); };

// The rows the page shows, as text, and the rows it should show, read from the
// memory tables in the same turn so that no batch lands between the two.
async function shownAndExpected(page) {
  return page.evaluate(async () => {
    const cells = (sel) => [...document.querySelectorAll(sel + ' tbody tr')]
      .map((tr) => [...tr.querySelectorAll('td')].map((td) => td.textContent));
    const shown = { clients: cells('#top-clients'), stocks: cells('#top-stocks'), sectors: cells('#sectors') };
    const get = async (name) => (await (await fetch('/api/tables/' + name)).json()).rows;
    const [clients, stocks, sectorRows] = await Promise.all([get('top_clients'), get('top_stocks'), get('volume_per_sector')]);
    const money = (n) => n.toLocaleString('en-US', { minimumFractionDigits: 2, maximumFractionDigits: 2 });
    // The top stocks of the hour that closed last: the newest window's ranks 1 to 5.
    const newest = stocks.map((r) => r.window_end).sort().pop();
    // Each sector of the latest minute, with its largest (latest) counts, by shares.
    const minute = sectorRows.map((r) => r.minute).sort().pop();
    const sectors = new Map();
    for (const r of sectorRows.filter((x) => x.minute === minute)) {
      const [orders, shares] = sectors.get(r.sector) || [0, 0];
      sectors.set(r.sector, [Math.max(orders, r.orders), Math.max(shares, r.shares)]);
    }
    const expected = {
      clients: clients.map((r) => [String(r.client_id), money(r.traded)]),
      stocks: stocks.filter((r) => r.window_end === newest).sort((a, b) => a.rank - b.rank)
        .map((r) => [String(r.rank), r.symbol, r.shares.toLocaleString('en-US')]),
      sectors: [...sectors].sort(([a, x], [b, y]) => y[1] - x[1] || a.localeCompare(b))
        .map(([sector, [orders, shares]]) => [sector, orders.toLocaleString('en-US'), shares.toLocaleString('en-US')]),
    };
    return { shown, expected };
  });
}

(async () => {
  const browser = await chromium.launch({
    executablePath: chromiumPath,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  const outside = [];
  const errors = [];
  try {
    const page = await browser.newPage({ viewport: { width: 1400, height: 1100 } });
    page.on('request', (r) => { if (new URL(r.url()).hostname !== '127.0.0.1') outside.push(r.url()); });
    page.on('pageerror', (e) => errors.push(String(e)));
    page.on('console', (m) => { if (m.type() === 'error') errors.push(m.text()); });
    page.on('response', (r) => { if (r.status() >= 400) errors.push(r.status() + ' ' + r.url()); });

    await page.goto(url);
    await page.waitForFunction(() => Number(document.getElementById('buy-sell-chart').dataset.points) >= 3,
      null, { timeout: 60000 });
    if (await page.locator('#buy-sell-chart canvas').count() !== 1) fail('the buy/sell chart has no canvas');
    await page.waitForFunction(() => document.querySelectorAll('#top-clients tbody tr').length === 5
      && document.querySelectorAll('#top-stocks tbody tr').length === 5
      && document.querySelectorAll('#sectors tbody tr').length > 5, null, { timeout: 90000 });

    let last;
    for (let attempt = 0; attempt < 20; attempt += 1) {
      last = await shownAndExpected(page);
      if (JSON.stringify(last.shown) === JSON.stringify(last.expected)) break;
      await page.waitForTimeout(250);
    }
    if (JSON.stringify(last.shown) !== JSON.stringify(last.expected)) {
      fail('the page disagrees with the memory tables: ' + JSON.stringify(last));
    }
    console.log('top clients', JSON.stringify(last.shown.clients));
    console.log('top stocks', JSON.stringify(last.shown.stocks));
    console.log('sectors', JSON.stringify(last.shown.sectors));
    await page.screenshot({ path: artifacts + '/dashboard.png', fullPage: true });

    await page.click('#nav-monitor');
    await page.waitForURL(/\/monitor/);
    const batches = () => page.evaluate(() => Number(document.getElementById('chart-durations').dataset.batches));
    await page.waitForFunction(() => Number(document.getElementById('chart-durations').dataset.batches) > 0,
      null, { timeout: 30000 });
    const before = await batches();
    await page.waitForFunction((n) => Number(document.getElementById('chart-durations').dataset.batches) > n,
      before, { timeout: 30000 });
    console.log('monitor batches', before, '->', await batches());
    const sql = await page.textContent('#query-sql');
    if (!sql.includes('SELECT')) fail('the monitor shows no SQL: ' + sql);
    await page.screenshot({ path: artifacts + '/monitor.png', fullPage: true });
  } finally {
    await browser.close();
  }
  if (outside.length) fail('requests beyond 127.0.0.1: ' + outside.join(', '));
  if (errors.length) fail('errors in the page: ' + errors.join('; '));
  console.log('ok');
})().catch((e) => {
  console.error(e);
  process.exit(1);
});
