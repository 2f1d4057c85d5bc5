// The model worker: every byte of model work happens here, so the page never blocks.
//
// Protocol (every message has a `type`):
//   page → worker  load {base, arms, backend: 'auto' | 'webgpu' | 'cpu', context} | generate {prompt, chat, system,
//                  maxNewTokens, alphas, sampling, compare} | setAlphas {alphas} |
//                  setSampling {sampling} | stop | unload | clearCache
//   worker → page  progress {label, loaded, total, fromCache} | notice {level, text, scope} |
//                  ready {info, loadSeconds, memory} | runStart {run, promptTokens, reusedTokens} |
//                  prompt {run, fed, total} |
//                  token {run, token, count, seconds} | runEnd {run, summary, firstTokenMs,
//                  memory} | done {stopped} | cacheCleared |
//                  error {message, during: the request's type, source: the model it concerns}
// A source is {name, files: [{name, url, size, optional} | {name, file: File}]}.

import init, { ModelFiles, Session, wasmMemoryBytes } from './pkg/genarm.js';

const CACHE_NAME = 'genarm-models-v1';

const wasmReady = init();
let session = null;
let info = null;
let running = false;
let stopRequested = false;
let currentRun = null;
let alphas = [];

const post = (msg) => self.postMessage(msg);
const errorText = (e) => (e && e.message) || String(e);

self.onmessage = (event) => {
  const during = event.data && event.data.type;
  handle(event.data).catch((e) => post({ type: 'error', message: errorText(e), during, source: e && e.source }));
};

async function handle(msg) {
  switch (msg.type) {
    case 'load':
      return load(msg);
    case 'generate':
      return generate(msg);
    case 'setAlphas':
      alphas = msg.alphas;
      // The base-only run keeps α = 0; the new weights apply to the guided run.
      if (session && currentRun === 'guided') session.setAlphas(alphas);
      return;
    case 'setSampling':
      if (session && running) session.setSampling(msg.sampling);
      return;
    case 'stop':
      stopRequested = true;
      if (session && running) session.cancel();
      return;
    case 'unload':
      if (running) throw new Error('stop the generation before unloading');
      if (session) session.free();
      session = null;
      info = null;
      return;
    case 'clearCache':
      return clearCache();
    default:
      throw new Error(`unknown message ${msg.type}`);
  }
}

function memory() {
  return {
    wasm: wasmMemoryBytes(),
    jsHeap: (self.performance && performance.memory && performance.memory.usedJSHeapSize) || null,
  };
}

// ---------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------

async function load({ base, arms, backend, context }) {
  if (running) throw new Error('stop the generation before loading other models');
  await wasmReady;
  if (session) {
    session.free();
    session = null;
  }
  const started = performance.now();
  const cache = await openCache();
  const all = [base, ...arms];
  const total = all.flatMap((s) => s.files).reduce((n, f) => n + (f.size || (f.file && f.file.size) || 0), 0);
  let progress = { loaded: 0, total };
  const open = async (options) => {
    const collected = [];
    try {
      for (const source of all) {
        try {
          collected.push(await collect(source, cache, progress));
        } catch (e) {
          // Reading or downloading failed: the model's fault, not the engine's.
          if (e && typeof e === 'object') e.source = source.name;
          throw e;
        }
      }
      post({ type: 'progress', label: 'building the engine', loaded: progress.loaded, total: progress.total });
      const [baseFiles, ...armFiles] = collected;
      // Session.open consumes the ModelFiles (their memory moves into the engine).
      collected.length = 0;
      return await Session.open(baseFiles, armFiles, { context, ...options });
    } finally {
      for (const files of collected) files.free();
    }
  };
  const adapter = backend === 'cpu' ? null : await probeAdapter();
  if (backend === 'cpu') {
    session = await open({ preferGpu: false, cpuReason: 'CPU chosen on the page' });
  } else if (!adapter && self.navigator.gpu) {
    session = await open({
      preferGpu: false,
      cpuReason: 'this browser has WebGPU but offered no GPU (hardware acceleration off, or this GPU is blocked)',
    });
  } else if (backend === 'auto' && adapter && adapter.software) {
    session = await open({
      preferGpu: false,
      cpuReason: `WebGPU adapter "${adapter.label}" is a software renderer, slower than this engine (choose WebGPU to use it anyway)`,
    });
  } else {
    try {
      session = await open({ preferGpu: true, adapterLabel: adapter ? adapter.label : undefined });
    } catch (e) {
      // A download or a file the engine rejects (its message names the file) fails on
      // the CPU too: only an engine failure is retried there.
      const namesFile = all.some((s) => s.files.some((f) => errorText(e).includes(`${s.name}/${f.name}`)));
      if ((e && e.source) || namesFile) throw e;
      // The WebGPU engine took the files; read them again (from the cache) for the CPU.
      post({ type: 'notice', level: 'warn', scope: 'load', text: `The WebGPU engine failed (${errorText(e)}); loading on the CPU instead.` });
      progress = { loaded: 0, total };
      session = await open({ preferGpu: false, cpuReason: `the WebGPU engine failed: ${errorText(e)}` });
    }
  }
  info = session.info();
  alphas = info.arms.map(() => 1);
  // The chat template's opening (its system turn and user header) is read now, as part
  // of loading: the first chat prompt then reads only the user's words.
  if (info.chatTemplate) {
    post({ type: 'progress', label: 'reading the chat template', loaded: progress.loaded, total: progress.total });
    try {
      await session.warmChat();
    } catch (e) {
      post({ type: 'notice', level: 'warn', scope: 'load', text: `The chat template's opening was not read ahead (${errorText(e)}); the first prompt reads it.` });
    }
  }
  const loadSeconds = (performance.now() - started) / 1000;
  post({ type: 'ready', info, loadSeconds, fromCache: progress.fromCache === true, memory: memory() });
}

