// End-to-end test of the playground (www/, built by `./build.sh web`) in Debian's
// Chromium, driven by playwright-core:
//   1. with WebGPU on (SwiftShader): the demo model and ARMs load (engine "auto"), guided
//      and base-only text streams in, a slider changes the text, a slider moved mid-run
//      changes the weights of the following tokens, Stop, a reload loads from the
//      browser cache, and the WebGPU engine chosen explicitly generates; screenshot in
//      artifacts/playground.png, timings in artifacts/playground.json;
//   2. without the WebGPU flag: the page says why it runs on the CPU, and generates; the
//      base loaded again from a URL and the positive ARM from local files through the
//      file picker (any other demo ARM was at α = 0) give the same text; WebGPU asked for
//      where the browser has no adapter is explained in the visitor's words;
//   3. no dead ends: invalid max tokens / seed are refused next to the field, Stop
//      leaves no column waiting, removing the loaded base disables Generate, a URL that
//      404s or is no GGUF is refused next to the URL field, a failed load leaves Generate
//      disabled (Ctrl+Enter says "load a model first") and Load working, the demo loads
//      again and clears the errors, and Clear cache updates the status; Stop during the
//      prompt phase of a long prompt ends the run within a second;
//   4. keyboard only: the file chooser, Generate (focus kept), the token values and the
//      run's start and end announced;
//   5. a first visit: the page says what the demo downloads before downloading it, and
//      Generate with the page's defaults gives guided text unlike the base's;
//   6. phone (390×844): once loaded, the prompt, sliders, Generate and output come before
//      the model list, every control is at least 32 px; screenshots at 1280×900 and
//      390×844 in artifacts/;
//   7. speed on the wasm CPU engine with both demo ARMs: the time to the first token of a
//      100-token chat prompt, and decode tokens/s over 64 new tokens.
//
//   node tests/e2e/playground.mjs [PART...]   (parts: webgpu, cpu, deadends, keyboard,
//                                              firstrun, phone, ttft; default all;
//                                              CHROMIUM=path overrides the browser)

