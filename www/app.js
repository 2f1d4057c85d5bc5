// The playground page: controls, streamed output, and the model list. All model work
// runs in worker.js; this file only posts messages to it and renders what comes back.
// Model output is always inserted as text (textContent), never as HTML.

const $ = (id) => document.getElementById(id);

const worker = new Worker(new URL('./worker.js', import.meta.url), { type: 'module' });

const state = {
  staged: [], // {name, role: 'base' | 'arm', origin, files: [{name, url, size, optional} | {name, file}]}
  info: null,
  alphas: [],
  loading: false,
  running: false,
  runs: {},
  // The weights the guided run started with: the base-only column is scored with them.
  runAlphas: [],
  // Tokens per column with their values, for the token detail line.
  tokens: { guided: [], base: [] },
  // Download speed: when and at how many bytes the current load began.
  download: null,
  // The staged sources in the loaded session and the role each was loaded in.
  loadedRoles: new Map(),
  pendingRoles: new Map(),
};

// Files the loaders read; anything else in a picked folder stays on disk.
const MODEL_FILES = /(\.gguf|\.safetensors|^(config|tokenizer|tokenizer_config|generation_config|adapter_config|genarm|model\.safetensors\.index)\.json)$/i;

// Generate is enabled only while a base is loaded and nothing runs; the model list
// cannot change under a load or a run.
function setState(s) {
  document.body.dataset.state = s;
  document.body.classList.toggle('loaded', !!state.info);
  const busy = s === 'loading' || s === 'generating';
  $('generate').disabled = s !== 'ready' || !state.info;
  $('stop').disabled = s !== 'generating';
  $('load').disabled = busy;
  $('demo').disabled = busy;
  $('download-go').disabled = busy;
  renderStaged();
  renderSummary();
}

// The model list folded into one line once a base is loaded (the prompt and output then
// come first); open whenever nothing is loaded or something went wrong.
function renderSummary() {
  const text = state.info
    ? `${state.info.base}${state.info.arms.length ? ` + ${state.info.arms.map((a) => a.name).join(', ')}` : ''}: loaded`
    : document.body.dataset.state === 'loading'
      ? 'loading…'
      : 'nothing loaded';
  $('models-summary').textContent = text;
}

const isBusy = () => ['loading', 'generating'].includes(document.body.dataset.state);

// An error shown next to the control that caused it; empty text hides it.
function fieldError(id, text) {
  const el = $(id);
  el.textContent = text || '';
  el.hidden = !text;
}

function mb(bytes) {
  return `${(bytes / 1e6).toFixed(bytes < 1e7 ? 1 : 0)} MB`;
}

// General notices; those of a scope ('load') are cleared when that action next succeeds.
function notice(level, text, scope = 'general') {
  const li = document.createElement('li');
  li.className = level;
  li.dataset.scope = scope;
  li.textContent = text;
  $('notices').append(li);
  while ($('notices').children.length > 6) $('notices').firstElementChild.remove();
}

function clearNotices(scope) {
  for (const li of Array.from($('notices').children)) if (li.dataset.scope === scope) li.remove();
}

// The engine's messages are written for developers ("x.gguf/x.gguf: not a GGUF file:
// magic [..]"); the visitor gets what happened and what to do.
function inVisitorWords(message) {
  let m = String(message).replace(/([^\s/:]+)\/\1:/g, '$1:');
  m = m.replace(/not a GGUF file: magic \[[^\]]*\][^.;)]*/, 'is not a GGUF model file (it does not start with "GGUF"); choose a .gguf model file');
  m = m.replace(/^(\S+): HTTP 404\b.*$/, '$1 was not found on the server (HTTP 404): check the address');
  m = m.replace(/^(\S+): HTTP (\d+)\b ?(.*)$/, '$1: the server answered HTTP $2 $3: check the address or try again later');
  // The native engine's advice (a Vulkan driver, apt-get) means nothing to a visitor.
  m = m.replace(
    /no WebGPU device: (gpu: )?no WebGPU\/Vulkan adapter found \(.*?\);? ?natively install a Vulkan driver.*?in a browser enable WebGPU/,
    'this browser offered no WebGPU adapter: turn on WebGPU or hardware acceleration in its settings',
  );
  m = m.replace(/;? ?natively install a Vulkan driver.*?in a browser enable WebGPU/, '; turn on WebGPU or hardware acceleration in the browser settings');
  return m;
}

// ---------------------------------------------------------------------------
// The model list
// ---------------------------------------------------------------------------

function sourceBytes(s) {
  return s.files.reduce((n, f) => n + (f.size || (f.file && f.file.size) || 0), 0);
}