// The WebGPU adapter as GPUAdapter.info describes it (wgpu gets no name from the
// browser), and whether it is a software renderer (SwiftShader, llvmpipe), which runs
// models slower than the wasm CPU engine.
async function probeAdapter() {
  try {
    const adapter = self.navigator.gpu && (await navigator.gpu.requestAdapter());
    if (!adapter) return null;
    const i = adapter.info || {};
    const label = [i.vendor, i.architecture, i.device, i.description].filter(Boolean).join(' ') || 'unnamed adapter';
    const software =
      i.isFallbackAdapter === true || adapter.isFallbackAdapter === true || /swiftshader|llvmpipe|lavapipe|software/i.test(label);
    return { label, software };
  } catch (_) {
    return null;
  }
}

async function openCache() {
  if (!self.caches) {
    post({
      type: 'notice',
      level: 'warn',
      scope: 'load',
      text: 'Browser storage (Cache API) is unavailable here — it needs https:// or localhost — so models are downloaded again on every visit.',
    });
    return null;
  }
  try {
    return await caches.open(CACHE_NAME);
  } catch (e) {
    post({ type: 'notice', level: 'warn', text: `Browser storage is unavailable (${errorText(e)}); models will not be cached.` });
    return null;
  }
}

async function collect(source, cache, progress) {
  const files = new ModelFiles(source.name);
  try {
    for (const f of source.files) {
      if (f.file) {
        await readStream(files, f.name, f.file.size, f.file.stream(), source.name, progress, false);
      } else {
        await fetchFile(files, source.name, f, cache, progress);
      }
    }
  } catch (e) {
    files.free();
    throw e;
  }
  return files;
}

async function fetchFile(files, sourceName, f, cache, progress) {
  const url = new URL(f.url, self.location.href).href;
  let response = null;
  if (cache) {
    try {
      response = await cache.match(url);
    } catch (_) {
      response = null;
    }
    // A cached copy of another size is stale (the demo model was rebuilt).
    const cachedSize = response && Number(response.headers.get('content-length'));
    if (response && f.size && cachedSize !== f.size) {
      await cache.delete(url);
      response = null;
    }
  }
  const fromCache = response !== null && response !== undefined;
  if (!fromCache) {
    try {
      response = await fetch(url);
    } catch (e) {
      throw new Error(`${url}: ${errorText(e)} (offline, blocked by CORS or by the page's Content-Security-Policy?)`);
    }
    if (response.status === 404 && f.optional) return;
    if (!response.ok) throw new Error(`${url}: HTTP ${response.status} ${response.statusText}`);
  }
  progress.fromCache = progress.fromCache !== false && fromCache;
  const size = Number(response.headers.get('content-length')) || f.size || 0;
  let body = response.body;
  let cached = null;
  if (!fromCache && cache) {
    const [forWasm, forCache] = body.tee();
    body = forWasm;
    const headers = new Headers({ 'content-type': response.headers.get('content-type') || 'application/octet-stream' });
    if (size) headers.set('content-length', String(size));
    cached = cache.put(url, new Response(forCache, { headers })).then(
      () => null,
      (e) => e,
    );
  }
  await readStream(files, f.name, size, body, sourceName, progress, fromCache);
  if (cached) {
    const e = await cached;
    if (e) await cacheFailed(e, url);
  }
}