import { createServer } from 'node:http';
import { createReadStream, mkdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { dirname, extname, join, normalize, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const here = dirname(fileURLToPath(import.meta.url));
const repo = resolve(here, '../..');
const www = join(repo, 'www');
const artifacts = join(repo, 'artifacts');
const CHROMIUM = process.env.CHROMIUM || '/usr/lib/chromium/chromium';
const LOAD_TIMEOUT = 300_000;
const RUN_TIMEOUT = 300_000;
const PROMPT = 'The movie I watched last night was';
const MAX_TOKENS = 24;
// About 300 words: a prompt the wasm CPU engine reads for several seconds.
const LONG_PROMPT = Array.from(
  { length: 12 },
  (_, i) =>
    `Day ${i + 1} of the trip began early, with coffee by the harbour, a long walk through the old town, ` +
    'a museum of maps and clocks, lunch in a square full of pigeons, and an evening spent writing postcards home.',
).join(' ');

// About 100 tokens once the chat template wraps it: the time-to-first-token case.
const CHAT_PROMPT =
  'I am planning a weekend trip to a small coastal town with two friends who love hiking, ' +
  'seafood and old bookshops. We arrive on Friday evening by train and leave on Sunday ' +
  'afternoon. Could you suggest a relaxed plan for the two days, with one long walk along ' +
  'the cliffs, a good place for dinner, and something to do if it rains?';

// About as long as the template's default system turn it replaces.
const SYSTEM_PROMPT = 'You are a friendly travel guide who knows the coast well.';

const MIME = {
  '.html': 'text/html; charset=utf-8',
  '.js': 'text/javascript',
  '.mjs': 'text/javascript',
  '.css': 'text/css',
  '.json': 'application/json',
  '.wasm': 'application/wasm',
  '.png': 'image/png',
};

// Requests the server answered, by path (to count downloads).
const hits = new Map();

// A static server for www/ on 127.0.0.1, as any static host would serve it.
function serve() {
  const server = createServer((req, res) => {
    const path = normalize(decodeURIComponent(new URL(req.url, 'http://x').pathname));
    hits.set(path, (hits.get(path) || 0) + 1);
    let file = join(www, path);
    if (!file.startsWith(www)) {
      res.writeHead(403).end();
      return;
    }
    try {
      if (statSync(file).isDirectory()) file = join(file, 'index.html');
      const size = statSync(file).size;
      res.writeHead(200, {
        'content-type': MIME[extname(file)] || 'application/octet-stream',
        'content-length': size,
      });
      if (req.method === 'HEAD') res.end();
      else createReadStream(file).pipe(res);
    } catch (_) {
      res.writeHead(404).end();
    }
  });
  return new Promise((ok) => server.listen(0, '127.0.0.1', () => ok(server)));
}

function check(cond, message) {
  if (!cond) throw new Error(`check failed: ${message}`);
  console.log(`ok - ${message}`);
}

async function launch(webgpu) {
  return chromium.launch({
    executablePath: CHROMIUM,
    args: [
      '--no-sandbox',
      ...(webgpu ? ['--enable-unsafe-webgpu'] : []),
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
      '--no-first-run',
      // Extra flags for profiling, e.g. GENARM_CHROMIUM_ARGS='--js-flags=--perf-basic-prof'.
      ...(process.env.GENARM_CHROMIUM_ARGS || '').split(' ').filter(Boolean),
    ],
  });
}

async function openPage(browser, url, log, viewport = { width: 1280, height: 900 }) {
  const context = await browser.newContext({ viewport });
  const page = await context.newPage();
  page.on('console', (m) => log.push(`[${m.type()}] ${m.text()}`));
  page.on('pageerror', (e) => log.push(`[pageerror] ${e.message}`));
  page.on('request', (r) => {
    const u = new URL(r.url());
    if (u.hostname !== '127.0.0.1') log.push(`[offsite] ${r.url()}`);
  });
  await page.goto(url);
  return { context, page };
}

async function waitReady(page) {
  await page.waitForFunction(
    () => ['ready', 'error'].includes(document.body.dataset.state) && !!document.querySelector('#progress-text[data-load-seconds]'),
    null,
    { timeout: LOAD_TIMEOUT },
  ).catch(() => {});
  const state = await page.evaluate(() => document.body.dataset.state);
  if (state !== 'ready') {
    const notices = await page.locator('#notices').innerText();
    throw new Error(`the page did not get ready (state ${state}): ${notices}`);
  }
}

// A first visit: the page says what the demo downloads and waits for the visitor; a
// visit with the demo in the browser cache loads it at once.
async function loadDemo(page) {
  await page.waitForFunction(
    () => !document.getElementById('download-notice').hidden || ['loading', 'ready'].includes(document.body.dataset.state),
    null,
    { timeout: 30_000 },
  );
  if (await page.locator('#download-notice').isVisible()) await page.click('#download-go');
  await waitReady(page);
}

// The model list folds into one line once a base is loaded; the tests that change it
// open it as a visitor would, by its summary.
async function openModels(page) {
  if (!(await page.evaluate(() => document.getElementById('models').open))) await page.click('#models > summary');
}

// The output's text (tokens only).
const tokensText = (page, run) => page.$$eval(`#out-${run} .tok`, (spans) => spans.map((s) => s.textContent).join(''));

async function generate(page) {
  await page.click('#generate');
  await page.waitForFunction(() => document.body.dataset.state === 'generating', null, { timeout: 10_000 }).catch(() => {});
  await page.waitForFunction(() => document.body.dataset.state === 'ready', null, { timeout: RUN_TIMEOUT });
  const guided = await tokensText(page, 'guided');
  const base = await tokensText(page, 'base');
  return page.evaluate(({ guided, base }) => {
    const stats = (run) => {
      const d = document.getElementById(`stats-${run}`).dataset;
      return {
        tokens: Number(d.tokens),
        firstTokenMs: Number(d.firstTokenMs),
        tokensPerSecond: Number(d.tokensPerSecond),
        promptTokens: Number(d.promptTokens),
        reusedTokens: Number(d.reusedTokens),
      };
    };
    return { guided, base, guidedStats: stats('guided'), baseStats: stats('base') };
  }, { guided, base });
}

async function setControls(page) {
  await page.check('#mode-plain');
  await page.fill('#prompt', PROMPT);
  await page.fill('#max-tokens', String(MAX_TOKENS));
  await page.fill('#seed', '3');
  // The runs are guided by the positive ARM alone, at α = 1 whatever the manifest's
  // starting α: any other demo ARM at α = 0.
  await page.locator('#sliders input[type=range][data-arm="positive"]').fill('1');
  for (const other of await page.locator('#sliders input[type=range]:not([data-arm="positive"])').all()) {
    await other.fill('0');
  }
}

// The positive ARM's weight in a token's `data-alpha` (the weights of all ARMs, in
// demo.json order; positive is the first).
const positiveAlpha = (alphas) => (alphas ?? '').split(',')[0];

async function withWebGpu(url, metrics) {
  const log = [];
  const browser = await launch(true);
  try {
    const started = Date.now();
    const { page } = await openPage(browser, url, log);
    await loadDemo(page);
    metrics.firstLoadSeconds = (Date.now() - started) / 1000;
    const backend = await page.locator('#backend').innerText();
    metrics.backend = backend;
    check(/CPU \(wasm\)|WebGPU/.test(backend), `backend shown: ${backend}`);
    const slider = page.locator('#sliders input[type=range][data-arm="positive"]');
    check((await slider.count()) === 1, 'one slider, labelled by the ARM name "positive"');
    check(/positive/.test(await page.locator('#sliders').innerText()), 'slider label names the ARM');
    // Each demo ARM starts at the α its manifest suggests (a fluent guided text).
    const demo = JSON.parse(readFileSync(join(www, 'models/demo.json'), 'utf8'));
    const suggested = demo.arms.find((a) => a.name === 'positive').alpha;
    check(Number(await slider.inputValue()) === suggested, `the positive slider starts at demo.json's α ${suggested}`);

    await setControls(page);
    await slider.fill('0');
    const plain = await generate(page);
    check(plain.guided.length > 0, `guided text streamed at α = 0: ${JSON.stringify(plain.guided)}`);
    check(plain.base.length > 0, `base-only text streamed: ${JSON.stringify(plain.base)}`);
    check(plain.guided === plain.base, 'α = 0 and the base alone agree on the same seed');

    await slider.fill('3');
    const guided = await generate(page);
    check(guided.base === plain.base, 'the base-only run is the same for the same seed');
    check(guided.guided !== plain.guided, `α = 3 changes the text: ${JSON.stringify(guided.guided)}`);
    metrics.guided = guided.guidedStats;
    metrics.base = guided.baseStats;
    const marked = await page.locator('#out-guided .tok.high, #out-guided .tok.low').count();
    check(marked > 0, `tokens are marked by their ARM reward (${marked})`);
    await page.locator('#out-guided .tok').nth(1).click();
    const detail = await page.locator('#token-detail').innerText();
    check(/positive: log π -?\d/.test(detail), `a clicked token shows its values: ${JSON.stringify(detail)}`);

    // Move the slider while text streams: later tokens carry the new weight.
    await page.uncheck('#compare');
    await page.fill('#max-tokens', '32');
    await page.click('#generate');
    await page.waitForFunction(() => document.querySelectorAll('#out-guided .tok').length >= 3, null, { timeout: RUN_TIMEOUT });
    await slider.fill('0.5');
    await page.waitForFunction(() => document.body.dataset.state === 'ready', null, { timeout: RUN_TIMEOUT });
    const alphas = await page.$$eval('#out-guided .tok', (spans) => spans.map((s) => s.dataset.alpha));
    const [firstAlpha, lastAlpha] = [positiveAlpha(alphas[0]), positiveAlpha(alphas[alphas.length - 1])];
    check(firstAlpha === '3' && lastAlpha === '0.5', `slider moved mid-run applies to the next tokens (${firstAlpha} … ${lastAlpha})`);
    const change = await page.locator('#out-guided .alpha-change').getAttribute('data-change');
    check(/3\.0.*→0\.5/.test(change || ''), `the move is marked in the text: ${change}`);

    // Stop ends a run early.
    await page.fill('#max-tokens', '200');
    await page.click('#generate');
    await page.waitForFunction(() => document.querySelectorAll('#out-guided .tok').length >= 2, null, { timeout: RUN_TIMEOUT });
    await page.click('#stop');
    await page.waitForFunction(() => document.body.dataset.state === 'ready', null, { timeout: RUN_TIMEOUT });
    check(/stop: cancelled/.test(await page.locator('#stats-guided').innerText()), 'Stop cancels the run');

    // Back to the side-by-side view for the screenshot.
    await page.check('#compare');
    await page.fill('#max-tokens', String(MAX_TOKENS));
    await slider.fill(String(suggested));
    await generate(page);
    mkdirSync(artifacts, { recursive: true });
    await page.screenshot({ path: join(artifacts, 'playground.png'), fullPage: true });
    console.log(`screenshot: ${join(artifacts, 'playground.png')}`);

    // A reload is served from the Cache API.
    const reloadStarted = Date.now();
    await page.reload();
    await waitReady(page);
    metrics.cachedLoadSeconds = (Date.now() - reloadStarted) / 1000;
    const fromCache = await page.locator('#progress-text').getAttribute('data-from-cache');
    check(fromCache === 'true', `reload loads from the browser cache (${metrics.cachedLoadSeconds.toFixed(1)} s)`);

    // WebGPU chosen explicitly: the wgpu engine runs the demo on the adapter (SwiftShader
    // here, a software renderer that "auto" passes over, so only a few tokens).
    await openModels(page);
    await page.selectOption('#backend-choice', 'webgpu');
    await page.click('#load');
    await waitReady(page);
    const gpuBackend = await page.locator('#backend').innerText();
    metrics.webgpuBackend = gpuBackend;
    check(/^WebGPU — .+/.test(gpuBackend), `WebGPU on request: ${gpuBackend}`);
    await setControls(page);
    await page.uncheck('#compare');
    await page.fill('#max-tokens', '4');
    await page.locator('#sliders input[type=range][data-arm="positive"]').fill('3');
    const onGpu = await generate(page);
    check(onGpu.guided.length > 0, `the WebGPU engine generates: ${JSON.stringify(onGpu.guided)}`);
    metrics.webgpu = onGpu.guidedStats;

    // A model that passed the check when added but 404s when loaded on WebGPU: the
    // error names it on its row, and it is not downloaded again for the CPU.
    await page.route('**/models/vanishing.gguf', (route) =>
      route.request().headers().range
        ? route.fulfill({ status: 206, headers: { 'content-range': 'bytes 0-3/64' }, body: 'GGUF' })
        : route.continue(),
    );
    await openModels(page);
    while ((await page.locator('#staged li').count()) > 0) await page.locator('#staged li button').first().click();
    await page.fill('#url', `${url}models/vanishing.gguf`);
    await page.selectOption('#url-role', 'base');
    await page.click('#add-url');
    await page.waitForFunction(() => document.querySelectorAll('#staged li').length === 1);
    await page.click('#load');
    await page.waitForFunction(() => document.body.dataset.state === 'error', null, { timeout: LOAD_TIMEOUT });
    const rowError = await page.locator('#staged li .item-error').innerText();
    const notices = await page.locator('#notices').innerText();
    check(/not found/.test(rowError) && !/CPU/.test(notices), `a 404 on load is reported on its row, not retried on the CPU: ${JSON.stringify(rowError)}`);
    check(hits.get('/models/vanishing.gguf') === 1, `the missing model was requested once (${hits.get('/models/vanishing.gguf')})`);
  } finally {
    await browser.close();
    check(!log.some((l) => l.startsWith('[pageerror]') || l.startsWith('[offsite]')), 'no page errors, no off-site requests');
    if (log.length) console.log(log.join('\n'));
  }
}

async function withoutWebGpu(url, metrics) {
  const log = [];
  const browser = await launch(false);
  try {
    const { page } = await openPage(browser, url, log);
    await loadDemo(page);
    const backend = await page.locator('#backend').innerText();
    metrics.fallbackBackend = backend;
    check(/^CPU \(wasm\) — .+/.test(backend), `without WebGPU the page falls back and says why: ${backend}`);
    await setControls(page);
    await page.uncheck('#compare');
    await page.fill('#max-tokens', '8');
    const out = await generate(page);
    check(out.guided.length > 0, 'the CPU fallback generates');

    // The same models again, the base from a URL and the ARM from local files (the
    // picker), must give the same text on the same seed.
    await openModels(page);
    while ((await page.locator('#staged li').count()) > 0) {
      await page.locator('#staged li button').first().click();
    }
    const demo = JSON.parse(readFileSync(join(www, 'models/demo.json'), 'utf8'));
    await page.fill('#url', new URL(demo.base.files[0].url, url).href);
    await page.selectOption('#url-role', 'base');
    await page.click('#add-url');
    await page.waitForFunction(() => document.querySelectorAll('#staged li').length === 1);
    const armDir = join(www, 'arms', demo.arms[0].name);
    await page.setInputFiles('#pick-files', demo.arms[0].files.map((f) => join(armDir, f.name)));
    await page.waitForFunction(() => document.querySelectorAll('#staged li').length === 2);
    const staged = await page.locator('#staged').innerText();
    check(/url/.test(staged) && /local/.test(staged), `staged from a URL and local files: ${JSON.stringify(staged)}`);
    check(/positive/.test(staged) && !/\.gguf\/|adapter_config\n/.test(staged), 'loose ARM files are named by their genarm.json');
    await page.click('#load');
    await page.waitForFunction(() => document.body.dataset.state === 'loading', null, { timeout: 10_000 }).catch(() => {});
    await waitReady(page);
    check(/positive/.test(await page.locator('#sliders').innerText()), 'the ARM from local files has its slider');
    const again = await generate(page);
    check(again.guided === out.guided, `URL + local files give the demo's text: ${JSON.stringify(again.guided)}`);

    // WebGPU asked for where the browser offers no adapter: the page says so in the
    // visitor's words (no Vulkan drivers, no apt-get) and runs on the CPU.
    await openModels(page);
    await page.selectOption('#backend-choice', 'webgpu');
    await page.click('#load');
    await page.waitForFunction(() => document.body.dataset.state === 'loading', null, { timeout: 10_000 }).catch(() => {});
    await waitReady(page);
    const noAdapter = await page.locator('#backend').getAttribute('title');
    check(/hardware acceleration/.test(noAdapter) && !/apt-get|Vulkan/.test(noAdapter), `no adapter, in the visitor's words: ${JSON.stringify(noAdapter)}`);
  } finally {
    await browser.close();
    if (log.length) console.log(log.join('\n'));
  }
}

const state = (page) => page.evaluate(() => document.body.dataset.state);
const visibleText = (page, selector) =>
  page.evaluate((sel) => {
    const el = document.querySelector(sel);
    return el && !el.hidden ? el.textContent : '';
  }, selector);

async function deadEnds(url, metrics) {
  const log = [];
  const browser = await launch(false);
  try {
    const { page } = await openPage(browser, url, log);
    await loadDemo(page);
    await setControls(page);

    // Invalid numbers are refused, with the browser's message next to the field.
    for (const [id, value] of [['max-tokens', '0'], ['max-tokens', '5000'], ['max-tokens', '2.5'], ['seed', '-5'], ['seed', '1.5']]) {
      await page.fill('#seed', '3');
      await page.fill('#max-tokens', '4');
      await page.fill(`#${id}`, value);
      await page.click('#generate');
      const message = await visibleText(page, `#${id}-error`);
      const ran = (await page.locator('#out-guided .tok').count()) > 0;
      check(message.length > 0 && !ran && (await state(page)) === 'ready', `${id} = ${value} is refused: ${JSON.stringify(message)}`);
    }
    await page.fill('#seed', '3');
    await page.fill('#max-tokens', '4');
    await page.fill('#prompt', '');
    await page.click('#generate');
    const empty = await visibleText(page, '#generate-error');
    check(/[Tt]ype a prompt/.test(empty) && (await state(page)) === 'ready', `an empty plain prompt is refused: ${JSON.stringify(empty)}`);
    await page.fill('#prompt', PROMPT);
    check((await visibleText(page, '#max-tokens-error')) === '' && (await visibleText(page, '#seed-error')) === '', 'valid values clear the field messages');

    // Stop during the guided run: no column keeps "waiting for the guided run…".
    await page.check('#compare');
    await page.fill('#max-tokens', '200');
    await page.click('#generate');
    await page.waitForFunction(() => document.querySelectorAll('#out-guided .tok').length >= 2, null, { timeout: RUN_TIMEOUT });
    await page.click('#stop');
    await page.waitForFunction(() => document.body.dataset.state === 'ready', null, { timeout: RUN_TIMEOUT });
    const baseStats = await page.locator('#stats-base').innerText();
    check(!/waiting/.test(baseStats), `after Stop the base column says ${JSON.stringify(baseStats)}`);

    // Stop while a long prompt is read: the prompt goes in by chunks with its progress
    // shown, and Stop ends the run within a second.
    await page.fill('#prompt', LONG_PROMPT);
    await page.click('#generate');
    await page.waitForFunction(() => /reading the prompt: \d+ \/ \d+/.test(document.getElementById('stats-guided').textContent), null, { timeout: RUN_TIMEOUT });
    const during = await page.locator('#stats-guided').innerText();
    const stopAt = Date.now();
    await page.click('#stop');
    await page.waitForFunction(() => document.body.dataset.state === 'ready', null, { timeout: RUN_TIMEOUT });
    metrics.promptStopSeconds = (Date.now() - stopAt) / 1000;
    const afterStop = await page.locator('#stats-guided').innerText();
    const stoppedTokens = await page.locator('#out-guided .tok').count();
    check(
      metrics.promptStopSeconds < 1 && stoppedTokens === 0 && /cancelled|stopped/.test(afterStop),
      `Stop during the prompt (${JSON.stringify(during)}) ends the run in ${metrics.promptStopSeconds.toFixed(2)} s: ${JSON.stringify(afterStop)}`,
    );
    await page.fill('#prompt', PROMPT);

    // The loaded base removed: nothing runs it any more, and the list says so.
    await openModels(page);
    check((await page.locator('#staged li[data-loaded="true"]').count()) === 3, 'the model list marks the loaded models');
    await page.locator('#staged li', { hasText: 'SmolLM2' }).locator('button').click();
    check(await page.locator('#generate').isDisabled(), 'removing the loaded base disables Generate');
    check((await page.locator('#staged li[data-loaded="true"]').count()) === 0, 'the model list says nothing is loaded');
    const status = await page.locator('#progress-text').innerText();
    check(/nothing loaded/.test(status), `the status says so: ${JSON.stringify(status)}`);
    await page.focus('#prompt');
    await page.keyboard.press('Control+Enter');
    const noBase = await visibleText(page, '#generate-error');
    check(/[Ll]oad a model first/.test(noBase) && (await state(page)) === 'idle', `Generate after the base was removed is refused: ${JSON.stringify(noBase)}`);
    const staged = await page.locator('#staged li').count();

    // URLs are checked when added: a 404 and a file that is no GGUF are refused there.
    await page.fill('#url', `${url}models/missing.gguf`);
    await page.click('#add-url');
    await page.waitForFunction(() => !document.getElementById('url-error').hidden);
    const notFound = await visibleText(page, '#url-error');
    check(/not found/.test(notFound) && (await page.locator('#staged li').count()) === staged, `a URL that 404s is refused: ${JSON.stringify(notFound)}`);
    await page.route('**/fake.gguf', (route) => route.fulfill({ status: 200, contentType: 'application/octet-stream', body: 'This is not a model' }));
    await page.fill('#url', `${url}fake.gguf`);
    await page.click('#add-url');
    await page.waitForFunction(() => /GGUF/.test(document.getElementById('url-error').textContent));
    const notGguf = await visibleText(page, '#url-error');
    check(/not a GGUF model file/.test(notGguf) && !/magic/.test(notGguf) && (await page.locator('#staged li').count()) === staged, `a URL that is no GGUF is refused: ${JSON.stringify(notGguf)}`);
    await page.setInputFiles('#pick-files', { name: 'fake.gguf', mimeType: 'application/octet-stream', buffer: Buffer.from('This is not a model') });
    await page.waitForFunction(() => /fake\.gguf/.test(document.getElementById('url-error').textContent));
    check((await page.locator('#staged li').count()) === staged, 'a local file that is no GGUF is refused');

    // A GGUF that fails to load: the error sits on its row, Generate stays disabled and
    // Ctrl+Enter says why; Load and Demo still work.
    const broken = Buffer.concat([Buffer.from('GGUF'), Buffer.alloc(60, 0xff)]);
    await page.setInputFiles('#pick-files', { name: 'broken.gguf', mimeType: 'application/octet-stream', buffer: broken });
    await page.waitForFunction((n) => document.querySelectorAll('#staged li').length === n, staged + 1);
    await page.click('#load');
    await page.waitForFunction(() => document.body.dataset.state === 'error', null, { timeout: LOAD_TIMEOUT });
    const rowError = await page.locator('#staged li', { hasText: 'broken.gguf' }).locator('.item-error').innerText();
    check(rowError.length > 0 && !/broken\.gguf\/broken\.gguf/.test(rowError), `the failed load is reported on its row: ${JSON.stringify(rowError)}`);
    check(await page.locator('#generate').isDisabled(), 'after a failed load Generate is disabled');
    check(!(await page.locator('#load').isDisabled()) && !(await page.locator('#demo').isDisabled()), 'after a failed load Load and Demo work');
    await page.focus('#prompt');
    await page.keyboard.press('Control+Enter');
    const refused = await visibleText(page, '#generate-error');
    check(/[Ll]oad a model first/.test(refused) && (await state(page)) === 'error', `Generate without a model is refused: ${JSON.stringify(refused)}`);

    // The demo again: the errors go, and Clear cache updates the status.
    await page.click('#demo');
    await page.waitForFunction(() => document.body.dataset.state === 'loading', null, { timeout: 10_000 }).catch(() => {});
    await waitReady(page);
    await openModels(page);
    const leftovers = await page.evaluate(() => document.querySelectorAll('#staged .item-error, #notices .error').length);
    check(leftovers === 0 && (await visibleText(page, '#load-error')) === '', 'a successful load clears the errors');
    check(!(await page.locator('#generate').isDisabled()), 'Generate is enabled again');
    const fromCache = await page.locator('#progress-text').getAttribute('data-from-cache');
    await page.click('#clear-cache');
    await page.waitForFunction(() => /cleared/.test(document.getElementById('notices').textContent));
    const after = await page.locator('#progress-text').innerText();
    check(!/from the browser cache$/.test(after), `after Clear cache (loaded from cache: ${fromCache}) the status reads ${JSON.stringify(after)}`);
    metrics.deadEnds = 'ok';
  } finally {
    await browser.close();
    check(!log.some((l) => l.startsWith('[pageerror]') || l.startsWith('[offsite]')), 'no page errors, no off-site requests');
    if (log.length) console.log(log.join('\n'));
  }
}

// Keyboard only: every step of a run by Tab, Enter and the arrow keys.
async function keyboardOnly(url, metrics) {
  const log = [];
  const browser = await launch(false);
  try {
    const { page } = await openPage(browser, url, log);
    // The file chooser opens from the keyboard.
    const chooser = page.waitForEvent('filechooser', { timeout: 10_000 });
    await tabTo(page, 'choose-files');
    await page.keyboard.press('Enter');
    check(!!(await chooser), 'the file chooser opens with Tab and Enter');
    await tabTo(page, 'download-go');
    await page.keyboard.press('Enter');
    await waitReady(page);
    // From the top of a fresh page (a reload: the demo now loads from the cache).
    await page.reload();
    await waitReady(page);
    const stops = await tabTo(page, 'generate');
    metrics.generateTabStop = stops;
    check(stops <= 8, `Generate is Tab stop ${stops} once the models are loaded`);
    await tabTo(page, 'max-tokens');
    await page.keyboard.press('Control+A');
    await page.keyboard.type('6');
    await tabTo(page, 'generate');
    await page.keyboard.press('Enter');
    await page.waitForFunction(() => /^Generating/.test(document.getElementById('run-status').textContent), null, { timeout: 10_000 });
    check(await page.evaluate(() => document.activeElement.id === 'stop'), 'while it runs the focus is on Stop');
    await page.waitForFunction(() => document.body.dataset.state === 'ready', null, { timeout: RUN_TIMEOUT });
    const status = await page.locator('#run-status').innerText();
    check(/^Generation ended \(guided: \d+ tokens; base only: \d+ tokens\)/.test(status), `start and end are announced: ${JSON.stringify(status)}`);
    check(await page.evaluate(() => document.activeElement.id === 'generate'), 'after the run the focus is back on Generate');
    const live = await page.$$eval('[aria-live], [role=status], [role=alert]', (els) => els.filter((e) => e.closest('.out')).length);
    check(live === 0, 'the streamed text is not a live region (no token-by-token announcements)');
    await tabTo(page, 'out-guided');
    await page.keyboard.press('ArrowRight');
    await page.keyboard.press('ArrowRight');
    const detail = await page.locator('#token-detail').innerText();
    check(/token 2: .*positive: log π/.test(detail), `the arrow keys show a token's values: ${JSON.stringify(detail)}`);
    const labelled = await page.evaluate(() => {
      const p = document.getElementById('progress');
      return p.getAttribute('aria-label') && p.getAttribute('aria-describedby');
    });
    check(!!labelled, 'the progress bar is labelled');
  } finally {
    await browser.close();
    check(!log.some((l) => l.startsWith('[pageerror]') || l.startsWith('[offsite]')), 'no page errors, no off-site requests');
  }
}

// Presses Tab until the element `id` has the focus; returns how many presses it took.
async function tabTo(page, id) {
  for (let n = 1; n <= 60; n++) {
    await page.keyboard.press('Tab');
    if (await page.evaluate((want) => document.activeElement && document.activeElement.id === want, id)) return n;
  }
  throw new Error(`#${id} is not reachable with Tab`);
}

// A first visit with the page's defaults (chat mode, both demo ARMs at α = 1): the
// guided text must differ from the base's and not loop. Seeds 1–3 are recorded.
async function firstRun(url, metrics) {
  const log = [];
  const browser = await launch(false);
  try {
    const { page } = await openPage(browser, url, log);
    await page.waitForFunction(() => !document.getElementById('download-notice').hidden, null, { timeout: 30_000 });
    const notice = await page.locator('#download-notice').innerText();
    check(/downloads \d+ MB once/.test(notice) && /later visits/.test(notice), `a first visit is told the download size first: ${JSON.stringify(notice)}`);
    check((await state(page)) !== 'loading', 'nothing is downloaded before the visitor agrees');
    check((await page.locator('#sliders input[type=range]').count()) === 2, 'the ARM sliders are in place before loading (no shift)');
    await page.click('#download-go');
    await page.waitForFunction(() => / MB\/s · \d+ (s|min) left/.test(document.getElementById('progress-text').textContent), null, { timeout: LOAD_TIMEOUT }).catch(() => {});
    metrics.downloadProgress = await page.locator('#progress-text').innerText();
    await waitReady(page);
    check(/MB\/s/.test(metrics.downloadProgress) || /loaded/.test(metrics.downloadProgress), `download progress: ${JSON.stringify(metrics.downloadProgress)}`);
    metrics.firstRun = [];
    for (const seed of [1, 2, 3]) {
      await page.fill('#seed', String(seed));
      const out = await generate(page);
      metrics.firstRun.push({ seed, guided: out.guided, base: out.base });
      console.log(`seed ${seed}\n  guided: ${JSON.stringify(out.guided)}\n  base:   ${JSON.stringify(out.base)}`);
      check(out.guided.trim().length > 0 && out.guided !== out.base, `seed ${seed}: the guided text differs from the base's`);
      check(!loops(out.guided), `seed ${seed}: the guided text does not loop`);
      const { promptTokens, reusedTokens } = out.baseStats;
      check(reusedTokens === promptTokens - 1, `seed ${seed}: the base-only run keeps ${reusedTokens} of the guided run's ${promptTokens} prompt tokens`);
    }
  } finally {
    await browser.close();
    check(!log.some((l) => l.startsWith('[pageerror]') || l.startsWith('[offsite]')), 'no page errors, no off-site requests');
  }
}

// Time to the first token as a visitor of the hosted demo meets it: chat mode, both
// demo ARMs at the page's default weights, a prompt of about 100 tokens after the chat
// template, on the wasm CPU engine (no WebGPU). Recorded in artifacts/playground.json
// (README, Playground), not asserted: it depends on the machine.
async function firstTokenTime(url, metrics) {
  const log = [];
  const browser = await launch(false);
  try {
    const { page } = await openPage(browser, url, log);
    await loadDemo(page);
    await page.check('#mode-chat');
    await page.fill('#prompt', CHAT_PROMPT);
    await page.fill('#max-tokens', '16');
    await page.uncheck('#compare');
    const out = await generate(page);
    const { promptTokens, reusedTokens } = out.guidedStats;
    const arms = await page.locator('#sliders input[type=range]').count();
    metrics.firstToken = { promptTokens, reusedTokens, arms, firstTokenMs: out.guidedStats.firstTokenMs, tokensPerSecond: out.guidedStats.tokensPerSecond };
    check(promptTokens >= 80 && promptTokens <= 130 && arms === 2, `a ${promptTokens}-token chat prompt with ${arms} ARMs`);
    // The chat template's opening was read with the model: the run reads the rest.
    check(reusedTokens > 0 && reusedTokens < promptTokens / 2, `the chat opening (${reusedTokens} tokens) was read at load`);
    check(Number.isFinite(out.guidedStats.firstTokenMs) && out.guidedStats.tokens > 0, `first token after ${Math.round(out.guidedStats.firstTokenMs)} ms, then ${out.guidedStats.tokensPerSecond.toFixed(1)} tokens/s`);
    // The same words after a system prompt of the visitor's own: the opening differs, so
    // (nearly) the whole prompt is read before the first token.
    await page.fill('#system', SYSTEM_PROMPT);
    const cold = await generate(page);
    metrics.firstTokenNewOpening = { promptTokens: cold.guidedStats.promptTokens, reusedTokens: cold.guidedStats.reusedTokens, firstTokenMs: cold.guidedStats.firstTokenMs };
    check(cold.guidedStats.tokens > 0, `with a system prompt: ${cold.guidedStats.promptTokens} tokens, ${cold.guidedStats.reusedTokens} kept, first token after ${Math.round(cold.guidedStats.firstTokenMs)} ms`);
    await page.fill('#system', '');
    // Decode speed over more tokens (what `genarm bench` measures natively); the chat
    // default stops early, plain text runs to the limit.
    await page.check('#mode-plain');
    await page.fill('#prompt', PROMPT);
    await page.fill('#max-tokens', '64');
    const long = await generate(page);
    metrics.decode = { arms, tokens: long.guidedStats.tokens, tokensPerSecond: long.guidedStats.tokensPerSecond };
    metrics.memoryAfterRuns = await page.locator('#memory').innerText();
    check(long.guidedStats.tokens >= 32, `decode: ${long.guidedStats.tokens} tokens at ${long.guidedStats.tokensPerSecond.toFixed(1)} tokens/s with ${arms} ARMs`);
  } finally {
    await browser.close();
    check(!log.some((l) => l.startsWith('[pageerror]') || l.startsWith('[offsite]')), 'no page errors, no off-site requests');
  }
}

// A text loops when one sentence (or 4-word run) comes three times or more.
function loops(text) {
  const counts = new Map();
  const words = text.toLowerCase().split(/\s+/).filter(Boolean);
  for (let i = 0; i + 4 <= words.length; i++) {
    const key = words.slice(i, i + 4).join(' ');
    counts.set(key, (counts.get(key) || 0) + 1);
  }
  return [...counts.values()].some((n) => n >= 3);
}

// A phone: once loaded the prompt, sliders, Generate and output are above the model
// list; every visible control is at least 32 px both ways. Screenshots at both sizes.
async function phone(url, metrics) {
  const log = [];
  const browser = await launch(false);
  try {
    mkdirSync(artifacts, { recursive: true });
    for (const [name, viewport] of [['desktop', { width: 1280, height: 900 }], ['phone', { width: 390, height: 844 }]]) {
      const { page } = await openPage(browser, url, log, viewport);
      await loadDemo(page);
      // On a phone the sampling settings are folded under Generate.
      if (name === 'phone') check(!(await page.locator('#seed').isVisible()), 'on a phone the sampling settings are folded');
      if (!(await page.evaluate(() => document.getElementById('sampling').open))) await page.click('#sampling > summary');
      await page.fill('#seed', '2');
      await page.fill('#max-tokens', '32');
      if (name === 'phone') await page.click('#sampling > summary');
      await generate(page);
      await page.locator('#out-guided .tok').nth(3).click();
      const tops = await page.evaluate(() =>
        Object.fromEntries(['prompt', 'sliders', 'generate', 'out-guided', 'models'].map((id) => [id, Math.round(document.getElementById(id).getBoundingClientRect().top + scrollY)])),
      );
      metrics[`${name}Tops`] = tops;
      if (name === 'phone') {
        check(['prompt', 'sliders', 'generate', 'out-guided'].every((id) => tops[id] < tops.models), `on a phone the prompt, sliders, Generate and output come before the models: ${JSON.stringify(tops)}`);
        check(tops.generate < viewport.height, `Generate is on the first screen (y ${tops.generate})`);
        const small = await page.$$eval('button, select, input, summary, label.choice', (els) =>
          els
            .filter((e) => e.offsetParent !== null && e.type !== 'radio' && e.type !== 'checkbox')
            .map((e) => ({ id: e.id || e.textContent.trim().slice(0, 20), ...e.getBoundingClientRect().toJSON() }))
            .filter((r) => r.height < 32 || r.width < 32)
            .map((r) => `${r.id} ${Math.round(r.width)}×${Math.round(r.height)}`),
        );
        check(small.length === 0, `touch targets are at least 32 px (${small.join(', ') || 'none smaller'})`);
      }
      const file = join(artifacts, `playground-${viewport.width}x${viewport.height}.png`);
      await page.screenshot({ path: file, fullPage: name === 'phone' });
      console.log(`screenshot: ${file}`);
      await page.context().close();
    }
  } finally {
    await browser.close();
    check(!log.some((l) => l.startsWith('[pageerror]') || l.startsWith('[offsite]')), 'no page errors, no off-site requests');
  }
}

const parts = process.argv.slice(2);
const wants = (part) => parts.length === 0 || parts.includes(part);
const server = await serve();
const url = `http://127.0.0.1:${server.address().port}/`;
const metrics = {};
try {
  if (wants('webgpu')) await withWebGpu(url, metrics);
  if (wants('cpu')) await withoutWebGpu(url, metrics);
  if (wants('deadends')) await deadEnds(url, metrics);
  if (wants('keyboard')) await keyboardOnly(url, metrics);
  if (wants('firstrun')) await firstRun(url, metrics);
  if (wants('phone')) await phone(url, metrics);
  if (wants('ttft')) await firstTokenTime(url, metrics);
  mkdirSync(artifacts, { recursive: true });
  writeFileSync(join(artifacts, 'playground.json'), `${JSON.stringify(metrics, null, 2)}\n`);
  console.log(JSON.stringify(metrics, null, 2));
} finally {
  server.close();
}
