// One query's batches, as Spark's Structured Streaming tab shows them: rates,
// batch duration by phase, state rows, dropped rows and the watermark, over the
// last batches, with the query's SQL, source offsets, sink and settings.
const KEEP = 100;
const PHASES = ['plan', 'read', 'execute', 'sink', 'commit'];
const COLORS = ['#7a5af8', '#3056d3', '#12805c', '#c4320a', '#667085'];
// Stacked bars: the series are drawn top phase first, each bar reaching up to the sum of
// its phase and those below it, so later (shorter) bars paint the lower segments.
const STACK = PHASES.map((p, i) => i).reverse();
let history = [];
let charts;
let current;

const timeValue = (u, v) => (v == null ? '—' : new Date(v * 1000).toISOString().slice(0, 19));
const timeAxis = () => [{}, { ...brook.secondsAxis, size: 70 }];

function makeCharts() {
  return {
    // Input arrives at thousands of rows/s and is processed at millions: a scale each.
    rates: brook.chart(document.getElementById('chart-rates'), [
      { label: 'input rows/s', stroke: '#3056d3', width: 2, scale: 'input' },
      { label: 'processed rows/s', stroke: '#12805c', width: 2, scale: 'processed' },
    ], { axes: [{}, { ...brook.countAxis, scale: 'input', stroke: '#3056d3' }, { ...brook.countAxis, scale: 'processed', side: 1, stroke: '#12805c', grid: { show: false } }] }),
    durations: brook.chart(document.getElementById('chart-durations'), STACK.map((i) => ({
      label: PHASES[i],
      stroke: COLORS[i],
      fill: COLORS[i],
      paths: uPlot.paths.bars({ size: [0.7, 40] }),
      points: { show: false },
      // The legend shows the phase's own time, not the stacked height.
      value: (u, v, si, row) => (row == null || !history[row] ? '--' : brook.number(history[row].duration_ms[PHASES[i]] || 0, 1)),
    })), { bars: true }),
    state: brook.chart(document.getElementById('chart-state'), [{ label: 'rows in state', stroke: '#dc6803', width: 2 }]),
    dropped: brook.chart(document.getElementById('chart-dropped'), [
      { label: 'malformed', stroke: '#c4320a', width: 2 },
      { label: 'late', stroke: '#7a5af8', width: 2 },
    ]),
    watermark: brook.chart(document.getElementById('chart-watermark'), [
      { label: 'watermark', stroke: '#3056d3', width: 2, value: timeValue },
      { label: 'max event time', stroke: '#12805c', width: 1, value: timeValue },
    ], { axes: timeAxis() }),
  };
}

function at(time) {
  return time ? brook.seconds(time) : null;
}

function draw() {
  const x = history.map((p) => p.batch_id);
  const col = (f) => history.map(f);
  charts.rates.setData([x, col((p) => p.input_rows_per_second), col((p) => p.processed_rows_per_second)]);
  const stacked = (i) => col((p) => PHASES.slice(0, i + 1).reduce((t, ph) => t + (p.duration_ms[ph] || 0), 0));
  charts.durations.setData([x, ...STACK.map(stacked)]);
  charts.state.setData([x, col((p) => p.state_operators.reduce((n, s) => n + s.num_rows_total, 0))]);
  charts.dropped.setData([x, col((p) => p.num_malformed_rows), col((p) => p.num_late_rows)]);
  charts.watermark.setData([x, col((p) => at(p.event_time.watermark)), col((p) => at(p.event_time.max))]);
  document.getElementById('chart-durations').dataset.batches = history.length;
  const last = [...history].reverse().find((p) => p.num_input_rows > 0);
  if (!last) return;
  brook.fill(document.querySelector('#sources tbody'), last.sources.map((s) => [
    s.description, { text: brook.number(s.num_input_rows), num: true }, { text: JSON.stringify(s.offset), cls: 'offset' },
  ]));
  brook.fill(document.querySelector('#sink tbody'), [[last.sink.description, { text: brook.number(last.sink.num_output_rows), num: true }]]);
}

function showInfo(q) {
  document.getElementById('query-name').textContent = q.name;
  document.getElementById('query-sql').textContent = q.sql;
  const items = [
    ['status', q.active ? 'active' : q.exception ? 'failed: ' + q.exception : 'stopped'],
    ['id', q.id], ['output mode', q.output_mode], ['trigger', q.trigger],
    ['source', q.source], ['sink', q.sink], ['checkpoint', q.checkpoint || 'none (restarts from scratch)'],
    ['memory table', q.memory_table || '—'],
  ];
  document.getElementById('query-info').replaceChildren(...items.flatMap(([k, v]) => {
    const dt = document.createElement('dt');
    dt.textContent = k;
    const dd = document.createElement('dd');
    dd.textContent = v;
    if (k === 'status' && !q.active) dd.className = 'inactive';
    return [dt, dd];
  }));
  const stop = document.getElementById('stop');
  stop.hidden = !q.active;
}

function add(p) {
  if (history.some((h) => h.batch_id === p.batch_id)) return;
  history.push(p);
  history.sort((a, b) => a.batch_id - b.batch_id);
  if (history.length > KEEP) history.shift();
}

async function refreshInfo() {
  showInfo(await brook.api('/api/queries/' + encodeURIComponent(current.id)));
}

async function start() {
  const queries = await brook.api('/api/queries');
  const wanted = new URLSearchParams(location.search).get('query');
  current = wanted ? queries.find((q) => q.id === wanted || q.name === wanted) : queries[queries.length - 1];
  document.getElementById('query-tabs').replaceChildren(...queries.map((q) => {
    const a = document.createElement('a');
    a.textContent = q.name;
    a.href = brook.link('/monitor?query=' + encodeURIComponent(q.id));
    if (current && q.id === current.id) a.className = 'current';
    return a;
  }));
  charts = makeCharts();
  if (!current) {
    if (wanted) brook.showError('no query with id or name ' + wanted);
    return;
  }
  showInfo(current);
  // Listen before reading the history, so that no batch falls between the two.
  let loaded = false;
  brook.events((p) => {
    if (p.id !== current.id) return;
    add(p);
    if (loaded) draw();
  });
  (await brook.api('/api/queries/' + encodeURIComponent(current.id) + '/progress?limit=' + KEEP)).forEach(add);
  loaded = true;
  draw();
  document.getElementById('stop').onclick = async () => {
    try {
      showInfo(await brook.api('/api/queries/' + encodeURIComponent(current.id) + '/stop', { method: 'POST' }));
    } catch (e) {
      brook.showError(e);
    }
  };
  // A query that stops or fails by itself sends no more events: look now and then.
  setInterval(() => refreshInfo().catch(brook.showError), 5000);
}

start().catch(brook.showError);