function renderStaged() {
  const ul = $('staged');
  ul.replaceChildren();
  state.staged.forEach((s, i) => {
    const li = document.createElement('li');
    const role = document.createElement('select');
    role.setAttribute('aria-label', `role of ${s.name}`);
    for (const [value, label] of [['base', 'base'], ['arm', 'ARM']]) {
      const o = document.createElement('option');
      o.value = value;
      o.textContent = label;
      role.append(o);
    }
    role.value = s.role;
    role.disabled = isBusy();
    role.addEventListener('change', () => {
      s.role = role.value;
      listChanged();
    });
    const name = document.createElement('span');
    name.className = 'name';
    name.textContent = s.name;
    const detail = document.createElement('span');
    detail.className = 'detail';
    const bytes = sourceBytes(s);
    detail.textContent = `${s.origin} · ${s.files.length} file${s.files.length > 1 ? 's' : ''}${bytes ? ` · ${mb(bytes)}` : ''}`;
    const remove = document.createElement('button');
    remove.type = 'button';
    remove.textContent = '×';
    remove.title = `remove ${s.name}`;
    remove.setAttribute('aria-label', `remove ${s.name}`);
    remove.disabled = isBusy();
    remove.addEventListener('click', () => {
      state.staged.splice(i, 1);
      listChanged();
    });
    const status = document.createElement('span');
    const loaded = state.loadedRoles.get(s) === s.role;
    status.className = `state${loaded ? ' loaded' : ''}`;
    status.textContent = loaded ? 'loaded' : 'not loaded (press Load)';
    li.dataset.loaded = String(loaded);
    li.append(role, name, detail, status, remove);
    if (s.error) {
      const error = document.createElement('span');
      error.className = 'item-error';
      error.setAttribute('role', 'alert');
      error.textContent = s.error;
      li.append(error);
    }
    ul.append(li);
  });
}

// A loaded model removed from the list, or given another role, is unloaded: Generate
// never runs something the list no longer shows.
function listChanged() {
  const stillLoaded = [...state.loadedRoles].every(([s, role]) => state.staged.includes(s) && s.role === role);
  if (state.info && !stillLoaded) unload();
  if (!state.info) renderSliders(null);
  renderStaged();
}

function unload() {
  worker.postMessage({ type: 'unload' });
  state.info = null;
  state.loadedRoles = new Map();
  renderSliders(null);
  $('progress').value = 0;
  $('progress-text').textContent = 'nothing loaded: press Load to load the models listed above';
  delete $('progress-text').dataset.fromCache;
  delete $('progress-text').dataset.loadSeconds;
  $('backend').textContent = '—';
  setState('idle');
}

function stage(source) {
  if (!source.role) {
    const isAdapter = source.files.some((f) => f.name === 'adapter_config.json');
    const hasBase = state.staged.some((s) => s.role === 'base');
    source.role = isAdapter || hasBase ? 'arm' : 'base';
  }
  state.staged.push(source);
  renderStaged();
  if (!state.info) renderSliders(null);
}

async function demoManifest() {
  try {
    const r = await fetch('models/demo.json', { cache: 'no-cache' });
    if (r.ok) return await r.json();
  } catch (_) {
    /* fall through */
  }
  notice('warn', 'No demo models on this server: add a model by URL or from your files above.');
  return null;
}

async function stageDemo() {
  const demo = await demoManifest();
  if (!demo) return false;
  state.staged = [
    { ...demo.base, role: 'base', origin: 'demo' },
    ...demo.arms.map((a) => ({ ...a, role: 'arm', origin: 'demo' })),
  ];
  renderStaged();
  renderSliders(null);
  return true;
}

// Whether every file of the staged URL models is in the browser's cache (then loading
// downloads nothing). The worker keeps the cache; the page can read it too.
async function allCached() {
  if (!self.caches) return false;
  try {
    const cache = await caches.open('genarm-models-v1');
    const urls = state.staged.flatMap((s) => s.files.filter((f) => f.url && !f.optional).map((f) => new URL(f.url, location.href).href));
    const hits = await Promise.all(urls.map((u) => cache.match(u)));
    return hits.every(Boolean);
  } catch (_) {
    return false;
  }
}

// Before the first download of the demo: its size, and that it is cached afterwards.
function askBeforeDownload() {
  const bytes = state.staged.reduce((n, s) => n + sourceBytes(s), 0);
  const base = state.staged.find((s) => s.role === 'base');
  const arms = state.staged.filter((s) => s.role === 'arm');
  $('download-notice-text').textContent =
    `The demo downloads ${mb(bytes)} once: the model ${base.name} (${mb(sourceBytes(base))})` +
    `${arms.length ? ` and ${arms.length} ARM${arms.length > 1 ? 's' : ''} (${mb(arms.reduce((n, s) => n + sourceBytes(s), 0))})` : ''}. ` +
    'This browser keeps it, so later visits load it without downloading.';
  $('download-notice').hidden = false;
  $('progress-text').textContent = 'nothing loaded yet';
}

