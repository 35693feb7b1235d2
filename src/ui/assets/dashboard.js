// The order dashboard: buys and sells per second, top clients, top stocks and
// the volume per sector, each redrawn when its query completes a batch; any
// other memory table as a table.
const SECTIONS = {
  buy_sell_per_second: 'buy-sell', top_clients: 'top-clients', top_stocks: 'top-stocks', volume_per_sector: 'sectors',
};
// Rows of volume_per_sector read: its update mode adds each active minute's sectors every batch.
const SECTOR_ROWS = 1000;
const CHART_SECONDS = 180;
const latest = new Map(); // query name -> {last: progress, input: last progress with input rows}
const status = new Map(); // query name -> 'active' | 'stopped' | 'failed'
let buySellChart;

function renderQueries() {
  const rows = [...latest.entries()].sort(([a], [b]) => a.localeCompare(b)).map(([name, { last, input }]) => {
    const p = input || last;
    return [
      name, { text: status.get(name) || '', cls: status.get(name) === 'active' ? '' : 'inactive' },
      { text: last.batch_id, num: true },
      { text: brook.number(p.input_rows_per_second), num: true },
      { text: brook.number(p.processed_rows_per_second), num: true },
      { text: brook.number(p.duration_ms.total || 0, 1), num: true },
      { text: brook.number(last.state_operators.reduce((n, s) => n + s.num_rows_total, 0)), num: true },
      { text: brook.number(p.num_malformed_rows), num: true },
    ];
  });
  brook.fill(document.querySelector('#query-table tbody'), rows);
}

function seen(p) {
  const known = latest.get(p.name) || {};
  if (known.last && known.last.batch_id > p.batch_id) return;
  latest.set(p.name, { last: p, input: p.num_input_rows > 0 ? p : known.input });
}

async function refreshStatus() {
  for (const q of await brook.api('/api/queries')) {
    status.set(q.name, q.active ? 'active' : q.exception ? 'failed' : 'stopped');
  }
  renderQueries();
}

async function drawBuySell() {
  const table = await brook.api('/api/tables/buy_sell_per_second?limit=' + CHART_SECONDS);
  const rows = table.rows.map((r) => [brook.seconds(r.second), r.buys, r.sells]).sort((a, b) => a[0] - b[0]);
  const data = [rows.map((r) => r[0]), rows.map((r) => r[1]), rows.map((r) => r[2])];
  const el = document.getElementById('buy-sell-chart');
  if (!buySellChart) {
    buySellChart = brook.chart(el, [
      { label: 'buys', stroke: '#12805c', width: 2 },
      { label: 'sells', stroke: '#c4320a', width: 2 },
    ], { time: true, xLabel: 'second (UTC)' });
  }
  buySellChart.setData(data);
  el.dataset.points = rows.length;
}

async function drawTopClients() {
  const table = await brook.api('/api/tables/top_clients');
  const rows = [...table.rows].sort((a, b) => b.traded - a.traded || a.client_id - b.client_id);
  brook.fill(document.querySelector('#top-clients tbody'), rows.map((r) => [
    { text: r.client_id, value: r.client_id },
    { text: brook.number(r.traded, 2), num: true, value: r.traded },
  ]));
}

async function drawTopStocks() {
  // Each closed window appends its five rows; show the newest window.
  const table = await brook.api('/api/tables/top_stocks?limit=50');
  const last = table.rows.reduce((m, r) => (r.window_end > m ? r.window_end : m), '');
  const rows = table.rows.filter((r) => r.window_end === last).sort((a, b) => a.rank - b.rank);
  const section = document.getElementById('top-stocks');
  section.querySelector('.waiting').hidden = rows.length > 0;
  document.getElementById('top-stocks-window').textContent = last ? '(hour to ' + last.replace('T', ' ') + ' UTC)' : '';
  section.dataset.windowEnd = last;
  brook.fill(section.querySelector('tbody'), rows.map((r) => [
    { text: r.rank, value: r.rank },
    { text: r.symbol, value: r.symbol },
    { text: brook.number(r.shares), num: true, value: r.shares },
  ]));
}

