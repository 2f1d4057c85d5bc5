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
};

// Files the loaders read; anything else in a picked folder stays on disk.
const MODEL_FILES = /(\.gguf|\.safetensors|^(config|tokenizer|tokenizer_config|generation_config|adapter_config|genarm|model\.safetensors\.index)\.json)$/i;

function setState(s) {
  document.body.dataset.state = s;
  $('generate').disabled = s !== 'ready';
  $('stop').disabled = s !== 'generating';
  $('load').disabled = s === 'loading' || s === 'generating';
  $('demo').disabled = s === 'loading' || s === 'generating';
}

function mb(bytes) {
  return `${(bytes / 1e6).toFixed(bytes < 1e7 ? 1 : 0)} MB`;
}

function notice(level, text) {
  const li = document.createElement('li');
  li.className = level;
  li.textContent = text;
  $('notices').append(li);
  while ($('notices').children.length > 6) $('notices').firstElementChild.remove();
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
    role.addEventListener('change', () => {
      s.role = role.value;
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
    remove.addEventListener('click', () => {
      state.staged.splice(i, 1);
      renderStaged();
    });
    li.append(role, name, detail, remove);
    ul.append(li);
  });
}

function stage(source) {
  if (!source.role) {
    const isAdapter = source.files.some((f) => f.name === 'adapter_config.json');
    const hasBase = state.staged.some((s) => s.role === 'base');
    source.role = isAdapter || hasBase ? 'arm' : 'base';
  }
  state.staged.push(source);
  renderStaged();
}

async function demoManifest() {
  try {
    const r = await fetch('models/demo.json', { cache: 'no-cache' });
    if (r.ok) return await r.json();
  } catch (_) {
    /* fall through */
  }
  notice('warn', 'No demo models on this server: run ./build.sh web to put them in www/models/, or add a model below.');
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
  return true;
}