function load() {
  $('download-notice').hidden = true;
  for (const s of state.staged) delete s.error;
  fieldError('load-error', '');
  const bases = state.staged.filter((s) => s.role === 'base');
  if (bases.length !== 1) {
    fieldError('load-error', bases.length ? 'Several models are marked "base": keep one (the role menu or ×).' : 'Add a base model first (a URL, your files, or Demo models).');
    renderStaged();
    return;
  }
  const strip = (s) => ({ name: s.name, files: s.files });
  state.pendingRoles = new Map(state.staged.map((s) => [s, s.role]));
  // The worker frees the loaded session before it reads the new models.
  state.info = null;
  state.loadedRoles = new Map();
  state.loading = true;
  state.download = null;
  renderSliders(null);
  setState('loading');
  $('progress').value = 0;
  $('progress-text').textContent = 'starting…';
  worker.postMessage({
    type: 'load',
    base: strip(bases[0]),
    arms: state.staged.filter((s) => s.role === 'arm').map(strip),
    backend: $('backend-choice').value,
    context: 1024,
  });
}

// URLs: a .gguf file, or a folder holding a LoRA adapter or an HF model.
async function exists(url) {
  try {
    const r = await fetch(url, { method: 'HEAD' });
    return r.ok ? Number(r.headers.get('content-length')) || 0 : null;
  } catch (_) {
    return null;
  }
}

// A .gguf URL is checked before it is listed: its first bytes (a Range request) must
// be GGUF's magic. Returns the file's size when the server tells it.
async function checkGguf(url, name) {
  let r;
  try {
    r = await fetch(url, { headers: { Range: 'bytes=0-3' } });
  } catch (_) {
    throw new Error(`${url} could not be reached: the server is down, you are offline, or it does not let other sites read its files (CORS).`);
  }
  if (r.status === 404) throw new Error(`${url} was not found on the server (HTTP 404): check the address.`);
  if (!r.ok) throw new Error(`${url}: the server answered HTTP ${r.status} ${r.statusText}: check the address or try again later.`);
  const total = r.status === 206 ? Number((r.headers.get('content-range') || '').split('/')[1]) : Number(r.headers.get('content-length'));
  const reader = r.body.getReader();
  let head = new Uint8Array(0);
  while (head.length < 4) {
    const { done, value } = await reader.read();
    if (done) break;
    head = new Uint8Array([...head, ...value.subarray(0, 4 - head.length)]);
  }
  reader.cancel().catch(() => {});
  const magic = String.fromCharCode(...head);
  if (magic !== 'GGUF') {
    throw new Error(`${name} at this address is not a GGUF model file (it starts with ${JSON.stringify(magic)}, not "GGUF"): check the address.`);
  }
  return total || 0;
}