async function cacheFailed(e, url) {
  let space = '';
  try {
    const { usage, quota } = await navigator.storage.estimate();
    space = ` (${mb(usage)} of ${mb(quota)} used)`;
  } catch (_) {
    /* no estimate */
  }
  const quota = e && (e.name === 'QuotaExceededError' || /quota/i.test(e.message || ''));
  post({
    type: 'notice',
    level: 'warn',
    text: quota
      ? `Browser storage is full${space}: ${url} was loaded but not cached, so a reload downloads it again. "Clear cache" or the site settings free space.`
      : `Could not cache ${url}: ${errorText(e)}. It was loaded; a reload downloads it again.`,
  });
}

async function readStream(files, name, size, stream, sourceName, progress, fromCache) {
  files.begin(name, size);
  const reader = stream.getReader();
  const label = sourceName === name ? name : `${sourceName}/${name}`;
  let lastPost = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    files.push(value);
    progress.loaded += value.byteLength;
    const now = performance.now();
    if (now - lastPost > 100) {
      lastPost = now;
      post({ type: 'progress', label, loaded: progress.loaded, total: progress.total, fromCache });
    }
  }
  post({ type: 'progress', label, loaded: progress.loaded, total: progress.total, fromCache });
}

async function clearCache() {
  if (self.caches) await caches.delete(CACHE_NAME);
  post({ type: 'cacheCleared' });
}

function mb(bytes) {
  return `${(bytes / 1e6).toFixed(0)} MB`;
}

// ---------------------------------------------------------------------------
// Generation
// ---------------------------------------------------------------------------

// Resolves on a fresh task, so the page's messages (sliders, Stop) are handled
// between tokens even though each step finishes without waiting for anything.
const channel = new MessageChannel();
const waiting = [];
channel.port1.onmessage = () => waiting.shift()();
const nextTask = () =>
  new Promise((resolve) => {
    waiting.push(resolve);
    channel.port2.postMessage(null);
  });

async function generate(req) {
  if (running) throw new Error('a generation is already running');
  if (!session) {
    post({ type: 'done', stopped: false });
    throw new Error('no model is loaded: press Load first');
  }
  running = true;
  stopRequested = false;
  alphas = req.alphas;
  // Guided first (the sliders act on it), then the base alone with the same seed,
  // prompt and sampling: α = 0 for every ARM.
  const runs = req.compare && info.arms.length > 0 ? ['guided', 'base'] : ['guided'];
  try {
    for (const run of runs) {
      if (stopRequested) break;
      currentRun = run;
      const started = performance.now();
      const { promptTokens, reusedTokens } = session.start({
        prompt: req.prompt,
        chat: req.chat,
        system: req.system || undefined,
        maxNewTokens: req.maxNewTokens,
        alphas: run === 'base' ? alphas.map(() => 0) : alphas,
        sampling: req.sampling,
      });
      post({ type: 'runStart', run, promptTokens, reusedTokens });
      // The prompt goes in by chunks of about 0.4 s: Stop is heard between
      // them, and the page shows how far it is.
      for (;;) {
        if (stopRequested) session.cancel();
        const progress = await session.prefill();
        if (!progress || progress.done) break;
        post({ type: 'prompt', run, fed: progress.fed, total: progress.total });
        await nextTask();
      }
      let count = 0;
      let firstAt = null;
      for (;;) {
        if (stopRequested) session.cancel();
        const token = await session.next();
        if (!token) break;
        count += 1;
        const now = performance.now();
        if (firstAt === null) firstAt = now;
        post({ type: 'token', run, token, count, seconds: (now - firstAt) / 1000 });
        await nextTask();
      }
      const summary = session.finish();
      post({
        type: 'runEnd',
        run,
        summary,
        firstTokenMs: firstAt === null ? null : firstAt - started,
        memory: memory(),
      });
    }
  } finally {
    running = false;
    currentRun = null;
    post({ type: 'done', stopped: stopRequested });
  }
}
