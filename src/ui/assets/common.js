// What both pages share: the API token from the page's address, JSON calls,
// the event stream of batch progress, tables and charts.
const brook = (() => {
  const token = new URLSearchParams(location.search).get('token');

  function link(path) {
    if (!token) return path;
    return path + (path.includes('?') ? '&' : '?') + 'token=' + encodeURIComponent(token);
  }

  async function api(path, init) {
    const response = await fetch(link(path), init);
    const body = await response.json();
    if (!response.ok) throw new Error(body.error || response.statusText);
    return body;
  }

  // Calls onProgress with each completed batch's progress record.
  function events(onProgress) {
    const status = document.getElementById('status');
    const source = new EventSource(link('/api/events'));
    source.onopen = () => { status.textContent = 'live'; };
    source.onerror = () => { status.textContent = 'reconnecting…'; };
    source.addEventListener('progress', (e) => onProgress(JSON.parse(e.data)));
    return source;
  }

  // Fills a table body with rows of cells; a cell is text or {text, num, value}.
  function fill(tbody, rows) {
    tbody.replaceChildren(...rows.map((cells) => {
      const tr = document.createElement('tr');
      for (const cell of cells) {
        const td = document.createElement('td');
        const c = typeof cell === 'object' && cell !== null ? cell : { text: cell };
        td.textContent = c.text ?? '';
        if (c.num) td.className = 'num';
        if (c.cls) td.className = c.cls;
        if (c.value !== undefined) td.dataset.value = c.value;
        tr.append(td);
      }
      return tr;
    }));
  }

  function number(n, digits = 0) {
    return Number(n).toLocaleString('en-US', { minimumFractionDigits: digits, maximumFractionDigits: digits });
  }

  // Arrow writes timestamps without a zone; the engine's are UTC.
  function seconds(timestamp) {
    return Date.parse(/[zZ]|[+-]\d\d:?\d\d$/.test(timestamp) ? timestamp : timestamp + 'Z') / 1000;
  }

  function compact(n) {
    const a = Math.abs(n);
    if (a >= 1e6) return (n / 1e6).toFixed(a >= 1e7 ? 0 : 1) + 'M';
    if (a >= 1e4) return (n / 1e3).toFixed(0) + 'k';
    return n.toLocaleString('en-US');
  }

  const clock = (t) => new Date(t * 1000).toISOString().slice(11, 19);
  // Whole seconds at least: the default would label sub-second ticks on a short chart.
  const secondsAxis = { values: (u, ticks) => ticks.map(clock), incrs: [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 1800, 3600], space: 70 };
  const countAxis = {
    size: 70,
    values: (u, ticks) => {
      const short = ticks.map(compact);
      return new Set(short).size === short.length ? short : ticks.map((t) => t.toLocaleString('en-US'));
    },
  };

  // A uPlot chart that fills its element's width and follows window resizes.
  function chart(el, series, opts = {}) {
    const size = () => ({ width: Math.max(el.clientWidth, 300), height: 240 });
    const plot = new uPlot({
      ...size(),
      tzDate: (ts) => uPlot.tzDate(new Date(ts * 1000), 'Etc/UTC'),
      series: [{ label: opts.xLabel || 'batch' }, ...series],
      // Bars need half a step of room at either end, or the outer ones are cut in half.
      scales: { x: opts.bars ? { time: false, range: (u, min, max) => [min - 0.5, max + 0.5] } : { time: !!opts.time } },
      axes: opts.axes || [opts.time ? secondsAxis : {}, countAxis],
      legend: { live: true },
    }, [[], ...series.map(() => [])], el);
    window.addEventListener('resize', () => plot.setSize(size()));
    return plot;
  }

  function showError(e) {
    const el = document.getElementById('error');
    el.hidden = false;
    el.textContent = String(e.message || e);
  }

  for (const a of document.querySelectorAll('header nav a')) a.href = link(a.getAttribute('href'));

  return { api, link, events, fill, number, seconds, chart, showError, secondsAxis, countAxis };
})();