async function resolveUrl(url) {
  const clean = url.split(/[?#]/)[0];
  const last = decodeURIComponent(clean.split('/').filter(Boolean).pop() || 'model');
  if (/\.gguf$/i.test(clean)) {
    return { name: last, origin: 'url', files: [{ name: last, url, size: await checkGguf(url, last) }] };
  }
  const dir = url.endsWith('/') ? url : `${url}/`;
  const file = async (name, optional = false) => {
    const size = await exists(dir + name);
    if (size === null && !optional) throw new Error(`${dir}${name} is not reachable`);
    return size === null ? null : { name, url: dir + name, size, optional };
  };
  if ((await exists(`${dir}adapter_config.json`)) !== null) {
    const files = [await file('adapter_config.json'), await file('adapter_model.safetensors'), await file('genarm.json', true)];
    return { name: last, origin: 'url', files: files.filter(Boolean), role: 'arm' };
  }
  if ((await exists(`${dir}config.json`)) !== null) {
    const files = [await file('config.json'), await file('tokenizer.json', true), await file('tokenizer_config.json', true)];
    if ((await exists(`${dir}model.safetensors`)) !== null) {
      files.push(await file('model.safetensors'));
    } else {
      const index = await (await fetch(`${dir}model.safetensors.index.json`)).json();
      for (const shard of new Set(Object.values(index.weight_map))) files.push(await file(shard));
    }
    return { name: last, origin: 'url', files: files.filter(Boolean) };
  }
  throw new Error(`${url} is not a .gguf file, a LoRA adapter folder or a Hugging Face model folder (no adapter_config.json or config.json found there): check the address.`);
}

// Local files: each .gguf is a model; other loose files together are one folder.
async function stageLocal(files, folderName) {
  fieldError('url-error', '');
  const wanted = files.filter((f) => MODEL_FILES.test(f.name));
  if (!wanted.length) {
    fieldError('url-error', `No model files among ${files.map((f) => f.name).join(', ') || 'the dropped items'}: expected .gguf, .safetensors or the config JSON files.`);
    return;
  }
  let ggufs = wanted.filter((f) => /\.gguf$/i.test(f.name));
  const magics = await Promise.all(ggufs.map(async (f) => String.fromCharCode(...new Uint8Array(await f.slice(0, 4).arrayBuffer()))));
  const notGguf = ggufs.filter((_, i) => magics[i] !== 'GGUF');
  if (notGguf.length) {
    fieldError('url-error', `${notGguf.map((f) => f.name).join(', ')}: not a GGUF model file (it does not start with "GGUF"), so it was not added.`);
    ggufs = ggufs.filter((_, i) => magics[i] === 'GGUF');
  }
  const rest = wanted.filter((f) => !/\.gguf$/i.test(f.name));
  for (const f of ggufs) stage({ name: f.name, origin: 'local', files: [{ name: f.name, file: f }] });
  if (rest.length) {
    stage({ name: folderName || (await looseName(rest)), origin: 'local', files: rest.map((f) => ({ name: f.name, file: f })) });
  }
}

// A name for loose files picked without their folder: an ARM's own (genarm.json), else
// what they are.
async function looseName(files) {
  const info = files.find((f) => f.name === 'genarm.json');
  try {
    const name = info && JSON.parse(await info.text()).name;
    if (typeof name === 'string' && name.trim()) return name.trim();
  } catch (_) {
    /* unreadable: named by kind below */
  }
  return files.some((f) => f.name === 'adapter_config.json') ? 'LoRA adapter' : 'model files';
}

async function pickedFolder(fileList) {
  // Only the folder's own files: a trained ARM keeps an older copy in checkpoint/.
  const groups = new Map();
  for (const f of fileList) {
    const parts = (f.webkitRelativePath || f.name).split('/');
    if (parts.length !== 2) continue;
    if (!groups.has(parts[0])) groups.set(parts[0], []);
    groups.get(parts[0]).push(f);
  }
  for (const [name, files] of groups) await stageLocal(files, name);
}

const fileOf = (entry) => new Promise((resolve, reject) => entry.file(resolve, reject));

async function folderFiles(dirEntry) {
  const reader = dirEntry.createReader();
  const files = [];
  for (;;) {
    const batch = await new Promise((resolve, reject) => reader.readEntries(resolve, reject));
    if (!batch.length) break;
    for (const e of batch) if (e.isFile) files.push(await fileOf(e));
  }
  return files;
}

async function dropped(dataTransfer) {
  const entries = Array.from(dataTransfer.items || [])
    .map((item) => item.webkitGetAsEntry && item.webkitGetAsEntry())
    .filter(Boolean);
  if (!entries.length) {
    await stageLocal(Array.from(dataTransfer.files || []));
    return;
  }
  const loose = [];
  for (const e of entries) {
    if (e.isDirectory) await stageLocal(await folderFiles(e), e.name);
    else loose.push(await fileOf(e));
  }
  if (loose.length) await stageLocal(loose);
}

// ---------------------------------------------------------------------------
// Controls
// ---------------------------------------------------------------------------

// The sliders' range: past it the demo ARMs' guided text turns into repeated words (README
// "The demo ARMs").
const ALPHA_MAX = 3;

// An ARM's starting weight: the demo manifest's `alpha` (an α its evaluation found
// fluent) for a demo ARM, else 1. The session's ARMs are the staged ones, in order.
function startAlpha(i) {
  const alpha = state.staged.filter((s) => s.role === 'arm')[i]?.alpha;
  return Number.isFinite(alpha) ? Math.min(Math.max(alpha, 0), ALPHA_MAX) : 1;
}

// One slider per ARM with a line saying what it pushes the text towards. Before a load
// the staged ARMs get disabled sliders, so the page does not shift when they arrive.
function renderSliders(info) {
  const box = $('sliders');
  box.replaceChildren();
  const arms = info ? info.arms : state.staged.filter((s) => s.role === 'arm').map((s) => ({ name: s.name, objective: null }));
  if (info) state.alphas = info.arms.map((_, i) => startAlpha(i));
  arms.forEach((arm, i) => {
    const knob = document.createElement('div');
    knob.className = 'knob arm-slider';
    const label = document.createElement('label');
    const name = document.createElement('span');
    name.className = 'arm-name';
    name.textContent = `α ${arm.name}`;
    const input = document.createElement('input');
    input.type = 'range';
    input.min = '0';
    input.max = String(ALPHA_MAX);
    input.step = '0.1';
    input.value = String(startAlpha(i));
    input.disabled = !info;
    input.dataset.arm = arm.name;
    input.setAttribute('aria-label', `weight of the ${arm.name} ARM`);
    const what = document.createElement('small');
    what.id = `arm-what-${i}`;
    what.textContent = info
      ? `${arm.objective ? `pushes towards ${arm.objective}` : `follows the ${arm.name} ARM`}; 0 ignores it, higher follows it more`
      : 'available once the models are loaded';
    input.setAttribute('aria-describedby', what.id);
    const out = document.createElement('output');
    out.textContent = startAlpha(i).toFixed(1);
    input.addEventListener('input', () => {
      state.alphas[i] = Number(input.value);
      out.textContent = Number(input.value).toFixed(1);
      worker.postMessage({ type: 'setAlphas', alphas: [...state.alphas] });
    });
    label.append(name, input, out);
    knob.append(label, what);
    box.append(knob);
  });
  if (info && !info.arms.length) {
    const p = document.createElement('p');
    p.className = 'hint';
    p.textContent = 'No ARM loaded: add a LoRA adapter (e.g. www/arms/positive) to get a slider.';
    box.append(p);
  }
}

// The number fields are checked by the browser's constraint validation (min, max, step,
// required in index.html); an invalid value is refused with its message next to the
// field, never clamped.
const NUMBER_FIELDS = ['seed', 'max-tokens'];

function validateField(id) {
  const input = $(id);
  const valid = input.checkValidity();
  input.setAttribute('aria-invalid', String(!valid));
  fieldError(`${id}-error`, valid ? '' : input.validationMessage || 'invalid value');
  return valid;
}

function validInputs() {
  const invalid = NUMBER_FIELDS.filter((id) => !validateField(id));
  if (invalid.length) {
    $('sampling').open = true;
    $(invalid[0]).focus();
  }
  return invalid.length === 0;
}

// The folded sampling settings still say what they are.
function renderSamplingSummary() {
  $('sampling-summary').textContent = `temperature ${$('temperature').value} · top-p ${$('top-p').value} · seed ${$('seed').value} · up to ${$('max-tokens').value} tokens`;
}

for (const id of NUMBER_FIELDS) {
  $(id).addEventListener('input', () => {
    validateField(id);
    renderSamplingSummary();
  });
}

function samplingFromControls() {
  return {
    temperature: Number($('temperature').value),
    topP: Number($('top-p').value),
    seed: Number($('seed').value),
  };
}

for (const [id, key] of [['temperature', 'temperature'], ['top-p', 'topP']]) {
  $(id).addEventListener('input', () => {
    $(`${id}-value`).textContent = $(id).value;
    renderSamplingSummary();
    worker.postMessage({ type: 'setSampling', sampling: { [key]: Number($(id).value) } });
  });
}

function generate() {
  if (state.running || state.loading) return;
  fieldError('generate-error', '');
  if (!state.info) {
    fieldError('generate-error', 'Load a model first.');
    return;
  }
  if (!validInputs()) {
    fieldError('generate-error', 'Fix the marked field first.');
    return;
  }
  if (!$('prompt').value.trim() && $('mode-plain').checked) {
    fieldError('generate-error', 'Type a prompt first: in plain mode the model continues your text.');
    $('prompt').focus();
    return;
  }
  state.runs = {};
  state.runAlphas = [...state.alphas];
  state.tokens = { guided: [], base: [] };
  state.selected = null;
  const chat = $('mode-chat').checked;
  const compare = $('compare').checked && state.info.arms.length > 0;
  $('base-column').hidden = !compare;
  for (const run of ['guided', 'base']) {
    $(`out-${run}`).replaceChildren();
    $(`stats-${run}`).textContent = run === 'base' && compare ? 'waiting for the guided run…' : '';
  }
  $('token-detail').textContent = '';
  $('speed').textContent = '—';
  state.running = true;
  // Generate is disabled while the run lasts: the focus moves to Stop, not to the page.
  const hadFocus = document.activeElement === $('generate');
  setState('generating');
  if (hadFocus) $('stop').focus();
  $('run-status').textContent = compare ? 'Generating: the guided text, then the base alone.' : 'Generating the guided text.';
  worker.postMessage({
    type: 'generate',
    prompt: $('prompt').value,
    chat,
    system: chat ? $('system').value : '',
    maxNewTokens: Number($('max-tokens').value),
    alphas: [...state.alphas],
    sampling: samplingFromControls(),
    compare,
  });
}

// ---------------------------------------------------------------------------
// Output
// ---------------------------------------------------------------------------

// Reward of a token: Σ_i α_i · log π_arm_i(token). The base-only run is scored with
// the weights the guided run started with (its own are 0), so both columns compare.
function tokenReward(token, run) {
  const alphas = run === 'guided' ? token.alphas : state.runAlphas;
  let value = 0;
  let weight = 0;
  token.armLogprobs.forEach((lp, i) => {
    value += alphas[i] * lp;
    weight += alphas[i];
  });
  return { value, weight, alphas };
}

// Favoured: the ARMs' α-weighted mean log-prob of the token above −2; disfavoured: below
// −4 (the legend says the same in words).
function rewardClass(value, weight) {
  if (weight <= 0) return '';
  const perAlpha = value / weight;
  return perAlpha > -2 ? 'high' : perAlpha < -4 ? 'low' : '';
}

function appendToken(run, token, count, seconds) {
  const r = state.runs[run];
  const out = $(`out-${run}`);
  const list = state.tokens[run];
  const previous = list[list.length - 1];
  // A slider moved during the run: marked where the new weights start.
  if (run === 'guided' && previous && previous.token.alphas.join() !== token.alphas.join()) {
    const mark = document.createElement('span');
    mark.className = 'alpha-change';
    mark.dataset.change = `α ${previous.token.alphas.map((a) => a.toFixed(1)).join('/')}→${token.alphas.map((a) => a.toFixed(1)).join('/')}`;
    out.append(mark);
  }
  const span = document.createElement('span');
  span.className = 'tok';
  span.textContent = token.text;
  span.dataset.alpha = token.alphas.join(',');
  span.dataset.index = String(list.length);
  const reward = tokenReward(token, run);
  if (state.info.arms.length) {
    const level = rewardClass(reward.value, reward.weight);
    if (level) span.classList.add(level);
    r.reward += reward.value;
  }
  list.push({ token, reward, span });
  out.append(span);
  r.count = count;
  if (count > 1 && seconds > 0) {
    const tps = (count - 1) / seconds;
    $('speed').textContent = `${tps.toFixed(1)} tokens/s`;
  }
  $(`stats-${run}`).textContent = `${count} tokens…`;
}

// The values of one token, in the detail line under the columns (click, tap, or the
// arrow keys in a focused column).
function describeToken(run, index) {
  const entry = state.tokens[run][index];
  if (!entry) return;
  for (const el of document.querySelectorAll('.tok.selected')) el.classList.remove('selected');
  entry.span.classList.add('selected');
  state.selected = { run, index };
  const { token, reward } = entry;
  const parts = [`${run === 'guided' ? 'Guided' : 'Base only'}, token ${index + 1}: ${JSON.stringify(token.text)} (id ${token.id})`];
  state.info.arms.forEach((arm, i) => {
    const a = reward.alphas[i];
    parts.push(`${arm.name}: log π ${token.armLogprobs[i].toFixed(2)} × α ${a.toFixed(1)} = ${(a * token.armLogprobs[i]).toFixed(2)}`);
  });
  parts.push(`base: log π ${token.baseLogprob.toFixed(2)}`);
  $('token-detail').textContent = parts.join(' · ');
}

for (const run of ['guided', 'base']) {
  const out = $(`out-${run}`);
  out.addEventListener('click', (e) => {
    const span = e.target.closest('.tok');
    if (span) describeToken(run, Number(span.dataset.index));
  });
  out.addEventListener('keydown', (e) => {
    const n = state.tokens[run].length;
    if (!n) return;
    const at = state.selected && state.selected.run === run ? state.selected.index : -1;
    const to = { ArrowRight: at + 1, ArrowLeft: at - 1, Home: 0, End: n - 1 }[e.key];
    if (to === undefined) return;
    e.preventDefault();
    describeToken(run, Math.min(n - 1, Math.max(0, to)));
  });
}

function showMemory(m) {
  if (!m) return;
  $('memory').textContent = `wasm ${mb(m.wasm)}${m.jsHeap ? ` · JS heap ${mb(m.jsHeap)}` : ''}`;
}

function runStats(run, summary, firstTokenMs) {
  const r = state.runs[run];
  const parts = [`${summary.tokens.length} tokens`, `stop: ${summary.stop.replace('_', ' ')}`];
  if (firstTokenMs !== null) parts.push(`first token ${Math.round(firstTokenMs)} ms`);
  if (summary.tokensPerSecond > 0) parts.push(`${summary.tokensPerSecond.toFixed(1)} tokens/s`);
  if (state.info.arms.length && summary.tokens.length) {
    parts.push(`ARM reward ${r.reward.toFixed(1)} (Σ α·log π over the tokens, ${(r.reward / summary.tokens.length).toFixed(2)} per token; higher: more what the ARMs favour)`);
  }
  const p = $(`stats-${run}`);
  p.textContent = parts.join(' · ');
  p.dataset.tokensPerSecond = String(summary.tokensPerSecond);
  p.dataset.firstTokenMs = String(firstTokenMs);
  p.dataset.tokens = String(summary.tokens.length);
  p.dataset.promptTokens = String(summary.promptTokens);
  if (summary.tokensPerSecond > 0) $('speed').textContent = `${summary.tokensPerSecond.toFixed(1)} tokens/s`;
}

function showBackend(info) {
  const reason = inVisitorWords(info.reason);
  const text =
    info.backend === 'WebGPU'
      ? `WebGPU — ${info.adapter || 'adapter'}`
      : `${info.backend} — ${reason}`;
  $('backend').textContent = text;
  $('backend').title = reason;
}

worker.onmessage = ({ data: msg }) => {
  switch (msg.type) {
    case 'progress':
      showProgress(msg);
      break;
    case 'notice':
      notice(msg.level, inVisitorWords(msg.text), msg.scope);
      break;
    case 'cacheCleared': {
      const text = $('progress-text');
      if (text.dataset.fromCache === 'true') {
        text.textContent = `${text.textContent.replace(/ from the browser cache$/, '')}; the browser cache has been cleared since`;
        text.dataset.fromCache = 'false';
      }
      notice('info', 'Model cache cleared: the next load downloads the models again.');
      break;
    }
    case 'ready': {
      state.info = msg.info;
      state.loading = false;
      state.loadedRoles = state.pendingRoles;
      clearNotices('load');
      fieldError('load-error', '');
      showBackend(msg.info);
      showMemory(msg.memory);
      renderSliders(msg.info);
      $('mode-chat').disabled = !msg.info.chatTemplate;
      if (!msg.info.chatTemplate) $('mode-plain').checked = true;
      $('progress').value = 1;
      $('progress-text').textContent = `${msg.info.base}${msg.info.arms.length ? ` + ${msg.info.arms.map((a) => a.name).join(', ')}` : ''} loaded in ${msg.loadSeconds.toFixed(1)} s${msg.fromCache ? ' from the browser cache' : ''}`;
      $('progress-text').dataset.fromCache = String(msg.fromCache);
      $('progress-text').dataset.loadSeconds = String(msg.loadSeconds);
      if (msg.info.tokenizerNote) notice('warn', msg.info.tokenizerNote);
      $('models').open = false;
      setState('ready');
      break;
    }
    case 'runStart':
      state.runs[msg.run] = { count: 0, reward: 0, promptTokens: msg.promptTokens };
      $(`stats-${msg.run}`).dataset.reusedTokens = String(msg.reusedTokens || 0);
      $(`stats-${msg.run}`).textContent = msg.reusedTokens
        ? `reading the prompt (${msg.promptTokens} tokens, ${msg.reusedTokens} already read)…`
        : `reading the prompt (${msg.promptTokens} tokens)…`;
      break;
    case 'prompt':
      $(`stats-${msg.run}`).textContent = `reading the prompt: ${msg.fed} / ${msg.total} tokens…`;
      break;
    case 'token':
      appendToken(msg.run, msg.token, msg.count, msg.seconds);
      break;
    case 'runEnd':
      state.runs[msg.run].ended = true;
      runStats(msg.run, msg.summary, msg.firstTokenMs);
      showMemory(msg.memory);
      break;
    case 'done':
      endRun(msg.stopped ? 'not run: stopped' : 'not run');
      break;
    case 'error':
      if (msg.during === 'load') loadFailed(msg);
      else if (msg.during === 'generate') {
        fieldError('generate-error', inVisitorWords(msg.message));
        endRun('not run: the guided run failed');
      } else notice('error', inVisitorWords(msg.message));
      break;
    default:
      break;
  }
};

// Every run ends here (finished, stopped or failed): no column keeps waiting.
function endRun(unfinished) {
  if (!state.running) return;
  state.running = false;
  const said = [];
  for (const run of ['guided', 'base']) {
    const column = run === 'base' ? $('base-column') : null;
    if (column && column.hidden) continue;
    const r = state.runs[run];
    if (!(r && r.ended)) $(`stats-${run}`).textContent = unfinished;
    said.push(`${run === 'guided' ? 'guided' : 'base only'}: ${r && r.ended ? `${r.count} tokens` : unfinished}`);
  }
  const hadFocus = document.activeElement === $('stop') || document.activeElement === document.body;
  setState(state.info ? 'ready' : 'idle');
  if (hadFocus && !$('generate').disabled) $('generate').focus();
  $('run-status').textContent = `Generation ended (${said.join('; ')}).`;
}

// Bytes loaded of the total, with the speed and the time left while downloading.
function showProgress(msg) {
  const now = performance.now();
  if (!state.download || msg.fromCache) state.download = { at: now, loaded: msg.loaded };
  $('progress').value = msg.total ? msg.loaded / msg.total : 0;
  let text = `${msg.label}: ${mb(msg.loaded)}${msg.total ? ` / ${mb(msg.total)}` : ''}`;
  const seconds = (now - state.download.at) / 1000;
  const rate = seconds > 0.5 ? (msg.loaded - state.download.loaded) / seconds : 0;
  if (msg.fromCache) text += ' (from the browser cache)';
  else if (rate > 0 && msg.total > msg.loaded) {
    const left = Math.ceil((msg.total - msg.loaded) / rate);
    text += ` · ${mb(rate)}/s · ${left < 60 ? `${left} s` : `${Math.ceil(left / 60)} min`} left`;
  }
  $('progress-text').textContent = text;
}

// A failed load leaves nothing loaded (the worker freed the old session first). The
// error goes next to the model it names, else under Load.
function loadFailed(msg) {
  state.loading = false;
  state.info = null;
  state.loadedRoles = new Map();
  renderSliders(null);
  const text = inVisitorWords(msg.message);
  const culprit =
    state.staged.find((s) => s.name === msg.source) ||
    [...state.staged].sort((a, b) => b.name.length - a.name.length).find((s) => msg.message.includes(s.name));
  if (culprit) culprit.error = text;
  else fieldError('load-error', text);
  $('models').open = true;
  $('progress').value = 0;
  $('progress-text').textContent = `loading failed${culprit ? ` (${culprit.name}, see the model list)` : ''}: nothing is loaded`;
  delete $('progress-text').dataset.fromCache;
  setState('error');
}

worker.onerror = (e) => {
  notice('error', `The worker failed: ${e.message || 'could not start (is www/pkg built? run ./build.sh web)'}`);
  setState('error');
};

// ---------------------------------------------------------------------------
// Wiring
// ---------------------------------------------------------------------------

$('generate').addEventListener('click', generate);
$('stop').addEventListener('click', () => worker.postMessage({ type: 'stop' }));
$('prompt').addEventListener('keydown', (e) => {
  if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) generate();
});
$('load').addEventListener('click', load);
$('demo').addEventListener('click', async () => {
  if (await stageDemo()) load();
});
$('clear-cache').addEventListener('click', () => worker.postMessage({ type: 'clearCache' }));
$('add-url').addEventListener('click', async () => {
  const url = $('url').value.trim();
  fieldError('url-error', '');
  if (!url) {
    fieldError('url-error', 'Type the address of a .gguf file or a model folder first.');
    return;
  }
  $('add-url').disabled = true;
  try {
    const source = await resolveUrl(url);
    if (!source.role) source.role = $('url-role').value;
    stage(source);
    $('url').value = '';
  } catch (e) {
    fieldError('url-error', inVisitorWords(e.message));
  } finally {
    $('add-url').disabled = false;
  }
});
const picked = (stageFiles) => (e) => {
  const files = Array.from(e.target.files);
  e.target.value = '';
  stageFiles(files).catch((err) => fieldError('url-error', inVisitorWords(err.message)));
};
$('choose-files').addEventListener('click', () => $('pick-files').click());
$('choose-folder').addEventListener('click', () => $('pick-folder').click());
$('download-go').addEventListener('click', load);
$('pick-files').addEventListener('change', picked((files) => stageLocal(files)));
$('pick-folder').addEventListener('change', picked(pickedFolder));
const drop = $('drop');
drop.addEventListener('dragover', (e) => {
  e.preventDefault();
  drop.classList.add('over');
});
drop.addEventListener('dragleave', () => drop.classList.remove('over'));
drop.addEventListener('drop', (e) => {
  e.preventDefault();
  drop.classList.remove('over');
  dropped(e.dataTransfer).catch((err) => fieldError('url-error', inVisitorWords(err.message)));
});

setState('idle');
renderSamplingSummary();
if (matchMedia('(max-width: 720px)').matches) $('sampling').open = false;
if (!('gpu' in navigator)) $('backend').textContent = 'CPU (wasm) — this browser has no WebGPU';
if (await stageDemo()) {
  // The demo loads at once from the browser cache; a first visit is told the size first.
  if (await allCached()) load();
  else askBeforeDownload();
}