function load() {
  const bases = state.staged.filter((s) => s.role === 'base');
  if (bases.length !== 1) {
    notice('error', bases.length ? 'Several models are marked "base": keep one.' : 'Add a base model first.');
    return;
  }
  const strip = (s) => ({ name: s.name, files: s.files });
  state.loading = true;
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

async function resolveUrl(url) {
  const clean = url.split(/[?#]/)[0];
  const last = decodeURIComponent(clean.split('/').filter(Boolean).pop() || 'model');
  if (/\.gguf$/i.test(clean)) {
    return { name: last, origin: 'url', files: [{ name: last, url, size: (await exists(url)) || 0 }] };
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
  throw new Error(`${url}: not a .gguf file, a LoRA adapter folder or an HF model folder (no adapter_config.json or config.json there)`);
}

// Local files: each .gguf is a model; other loose files together are one folder.
function stageLocal(files, folderName) {
  const wanted = files.filter((f) => MODEL_FILES.test(f.name));
  if (!wanted.length) {
    notice('error', `No model files among ${files.map((f) => f.name).join(', ') || 'the dropped items'}: expected .gguf, .safetensors or the config JSON files.`);
    return;
  }
  const ggufs = wanted.filter((f) => /\.gguf$/i.test(f.name));
  const rest = wanted.filter((f) => !/\.gguf$/i.test(f.name));
  for (const f of ggufs) stage({ name: f.name, origin: 'local', files: [{ name: f.name, file: f }] });
  if (rest.length) {
    stage({ name: folderName || rest[0].name.replace(/\.[^.]+$/, ''), origin: 'local', files: rest.map((f) => ({ name: f.name, file: f })) });
  }
}

function pickedFolder(fileList) {
  // Only the folder's own files: a trained ARM keeps an older copy in checkpoint/.
  const groups = new Map();
  for (const f of fileList) {
    const parts = (f.webkitRelativePath || f.name).split('/');
    if (parts.length !== 2) continue;
    if (!groups.has(parts[0])) groups.set(parts[0], []);
    groups.get(parts[0]).push(f);
  }
  for (const [name, files] of groups) stageLocal(files, name);
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
    stageLocal(Array.from(dataTransfer.files || []));
    return;
  }
  const loose = [];
  for (const e of entries) {
    if (e.isDirectory) stageLocal(await folderFiles(e), e.name);
    else loose.push(await fileOf(e));
  }
  if (loose.length) stageLocal(loose);
}

// ---------------------------------------------------------------------------
// Controls
// ---------------------------------------------------------------------------

function renderSliders(info) {
  const box = $('sliders');
  box.replaceChildren();
  state.alphas = info.arms.map(() => 1);
  info.arms.forEach((arm, i) => {
    const label = document.createElement('label');
    label.className = 'arm-slider';
    if (arm.objective) label.title = arm.objective;
    const name = document.createElement('span');
    name.className = 'arm-name';
    name.textContent = `α ${arm.name}`;
    const input = document.createElement('input');
    input.type = 'range';
    input.min = '0';
    input.max = '4';
    input.step = '0.1';
    input.value = '1';
    input.dataset.arm = arm.name;
    input.setAttribute('aria-label', `weight of the ${arm.name} ARM`);
    const out = document.createElement('output');
    out.textContent = '1.0';
    input.addEventListener('input', () => {
      state.alphas[i] = Number(input.value);
      out.textContent = Number(input.value).toFixed(1);
      worker.postMessage({ type: 'setAlphas', alphas: [...state.alphas] });
    });
    label.append(name, input, out);
    box.append(label);
  });
  if (!info.arms.length) {
    const p = document.createElement('p');
    p.className = 'hint';
    p.textContent = 'No ARM loaded: add a LoRA adapter (e.g. www/arms/positive) to get a slider.';
    box.append(p);
  }
}

function samplingFromControls() {
  return {
    temperature: Number($('temperature').value),
    topP: Number($('top-p').value),
    seed: Math.max(0, Math.floor(Number($('seed').value) || 0)),
  };
}

for (const [id, key] of [['temperature', 'temperature'], ['top-p', 'topP']]) {
  $(id).addEventListener('input', () => {
    $(`${id}-value`).textContent = $(id).value;
    worker.postMessage({ type: 'setSampling', sampling: { [key]: Number($(id).value) } });
  });
}

function generate() {
  if (!state.info || state.running) return;
  const chat = $('mode-chat').checked;
  const compare = $('compare').checked && state.info.arms.length > 0;
  $('base-column').hidden = !compare;
  for (const run of ['guided', 'base']) {
    $(`out-${run}`).replaceChildren();
    $(`stats-${run}`).textContent = run === 'base' && compare ? 'waiting for the guided run…' : '';
  }
  state.running = true;
  setState('generating');
  worker.postMessage({
    type: 'generate',
    prompt: $('prompt').value,
    chat,
    system: chat ? $('system').value : '',
    maxNewTokens: Math.max(1, Math.floor(Number($('max-tokens').value) || 48)),
    alphas: [...state.alphas],
    sampling: samplingFromControls(),
    compare,
  });
}

// ---------------------------------------------------------------------------
// Output
// ---------------------------------------------------------------------------

// Reward of a token: Σ_i α_i · log π_arm_i(token). The base-only run is scored with
// the guided weights (its own are 0), so both columns are comparable.
function tokenReward(token, run) {
  const alphas = run === 'guided' ? token.alphas : state.alphas;
  let value = 0;
  let weight = 0;
  token.armLogprobs.forEach((lp, i) => {
    value += alphas[i] * lp;
    weight += alphas[i];
  });
  return { value, weight, alphas };
}

function appendToken(run, token, count, seconds) {
  const r = state.runs[run];
  const span = document.createElement('span');
  span.className = 'tok';
  span.textContent = token.text;
  span.dataset.alpha = token.alphas.join(',');
  const { value, weight, alphas } = tokenReward(token, run);
  if (state.info.arms.length) {
    const lines = state.info.arms.map(
      (arm, i) => `${arm.name}: α·log π = ${(alphas[i] * token.armLogprobs[i]).toFixed(3)}  (α ${alphas[i].toFixed(1)}, log π ${token.armLogprobs[i].toFixed(3)})`,
    );
    lines.push(`base: log π = ${token.baseLogprob.toFixed(3)}`, `token id ${token.id}`);
    span.title = lines.join('\n');
    if (weight > 0) {
      const t = Math.min(1, Math.max(0, 1 + value / weight / 6));
      span.style.backgroundColor = `hsl(${Math.round(t * 120)} 65% 84%)`;
    }
    r.reward += value;
  } else {
    span.title = `base: log π = ${token.baseLogprob.toFixed(3)}\ntoken id ${token.id}`;
  }
  $(`out-${run}`).append(span);
  r.count = count;
  if (count > 1 && seconds > 0) {
    const tps = (count - 1) / seconds;
    $('speed').textContent = `${tps.toFixed(1)} tokens/s`;
  }
  $(`stats-${run}`).textContent = `${count} tokens…`;
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
  if (state.info.arms.length && summary.tokens.length) parts.push(`Σ ARM reward ${r.reward.toFixed(1)}`);
  const p = $(`stats-${run}`);
  p.textContent = parts.join(' · ');
  p.dataset.tokensPerSecond = String(summary.tokensPerSecond);
  p.dataset.firstTokenMs = String(firstTokenMs);
  p.dataset.tokens = String(summary.tokens.length);
  if (summary.tokensPerSecond > 0) $('speed').textContent = `${summary.tokensPerSecond.toFixed(1)} tokens/s`;
}

function showBackend(info) {
  const text =
    info.backend === 'WebGPU'
      ? `WebGPU — ${info.adapter || 'adapter'}`
      : `${info.backend} — ${info.reason}`;
  $('backend').textContent = text;
  $('backend').title = info.reason;
}

worker.onmessage = ({ data: msg }) => {
  switch (msg.type) {
    case 'progress': {
      $('progress').value = msg.total ? msg.loaded / msg.total : 0;
      $('progress-text').textContent = `${msg.label}: ${mb(msg.loaded)}${msg.total ? ` / ${mb(msg.total)}` : ''}${msg.fromCache ? ' (from the browser cache)' : ''}`;
      break;
    }
    case 'notice':
      notice(msg.level, msg.text);
      break;
    case 'ready': {
      state.info = msg.info;
      state.loading = false;
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
      setState('ready');
      break;
    }
    case 'runStart':
      state.runs[msg.run] = { count: 0, reward: 0 };
      $(`stats-${msg.run}`).textContent = `${msg.promptTokens} prompt tokens…`;
      break;
    case 'token':
      appendToken(msg.run, msg.token, msg.count, msg.seconds);
      break;
    case 'runEnd':
      runStats(msg.run, msg.summary, msg.firstTokenMs);
      showMemory(msg.memory);
      break;
    case 'done':
      state.running = false;
      setState('ready');
      break;
    case 'error':
      notice('error', msg.message);
      if (state.loading) {
        state.loading = false;
        $('progress-text').textContent = 'loading failed';
        setState(state.info ? 'ready' : 'error');
      }
      break;
    default:
      break;
  }
};

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
  if (!url) return;
  try {
    const source = await resolveUrl(url);
    if (!source.role) source.role = $('url-role').value;
    stage(source);
    $('url').value = '';
  } catch (e) {
    notice('error', e.message);
  }
});
$('pick-files').addEventListener('change', (e) => {
  stageLocal(Array.from(e.target.files));
  e.target.value = '';
});
$('pick-folder').addEventListener('change', (e) => {
  pickedFolder(Array.from(e.target.files));
  e.target.value = '';
});
const drop = $('drop');
drop.addEventListener('dragover', (e) => {
  e.preventDefault();
  drop.classList.add('over');
});
drop.addEventListener('dragleave', () => drop.classList.remove('over'));
drop.addEventListener('drop', (e) => {
  e.preventDefault();
  drop.classList.remove('over');
  dropped(e.dataTransfer).catch((err) => notice('error', err.message));
});

setState('idle');
if (!('gpu' in navigator)) $('backend').textContent = 'CPU (wasm) — this browser has no WebGPU';
if (await stageDemo()) load();