// The latest minute's sectors, by shares. A minute's counts only grow, and
// each batch adds them again: a sector's largest are its latest.
function latestSectors(rows) {
  const minute = rows.reduce((m, r) => (r.minute > m ? r.minute : m), '');
  const bySector = new Map();
  for (const r of rows.filter((x) => x.minute === minute)) {
    const known = bySector.get(r.sector);
    if (!known || r.shares > known.shares) bySector.set(r.sector, r);
  }
  const sectors = [...bySector.values()].sort((a, b) => b.shares - a.shares || a.sector.localeCompare(b.sector));
  return { minute, sectors };
}

async function drawSectors() {
  const table = await brook.api('/api/tables/volume_per_sector?limit=' + SECTOR_ROWS);
  const { minute, sectors } = latestSectors(table.rows);
  const section = document.getElementById('sectors');
  section.querySelector('.waiting').hidden = sectors.length > 0;
  document.getElementById('sectors-minute').textContent = minute ? '(minute from ' + minute.replace('T', ' ') + ' UTC, so far)' : '';
  section.dataset.minute = minute;
  brook.fill(section.querySelector('tbody'), sectors.map((r) => [
    { text: r.sector, value: r.sector },
    { text: brook.number(r.orders), num: true, value: r.orders },
    { text: brook.number(r.shares), num: true, value: r.shares },
  ]));
}

async function drawOther(name) {
  const table = await brook.api('/api/tables/' + encodeURIComponent(name) + '?limit=20');
  let section = document.getElementById('table-' + name);
  if (!section) {
    section = document.createElement('section');
    section.id = 'table-' + name;
    section.className = 'panel wide';
    section.innerHTML = '<h2></h2><table class="data"><thead><tr></tr></thead><tbody></tbody></table>';
    section.querySelector('h2').textContent = name;
    section.querySelector('thead tr').replaceChildren(...table.columns.map((c) => {
      const th = document.createElement('th');
      th.textContent = c.name;
      return th;
    }));
    document.getElementById('other-tables').append(section);
  }
  section.querySelector('h2').textContent = name + ' (last ' + table.rows.length + ' of ' + table.num_rows + ' rows)';
  brook.fill(section.querySelector('tbody'), table.rows.map((r) => table.columns.map((c) => {
    const v = r[c.name];
    if (v === null || v === undefined) return '';
    if (typeof v === 'number') return { text: Number.isInteger(v) ? String(v) : brook.number(v, 2), num: true };
    return typeof v === 'object' ? JSON.stringify(v) : String(v);
  })));
}

const DRAW = {
  buy_sell_per_second: drawBuySell, top_clients: drawTopClients, top_stocks: drawTopStocks, volume_per_sector: drawSectors,
};
const tables = new Map(); // query name -> memory table
const drawing = new Map(); // memory table -> {busy, again}

// A redraw per table at a time; batches completing meanwhile ask for one more.
async function redraw(table) {
  const state = drawing.get(table) || { busy: false, again: false };
  drawing.set(table, state);
  if (state.busy) { state.again = true; return; }
  state.busy = true;
  try {
    do {
      state.again = false;
      await (DRAW[table] || (() => drawOther(table)))();
    } while (state.again);
  } catch (e) {
    brook.showError(e);
  } finally {
    state.busy = false;
  }
}

async function start() {
  const queries = await brook.api('/api/queries');
  for (const q of queries) {
    if (q.memory_table) tables.set(q.name, q.memory_table);
  }
  const shown = new Set(tables.values());
  for (const [table, section] of Object.entries(SECTIONS)) {
    document.getElementById(section).hidden = !shown.has(table);
  }
  // Listen before reading, so that no batch falls between the two.
  brook.events((p) => {
    seen(p);
    renderQueries();
    if (tables.has(p.name)) redraw(tables.get(p.name));
  });
  const progress = await Promise.all(queries.map((q) => brook.api('/api/queries/' + q.id + '/progress')));
  progress.flat().forEach(seen);
  await refreshStatus();
  // Queries stopped elsewhere send no more events: look now and then.
  setInterval(() => refreshStatus().catch(brook.showError), 5000);
  const names = [...new Set(tables.values())].sort();
  await Promise.all(names.map(redraw));
}

start().catch(brook.showError);
